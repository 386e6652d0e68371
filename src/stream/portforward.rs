//! Port-forward sessions. Over SPDY (`portforward.k8s.io`, also tunneled in
//! WebSocket) each forwarded connection is a pair of streams, error and
//! data, named by their `port` and `requestid` headers. Over the WebSocket
//! channel protocols (`v4.channel.k8s.io`, `v4.base64.channel.k8s.io`: the
//! Python and JavaScript clients) the ports are fixed when the session opens
//! and each has a data and an error channel, one connection per port. Either
//! way the data is joined to a TCP connection to that port inside the pod's
//! network namespace (or on the host, for a pod on the host's network).

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsFd;
use std::time::Duration;

use bytes::Bytes;
use nix::sched::{CloneFlags, setns};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use super::spdy_conn::{SpdyConnection, SpdySender, StreamEvent};
use super::websocket::{ChannelCodec, Message, WsConnection, WsSender};
use crate::runtime::PortForwardTarget;

/// The one port-forward protocol.
pub(crate) const PROTOCOL: &str = "portforward.k8s.io";
/// How long one stream of a pair waits for the other (kubelet's stream
/// creation timeout).
const PAIR_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const CHUNK: usize = 32 * 1024;
/// WebSocket channel protocols of port-forward, by preference.
pub(crate) const WEBSOCKET_PROTOCOLS: [(&str, ChannelCodec); 2] = [
    ("v4.channel.k8s.io", ChannelCodec::Binary),
    ("v4.base64.channel.k8s.io", ChannelCodec::Base64),
];
/// Most ports of one WebSocket session: two channels each, numbered in a byte.
pub(crate) const MAX_WEBSOCKET_PORTS: usize = 128;

/// A forwarded connection whose streams are not all open yet.
#[derive(Debug, Default)]
struct Pair {
    port: Option<String>,
    error: Option<u32>,
    data: Option<u32>,
    opened: Option<tokio::time::Instant>,
}

/// Serves port-forwards to one pod on a SPDY connection, many at once.
pub(crate) async fn serve_spdy(
    pod_id: String,
    target: PortForwardTarget,
    mut conn: SpdyConnection,
) {
    let mut pairs: HashMap<String, Pair> = HashMap::new();
    let mut data_streams: HashMap<u32, mpsc::Sender<Bytes>> = HashMap::new();
    let mut forwards = JoinSet::new();
    let mut sweep = tokio::time::interval(Duration::from_secs(5));
    loop {
        let event = tokio::select! {
            event = conn.events.recv() => match event {
                Some(event) => event,
                None => break,
            },
            _ = sweep.tick() => {
                expire_pairs(&mut pairs, &conn.sender).await;
                continue;
            }
            Some(_) = forwards.join_next(), if !forwards.is_empty() => continue,
        };
        match event {
            StreamEvent::Opened { id, headers } => {
                let kind = headers.get("streamtype").unwrap_or_default().to_string();
                // Clients before requestID pair an error stream with the data
                // stream opened right after it.
                let request_id = match (headers.get("requestid"), kind.as_str()) {
                    (Some(r), _) => r.to_string(),
                    (None, "data") => id.saturating_sub(2).to_string(),
                    (None, _) => id.to_string(),
                };
                let pair = pairs.entry(request_id.clone()).or_default();
                pair.opened.get_or_insert_with(tokio::time::Instant::now);
                match kind.as_str() {
                    "error" => pair.error = Some(id),
                    "data" => pair.data = Some(id),
                    other => {
                        tracing::debug!(kind = other, "unknown port-forward stream type");
                        let _ = conn
                            .sender
                            .reset(id, super::spdy::rst::REFUSED_STREAM)
                            .await;
                        continue;
                    }
                }
                if let Some(port) = headers.get("port") {
                    pair.port = Some(port.to_string());
                }
                if let (Some(error), Some(data)) = (pair.error, pair.data) {
                    let port = pair.port.clone().unwrap_or_default();
                    pairs.remove(&request_id);
                    let (tx, rx) = mpsc::channel(16);
                    data_streams.insert(data, tx);
                    forwards.spawn(forward(
                        pod_id.clone(),
                        target.clone(),
                        port,
                        conn.sender.clone(),
                        error,
                        data,
                        rx,
                    ));
                }
            }
            StreamEvent::Data { id, data } => {
                if let Some(tx) = data_streams.get(&id)
                    && tx.send(data).await.is_err()
                {
                    data_streams.remove(&id);
                }
            }
            // The client's side of the connection ended (FIN), or it gave up
            // the stream: either way no more data towards the pod.
            StreamEvent::Finished { id } | StreamEvent::Reset { id } => {
                data_streams.remove(&id);
            }
        }
    }
    forwards.abort_all();
    conn.close().await;
}

