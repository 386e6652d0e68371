//! SPDY/3.1 framing as Kubernetes' streaming clients speak it (moby/spdystream):
//! control and data frames, and the header blocks, zlib-compressed with one
//! compression context per direction primed with the SPDY/3 dictionary.
//! Pure and synchronous: [`FrameReader`] turns bytes into frames, [`FrameWriter`]
//! frames into bytes; the connection around them is in `spdy_conn`.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};

/// The only SPDY version spoken.
pub const VERSION: u16 = 3;
/// FLAG_FIN of data frames and of SYN_STREAM, SYN_REPLY and HEADERS.
pub const FLAG_FIN: u8 = 0x01;
/// FLAG_UNIDIRECTIONAL of SYN_STREAM.
pub const FLAG_UNIDIRECTIONAL: u8 = 0x02;
/// Largest payload of one frame (a 24-bit length).
pub const MAX_PAYLOAD: usize = (1 << 24) - 1;
/// Largest header block accepted once decompressed.
const MAX_HEADER_BLOCK: usize = 256 * 1024;
const CONTROL_BIT: u32 = 0x8000_0000;
const STREAM_ID_MASK: u32 = 0x7fff_ffff;

/// Control frame types.
const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const SETTINGS: u16 = 4;
const PING: u16 = 6;
const GOAWAY: u16 = 7;
const HEADERS: u16 = 8;
const WINDOW_UPDATE: u16 = 9;

/// RST_STREAM status codes.
pub mod rst {
    pub const PROTOCOL_ERROR: u32 = 1;
    pub const INVALID_STREAM: u32 = 2;
    pub const REFUSED_STREAM: u32 = 3;
    pub const CANCEL: u32 = 5;
    pub const INTERNAL_ERROR: u32 = 6;
}

/// GOAWAY status codes.
pub mod goaway {
    pub const OK: u32 = 0;
    pub const PROTOCOL_ERROR: u32 = 1;
    pub const INTERNAL_ERROR: u32 = 2;
}

/// Adler-32 of [`HEADER_DICTIONARY`], the id a zlib stream names it by.
const DICTIONARY_ID: u32 = 0xe3c6_a7c2;

