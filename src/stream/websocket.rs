//! WebSocket (RFC 6455) as Kubernetes' streaming clients use it: the
//! handshake's accept key, frames in and out (client frames masked, no
//! extensions), fragmented messages, and a server connection that answers
//! pings and the closing handshake itself.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::Activity;

/// RFC 6455's key suffix.
const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// Largest message accepted (after reassembly).
pub const MAX_MESSAGE: usize = 16 * 1024 * 1024;
/// How long a closed connection waits for the peer's close.
const LINGER: Duration = Duration::from_secs(5);

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xa;

/// Close codes.
pub const CLOSE_NORMAL: u16 = 1000;
pub const CLOSE_PROTOCOL_ERROR: u16 = 1002;

/// The Sec-WebSocket-Accept value for a Sec-WebSocket-Key.
pub fn accept_key(key: &str) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key.trim().as_bytes());
    ctx.update(GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(ctx.finish().as_ref())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Binary(Bytes),
    Text(Bytes),
    /// With the status code, if any.
    Close(Option<u16>),
    Ping(Bytes),
    Pong(Bytes),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WsError {
    #[error("frame from the client is not masked")]
    Unmasked,
    #[error("reserved bits set (no extension was agreed)")]
    Reserved,
    #[error("unknown opcode {0:#x}")]
    Opcode(u8),
    #[error("control frame fragmented or longer than 125 bytes")]
    Control,
    #[error("continuation frame without a message to continue")]
    Continuation,
    #[error("new message before the last one was complete")]
    Interleaved,
    #[error("message larger than {MAX_MESSAGE} bytes")]
    TooLarge,
}

/// Decodes frames into messages, reassembling fragments.
#[derive(Debug, Default)]
pub struct Decoder {
    /// Client frames carry a mask (a server decodes); server frames do not.
    pub expect_masked: bool,
    partial: Option<(u8, BytesMut)>,
}

impl Decoder {
    /// A server's decoder: every frame must be masked.
    pub fn server() -> Decoder {
        Decoder {
            expect_masked: true,
            partial: None,
        }
    }

    /// A client's decoder: frames are not masked.
    pub fn client() -> Decoder {
        Decoder::default()
    }

    /// Takes frames off `buf` until a message is complete; None until then.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Message>, WsError> {
        loop {
            let Some((fin, opcode, payload)) = self.frame(buf)? else {
                return Ok(None);
            };
            match opcode {
                OP_CLOSE | OP_PING | OP_PONG => {
                    if !fin || payload.len() > 125 {
                        return Err(WsError::Control);
                    }
                    return Ok(Some(match opcode {
                        OP_PING => Message::Ping(payload),
                        OP_PONG => Message::Pong(payload),
                        _ => Message::Close(
                            (payload.len() >= 2)
                                .then(|| u16::from_be_bytes([payload[0], payload[1]])),
                        ),
                    }));
                }
                OP_TEXT | OP_BINARY => {
                    if self.partial.is_some() {
                        return Err(WsError::Interleaved);
                    }
                    if fin {
                        return Ok(Some(message(opcode, payload)));
                    }
                    self.partial = Some((opcode, BytesMut::from(&payload[..])));
                }
                OP_CONTINUATION => {
                    let Some((first, mut data)) = self.partial.take() else {
                        return Err(WsError::Continuation);
                    };
                    if data.len() + payload.len() > MAX_MESSAGE {
                        return Err(WsError::TooLarge);
                    }
                    data.put_slice(&payload);
                    if fin {
                        return Ok(Some(message(first, data.freeze())));
                    }
                    self.partial = Some((first, data));
                }
                other => return Err(WsError::Opcode(other)),
            }
        }
    }

    /// One frame: (fin, opcode, unmasked payload).
    fn frame(&self, buf: &mut BytesMut) -> Result<Option<(bool, u8, Bytes)>, WsError> {
        let Some(&[b0, b1]) = buf.first_chunk::<2>() else {
            return Ok(None);
        };
        if b0 & 0x70 != 0 {
            return Err(WsError::Reserved);
        }
        let masked = b1 & 0x80 != 0;
        if self.expect_masked && !masked {
            return Err(WsError::Unmasked);
        }
        let (len, mut at) = match b1 & 0x7f {
            126 => {
                let Some(b) = buf.get(2..4) else {
                    return Ok(None);
                };
                (u64::from(u16::from_be_bytes([b[0], b[1]])), 4)
            }
            127 => {
                let Some(b) = buf.get(2..10) else {
                    return Ok(None);
                };
                let mut n = [0u8; 8];
                n.copy_from_slice(b);
                (u64::from_be_bytes(n), 10)
            }
            n => (u64::from(n), 2),
        };
        if len > MAX_MESSAGE as u64 {
            return Err(WsError::TooLarge);
        }
        let len = len as usize;
        let mask = if masked {
            let Some(m) = buf.get(at..at + 4) else {
                return Ok(None);
            };
            let mask = [m[0], m[1], m[2], m[3]];
            at += 4;
            Some(mask)
        } else {
            None
        };
        if buf.len() < at + len {
            buf.reserve(at + len - buf.len());
            return Ok(None);
        }
        buf.advance(at);
        let mut payload = buf.split_to(len);
        if let Some(mask) = mask {
            apply_mask(&mut payload, mask);
        }
        Ok(Some((b0 & 0x80 != 0, b0 & 0x0f, payload.freeze())))
    }
}

