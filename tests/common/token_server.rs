//! A registry token server for tests (the Docker token auth flow): a thread on
//! 127.0.0.1 answering `GET /token?service=..&scope=..` with an ES256 JWT that
//! distribution 2.8 accepts, checking Basic credentials when it has some, and
//! recording every request so tests can count them.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
use serde_json::json;

use super::registry::{Credentials, TokenAuth};

/// The `service` the registry names in its challenge and tokens are for.
pub const SERVICE: &str = "berth-test-registry";
/// The `iss` of every token; the registry trusts only this issuer.
pub const ISSUER: &str = "berth-test-token-server";
/// Lifetime of a token.
const TOKEN_SECONDS: u64 = 300;

/// One request the server answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRequest {
    /// The Basic user name, if the client sent one.
    pub username: Option<String>,
    /// Every `scope` asked for, e.g. "repository:berth-test/static:pull".
    pub scopes: Vec<String>,
    /// Whether a token was issued (false: refused with 401 or 400).
    pub granted: bool,
}

struct Shared {
    key: EcdsaKeyPair,
    rng: SystemRandom,
    /// libtrust fingerprint of the public key: the `kid` distribution looks up.
    kid: String,
    credentials: Option<Credentials>,
    requests: Mutex<Vec<TokenRequest>>,
    stop: AtomicBool,
}

/// A running token server; dropping it stops its thread.
pub struct TokenServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    dir: tempfile::TempDir,
}

