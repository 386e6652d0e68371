//! Content digests (`sha256:<64 hex>`) and streaming checks of a blob's size and digest.

use std::fmt;
use std::io::{self, Read};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use thiserror::Error;

const SHA256_PREFIX: &str = "sha256:";
const SHA256_HEX_LEN: usize = 64;

/// Errors of parsing a digest or of checking content against one.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DigestError {
    #[error("invalid digest {input:?}: {reason}")]
    Invalid { input: String, reason: &'static str },
    #[error("unsupported digest algorithm in {input:?}: only sha256 is supported")]
    UnsupportedAlgorithm { input: String },
    #[error("content of {expected} is larger than the expected {expected_size} bytes")]
    TooLarge {
        expected: Digest,
        expected_size: u64,
    },
    #[error("content of {expected} has {actual} bytes, expected {expected_size}")]
    SizeMismatch {
        expected: Digest,
        expected_size: u64,
        actual: u64,
    },
    #[error("content digest mismatch: expected {expected}, got {actual}")]
    Mismatch { expected: Digest, actual: Digest },
}

/// A validated sha256 digest, kept in its canonical text form `sha256:<64 lowercase hex>`.
/// Deserializing validates too, so a digest read from a registry's JSON is safe to
/// use as a file name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Digest(String);

impl Digest {
    /// Parses `sha256:<64 lowercase hex>`. Uppercase hex is refused: the OCI spec
    /// defines the encoded part of sha256 as `[a-f0-9]{64}`, and one spelling per
    /// digest keeps map keys and file names unique.
    pub fn parse(s: &str) -> Result<Digest, DigestError> {
        let Some((algorithm, hex)) = s.split_once(':') else {
            return Err(DigestError::Invalid {
                input: s.to_owned(),
                reason: "expected <algorithm>:<hex>",
            });
        };
        if algorithm != "sha256" {
            let well_formed = !algorithm.is_empty()
                && algorithm
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+._-".contains(&b));
            return Err(if well_formed {
                DigestError::UnsupportedAlgorithm {
                    input: s.to_owned(),
                }
            } else {
                DigestError::Invalid {
                    input: s.to_owned(),
                    reason: "malformed algorithm",
                }
            });
        }
        if hex.len() != SHA256_HEX_LEN {
            return Err(DigestError::Invalid {
                input: s.to_owned(),
                reason: "sha256 needs exactly 64 hex digits",
            });
        }
        if !is_lower_hex(hex) {
            return Err(DigestError::Invalid {
                input: s.to_owned(),
                reason: "sha256 hex digits must be 0-9 or a-f",
            });
        }
        Ok(Digest(s.to_owned()))
    }

    /// The digest of a finished sha256 hash.
    pub fn from_sha256(hash: [u8; 32]) -> Digest {
        Digest(format!("{SHA256_PREFIX}{}", hex::encode(hash)))
    }

    /// The sha256 digest of `data`.
    pub fn sha256_of(data: &[u8]) -> Digest {
        Digest::from_sha256(Sha256::digest(data).into())
    }

    /// The algorithm name; always `sha256`.
    pub fn algorithm(&self) -> &'static str {
        "sha256"
    }

    /// The 64 lowercase hex digits, without the algorithm (for file names of blobs).
    pub fn hex(&self) -> &str {
        &self.0[SHA256_PREFIX.len()..]
    }

    /// The full text form, `sha256:<hex>`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// True if `s` is all lowercase hex digits.
pub(crate) fn is_lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Digest, DigestError> {
        Digest::parse(s)
    }
}

impl TryFrom<String> for Digest {
    type Error = DigestError;

    fn try_from(s: String) -> Result<Digest, DigestError> {
        Digest::parse(&s)
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.0
    }
}

impl AsRef<str> for Digest {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// A running sha256 over content pushed into it, with its byte count.
#[derive(Clone, Default)]
pub struct Sha256Hasher {
    hasher: Sha256,
    size: u64,
}

impl Sha256Hasher {
    pub fn new() -> Sha256Hasher {
        Sha256Hasher::default()
    }

    pub fn update(&mut self, data: &[u8]) {
        self.hasher.update(data);
        self.size += data.len() as u64;
    }

