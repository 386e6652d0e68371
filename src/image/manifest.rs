//! The JSON documents of an image: OCI and Docker v2 schema 2 manifests,
//! OCI indexes and Docker manifest lists, and the image config; plus the
//! choice of the host's platform from an index.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::digest::Digest;

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{what} is not valid JSON of its kind: {source}")]
    Parse {
        what: String,
        source: serde_json::Error,
    },
    #[error("unsupported manifest media type {0:?} (schema 1 manifests are not supported)")]
    MediaType(String),
    #[error("no manifest for {os}/{architecture} in the index")]
    NoPlatform { os: String, architecture: String },
    #[error("image config lists {diff_ids} layers but the manifest has {layers}")]
    LayerCount { diff_ids: usize, layers: usize },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Index {
    pub manifests: Vec<Descriptor>,
}

/// A fetched top-level document: either a manifest or an index of them.
pub enum ManifestKind {
    Manifest(Manifest),
    Index(Index),
}

/// Parses a manifest document by its media type.
pub fn parse(media_type: &str, body: &[u8]) -> Result<ManifestKind, ManifestError> {
    let parse_err = |what: &str| {
        let what = what.to_string();
        move |source| ManifestError::Parse { what, source }
    };
    match media_type {
        OCI_INDEX | DOCKER_LIST => Ok(ManifestKind::Index(
            serde_json::from_slice(body).map_err(parse_err("index"))?,
        )),
        OCI_MANIFEST | DOCKER_MANIFEST => Ok(ManifestKind::Manifest(
            serde_json::from_slice(body).map_err(parse_err("manifest"))?,
        )),
        other => Err(ManifestError::MediaType(other.to_string())),
    }
}

/// The platform berth runs images for: linux and the host's architecture.
pub fn host_platform() -> Platform {
    let (architecture, variant) = match std::env::consts::ARCH {
        "x86_64" => ("amd64", None),
        "aarch64" => ("arm64", Some("v8")),
        "x86" => ("386", None),
        "arm" => ("arm", Some("v7")),
        "powerpc64" => ("ppc64le", None),
        other => (other, None),
    };
    Platform {
        architecture: architecture.to_string(),
        os: "linux".to_string(),
        variant: variant.map(String::from),
    }
}

/// Picks the manifest for `platform`: same OS and architecture, preferring the
/// same variant, then one without a variant, then any.
pub fn select_platform<'a>(
    index: &'a Index,
    platform: &Platform,
) -> Result<&'a Descriptor, ManifestError> {
    let candidates: Vec<&Descriptor> = index
        .manifests
        .iter()
        .filter(|d| matches!(d.media_type.as_str(), OCI_MANIFEST | DOCKER_MANIFEST | ""))
        .filter(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| p.os == platform.os && p.architecture == platform.architecture)
        })
        .collect();
    let variant = |d: &&Descriptor| d.platform.as_ref().and_then(|p| p.variant.clone());
    candidates
        .iter()
        .find(|d| variant(d) == platform.variant)
        .or_else(|| candidates.iter().find(|d| variant(d).is_none()))
        .or_else(|| candidates.first())
        .copied()
        .ok_or_else(|| ManifestError::NoPlatform {
            os: platform.os.clone(),
            architecture: platform.architecture.clone(),
        })
}

/// The image config document (`application/vnd.oci.image.config.v1+json`).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ConfigFile {
    #[serde(default)]
    pub config: Option<RunConfig>,
    pub rootfs: RootFs,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RootFs {
    #[serde(default)]
    pub diff_ids: Vec<Digest>,
}

/// How the image wants to be run; the fields CRI and the runtime use.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RunConfig {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub user: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub env: Vec<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub entrypoint: Vec<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub cmd: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub working_dir: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub exposed_ports: BTreeMap<String, serde_json::Value>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub volumes: BTreeMap<String, serde_json::Value>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub stop_signal: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub labels: BTreeMap<String, String>,
}

/// Image configs write `null` for empty lists and maps.
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

pub fn parse_config(body: &[u8]) -> Result<ConfigFile, ManifestError> {
    serde_json::from_slice(body).map_err(|source| ManifestError::Parse {
        what: "image config".to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(arch: &str, variant: Option<&str>, n: u8) -> String {
        let digest = Digest::sha256_of(&[n]);
        let variant = variant
            .map(|v| format!(",\"variant\":\"{v}\""))
            .unwrap_or_default();
        format!(
            "{{\"mediaType\":\"{OCI_MANIFEST}\",\"digest\":\"{digest}\",\"size\":1,\"platform\":{{\"os\":\"linux\",\"architecture\":\"{arch}\"{variant}}}}}"
        )
    }

    fn index(entries: &[String]) -> Index {
        let body = format!("{{\"manifests\":[{}]}}", entries.join(","));
        match parse(OCI_INDEX, body.as_bytes()).expect("index parses") {
            ManifestKind::Index(i) => i,
            ManifestKind::Manifest(_) => panic!("not an index"),
        }
    }

    #[test]
    fn the_host_platform_is_picked_from_an_index() {
        let i = index(&[desc("arm64", Some("v8"), 1), desc("amd64", None, 2)]);
        let amd64 = Platform {
            architecture: "amd64".into(),
            os: "linux".into(),
            variant: None,
        };
        assert_eq!(
            select_platform(&i, &amd64).expect("amd64").digest,
            Digest::sha256_of(&[2])
        );
        let arm64 = Platform {
            architecture: "arm64".into(),
            os: "linux".into(),
            variant: Some("v8".into()),
        };
        assert_eq!(
            select_platform(&i, &arm64).expect("arm64").digest,
            Digest::sha256_of(&[1])
        );
        let s390x = Platform {
            architecture: "s390x".into(),
            os: "linux".into(),
            variant: None,
        };
        assert!(select_platform(&i, &s390x).is_err());
    }

    #[test]
    fn a_variantless_entry_serves_a_variant_host() {
        let i = index(&[desc("arm64", None, 3)]);
        let arm64 = Platform {
            architecture: "arm64".into(),
            os: "linux".into(),
            variant: Some("v8".into()),
        };
        assert_eq!(
            select_platform(&i, &arm64).expect("arm64").digest,
            Digest::sha256_of(&[3])
        );
    }

    #[test]
    fn configs_with_nulls_parse() {
        let c = parse_config(
            br#"{"config":{"User":"1002","Env":null,"Cmd":["sh"],"Volumes":null,"StopSignal":"SIGUSR1"},"rootfs":{"type":"layers","diff_ids":[]}}"#,
        )
        .expect("config parses");
        let run = c.config.expect("run config");
        assert_eq!(run.user, "1002");
        assert!(run.env.is_empty());
        assert_eq!(run.cmd, vec!["sh"]);
        assert_eq!(run.stop_signal, "SIGUSR1");
    }

    #[test]
    fn schema1_is_refused_by_name() {
        let err = parse(
            "application/vnd.docker.distribution.manifest.v1+prettyjws",
            b"{}",
        )
        .err()
        .expect("schema 1 refused")
        .to_string();
        assert!(err.contains("schema 1"), "{err}");
    }
}
