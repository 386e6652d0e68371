//! Exec and attach sessions, as Kubernetes' remotecommand clients speak
//! them over SPDY (one stream per stdio channel, named by its `streamtype`
//! header) or WebSocket (one channel byte in front of each message): stdin,
//! stdout, stderr, the error channel that carries the outcome (text up to
//! v3, a JSON Status from v4 on, with the exit code), terminal resizes (v3
//! on) and, on WebSocket v5, the client's half-close of stdin.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::sync::{mpsc, oneshot};

use super::spdy_conn::{SpdyConnection, SpdySender, StreamEvent};
use super::websocket::{ChannelCodec, Message, WsConnection, WsSender};
use super::{AttachRequest, ExecRequest};
use crate::monitor::{AttachStreams, ExecStreams, OutputChunk, StreamingExec};
use crate::runtime::Runtime;

/// How long a SPDY client has to open the streams it asked for (kubelet's
/// DefaultStreamCreationTimeout).
const STREAM_CREATION_TIMEOUT: Duration = Duration::from_secs(30);

/// Channel numbers of the WebSocket protocols.
const CHANNEL_STDIN: u8 = 0;
const CHANNEL_STDOUT: u8 = 1;
const CHANNEL_STDERR: u8 = 2;
const CHANNEL_ERROR: u8 = 3;
const CHANNEL_RESIZE: u8 = 4;
/// v5: `[255, channel]` half-closes a channel.
const CHANNEL_CLOSE: u8 = 255;

/// The remotecommand protocol versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Version {
    V1,
    V2,
    V3,
    V4,
    V5,
}

/// Versions served over SPDY, preferred first (v5 is WebSocket's).
pub(crate) const SPDY_VERSIONS: [Version; 4] = [Version::V4, Version::V3, Version::V2, Version::V1];
/// Versions served over WebSocket, preferred first.
pub(crate) const WEBSOCKET_VERSIONS: [Version; 5] = [
    Version::V5,
    Version::V4,
    Version::V3,
    Version::V2,
    Version::V1,
];

impl Version {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Version::V1 => "channel.k8s.io",
            Version::V2 => "v2.channel.k8s.io",
            Version::V3 => "v3.channel.k8s.io",
            Version::V4 => "v4.channel.k8s.io",
            Version::V5 => "v5.channel.k8s.io",
        }
    }

    /// The first of the client's protocols that is one of `ours`.
    pub(crate) fn negotiate<'a>(
        client: impl IntoIterator<Item = &'a str>,
        ours: &[Version],
    ) -> Option<Version> {
        client
            .into_iter()
            .find_map(|name| ours.iter().copied().find(|v| v.name() == name))
    }
}

/// A session the token stood for.
#[derive(Debug, Clone)]
pub(crate) enum Session {
    Exec(ExecRequest),
    Attach(AttachRequest),
}

/// The stdio channels a session has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Streams {
    stdin: bool,
    stdout: bool,
    stderr: bool,
    tty: bool,
}

impl Session {
    fn streams(&self) -> Streams {
        match self {
            Session::Exec(r) => Streams {
                stdin: r.stdin,
                stdout: r.stdout,
                stderr: r.stderr,
                tty: r.tty,
            },
            Session::Attach(r) => Streams {
                stdin: r.stdin,
                stdout: r.stdout,
                stderr: r.stderr,
                tty: r.tty,
            },
        }
    }
}

/// What the client sends a session.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Inbound {
    Stdin(Bytes),
    StdinClosed,
    Resize { width: u16, height: u16 },
}

/// How a session ended, for the error channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    Success,
    ExitCode(i32),
    Error(String),
}

