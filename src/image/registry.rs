//! The OCI distribution client: which endpoints serve a registry (mirrors in
//! order, then upstream unless disabled), per-host TLS and credentials, the
//! Basic and Bearer challenge flow, manifests and streamed blobs, retries with
//! backoff on transient failures only.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderMap, WWW_AUTHENTICATE};
use reqwest::{Client, StatusCode};

use super::digest::Digest;
use super::reference::Reference;
use crate::config::{RegistriesConfig, RegistryAuth, RegistryHostConfig};

/// Manifest media types berth understands, in the Accept header of a manifest GET.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json";

/// Manifests are small; a larger one is hostile or broken.
const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const RETRIES: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{endpoint}: authentication failed for {repository}: {message}")]
    Unauthenticated {
        endpoint: String,
        repository: String,
        message: String,
    },
    #[error("{endpoint}: access to {repository} denied: {message}")]
    Denied {
        endpoint: String,
        repository: String,
        message: String,
    },
    #[error("{endpoint}: {what} not found")]
    NotFound { endpoint: String, what: String },
    #[error("{endpoint}: {what}: HTTP {status}: {message}")]
    Status {
        endpoint: String,
        what: String,
        status: u16,
        message: String,
    },
    #[error("{endpoint}: {what}: {source}")]
    Transport {
        endpoint: String,
        what: String,
        source: reqwest::Error,
    },
    #[error("{endpoint}: no data for {seconds} s while fetching {what}")]
    Stalled {
        endpoint: String,
        what: String,
        seconds: u64,
    },
    #[error("{endpoint}: {message}")]
    Protocol { endpoint: String, message: String },
    #[error("registry TLS settings for {host}: {message}")]
    Tls { host: String, message: String },
    #[error(
        "no endpoint to pull {0} from: its registry has no mirror and the default endpoint is disabled"
    )]
    NoEndpoint(String),
}

/// A failure at one endpoint; transient ones are retried, and reported only
/// when no endpoint gave a real answer.
pub trait EndpointFailure: From<RegistryError> {
    fn is_transient(&self) -> bool;
}

impl EndpointFailure for RegistryError {
    fn is_transient(&self) -> bool {
        matches!(
            self,
            RegistryError::Transport { .. }
                | RegistryError::Stalled { .. }
                | RegistryError::Status {
                    status: 429 | 500..=599,
                    ..
                }
        )
    }
}

/// Credentials for a pull: from the request, else from the config.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
    /// A bearer token to present directly (identity or registry token).
    pub token: String,
}

impl Credentials {
    fn is_empty(&self) -> bool {
        self.username.is_empty() && self.token.is_empty()
    }
}

impl From<&RegistryAuth> for Credentials {
    fn from(a: &RegistryAuth) -> Self {
        Credentials {
            username: a.username.clone(),
            password: a.password.clone(),
            token: a.identity_token.clone(),
        }
    }
}

/// One place a registry's content can be fetched from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `scheme://host[:port][/prefix]`, without a trailing `/v2`.
    pub base: String,
    /// `host[:port]`, the key of per-host settings.
    pub host: String,
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.base)
    }
}

fn endpoint_from_url(url: &str) -> Endpoint {
    let base = url
        .trim_end_matches('/')
        .trim_end_matches("/v2")
        .to_string();
    let host = base
        .split_once("://")
        .map(|(_, rest)| rest)
        .unwrap_or(&base)
        .split('/')
        .next()
        .unwrap_or_default()
        .to_string();
    Endpoint { base, host }
}

fn is_loopback_host(host: &str) -> bool {
    let name = host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host);
    name == "localhost"
        || name
            .trim_matches(|c| c == '[' || c == ']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A fetched manifest or index.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    pub digest: Digest,
    pub media_type: String,
    pub body: Bytes,
}

pub struct RegistryClient {
    config: RegistriesConfig,
    progress_timeout: Duration,
    /// One HTTP client per host: each host may have its own TLS settings.
    clients: Mutex<HashMap<String, Client>>,
}