/// The zlib dictionary of SPDY/3 header blocks (draft-mbelshe-httpbis-spdy-00, 2.6.10.1).
pub(crate) const HEADER_DICTIONARY: &[u8] = b"\
    \x00\x00\x00\x07options\x00\x00\x00\x04head\x00\x00\x00\x04post\x00\x00\x00\x03put\x00\
    \x00\x00\x06delete\x00\x00\x00\x05trace\x00\x00\x00\x06accept\x00\x00\x00\x0eaccept-char\
    set\x00\x00\x00\x0faccept-encoding\x00\x00\x00\x0faccept-language\x00\x00\x00\x0daccept-\
    ranges\x00\x00\x00\x03age\x00\x00\x00\x05allow\x00\x00\x00\x0dauthorization\x00\x00\x00\
    \x0dcache-control\x00\x00\x00\x0aconnection\x00\x00\x00\x0ccontent-base\x00\x00\x00\x10\
    content-encoding\x00\x00\x00\x10content-language\x00\x00\x00\x0econtent-length\x00\x00\
    \x00\x10content-location\x00\x00\x00\x0bcontent-md5\x00\x00\x00\x0dcontent-range\x00\x00\
    \x00\x0ccontent-type\x00\x00\x00\x04date\x00\x00\x00\x04etag\x00\x00\x00\x06expect\x00\
    \x00\x00\x07expires\x00\x00\x00\x04from\x00\x00\x00\x04host\x00\x00\x00\x08if-match\x00\
    \x00\x00\x11if-modified-since\x00\x00\x00\x0dif-none-match\x00\x00\x00\x08if-range\x00\
    \x00\x00\x13if-unmodified-since\x00\x00\x00\x0dlast-modified\x00\x00\x00\x08location\x00\
    \x00\x00\x0cmax-forwards\x00\x00\x00\x06pragma\x00\x00\x00\x12proxy-authenticate\x00\x00\
    \x00\x13proxy-authorization\x00\x00\x00\x05range\x00\x00\x00\x07referer\x00\x00\x00\x0b\
    retry-after\x00\x00\x00\x06server\x00\x00\x00\x02te\x00\x00\x00\x07trailer\x00\x00\x00\
    \x11transfer-encoding\x00\x00\x00\x07upgrade\x00\x00\x00\x0auser-agent\x00\x00\x00\x04va\
    ry\x00\x00\x00\x03via\x00\x00\x00\x07warning\x00\x00\x00\x10www-authenticate\x00\x00\x00\
    \x06method\x00\x00\x00\x03get\x00\x00\x00\x06status\x00\x00\x00\x06200\x20OK\x00\x00\x00\
    \x07version\x00\x00\x00\x08HTTP/1.1\x00\x00\x00\x03url\x00\x00\x00\x06public\x00\x00\x00\
    \x0aset-cookie\x00\x00\x00\x0akeep-alive\x00\x00\x00\x06origin100101201202205206300302\
    303304305306307402405406407408409410411412413414415416417502504505203\x20Non-Authoritati\
    ve\x20Information204\x20No\x20Content301\x20Moved\x20Permanently400\x20Bad\x20Request401\
    \x20Unauthorized403\x20Forbidden404\x20Not\x20Found500\x20Internal\x20Server\x20Error501\
    \x20Not\x20Implemented503\x20Service\x20UnavailableJan\x20Feb\x20Mar\x20Apr\x20May\x20Ju\
    n\x20Jul\x20Aug\x20Sept\x20Oct\x20Nov\x20Dec\x2000:00:00\x20Mon,\x20Tue,\x20Wed,\x20Thu,\
    \x20Fri,\x20Sat,\x20Sun,\x20GMTchunked,text/html,image/png,image/jpg,image/gif,applicatio\
    n/xml,application/xhtml+xml,text/plain,text/javascript,publicprivatemax-age=gzip,deflat\
    e,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0.";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpdyError {
    #[error("unsupported SPDY version {0}")]
    Version(u16),
    #[error("{kind} frame with a {len}-byte payload is malformed")]
    Length { kind: &'static str, len: usize },
    #[error("{0} frame on stream 0")]
    ZeroStream(&'static str),
    #[error("RST_STREAM with status 0")]
    RstStatus,
    #[error("PING with flags {0:#x}")]
    PingFlags(u8),
    #[error("header block: {0}")]
    HeaderBlock(String),
    #[error("payload of {0} bytes does not fit a frame")]
    TooLarge(usize),
}

/// The name/value pairs of a header block. Names are lowercase; a value
/// holding several values separates them with NUL, as SPDY/3 does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers(Vec<(String, String)>);

impl Headers {
    pub fn new() -> Headers {
        Headers::default()
    }

    /// Adds a header; the name is lowercased.
    pub fn with(mut self, name: &str, value: &str) -> Headers {
        self.0.push((name.to_ascii_lowercase(), value.to_string()));
        self
    }

    /// The first value of `name` (case-insensitive).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.split('\0').next().unwrap_or_default())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }
}

/// One SETTINGS entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Setting {
    pub flags: u8,
    pub id: u32,
    pub value: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    SynStream {
        stream_id: u32,
        associated_to: u32,
        /// 0 (highest) to 7.
        priority: u8,
        flags: u8,
        headers: Headers,
    },
    SynReply {
        stream_id: u32,
        flags: u8,
        headers: Headers,
    },
    RstStream {
        stream_id: u32,
        status: u32,
    },
    Settings {
        flags: u8,
        entries: Vec<Setting>,
    },
    Ping {
        id: u32,
    },
    GoAway {
        last_good_stream_id: u32,
        status: u32,
    },
    Headers {
        stream_id: u32,
        flags: u8,
        headers: Headers,
    },
    WindowUpdate {
        stream_id: u32,
        delta: u32,
    },
    Data {
        stream_id: u32,
        flags: u8,
        data: Bytes,
    },
    /// A control frame of a type SPDY/3.1 does not define: to be ignored.
    Unknown {
        frame_type: u16,
    },
}

/// Decodes frames from the bytes a peer sends; keeps the peer's header
/// compression context, so every frame of one connection goes through one reader.
pub struct FrameReader {
    inflate: Decompress,
}

impl Default for FrameReader {
    fn default() -> Self {
        FrameReader::new()
    }
}

impl FrameReader {
    pub fn new() -> FrameReader {
        FrameReader {
            inflate: Decompress::new(true),
        }
    }

    /// Takes one complete frame off the front of `buf`; None until one is
    /// complete. An error leaves the connection unusable: the header
    /// compression context may be out of step.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, SpdyError> {
        let Some(head) = buf.first_chunk::<8>() else {
            return Ok(None);
        };
        let first = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        let second = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
        let flags = (second >> 24) as u8;
        let len = (second & 0x00ff_ffff) as usize;
        if buf.len() < 8 + len {
            buf.reserve(8 + len - buf.len());
            return Ok(None);
        }
        let mut payload = buf.split_to(8 + len).freeze();
        payload.advance(8);
        if first & CONTROL_BIT == 0 {
            let stream_id = first & STREAM_ID_MASK;
            if stream_id == 0 {
                return Err(SpdyError::ZeroStream("DATA"));
            }
            return Ok(Some(Frame::Data {
                stream_id,
                flags,
                data: payload,
            }));
        }
        let version = ((first >> 16) & 0x7fff) as u16;
        if version != VERSION {
            return Err(SpdyError::Version(version));
        }
        let frame_type = (first & 0xffff) as u16;
        self.control(frame_type, flags, payload).map(Some)
    }

    fn control(&mut self, frame_type: u16, flags: u8, mut p: Bytes) -> Result<Frame, SpdyError> {
        let len = p.len();
        let short = |kind, min| {
            if len < min {
                Err(SpdyError::Length { kind, len })
            } else {
                Ok(())
            }
        };
        let exact = |kind, want| {
            if len != want {
                Err(SpdyError::Length { kind, len })
            } else {
                Ok(())
            }
        };
        let frame = match frame_type {
            SYN_STREAM => {
                short("SYN_STREAM", 10)?;
                let stream_id = p.get_u32() & STREAM_ID_MASK;
                let associated_to = p.get_u32() & STREAM_ID_MASK;
                let priority = p.get_u8() >> 5;
                let _slot = p.get_u8();
                let headers = self.header_block(&p)?;
                if stream_id == 0 {
                    return Err(SpdyError::ZeroStream("SYN_STREAM"));
                }
                Frame::SynStream {
                    stream_id,
                    associated_to,
                    priority,
                    flags,
                    headers,
                }
            }
            SYN_REPLY | HEADERS => {
                let kind = if frame_type == SYN_REPLY {
                    "SYN_REPLY"
                } else {
                    "HEADERS"
                };
                short(kind, 4)?;
                let stream_id = p.get_u32() & STREAM_ID_MASK;
                let headers = self.header_block(&p)?;
                if stream_id == 0 {
                    return Err(SpdyError::ZeroStream(kind));
                }
                if frame_type == SYN_REPLY {
                    Frame::SynReply {
                        stream_id,
                        flags,
                        headers,
                    }
                } else {
                    Frame::Headers {
                        stream_id,
                        flags,
                        headers,
                    }
                }
            }
            RST_STREAM => {
                exact("RST_STREAM", 8)?;
                let stream_id = p.get_u32() & STREAM_ID_MASK;
                let status = p.get_u32();
                if stream_id == 0 {
                    return Err(SpdyError::ZeroStream("RST_STREAM"));
                }
                if status == 0 {
                    return Err(SpdyError::RstStatus);
                }
                Frame::RstStream { stream_id, status }
            }
            SETTINGS => {
                short("SETTINGS", 4)?;
                let count = p.get_u32() as usize;
                if count.checked_mul(8).and_then(|n| n.checked_add(4)) != Some(len) {
                    return Err(SpdyError::Length {
                        kind: "SETTINGS",
                        len,
                    });
                }
                let entries = (0..count)
                    .map(|_| {
                        let word = p.get_u32();
                        Setting {
                            flags: (word >> 24) as u8,
                            id: word & 0x00ff_ffff,
                            value: p.get_u32(),
                        }
                    })
                    .collect();
                Frame::Settings { flags, entries }
            }
            PING => {
                exact("PING", 4)?;
                if flags != 0 {
                    return Err(SpdyError::PingFlags(flags));
                }
                Frame::Ping { id: p.get_u32() }
            }
            GOAWAY => {
                exact("GOAWAY", 8)?;
                Frame::GoAway {
                    last_good_stream_id: p.get_u32() & STREAM_ID_MASK,
                    status: p.get_u32(),
                }
            }
            WINDOW_UPDATE => {
                exact("WINDOW_UPDATE", 8)?;
                Frame::WindowUpdate {
                    stream_id: p.get_u32() & STREAM_ID_MASK,
                    delta: p.get_u32() & STREAM_ID_MASK,
                }
            }
            frame_type => Frame::Unknown { frame_type },
        };
        Ok(frame)
    }

    fn header_block(&mut self, compressed: &[u8]) -> Result<Headers, SpdyError> {
        let raw = self.inflate(compressed)?;
        parse_header_block(&raw)
    }

    /// Inflates one header block: all of `input`, up to its sync flush.
    fn inflate(&mut self, input: &[u8]) -> Result<Vec<u8>, SpdyError> {
        let bad = |e: String| SpdyError::HeaderBlock(e);
        let mut out = Vec::with_capacity(input.len() * 4 + 64);
        let mut used = 0usize;
        loop {
            if out.len() == out.capacity() {
                if out.capacity() >= MAX_HEADER_BLOCK {
                    return Err(bad(format!("larger than {MAX_HEADER_BLOCK} bytes")));
                }
                out.reserve(out.capacity());
            }
            let (in_before, out_before) = (self.inflate.total_in(), out.len());
            let result =
                self.inflate
                    .decompress_vec(&input[used..], &mut out, FlushDecompress::Sync);
            used += (self.inflate.total_in() - in_before) as usize;
            match result {
                Ok(flate2::Status::StreamEnd) => {
                    return Err(bad("the compression stream ended".into()));
                }
                Ok(_) => {}
                Err(e) => match e.needs_dictionary() {
                    Some(DICTIONARY_ID) => {
                        self.inflate
                            .set_dictionary(HEADER_DICTIONARY)
                            .map_err(|e| bad(e.to_string()))?;
                        continue;
                    }
                    Some(other) => return Err(bad(format!("unknown dictionary {other:#x}"))),
                    None => return Err(bad(e.to_string())),
                },
            }
            let progressed = out.len() > out_before;
            if used == input.len() && out.len() < out.capacity() {
                return Ok(out);
            }
            if !progressed && used < input.len() && out.len() < out.capacity() {
                return Err(bad("inflate made no progress".into()));
            }
        }
    }
}