impl Outcome {
    /// What the error channel carries: nothing on success up to v3, the
    /// message on failure; a metav1.Status from v4 on.
    fn status(&self, version: Version) -> Vec<u8> {
        let (message, reason, causes, code) = match self {
            Outcome::Success if version < Version::V4 => return Vec::new(),
            Outcome::Success => {
                return br#"{"metadata":{},"status":"Success"}"#.to_vec();
            }
            Outcome::ExitCode(code) => (
                format!("command terminated with non-zero exit code: exit status {code}"),
                "NonZeroExitCode",
                serde_json::json!([{"reason": "ExitCode", "message": code.to_string()}]),
                None,
            ),
            Outcome::Error(message) => (
                format!("Internal error occurred: {message}"),
                "InternalError",
                serde_json::json!([{"message": message}]),
                Some(500),
            ),
        };
        if version < Version::V4 {
            return message.into_bytes();
        }
        let mut status = serde_json::json!({
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": reason,
            "details": {"causes": causes},
        });
        if let Some(code) = code {
            status["code"] = code.into();
        }
        status.to_string().into_bytes()
    }
}

/// The SPDY streams of a session, by channel.
#[derive(Debug, Clone, Copy, Default)]
struct SpdyIds {
    error: Option<u32>,
    stdin: Option<u32>,
    stdout: Option<u32>,
    stderr: Option<u32>,
    resize: Option<u32>,
}

impl SpdyIds {
    fn complete(&self, streams: Streams, version: Version) -> bool {
        self.error.is_some()
            && (!streams.stdin || self.stdin.is_some())
            && (!streams.stdout || self.stdout.is_some())
            && (!streams.stderr || streams.tty || self.stderr.is_some())
            && (!streams.tty || version < Version::V3 || self.resize.is_some())
    }
}

/// Where a session's output goes.
enum Sink {
    Spdy { sender: SpdySender, ids: SpdyIds },
    WebSocket { sender: WsSender },
}

/// The client is gone.
struct Gone;

impl Sink {
    async fn output(&self, channel: u8, data: Vec<u8>) -> Result<(), Gone> {
        match self {
            Sink::Spdy { sender, ids } => {
                let id = match channel {
                    CHANNEL_STDOUT => ids.stdout,
                    _ => ids.stderr,
                };
                match id {
                    Some(id) => sender.data(id, Bytes::from(data)).await.map_err(|_| Gone),
                    None => Ok(()),
                }
            }
            Sink::WebSocket { sender } => sender
                .send(ChannelCodec::Binary.frame(channel, &data))
                .await
                .map_err(|_| Gone),
        }
    }

    /// Ends the output channels and reports the outcome.
    async fn finish(&self, version: Version, outcome: &Outcome) {
        let status = outcome.status(version);
        match self {
            Sink::Spdy { sender, ids } => {
                for id in [ids.stdout, ids.stderr, ids.stdin, ids.resize]
                    .into_iter()
                    .flatten()
                {
                    let _ = sender.finish(id).await;
                }
                if let Some(error) = ids.error {
                    if !status.is_empty() {
                        let _ = sender.data(error, Bytes::from(status)).await;
                    }
                    let _ = sender.finish(error).await;
                }
            }
            Sink::WebSocket { sender } => {
                if !status.is_empty() {
                    let _ = sender
                        .send(ChannelCodec::Binary.frame(CHANNEL_ERROR, &status))
                        .await;
                }
            }
        }
    }
}

/// Terminal sizes from the resize channel: JSON objects `{"Width":w,"Height":h}`,
/// one after another, split anywhere.
#[derive(Debug, Default)]
struct ResizeParser {
    buf: BytesMut,
}

#[derive(serde::Deserialize)]
struct TerminalSize {
    #[serde(rename = "Width", alias = "width")]
    width: u16,
    #[serde(rename = "Height", alias = "height")]
    height: u16,
}

impl ResizeParser {
    fn feed(&mut self, data: &[u8]) -> Vec<Inbound> {
        self.buf.extend_from_slice(data);
        let mut sizes = Vec::new();
        let mut stream =
            serde_json::Deserializer::from_slice(&self.buf).into_iter::<TerminalSize>();
        let mut used = 0;
        loop {
            match stream.next() {
                Some(Ok(size)) => {
                    used = stream.byte_offset();
                    sizes.push(Inbound::Resize {
                        width: size.width,
                        height: size.height,
                    });
                }
                Some(Err(e)) if e.is_eof() => break,
                Some(Err(_)) => {
                    // Not a size: drop what is there and start afresh.
                    used = self.buf.len();
                    break;
                }
                None => {
                    used = self.buf.len();
                    break;
                }
            }
        }
        let _ = self.buf.split_to(used);
        sizes
    }
}

