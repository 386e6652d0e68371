//! Image references (`busybox`, `registry.k8s.io/pause:3.9`, `name@sha256:…`) parsed and
//! normalized as docker and containerd do, and image ids told apart from references.

use std::fmt;
use std::str::FromStr;

use thiserror::Error;

use super::digest::{Digest, DigestError, is_lower_hex};

/// The registry of names without a domain, and the mirror/config key for Docker Hub.
pub const DEFAULT_REGISTRY: &str = "docker.io";
/// Where Docker Hub's registry API actually lives.
pub const DOCKER_HUB_API_HOST: &str = "registry-1.docker.io";
/// An old spelling of Docker Hub, normalized to [`DEFAULT_REGISTRY`].
const LEGACY_DEFAULT_REGISTRY: &str = "index.docker.io";
/// Prefix of Docker Hub's official images (`busybox` is `library/busybox`).
const OFFICIAL_REPO_PREFIX: &str = "library/";
const DEFAULT_TAG: &str = "latest";
/// Longest `registry/repository`, as in distribution/reference.
const NAME_TOTAL_LENGTH_MAX: usize = 255;
const TAG_LENGTH_MAX: usize = 128;

/// Why a string is not a valid image reference; every message names the input.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ReferenceError {
    #[error("invalid image reference {input:?}: empty")]
    Empty { input: String },
    #[error(
        "invalid image reference {input:?}: a 64-digit hex string is an image id, not a repository name"
    )]
    HexIdentifier { input: String },
    #[error("invalid image reference {input:?}: repository name {repository:?} must be lowercase")]
    Uppercase { input: String, repository: String },
    #[error("invalid image reference {input:?}: invalid registry {registry:?}")]
    InvalidRegistry { input: String, registry: String },
    #[error("invalid image reference {input:?}: invalid repository path component {component:?}")]
    InvalidPathComponent { input: String, component: String },
    #[error("invalid image reference {input:?}: invalid tag {tag:?}")]
    InvalidTag { input: String, tag: String },
    #[error("invalid image reference {input:?}: {source}")]
    InvalidDigest {
        input: String,
        #[source]
        source: DigestError,
    },
    #[error(
        "invalid image reference {input:?}: name is {len} characters long, at most {NAME_TOTAL_LENGTH_MAX} allowed"
    )]
    NameTooLong { input: String, len: usize },
}

/// A normalized image reference: registry, repository, and a tag, a digest, or both
/// (the digest is what gets pulled; the tag is kept for display and lookup).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Reference {
    /// `registry/repository`, kept whole so `name()` borrows.
    name: String,
    registry_len: usize,
    tag: Option<String>,
    digest: Option<Digest>,
}

impl Reference {
    /// Parses and normalizes a reference: adds `docker.io` and `library/` as docker
    /// does, and the tag `latest` when neither tag nor digest is given.
    pub fn parse(s: &str) -> Result<Reference, ReferenceError> {
        let err_input = || s.to_owned();
        if s.is_empty() {
            return Err(ReferenceError::Empty { input: err_input() });
        }
        if s.len() == 64 && is_lower_hex(s) {
            return Err(ReferenceError::HexIdentifier { input: err_input() });
        }

        let (rest, digest) = match s.split_once('@') {
            Some((rest, digest)) => {
                let digest =
                    Digest::parse(digest).map_err(|source| ReferenceError::InvalidDigest {
                        input: err_input(),
                        source,
                    })?;
                (rest, Some(digest))
            }
            None => (s, None),
        };

        // The tag is after the last ':' that follows the last '/': a ':' before
        // that belongs to the registry's port.
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].find(':') {
            Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
            None => (rest, None),
        };

        let (registry, path) = split_registry(name);
        if registry.is_empty() || !valid_registry(registry) {
            return Err(ReferenceError::InvalidRegistry {
                input: err_input(),
                registry: registry.to_owned(),
            });
        }
        let registry = if registry == LEGACY_DEFAULT_REGISTRY {
            DEFAULT_REGISTRY
        } else {
            registry
        };
        let official = registry == DEFAULT_REGISTRY && !path.contains('/');

        if path.to_lowercase() != path {
            return Err(ReferenceError::Uppercase {
                input: err_input(),
                repository: path.to_owned(),
            });
        }
        for component in path.split('/') {
            if !valid_path_component(component) {
                return Err(ReferenceError::InvalidPathComponent {
                    input: err_input(),
                    component: component.to_owned(),
                });
            }
        }

