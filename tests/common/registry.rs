//! A real container registry for integration tests: Debian's `docker-registry`
//! (distribution 2.8) run as a child process on a free port of 127.0.0.1, with
//! optional htpasswd basic auth or Bearer token auth, TLS from its own
//! throwaway CA and an access log to count requests, plus `push` of images
//! from an OCI layout with `skopeo`.

use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long `start` waits for `GET /v2/` to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How many ports `start` tries before it gives up (a port picked free can be
/// taken by someone else before the registry binds it).
const START_ATTEMPTS: usize = 5;

/// Credentials of a registry started with basic auth.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

/// How to start a [`Registry`]. The default is plain HTTP without auth.
#[derive(Clone, Debug, Default)]
pub struct RegistryOptions {
    /// Require HTTP basic auth with these credentials (htpasswd, bcrypt).
    pub auth: Option<Credentials>,
    /// Serve HTTPS with a certificate for 127.0.0.1 and localhost, signed by
    /// a CA made for this registry alone.
    pub tls: bool,
    /// Require Bearer tokens from a token server (exclusive with `auth`).
    pub token: Option<TokenAuth>,
    /// Write one access log line per request, read back by
    /// [`Registry::access_log`].
    pub access_log: bool,
}

/// Bearer token auth (distribution's `auth.token`): the registry sends
/// clients to `realm` and trusts tokens signed by the key whose certificate
/// is `root_cert_bundle`.
#[derive(Clone, Debug)]
pub struct TokenAuth {
    pub realm: String,
    pub service: String,
    pub issuer: String,
    pub root_cert_bundle: PathBuf,
    /// What `push` gives the token server (skopeo `--dest-creds`), if it
    /// wants credentials.
    pub push_credentials: Option<Credentials>,
}

/// One request as the registry's access log (combined log format) has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessLogEntry {
    pub method: String,
    pub path: String,
    pub status: u16,
    pub user_agent: String,
}

impl RegistryOptions {
    /// Plain HTTP, no auth.
    pub fn new() -> Self {
        Self::default()
    }

    /// Require basic auth as `username:password`.
    pub fn basic_auth(mut self, username: &str, password: &str) -> Self {
        self.auth = Some(Credentials {
            username: username.to_string(),
            password: password.to_string(),
        });
        self
    }

    /// Serve HTTPS with the registry's own CA.
    pub fn tls(mut self) -> Self {
        self.tls = true;
        self
    }

    /// Require Bearer tokens issued as `token` says.
    pub fn token_auth(mut self, token: TokenAuth) -> Self {
        self.token = Some(token);
        self
    }

    /// Log every request, for [`Registry::access_log`].
    pub fn access_log(mut self) -> Self {
        self.access_log = true;
        self
    }

    /// Start the registry.
    pub fn start(self) -> Result<Registry, String> {
        Registry::start_with(self)
    }
}

/// Files of a TLS registry.
#[derive(Clone, Debug)]
struct TlsFiles {
    /// Directory holding only `ca.crt`: the layout `skopeo --cert-dir` and
    /// containers' `certs.d/<host>/` expect (a stray `*.key` there would be
    /// taken for a client key).
    ca_dir: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

/// A running `docker-registry`. Dropping it kills the process and removes its
/// storage.
pub struct Registry {
    // Dropped first (fields drop in order): the process dies before its
    // storage directory is removed.
    child: ChildGuard,
    port: u16,
    auth: Option<Credentials>,
    /// Credentials for the token server of a token-auth registry.
    token_credentials: Option<Credentials>,
    tls: Option<TlsFiles>,
    log: PathBuf,
    dir: tempfile::TempDir,
}

/// An HTTP response read by [`http_get`].
#[derive(Clone, Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names in lower case, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first header of that name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

impl Registry {
    /// Start a plain HTTP registry without auth.
    pub fn start() -> Result<Registry, String> {
        Self::start_with(RegistryOptions::default())
    }