/// Refuses the pairs whose other half never came.
async fn expire_pairs(pairs: &mut HashMap<String, Pair>, sender: &SpdySender) {
    let now = tokio::time::Instant::now();
    let expired: Vec<String> = pairs
        .iter()
        .filter(|(_, p)| {
            p.opened
                .is_some_and(|t| now.duration_since(t) > PAIR_TIMEOUT)
        })
        .map(|(k, _)| k.clone())
        .collect();
    for key in expired {
        if let Some(pair) = pairs.remove(&key) {
            tracing::debug!(request = %key, "port-forward stream pair incomplete; refusing it");
            for id in [pair.error, pair.data].into_iter().flatten() {
                let _ = sender.reset(id, super::spdy::rst::REFUSED_STREAM).await;
            }
        }
    }
}

/// One forwarded connection: data stream to and from the pod's port; a
/// failure is written on the error stream, as kubelet does.
async fn forward(
    pod_id: String,
    target: PortForwardTarget,
    port: String,
    sender: SpdySender,
    error: u32,
    data: u32,
    from_client: mpsc::Receiver<Bytes>,
) {
    let connection = match port.parse::<u16>() {
        Ok(0) | Err(_) => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid port {port:?}"),
        )),
        Ok(port) => connect(&target, port).await,
    };
    let stream = match connection {
        Ok(stream) => stream,
        Err(e) => {
            let message = format!("error forwarding port {port} to pod {pod_id}: {e}");
            tracing::debug!(error = %message, "port-forward failed");
            let _ = sender.data(error, Bytes::from(message)).await;
            let _ = sender.finish(error).await;
            let _ = sender.finish(data).await;
            return;
        }
    };
    let (from_pod, to_pod) = stream.into_split();
    let up = copy_to_pod(from_client, to_pod);
    let down = async {
        copy_from_pod(from_pod, |chunk| {
            let sender = &sender;
            async move { sender.data(data, chunk).await.is_ok() }
        })
        .await;
        // The pod's side is done: so is the forwarded connection, as far as
        // the client waits for it (kubelet closes both streams here too).
        let _ = sender.finish(data).await;
        let _ = sender.finish(error).await;
    };
    tokio::join!(up, down);
}

/// Why the ports of a WebSocket port-forward are refused (a 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum PortsError {
    #[error("query parameter \"port\" is required")]
    Missing,
    #[error("query parameter \"port\" cannot be empty")]
    Empty,
    #[error("unable to parse {0:?} as a port")]
    Parse(String),
    #[error("port {0:?} must be > 0")]
    Zero(String),
    #[error("{0} ports asked for; at most {MAX_WEBSOCKET_PORTS} in one session")]
    TooMany(usize),
}