        let mut full = String::with_capacity(registry.len() + 1 + 8 + path.len());
        full.push_str(registry);
        full.push('/');
        if official {
            full.push_str(OFFICIAL_REPO_PREFIX);
        }
        full.push_str(path);
        if full.len() > NAME_TOTAL_LENGTH_MAX {
            return Err(ReferenceError::NameTooLong {
                input: err_input(),
                len: full.len(),
            });
        }

        if let Some(tag) = tag
            && !valid_tag(tag)
        {
            return Err(ReferenceError::InvalidTag {
                input: err_input(),
                tag: tag.to_owned(),
            });
        }
        let tag = match (tag, &digest) {
            (Some(tag), _) => Some(tag.to_owned()),
            (None, None) => Some(DEFAULT_TAG.to_owned()),
            (None, Some(_)) => None,
        };

        Ok(Reference {
            name: full,
            registry_len: registry.len(),
            tag,
            digest,
        })
    }

    /// The registry as named in references and mirror config, e.g. `docker.io`.
    pub fn registry(&self) -> &str {
        &self.name[..self.registry_len]
    }

    /// The host (and port) that serves the registry API: `registry-1.docker.io`
    /// for Docker Hub, the registry itself otherwise.
    pub fn api_host(&self) -> &str {
        match self.registry() {
            DEFAULT_REGISTRY => DOCKER_HUB_API_HOST,
            other => other,
        }
    }

    /// The repository path, e.g. `library/busybox`.
    pub fn repository(&self) -> &str {
        &self.name[self.registry_len + 1..]
    }

    /// `registry/repository`, e.g. `docker.io/library/busybox`.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// What to ask the registry's manifest endpoint for: the digest if there is
    /// one, else the tag.
    pub fn manifest_reference(&self) -> &str {
        match (&self.digest, &self.tag) {
            (Some(digest), _) => digest.as_str(),
            (None, Some(tag)) => tag,
            // parse() always sets a tag or a digest.
            (None, None) => DEFAULT_TAG,
        }
    }

    /// The same reference pinned to `digest`, keeping the tag.
    pub fn with_digest(&self, digest: Digest) -> Reference {
        Reference {
            digest: Some(digest),
            ..self.clone()
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl FromStr for Reference {
    type Err = ReferenceError;

    fn from_str(s: &str) -> Result<Reference, ReferenceError> {
        Reference::parse(s)
    }
}

/// What a user may name an image by: its id (the config digest) or a reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ImageName {
    Id(Digest),
    Reference(Reference),
}

/// Tells an image id (`<64 hex>` or `sha256:<64 hex>`) from a reference, and parses
/// either. `sha256:<64 hex>` would also parse as repository `sha256` with a
/// 64-character tag; docker treats it as an id, and so do we.
pub fn parse_image_name(s: &str) -> Result<ImageName, ReferenceError> {
    let hex = s.strip_prefix("sha256:").unwrap_or(s);
    if hex.len() == 64 && is_lower_hex(hex) {
        let digest = Digest::parse(&format!("sha256:{hex}")).map_err(|source| {
            ReferenceError::InvalidDigest {
                input: s.to_owned(),
                source,
            }
        })?;
        return Ok(ImageName::Id(digest));
    }
    Reference::parse(s).map(ImageName::Reference)
}

/// Splits off the registry as distribution/reference's `splitDockerDomain` does:
/// the first component is a registry if it holds '.' or ':', is `localhost`, or has
/// uppercase letters (which a repository cannot have).
fn split_registry(name: &str) -> (&str, &str) {
    match name.split_once('/') {
        Some((first, rest))
            if first.contains(['.', ':'])
                || first == "localhost"
                || first.bytes().any(|b| b.is_ascii_uppercase()) =>
        {
            (first, rest)
        }
        _ => (DEFAULT_REGISTRY, name),
    }
}

/// `host[:port]` where host is dot-separated labels of `[a-zA-Z0-9-]` not starting
/// or ending with '-', or a bracketed IPv6 address; port is decimal digits.
fn valid_registry(registry: &str) -> bool {
    let valid_port = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    if let Some(rest) = registry.strip_prefix('[') {
        let Some((ipv6, after)) = rest.split_once(']') else {
            return false;
        };
        let ipv6_ok = !ipv6.is_empty() && ipv6.bytes().all(|b| b.is_ascii_hexdigit() || b == b':');
        return ipv6_ok && (after.is_empty() || after.strip_prefix(':').is_some_and(valid_port));
    }
    let (host, port) = match registry.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (registry, None),
    };
    let host_ok = host.split('.').all(|label| {
        !label.is_empty()
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    });
    host_ok && port.is_none_or(valid_port)
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn valid_path_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    let mut i = 0;
    loop {
        // A run of [a-z0-9]+.
        let start = i;
        while i < b.len() && alnum(b[i]) {
            i += 1;
        }
        if i == start {
            return false;
        }
        if i == b.len() {
            return true;
        }
        // One separator: '.', '_', '__' or '-'+.
        match b[i] {
            b'.' => i += 1,
            b'_' => i += if b.get(i + 1) == Some(&b'_') { 2 } else { 1 },
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
    }
}

/// `[\w][\w.-]{0,127}`
fn valid_tag(tag: &str) -> bool {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let b = tag.as_bytes();
    !b.is_empty()
        && b.len() <= TAG_LENGTH_MAX
        && word(b[0])
        && b[1..].iter().all(|&c| word(c) || c == b'.' || c == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "4a5e0c5bb7b8f6d6d0a04a44e6dbb2e5e8dd5bb1cbf21c5b2a9f5a1c2b3d4e5f";

    fn dig() -> String {
        format!("sha256:{HEX}")
    }

    /// (input, normalized, registry, repository, tag); `@D` stands for `@sha256:<HEX>`.
    const GOOD: &[(&str, &str, &str, &str, Option<&str>)] = &[
        (
            "busybox",
            "docker.io/library/busybox:latest",
            "docker.io",
            "library/busybox",
            Some("latest"),
        ),
        (
            "busybox:1.36",
            "docker.io/library/busybox:1.36",
            "docker.io",
            "library/busybox",
            Some("1.36"),
        ),
        (
            "user/repo",
            "docker.io/user/repo:latest",
            "docker.io",
            "user/repo",
            Some("latest"),
        ),
        (
            "docker.io/busybox",
            "docker.io/library/busybox:latest",
            "docker.io",
            "library/busybox",
            Some("latest"),
        ),
        (
            "index.docker.io/library/busybox:musl",
            "docker.io/library/busybox:musl",
            "docker.io",
            "library/busybox",
            Some("musl"),
        ),
        (
            "index.docker.io/busybox",
            "docker.io/library/busybox:latest",
            "docker.io",
            "library/busybox",
            Some("latest"),
        ),
        (
            "localhost/x",
            "localhost/x:latest",
            "localhost",
            "x",
            Some("latest"),
        ),
        (
            "localhost:5000/x",
            "localhost:5000/x:latest",
            "localhost:5000",
            "x",
            Some("latest"),
        ),
        (
            "127.0.0.1:5000/a/b:tag",
            "127.0.0.1:5000/a/b:tag",
            "127.0.0.1:5000",
            "a/b",
            Some("tag"),
        ),
        (
            "[::1]:5000/a:v1",
            "[::1]:5000/a:v1",
            "[::1]:5000",
            "a",
            Some("v1"),
        ),
        (
            "registry.k8s.io/pause:3.9",
            "registry.k8s.io/pause:3.9",
            "registry.k8s.io",
            "pause",
            Some("3.9"),
        ),
        // An uppercase first component is a registry (repositories are lowercase).
        (
            "Registry.Example.com/a/b",
            "Registry.Example.com/a/b:latest",
            "Registry.Example.com",
            "a/b",
            Some("latest"),
        ),
        (
            "quay.io/a_b/c__d/e--f/g.h:V_1.0-rc",
            "quay.io/a_b/c__d/e--f/g.h:V_1.0-rc",
            "quay.io",
            "a_b/c__d/e--f/g.h",
            Some("V_1.0-rc"),
        ),
        (
            "busybox@D",
            "docker.io/library/busybox@D",
            "docker.io",
            "library/busybox",
            None,
        ),
        (
            "busybox:1.36@D",
            "docker.io/library/busybox:1.36@D",
            "docker.io",
            "library/busybox",
            Some("1.36"),
        ),
        (
            "localhost:5000/a/b:t@D",
            "localhost:5000/a/b:t@D",
            "localhost:5000",
            "a/b",
            Some("t"),
        ),
        // Without a '/', "localhost:5000" is a name and a tag, as in docker.
        (
            "localhost:5000",
            "docker.io/library/localhost:5000",
            "docker.io",
            "library/localhost",
            Some("5000"),
        ),
    ];

    #[test]
    fn normalizes_good_references() {
        let at_digest = format!("@{}", dig());
        for &(input, display, registry, repo, tag) in GOOD {
            let input = input.replace("@D", &at_digest);
            let display = display.replace("@D", &at_digest);
            let r = Reference::parse(&input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(r.to_string(), display, "{input}");
            assert_eq!(r.registry(), registry, "{input}");
            assert_eq!(r.repository(), repo, "{input}");
            assert_eq!(r.name(), format!("{registry}/{repo}"), "{input}");
            assert_eq!(r.tag(), tag, "{input}");
            assert_eq!(r.digest().is_some(), input.contains('@'), "{input}");
            let api = if registry == "docker.io" {
                "registry-1.docker.io"
            } else {
                registry
            };
            assert_eq!(r.api_host(), api, "{input}");
            // The normalized form is a fixed point.
            assert_eq!(Reference::parse(&display).unwrap(), r, "{input}");
        }

        let long_tag = "t".repeat(128);
        let r = Reference::parse(&format!("a:{long_tag}")).unwrap();
        assert_eq!(r.tag(), Some(long_tag.as_str()));
        let longest_name = format!(
            "a/{}",
            "b".repeat(NAME_TOTAL_LENGTH_MAX - "docker.io/a/".len())
        );
        assert_eq!(Reference::parse(&longest_name).unwrap().name().len(), 255);
    }

    #[test]
    fn refuses_bad_references() {
        let d = dig();
        let long_name = format!("a/{}", "b".repeat(250));
        let table: Vec<String> = vec![
            "".into(),
            HEX.into(),
            "Busybox".into(),
            "library/Busybox".into(),
            "docker.io/Library/busybox".into(),
            "busybox:".into(),
            "busybox:-tag".into(),
            "busybox:.tag".into(),
            "busybox:ta/g".into(),
            format!("busybox:{}", "t".repeat(129)),
            "busybox@".into(),
            "busybox@sha256:abc".into(),
            format!("busybox@sha512:{}", "a".repeat(128)),
            format!("busybox@{}", d.to_uppercase()),
            "/busybox".into(),
            "busybox/".into(),
            "a//b".into(),
            "-a/b".into(),
            "a-/b".into(),
            "a/.b".into(),
            "a/b.".into(),
            "a/b...c".into(),
            "a/b___c".into(),
            "a/b_-c".into(),
            "a b".into(),
            "localhost:/x".into(),
            "localhost:50a/x".into(),
            "-host.com/x".into(),
            "host-.com/x".into(),
            "host..com/x".into(),
            "[::1/x".into(),
            "[]:5000/x".into(),
            "[::1]x/y".into(),
            "example.com/ä".into(),
            long_name.clone(),
            ":tag".into(),
            "@sha256:x".into(),
        ];
        for input in &table {
            match Reference::parse(input) {
                Ok(r) => panic!("{input:?} parsed as {r}"),
                Err(e) => assert!(
                    e.to_string().contains(&format!("{input:?}")),
                    "message {e} does not name {input:?}"
                ),
            }
        }
        assert!(matches!(
            Reference::parse(&long_name),
            Err(ReferenceError::NameTooLong { len: 262, .. })
        ));
        assert!(matches!(
            Reference::parse(HEX),
            Err(ReferenceError::HexIdentifier { .. })
        ));
    }

    #[test]
    fn with_digest_keeps_tag_and_digest_wins() {
        let d = Digest::parse(&dig()).unwrap();
        let r = Reference::parse("registry.k8s.io/pause:3.9").unwrap();
        assert_eq!(r.manifest_reference(), "3.9");
        let pinned = r.with_digest(d.clone());
        assert_eq!(pinned.tag(), Some("3.9"));
        assert_eq!(pinned.digest(), Some(&d));
        assert_eq!(pinned.manifest_reference(), d.as_str());
        assert_eq!(pinned.to_string(), format!("registry.k8s.io/pause:3.9@{d}"));
    }

    #[test]
    fn tells_ids_from_references() {
        let d = Digest::parse(&dig()).unwrap();
        assert_eq!(parse_image_name(HEX).unwrap(), ImageName::Id(d.clone()));
        assert_eq!(parse_image_name(&dig()).unwrap(), ImageName::Id(d));
        match parse_image_name("busybox").unwrap() {
            ImageName::Reference(r) => {
                assert_eq!(r.to_string(), "docker.io/library/busybox:latest")
            }
            other => panic!("{other:?}"),
        }
        // A short id prefix is a (valid) repository name; callers match prefixes.
        assert!(matches!(
            parse_image_name(&HEX[..12]).unwrap(),
            ImageName::Reference(_)
        ));
        // One digit short is not an id: it reads as repository `sha256` with a tag.
        assert!(matches!(
            parse_image_name(&format!("sha256:{}", &HEX[..63])),
            Ok(ImageName::Reference(_))
        ));
        assert!(parse_image_name(&HEX.to_uppercase()).is_err());
    }
}