    /// Bytes hashed so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The digest and size of everything hashed.
    pub fn finish(self) -> (Digest, u64) {
        (
            Digest::from_sha256(self.hasher.finalize().into()),
            self.size,
        )
    }
}

/// Checks content pushed chunk by chunk (e.g. from an HTTP body) against an expected
/// size and digest. Oversized content fails as soon as it passes the size, so a
/// hostile registry cannot make us store an endless blob.
#[derive(Clone)]
pub struct DigestVerifier {
    expected: Digest,
    expected_size: u64,
    hasher: Sha256Hasher,
}

impl DigestVerifier {
    pub fn new(expected: Digest, expected_size: u64) -> DigestVerifier {
        DigestVerifier {
            expected,
            expected_size,
            hasher: Sha256Hasher::new(),
        }
    }

    pub fn expected(&self) -> &Digest {
        &self.expected
    }

    /// Bytes seen so far.
    pub fn size(&self) -> u64 {
        self.hasher.size()
    }

    /// Adds a chunk; fails if the content is now longer than expected.
    pub fn update(&mut self, data: &[u8]) -> Result<(), DigestError> {
        let new_size = self.hasher.size().saturating_add(data.len() as u64);
        if new_size > self.expected_size {
            return Err(DigestError::TooLarge {
                expected: self.expected.clone(),
                expected_size: self.expected_size,
            });
        }
        self.hasher.update(data);
        Ok(())
    }

    /// Checks the final size and digest.
    pub fn finish(self) -> Result<(), DigestError> {
        let (actual, size) = self.hasher.finish();
        if size != self.expected_size {
            return Err(DigestError::SizeMismatch {
                expected: self.expected,
                expected_size: self.expected_size,
                actual: size,
            });
        }
        if actual != self.expected {
            return Err(DigestError::Mismatch {
                expected: self.expected,
                actual,
            });
        }
        Ok(())
    }
}

/// A reader that hashes everything read through it.
pub struct DigestingReader<R> {
    inner: R,
    hasher: Sha256Hasher,
}

impl<R: Read> DigestingReader<R> {
    pub fn new(inner: R) -> DigestingReader<R> {
        DigestingReader {
            inner,
            hasher: Sha256Hasher::new(),
        }
    }

    /// Bytes read so far.
    pub fn size(&self) -> u64 {
        self.hasher.size()
    }

    /// Reads the rest of the stream, so the digest covers all of it.
    pub fn drain(&mut self) -> io::Result<u64> {
        io::copy(self, &mut io::sink())
    }

    /// The digest and size of what was read (not of any unread rest), and the reader.
    pub fn finish(self) -> (Digest, u64, R) {
        let (digest, size) = self.hasher.finish();
        (digest, size, self.inner)
    }
}

impl<R: Read> Read for DigestingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// A reader that checks size and digest of the stream it wraps. Reading past the
/// expected size, or reaching EOF with a wrong size or digest, is an
/// `io::ErrorKind::InvalidData` error whose inner error is a [`DigestError`]; so
/// whoever consumes the stream (an unpacker, a copy into the content store) fails
/// before treating unverified content as complete.
pub struct VerifyingReader<R> {
    inner: R,
    state: VerifyState,
}

enum VerifyState {
    Reading(DigestVerifier),
    Done(Result<(), DigestError>),
}

impl<R: Read> VerifyingReader<R> {
    pub fn new(inner: R, expected: Digest, expected_size: u64) -> VerifyingReader<R> {
        VerifyingReader {
            inner,
            state: VerifyState::Reading(DigestVerifier::new(expected, expected_size)),
        }
    }

    /// The outcome of the check, and the inner reader. If the stream was not read
    /// to EOF, what was read so far is checked as the whole content: read to the end
    /// first (e.g. `io::copy` into `io::sink()`) to also refuse trailing bytes.
    pub fn finish(self) -> Result<R, DigestError> {
        match self.state {
            VerifyState::Reading(verifier) => verifier.finish(),
            VerifyState::Done(result) => result,
        }
        .map(|()| self.inner)
    }
}

impl<R: Read> Read for VerifyingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let verifier = match &mut self.state {
            VerifyState::Reading(verifier) => verifier,
            VerifyState::Done(Ok(())) => return Ok(0),
            VerifyState::Done(Err(e)) => return Err(invalid_data(e.clone())),
        };
        let n = self.inner.read(buf)?;
        let outcome = if n == 0 {
            verifier.clone().finish()
        } else {
            verifier.update(&buf[..n])
        };
        match outcome {
            Ok(()) if n > 0 => Ok(n),
            Ok(()) => {
                self.state = VerifyState::Done(Ok(()));
                Ok(0)
            }
            Err(e) => {
                self.state = VerifyState::Done(Err(e.clone()));
                Err(invalid_data(e))
            }
        }
    }
}

