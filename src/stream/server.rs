//! The HTTP side of the streaming server: a listener (plain or TLS) whose
//! requests `/exec/{token}`, `/attach/{token}` and `/portforward/{token}`
//! redeem a token and upgrade to SPDY/3.1 (`Upgrade: SPDY/3.1`, protocol in
//! `X-Stream-Protocol-Version`) or WebSocket (protocol in
//! `Sec-WebSocket-Protocol`), then run the session on the connection.

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use super::remotecommand::{self, Session, Version};
use super::spdy_conn::SpdyConnection;
use super::tokens::{TOKEN_TTL, Tokens};
use super::websocket::{self, ChannelCodec, WsConnection};
use super::{
    AttachRequest, ExecRequest, PortForwardRequest, StreamError, check_streams, portforward,
};
use crate::config::StreamConfig;
use crate::runtime::Runtime;

const SPDY_UPGRADE: &str = "SPDY/3.1";
const PROTOCOL_HEADER: &str = "X-Stream-Protocol-Version";
const ACCEPTED_PROTOCOLS_HEADER: &str = "X-Accepted-Stream-Protocol-Versions";
/// WebSocket subprotocol prefix of SPDY tunneled in WebSocket (port-forward).
const TUNNEL_PREFIX: &str = "SPDY/3.1+";
/// How long a client has to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// A prepared session, by token.
#[derive(Debug, Clone)]
enum Prepared {
    Remote(Session),
    PortForward(PortForwardRequest),
}

struct Shared {
    runtime: Arc<Runtime>,
    tokens: Tokens<Prepared>,
    idle_timeout: Duration,
}

/// The running streaming server; dropping it stops accepting.
pub struct StreamServer {
    shared: Arc<Shared>,
    base_url: String,
    address: SocketAddr,
    accept: JoinHandle<()>,
}