    /// Start a registry as `opts` says.
    pub fn start_with(opts: RegistryOptions) -> Result<Registry, String> {
        let dir = tempfile::Builder::new()
            .prefix("berth-registry-")
            .tempdir()
            .map_err(|e| format!("registry: create tempdir: {e}"))?;
        let storage = dir.path().join("storage");
        fs::create_dir(&storage).map_err(|e| format!("registry: mkdir storage: {e}"))?;
        if opts.auth.is_some() && opts.token.is_some() {
            return Err("registry: basic auth and token auth exclude each other".to_string());
        }

        let htpasswd = match &opts.auth {
            Some(c) => Some(write_htpasswd(dir.path(), c)?),
            None => None,
        };
        let tls = if opts.tls {
            Some(make_tls(dir.path())?)
        } else {
            None
        };
        let ca_file = tls.as_ref().map(|t| t.ca_dir.join("ca.crt"));

        let mut last_err = String::new();
        for attempt in 0..START_ATTEMPTS {
            let port = free_port()?;
            let config = dir.path().join("config.yml");
            let yaml = config_yaml(port, &storage, htpasswd.as_deref(), tls.as_ref(), &opts);
            fs::write(&config, yaml).map_err(|e| format!("registry: write config: {e}"))?;
            let log = dir.path().join(format!("registry-{attempt}.log"));
            let log_file =
                fs::File::create(&log).map_err(|e| format!("registry: create log: {e}"))?;
            let log_err = log_file
                .try_clone()
                .map_err(|e| format!("registry: dup log: {e}"))?;
            let child = Command::new("docker-registry")
                .arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(log_file)
                .stderr(log_err)
                .spawn()
                .map_err(|e| format!("registry: spawn docker-registry: {e}"))?;
            // From here on the guard kills the child on any early return.
            let mut child = ChildGuard(child);
            match wait_ready(&mut child.0, port, ca_file.as_deref(), &log) {
                Ok(()) => {
                    return Ok(Registry {
                        child,
                        port,
                        auth: opts.auth,
                        token_credentials: opts.token.and_then(|t| t.push_credentials),
                        tls,
                        log,
                        dir,
                    });
                }
                // Most likely the port was taken between probe and bind.
                Err(e) => last_err = e,
            }
        }
        Err(format!(
            "registry: not ready after {START_ATTEMPTS} attempts: {last_err}"
        ))
    }

    /// "127.0.0.1:PORT", the registry's host as image references name it.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Process id of the `docker-registry` child.
    pub fn pid(&self) -> u32 {
        self.child.0.id()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// "http://127.0.0.1:PORT" or "https://127.0.0.1:PORT".
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr())
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    pub fn credentials(&self) -> Option<&Credentials> {
        self.auth.as_ref()
    }

    /// PEM file of the CA that signed the registry's certificate (TLS only).
    pub fn ca_cert(&self) -> Option<PathBuf> {
        self.tls.as_ref().map(|t| t.ca_dir.join("ca.crt"))
    }

    /// Directory that holds only `ca.crt` (TLS only): usable as
    /// `skopeo --cert-dir` or copied to `certs.d/<addr>/`.
    pub fn cert_dir(&self) -> Option<&Path> {
        self.tls.as_ref().map(|t| t.ca_dir.as_path())
    }

    /// The registry's own temporary directory (storage, config, log).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// What the registry wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Requests logged so far (empty unless started with `access_log`). The
    /// registry logs a request when it has written the whole response.
    pub fn access_log(&self) -> Vec<AccessLogEntry> {
        self.log().lines().filter_map(parse_access_line).collect()
    }