fn invalid_data(e: DigestError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_and_displays() {
        let d = Digest::parse(EMPTY).unwrap();
        assert_eq!(d.to_string(), EMPTY);
        assert_eq!(d.hex(), &EMPTY[7..]);
        assert_eq!(d.algorithm(), "sha256");
        assert_eq!(Digest::sha256_of(b""), d);
        assert_eq!(EMPTY.parse::<Digest>().unwrap(), d);
    }

    #[test]
    fn refuses_malformed() {
        let upper = EMPTY.to_uppercase().replacen("SHA256", "sha256", 1);
        for bad in [
            "",
            "sha256",
            "sha256:",
            "sha256:abc",
            &upper,
            &format!("{EMPTY}0"),
            &EMPTY.replace('e', "g"),
            ":abcd",
            "SHA256:abcd",
        ] {
            let err = Digest::parse(bad).unwrap_err();
            assert!(matches!(err, DigestError::Invalid { .. }), "{bad}: {err}");
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
        let sha512 = format!("sha512:{}", "a".repeat(128));
        assert!(matches!(
            Digest::parse(&sha512),
            Err(DigestError::UnsupportedAlgorithm { .. })
        ));
    }

    #[test]
    fn serde_round_trips_and_validates() {
        let d = Digest::parse(EMPTY).unwrap();
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(json, format!("\"{EMPTY}\""));
        assert_eq!(serde_json::from_str::<Digest>(&json).unwrap(), d);
        let err = serde_json::from_str::<Digest>("\"sha256:../../etc/passwd\"").unwrap_err();
        assert!(err.to_string().contains("invalid digest"), "{err}");
    }

    #[test]
    fn verifier_checks_size_and_digest() {
        let data = b"hello world";
        let d = Digest::sha256_of(data);

        let mut ok = DigestVerifier::new(d.clone(), data.len() as u64);
        ok.update(&data[..5]).unwrap();
        ok.update(&data[5..]).unwrap();
        ok.finish().unwrap();

        let mut long = DigestVerifier::new(d.clone(), 5);
        assert!(matches!(
            long.update(data),
            Err(DigestError::TooLarge { .. })
        ));

        let mut short = DigestVerifier::new(d.clone(), data.len() as u64);
        short.update(&data[..5]).unwrap();
        assert!(matches!(
            short.finish(),
            Err(DigestError::SizeMismatch { actual: 5, .. })
        ));

        let mut wrong = DigestVerifier::new(d, data.len() as u64);
        wrong.update(b"hello WORLD").unwrap();
        assert!(matches!(wrong.finish(), Err(DigestError::Mismatch { .. })));
    }

    #[test]
    fn verifying_reader_fails_the_stream() {
        let data = b"some layer bytes".to_vec();
        let d = Digest::sha256_of(&data);

        let mut r = VerifyingReader::new(&data[..], d.clone(), data.len() as u64);
        let mut out = Vec::new();
        r.read_to_end(&mut out).unwrap();
        assert_eq!(out, data);
        r.finish().unwrap();

        let mut bad = VerifyingReader::new(&b"other layer bytes"[..], d.clone(), 17);
        let err = bad.read_to_end(&mut Vec::new()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(matches!(bad.finish(), Err(DigestError::Mismatch { .. })));

        let mut long = VerifyingReader::new(&data[..], d.clone(), 4);
        assert!(long.read_to_end(&mut Vec::new()).is_err());

        // finish() checks what was read, even without reaching EOF.
        let unread = VerifyingReader::new(&data[..], d, data.len() as u64);
        assert!(matches!(
            unread.finish(),
            Err(DigestError::SizeMismatch { actual: 0, .. })
        ));
    }

    #[test]
    fn digesting_reader_hashes_what_is_read() {
        let data = b"abcdef";
        let mut r = DigestingReader::new(&data[..]);
        let mut buf = [0u8; 2];
        r.read_exact(&mut buf).unwrap();
        r.drain().unwrap();
        let (d, size, _) = r.finish();
        assert_eq!(size, 6);
        assert_eq!(d, Digest::sha256_of(data));
    }
}