fn message(opcode: u8, data: Bytes) -> Message {
    if opcode == OP_TEXT {
        Message::Text(data)
    } else {
        Message::Binary(data)
    }
}

fn apply_mask(data: &mut [u8], mask: [u8; 4]) {
    for (i, byte) in data.iter_mut().enumerate() {
        *byte ^= mask[i % 4];
    }
}

/// Appends `message` as one frame; with `mask` (a client's) the payload is masked.
pub fn encode(message: &Message, mask: Option<[u8; 4]>, out: &mut BytesMut) {
    let close;
    let (opcode, payload): (u8, &[u8]) = match message {
        Message::Binary(d) => (OP_BINARY, d),
        Message::Text(d) => (OP_TEXT, d),
        Message::Ping(d) => (OP_PING, d),
        Message::Pong(d) => (OP_PONG, d),
        Message::Close(code) => {
            close = code.map(u16::to_be_bytes);
            (OP_CLOSE, close.as_ref().map_or(&[][..], |c| &c[..]))
        }
    };
    out.put_u8(0x80 | opcode);
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.put_u8(mask_bit | n as u8),
        n if n <= usize::from(u16::MAX) => {
            out.put_u8(mask_bit | 126);
            out.put_u16(n as u16);
        }
        n => {
            out.put_u8(mask_bit | 127);
            out.put_u64(n as u64);
        }
    }
    match mask {
        Some(mask) => {
            out.put_slice(&mask);
            let start = out.len();
            out.put_slice(payload);
            apply_mask(&mut out[start..], mask);
        }
        None => out.put_slice(payload),
    }
}

/// How the channel protocols (`channel.k8s.io` and `base64.channel.k8s.io`,
/// in all their versions) put a channel number and its data in a message:
/// the number as a byte then the raw data in a binary message, or the number
/// as an ASCII digit then the data in base64 in a text message (for clients,
/// such as browsers, that handle text better).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelCodec {
    Binary,
    Base64,
}

/// A data message that carries nothing for a channel.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    #[error("message without a channel number")]
    Empty,
    #[error("channel data is not base64")]
    Base64,
}

impl ChannelCodec {
    /// `data` for `channel`, as one message.
    pub fn frame(self, channel: u8, data: &[u8]) -> Message {
        match self {
            ChannelCodec::Binary => {
                let mut message = Vec::with_capacity(1 + data.len());
                message.push(channel);
                message.extend_from_slice(data);
                Message::Binary(Bytes::from(message))
            }
            ChannelCodec::Base64 => {
                let encoded = base64::engine::general_purpose::STANDARD.encode(data);
                let mut message = Vec::with_capacity(1 + encoded.len());
                message.push(b'0'.wrapping_add(channel));
                message.extend_from_slice(encoded.as_bytes());
                Message::Text(Bytes::from(message))
            }
        }
    }

    /// The channel and data of a binary or text message (kubelet takes
    /// either kind in both codecs).
    pub fn unframe(self, data: &Bytes) -> Result<(u8, Bytes), ChannelError> {
        let Some(&first) = data.first() else {
            return Err(ChannelError::Empty);
        };
        match self {
            ChannelCodec::Binary => Ok((first, data.slice(1..))),
            ChannelCodec::Base64 => base64::engine::general_purpose::STANDARD
                .decode(&data[1..])
                .map(|decoded| (first.wrapping_sub(b'0'), Bytes::from(decoded)))
                .map_err(|_| ChannelError::Base64),
        }
    }
}