/// Serves one exec or attach on a SPDY connection.
pub(crate) async fn serve_spdy(
    runtime: Arc<Runtime>,
    session: Session,
    version: Version,
    mut conn: SpdyConnection,
) {
    let streams = session.streams();
    let mut ids = SpdyIds::default();
    let mut early = Vec::new();
    let mut resize = ResizeParser::default();
    let deadline = tokio::time::Instant::now() + STREAM_CREATION_TIMEOUT;
    while !ids.complete(streams, version) {
        let event = match tokio::time::timeout_at(deadline, conn.events.recv()).await {
            Ok(Some(event)) => event,
            Ok(None) => return conn.close().await,
            Err(_) => {
                tracing::debug!("the client did not open its streams in time");
                return conn.close().await;
            }
        };
        match event {
            StreamEvent::Opened { id, headers } => {
                let slot = match headers.get("streamtype") {
                    Some("error") => &mut ids.error,
                    Some("stdin") => &mut ids.stdin,
                    Some("stdout") => &mut ids.stdout,
                    Some("stderr") => &mut ids.stderr,
                    Some("resize") => &mut ids.resize,
                    other => {
                        tracing::debug!(?other, "unknown stream type");
                        let _ = conn
                            .sender
                            .reset(id, super::spdy::rst::REFUSED_STREAM)
                            .await;
                        continue;
                    }
                };
                *slot = Some(id);
            }
            other => early.extend(inbound_of(other, &ids, &mut resize)),
        }
    }
    let (in_tx, in_rx) = mpsc::channel(16);
    for message in early {
        let _ = in_tx.send(message).await;
    }
    let sink = Sink::Spdy {
        sender: conn.sender.clone(),
        ids,
    };
    let mut task = tokio::spawn(run(runtime, session, version, in_rx, sink));
    let mut in_tx = Some(in_tx);
    loop {
        tokio::select! {
            _ = &mut task => break,
            event = conn.events.recv(), if in_tx.is_some() => match event {
                Some(event) => {
                    for message in inbound_of(event, &ids, &mut resize) {
                        if let Some(tx) = &in_tx {
                            let _ = tx.send(message).await;
                        }
                    }
                }
                // The client is gone: the session sees its input end.
                None => in_tx = None,
            },
        }
    }
    conn.close().await;
}

/// What a SPDY stream event means for the session.
fn inbound_of(event: StreamEvent, ids: &SpdyIds, resize: &mut ResizeParser) -> Vec<Inbound> {
    match event {
        StreamEvent::Data { id, data } if Some(id) == ids.stdin => vec![Inbound::Stdin(data)],
        StreamEvent::Data { id, data } if Some(id) == ids.resize => resize.feed(&data),
        StreamEvent::Finished { id } | StreamEvent::Reset { id } if Some(id) == ids.stdin => {
            vec![Inbound::StdinClosed]
        }
        _ => Vec::new(),
    }
}

/// Serves one exec or attach on a WebSocket connection.
pub(crate) async fn serve_websocket(
    runtime: Arc<Runtime>,
    session: Session,
    version: Version,
    mut conn: WsConnection,
) {
    let (in_tx, in_rx) = mpsc::channel(16);
    let sink = Sink::WebSocket {
        sender: conn.sender.clone(),
    };
    let mut task = tokio::spawn(run(runtime, session, version, in_rx, sink));
    let mut in_tx = Some(in_tx);
    let mut resize = ResizeParser::default();
    loop {
        tokio::select! {
            _ = &mut task => break,
            message = conn.messages.recv(), if in_tx.is_some() => {
                let Some(message) = message else {
                    in_tx = None;
                    continue;
                };
                let Message::Binary(data) = message else {
                    continue;
                };
                let inbound = match ChannelCodec::Binary.unframe(&data) {
                    Ok((CHANNEL_STDIN, data)) => vec![Inbound::Stdin(data)],
                    Ok((CHANNEL_RESIZE, data)) if version >= Version::V3 => resize.feed(&data),
                    Ok((CHANNEL_CLOSE, data)) if version >= Version::V5 && data.first() == Some(&CHANNEL_STDIN) => {
                        vec![Inbound::StdinClosed]
                    }
                    _ => Vec::new(),
                };
                for message in inbound {
                    if let Some(tx) = &in_tx {
                        let _ = tx.send(message).await;
                    }
                }
            }
        }
    }
    conn.close().await;
}

