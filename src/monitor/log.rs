//! The CRI log file a monitor writes: one record per line of container output,
//! `<RFC3339Nano UTC> <stdout|stderr> <P|F> <text>\n`, as kubelet reads it.
//! Like containerd: lines longer than 16 KiB are cut into 16 KiB partial (P)
//! records and a final full (F) one, a trailing "\r\n" counts as a newline,
//! and output that ends without a newline is written as a partial record.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Longest text of one record; containerd's default max_container_log_line_size.
pub const MAX_LINE: usize = 16 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// Whether a record ends a line (F) or the line goes on in the next (P).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tag {
    Partial,
    Full,
}

impl Tag {
    fn letter(self) -> &'static str {
        match self {
            Tag::Partial => "P",
            Tag::Full => "F",
        }
    }
}

/// Cuts one stream's bytes into records. Holds at most `MAX_LINE + 1` bytes
/// (the extra one is a '\r' that may yet turn out to end the line).
#[derive(Debug, Default)]
pub struct LineSplitter {
    pending: Vec<u8>,
}

impl LineSplitter {
    /// Feeds output; calls `emit` for every finished record.
    pub fn feed(&mut self, mut data: &[u8], emit: &mut impl FnMut(Tag, &[u8])) {
        while !data.is_empty() {
            match data.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    self.push(&data[..i], emit);
                    self.end_line(emit);
                    data = &data[i + 1..];
                }
                None => {
                    self.push(data, emit);
                    data = &[];
                }
            }
        }
    }

    /// At end of stream: a pending unterminated line becomes partial records.
    pub fn finish(&mut self, emit: &mut impl FnMut(Tag, &[u8])) {
        self.cut_overflow(true, emit);
        if !self.pending.is_empty() {
            emit(Tag::Partial, &self.pending);
            self.pending.clear();
        }
    }

    fn push(&mut self, mut data: &[u8], emit: &mut impl FnMut(Tag, &[u8])) {
        while !data.is_empty() {
            let room = (MAX_LINE + 1).saturating_sub(self.pending.len());
            let n = room.min(data.len());
            self.pending.extend_from_slice(&data[..n]);
            data = &data[n..];
            // A full buffer with more bytes coming: the held '\r' is no line end.
            self.cut_overflow(n == 0 || !data.is_empty(), emit);
        }
    }

    /// Emits a partial record once more than MAX_LINE bytes are pending,
    /// unless the only extra byte is a '\r' that a '\n' may still follow.
    fn cut_overflow(&mut self, more_coming: bool, emit: &mut impl FnMut(Tag, &[u8])) {
        while self.pending.len() > MAX_LINE {
            let held_cr = self.pending.len() == MAX_LINE + 1 && self.pending[MAX_LINE] == b'\r';
            if held_cr && !more_coming {
                return;
            }
            emit(Tag::Partial, &self.pending[..MAX_LINE]);
            self.pending.drain(..MAX_LINE);
        }
    }

    fn end_line(&mut self, emit: &mut impl FnMut(Tag, &[u8])) {
        if self.pending.last() == Some(&b'\r') {
            self.pending.pop();
        }
        self.cut_overflow(true, emit);
        emit(Tag::Full, &self.pending);
        self.pending.clear();
    }
}

/// Appends `2016-10-06T00:17:09.669794202Z` for unix nanoseconds `nanos`.
pub fn push_timestamp(out: &mut Vec<u8>, nanos: i64) {
    let secs = nanos.div_euclid(1_000_000_000);
    let sub = nanos.rem_euclid(1_000_000_000);
    let days = secs.div_euclid(86_400);
    let day_secs = secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let _ = write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{sub:09}Z",
        day_secs / 3600,
        day_secs / 60 % 60,
        day_secs % 60
    );
}

/// Year, month, day of the proleptic Gregorian calendar for days since
/// 1970-01-01 (Howard Hinnant's civil_from_days).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11], March first
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month as u32, day as u32)
}

/// The container's CRI log file with one splitter per stream.
#[derive(Debug)]
pub struct CriLog {
    path: PathBuf,
    file: File,
    stdout: LineSplitter,
    stderr: LineSplitter,
    record: Vec<u8>,
}