impl RegistryClient {
    pub fn new(config: RegistriesConfig, progress_timeout: Duration) -> RegistryClient {
        RegistryClient {
            config,
            progress_timeout,
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// Endpoints to try for `registry`, in order: its mirrors (or those of `*`),
    /// then the upstream host unless `disable_default_endpoint`.
    pub fn endpoints(&self, registry: &str) -> Vec<Endpoint> {
        let mirrors = self
            .config
            .mirrors
            .get(registry)
            .or_else(|| self.config.mirrors.get("*"));
        let mut out: Vec<Endpoint> = mirrors
            .map(|m| m.endpoint.iter().map(|e| endpoint_from_url(e)).collect())
            .unwrap_or_default();
        if !self.config.disable_default_endpoint {
            let api_host = if registry == "docker.io" {
                "registry-1.docker.io"
            } else {
                registry
            };
            let insecure = self.host_config(registry).is_some_and(|c| c.insecure);
            if insecure {
                out.push(endpoint_from_url(&format!("http://{api_host}")));
            } else {
                out.push(endpoint_from_url(&format!("https://{api_host}")));
                // As Docker does for loopback registries: HTTPS first, then plain HTTP.
                if is_loopback_host(api_host) {
                    out.push(endpoint_from_url(&format!("http://{api_host}")));
                }
            }
        }
        out
    }

    fn host_config(&self, host: &str) -> Option<&RegistryHostConfig> {
        self.config.configs.get(host)
    }

    /// Credentials for `endpoint`: the request's, else the endpoint host's, else the registry's.
    pub fn credentials(
        &self,
        endpoint: &Endpoint,
        registry: &str,
        from_request: Option<&Credentials>,
    ) -> Credentials {
        if let Some(c) = from_request.filter(|c| !c.is_empty()) {
            return c.clone();
        }
        [endpoint.host.as_str(), registry]
            .iter()
            .find_map(|h| self.host_config(h).and_then(|c| c.auth.as_ref()))
            .map(Credentials::from)
            .unwrap_or_default()
    }

    fn client(&self, endpoint: &Endpoint) -> Result<Client, RegistryError> {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = clients.get(&endpoint.host) {
            return Ok(c.clone());
        }
        let tls_err = |message: String| RegistryError::Tls {
            host: endpoint.host.clone(),
            message,
        };
        let mut builder = Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .user_agent(concat!("berth/", env!("CARGO_PKG_VERSION")));
        if let Some(tls) = self
            .host_config(&endpoint.host)
            .and_then(|c| c.tls.as_ref())
        {
            if let Some(ca) = &tls.ca_file {
                let pem =
                    std::fs::read(ca).map_err(|e| tls_err(format!("{}: {e}", ca.display())))?;
                let cert = reqwest::Certificate::from_pem(&pem)
                    .map_err(|e| tls_err(format!("{}: {e}", ca.display())))?;
                builder = builder.add_root_certificate(cert);
            }
            match (&tls.cert_file, &tls.key_file) {
                (Some(cert), Some(key)) => {
                    let mut pem = std::fs::read(cert)
                        .map_err(|e| tls_err(format!("{}: {e}", cert.display())))?;
                    pem.extend(
                        std::fs::read(key)
                            .map_err(|e| tls_err(format!("{}: {e}", key.display())))?,
                    );
                    let identity = reqwest::Identity::from_pem(&pem)
                        .map_err(|e| tls_err(format!("client certificate: {e}")))?;
                    builder = builder.identity(identity);
                }
                (None, None) => {}
                _ => return Err(tls_err("cert_file and key_file go together".to_string())),
            }
            if tls.insecure_skip_verify {
                builder = builder.danger_accept_invalid_certs(true);
            }
        }
        let client = builder
            .build()
            .map_err(|e| tls_err(format!("cannot build HTTP client: {e}")))?;
        clients.insert(endpoint.host.clone(), client.clone());
        Ok(client)
    }

    /// Starts a session with one endpoint for one repository.
    pub fn session(
        &self,
        endpoint: &Endpoint,
        repository: &str,
        credentials: Credentials,
    ) -> Result<Session, RegistryError> {
        Ok(Session {
            client: self.client(endpoint)?,
            endpoint: endpoint.clone(),
            repository: repository.to_string(),
            credentials,
            authorization: Mutex::new(None),
            progress_timeout: self.progress_timeout,
        })
    }

    /// Tries each endpoint of the reference's registry until one answers `op`.
    /// Returns the first error that came from a registry rather than the network.
    pub async fn with_endpoints<T, E, F, Fut>(
        &self,
        reference: &Reference,
        credentials: Option<&Credentials>,
        op: F,
    ) -> Result<T, E>
    where
        E: EndpointFailure + std::fmt::Display,
        F: Fn(Session) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let endpoints = self.endpoints(reference.registry());
        let mut first_answer: Option<E> = None;
        let mut last: Option<E> = None;
        for endpoint in &endpoints {
            let creds = self.credentials(endpoint, reference.registry(), credentials);
            let result = match self.session(endpoint, reference.repository(), creds) {
                Ok(session) => op(session).await,
                Err(e) => Err(E::from(e)),
            };
            match result {
                Ok(v) => return Ok(v),
                Err(e) => {
                    tracing::debug!(endpoint = %endpoint, error = %e, "endpoint failed");
                    if first_answer.is_none() && !e.is_transient() {
                        first_answer = Some(e);
                    } else {
                        last = Some(e);
                    }
                }
            }
        }
        Err(first_answer
            .or(last)
            .unwrap_or_else(|| E::from(RegistryError::NoEndpoint(reference.to_string()))))
    }
}

/// Requests to one endpoint for one repository, carrying its authorization.
pub struct Session {
    client: Client,
    pub endpoint: Endpoint,
    repository: String,
    credentials: Credentials,
    authorization: Mutex<Option<String>>,
    progress_timeout: Duration,
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, PartialEq, Eq)]
enum Challenge {
    Basic,
    Bearer { params: HashMap<String, String> },
}