/// Parses a decompressed header block: a count, then length-prefixed names
/// and values; every byte must belong to it.
fn parse_header_block(raw: &[u8]) -> Result<Headers, SpdyError> {
    let bad = |m: &str| SpdyError::HeaderBlock(m.to_string());
    let mut p = raw;
    let take = |p: &mut &[u8]| -> Result<Vec<u8>, SpdyError> {
        if p.len() < 4 {
            return Err(bad("truncated"));
        }
        let len = p.get_u32() as usize;
        if p.len() < len {
            return Err(bad("truncated"));
        }
        let bytes = p[..len].to_vec();
        p.advance(len);
        Ok(bytes)
    };
    if p.len() < 4 {
        return Err(bad("truncated"));
    }
    let count = p.get_u32() as usize;
    // Each pair takes at least 8 bytes: a count beyond that is a lie.
    if count > p.len() / 8 {
        return Err(bad("more headers announced than present"));
    }
    let mut headers = Headers::default();
    for _ in 0..count {
        let name = String::from_utf8(take(&mut p)?).map_err(|_| bad("name is not UTF-8"))?;
        let value = String::from_utf8(take(&mut p)?).map_err(|_| bad("value is not UTF-8"))?;
        if name.is_empty() {
            return Err(bad("empty name"));
        }
        if name.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(SpdyError::HeaderBlock(format!(
                "name {name:?} is not lowercase"
            )));
        }
        if headers.0.iter().any(|(n, _)| *n == name) {
            return Err(SpdyError::HeaderBlock(format!("name {name:?} given twice")));
        }
        headers.0.push((name, value));
    }
    if !p.is_empty() {
        return Err(bad("bytes after the last header"));
    }
    Ok(headers)
}