impl TokenServer {
    /// Starts a server that wants `credentials` (None: issues to anyone).
    pub fn start(credentials: Option<Credentials>) -> Result<TokenServer, String> {
        let dir = tempfile::Builder::new()
            .prefix("berth-token-")
            .tempdir()
            .map_err(|e| format!("token server: tempdir: {e}"))?;
        let (key, kid) = make_key(dir.path())?;
        let listener =
            TcpListener::bind("127.0.0.1:0").map_err(|e| format!("token server: bind: {e}"))?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("token server: local_addr: {e}"))?;
        let shared = Arc::new(Shared {
            key,
            rng: SystemRandom::new(),
            kid,
            credentials,
            requests: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let serving = shared.clone();
        // One connection at a time: token requests are few and quick.
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if serving.stop.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(stream) = conn {
                    serve(&serving, stream);
                }
            }
        });
        Ok(TokenServer {
            addr,
            shared,
            thread: Some(thread),
            dir,
        })
    }

    /// "http://127.0.0.1:PORT/token".
    pub fn realm(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    /// The self-signed certificate of the signing key: the registry's
    /// `rootcertbundle`.
    pub fn cert_bundle(&self) -> PathBuf {
        self.dir.path().join("cert.pem")
    }

    /// Settings for a registry that trusts this server; `push` uses this
    /// server's credentials.
    pub fn registry_auth(&self) -> TokenAuth {
        TokenAuth {
            realm: self.realm(),
            service: SERVICE.to_string(),
            issuer: ISSUER.to_string(),
            root_cert_bundle: self.cert_bundle(),
            push_credentials: self.shared.credentials.clone(),
        }
    }

    /// Every request answered so far, oldest first.
    pub fn requests(&self) -> Vec<TokenRequest> {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An EC P-256 key (PKCS#8 for ring), its self-signed certificate in
/// `dir/cert.pem`, and its libtrust key id.
fn make_key(dir: &Path) -> Result<(EcdsaKeyPair, String), String> {
    let pem = dir.join("key.pem");
    let der = dir.join("key.der");
    let public = dir.join("public.der");
    openssl(&[
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-pkeyopt",
        "ec_param_enc:named_curve",
        "-out",
        path_str(&pem)?,
    ])?;
    openssl(&[
        "pkcs8",
        "-topk8",
        "-nocrypt",
        "-in",
        path_str(&pem)?,
        "-outform",
        "DER",
        "-out",
        path_str(&der)?,
    ])?;
    openssl(&[
        "pkey",
        "-in",
        path_str(&pem)?,
        "-pubout",
        "-outform",
        "DER",
        "-out",
        path_str(&public)?,
    ])?;
    openssl(&[
        "req",
        "-x509",
        "-new",
        "-key",
        path_str(&pem)?,
        "-subj",
        "/CN=berth test token signer",
        "-days",
        "2",
        "-out",
        path_str(&dir.join("cert.pem"))?,
    ])?;
    let pkcs8 = std::fs::read(&der).map_err(|e| format!("read {}: {e}", der.display()))?;
    let key = EcdsaKeyPair::from_pkcs8(
        &ECDSA_P256_SHA256_FIXED_SIGNING,
        &pkcs8,
        &SystemRandom::new(),
    )
    .map_err(|e| format!("token key is not usable by ring: {e}"))?;
    let spki = std::fs::read(&public).map_err(|e| format!("read {}: {e}", public.display()))?;
    Ok((key, libtrust_key_id(&spki)))
}

fn path_str(p: &Path) -> Result<&str, String> {
    p.to_str()
        .ok_or_else(|| format!("path {} is not UTF-8", p.display()))
}

fn openssl(args: &[&str]) -> Result<(), String> {
    let out = Command::new("openssl")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("spawn openssl: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "openssl {} failed: {}",
            args[0],
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// libtrust's key id: sha256 of the DER SubjectPublicKeyInfo, first 240 bits,
/// base32 without padding, in groups of four joined by ':'. distribution
/// indexes the keys of its rootcertbundle by it and matches the JWT `kid`.
pub fn libtrust_key_id(spki_der: &[u8]) -> String {
    use sha2::Digest as _;
    let hash = sha2::Sha256::digest(spki_der);
    let encoded = base32(&hash[..30]);
    encoded
        .as_bytes()
        .chunks(4)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join(":")
}

/// RFC 4648 base32 without padding.
fn base32(data: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::new();
    let (mut buffer, mut bits) = (0u32, 0u32);
    for &b in data {
        buffer = (buffer << 8) | u32::from(b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((buffer >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((buffer << (5 - bits)) & 31) as usize] as char);
    }
    out
}

fn b64url(data: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

/// Answers one HTTP request and closes the connection.
fn serve(shared: &Shared, mut stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
    let Some(head) = read_head(&mut stream) else {
        return;
    };
    let (status, body) = answer(shared, &head);
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        _ => "Not Found",
    };
    let mut response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if status == 401 {
        response.push_str("WWW-Authenticate: Basic realm=\"berth-test-token\"\r\n");
    }
    response.push_str("\r\n");
    response.push_str(&body);
    let _ = stream.write_all(response.as_bytes());
    let _ = stream.shutdown(Shutdown::Both);
}

/// The request line and headers, up to the blank line.
fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    while !raw.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).ok()?;
        if n == 0 || raw.len() > 64 * 1024 {
            return None;
        }
        raw.extend_from_slice(&buf[..n]);
    }
    String::from_utf8(raw).ok()
}

fn error_body(code: &str, message: &str) -> String {
    json!({"errors": [{"code": code, "message": message}]}).to_string()
}

/// Status and JSON body for a request head; records the request.
fn answer(shared: &Shared, head: &str) -> (u16, String) {
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let target = match request_line.split(' ').collect::<Vec<_>>()[..] {
        ["GET", target, _] => target,
        _ => return (400, error_body("UNSUPPORTED", "only GET /token")),
    };
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    if path != "/token" {
        return (404, error_body("NOT_FOUND", "only /token is served"));
    }
    let params: Vec<(String, String)> = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (percent_decode(k), percent_decode(v)))
        .collect();
    let basic = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("authorization"))
        .and_then(|(_, v)| v.trim().strip_prefix("Basic "))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| {
            s.split_once(':')
                .map(|(u, p)| (u.to_string(), p.to_string()))
        });
    let scopes: Vec<String> = params
        .iter()
        .filter(|(k, _)| k == "scope")
        .flat_map(|(_, v)| v.split(' ').map(String::from))
        .filter(|s| !s.is_empty())
        .collect();
    let service = params
        .iter()
        .find(|(k, _)| k == "service")
        .map(|(_, v)| v.as_str());

    let outcome = if service != Some(SERVICE) {
        Err((
            400,
            error_body(
                "INVALID_REQUEST",
                &format!("unknown service {service:?}, want {SERVICE}"),
            ),
        ))
    } else {
        match (&shared.credentials, &basic) {
            (None, _) => Ok(()),
            (Some(want), Some((u, p))) if *u == want.username && *p == want.password => Ok(()),
            (Some(_), Some((u, _))) => Err((
                401,
                error_body(
                    "UNAUTHORIZED",
                    &format!("berth-test token server: bad credentials for {u}"),
                ),
            )),
            (Some(_), None) => Err((
                401,
                error_body(
                    "UNAUTHORIZED",
                    "berth-test token server: credentials required",
                ),
            )),
        }
    };
    let result = outcome.map(|()| {
        let subject = basic.as_ref().map(|(u, _)| u.as_str()).unwrap_or_default();
        let token = sign_token(shared, subject, &scopes);
        (
            200,
            json!({"token": token, "access_token": token, "expires_in": TOKEN_SECONDS}).to_string(),
        )
    });
    shared
        .requests
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(TokenRequest {
            username: basic.map(|(u, _)| u),
            scopes,
            granted: result.is_ok(),
        });
    result.unwrap_or_else(|e| e)
}

/// A JWT granting every scope asked for: "type:name:action,action".
fn sign_token(shared: &Shared, subject: &str, scopes: &[String]) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let access: Vec<serde_json::Value> = scopes
        .iter()
        .filter_map(|s| {
            let (kind, rest) = s.split_once(':')?;
            let (name, actions) = rest.rsplit_once(':')?;
            Some(json!({
                "type": kind,
                "name": name,
                "actions": actions.split(',').collect::<Vec<_>>(),
            }))
        })
        .collect();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let header = json!({"typ": "JWT", "alg": "ES256", "kid": shared.kid});
    let claims = json!({
        "iss": ISSUER,
        "sub": subject,
        "aud": SERVICE,
        "exp": now + TOKEN_SECONDS,
        "nbf": now,
        "iat": now,
        "jti": format!("berth-test-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)),
        "access": access,
    });
    let signing_input = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    // ES256 in JWS is the fixed r||s form, which this algorithm produces.
    let signature = shared
        .key
        .sign(&shared.rng, signing_input.as_bytes())
        .expect("ECDSA signing with a valid key");
    format!("{signing_input}.{}", b64url(signature.as_ref()))
}

/// Decodes %XX escapes and '+' (a space in a query).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (escaped, bytes[i]) {
            (Some(b), _) => {
                out.push(b);
                i += 3;
            }
            (None, b'+') => {
                out.push(b' ');
                i += 1;
            }
            (None, b) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