/// The session's way to send; cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct WsSender {
    tx: mpsc::Sender<Message>,
}

/// The peer is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Gone;

impl WsSender {
    pub(crate) async fn binary(&self, data: Bytes) -> Result<(), Gone> {
        self.send(Message::Binary(data)).await
    }

    pub(crate) async fn send(&self, message: Message) -> Result<(), Gone> {
        self.tx.send(message).await.map_err(|_| Gone)
    }
}

/// A server connection: data messages in, messages out; pings and the
/// closing handshake are handled here.
pub(crate) struct WsConnection {
    /// Binary and text messages; the channel ends when the peer does.
    pub(crate) messages: mpsc::Receiver<Message>,
    pub(crate) sender: WsSender,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
}

impl WsConnection {
    pub(crate) fn start<IO>(io: IO, idle_timeout: Duration) -> WsConnection
    where
        IO: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (rd, wr) = tokio::io::split(io);
        let (msg_tx, messages) = mpsc::channel(64);
        let (tx, rx) = mpsc::channel(64);
        let activity = Arc::new(Activity::new());
        let reader = tokio::spawn(read_loop(
            rd,
            msg_tx,
            tx.clone(),
            activity.clone(),
            idle_timeout,
        ));
        let writer = tokio::spawn(write_loop(wr, rx, activity));
        WsConnection {
            messages,
            sender: WsSender { tx },
            reader,
            writer,
        }
    }

    /// Sends what is queued, then a normal close; waits a moment for the
    /// peer's close before the connection goes.
    pub(crate) async fn close(mut self) {
        let _ = self
            .sender
            .tx
            .send(Message::Close(Some(CLOSE_NORMAL)))
            .await;
        drop(self.sender);
        let _ = (&mut self.writer).await;
        let drain = async { while self.messages.recv().await.is_some() {} };
        let _ = tokio::time::timeout(LINGER, drain).await;
        self.reader.abort();
    }
}

async fn read_loop<R: AsyncRead>(
    rd: tokio::io::ReadHalf<R>,
    messages: mpsc::Sender<Message>,
    out: mpsc::Sender<Message>,
    activity: Arc<Activity>,
    idle_timeout: Duration,
) {
    let mut rd = rd;
    let mut decoder = Decoder::server();
    let mut buf = BytesMut::with_capacity(16 * 1024);
    loop {
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(Message::Ping(data))) => {
                    let _ = out.send(Message::Pong(data)).await;
                }
                Ok(Some(Message::Pong(_))) => {}
                Ok(Some(Message::Close(_))) => {
                    // Our close answers theirs; one already sent makes this a no-op.
                    let _ = out.send(Message::Close(Some(CLOSE_NORMAL))).await;
                    return;
                }
                Ok(Some(message)) => {
                    let _ = messages.send(message).await;
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "bad WebSocket frame; closing the connection");
                    let _ = out.send(Message::Close(Some(CLOSE_PROTOCOL_ERROR))).await;
                    return;
                }
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