/// Encodes frames for a peer; keeps our header compression context, so
/// every frame of one connection goes through one writer.
pub struct FrameWriter {
    deflate: Compress,
    primed: bool,
}

impl Default for FrameWriter {
    fn default() -> Self {
        FrameWriter::new()
    }
}

impl FrameWriter {
    pub fn new() -> FrameWriter {
        FrameWriter {
            deflate: Compress::new(Compression::default(), true),
            primed: false,
        }
    }

    /// Appends `frame` to `out`.
    pub fn encode(&mut self, frame: &Frame, out: &mut BytesMut) -> Result<(), SpdyError> {
        match frame {
            Frame::Data {
                stream_id,
                flags,
                data,
            } => {
                if *stream_id == 0 {
                    return Err(SpdyError::ZeroStream("DATA"));
                }
                if data.len() > MAX_PAYLOAD {
                    return Err(SpdyError::TooLarge(data.len()));
                }
                out.put_u32(stream_id & STREAM_ID_MASK);
                out.put_u32((u32::from(*flags) << 24) | data.len() as u32);
                out.put_slice(data);
            }
            Frame::SynStream {
                stream_id,
                associated_to,
                priority,
                flags,
                headers,
            } => {
                let block = self.deflate_headers(headers)?;
                control_header(out, SYN_STREAM, *flags, 10 + block.len())?;
                out.put_u32(stream_id & STREAM_ID_MASK);
                out.put_u32(associated_to & STREAM_ID_MASK);
                out.put_u8((priority & 0x07) << 5);
                out.put_u8(0);
                out.put_slice(&block);
            }
            Frame::SynReply {
                stream_id,
                flags,
                headers,
            }
            | Frame::Headers {
                stream_id,
                flags,
                headers,
            } => {
                let frame_type = if matches!(frame, Frame::SynReply { .. }) {
                    SYN_REPLY
                } else {
                    HEADERS
                };
                let block = self.deflate_headers(headers)?;
                control_header(out, frame_type, *flags, 4 + block.len())?;
                out.put_u32(stream_id & STREAM_ID_MASK);
                out.put_slice(&block);
            }
            Frame::RstStream { stream_id, status } => {
                control_header(out, RST_STREAM, 0, 8)?;
                out.put_u32(stream_id & STREAM_ID_MASK);
                out.put_u32(*status);
            }
            Frame::Settings { flags, entries } => {
                control_header(out, SETTINGS, *flags, 4 + 8 * entries.len())?;
                out.put_u32(entries.len() as u32);
                for e in entries {
                    out.put_u32((u32::from(e.flags) << 24) | (e.id & 0x00ff_ffff));
                    out.put_u32(e.value);
                }
            }
            Frame::Ping { id } => {
                control_header(out, PING, 0, 4)?;
                out.put_u32(*id);
            }
            Frame::GoAway {
                last_good_stream_id,
                status,
            } => {
                control_header(out, GOAWAY, 0, 8)?;
                out.put_u32(last_good_stream_id & STREAM_ID_MASK);
                out.put_u32(*status);
            }
            Frame::WindowUpdate { stream_id, delta } => {
                control_header(out, WINDOW_UPDATE, 0, 8)?;
                out.put_u32(stream_id & STREAM_ID_MASK);
                out.put_u32(delta & STREAM_ID_MASK);
            }
            Frame::Unknown { frame_type } => {
                control_header(out, *frame_type, 0, 0)?;
            }
        }
        Ok(())
    }

