//! One SPDY/3.1 server connection on an upgraded HTTP connection: a reader
//! task that answers SYN_STREAM and PING itself and hands stream events to
//! the session, and a writer task that the session's frames go through.
//! There is no flow control: spdystream (the Kubernetes clients) has none.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::Activity;
use super::spdy::{self, Frame, FrameReader, FrameWriter, Headers};

/// Largest data frame sent.
const DATA_CHUNK: usize = 32 * 1024;
/// How long a closed connection waits for the peer to go.
const LINGER: Duration = Duration::from_secs(5);

/// What the peer did on a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StreamEvent {
    /// A new stream (already answered with SYN_REPLY).
    Opened {
        id: u32,
        headers: Headers,
    },
    Data {
        id: u32,
        data: Bytes,
    },
    /// The peer sends no more on this stream (FIN).
    Finished {
        id: u32,
    },
    /// The peer abandoned the stream (RST_STREAM).
    Reset {
        id: u32,
    },
}

/// The session's way to send; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct SpdySender {
    tx: mpsc::Sender<Command>,
}

/// The peer is gone; nothing more can be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Gone;

#[derive(Debug)]
enum Command {
    Frame(Frame),
    Data {
        id: u32,
        data: Bytes,
        fin: bool,
    },
    /// GOAWAY, then the end of our sending side.
    Close,
}

impl SpdySender {
    pub(crate) async fn data(&self, id: u32, data: Bytes) -> Result<(), Gone> {
        self.send(Command::Data {
            id,
            data,
            fin: false,
        })
        .await
    }

    /// Half-closes the stream: FIN, nothing more from us.
    pub(crate) async fn finish(&self, id: u32) -> Result<(), Gone> {
        self.send(Command::Data {
            id,
            data: Bytes::new(),
            fin: true,
        })
        .await
    }

    pub(crate) async fn reset(&self, id: u32, status: u32) -> Result<(), Gone> {
        self.send(Command::Frame(Frame::RstStream {
            stream_id: id,
            status,
        }))
        .await
    }

    async fn send(&self, command: Command) -> Result<(), Gone> {
        self.tx.send(command).await.map_err(|_| Gone)
    }
}

pub(crate) struct SpdyConnection {
    pub(crate) events: mpsc::Receiver<StreamEvent>,
    pub(crate) sender: SpdySender,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

impl SpdyConnection {
    /// Runs the connection on `io` (the upgraded HTTP connection). With no
    /// frame either way for `idle_timeout` the connection ends.
    pub(crate) fn start<IO>(io: IO, idle_timeout: Duration) -> SpdyConnection
    where
        IO: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (rd, wr) = tokio::io::split(io);
        let (event_tx, events) = mpsc::channel(64);
        let (tx, rx) = mpsc::channel(64);
        let activity = Arc::new(Activity::new());
        let last_stream = Arc::new(AtomicU32::new(0));
        let reader = tokio::spawn(read_loop(
            rd,
            event_tx,
            tx.clone(),
            activity.clone(),
            idle_timeout,
            last_stream.clone(),
        ));
        let writer = tokio::spawn(write_loop(wr, rx, activity, last_stream));
        SpdyConnection {
            events,
            sender: SpdySender { tx },
            reader,
            writer,
        }
    }

    /// Ends the connection: what was sent goes out, then GOAWAY and the end
    /// of our side; the peer gets a moment to read it all and go.
    pub(crate) async fn close(mut self) {
        let _ = self.sender.tx.send(Command::Close).await;
        drop(self.sender);
        let _ = (&mut self.writer).await;
        let drain = async { while self.events.recv().await.is_some() {} };
        let _ = tokio::time::timeout(LINGER, drain).await;
        self.reader.abort();
    }
}

async fn read_loop<R: AsyncRead>(
    rd: tokio::io::ReadHalf<R>,
    events: mpsc::Sender<StreamEvent>,
    out: mpsc::Sender<Command>,
    activity: Arc<Activity>,
    idle_timeout: Duration,
    last_stream: Arc<AtomicU32>,
) {
    let mut rd = rd;
    let mut reader = FrameReader::new();
    let mut buf = BytesMut::with_capacity(16 * 1024);
    loop {
        loop {
            let frame = match reader.decode(&mut buf) {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "bad SPDY frame; closing the connection");
                    let _ = out
                        .send(Command::Frame(Frame::GoAway {
                            last_good_stream_id: last_stream.load(Ordering::Relaxed),
                            status: spdy::goaway::PROTOCOL_ERROR,
                        }))
                        .await;
                    return;
                }
            };
            if !on_frame(frame, &events, &out, &last_stream).await {
                return;
            }
        }
        let wait = idle_timeout.saturating_sub(activity.idle_for());
        match tokio::time::timeout(wait, rd.read_buf(&mut buf)).await {
            Err(_) => {
                if activity.idle_for() >= idle_timeout {
                    tracing::debug!(?idle_timeout, "idle streaming connection closed");
                    return;
                }
            }
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(_)) => activity.touch(),
        }
    }
}

