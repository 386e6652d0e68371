//! Minimal streaming clients for the tests, speaking what kubelet and crictl
//! speak: an HTTP/1.1 upgrade, then SPDY/3.1 (remotecommand v4 or
//! portforward.k8s.io) or WebSocket (remotecommand v5). Frames come from
//! berth's own codecs; the protocol logic is written here from the client's
//! side.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use berth::stream::spdy::{self, Frame, FrameReader, FrameWriter, Headers};
use berth::stream::websocket::{self, Decoder, Message};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest a streaming test waits for anything.
pub const STREAM_TIMEOUT: Duration = Duration::from_secs(30);

/// The answer to an upgrade request that was refused.
#[derive(Debug)]
pub struct Refused {
    pub status: u16,
    pub body: String,
}

/// Sends an upgrade request for `url` with `headers`; returns the open
/// connection, the response headers (lowercase names) and the bytes already
/// read after them.
pub async fn upgrade(
    url: &str,
    method: &str,
    headers: &[(&str, &str)],
) -> Result<(TcpStream, HashMap<String, String>, BytesMut), Refused> {
    let rest = url.strip_prefix("http://").expect("http URL");
    let (host, path) = rest.split_once('/').expect("path in URL");
    let mut stream = TcpStream::connect(host)
        .await
        .expect("connect to the stream server");
    let mut request = format!("{method} /{path} HTTP/1.1\r\nHost: {host}\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("Content-Length: 0\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("send request");
    let mut buf = BytesMut::new();
    let end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        let n = tokio::time::timeout(STREAM_TIMEOUT, stream.read_buf(&mut buf))
            .await
            .expect("response in time")
            .expect("read response");
        assert!(n > 0, "connection closed before the response");
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let _ = buf.split_to(end + 4);
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let response_headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    if status != 101 {
        let mut body = String::from_utf8_lossy(&buf).into_owned();
        if let Ok(Ok(_)) =
            tokio::time::timeout(Duration::from_millis(500), stream.read_to_string(&mut body)).await
        {
        }
        return Err(Refused { status, body });
    }
    Ok((stream, response_headers, buf))
}

/// What a SPDY client's bytes travel on.
enum Transport {
    Tcp(TcpStream),
    /// Binary messages of a WebSocket (`SPDY/3.1+portforward.k8s.io`).
    Tunnel(Box<WsClient>),
}

/// A SPDY client connection.
pub struct SpdyClient {
    transport: Transport,
    reader: FrameReader,
    writer: FrameWriter,
    buf: BytesMut,
    next_id: u32,
    /// The negotiated X-Stream-Protocol-Version.
    pub protocol: String,
}

impl SpdyClient {
    pub async fn connect(url: &str, protocols: &[&str]) -> Result<SpdyClient, Refused> {
        let offer = protocols.join(", ");
        let (stream, headers, buf) = upgrade(
            url,
            "POST",
            &[
                ("Connection", "Upgrade"),
                ("Upgrade", "SPDY/3.1"),
                ("X-Stream-Protocol-Version", &offer),
            ],
        )
        .await?;
        assert_eq!(headers.get("upgrade").map(String::as_str), Some("SPDY/3.1"));
        Ok(SpdyClient {
            transport: Transport::Tcp(stream),
            reader: FrameReader::new(),
            writer: FrameWriter::new(),
            buf,
            next_id: 1,
            protocol: headers
                .get("x-stream-protocol-version")
                .cloned()
                .unwrap_or_default(),
        })
    }

    /// A port-forward connection tunneled in WebSocket, as `crictl
    /// port-forward --transport websocket` makes it.
    pub async fn tunnel(url: &str) -> Result<SpdyClient, Refused> {
        let ws = WsClient::connect(url, &["SPDY/3.1+portforward.k8s.io"]).await?;
        assert_eq!(ws.protocol, "SPDY/3.1+portforward.k8s.io");
        Ok(SpdyClient {
            transport: Transport::Tunnel(Box::new(ws)),
            reader: FrameReader::new(),
            writer: FrameWriter::new(),
            buf: BytesMut::new(),
            next_id: 1,
            protocol: "portforward.k8s.io".to_string(),
        })
    }

    pub async fn send(&mut self, frame: Frame) {
        let mut out = BytesMut::new();
        self.writer.encode(&frame, &mut out).expect("encode");
        match &mut self.transport {
            Transport::Tcp(stream) => stream.write_all(&out).await.expect("send frame"),
            Transport::Tunnel(ws) => ws.send(Message::Binary(out.freeze())).await,
        }
    }

    /// Opens a stream with these headers; returns its id.
    pub async fn open(&mut self, headers: &[(&str, &str)]) -> u32 {
        let id = self.next_id;
        self.next_id += 2;
        let headers = headers
            .iter()
            .fold(Headers::new(), |h, (n, v)| h.with(n, v));
        self.send(Frame::SynStream {
            stream_id: id,
            associated_to: 0,
            priority: 0,
            flags: 0,
            headers,
        })
        .await;
        id
    }

    pub async fn data(&mut self, id: u32, data: &[u8], fin: bool) {
        self.send(Frame::Data {
            stream_id: id,
            flags: if fin { spdy::FLAG_FIN } else { 0 },
            data: Bytes::copy_from_slice(data),
        })
        .await;
    }

    /// The next frame; None when the server closed the connection.
    pub async fn next(&mut self) -> Option<Frame> {
        loop {
            if let Some(frame) = self.reader.decode(&mut self.buf).expect("valid frame") {
                return Some(frame);
            }
            match &mut self.transport {
                Transport::Tcp(stream) => {
                    let n = tokio::time::timeout(STREAM_TIMEOUT, stream.read_buf(&mut self.buf))
                        .await
                        .expect("frame in time")
                        .ok()?;
                    if n == 0 {
                        return None;
                    }
                }
                Transport::Tunnel(ws) => match ws.next().await? {
                    Message::Binary(data) => self.buf.extend_from_slice(&data),
                    Message::Close(_) => return None,
                    _ => {}
                },
            }
        }
    }
}

/// What a remote command (exec or attach) gave back.
#[derive(Debug, Default)]
pub struct CommandResult {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// The error channel: a JSON Status (v4, v5), empty or text before.
    pub error: Vec<u8>,
    /// When the last bytes of the error channel arrived (the exit status);
    /// the end of an exec round trip (the benchmark times to it).
    pub error_at: Option<Instant>,
}

impl CommandResult {
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    pub fn status(&self) -> serde_json::Value {
        serde_json::from_slice(&self.error).unwrap_or_else(|e| {
            panic!(
                "error channel is no JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.error)
            )
        })
    }

    /// The exit code the status carries (0 on Success).
    pub fn exit_code(&self) -> i32 {
        let status = self.status();
        if status["status"] == "Success" {
            return 0;
        }
        assert_eq!(status["reason"], "NonZeroExitCode", "{status}");
        status["details"]["causes"][0]["message"]
            .as_str()
            .and_then(|m| m.parse().ok())
            .unwrap_or_else(|| panic!("no exit code in {status}"))
    }
}

/// What a test client sends in a remote command.
#[derive(Debug, Clone, Default)]
pub struct CommandInput {
    pub stdin: Option<Vec<u8>>,
    /// Half-close stdin after sending it.
    pub close_stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
    /// Sent on the resize channel before any input.
    pub size: Option<(u16, u16)>,
}

/// Runs a remotecommand session over SPDY (v4) as client-go does: error,
/// stdin, stdout, stderr and resize streams, input, then everything until
/// the server ends stdout, stderr and the error stream.
pub async fn spdy_command(url: &str, input: &CommandInput) -> CommandResult {
    let mut client = SpdyClient::connect(url, &["v4.channel.k8s.io", "v3.channel.k8s.io"])
        .await
        .expect("SPDY upgrade");
    assert_eq!(client.protocol, "v4.channel.k8s.io");
    let error = client.open(&[("streamType", "error")]).await;
    let stdin = match input.stdin {
        Some(_) => Some(client.open(&[("streamType", "stdin")]).await),
        None => None,
    };
    let stdout = match input.stdout {
        true => Some(client.open(&[("streamType", "stdout")]).await),
        false => None,
    };
    let stderr = match input.stderr && !input.tty {
        true => Some(client.open(&[("streamType", "stderr")]).await),
        false => None,
    };
    let resize = match input.tty {
        true => Some(client.open(&[("streamType", "resize")]).await),
        false => None,
    };
    if let (Some(id), Some((width, height))) = (resize, input.size) {
        let size = format!("{{\"Width\":{width},\"Height\":{height}}}\n");
        client.data(id, size.as_bytes(), false).await;
    }
    if let (Some(id), Some(data)) = (stdin, &input.stdin) {
        client.data(id, data, input.close_stdin).await;
    }
    let mut result = CommandResult::default();
    let mut open: Vec<u32> = [Some(error), stdout, stderr]
        .into_iter()
        .flatten()
        .collect();
    while !open.is_empty() {
        match client.next().await {
            Some(Frame::Data {
                stream_id,
                flags,
                data,
            }) => {
                if Some(stream_id) == stdout {
                    result.stdout.extend_from_slice(&data);
                } else if Some(stream_id) == stderr {
                    result.stderr.extend_from_slice(&data);
                } else if stream_id == error && !data.is_empty() {
                    result.error.extend_from_slice(&data);
                    result.error_at = Some(Instant::now());
                }
                if flags & spdy::FLAG_FIN != 0 {
                    open.retain(|&id| id != stream_id);
                }
            }
            // A reset ends a stream as client-go reads it: containerd's
            // (kubelet's) stream server resets every stream when it closes
            // the connection after the exit status.
            Some(Frame::RstStream { stream_id, .. }) => open.retain(|&id| id != stream_id),
            Some(
                Frame::SynReply { .. }
                | Frame::Ping { .. }
                | Frame::GoAway { .. }
                | Frame::Settings { .. }
                | Frame::WindowUpdate { .. },
            ) => {}
            Some(other) => panic!("unexpected frame {other:?}"),
            None => break,
        }
    }
    result
}

/// A WebSocket client connection (frames masked, as clients must).
pub struct WsClient {
    stream: TcpStream,
    decoder: Decoder,
    buf: BytesMut,
    pub protocol: String,
}

impl WsClient {
    pub async fn connect(url: &str, protocols: &[&str]) -> Result<WsClient, Refused> {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let offer = protocols.join(", ");
        let (stream, headers, buf) = upgrade(
            url,
            "GET",
            &[
                ("Connection", "Upgrade"),
                ("Upgrade", "websocket"),
                ("Sec-WebSocket-Version", "13"),
                ("Sec-WebSocket-Key", key),
                ("Sec-WebSocket-Protocol", &offer),
            ],
        )
        .await?;
        assert_eq!(
            headers.get("sec-websocket-accept").map(String::as_str),
            Some(websocket::accept_key(key).as_str())
        );
        Ok(WsClient {
            stream,
            decoder: Decoder::client(),
            buf,
            protocol: headers
                .get("sec-websocket-protocol")
                .cloned()
                .unwrap_or_default(),
        })
    }

    pub async fn send(&mut self, message: Message) {
        let mut out = BytesMut::new();
        websocket::encode(&message, Some([0x12, 0x34, 0x56, 0x78]), &mut out);
        self.stream.write_all(&out).await.expect("send message");
    }

    /// The next message; None when the connection ended.
    pub async fn next(&mut self) -> Option<Message> {
        loop {
            if let Some(m) = self.decoder.decode(&mut self.buf).expect("valid frame") {
                return Some(m);
            }
            let n = tokio::time::timeout(STREAM_TIMEOUT, self.stream.read_buf(&mut self.buf))
                .await
                .expect("message in time")
                .ok()?;
            if n == 0 {
                return None;
            }
        }
    }
}

/// Runs a remotecommand session over WebSocket (v5): input on channel 0
/// (closed with the v5 close signal), output on 1 and 2, the status on 3,
/// until the server closes.
pub async fn websocket_command(url: &str, input: &CommandInput) -> CommandResult {
    let mut client = WsClient::connect(url, &["v5.channel.k8s.io", "v4.channel.k8s.io"])
        .await
        .expect("WebSocket upgrade");
    assert_eq!(client.protocol, "v5.channel.k8s.io");
    if let Some((width, height)) = input.size {
        let mut message = vec![4u8];
        message.extend_from_slice(format!("{{\"Width\":{width},\"Height\":{height}}}").as_bytes());
        client.send(Message::Binary(message.into())).await;
    }
    if let Some(data) = &input.stdin {
        let mut message = vec![0u8];
        message.extend_from_slice(data);
        client.send(Message::Binary(message.into())).await;
        if input.close_stdin {
            client
                .send(Message::Binary(Bytes::from_static(&[255, 0])))
                .await;
        }
    }
    let mut result = CommandResult::default();
    loop {
        match client.next().await {
            Some(Message::Binary(data)) => match data.first() {
                Some(1) => result.stdout.extend_from_slice(&data[1..]),
                Some(2) => result.stderr.extend_from_slice(&data[1..]),
                Some(3) => {
                    result.error.extend_from_slice(&data[1..]);
                    result.error_at = Some(Instant::now());
                }
                _ => {}
            },
            Some(Message::Close(code)) => {
                assert_eq!(code, Some(websocket::CLOSE_NORMAL));
                client.send(Message::Close(code)).await;
                break;
            }
            Some(_) => {}
            None => break,
        }
    }
    result
}