    /// Push the image or index tagged `layout_ref` in the OCI layout at
    /// `layout` to `<addr>/<repo_and_tag>` with skopeo. Returns the manifest
    /// digest the registry stored ("sha256:…").
    pub fn push(
        &self,
        layout: &Path,
        layout_ref: &str,
        repo_and_tag: &str,
    ) -> Result<String, String> {
        let digest_file = self.dir.path().join(format!(
            "digest-{}",
            repo_and_tag.replace(['/', ':', '@'], "_")
        ));
        let mut cmd = Command::new("skopeo");
        // --all: an index is pushed with every platform's image, not just the
        // host's. --preserve-digests: skopeo must fail rather than rewrite a
        // manifest, so the digests the fixtures computed stay valid.
        cmd.args(["copy", "--quiet", "--all", "--preserve-digests"]);
        cmd.arg("--digestfile").arg(&digest_file);
        match &self.tls {
            Some(t) => {
                cmd.arg("--dest-tls-verify=true").arg("--dest-cert-dir");
                cmd.arg(&t.ca_dir);
            }
            None => {
                cmd.arg("--dest-tls-verify=false");
            }
        }
        if let Some(c) = self.auth.as_ref().or(self.token_credentials.as_ref()) {
            cmd.arg("--dest-creds")
                .arg(format!("{}:{}", c.username, c.password));
        }
        cmd.arg(format!("oci:{}:{layout_ref}", layout.display()));
        cmd.arg(format!("docker://{}/{repo_and_tag}", self.addr()));
        run(&mut cmd).map_err(|e| format!("push {layout_ref} to {repo_and_tag}: {e}"))?;
        let digest = fs::read_to_string(&digest_file)
            .map_err(|e| format!("push {repo_and_tag}: read skopeo's digest file: {e}"))?;
        let _ = fs::remove_file(&digest_file);
        Ok(digest.trim().to_string())
    }

    /// GET `path` (e.g. "/v2/") from the registry with the given extra headers,
    /// sending the registry's credentials if it has any. Uses a plain std
    /// socket for HTTP and curl for HTTPS.
    pub fn get(&self, path: &str, headers: &[(&str, &str)]) -> Result<HttpResponse, String> {
        let auth = self
            .auth
            .as_ref()
            .map(|c| (c.username.as_str(), c.password.as_str()));
        self.get_as(path, headers, auth)
    }

    /// Like [`Registry::get`] with explicit credentials (None: anonymous).
    pub fn get_as(
        &self,
        path: &str,
        headers: &[(&str, &str)],
        auth: Option<(&str, &str)>,
    ) -> Result<HttpResponse, String> {
        match &self.tls {
            None => {
                let mut all: Vec<(String, String)> = headers
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                if let Some((u, p)) = auth {
                    all.push((
                        "Authorization".into(),
                        format!("Basic {}", base64(format!("{u}:{p}").as_bytes())),
                    ));
                }
                let all: Vec<(&str, &str)> =
                    all.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                http_get(&self.addr(), path, &all)
            }
            Some(t) => curl_get(
                &format!("{}{path}", self.url()),
                headers,
                auth,
                Some(&t.ca_dir.join("ca.crt")),
            ),
        }
    }
}

/// Kills the registry by its pid (SIGKILL via `Child::kill`) and reaps it
/// when dropped, so a panicking test leaves no process behind.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// Poll `GET /v2/` until it answers 200 or 401 (auth on), the child exits,
/// or `READY_TIMEOUT` passes.
fn wait_ready(child: &mut Child, port: u16, ca: Option<&Path>, log: &Path) -> Result<(), String> {
    let addr = format!("127.0.0.1:{port}");
    let read_log = || fs::read_to_string(log).unwrap_or_default();
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut last = String::from("no answer yet");
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "docker-registry exited early ({status}): {}",
                read_log()
            ));
        }
        let got = match ca {
            None => http_get(&addr, "/v2/", &[]),
            Some(ca) => curl_get(&format!("https://{addr}/v2/"), &[], None, Some(ca)),
        };
        match got {
            Ok(r) if r.status == 200 || r.status == 401 => return Ok(()),
            Ok(r) => last = format!("GET /v2/ answered {}", r.status),
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!(
        "GET /v2/ not answered within {READY_TIMEOUT:?} (last: {last}); log: {}",
        read_log()
    ))
}