/// Runs the session; reports its outcome unless the client is gone.
async fn run(
    runtime: Arc<Runtime>,
    session: Session,
    version: Version,
    inbound: mpsc::Receiver<Inbound>,
    sink: Sink,
) {
    let outcome = match &session {
        Session::Exec(request) => run_exec(&runtime, request, inbound, &sink).await,
        Session::Attach(request) => run_attach(&runtime, request, inbound, &sink).await,
    };
    if let Some(outcome) = outcome {
        sink.finish(version, &outcome).await;
    }
}

/// How the client's side of a session ended.
enum InputEnd {
    /// Its stdin closed and that ends an attach.
    Detach,
    /// Its connection is gone.
    Gone,
}

/// An exec: the command's output to the client, the client's input to the
/// command, until the command exits; None when the client left first (the
/// command is killed then).
async fn run_exec(
    runtime: &Runtime,
    request: &ExecRequest,
    mut inbound: mpsc::Receiver<Inbound>,
    sink: &Sink,
) -> Option<Outcome> {
    let streams = ExecStreams {
        stdin: request.stdin,
        tty: request.tty,
    };
    let exec = match runtime
        .exec_stream(&request.container_id, &request.cmd, streams)
        .await
    {
        Ok(exec) => exec,
        Err(e) => return Some(Outcome::Error(e.to_string())),
    };
    let StreamingExec {
        mut input,
        mut output,
        process,
    } = exec;
    let (gone_tx, mut gone) = oneshot::channel::<()>();
    let feeder = tokio::spawn(async move {
        while let Some(message) = inbound.recv().await {
            // A command that stopped reading is no reason to stop the session.
            let _ = match message {
                Inbound::Stdin(data) => input.write(&data).await,
                Inbound::StdinClosed => input.close().await,
                Inbound::Resize { width, height } => input.resize(width, height).await,
            };
        }
        let _ = gone_tx.send(());
    });
    let mut client_gone = false;
    loop {
        tokio::select! {
            chunk = output.next() => {
                let sent = match chunk {
                    Some(OutputChunk::Stdout(data)) if request.stdout => sink.output(CHANNEL_STDOUT, data).await,
                    Some(OutputChunk::Stderr(data)) if request.stderr => sink.output(CHANNEL_STDERR, data).await,
                    Some(_) => Ok(()),
                    None => break,
                };
                if sent.is_err() {
                    client_gone = true;
                    break;
                }
            }
            result = &mut gone, if !client_gone => {
                if result.is_ok() {
                    client_gone = true;
                    break;
                }
            }
        }
    }
    feeder.abort();
    if client_gone {
        // Dropping the helper kills the command.
        return None;
    }
    Some(match process.wait().await {
        Ok(0) => Outcome::Success,
        Ok(code) => Outcome::ExitCode(code),
        Err(e) => Outcome::Error(e.to_string()),
    })
}