/// Handles one frame from the peer; false when the connection is over.
async fn on_frame(
    frame: Frame,
    events: &mpsc::Sender<StreamEvent>,
    out: &mpsc::Sender<Command>,
    last_stream: &AtomicU32,
) -> bool {
    // A session that has stopped listening is fine: its connection closes.
    let event = |e| async move {
        let _ = events.send(e).await;
    };
    match frame {
        Frame::SynStream {
            stream_id,
            flags,
            headers,
            ..
        } => {
            last_stream.fetch_max(stream_id, Ordering::Relaxed);
            let reply = Frame::SynReply {
                stream_id,
                flags: 0,
                headers: Headers::new(),
            };
            if out.send(Command::Frame(reply)).await.is_err() {
                return false;
            }
            event(StreamEvent::Opened {
                id: stream_id,
                headers,
            })
            .await;
            if flags & spdy::FLAG_FIN != 0 {
                event(StreamEvent::Finished { id: stream_id }).await;
            }
        }
        Frame::Data {
            stream_id,
            flags,
            data,
        } => {
            if !data.is_empty() {
                event(StreamEvent::Data {
                    id: stream_id,
                    data,
                })
                .await;
            }
            if flags & spdy::FLAG_FIN != 0 {
                event(StreamEvent::Finished { id: stream_id }).await;
            }
        }
        Frame::Headers {
            stream_id, flags, ..
        } => {
            if flags & spdy::FLAG_FIN != 0 {
                event(StreamEvent::Finished { id: stream_id }).await;
            }
        }
        Frame::RstStream { stream_id, .. } => event(StreamEvent::Reset { id: stream_id }).await,
        // Client pings have odd ids; we send none, so every ping is theirs.
        Frame::Ping { id } => {
            if out.send(Command::Frame(Frame::Ping { id })).await.is_err() {
                return false;
            }
        }
        Frame::GoAway { .. } => return false,
        Frame::SynReply { .. }
        | Frame::Settings { .. }
        | Frame::WindowUpdate { .. }
        | Frame::Unknown { .. } => {}
    }
    true
}

async fn write_loop<W: AsyncWrite>(
    wr: tokio::io::WriteHalf<W>,
    mut rx: mpsc::Receiver<Command>,
    activity: Arc<Activity>,
    last_stream: Arc<AtomicU32>,
) {
    let mut wr = wr;
    let mut writer = FrameWriter::new();
    let mut buf = BytesMut::with_capacity(DATA_CHUNK + 64);
    let mut closing = false;
    while let Some(command) = rx.recv().await {
        if encode(&mut writer, command, &mut buf, &last_stream) {
            closing = true;
        }
        // Whatever else is queued goes out in the same write.
        while !closing && buf.len() < 256 * 1024 {
            match rx.try_recv() {
                Ok(command) => closing = encode(&mut writer, command, &mut buf, &last_stream),
                Err(_) => break,
            }
        }
        if wr.write_all(&buf).await.is_err() {
            return;
        }
        buf.clear();
        activity.touch();
        if closing {
            break;
        }
    }
    if !closing {
        let _ = writer.encode(
            &Frame::GoAway {
                last_good_stream_id: last_stream.load(Ordering::Relaxed),
                status: spdy::goaway::OK,
            },
            &mut buf,
        );
        let _ = wr.write_all(&buf).await;
    }
    let _ = wr.shutdown().await;
}