    /// One header block, compressed and sync-flushed so the peer can read
    /// all of it from this frame alone.
    fn deflate_headers(&mut self, headers: &Headers) -> Result<Vec<u8>, SpdyError> {
        let bad = |e: flate2::CompressError| SpdyError::HeaderBlock(e.to_string());
        if !self.primed {
            self.deflate
                .set_dictionary(HEADER_DICTIONARY)
                .map_err(bad)?;
            self.primed = true;
        }
        let mut raw = Vec::new();
        raw.put_u32(headers.0.len() as u32);
        for (name, value) in &headers.0 {
            raw.put_u32(name.len() as u32);
            raw.put_slice(name.as_bytes());
            raw.put_u32(value.len() as u32);
            raw.put_slice(value.as_bytes());
        }
        let mut out = Vec::with_capacity(raw.len() + 64);
        let mut used = 0usize;
        loop {
            if out.capacity() - out.len() < 64 {
                out.reserve(out.capacity().max(64));
            }
            let before = self.deflate.total_in();
            self.deflate
                .compress_vec(&raw[used..], &mut out, FlushCompress::Sync)
                .map_err(bad)?;
            used += (self.deflate.total_in() - before) as usize;
            if used == raw.len() && out.len() < out.capacity() {
                return Ok(out);
            }
        }
    }
}