/// An attach: the container's output to the client and its input to the
/// container, until the container exits, the client detaches (its stdin
/// ends; with stdin_once and no terminal that closes the container's stdin
/// instead) or leaves. The container runs on.
async fn run_attach(
    runtime: &Runtime,
    request: &AttachRequest,
    mut inbound: mpsc::Receiver<Inbound>,
    sink: &Sink,
) -> Option<Outcome> {
    let streams = AttachStreams {
        stdin: request.stdin,
        stdout: request.stdout,
        stderr: request.stderr,
    };
    let (mut output, mut input, info) = match runtime.attach(&request.container_id, streams).await {
        Ok(attached) => attached,
        Err(e) => return Some(Outcome::Error(e.to_string())),
    };
    let detach_on_eof = !info.stdin_once || info.tty;
    let (end_tx, mut end) = oneshot::channel::<InputEnd>();
    let feeder = tokio::spawn(async move {
        while let Some(message) = inbound.recv().await {
            match message {
                Inbound::Stdin(data) => {
                    let _ = input.stdin(&data).await;
                }
                Inbound::StdinClosed => {
                    let _ = input.close_stdin().await;
                    if detach_on_eof {
                        let _ = end_tx.send(InputEnd::Detach);
                        return input;
                    }
                }
                Inbound::Resize { width, height } => {
                    let _ = input.resize(width, height).await;
                }
            }
        }
        let _ = end_tx.send(InputEnd::Gone);
        input
    });
    let mut ended = None;
    loop {
        tokio::select! {
            chunk = output.next() => {
                let sent = match chunk {
                    Some(OutputChunk::Stdout(data)) => sink.output(CHANNEL_STDOUT, data).await,
                    Some(OutputChunk::Stderr(data)) => sink.output(CHANNEL_STDERR, data).await,
                    // The container has exited.
                    None => break,
                };
                if sent.is_err() {
                    return None;
                }
            }
            end_of_input = &mut end, if ended.is_none() => {
                match end_of_input {
                    Ok(InputEnd::Gone) => return None,
                    Ok(InputEnd::Detach) => break,
                    Err(_) => ended = Some(()),
                }
            }
        }
    }
    feeder.abort();
    Some(Outcome::Success)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_client_protocol_we_speak_wins() {
        assert_eq!(
            Version::negotiate(
                [
                    "v5.channel.k8s.io",
                    "v4.channel.k8s.io",
                    "v3.channel.k8s.io"
                ],
                &SPDY_VERSIONS
            ),
            Some(Version::V4)
        );
        assert_eq!(
            Version::negotiate(["v5.channel.k8s.io"], &WEBSOCKET_VERSIONS),
            Some(Version::V5)
        );
        assert_eq!(Version::negotiate(["SPDY/3.1"], &SPDY_VERSIONS), None);
    }

    #[test]
    fn exit_codes_travel_as_kubelet_writes_them() {
        let status: serde_json::Value =
            serde_json::from_slice(&Outcome::ExitCode(3).status(Version::V4)).expect("json");
        assert_eq!(status["status"], "Failure");
        assert_eq!(status["reason"], "NonZeroExitCode");
        assert_eq!(status["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(status["details"]["causes"][0]["message"], "3");
        let ok: serde_json::Value =
            serde_json::from_slice(&Outcome::Success.status(Version::V5)).expect("json");
        assert_eq!(ok["status"], "Success");
        assert!(Outcome::Success.status(Version::V3).is_empty());
        let text = String::from_utf8(Outcome::ExitCode(3).status(Version::V2)).expect("utf8");
        assert!(text.contains("exit status 3"), "{text}");
        let error: serde_json::Value =
            serde_json::from_slice(&Outcome::Error("no such file".into()).status(Version::V4))
                .expect("json");
        assert_eq!(error["reason"], "InternalError");
        assert_eq!(error["code"], 500);
    }

    #[test]
    fn sizes_are_read_across_chunks() {
        let mut parser = ResizeParser::default();
        assert!(parser.feed(br#"{"Width":80,"#).is_empty());
        assert_eq!(
            parser.feed(b"\"Height\":24}\n{\"Width\":100,\"Height\":30}\n"),
            vec![
                Inbound::Resize {
                    width: 80,
                    height: 24
                },
                Inbound::Resize {
                    width: 100,
                    height: 30
                }
            ]
        );
        assert!(parser.feed(b"garbage").is_empty());
        assert_eq!(
            parser.feed(br#"{"Width":1,"Height":2}"#),
            vec![Inbound::Resize {
                width: 1,
                height: 2
            }]
        );
    }

    #[test]
    fn streams_are_complete_when_all_asked_for_are_open() {
        let streams = Streams {
            stdin: true,
            stdout: true,
            stderr: false,
            tty: true,
        };
        let mut ids = SpdyIds {
            error: Some(1),
            stdin: Some(3),
            stdout: Some(5),
            ..SpdyIds::default()
        };
        assert!(!ids.complete(streams, Version::V4), "resize missing");
        assert!(ids.complete(streams, Version::V2), "no resize before v3");
        ids.resize = Some(7);
        assert!(ids.complete(streams, Version::V4));
    }
}