fn parse_challenge(header: &str) -> Option<Challenge> {
    let (scheme, rest) = header.trim().split_once(' ').unwrap_or((header.trim(), ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut params = HashMap::new();
    let mut rest = rest.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let after = after.trim_start();
        let (value, remain) = if let Some(quoted) = after.strip_prefix('"') {
            let end = quoted.find('"')?;
            (&quoted[..end], &quoted[end + 1..])
        } else {
            after.split_once(',').map_or((after, ""), |(v, r)| (v, r))
        };
        params.insert(key.trim().to_ascii_lowercase(), value.to_string());
        rest = remain.trim_start_matches([',', ' ']);
    }
    Some(Challenge::Bearer { params })
}

fn basic_header(c: &Credentials) -> String {
    use base64::Engine;
    let raw = format!("{}:{}", c.username, c.password);
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

impl Session {
    fn err_transport(&self, what: &str, source: reqwest::Error) -> RegistryError {
        RegistryError::Transport {
            endpoint: self.endpoint.base.clone(),
            what: what.to_string(),
            source,
        }
    }

    /// GET `path` (below `/v2/<repo>/`), answering auth challenges and
    /// retrying transient failures with backoff.
    async fn get(
        &self,
        path: &str,
        accept: &str,
        what: &str,
    ) -> Result<reqwest::Response, RegistryError> {
        let url = format!("{}/v2/{}/{}", self.endpoint.base, self.repository, path);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let result = self.get_once(&url, accept, what).await;
            match result {
                Err(e) if e.is_transient() && attempt < RETRIES => {
                    let backoff = Duration::from_millis(200 * (1 << (attempt - 1)));
                    tracing::debug!(url, error = %e, ?backoff, "retrying");
                    tokio::time::sleep(backoff).await;
                }
                other => return other,
            }
        }
    }

    async fn get_once(
        &self,
        url: &str,
        accept: &str,
        what: &str,
    ) -> Result<reqwest::Response, RegistryError> {
        let mut authenticated_retry = false;
        loop {
            let mut request = self.client.get(url).header(ACCEPT, accept);
            let auth = self
                .authorization
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            if let Some(auth) = &auth {
                request = request.header(AUTHORIZATION, auth);
            }
            let response = tokio::time::timeout(self.progress_timeout, request.send())
                .await
                .map_err(|_| self.stalled(what))?
                .map_err(|e| self.err_transport(what, e))?;
            let status = response.status();
            if status == StatusCode::UNAUTHORIZED && !authenticated_retry {
                let challenge = response
                    .headers()
                    .get(WWW_AUTHENTICATE)
                    .and_then(|h| h.to_str().ok())
                    .and_then(parse_challenge);
                let Some(challenge) = challenge else {
                    return Err(self.status_error(response, what).await);
                };
                let header = self.answer(challenge, what).await?;
                *self.authorization.lock().unwrap_or_else(|e| e.into_inner()) = Some(header);
                authenticated_retry = true;
                continue;
            }
            if status.is_success() {
                return Ok(response);
            }
            return Err(self.status_error(response, what).await);
        }
    }

    /// Turns a challenge into an Authorization header value.
    async fn answer(&self, challenge: Challenge, what: &str) -> Result<String, RegistryError> {
        match challenge {
            Challenge::Basic if !self.credentials.username.is_empty() => {
                Ok(basic_header(&self.credentials))
            }
            Challenge::Basic => Err(RegistryError::Unauthenticated {
                endpoint: self.endpoint.base.clone(),
                repository: self.repository.clone(),
                message: "the registry wants credentials and none were given".to_string(),
            }),
            Challenge::Bearer { params } => {
                if !self.credentials.token.is_empty() && self.credentials.username.is_empty() {
                    return Ok(format!("Bearer {}", self.credentials.token));
                }
                let realm = params.get("realm").ok_or_else(|| RegistryError::Protocol {
                    endpoint: self.endpoint.base.clone(),
                    message: "Bearer challenge without a realm".to_string(),
                })?;
                let mut request = self.client.get(realm);
                let mut query: Vec<(&str, String)> = Vec::new();
                if let Some(service) = params.get("service") {
                    query.push(("service", service.clone()));
                }
                let scope = params
                    .get("scope")
                    .cloned()
                    .unwrap_or_else(|| format!("repository:{}:pull", self.repository));
                query.push(("scope", scope));
                request = request.query(&query);
                if !self.credentials.username.is_empty() {
                    request = request.header(AUTHORIZATION, basic_header(&self.credentials));
                }
                let what = format!("token for {what}");
                let response = tokio::time::timeout(self.progress_timeout, request.send())
                    .await
                    .map_err(|_| self.stalled(&what))?
                    .map_err(|e| self.err_transport(&what, e))?;
                if !response.status().is_success() {
                    return Err(self.status_error(response, &what).await);
                }
                let raw = response
                    .bytes()
                    .await
                    .map_err(|e| self.err_transport(&what, e))?;
                let body: serde_json::Value =
                    serde_json::from_slice(&raw).map_err(|e| RegistryError::Protocol {
                        endpoint: self.endpoint.base.clone(),
                        message: format!("token response is not JSON: {e}"),
                    })?;
                let token = body
                    .get("token")
                    .or_else(|| body.get("access_token"))
                    .and_then(|t| t.as_str())
                    .ok_or_else(|| RegistryError::Protocol {
                        endpoint: self.endpoint.base.clone(),
                        message: "token response has no token".to_string(),
                    })?;
                Ok(format!("Bearer {token}"))
            }
        }
    }

    fn stalled(&self, what: &str) -> RegistryError {
        RegistryError::Stalled {
            endpoint: self.endpoint.base.clone(),
            what: what.to_string(),
            seconds: self.progress_timeout.as_secs(),
        }
    }

    async fn status_error(&self, response: reqwest::Response, what: &str) -> RegistryError {
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        let message = registry_message(&body);
        let endpoint = self.endpoint.base.clone();
        match status {
            StatusCode::UNAUTHORIZED => RegistryError::Unauthenticated {
                endpoint,
                repository: self.repository.clone(),
                message,
            },
            StatusCode::FORBIDDEN => RegistryError::Denied {
                endpoint,
                repository: self.repository.clone(),
                message,
            },
            StatusCode::NOT_FOUND => RegistryError::NotFound {
                endpoint,
                what: what.to_string(),
            },
            _ => RegistryError::Status {
                endpoint,
                what: what.to_string(),
                status: status.as_u16(),
                message,
            },
        }
    }

    /// Fetches a manifest or index by tag or digest, verifying a digest reference.
    pub async fn manifest(&self, reference: &str) -> Result<FetchedManifest, RegistryError> {
        let what = format!("manifest {}:{reference}", self.repository);
        let response = self
            .get(&format!("manifests/{reference}"), MANIFEST_ACCEPT, &what)
            .await?;
        let media_type = content_type(response.headers());
        let mut body = Vec::new();
        let mut stream = response.bytes_stream();
        while let Some(chunk) = self.next_chunk(&mut stream, &what).await? {
            body.extend_from_slice(&chunk);
            if body.len() > MAX_MANIFEST_BYTES {
                return Err(RegistryError::Protocol {
                    endpoint: self.endpoint.base.clone(),
                    message: format!("{what} is larger than {MAX_MANIFEST_BYTES} bytes"),
                });
            }
        }
        let digest = Digest::sha256_of(&body);
        if let Ok(expected) = Digest::parse(reference)
            && expected != digest
        {
            return Err(RegistryError::Protocol {
                endpoint: self.endpoint.base.clone(),
                message: format!("{what} has digest {digest}, not the one asked for"),
            });
        }
        let media_type = if media_type.is_empty() || media_type == "application/json" {
            // Some registries omit it; the manifest's own field says.
            serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| {
                    v.get("mediaType")
                        .and_then(|m| m.as_str())
                        .map(String::from)
                })
                .unwrap_or_default()
        } else {
            media_type
        };
        Ok(FetchedManifest {
            digest,
            media_type,
            body: Bytes::from(body),
        })
    }

    /// Starts streaming a blob; chunks come from `BlobStream::next`.
    pub async fn blob(&self, digest: &Digest) -> Result<BlobStream<'_>, RegistryError> {
        let what = format!("blob {digest}");
        let response = self.get(&format!("blobs/{digest}"), "*/*", &what).await?;
        Ok(BlobStream {
            session: self,
            what,
            stream: Box::pin(response.bytes_stream()),
        })
    }

    async fn next_chunk<S>(
        &self,
        stream: &mut S,
        what: &str,
    ) -> Result<Option<Bytes>, RegistryError>
    where
        S: futures_util::Stream<Item = reqwest::Result<Bytes>> + Unpin,
    {
        match tokio::time::timeout(self.progress_timeout, stream.next()).await {
            Err(_) => Err(self.stalled(what)),
            Ok(None) => Ok(None),
            Ok(Some(Ok(chunk))) => Ok(Some(chunk)),
            Ok(Some(Err(e))) => Err(self.err_transport(what, e)),
        }
    }
}