fn control_header(
    out: &mut BytesMut,
    frame_type: u16,
    flags: u8,
    len: usize,
) -> Result<(), SpdyError> {
    if len > MAX_PAYLOAD {
        return Err(SpdyError::TooLarge(len));
    }
    out.put_u32(CONTROL_BIT | (u32::from(VERSION) << 16) | u32::from(frame_type));
    out.put_u32((u32::from(flags) << 24) | len as u32);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What kubectl's port-forward (Go's spdystream, compress/zlib at
    /// BestCompression with the dictionary) sent for one connection: the error
    /// stream's SYN_STREAM, its FIN, and the data stream's SYN_STREAM, whose
    /// header block continues the same compression context. Captured from
    /// crictl 1.32 port-forward.
    const GO_PORT_FORWARD_FRAMES: &[u8] = &[
        0x80, 0x03, 0x00, 0x01, 0x00, 0x00, 0x00, 0x3e, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x78, 0xf9, 0xe3, 0xc6, 0xa7, 0xc2, 0x02, 0x25, 0x3a, 0x06, 0x06, 0x06,
        0xce, 0x22, 0x48, 0xfc, 0x64, 0x82, 0xd2, 0x2d, 0xa3, 0x01, 0x38, 0xe5, 0x95, 0x14, 0xa5,
        0x26, 0xe6, 0x42, 0x0b, 0x17, 0xd6, 0x54, 0x50, 0xd0, 0x43, 0x0a, 0xea, 0x22, 0x70, 0x9e,
        0xb0, 0x30, 0xb0, 0x30, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0x00, 0x00, 0x00, 0x01, 0x01,
        0x00, 0x00, 0x00, 0x80, 0x03, 0x00, 0x01, 0x00, 0x00, 0x00, 0x1c, 0x00, 0x00, 0x00, 0x03,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x82, 0x6a, 0x46, 0x55, 0x0a, 0x2a, 0x87, 0x12, 0xb1,
        0xa8, 0x44, 0xb3, 0x02, 0x00, 0x00, 0x00, 0xff, 0xff,
    ];

    fn adler32(data: &[u8]) -> u32 {
        let (mut a, mut b) = (1u32, 0u32);
        for &byte in data {
            a = (a + u32::from(byte)) % 65521;
            b = (b + a) % 65521;
        }
        (b << 16) | a
    }

    fn round_trip(frames: &[Frame]) -> Vec<Frame> {
        let mut writer = FrameWriter::new();
        let mut reader = FrameReader::new();
        let mut wire = BytesMut::new();
        for f in frames {
            writer.encode(f, &mut wire).expect("encode");
        }
        let mut out = Vec::new();
        while let Some(f) = reader.decode(&mut wire).expect("decode") {
            out.push(f);
        }
        assert!(wire.is_empty(), "every byte belongs to a frame");
        out
    }

    fn exec_headers(kind: &str) -> Headers {
        Headers::new().with("streamType", kind)
    }

    #[test]
    fn the_dictionary_is_spdy3s() {
        assert_eq!(HEADER_DICTIONARY.len(), 1423);
        assert_eq!(adler32(HEADER_DICTIONARY), DICTIONARY_ID);
    }

    #[test]
    fn every_frame_type_round_trips() {
        let frames = vec![
            Frame::SynStream {
                stream_id: 1,
                associated_to: 0,
                priority: 7,
                flags: 0,
                headers: exec_headers("error"),
            },
            Frame::SynStream {
                stream_id: 3,
                associated_to: 0,
                priority: 0,
                flags: FLAG_FIN,
                headers: exec_headers("stdout").with("port", "80\0"),
            },
            Frame::SynReply {
                stream_id: 1,
                flags: 0,
                headers: Headers::new(),
            },
            Frame::Headers {
                stream_id: 3,
                flags: FLAG_FIN,
                headers: Headers::new().with("x", "y"),
            },
            Frame::Data {
                stream_id: 3,
                flags: 0,
                data: Bytes::from_static(b"hello\n"),
            },
            Frame::Data {
                stream_id: 3,
                flags: FLAG_FIN,
                data: Bytes::new(),
            },
            Frame::RstStream {
                stream_id: 5,
                status: rst::CANCEL,
            },
            Frame::Settings {
                flags: 0,
                entries: vec![Setting {
                    flags: 1,
                    id: 7,
                    value: 65536,
                }],
            },
            Frame::Ping { id: 1 },
            Frame::GoAway {
                last_good_stream_id: 3,
                status: goaway::OK,
            },
            Frame::WindowUpdate {
                stream_id: 3,
                delta: 1024,
            },
        ];
        let back = round_trip(&frames);
        // The header name is lowercased on the way in.
        assert_eq!(back, frames);
        assert!(
            matches!(&back[0], Frame::SynStream { headers, .. } if headers.get("streamtype") == Some("error"))
        );
    }

    #[test]
    fn bytes_arrive_in_any_pieces() {
        let mut writer = FrameWriter::new();
        let mut wire = BytesMut::new();
        for id in [1, 3, 5] {
            writer
                .encode(
                    &Frame::SynStream {
                        stream_id: id,
                        associated_to: 0,
                        priority: 0,
                        flags: 0,
                        headers: exec_headers("stdin"),
                    },
                    &mut wire,
                )
                .expect("encode");
        }
        let mut reader = FrameReader::new();
        let mut buf = BytesMut::new();
        let mut ids = Vec::new();
        for byte in wire {
            buf.put_u8(byte);
            while let Some(Frame::SynStream { stream_id, .. }) =
                reader.decode(&mut buf).expect("decode")
            {
                ids.push(stream_id);
            }
        }
        assert_eq!(ids, vec![1, 3, 5]);
    }

    #[test]
    fn reads_header_blocks_compressed_by_go() {
        let mut wire = BytesMut::from(GO_PORT_FORWARD_FRAMES);
        let mut reader = FrameReader::new();
        let mut frames = Vec::new();
        while let Some(frame) = reader.decode(&mut wire).expect("decode") {
            frames.push(frame);
        }
        assert!(wire.is_empty());
        // Go writes headers in map order: compare by name.
        let stream = |frame: &Frame| match frame {
            Frame::SynStream {
                stream_id, headers, ..
            } => Some((
                *stream_id,
                headers.get("streamtype").map(str::to_string),
                headers.get("port").map(str::to_string),
                headers.get("requestid").map(str::to_string),
            )),
            _ => None,
        };
        let some = |s: &str| Some(s.to_string());
        assert_eq!(frames.len(), 3, "{frames:?}");
        assert_eq!(
            stream(&frames[0]),
            Some((1, some("error"), some("8080"), some("0")))
        );
        assert_eq!(
            frames[1],
            Frame::Data {
                stream_id: 1,
                flags: FLAG_FIN,
                data: Bytes::new(),
            }
        );
        assert_eq!(
            stream(&frames[2]),
            Some((3, some("data"), some("8080"), some("0")))
        );
    }

    #[test]
    fn bad_frames_are_refused() {
        let decode = |bytes: &[u8]| FrameReader::new().decode(&mut BytesMut::from(bytes));
        // SPDY/2 control frame (PING).
        assert_eq!(
            decode(&[0x80, 0x02, 0x00, 0x06, 0, 0, 0, 4, 0, 0, 0, 1]),
            Err(SpdyError::Version(2))
        );
        // PING with a 3-byte payload.
        assert!(matches!(
            decode(&[0x80, 0x03, 0x00, 0x06, 0, 0, 0, 3, 0, 0, 1]),
            Err(SpdyError::Length { kind: "PING", .. })
        ));
        // DATA on stream 0.
        assert_eq!(
            decode(&[0, 0, 0, 0, 0, 0, 0, 1, b'x']),
            Err(SpdyError::ZeroStream("DATA"))
        );
        // RST_STREAM with status 0.
        assert_eq!(
            decode(&[0x80, 0x03, 0x00, 0x03, 0, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0, 0]),
            Err(SpdyError::RstStatus)
        );
        // SETTINGS announcing two entries, carrying one.
        assert!(matches!(
            decode(&[
                0x80, 0x03, 0x00, 0x04, 0, 0, 0, 12, 0, 0, 0, 2, 0, 0, 0, 7, 0, 0, 0, 1
            ]),
            Err(SpdyError::Length {
                kind: "SETTINGS",
                ..
            })
        ));
        // SYN_STREAM whose header block is not zlib.
        assert!(matches!(
            decode(&[
                0x80, 0x03, 0x00, 0x01, 0, 0, 0, 14, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xde, 0xad,
                0xbe, 0xef
            ]),
            Err(SpdyError::HeaderBlock(_))
        ));
        // An incomplete frame is no error: it waits for more bytes.
        assert_eq!(decode(&[0x80, 0x03, 0x00, 0x06, 0, 0, 0, 4, 0]), Ok(None));
        // An unknown control type is ignored, as the spec says.
        assert_eq!(
            decode(&[0x80, 0x03, 0x00, 0x0a, 0, 0, 0, 0]),
            Ok(Some(Frame::Unknown { frame_type: 10 }))
        );
    }

    #[test]
    fn header_blocks_must_be_well_formed() {
        let block = |pairs: &[(&[u8], &[u8])], count: u32| {
            let mut raw = Vec::new();
            raw.put_u32(count);
            for (n, v) in pairs {
                raw.put_u32(n.len() as u32);
                raw.put_slice(n);
                raw.put_u32(v.len() as u32);
                raw.put_slice(v);
            }
            raw
        };
        assert!(parse_header_block(&block(&[(b"port", b"80")], 1)).is_ok());
        assert!(parse_header_block(&block(&[(b"Port", b"80")], 1)).is_err());
        assert!(parse_header_block(&block(&[(b"a", b"1"), (b"a", b"2")], 2)).is_err());
        assert!(parse_header_block(&block(&[(b"a", b"1")], 2)).is_err());
        assert!(parse_header_block(&block(&[(b"", b"1")], 1)).is_err());
        let mut trailing = block(&[(b"a", b"1")], 1);
        trailing.push(0);
        assert!(parse_header_block(&trailing).is_err());
    }

    #[test]
    fn a_wrong_dictionary_is_refused() {
        let mut deflate = Compress::new(Compression::default(), true);
        deflate
            .set_dictionary(b"not the spdy dictionary")
            .expect("dict");
        let mut block = Vec::with_capacity(256);
        deflate
            .compress_vec(&[0, 0, 0, 0], &mut block, FlushCompress::Sync)
            .expect("compress");
        let mut wire = BytesMut::new();
        control_header(&mut wire, SYN_REPLY, 0, 4 + block.len()).expect("header");
        wire.put_u32(1);
        wire.put_slice(&block);
        let err = FrameReader::new().decode(&mut wire).expect_err("refused");
        assert!(err.to_string().contains("dictionary"), "{err}");
    }
}