/// Encodes one command into `buf`; true for Close.
fn encode(
    writer: &mut FrameWriter,
    command: Command,
    buf: &mut BytesMut,
    last_stream: &AtomicU32,
) -> bool {
    let result = match command {
        Command::Frame(frame) => writer.encode(&frame, buf),
        Command::Data { id, data, fin } => {
            if data.is_empty() {
                writer.encode(
                    &Frame::Data {
                        stream_id: id,
                        flags: if fin { spdy::FLAG_FIN } else { 0 },
                        data,
                    },
                    buf,
                )
            } else {
                let mut result = Ok(());
                let chunks = data.len().div_ceil(DATA_CHUNK);
                for (i, start) in (0..data.len()).step_by(DATA_CHUNK).enumerate() {
                    let end = (start + DATA_CHUNK).min(data.len());
                    let last = i + 1 == chunks;
                    result = writer.encode(
                        &Frame::Data {
                            stream_id: id,
                            flags: if fin && last { spdy::FLAG_FIN } else { 0 },
                            data: data.slice(start..end),
                        },
                        buf,
                    );
                    if result.is_err() {
                        break;
                    }
                }
                result
            }
        }
        Command::Close => {
            let result = writer.encode(
                &Frame::GoAway {
                    last_good_stream_id: last_stream.load(Ordering::Relaxed),
                    status: spdy::goaway::OK,
                },
                buf,
            );
            if let Err(e) = result {
                tracing::warn!(error = %e, "cannot encode GOAWAY");
            }
            return true;
        }
    };
    if let Err(e) = result {
        tracing::warn!(error = %e, "cannot encode a SPDY frame");
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client end: frames out, frames in.
    struct Peer {
        io: tokio::io::DuplexStream,
        writer: FrameWriter,
        reader: FrameReader,
        buf: BytesMut,
    }

    impl Peer {
        async fn send(&mut self, frame: Frame) {
            let mut out = BytesMut::new();
            self.writer.encode(&frame, &mut out).expect("encode");
            self.io.write_all(&out).await.expect("write");
        }

        async fn recv(&mut self) -> Option<Frame> {
            loop {
                if let Some(frame) = self.reader.decode(&mut self.buf).expect("decode") {
                    return Some(frame);
                }
                if self.io.read_buf(&mut self.buf).await.expect("read") == 0 {
                    return None;
                }
            }
        }
    }

    fn connect(idle: Duration) -> (SpdyConnection, Peer) {
        let (ours, theirs) = tokio::io::duplex(1 << 20);
        let conn = SpdyConnection::start(ours, idle);
        let peer = Peer {
            io: theirs,
            writer: FrameWriter::new(),
            reader: FrameReader::new(),
            buf: BytesMut::new(),
        };
        (conn, peer)
    }

    #[tokio::test]
    async fn streams_are_answered_and_data_flows_both_ways() {
        let (mut conn, mut peer) = connect(Duration::from_secs(30));
        peer.send(Frame::SynStream {
            stream_id: 1,
            associated_to: 0,
            priority: 0,
            flags: 0,
            headers: Headers::new().with("streamtype", "stdin"),
        })
        .await;
        assert!(matches!(
            peer.recv().await,
            Some(Frame::SynReply { stream_id: 1, .. })
        ));
        assert!(matches!(
            conn.events.recv().await,
            Some(StreamEvent::Opened { id: 1, headers }) if headers.get("streamtype") == Some("stdin")
        ));
        peer.send(Frame::Data {
            stream_id: 1,
            flags: spdy::FLAG_FIN,
            data: Bytes::from_static(b"in"),
        })
        .await;
        assert_eq!(
            conn.events.recv().await,
            Some(StreamEvent::Data {
                id: 1,
                data: Bytes::from_static(b"in")
            })
        );
        assert_eq!(
            conn.events.recv().await,
            Some(StreamEvent::Finished { id: 1 })
        );
        peer.send(Frame::Ping { id: 7 }).await;
        assert_eq!(peer.recv().await, Some(Frame::Ping { id: 7 }));
        let big = Bytes::from(vec![b'x'; DATA_CHUNK + 10]);
        conn.sender.data(1, big).await.expect("send");
        conn.sender.finish(1).await.expect("fin");
        let mut got = 0;
        loop {
            match peer.recv().await {
                Some(Frame::Data { data, flags, .. }) => {
                    got += data.len();
                    if flags & spdy::FLAG_FIN != 0 {
                        break;
                    }
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(got, DATA_CHUNK + 10);
        let closing = tokio::spawn(conn.close());
        assert!(matches!(peer.recv().await, Some(Frame::GoAway { .. })));
        assert_eq!(peer.recv().await, None, "our side ends after GOAWAY");
        drop(peer);
        closing.await.expect("close");
    }

    #[tokio::test]
    async fn a_bad_frame_ends_the_connection() {
        let (mut conn, mut peer) = connect(Duration::from_secs(30));
        peer.io
            .write_all(&[0x80, 0x02, 0x00, 0x06, 0, 0, 0, 4, 0, 0, 0, 1])
            .await
            .expect("write");
        assert!(matches!(
            peer.recv().await,
            Some(Frame::GoAway {
                status: spdy::goaway::PROTOCOL_ERROR,
                ..
            })
        ));
        assert_eq!(conn.events.recv().await, None);
    }

    #[tokio::test]
    async fn an_idle_connection_ends() {
        let (mut conn, _peer) = connect(Duration::from_millis(100));
        let ended = tokio::time::timeout(Duration::from_secs(5), conn.events.recv()).await;
        assert_eq!(ended, Ok(None));
    }
}