type ByteStream =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// A blob body; each chunk must arrive within the progress timeout.
pub struct BlobStream<'a> {
    session: &'a Session,
    what: String,
    stream: ByteStream,
}

impl BlobStream<'_> {
    pub async fn next(&mut self) -> Result<Option<Bytes>, RegistryError> {
        self.session.next_chunk(&mut self.stream, &self.what).await
    }
}

fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or(v).trim().to_string())
        .unwrap_or_default()
}

/// The registry's own words from an error body (`{"errors":[{"message":..}]}`).
fn registry_message(body: &str) -> String {
    let parsed: Option<serde_json::Value> = serde_json::from_str(body).ok();
    let from_json = parsed.as_ref().and_then(|v| {
        let errors = v.get("errors")?.as_array()?;
        let messages: Vec<String> = errors
            .iter()
            .filter_map(|e| {
                let code = e.get("code").and_then(|c| c.as_str()).unwrap_or_default();
                let msg = e.get("message").and_then(|m| m.as_str())?;
                Some(if code.is_empty() {
                    msg.to_string()
                } else {
                    format!("{code}: {msg}")
                })
            })
            .collect();
        (!messages.is_empty()).then(|| messages.join("; "))
    });
    from_json.unwrap_or_else(|| body.trim().chars().take(200).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MirrorConfig;

    fn client(yaml: &str) -> RegistryClient {
        let config: RegistriesConfig = serde_yaml::from_str(yaml).expect("registries yaml");
        RegistryClient::new(config, Duration::from_secs(5))
    }

    #[test]
    fn mirrors_come_first_then_upstream() {
        let c = client(
            "mirrors: {docker.io: {endpoint: [\"http://127.0.0.1:5000\", \"https://m.example.com/v2/\"]}}",
        );
        let bases: Vec<String> = c
            .endpoints("docker.io")
            .into_iter()
            .map(|e| e.base)
            .collect();
        assert_eq!(
            bases,
            vec![
                "http://127.0.0.1:5000",
                "https://m.example.com",
                "https://registry-1.docker.io"
            ]
        );
        assert_eq!(c.endpoints("docker.io")[0].host, "127.0.0.1:5000");
    }

    #[test]
    fn disabling_the_default_endpoint_keeps_only_mirrors() {
        let c = client(
            "mirrors: {registry.k8s.io: {endpoint: [\"http://127.0.0.1:5000\"]}}\ndisable_default_endpoint: true",
        );
        assert_eq!(c.endpoints("registry.k8s.io").len(), 1);
        assert!(c.endpoints("quay.io").is_empty());
    }

    #[test]
    fn wildcard_mirror_serves_unlisted_registries() {
        let mut config = RegistriesConfig::default();
        config.mirrors.insert(
            "*".to_string(),
            MirrorConfig {
                endpoint: vec!["http://127.0.0.1:6000".to_string()],
            },
        );
        let c = RegistryClient::new(config, Duration::from_secs(1));
        assert_eq!(c.endpoints("quay.io")[0].base, "http://127.0.0.1:6000");
    }

    #[test]
    fn loopback_registries_fall_back_to_http_and_insecure_hosts_use_it() {
        let c = client("configs: {\"reg.local:5000\": {insecure: true}}");
        let bases: Vec<String> = c
            .endpoints("127.0.0.1:5000")
            .into_iter()
            .map(|e| e.base)
            .collect();
        assert_eq!(
            bases,
            vec!["https://127.0.0.1:5000", "http://127.0.0.1:5000"]
        );
        assert_eq!(
            c.endpoints("reg.local:5000")[0].base,
            "http://reg.local:5000"
        );
    }

    #[test]
    fn request_credentials_win_over_config() {
        let c = client("configs: {\"127.0.0.1:5000\": {auth: {username: cfg, password: p}}}");
        let e = &c.endpoints("127.0.0.1:5000")[0];
        assert_eq!(c.credentials(e, "127.0.0.1:5000", None).username, "cfg");
        let req = Credentials {
            username: "req".into(),
            password: "q".into(),
            token: String::new(),
        };
        assert_eq!(
            c.credentials(e, "127.0.0.1:5000", Some(&req)).username,
            "req"
        );
    }

    #[test]
    fn challenges_parse() {
        assert_eq!(parse_challenge("Basic realm=\"x\""), Some(Challenge::Basic));
        let Some(Challenge::Bearer { params }) = parse_challenge(
            "Bearer realm=\"https://auth.example.com/token\",service=\"registry.example.com\",scope=\"repository:a/b:pull\"",
        ) else {
            panic!("bearer challenge");
        };
        assert_eq!(params["realm"], "https://auth.example.com/token");
        assert_eq!(params["service"], "registry.example.com");
        assert_eq!(params["scope"], "repository:a/b:pull");
        assert_eq!(parse_challenge("Negotiate x"), None);
    }

    #[test]
    fn registry_messages_are_extracted() {
        assert_eq!(
            registry_message(
                "{\"errors\":[{\"code\":\"UNAUTHORIZED\",\"message\":\"authentication required\"}]}"
            ),
            "UNAUTHORIZED: authentication required"
        );
        assert_eq!(registry_message("plain text"), "plain text");
    }
}