impl Drop for StreamServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl StreamServer {
    /// Binds the configured address and serves.
    pub async fn start(
        config: &StreamConfig,
        runtime: Arc<Runtime>,
    ) -> Result<StreamServer, StreamError> {
        let ip: IpAddr = config.address.parse().map_err(|_| {
            StreamError::InvalidArgument(format!("stream.address {:?}", config.address))
        })?;
        let listen_err = |source| StreamError::Listen {
            address: SocketAddr::new(ip, config.port).to_string(),
            source,
        };
        let tls = match (&config.tls_cert_file, &config.tls_key_file) {
            (Some(cert), Some(key)) => Some(tls_acceptor(cert, key)?),
            _ => None,
        };
        let listener = TcpListener::bind((ip, config.port))
            .await
            .map_err(listen_err)?;
        let address = listener.local_addr().map_err(listen_err)?;
        // An unspecified address serves every interface; the URL names loopback.
        let host = match ip {
            IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            other => other,
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        let base_url = format!("{scheme}://{}", SocketAddr::new(host, address.port()));
        let shared = Arc::new(Shared {
            runtime,
            tokens: Tokens::new(TOKEN_TTL),
            idle_timeout: Duration::from_secs(config.idle_timeout_secs),
        });
        let accept = tokio::spawn(accept_loop(listener, tls, shared.clone()));
        tracing::info!(url = %base_url, "streaming server listening");
        Ok(StreamServer {
            shared,
            base_url,
            address,
            accept,
        })
    }

    /// The address it listens on.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Prepares an exec; returns the URL the client opens.
    pub fn exec(&self, request: ExecRequest) -> Result<String, StreamError> {
        check_streams(request.tty, request.stdin, request.stdout, request.stderr)?;
        if request.cmd.is_empty() {
            return Err(StreamError::InvalidArgument(
                "no command to exec".to_string(),
            ));
        }
        self.url("exec", Prepared::Remote(Session::Exec(request)))
    }

    /// Prepares an attach; returns the URL the client opens.
    pub fn attach(&self, request: AttachRequest) -> Result<String, StreamError> {
        check_streams(request.tty, request.stdin, request.stdout, request.stderr)?;
        self.url("attach", Prepared::Remote(Session::Attach(request)))
    }

    /// Prepares a port-forward; returns the URL the client opens.
    pub fn port_forward(&self, request: PortForwardRequest) -> Result<String, StreamError> {
        if let Some(bad) = request.ports.iter().find(|p| !(1..=65535).contains(*p)) {
            return Err(StreamError::InvalidArgument(format!(
                "port {bad} is not a TCP port"
            )));
        }
        self.url("portforward", Prepared::PortForward(request))
    }

    fn url(&self, kind: &str, prepared: Prepared) -> Result<String, StreamError> {
        let token = self.shared.tokens.insert(prepared)?;
        Ok(format!("{}/{kind}/{token}", self.base_url))
    }
}

fn tls_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, StreamError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let tls_err = |what: &str, e: &dyn std::fmt::Display| StreamError::Tls(format!("{what}: {e}"));
    let certs = CertificateDer::pem_file_iter(cert)
        .map_err(|e| tls_err(&cert.display().to_string(), &e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_err(&cert.display().to_string(), &e))?;
    let key =
        PrivateKeyDer::from_pem_file(key).map_err(|e| tls_err(&key.display().to_string(), &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_err("protocol versions", &e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| tls_err("certificate and key", &e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

async fn accept_loop(listener: TcpListener, tls: Option<TlsAcceptor>, shared: Arc<Shared>) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "streaming server accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let shared = shared.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => serve_http(tcp, shared).await,
                Some(acceptor) => {
                    match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => serve_http(stream, shared).await,
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
}

async fn serve_http<IO>(io: IO, shared: Arc<Shared>)
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let service = service_fn(move |request| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(handle(shared, request)) }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades()
        .await;
    if let Err(e) = served {
        tracing::debug!(error = %e, "streaming HTTP connection failed");
    }
}

type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, text: impl Into<String>) -> Reply {
    let mut response = Response::new(Full::new(Bytes::from(text.into() + "\n")));
    *response.status_mut() = status;
    response
}

/// Every comma-separated value of a header.
fn header_values<'a>(headers: &'a HeaderMap, name: &str) -> Vec<&'a str> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect()
}

fn has_token(headers: &HeaderMap, name: &str, token: &str) -> bool {
    header_values(headers, name)
        .iter()
        .any(|v| v.eq_ignore_ascii_case(token))
}

fn handle(shared: Arc<Shared>, mut request: Request<Incoming>) -> Reply {
    let path = request.uri().path().to_string();
    let Some((kind, token)) = path
        .strip_prefix('/')
        .and_then(|p| p.split_once('/'))
        .filter(|(kind, token)| {
            matches!(*kind, "exec" | "attach" | "portforward") && !token.contains('/')
        })
    else {
        return reply(StatusCode::NOT_FOUND, "not found");
    };
    let Some(prepared) = shared.tokens.redeem(token) else {
        return reply(StatusCode::NOT_FOUND, "unknown or expired streaming token");
    };
    let fits = matches!(
        (&prepared, kind),
        (Prepared::Remote(Session::Exec(_)), "exec")
            | (Prepared::Remote(Session::Attach(_)), "attach")
            | (Prepared::PortForward(_), "portforward")
    );
    if !fits {
        return reply(StatusCode::NOT_FOUND, "unknown or expired streaming token");
    }
    let headers = request.headers();
    if !has_token(headers, "connection", "upgrade") {
        return reply(
            StatusCode::BAD_REQUEST,
            "streaming needs an upgrade to SPDY/3.1 or WebSocket",
        );
    }
    if has_token(headers, "upgrade", "websocket") {
        upgrade_websocket(shared, &mut request, prepared)
    } else if has_token(headers, "upgrade", SPDY_UPGRADE) {
        upgrade_spdy(shared, &mut request, prepared)
    } else {
        reply(
            StatusCode::BAD_REQUEST,
            "streaming needs an upgrade to SPDY/3.1 or WebSocket",
        )
    }
}

fn upgrade_spdy(shared: Arc<Shared>, request: &mut Request<Incoming>, prepared: Prepared) -> Reply {
    let client = header_values(request.headers(), PROTOCOL_HEADER);
    if client.is_empty() {
        return reply(
            StatusCode::BAD_REQUEST,
            format!("unable to upgrade: {PROTOCOL_HEADER} is required"),
        );
    }
    let (protocol, version) = match &prepared {
        Prepared::Remote(_) => {
            match Version::negotiate(client.iter().copied(), &remotecommand::SPDY_VERSIONS) {
                Some(v) => (v.name(), Some(v)),
                None => {
                    let ours = remotecommand::SPDY_VERSIONS.map(Version::name);
                    return refuse_protocols(&client, &ours);
                }
            }
        }
        Prepared::PortForward(_) => {
            if !client.contains(&portforward::PROTOCOL) {
                return refuse_protocols(&client, &[portforward::PROTOCOL]);
            }
            (portforward::PROTOCOL, None)
        }
    };
    let on_upgrade = hyper::upgrade::on(request);
    let idle = shared.idle_timeout;
    tokio::spawn(async move {
        let io = match on_upgrade.await {
            Ok(upgraded) => TokioIo::new(upgraded),
            Err(e) => {
                tracing::debug!(error = %e, "SPDY upgrade failed");
                return;
            }
        };
        let conn = SpdyConnection::start(io, idle);
        match (prepared, version) {
            (Prepared::Remote(session), Some(version)) => {
                remotecommand::serve_spdy(shared.runtime.clone(), session, version, conn).await
            }
            (Prepared::PortForward(request), _) => port_forward(&shared, request, conn).await,
            (Prepared::Remote(_), None) => conn.close().await,
        }
    });
    let mut response = reply(StatusCode::SWITCHING_PROTOCOLS, "");
    *response.body_mut() = Full::new(Bytes::new());
    let headers = response.headers_mut();
    headers.insert("connection", HeaderValue::from_static("Upgrade"));
    headers.insert("upgrade", HeaderValue::from_static(SPDY_UPGRADE));
    headers.insert(PROTOCOL_HEADER, HeaderValue::from_static(protocol));
    response
}

/// 403 naming the protocols we speak, as httpstream.Handshake answers.
fn refuse_protocols(client: &[&str], ours: &[&'static str]) -> Reply {
    let mut response = reply(
        StatusCode::FORBIDDEN,
        format!(
            "unable to upgrade: unable to negotiate protocol: client supports {client:?}, server accepts {ours:?}"
        ),
    );
    for protocol in ours {
        response.headers_mut().append(
            ACCEPTED_PROTOCOLS_HEADER,
            HeaderValue::from_static(protocol),
        );
    }
    response
}

async fn port_forward(shared: &Shared, request: PortForwardRequest, conn: SpdyConnection) {
    match shared.runtime.port_forward_target(&request.pod_id) {
        Ok(target) => portforward::serve_spdy(request.pod_id, target, conn).await,
        Err(e) => {
            tracing::debug!(pod = %request.pod_id, error = %e, "port-forward refused");
            conn.close().await;
        }
    }
}

/// What a WebSocket connection carries.
enum WsMode {
    Remote(Version),
    /// SPDY port-forward inside binary messages.
    Tunnel,
    /// Port-forward on channels, to these ports.
    PortChannels(ChannelCodec, Vec<u16>),
}

fn upgrade_websocket(
    shared: Arc<Shared>,
    request: &mut Request<Incoming>,
    prepared: Prepared,
) -> Reply {
    let headers = request.headers();
    let Some(key) = headers
        .get("sec-websocket-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
    else {
        return reply(StatusCode::BAD_REQUEST, "Sec-WebSocket-Key is required");
    };
    if headers
        .get("sec-websocket-version")
        .and_then(|v| v.to_str().ok())
        != Some("13")
    {
        let mut response = reply(StatusCode::BAD_REQUEST, "WebSocket version 13 is required");
        response
            .headers_mut()
            .insert("sec-websocket-version", HeaderValue::from_static("13"));
        return response;
    }
    let client = header_values(headers, "sec-websocket-protocol");
    let tunnel = format!("{TUNNEL_PREFIX}{}", portforward::PROTOCOL);
    let (protocol, mode) = match &prepared {
        Prepared::Remote(_) => {
            match Version::negotiate(client.iter().copied(), &remotecommand::WEBSOCKET_VERSIONS) {
                Some(v) => (Some(v.name().to_string()), WsMode::Remote(v)),
                None => {
                    return reply(
                        StatusCode::BAD_REQUEST,
                        format!(
                            "requested protocols {client:?} are not supported; supported: {:?}",
                            remotecommand::WEBSOCKET_VERSIONS.map(Version::name)
                        ),
                    );
                }
            }
        }
        Prepared::PortForward(_) if client.contains(&tunnel.as_str()) => {
            (Some(tunnel), WsMode::Tunnel)
        }
        Prepared::PortForward(pf) => {
            // A client naming no protocol gets the binary channels, as from
            // kubelet (its "" protocol).
            let negotiated = if client.is_empty() {
                Some((None, ChannelCodec::Binary))
            } else {
                client.iter().find_map(|name| {
                    portforward::WEBSOCKET_PROTOCOLS
                        .iter()
                        .find(|(ours, _)| ours == name)
                        .map(|&(ours, codec)| (Some(ours.to_string()), codec))
                })
            };
            let Some((protocol, codec)) = negotiated else {
                let mut supported = vec![tunnel];
                supported
                    .extend(portforward::WEBSOCKET_PROTOCOLS.map(|(name, _)| name.to_string()));
                return reply(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "requested protocols {client:?} are not supported; supported: {supported:?}"
                    ),
                );
            };
            match portforward::websocket_ports(request.uri().query(), &pf.ports) {
                Ok(ports) => (protocol, WsMode::PortChannels(codec, ports)),
                Err(e) => {
                    tracing::debug!(pod = %pf.pod_id, error = %e, "port-forward refused");
                    return reply(StatusCode::BAD_REQUEST, e.to_string());
                }
            }
        }
    };
    let protocol_value = match protocol.map(|p| HeaderValue::from_str(&p)).transpose() {
        Ok(value) => value,
        Err(_) => return reply(StatusCode::BAD_REQUEST, "bad protocol"),
    };
    let Ok(accept) = HeaderValue::from_str(&websocket::accept_key(&key)) else {
        return reply(StatusCode::BAD_REQUEST, "bad Sec-WebSocket-Key");
    };
    let on_upgrade = hyper::upgrade::on(request);
    let idle = shared.idle_timeout;
    tokio::spawn(async move {
        let io = match on_upgrade.await {
            Ok(upgraded) => TokioIo::new(upgraded),
            Err(e) => {
                tracing::debug!(error = %e, "WebSocket upgrade failed");
                return;
            }
        };
        let conn = WsConnection::start(io, idle);
        match (prepared, mode) {
            (Prepared::Remote(session), WsMode::Remote(version)) => {
                remotecommand::serve_websocket(shared.runtime.clone(), session, version, conn).await
            }
            (Prepared::PortForward(request), WsMode::Tunnel) => {
                // SPDY runs inside the WebSocket's binary messages.
                let (ours, theirs) = tokio::io::duplex(256 * 1024);
                let bridge = tokio::spawn(tunnel_bridge(conn, theirs));
                let spdy = SpdyConnection::start(ours, idle);
                port_forward(&shared, request, spdy).await;
                let _ = bridge.await;
            }
            (Prepared::PortForward(request), WsMode::PortChannels(codec, ports)) => {
                match shared.runtime.port_forward_target(&request.pod_id) {
                    Ok(target) => {
                        portforward::serve_websocket(request.pod_id, target, ports, codec, conn)
                            .await
                    }
                    Err(e) => {
                        tracing::debug!(pod = %request.pod_id, error = %e, "port-forward refused");
                        conn.close().await;
                    }
                }
            }
            // The mode was chosen from the prepared session; no other pairs.
            _ => conn.close().await,
        }
    });
    let mut response = reply(StatusCode::SWITCHING_PROTOCOLS, "");
    *response.body_mut() = Full::new(Bytes::new());
    let headers = response.headers_mut();
    headers.insert("connection", HeaderValue::from_static("Upgrade"));
    headers.insert("upgrade", HeaderValue::from_static("websocket"));
    headers.insert("sec-websocket-accept", accept);
    if let Some(protocol) = protocol_value {
        headers.insert("sec-websocket-protocol", protocol);
    }
    response
}

/// Carries a byte stream in WebSocket binary messages, both ways, until
/// either side ends.
async fn tunnel_bridge(mut conn: WsConnection, io: tokio::io::DuplexStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut rd, mut wr) = tokio::io::split(io);
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        tokio::select! {
            message = conn.messages.recv() => match message {
                Some(websocket::Message::Binary(data)) => {
                    if wr.write_all(&data).await.is_err() {
                        break;
                    }
                }
                Some(_) => {}
                None => break,
            },
            read = rd.read(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if conn.sender.binary(Bytes::copy_from_slice(&buf[..n])).await.is_err() {
                        break;
                    }
                }
            },
        }
    }
    let _ = wr.shutdown().await;
    conn.close().await;
}