impl CriLog {
    /// Opens `path` for appending, creating it and its directory.
    pub fn open(path: &Path) -> io::Result<CriLog> {
        Ok(CriLog {
            path: path.to_path_buf(),
            file: open_log(path)?,
            stdout: LineSplitter::default(),
            stderr: LineSplitter::default(),
            record: Vec::new(),
        })
    }

    /// Logs output of `stream`; write errors are dropped so the container's
    /// output is still drained.
    pub fn write(&mut self, stream: Stream, data: &[u8]) {
        let now = super::now_nanos();
        let (splitter, file, record) = self.parts(stream);
        splitter.feed(data, &mut |tag, text| {
            write_record(file, record, now, stream, tag, text)
        });
    }

    /// Writes what is pending of unterminated lines (end of output).
    pub fn finish(&mut self) {
        let now = super::now_nanos();
        for stream in [Stream::Stdout, Stream::Stderr] {
            let (splitter, file, record) = self.parts(stream);
            splitter.finish(&mut |tag, text| write_record(file, record, now, stream, tag, text));
        }
    }

    /// Closes the file and opens `path` anew (kubelet renamed the old one).
    pub fn reopen(&mut self) -> io::Result<()> {
        self.file = open_log(&self.path)?;
        Ok(())
    }

    fn parts(&mut self, stream: Stream) -> (&mut LineSplitter, &mut File, &mut Vec<u8>) {
        let splitter = match stream {
            Stream::Stdout => &mut self.stdout,
            Stream::Stderr => &mut self.stderr,
        };
        (splitter, &mut self.file, &mut self.record)
    }
}

fn open_log(path: &Path) -> io::Result<File> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o640)
        .open(path)
}

