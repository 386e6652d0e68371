//! The CNI attachment cache: per pod, the network config and parameters its
//! ADD was run with and the result it returned, one JSON file per pod under
//! the state dir. DEL and CHECK use these, not the config dir as it is now,
//! so a pod is taken off its network as it was put on it, across berthd
//! restarts and config changes. The entry is written before the ADD, so a
//! crash during ADD still leaves what DEL needs.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::conf::NetworkConfList;
use super::plugin::Attachment;
use crate::store::{self, Durability, StoreError};

/// Format tag of an entry.
const KIND: &str = "berthCniAttachmentV1";

/// One pod's attachment to a CNI network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CachedAttachment {
    pub kind: String,
    pub attachment: Attachment,
    pub config: NetworkConfList,
    /// The final result of the ADD; None until it returned.
    pub result: Option<Value>,
}

impl CachedAttachment {
    pub fn new(attachment: Attachment, config: NetworkConfList) -> CachedAttachment {
        CachedAttachment {
            kind: KIND.to_string(),
            attachment,
            config,
            result: None,
        }
    }

    pub fn pod_id(&self) -> &str {
        &self.attachment.container_id
    }
}

/// The cache directory: `<dir>/<pod id>.json`.
#[derive(Debug, Clone)]
pub struct AttachmentCache {
    dir: PathBuf,
}

impl AttachmentCache {
    /// Opens (makes) the cache dir.
    pub fn open(dir: &Path) -> Result<AttachmentCache, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Write {
            path: dir.to_path_buf(),
            source,
        })?;
        Ok(AttachmentCache {
            dir: dir.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Pod ids are checked as CNI container ids before they name a file.
    fn path(&self, pod_id: &str) -> PathBuf {
        self.dir.join(format!("{pod_id}.json"))
    }

    /// Writes an entry whole (replacing any earlier one) before returning.
    pub fn write(&self, entry: &CachedAttachment) -> Result<(), StoreError> {
        store::write_json(&self.path(entry.pod_id()), entry, Durability::Crash)
    }

    /// The pod's entry, None when it has none.
    pub fn read(&self, pod_id: &str) -> Result<Option<CachedAttachment>, StoreError> {
        let path = self.path(pod_id);
        if !path.exists() {
            return Ok(None);
        }
        store::read_json(&path).map(Some)
    }

    pub fn remove(&self, pod_id: &str) -> Result<(), StoreError> {
        store::remove(&self.path(pod_id))
    }

    /// Every readable entry; unreadable files are logged and left alone.
    pub fn list(&self) -> Vec<CachedAttachment> {
        let mut entries = Vec::new();
        let Ok(files) = std::fs::read_dir(&self.dir) else {
            return entries;
        };
        for file in files.flatten() {
            let path = file.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            match store::read_json::<CachedAttachment>(&path) {
                Ok(entry) if entry.kind == KIND => entries.push(entry),
                Ok(entry) => {
                    tracing::warn!(path = %path.display(), kind = %entry.kind, "skipping a CNI cache entry of an unknown kind")
                }
                Err(e) => tracing::warn!(error = %e, "skipping an unreadable CNI cache entry"),
            }
        }
        entries.sort_by(|a, b| a.pod_id().cmp(b.pod_id()));
        entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn entries_round_trip_and_go() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = AttachmentCache::open(&dir.path().join("results")).expect("open");
        assert!(cache.list().is_empty());
        assert_eq!(cache.read("p1").expect("read"), None);
        let config = NetworkConfList::from_bytes(
            Path::new("/etc/cni/net.d/10-a.conflist"),
            br#"{"cniVersion":"0.4.0","name":"a","plugins":[{"type":"bridge","x":{"y":[1,2]}}]}"#,
        )
        .expect("config");
        let attachment = Attachment::for_pod(
            "p1",
            Path::new("/run/berth/ns/p1/net"),
            "ns",
            "n",
            "u",
            vec![],
        )
        .expect("attachment");
        let mut entry = CachedAttachment::new(attachment, config);
        cache.write(&entry).expect("write");
        assert_eq!(cache.read("p1").expect("read").as_ref(), Some(&entry));
        entry.result = Some(json!({"cniVersion": "0.4.0", "ips": []}));
        cache.write(&entry).expect("rewrite");
        std::fs::write(cache.dir().join("junk.json"), "{").expect("junk");
        assert_eq!(cache.list(), vec![entry.clone()]);
        cache.remove("p1").expect("remove");
        cache.remove("p1").expect("remove twice");
        assert_eq!(cache.read("p1").expect("read"), None);
    }
}
