//! The pause image containerd needs as its `sandbox_image`: nothing is
//! downloaded, so it is made here. A static C program doing what Kubernetes'
//! pause does (sleep until SIGINT or SIGTERM, reap orphans) is compiled with
//! `gcc -static` and put alone into a one-layer OCI image layout (tar, gzip,
//! sha256, the same format `tests/common/fixtures.rs` writes), which is then
//! pushed to the benchmark's registry. berth needs none: its pods are pinned
//! namespaces.

use std::io::Write as _;
use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::common::registry::Registry;

/// Repository and tag in the registry.
pub const REPO_TAG: &str = "berth-bench/pause:3.9";
/// The image's ref name in its layout.
const LAYOUT_REF: &str = "pause:3.9";
/// mtime of the tar entry and `created` of the config: fixed, so the same
/// binary gives the same digests.
const FIXED_MTIME: u64 = 1_700_000_000;

/// Kubernetes' pause.c in essence.
const PAUSE_C: &str = r#"#include <signal.h>
#include <stddef.h>
#include <sys/wait.h>
#include <unistd.h>

static void down(int sig) { (void)sig; _exit(0); }

static void reap(int sig) {
  (void)sig;
  while (waitpid(-1, NULL, WNOHANG) > 0) {
  }
}

int main(void) {
  struct sigaction a = {0};
  a.sa_handler = down;
  sigaction(SIGINT, &a, NULL);
  sigaction(SIGTERM, &a, NULL);
  a.sa_handler = reap;
  a.sa_flags = SA_NOCLDSTOP;
  sigaction(SIGCHLD, &a, NULL);
  for (;;) pause();
}
"#;

/// Compiles the pause binary, builds its image and pushes it; returns the
/// reference to pull ("127.0.0.1:PORT/berth-bench/pause:3.9").
pub fn push(registry: &Registry) -> Result<String, String> {
    let dir = tempfile::Builder::new()
        .prefix("berth-bench-pause-")
        .tempdir()
        .map_err(|e| format!("temp dir for the pause image: {e}"))?;
    let source = dir.path().join("pause.c");
    let binary = dir.path().join("pause");
    std::fs::write(&source, PAUSE_C).map_err(|e| format!("write {}: {e}", source.display()))?;
    let out = Command::new("gcc")
        .args(["-static", "-Os", "-s", "-o"])
        .arg(&binary)
        .arg(&source)
        .output()
        .map_err(|e| format!("run gcc (apt-get install gcc libc6-dev): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "gcc -static pause.c failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let program = std::fs::read(&binary).map_err(|e| format!("read pause binary: {e}"))?;
    let layout = dir.path().join("layout");
    write_layout(&layout, &program)?;
    registry.push(&layout, LAYOUT_REF, REPO_TAG)?;
    Ok(format!("{}/{REPO_TAG}", registry.addr()))
}

/// An OCI image layout holding one image: `/pause`, entrypoint ["/pause"].
fn write_layout(dir: &Path, program: &[u8]) -> Result<(), String> {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).map_err(|e| format!("mkdir {}: {e}", blobs.display()))?;
    let put = |data: &[u8]| -> Result<Value, String> {
        let hex = hex(&Sha256::digest(data));
        std::fs::write(blobs.join(&hex), data).map_err(|e| format!("write blob: {e}"))?;
        Ok(json!({"digest": format!("sha256:{hex}"), "size": data.len()}))
    };

    let mut tar = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_mode(0o755);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(FIXED_MTIME);
    header.set_size(program.len() as u64);
    tar.append_data(&mut header, "pause", program)
        .map_err(|e| format!("tar: {e}"))?;
    let tar = tar.into_inner().map_err(|e| format!("tar: {e}"))?;
    let diff_id = format!("sha256:{}", hex(&Sha256::digest(&tar)));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar).map_err(|e| format!("gzip: {e}"))?;
    let gz = gz.finish().map_err(|e| format!("gzip: {e}"))?;

    let mut layer = put(&gz)?;
    layer["mediaType"] = json!("application/vnd.oci.image.layer.v1.tar+gzip");
    let config = json!({
        "created": "2023-11-14T22:13:20Z",
        "architecture": "amd64",
        "os": "linux",
        "config": {"Entrypoint": ["/pause"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    });
    let mut config = put(&to_json(&config)?)?;
    config["mediaType"] = json!("application/vnd.oci.image.config.v1+json");
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config,
        "layers": [layer],
    });
    let mut manifest = put(&to_json(&manifest)?)?;
    manifest["mediaType"] = json!("application/vnd.oci.image.manifest.v1+json");
    manifest["annotations"] = json!({"org.opencontainers.image.ref.name": LAYOUT_REF});
    let index = json!({"schemaVersion": 2, "manifests": [manifest]});
    std::fs::write(dir.join("index.json"), to_json(&index)?)
        .map_err(|e| format!("write index.json: {e}"))?;
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)
        .map_err(|e| format!("write oci-layout: {e}"))?;
    Ok(())
}

fn to_json(v: &Value) -> Result<Vec<u8>, String> {
    serde_json::to_vec(v).map_err(|e| format!("json: {e}"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