/// The ports of a WebSocket port-forward: the URL's `port` parameters
/// (repeated or comma-separated, as kubelet's NewV4Options reads them), else
/// the ports of the CRI PortForwardRequest (what kubelet's CRI streaming
/// server uses).
pub(crate) fn websocket_ports(
    query: Option<&str>,
    requested: &[i32],
) -> Result<Vec<u16>, PortsError> {
    let mut ports = Vec::new();
    let values = form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .filter(|(name, _)| name == "port")
        .map(|(_, value)| value);
    for value in values {
        if value.is_empty() {
            return Err(PortsError::Empty);
        }
        for port in value.split(',') {
            match port.parse::<u16>() {
                Ok(0) => return Err(PortsError::Zero(value.to_string())),
                Ok(port) => ports.push(port),
                Err(_) => return Err(PortsError::Parse(value.to_string())),
            }
        }
    }
    if ports.is_empty() {
        for &port in requested {
            match u16::try_from(port) {
                Ok(port) if port > 0 => ports.push(port),
                _ => return Err(PortsError::Parse(port.to_string())),
            }
        }
    }
    match ports.len() {
        0 => Err(PortsError::Missing),
        n if n > MAX_WEBSOCKET_PORTS => Err(PortsError::TooMany(n)),
        _ => Ok(ports),
    }
}

/// Serves the WebSocket channel protocol, as kubelet's
/// `portforward/websocket.go`: port i has data channel 2i and error channel
/// 2i+1, each starting with the port (u16, little endian); one connection per
/// port, opened right away. The session ends when the client goes or every
/// port's connection has ended.
pub(crate) async fn serve_websocket(
    pod_id: String,
    target: PortForwardTarget,
    ports: Vec<u16>,
    codec: ChannelCodec,
    mut conn: WsConnection,
) {
    tracing::debug!(pod = %pod_id, ?ports, ?codec, "port-forward on WebSocket channels");
    let mut to_pod = Vec::with_capacity(ports.len());
    let mut forwards = JoinSet::new();
    for (index, &port) in ports.iter().enumerate() {
        // The numbers fit in a byte: the server refuses more than
        // MAX_WEBSOCKET_PORTS ports.
        let data = (2 * index) as u8;
        let announce = port.to_le_bytes();
        let sent = async {
            conn.sender.send(codec.frame(data, &announce)).await?;
            conn.sender.send(codec.frame(data + 1, &announce)).await
        };
        if sent.await.is_err() {
            conn.close().await;
            return;
        }
        let (tx, rx) = mpsc::channel(16);
        to_pod.push(Some(tx));
        forwards.spawn(forward_channel(
            pod_id.clone(),
            target.clone(),
            port,
            codec,
            data,
            conn.sender.clone(),
            rx,
        ));
    }
    loop {
        tokio::select! {
            message = conn.messages.recv() => {
                let data = match message {
                    Some(Message::Binary(data) | Message::Text(data)) => data,
                    Some(_) => continue,
                    None => break,
                };
                let (channel, data) = match codec.unframe(&data) {
                    Ok(framed) => framed,
                    Err(e) => {
                        tracing::debug!(pod = %pod_id, error = %e, "port-forward message dropped");
                        continue;
                    }
                };
                // Only data channels carry anything towards the pod; what
                // comes on an error channel or an unknown one is dropped, as
                // kubelet does.
                let Some(slot) = (channel % 2 == 0)
                    .then(|| to_pod.get_mut(usize::from(channel / 2)))
                    .flatten()
                else {
                    continue;
                };
                if let Some(tx) = slot
                    && tx.send(data).await.is_err()
                {
                    *slot = None;
                }
            }
            joined = forwards.join_next() => {
                if joined.is_none() {
                    break;
                }
            }
        }
    }
    forwards.abort_all();
    conn.close().await;
}

/// One port's connection on its data channel; a failure is written as text
/// on its error channel.
async fn forward_channel(
    pod_id: String,
    target: PortForwardTarget,
    port: u16,
    codec: ChannelCodec,
    data: u8,
    sender: WsSender,
    from_client: mpsc::Receiver<Bytes>,
) {
    let stream = match connect(&target, port).await {
        Ok(stream) => stream,
        Err(e) => {
            let message = format!("error forwarding port {port} to pod {pod_id}: {e}");
            tracing::debug!(pod = %pod_id, error = %message, "port-forward failed");
            let _ = sender.send(codec.frame(data + 1, message.as_bytes())).await;
            return;
        }
    };
    let (from_pod, to_pod) = stream.into_split();
    let up = copy_to_pod(from_client, to_pod);
    let down = copy_from_pod(from_pod, |chunk| {
        let sender = &sender;
        async move { sender.send(codec.frame(data, &chunk)).await.is_ok() }
    });
    tokio::pin!(down);
    // The pod's side ending ends the port (the channels have no half-close in
    // v4); the client's input ending only stops writing to the pod.
    tokio::select! {
        () = &mut down => {}
        () = up => down.await,
    }
}

