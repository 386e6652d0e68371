//! The CRI ImageService against a real registry: pull by tag, digest and id,
//! status and list, users, platforms, layer contents, removal and GC, mirrors,
//! TLS, basic auth, and a stalled registry.

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::berthd::{Berthd, BerthdOptions};
use common::fixtures::{self, Fixture, PushedImage};
use common::registry::{Registry, RegistryOptions};
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::*;
use sha2::Digest as _;
use tonic::transport::Channel;

fn spec(image: &str) -> Option<ImageSpec> {
    Some(ImageSpec {
        image: image.to_string(),
        ..Default::default()
    })
}

async fn pull(
    client: &mut ImageServiceClient<Channel>,
    image: &str,
) -> Result<String, tonic::Status> {
    client
        .pull_image(PullImageRequest {
            image: spec(image),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().image_ref)
}

async fn status(client: &mut ImageServiceClient<Channel>, image: &str) -> Option<Image> {
    client
        .image_status(ImageStatusRequest {
            image: spec(image),
            verbose: false,
        })
        .await
        .expect("ImageStatus")
        .into_inner()
        .image
}

async fn remove(client: &mut ImageServiceClient<Channel>, image: &str) {
    client
        .remove_image(RemoveImageRequest { image: spec(image) })
        .await
        .expect("RemoveImage");
}

fn registry_with_fixtures() -> (Registry, std::collections::HashMap<Fixture, PushedImage>) {
    let registry = Registry::start().expect("registry");
    let pushed = fixtures::push_all(&registry).expect("push fixtures");
    (registry, pushed)
}

/// sha256 of "<parent> <diff id>", the OCI chain id rule.
fn chain_dirs(root: &Path, diff_ids: &[String]) -> Vec<PathBuf> {
    let mut chain: Option<String> = None;
    let mut dirs = Vec::new();
    for diff_id in diff_ids {
        let next = match &chain {
            None => diff_id.clone(),
            Some(parent) => format!(
                "sha256:{}",
                hex::encode(sha2::Sha256::digest(format!("{parent} {diff_id}")))
            ),
        };
        dirs.push(
            root.join("snapshots")
                .join(next.trim_start_matches("sha256:")),
        );
        chain = Some(next);
    }
    dirs
}

fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}