async fn write_loop<W: AsyncWrite>(
    wr: tokio::io::WriteHalf<W>,
    mut rx: mpsc::Receiver<Message>,
    activity: Arc<Activity>,
) {
    let mut wr = wr;
    let mut buf = BytesMut::with_capacity(64 * 1024);
    while let Some(message) = rx.recv().await {
        let closing = matches!(message, Message::Close(_));
        encode(&message, None, &mut buf);
        if wr.write_all(&buf).await.is_err() {
            return;
        }
        buf.clear();
        activity.touch();
        if closing {
            break;
        }
    }
    let _ = wr.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_accept_key_is_rfc_6455s() {
        // The example of RFC 6455, section 1.3.
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn masked_frames_of_every_size_round_trip() {
        for len in [0usize, 5, 125, 126, 65535, 65536, 70000] {
            let data = Bytes::from(vec![7u8; len]);
            let mut wire = BytesMut::new();
            encode(
                &Message::Binary(data.clone()),
                Some([1, 2, 3, 4]),
                &mut wire,
            );
            let got = Decoder::server().decode(&mut wire).expect("decode");
            assert_eq!(got, Some(Message::Binary(data)), "length {len}");
            assert!(wire.is_empty());
        }
    }

    #[test]
    fn fragments_are_joined_around_control_frames() {
        // RFC 6455 5.6: "Hel" + ping + "lo", the client's masked frames.
        let mut wire = BytesMut::new();
        let mask = Some([9, 8, 7, 6]);
        let mut first = BytesMut::new();
        encode(&Message::Text(Bytes::from_static(b"Hel")), mask, &mut first);
        first[0] &= 0x7f; // not final
        wire.put_slice(&first);
        encode(&Message::Ping(Bytes::from_static(b"p")), mask, &mut wire);
        let mut last = BytesMut::new();
        encode(&Message::Text(Bytes::from_static(b"lo")), mask, &mut last);
        last[0] = 0x80 | OP_CONTINUATION;
        wire.put_slice(&last);
        let mut decoder = Decoder::server();
        assert_eq!(
            decoder.decode(&mut wire),
            Ok(Some(Message::Ping(Bytes::from_static(b"p"))))
        );
        assert_eq!(
            decoder.decode(&mut wire),
            Ok(Some(Message::Text(Bytes::from_static(b"Hello"))))
        );
    }

    #[test]
    fn channels_travel_raw_or_in_base64_text() {
        let binary = ChannelCodec::Binary.frame(3, b"hi");
        assert_eq!(binary, Message::Binary(Bytes::from_static(b"\x03hi")));
        let text = ChannelCodec::Base64.frame(3, b"hi");
        assert_eq!(text, Message::Text(Bytes::from_static(b"3aGk=")));
        for (codec, message) in [(ChannelCodec::Binary, binary), (ChannelCodec::Base64, text)] {
            let (Message::Binary(data) | Message::Text(data)) = message else {
                unreachable!("a data message");
            };
            assert_eq!(codec.unframe(&data), Ok((3, Bytes::from_static(b"hi"))));
        }
        assert_eq!(
            ChannelCodec::Base64.unframe(&Bytes::from_static(b"0!!")),
            Err(ChannelError::Base64)
        );
        assert_eq!(
            ChannelCodec::Binary.unframe(&Bytes::new()),
            Err(ChannelError::Empty)
        );
    }

    #[test]
    fn bad_frames_are_refused() {
        let decode = |bytes: &[u8]| Decoder::server().decode(&mut BytesMut::from(bytes));
        // Unmasked binary frame from a client.
        assert_eq!(decode(&[0x82, 0x01, b'x']), Err(WsError::Unmasked));
        // RSV1 set.
        assert_eq!(decode(&[0xc2, 0x80, 0, 0, 0, 0]), Err(WsError::Reserved));
        // Opcode 3 is reserved.
        assert_eq!(decode(&[0x83, 0x80, 0, 0, 0, 0]), Err(WsError::Opcode(3)));
        // A fragmented ping.
        assert_eq!(decode(&[0x09, 0x80, 0, 0, 0, 0]), Err(WsError::Control));
        // A continuation of nothing.
        assert_eq!(
            decode(&[0x80, 0x80, 0, 0, 0, 0]),
            Err(WsError::Continuation)
        );
        // A message announcing more than the limit.
        assert_eq!(
            decode(&[0x82, 0xff, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0, 0]),
            Err(WsError::TooLarge)
        );
        // Incomplete: wait.
        assert_eq!(decode(&[0x82, 0x85, 1, 2]), Ok(None));
    }

    #[tokio::test]
    async fn pings_and_closes_are_answered() {
        let (ours, mut theirs) = tokio::io::duplex(1 << 16);
        let mut conn = WsConnection::start(ours, Duration::from_secs(30));
        let mask = Some([1, 1, 1, 1]);
        let mut wire = BytesMut::new();
        encode(&Message::Ping(Bytes::from_static(b"hb")), mask, &mut wire);
        encode(
            &Message::Binary(Bytes::from_static(b"\x00in")),
            mask,
            &mut wire,
        );
        encode(&Message::Close(Some(CLOSE_NORMAL)), mask, &mut wire);
        theirs.write_all(&wire).await.expect("write");
        assert_eq!(
            conn.messages.recv().await,
            Some(Message::Binary(Bytes::from_static(b"\x00in")))
        );
        assert_eq!(conn.messages.recv().await, None, "closed by the peer");
        let mut decoder = Decoder::client();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        while got.len() < 2 {
            if let Some(m) = decoder.decode(&mut buf).expect("decode") {
                got.push(m);
                continue;
            }
            assert!(theirs.read_buf(&mut buf).await.expect("read") > 0);
        }
        assert_eq!(
            got,
            vec![
                Message::Pong(Bytes::from_static(b"hb")),
                Message::Close(Some(CLOSE_NORMAL))
            ]
        );
        conn.close().await;
    }
}