/// The client's bytes to the pod until the client's side ends; then the pod
/// reads the end of its input.
async fn copy_to_pod(mut from_client: mpsc::Receiver<Bytes>, mut to_pod: OwnedWriteHalf) {
    while let Some(chunk) = from_client.recv().await {
        if to_pod.write_all(&chunk).await.is_err() {
            break;
        }
    }
    let _ = to_pod.shutdown().await;
}

/// The pod's bytes to `send` until the pod's side ends or `send` says the
/// client is gone (false).
async fn copy_from_pod<F, Fut>(mut from_pod: OwnedReadHalf, mut send: F)
where
    F: FnMut(Bytes) -> Fut,
    Fut: Future<Output = bool>,
{
    let mut buf = vec![0u8; CHUNK];
    loop {
        match from_pod.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if !send(Bytes::copy_from_slice(&buf[..n])).await {
                    break;
                }
            }
        }
    }
}

/// A TCP connection to `port` on the loopback of the target's network
/// namespace. The namespace is entered on a thread of its own, which ends
/// right after: async workers never switch namespaces.
pub(crate) async fn connect(target: &PortForwardTarget, port: u16) -> io::Result<TcpStream> {
    let target = target.clone();
    let (tx, rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("berth-portfwd".into())
        .spawn(move || {
            let result = (|| {
                if let PortForwardTarget::Netns(path) = &target {
                    let ns = File::open(path)?;
                    setns(ns.as_fd(), CloneFlags::CLONE_NEWNET)?;
                }
                connect_loopback(port)
            })();
            let _ = tx.send(result);
        })?;
    let stream = rx
        .await
        .map_err(|_| io::Error::other("the port-forward thread died"))??;
    stream.set_nonblocking(true)?;
    TcpStream::from_std(stream)
}

/// 127.0.0.1 first, then ::1.
fn connect_loopback(port: u16) -> io::Result<std::net::TcpStream> {
    let v4 = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    match std::net::TcpStream::connect_timeout(&v4, CONNECT_TIMEOUT) {
        Ok(stream) => Ok(stream),
        Err(e) => {
            let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
            std::net::TcpStream::connect_timeout(&v6, CONNECT_TIMEOUT).map_err(|_| e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websocket_ports_come_from_the_query_else_the_request() {
        assert_eq!(
            websocket_ports(Some("port=80&port=8080,9090"), &[1]),
            Ok(vec![80, 8080, 9090])
        );
        assert_eq!(
            websocket_ports(Some("port=80%2C81&x=1"), &[]),
            Ok(vec![80, 81])
        );
        assert_eq!(websocket_ports(None, &[8080]), Ok(vec![8080]));
        assert_eq!(websocket_ports(Some("x=1"), &[]), Err(PortsError::Missing));
        assert_eq!(
            websocket_ports(Some("port="), &[80]),
            Err(PortsError::Empty)
        );
        assert_eq!(
            websocket_ports(Some("port=http"), &[80]),
            Err(PortsError::Parse("http".into()))
        );
        assert_eq!(
            websocket_ports(Some("port=65536"), &[80]),
            Err(PortsError::Parse("65536".into()))
        );
        assert_eq!(
            websocket_ports(Some("port=0"), &[80]),
            Err(PortsError::Zero("0".into()))
        );
        let many = vec!["port=1"; MAX_WEBSOCKET_PORTS + 1].join("&");
        assert_eq!(
            websocket_ports(Some(&many), &[]),
            Err(PortsError::TooMany(MAX_WEBSOCKET_PORTS + 1))
        );
    }
}