/// Writes one record with a single write, so records never interleave.
fn write_record(
    file: &mut File,
    record: &mut Vec<u8>,
    now: i64,
    stream: Stream,
    tag: Tag,
    text: &[u8],
) {
    record.clear();
    push_timestamp(record, now);
    record.push(b' ');
    record.extend_from_slice(stream.name().as_bytes());
    record.push(b' ');
    record.extend_from_slice(tag.letter().as_bytes());
    record.push(b' ');
    record.extend_from_slice(text);
    record.push(b'\n');
    let _ = file.write_all(record);
    // Keep the buffer of one long record from pinning heap for good.
    if record.capacity() > 4 * 1024 {
        record.shrink_to(4 * 1024);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(chunks: &[&[u8]]) -> Vec<(Tag, Vec<u8>)> {
        let mut out = Vec::new();
        let mut s = LineSplitter::default();
        for chunk in chunks {
            s.feed(chunk, &mut |t, b| out.push((t, b.to_vec())));
        }
        s.finish(&mut |t, b| out.push((t, b.to_vec())));
        out
    }

    fn full(s: &[u8]) -> (Tag, Vec<u8>) {
        (Tag::Full, s.to_vec())
    }

    fn partial(s: &[u8]) -> (Tag, Vec<u8>) {
        (Tag::Partial, s.to_vec())
    }

    #[test]
    fn lines_become_full_records() {
        assert_eq!(
            split(&[b"a\nbc\n\n"]),
            vec![full(b"a"), full(b"bc"), full(b"")]
        );
    }

    #[test]
    fn a_line_spread_over_reads_is_one_record() {
        assert_eq!(
            split(&[b"he", b"llo", b"\nx\n"]),
            vec![full(b"hello"), full(b"x")]
        );
    }

    #[test]
    fn crlf_ends_a_line_and_a_lone_cr_is_text() {
        assert_eq!(split(&[b"a\r\nb\rc\n"]), vec![full(b"a"), full(b"b\rc")]);
        assert_eq!(split(&[b"a\r", b"\n"]), vec![full(b"a")]);
    }

    #[test]
    fn output_without_final_newline_ends_partial() {
        assert_eq!(
            split(&[b"done\nno newline"]),
            vec![full(b"done"), partial(b"no newline")]
        );
        assert_eq!(split(&[b""]), vec![]);
    }

    #[test]
    fn a_line_of_exactly_16k_is_one_full_record() {
        let line = vec![b'x'; MAX_LINE];
        let mut data = line.clone();
        data.push(b'\n');
        assert_eq!(split(&[&data]), vec![full(&line)]);
        let mut crlf = line.clone();
        crlf.extend_from_slice(b"\r\n");
        assert_eq!(
            split(&[&crlf[..MAX_LINE + 1], &crlf[MAX_LINE + 1..]]),
            vec![full(&line)]
        );
    }

    #[test]
    fn long_lines_are_cut_into_16k_partials_then_a_full() {
        let line: Vec<u8> = (0..2 * MAX_LINE + 100)
            .map(|i| b'a' + (i % 26) as u8)
            .collect();
        let mut data = line.clone();
        data.push(b'\n');
        let expected = vec![
            partial(&line[..MAX_LINE]),
            partial(&line[MAX_LINE..2 * MAX_LINE]),
            full(&line[2 * MAX_LINE..]),
        ];
        assert_eq!(split(&[&data]), expected);
        // The same fed byte by byte.
        let bytes: Vec<&[u8]> = data.chunks(1).collect();
        assert_eq!(split(&bytes), expected);
        // Exactly two chunks' worth: the final full record is 16 KiB, not empty.
        let two = vec![b'y'; 2 * MAX_LINE];
        let mut data = two.clone();
        data.push(b'\n');
        assert_eq!(
            split(&[&data]),
            vec![partial(&two[..MAX_LINE]), full(&two[MAX_LINE..])]
        );
    }

    #[test]
    fn a_cr_after_16k_without_newline_is_text() {
        let mut data = vec![b'z'; MAX_LINE];
        data.extend_from_slice(b"\rmore\n");
        assert_eq!(
            split(&[&data]),
            vec![partial(&data[..MAX_LINE]), full(b"\rmore")]
        );
        let mut tail = vec![b'z'; MAX_LINE];
        tail.push(b'\r');
        assert_eq!(
            split(&[&tail]),
            vec![partial(&tail[..MAX_LINE]), partial(b"\r")]
        );
    }

    #[test]
    fn timestamps_are_rfc3339_nano_utc() {
        let ts = |nanos: i64| {
            let mut out = Vec::new();
            push_timestamp(&mut out, nanos);
            String::from_utf8(out).expect("ascii")
        };
        assert_eq!(ts(0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(
            ts(1_475_713_029_669_794_202),
            "2016-10-06T00:17:09.669794202Z"
        );
        // A leap day and the last nanosecond of a year.
        assert_eq!(
            ts(951_782_400_000_000_001),
            "2000-02-29T00:00:00.000000001Z"
        );
        assert_eq!(
            ts(1_704_067_199_999_999_999),
            "2023-12-31T23:59:59.999999999Z"
        );
        assert_eq!(ts(-1), "1969-12-31T23:59:59.999999999Z");
    }

    #[test]
    fn the_log_file_gets_one_record_per_line_and_survives_rotation() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pods/ctr/0.log");
        let mut log = CriLog::open(&path).expect("open");
        log.write(Stream::Stdout, b"out line\npart");
        log.write(Stream::Stderr, b"err line\n");
        fs::rename(&path, dir.path().join("rotated")).expect("rename");
        log.reopen().expect("reopen");
        log.finish();
        let old = fs::read_to_string(dir.path().join("rotated")).expect("read");
        let lines: Vec<&str> = old.lines().collect();
        assert_eq!(lines.len(), 2, "{old}");
        assert!(lines[0].ends_with("Z stdout F out line"), "{}", lines[0]);
        assert!(lines[1].ends_with("Z stderr F err line"), "{}", lines[1]);
        assert_eq!(
            lines[0].len(),
            "2016-10-06T00:17:09.669794202Z stdout F out line".len()
        );
        let new = fs::read_to_string(&path).expect("read new");
        assert!(new.ends_with(" stdout P part\n"), "{new}");
    }
}