fn config_yaml(
    port: u16,
    storage: &Path,
    htpasswd: Option<&Path>,
    tls: Option<&TlsFiles>,
    opts: &RegistryOptions,
) -> String {
    let mut y = String::new();
    let _ = write!(
        y,
        "version: 0.1\n\
         log:\n  level: warn\n  accesslog:\n    disabled: {}\n\
         storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
         http:\n  addr: 127.0.0.1:{port}\n",
        !opts.access_log,
        storage.display()
    );
    if let Some(t) = tls {
        let _ = write!(
            y,
            "  tls:\n    certificate: {}\n    key: {}\n",
            t.cert.display(),
            t.key.display()
        );
    }
    if let Some(h) = htpasswd {
        let _ = write!(
            y,
            "auth:\n  htpasswd:\n    realm: berth-test\n    path: {}\n",
            h.display()
        );
    }
    if let Some(t) = &opts.token {
        let _ = write!(
            y,
            "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    \
             rootcertbundle: {}\n",
            t.realm,
            t.service,
            t.issuer,
            t.root_cert_bundle.display()
        );
    }
    y
}

/// Parses `127.0.0.1 - - [date] "GET /v2/ HTTP/1.1" 200 2 "referer" "agent"`;
/// other lines (the registry's own messages) give None.
fn parse_access_line(line: &str) -> Option<AccessLogEntry> {
    let (_, after_date) = line.split_once("] \"")?;
    let (request, rest) = after_date.split_once('"')?;
    let mut parts = request.split(' ');
    let (method, path, proto) = (parts.next()?, parts.next()?, parts.next()?);
    if !proto.starts_with("HTTP/") {
        return None;
    }
    let status = rest.split_whitespace().next()?.parse().ok()?;
    // The user agent is the last quoted field.
    let user_agent = rest.trim_end().strip_suffix('"')?.rsplit_once('"')?.1;
    Some(AccessLogEntry {
        method: method.to_string(),
        path: path.to_string(),
        status,
        user_agent: user_agent.to_string(),
    })
}

fn free_port() -> Result<u16, String> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("bind 127.0.0.1:0: {e}"))?;
    let port = l
        .local_addr()
        .map_err(|e| format!("local_addr of probe socket: {e}"))?
        .port();
    Ok(port)
}

fn write_htpasswd(dir: &Path, c: &Credentials) -> Result<PathBuf, String> {
    // -B: the registry accepts only bcrypt entries.
    let out = run(Command::new("htpasswd").args(["-Bbn", &c.username, &c.password]))
        .map_err(|e| format!("htpasswd: {e}"))?;
    let path = dir.join("htpasswd");
    fs::write(&path, out).map_err(|e| format!("write htpasswd: {e}"))?;
    Ok(path)
}

/// A CA and a server certificate for 127.0.0.1 and localhost, valid two days.
fn make_tls(dir: &Path) -> Result<TlsFiles, String> {
    let tls = dir.join("tls");
    let ca_dir = tls.join("ca");
    fs::create_dir_all(&ca_dir).map_err(|e| format!("mkdir tls: {e}"))?;
    let ca_key = tls.join("ca.key");
    let ca_crt = ca_dir.join("ca.crt");
    let key = tls.join("server.key");
    let csr = tls.join("server.csr");
    let cert = tls.join("server.crt");
    let ext = tls.join("server.ext");
    // EC keys: generated in milliseconds, unlike RSA.
    run(Command::new("openssl")
        .args(["req", "-x509", "-nodes", "-newkey", "ec"])
        .args(["-pkeyopt", "ec_paramgen_curve:prime256v1", "-days", "2"])
        .args(["-subj", "/CN=berth test CA"])
        .args(["-addext", "basicConstraints=critical,CA:TRUE"])
        .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
        .arg("-keyout")
        .arg(&ca_key)
        .arg("-out")
        .arg(&ca_crt))
    .map_err(|e| format!("openssl CA: {e}"))?;
    run(Command::new("openssl")
        .args(["req", "-nodes", "-newkey", "ec"])
        .args(["-pkeyopt", "ec_paramgen_curve:prime256v1"])
        .args(["-subj", "/CN=127.0.0.1"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&csr))
    .map_err(|e| format!("openssl server key: {e}"))?;
    fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n\
         basicConstraints=critical,CA:FALSE\n\
         keyUsage=critical,digitalSignature,keyEncipherment\n\
         extendedKeyUsage=serverAuth\n",
    )
    .map_err(|e| format!("write server.ext: {e}"))?;
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "2", "-set_serial", "2"])
        .arg("-in")
        .arg(&csr)
        .arg("-CA")
        .arg(&ca_crt)
        .arg("-CAkey")
        .arg(&ca_key)
        .arg("-extfile")
        .arg(&ext)
        .arg("-out")
        .arg(&cert))
    .map_err(|e| format!("openssl sign server cert: {e}"))?;
    Ok(TlsFiles { ca_dir, cert, key })
}

