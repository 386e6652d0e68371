//! Port-forward sessions (`portforward.k8s.io` over SPDY, also tunneled in
//! WebSocket): each forwarded connection is a pair of streams, error and
//! data, named by their `port` and `requestid` headers; the data stream is
//! joined to a TCP connection to that port inside the pod's network
//! namespace (or on the host, for a pod on the host's network).

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
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use super::spdy_conn::{SpdyConnection, SpdySender, StreamEvent};
use crate::runtime::PortForwardTarget;

/// The one port-forward protocol.
pub(crate) const PROTOCOL: &str = "portforward.k8s.io";
/// How long one stream of a pair waits for the other (kubelet's stream
/// creation timeout).
const PAIR_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const CHUNK: usize = 32 * 1024;

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
    mut from_client: mpsc::Receiver<Bytes>,
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
    let (mut from_pod, mut to_pod) = stream.into_split();
    let up = async {
        while let Some(chunk) = from_client.recv().await {
            if to_pod.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = to_pod.shutdown().await;
    };
    let down = async {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match from_pod.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if sender
                        .data(data, Bytes::copy_from_slice(&buf[..n]))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
        // The pod's side is done: so is the forwarded connection, as far as
        // the client waits for it (kubelet closes both streams here too).
        let _ = sender.finish(data).await;
        let _ = sender.finish(error).await;
    };
    tokio::join!(up, down);
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