/// Waits until `cond` holds; garbage collection runs after RemoveImage returns.
fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_by_tag_then_find_by_tag_digest_and_id() {
    let (_registry, pushed) = registry_with_fixtures();
    let berthd = Berthd::start();
    let mut images = berthd.images().await;
    let busybox = &pushed[&Fixture::BusyboxLatest];

    let image_ref = pull(&mut images, &busybox.reference)
        .await
        .expect("pull by tag");
    assert_eq!(
        image_ref, busybox.config_digest,
        "image ref is the image id"
    );

    let by_tag = status(&mut images, &busybox.reference)
        .await
        .expect("status by tag");
    assert_eq!(by_tag.id, busybox.config_digest);
    assert_eq!(by_tag.repo_tags, vec![busybox.reference.clone()]);
    let name = busybox
        .reference
        .rsplit_once(':')
        .map(|(n, _)| n)
        .expect("name:tag");
    assert_eq!(
        by_tag.repo_digests,
        vec![format!("{name}@{}", busybox.manifest_digest)]
    );
    assert!(by_tag.size > 0);

    let by_digest = status(&mut images, &busybox.digest_reference())
        .await
        .expect("by digest");
    let by_id = status(&mut images, &busybox.config_digest)
        .await
        .expect("by id");
    let by_bare_id = status(
        &mut images,
        busybox.config_digest.trim_start_matches("sha256:"),
    )
    .await
    .expect("by bare id");
    assert_eq!(by_digest, by_tag);
    assert_eq!(by_id, by_tag);
    assert_eq!(by_bare_id, by_tag);

    let listed = images
        .list_images(ListImagesRequest::default())
        .await
        .expect("ListImages")
        .into_inner()
        .images;
    assert_eq!(listed, vec![by_tag.clone()]);

    // Pulling by digest adds nothing new but finds the same image.
    let again = pull(&mut images, &busybox.digest_reference())
        .await
        .expect("pull by digest");
    assert_eq!(again, busybox.config_digest);

    let verbose = images
        .image_status(ImageStatusRequest {
            image: spec(&busybox.reference),
            verbose: true,
        })
        .await
        .expect("verbose status")
        .into_inner();
    let info: serde_json::Value =
        serde_json::from_str(&verbose.info["info"]).expect("info is JSON");
    assert_eq!(info["imageSpec"]["config"]["Cmd"][0], "sh");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_users_are_reported_as_uid_or_username() {
    let (_registry, pushed) = registry_with_fixtures();
    let berthd = Berthd::start();
    let mut images = berthd.images().await;
    for (fixture, uid, username) in [
        (Fixture::UserWwwData, None, "www-data"),
        (Fixture::User1002, Some(1002), ""),
        (Fixture::User1003, Some(1003), ""),
    ] {
        let reference = &pushed[&fixture].reference;
        pull(&mut images, reference).await.expect("pull");
        let image = status(&mut images, reference).await.expect("status");
        assert_eq!(image.uid.map(|u| u.value), uid, "{reference}");
        assert_eq!(image.username, username, "{reference}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_resolves_to_the_host_platform() {
    let (_registry, pushed) = registry_with_fixtures();
    let berthd = Berthd::start();
    let mut images = berthd.images().await;
    let multiarch = &pushed[&Fixture::MultiArch];
    let id = pull(&mut images, &multiarch.reference)
        .await
        .expect("pull index");
    let amd64 = fixtures::info(Fixture::MultiArch)
        .platforms
        .iter()
        .find(|p| p.architecture == "amd64")
        .expect("amd64 entry");
    assert_eq!(id, amd64.config_digest);
    // The repo digest is the index's, as with containerd.
    let image = status(&mut images, &multiarch.reference)
        .await
        .expect("status");
    assert!(image.repo_digests[0].ends_with(&multiarch.manifest_digest));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layers_unpack_with_whiteouts_opaque_dirs_setuid_and_capabilities() {
    let (_registry, pushed) = registry_with_fixtures();
    let berthd = Berthd::start();
    let mut images = berthd.images().await;
    pull(&mut images, &pushed[&Fixture::Layers].reference)
        .await
        .expect("pull layers");
    pull(&mut images, &pushed[&Fixture::Caps].reference)
        .await
        .expect("pull caps");
    pull(&mut images, &pushed[&Fixture::Zstd].reference)
        .await
        .expect("pull zstd");

    let layers = chain_dirs(&berthd.root, &fixtures::info(Fixture::Layers).diff_ids);
    let whiteouts: Vec<_> = layers
        .iter()
        .map(|d| d.join("a/deleted.txt"))
        .filter(|p| {
            std::fs::symlink_metadata(p)
                .is_ok_and(|m| m.file_type().is_char_device() && m.rdev() == 0)
        })
        .collect();
    assert_eq!(
        whiteouts.len(),
        1,
        "one layer holds the whiteout as a 0:0 char device"
    );
    let opaque = layers.iter().filter(|d| {
        xattr(&d.join("opq"), "trusted.overlay.opaque").as_deref() == Some(b"y".as_slice())
    });
    assert_eq!(opaque.count(), 1, "one layer marks opq opaque");

    // Through a real overlay mount the deleted and hidden files are gone.
    let merged = tempfile::tempdir().expect("mountpoint");
    let lower = layers
        .iter()
        .rev()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
    let out = std::process::Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o"])
        .arg(format!("lowerdir={lower}"))
        .arg(merged.path())
        .output()
        .expect("mount overlay");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen = (
        merged.path().join("a/deleted.txt").exists(),
        merged.path().join("a/kept.txt").exists(),
        merged.path().join("opq/old.txt").exists(),
        merged.path().join("opq/new.txt").exists(),
    );
    let _ = std::process::Command::new("umount")
        .arg(merged.path())
        .status();
    assert_eq!(seen, (false, true, false, true));

    let caps = chain_dirs(&berthd.root, &fixtures::info(Fixture::Caps).diff_ids);
    let suid = caps
        .iter()
        .find_map(|d| std::fs::symlink_metadata(d.join("bin/suid-busybox")).ok())
        .expect("setuid binary unpacked");
    assert_eq!(suid.mode() & 0o7777, 0o4755);
    assert_eq!(suid.uid(), 0);
    let cap = caps
        .iter()
        .find_map(|d| xattr(&d.join("usr/local/bin/capfile"), "security.capability"))
        .expect("capability xattr unpacked");
    assert_eq!(cap.len(), 20);
}

fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let out = std::process::Command::new("getfattr")
        .args(["--absolute-names", "--only-values", "-h", "-n", name])
        .arg(path)
        .output()
        .ok()?;
    out.status.success().then_some(out.stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_tag_keeps_the_others_and_removing_the_image_collects_it() {
    let (registry, pushed) = registry_with_fixtures();
    // A second name for the same image.
    let second = format!(
        "{}/{}/busybox:again",
        registry.addr(),
        fixtures::REPO_PREFIX
    );
    registry
        .push(
            fixtures::layout(),
            &Fixture::BusyboxLatest.layout_ref(),
            &second[registry.addr().len() + 1..],
        )
        .expect("push second tag");
    let berthd = Berthd::start();
    let mut images = berthd.images().await;
    let first = pushed[&Fixture::BusyboxLatest].reference.clone();
    let id = pull(&mut images, &first).await.expect("pull");
    assert_eq!(pull(&mut images, &second).await.expect("pull again"), id);
    assert_eq!(
        status(&mut images, &id)
            .await
            .expect("status")
            .repo_tags
            .len(),
        2
    );

    remove(&mut images, &first).await;
    let left = status(&mut images, &id)
        .await
        .expect("image stays with one tag");
    assert_eq!(left.repo_tags, vec![second.clone()]);
    assert!(status(&mut images, &first).await.is_none());

    remove(&mut images, &id).await;
    assert!(status(&mut images, &id).await.is_none());
    assert!(status(&mut images, &second).await.is_none());
    let content = berthd.root.join("content/blobs/sha256");
    let snapshots = berthd.root.join("snapshots");
    eventually("GC of blobs and snapshots", || {
        count_files(&content) == 0 && count_files(&snapshots) == 0
    });

    // Unknown images: removal succeeds, status is OK with no image.
    remove(&mut images, "docker.io/library/never-pulled:1").await;
    remove(&mut images, &id).await;
    assert!(status(&mut images, "never-pulled").await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_layers_are_stored_once_and_survive_removal_of_one_image() {
    let (_registry, pushed) = registry_with_fixtures();
    let berthd = Berthd::start();
    let mut images = berthd.images().await;
    let a = pull(&mut images, &pushed[&Fixture::Busybox10].reference)
        .await
        .expect("pull 1.0");
    pull(&mut images, &pushed[&Fixture::Busybox11].reference)
        .await
        .expect("pull 1.1");
    let base = chain_dirs(&berthd.root, &fixtures::info(Fixture::Busybox10).diff_ids)[0].clone();
    // Base layer shared + one own layer each.
    assert_eq!(count_files(&berthd.root.join("snapshots")), 3);
    remove(&mut images, &a).await;
    eventually("GC of the 1.0 layer", || {
        count_files(&berthd.root.join("snapshots")) == 2
    });
    assert!(base.join("bin/busybox").exists(), "shared base layer kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_names_are_invalid_argument_and_missing_images_not_found() {
    let (registry, _pushed) = registry_with_fixtures();
    let berthd = Berthd::start();
    let mut images = berthd.images().await;
    for bad in ["UPPERCASE", "a//b", "busybox:bad tag", ""] {
        let err = pull(&mut images, bad).await.expect_err(bad);
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad}: {err:?}");
    }
    let missing = format!("{}/berth-test/absent:1", registry.addr());
    let err = pull(&mut images, &missing).await.expect_err("absent image");
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    assert!(err.message().contains("absent"), "{}", err.message());
    assert_eq!(
        count_files(&berthd.root.join("snapshots")),
        0,
        "nothing half-made"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_serves_an_unreachable_registry_and_no_endpoint_means_no_lookup() {
    let (registry, _pushed) = registry_with_fixtures();
    let berthd = Berthd::start_with(BerthdOptions {
        extra_config: format!(
            "registries:\n  mirrors:\n    registry.invalid:\n      endpoint: [\"http://{}\"]\n  disable_default_endpoint: true\n",
            registry.addr()
        ),
    });
    let mut images = berthd.images().await;
    let via_mirror = "registry.invalid/berth-test/busybox:latest";
    let id = pull(&mut images, via_mirror)
        .await
        .expect("pull through the mirror");
    assert_eq!(id, fixtures::info(Fixture::BusyboxLatest).config_digest);
    assert_eq!(
        status(&mut images, via_mirror)
            .await
            .expect("status")
            .repo_tags,
        vec![via_mirror.to_string()]
    );

    // Missing at the mirror: the mirror's NotFound, not a lookup of the upstream host.
    let err = pull(&mut images, "registry.invalid/berth-test/absent:1")
        .await
        .expect_err("absent");
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    assert!(
        err.message().contains(&registry.addr()),
        "{}",
        err.message()
    );

    // No mirror and no default endpoint: refused at once, nothing resolved.
    let started = Instant::now();
    let err = pull(&mut images, "other.invalid/x:1")
        .await
        .expect_err("no endpoint");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("no endpoint"), "{}", err.message());
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_registry_with_its_own_ca() {
    let registry = Registry::start_with(RegistryOptions::new().tls()).expect("TLS registry");
    let pushed = fixtures::push(&registry, Fixture::Static).expect("push");
    let ca = registry.ca_cert().expect("CA file");
    // Without the CA the certificate is refused.
    let plain = Berthd::start();
    let err = pull(&mut plain.images().await, &pushed.reference)
        .await
        .expect_err("unknown CA");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");

    let berthd = Berthd::start_with(BerthdOptions {
        extra_config: format!(
            "registries:\n  configs:\n    \"{}\":\n      tls: {{ca_file: {}}}\n",
            registry.addr(),
            ca.display()
        ),
    });
    let id = pull(&mut berthd.images().await, &pushed.reference)
        .await
        .expect("pull over HTTPS");
    assert_eq!(id, pushed.config_digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_from_the_request_or_the_config() {
    let registry = Registry::start_with(RegistryOptions::new().basic_auth("berth", "s3cret"))
        .expect("registry");
    let pushed = fixtures::push(&registry, Fixture::Static).expect("push");

    let berthd = Berthd::start();
    let mut images = berthd.images().await;
    let err = pull(&mut images, &pushed.reference)
        .await
        .expect_err("no credentials");
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");

    let with_auth = |password: &str| PullImageRequest {
        image: spec(&pushed.reference),
        auth: Some(AuthConfig {
            username: "berth".into(),
            password: password.into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let err = images
        .pull_image(with_auth("wrong"))
        .await
        .expect_err("wrong password");
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    let id = images
        .pull_image(with_auth("s3cret"))
        .await
        .expect("request credentials")
        .into_inner()
        .image_ref;
    assert_eq!(id, pushed.config_digest);

    let configured = Berthd::start_with(BerthdOptions {
        extra_config: format!(
            "registries:\n  configs:\n    \"{}\":\n      auth: {{username: berth, password: s3cret}}\n",
            registry.addr()
        ),
    });
    let id = pull(&mut configured.images().await, &pushed.reference)
        .await
        .expect("config credentials");
    assert_eq!(id, pushed.config_digest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_registry_hits_the_progress_timeout() {
    // Accepts connections and never answers.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let holder = std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming().take(4).flatten() {
            held.push(conn);
        }
        std::thread::sleep(Duration::from_secs(10));
    });
    let berthd = Berthd::start_with(BerthdOptions {
        extra_config: format!(
            "images:\n  pull_progress_timeout_secs: 1\nregistries:\n  mirrors:\n    stalled.invalid:\n      endpoint: [\"http://{addr}\"]\n  disable_default_endpoint: true\n"
        ),
    });
    let started = Instant::now();
    let err = pull(&mut berthd.images().await, "stalled.invalid/x:1")
        .await
        .expect_err("stalled pull fails");
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
    assert!(
        err.message().contains("no data for 1 s"),
        "{}",
        err.message()
    );
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "gave up in time"
    );
    drop(holder);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_fs_info_counts_the_store() {
    let (_registry, pushed) = registry_with_fixtures();
    let berthd = Berthd::start();
    let mut images = berthd.images().await;
    let usage = |r: ImageFsInfoResponse| {
        let fs = &r.image_filesystems[0];
        (
            fs.used_bytes.as_ref().map(|u| u.value).unwrap_or(0),
            fs.inodes_used.as_ref().map(|u| u.value).unwrap_or(0),
            fs.fs_id
                .as_ref()
                .map(|f| f.mountpoint.clone())
                .unwrap_or_default(),
        )
    };
    let before = usage(
        images
            .image_fs_info(ImageFsInfoRequest {})
            .await
            .expect("fs info")
            .into_inner(),
    );
    pull(&mut images, &pushed[&Fixture::BusyboxLatest].reference)
        .await
        .expect("pull");
    let after = usage(
        images
            .image_fs_info(ImageFsInfoRequest {})
            .await
            .expect("fs info")
            .into_inner(),
    );
    assert_eq!(after.2, berthd.root.display().to_string());
    assert!(
        after.0 > before.0 + 1_000_000,
        "busybox adds over 1 MB: {before:?} {after:?}"
    );
    assert!(
        after.1 > before.1 + 250,
        "busybox adds hundreds of inodes: {before:?} {after:?}"
    );
}