/// Run a command to completion; Err carries its status and stderr.
fn run(cmd: &mut Command) -> Result<Vec<u8>, String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("spawn {:?}: {e}", cmd.get_program()))?;
    if !out.status.success() {
        return Err(format!(
            "{:?} failed ({}): {}",
            cmd.get_program(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(out.stdout)
}

/// A one-shot HTTP/1.1 GET over a plain TCP socket to `addr` ("host:port").
/// Bounded by a 5 s read/write timeout. Handles Content-Length and chunked
/// bodies (the registry sends both).
pub fn http_get(addr: &str, path: &str, headers: &[(&str, &str)]) -> Result<HttpResponse, String> {
    let timeout = Duration::from_secs(5);
    let sock_addr = addr
        .parse()
        .map_err(|e| format!("http_get: bad address {addr}: {e}"))?;
    let mut s = TcpStream::connect_timeout(&sock_addr, timeout)
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(timeout))
        .and_then(|()| s.set_write_timeout(Some(timeout)))
        .map_err(|e| format!("set timeouts: {e}"))?;
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        let _ = write!(req, "{k}: {v}\r\n");
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())
        .map_err(|e| format!("send GET {path} to {addr}: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .map_err(|e| format!("read GET {path} from {addr}: {e}"))?;
    parse_response(&raw).map_err(|e| format!("GET {path} from {addr}: {e}"))
}

fn parse_response(raw: &[u8]) -> Result<HttpResponse, String> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no end of headers in response")?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| "response head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let rest = &raw[end + 4..];
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        dechunk(rest)?
    } else {
        rest.to_vec()
    };
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let nl = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("truncated chunk size")?;
        let size_str = std::str::from_utf8(&rest[..nl]).map_err(|_| "bad chunk size")?;
        let size_str = size_str.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_str, 16)
            .map_err(|e| format!("bad chunk size {size_str:?}: {e}"))?;
        rest = &rest[nl + 2..];
        if size == 0 {
            return Ok(body);
        }
        if rest.len() < size + 2 {
            return Err("truncated chunk".into());
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

/// GET over HTTPS with curl, trusting `cacert`. Bounded to 5 s.
pub fn curl_get(
    url: &str,
    headers: &[(&str, &str)],
    auth: Option<(&str, &str)>,
    cacert: Option<&Path>,
) -> Result<HttpResponse, String> {
    let mut cmd = Command::new("curl");
    // -i: status and headers precede the body, parsed like a raw response.
    cmd.args(["-sS", "-i", "--max-time", "5", "--http1.1"]);
    if let Some(ca) = cacert {
        cmd.arg("--cacert").arg(ca);
    }
    if let Some((u, p)) = auth {
        cmd.arg("-u").arg(format!("{u}:{p}"));
    }
    for (k, v) in headers {
        cmd.arg("-H").arg(format!("{k}: {v}"));
    }
    cmd.arg(url);
    let out = run(&mut cmd).map_err(|e| format!("curl {url}: {e}"))?;
    // curl has already removed any chunked framing; parse the head only.
    let end = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("curl {url}: no end of headers"))?;
    let mut resp =
        parse_response(&[&out[..end + 4], b""].concat()).map_err(|e| format!("curl {url}: {e}"))?;
    resp.body = out[end + 4..].to_vec();
    Ok(resp)
}

/// Standard base64 with padding (for the Authorization header).
pub fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
