//! Image pulls under stress and faults: the Bearer token flow against a token
//! server of the tests' own, concurrent pulls sharing one download (and a
//! caller giving up), berthd killed mid-pull and retried, and garbage
//! collection while a pull that shares layers runs.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::berthd::{Berthd, BerthdOptions};
use common::fixtures::{self, Fixture, ImageInfo};
use common::registry::{Credentials, Registry, RegistryOptions};
use common::token_server::{TokenRequest, TokenServer};
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::*;
use nix::sys::signal::Signal;
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
    pull_with(client, image, None).await
}

async fn pull_with(
    client: &mut ImageServiceClient<Channel>,
    image: &str,
    auth: Option<(&str, &str)>,
) -> Result<String, tonic::Status> {
    client
        .pull_image(PullImageRequest {
            image: spec(image),
            auth: auth.map(|(username, password)| AuthConfig {
                username: username.to_string(),
                password: password.to_string(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().image_ref)
}

async fn listed(client: &mut ImageServiceClient<Channel>) -> Vec<Image> {
    client
        .list_images(ListImagesRequest::default())
        .await
        .expect("ListImages")
        .into_inner()
        .images
}

/// berthd configured to reach registry `name` only through `endpoint`.
fn through_mirror(name: &str, endpoint: SocketAddr) -> BerthdOptions {
    BerthdOptions {
        extra_config: format!(
            "registries:\n  mirrors:\n    {name}:\n      endpoint: [\"http://{endpoint}\"]\n  \
             disable_default_endpoint: true\n"
        ),
    }
}

fn registry_addr(registry: &Registry) -> SocketAddr {
    registry.addr().parse().expect("registry address")
}

/// Snapshot directory names (chain ids, hex) of an image, bottom first.
fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut chain: Option<String> = None;
    let mut out = Vec::new();
    for diff_id in diff_ids {
        let next = match &chain {
            None => diff_id.clone(),
            Some(parent) => format!(
                "sha256:{}",
                hex::encode(sha2::Sha256::digest(format!("{parent} {diff_id}")))
            ),
        };
        out.push(next.trim_start_matches("sha256:").to_string());
        chain = Some(next);
    }
    out
}

/// Blob file names (hex) an image is made of: manifest, config, layers.
fn image_blobs(info: &ImageInfo) -> BTreeSet<String> {
    [&info.manifest_digest, &info.config_digest]
        .into_iter()
        .chain(&info.layers)
        .map(|d| d.trim_start_matches("sha256:").to_string())
        .collect()
}

fn dir_names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// How often berthd (by its user agent) sent GET for each path.
fn berth_gets(registry: &Registry) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for entry in registry.access_log() {
        if entry.method == "GET" && entry.user_agent.starts_with("berth/") {
            *out.entry(entry.path).or_default() += 1;
        }
    }
    out
}

/// Waits (without blocking the runtime) until `cond` holds.
async fn eventually(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A TCP proxy between berthd and a registry, set as berthd's mirror
/// endpoint: answers reach berthd at `rate` bytes per second per connection
/// (0: full speed), so a pull lasts long enough to be caught in the middle.
struct SlowProxy {
    addr: SocketAddr,
    shared: Arc<ProxyShared>,
    accept: Option<std::thread::JoinHandle<()>>,
}

struct ProxyShared {
    rate: AtomicU64,
    bytes_down: AtomicU64,
    stop: AtomicBool,
    /// Both ends of every connection, shut down when the proxy is dropped so
    /// that no copying thread outlives it.
    sockets: Mutex<Vec<TcpStream>>,
}

impl SlowProxy {
    fn start(upstream: SocketAddr, rate: u64) -> SlowProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let shared = Arc::new(ProxyShared {
            rate: AtomicU64::new(rate),
            bytes_down: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            sockets: Mutex::new(Vec::new()),
        });
        let serving = shared.clone();
        let accept = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if serving.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = conn else { continue };
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                let clones = (
                    client.try_clone(),
                    server.try_clone(),
                    client.try_clone(),
                    server.try_clone(),
                );
                let (Ok(client_up), Ok(server_up), Ok(c_keep), Ok(s_keep)) = clones else {
                    continue;
                };
                serving
                    .sockets
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend([c_keep, s_keep]);
                // Requests go up at full speed; answers come down slowly.
                std::thread::spawn(move || copy_up(client_up, server_up));
                let down = serving.clone();
                std::thread::spawn(move || down.copy_down(server, client));
            }
        });
        SlowProxy {
            addr,
            shared,
            accept: Some(accept),
        }
    }

    fn set_rate(&self, bytes_per_second: u64) {
        self.shared.rate.store(bytes_per_second, Ordering::SeqCst);
    }

    /// Bytes delivered to berthd so far.
    fn bytes_down(&self) -> u64 {
        self.shared.bytes_down.load(Ordering::SeqCst)
    }
}

fn copy_up(mut from: TcpStream, mut to: TcpStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

impl ProxyShared {
    fn copy_down(&self, mut from: TcpStream, mut to: TcpStream) {
        let mut buf = [0u8; 8192];
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let rate = self.rate.load(Ordering::SeqCst);
            if rate > 0 {
                self.pause(Duration::from_secs_f64(n as f64 / rate as f64));
            }
            if self.stop.load(Ordering::SeqCst) || to.write_all(&buf[..n]).is_err() {
                break;
            }
            self.bytes_down.fetch_add(n as u64, Ordering::SeqCst);
        }
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    }

    /// Sleeps `d`, cut short when the proxy stops.
    fn pause(&self, d: Duration) {
        let end = Instant::now() + d;
        while !self.stop.load(Ordering::SeqCst) {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            std::thread::sleep(left.min(Duration::from_millis(20)));
        }
    }
}

impl Drop for SlowProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for s in self
            .shared
            .sockets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = s.shutdown(Shutdown::Both);
        }
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_flow_with_request_or_config_credentials() {
    let tokens = TokenServer::start(Some(Credentials {
        username: "berth".into(),
        password: "s3cret".into(),
    }))
    .expect("token server");
    let registry = RegistryOptions::new()
        .token_auth(tokens.registry_auth())
        .start()
        .expect("token-auth registry");
    let pushed = fixtures::push(&registry, Fixture::Static).expect("push with a token");
    assert!(
        tokens
            .requests()
            .iter()
            .any(|r| r.granted && r.scopes.iter().any(|s| s.ends_with("push"))),
        "skopeo pushed with a push token: {:?}",
        tokens.requests()
    );
    // The registry wants a token from this server and nothing else.
    let anonymous = registry
        .get_as("/v2/berth-test/static/manifests/latest", &[], None)
        .expect("anonymous GET");
    assert_eq!(anonymous.status, 401);
    let challenge = anonymous.header("WWW-Authenticate").unwrap_or_default();
    assert!(
        challenge.starts_with("Bearer ") && challenge.contains(&tokens.realm()),
        "{challenge}"
    );

    let berthd = Berthd::start();
    let mut images = berthd.images().await;
    let before = tokens.requests().len();

    // The token server's refusal comes back at once, in its own words.
    let started = Instant::now();
    let err = pull_with(&mut images, &pushed.reference, Some(("berth", "wrong")))
        .await
        .expect_err("wrong password");
    assert!(
        matches!(
            err.code(),
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
        ),
        "{err:?}"
    );
    assert!(
        err.message().contains("bad credentials for berth"),
        "{}",
        err.message()
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refused in {:?}",
        started.elapsed()
    );
    let err = pull(&mut images, &pushed.reference)
        .await
        .expect_err("no credentials");
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    assert!(
        err.message().contains("credentials required"),
        "{}",
        err.message()
    );
    assert!(listed(&mut images).await.is_empty(), "nothing half-made");

    let id = pull_with(&mut images, &pushed.reference, Some(("berth", "s3cret")))
        .await
        .expect("pull with the request's credentials");
    assert_eq!(id, pushed.config_digest);
    // One token request per pull: a token, once had, serves the manifest,
    // the config and every layer of the pull, scoped to pulling this repository.
    let granted = TokenRequest {
        username: Some("berth".into()),
        scopes: vec!["repository:berth-test/static:pull".into()],
        granted: true,
    };
    let asked = tokens.requests()[before..].to_vec();
    assert_eq!(asked.len(), 3, "{asked:#?}");
    assert_eq!(asked[2], granted);

    let configured = Berthd::start_with(BerthdOptions {
        extra_config: format!(
            "registries:\n  configs:\n    \"{}\":\n      auth: {{username: berth, password: s3cret}}\n",
            registry.addr()
        ),
    });
    let before = tokens.requests().len();
    let id = pull(&mut configured.images().await, &pushed.reference)
        .await
        .expect("pull with the config's credentials");
    assert_eq!(id, pushed.config_digest);
    assert_eq!(tokens.requests()[before..], [granted]);
}

/// Per connection: the 1.4 MB base layer takes about two seconds.
const COALESCE_RATE: u64 = 768 * 1024;
const GIVE_UP_AFTER: Duration = Duration::from_millis(600);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pulls_share_downloads_and_outlive_a_caller_who_gives_up() {
    let registry = RegistryOptions::new()
        .access_log()
        .start()
        .expect("registry");
    let pushed = [
        Fixture::BusyboxLatest,
        Fixture::Busybox10,
        Fixture::Busybox11,
    ];
    for f in pushed {
        fixtures::push(&registry, f).expect("push");
    }
    let base = &fixtures::info(Fixture::BusyboxLatest).layers[0];
    for f in pushed {
        assert_eq!(&fixtures::info(f).layers[0], base, "{f:?} shares the base");
    }
    let proxy = SlowProxy::start(registry_addr(&registry), COALESCE_RATE);
    let berthd = Berthd::start_with(through_mirror("slow.invalid", proxy.addr));
    let name = |f: Fixture| format!("slow.invalid/{}", f.repo_tag());
    let latest = name(Fixture::BusyboxLatest);

    // The first caller starts the pull and gives up (drops its request) early.
    let started = Instant::now();
    let quitter = {
        let mut client = berthd.images().await;
        let image = latest.clone();
        tokio::spawn(
            async move { tokio::time::timeout(GIVE_UP_AFTER, pull(&mut client, &image)).await },
        )
    };
    eventually(
        "the first pull to reach the registry",
        Duration::from_secs(10),
        || {
            berth_gets(&registry)
                .keys()
                .any(|p| p.ends_with("/manifests/latest"))
        },
    )
    .await;
    // Four more callers of that image, and two images sharing its base layer.
    let mut callers = Vec::new();
    for f in [
        Fixture::BusyboxLatest,
        Fixture::BusyboxLatest,
        Fixture::BusyboxLatest,
        Fixture::BusyboxLatest,
        Fixture::Busybox10,
        Fixture::Busybox11,
    ] {
        let mut client = berthd.images().await;
        let image = name(f);
        callers.push(tokio::spawn(
            async move { (f, pull(&mut client, &image).await) },
        ));
    }
    let gave_up = quitter.await.expect("first caller's task");
    assert!(
        gave_up.is_err(),
        "the pull must still run when the first caller gives up: {gave_up:?}"
    );
    for caller in callers {
        let (f, result) = caller.await.expect("caller task");
        let id = result.unwrap_or_else(|e| panic!("pull of {f:?}: {e:?}"));
        assert_eq!(id, fixtures::info(f).config_digest, "{f:?}");
    }
    assert!(
        started.elapsed() > GIVE_UP_AFTER * 2,
        "the pull outlasted the caller who gave up by far: {:?}",
        started.elapsed()
    );

    // Every manifest and blob was fetched once: five callers made one pull,
    // and the base layer was downloaded once for all three images.
    let mut expected = BTreeSet::new();
    for f in pushed {
        let info = fixtures::info(f);
        expected.insert(format!("/v2/{}/manifests/{}", f.repo(), f.tag()));
        for blob in [&info.config_digest].into_iter().chain(&info.layers) {
            expected.insert(format!("/v2/{}/blobs/{blob}", f.repo()));
        }
    }
    // The registry logs a request once it has sent the whole answer.
    eventually(
        "the registry to log every GET",
        Duration::from_secs(5),
        || berth_gets(&registry).len() >= expected.len(),
    )
    .await;
    let gets = berth_gets(&registry);
    assert_eq!(
        gets.keys().cloned().collect::<BTreeSet<_>>(),
        expected,
        "{gets:#?}"
    );
    assert!(
        gets.values().all(|&n| n == 1),
        "fetched more than once: {gets:#?}"
    );
    assert_eq!(listed(&mut berthd.images().await).await.len(), 3);
}

/// Per connection: the base layer would take about six seconds.
const CRASH_RATE: u64 = 256 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_mid_pull_leaves_no_debris_and_the_retry_completes() {
    let registry = Registry::start().expect("registry");
    let pushed = fixtures::push(&registry, Fixture::Layers).expect("push");
    let info = fixtures::info(Fixture::Layers);
    assert!(info.layers.len() >= 3, "a fixture with a few layers");
    let proxy = SlowProxy::start(registry_addr(&registry), CRASH_RATE);
    let mut berthd = Berthd::start_with(through_mirror("slow.invalid", proxy.addr));
    let image = "slow.invalid/berth-test/layers:latest";
    let ingest = berthd.root.join("content/ingest");
    let blobs = berthd.root.join("content/blobs/sha256");
    let snapshots = berthd.root.join("snapshots");
    let unpacking = |dir: &Path| {
        dir_names(dir)
            .into_iter()
            .filter(|n| n.starts_with(".tmp-"))
            .collect::<Vec<_>>()
    };
    let half_written = |dir: &Path| {
        std::fs::read_dir(dir).is_ok_and(|entries| {
            entries
                .flatten()
                .any(|e| e.metadata().is_ok_and(|m| m.len() > 0))
        })
    };

    let pulling = {
        let mut client = berthd.images().await;
        tokio::spawn(async move { pull(&mut client, image).await })
    };
    eventually(
        "a layer half downloaded and unpacking",
        Duration::from_secs(20),
        || {
            proxy.bytes_down() > 200_000
                && half_written(&ingest)
                && !unpacking(&snapshots).is_empty()
        },
    )
    .await;
    berthd.stop_with(Signal::SIGKILL);
    let died = pulling.await.expect("pull task");
    assert!(died.is_err(), "the pull dies with berthd: {died:?}");
    // The crash really left debris for the restart to deal with.
    assert!(!dir_names(&ingest).is_empty(), "an ingest file was left");
    let debris = unpacking(&snapshots);
    assert!(!debris.is_empty(), "an unpack dir was left");

    proxy.set_rate(0);
    berthd.spawn();
    let mut images = berthd.images().await;
    assert!(
        listed(&mut images).await.is_empty(),
        "no image from a cut pull"
    );
    assert!(dir_names(&ingest).is_empty(), "ingests discarded at open");
    // (The collection berthd starts at open may be renaming layers the cut
    // pull finished to ".tmp-rm-…" meanwhile: only the debris must be gone.)
    let left = dir_names(&snapshots);
    assert!(
        debris.iter().all(|d| !left.contains(d)),
        "unpacks discarded at open: {debris:?} in {left:?}"
    );

    let id = pull(&mut images, image).await.expect("the retry");
    assert_eq!(id, pushed.config_digest);
    assert_eq!(listed(&mut images).await.len(), 1);
    assert_eq!(
        dir_names(&blobs),
        image_blobs(info),
        "exactly the image's blobs"
    );
    assert_eq!(
        dir_names(&snapshots),
        chain_ids(&info.diff_ids)
            .into_iter()
            .collect::<BTreeSet<_>>(),
        "exactly the image's snapshots"
    );
    assert!(dir_names(&ingest).is_empty());
}

/// Slow enough that each small answer takes about half a second.
const GC_RATE: u64 = 2048;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_an_image_during_a_pull_that_shares_its_layers() {
    let registry = RegistryOptions::new()
        .access_log()
        .start()
        .expect("registry");
    fixtures::push(&registry, Fixture::Busybox10).expect("push 1.0");
    fixtures::push(&registry, Fixture::Busybox11).expect("push 1.1");
    let (old, new) = (
        fixtures::info(Fixture::Busybox10),
        fixtures::info(Fixture::Busybox11),
    );
    assert_eq!(
        old.layers[0], new.layers[0],
        "the images share a base layer"
    );
    assert_eq!(new.layers.len(), 2);
    let proxy = SlowProxy::start(registry_addr(&registry), 0);
    let berthd = Berthd::start_with(through_mirror("slow.invalid", proxy.addr));
    let mut images = berthd.images().await;
    let old_name = format!("slow.invalid/{}", Fixture::Busybox10.repo_tag());
    let new_name = format!("slow.invalid/{}", Fixture::Busybox11.repo_tag());
    pull(&mut images, &old_name).await.expect("pull 1.0");

    // 1.1's pull finds the base layer present and fetches only its own; the
    // removal of 1.0 lands while that layer is on its way, when nothing but
    // the running pull needs the base layer.
    proxy.set_rate(GC_RATE);
    let pulling = {
        let mut client = berthd.images().await;
        let image = new_name.clone();
        tokio::spawn(async move { pull(&mut client, &image).await })
    };
    let own_layer = format!("/v2/{}/blobs/{}", Fixture::Busybox11.repo(), new.layers[1]);
    eventually(
        "1.1's pull to fetch its own layer",
        Duration::from_secs(10),
        || berth_gets(&registry).contains_key(&own_layer),
    )
    .await;
    // By its tag, as `crictl rmi` does: its only tag, so the image goes.
    images
        .remove_image(RemoveImageRequest {
            image: spec(&old_name),
        })
        .await
        .expect("RemoveImage 1.0");
    assert!(
        listed(&mut images)
            .await
            .iter()
            .all(|i| i.id != old.config_digest),
        "1.0 is no longer listed"
    );
    let id = pulling
        .await
        .expect("pull task")
        .expect("1.1's pull succeeds despite the removal");
    assert_eq!(id, new.config_digest);
    // Both tags live in one repository: the base was fetched once, for 1.0.
    let base = format!("/v2/{}/blobs/{}", Fixture::Busybox11.repo(), new.layers[0]);
    assert_eq!(
        berth_gets(&registry).get(&base),
        Some(&1),
        "the base layer was reused, not fetched again"
    );

    // Collection ran (1.0's own layer goes) and kept all of 1.1.
    let snapshots = berthd.root.join("snapshots");
    let old_layer = chain_ids(&old.diff_ids)[1].clone();
    // It renames a layer to ".tmp-rm-…" before deleting it: wait for both.
    eventually(
        "1.0's own layer to be collected",
        Duration::from_secs(10),
        || {
            let names = dir_names(&snapshots);
            !names.contains(&old_layer) && !names.iter().any(|n| n.starts_with(".tmp-"))
        },
    )
    .await;
    let kept = chain_ids(&new.diff_ids);
    assert_eq!(
        dir_names(&snapshots),
        kept.iter().cloned().collect::<BTreeSet<_>>(),
        "exactly 1.1's snapshots, the shared base included"
    );
    assert!(
        snapshots.join(&kept[0]).join("bin/busybox").exists(),
        "base layer intact"
    );
    assert_eq!(
        dir_names(&berthd.root.join("content/blobs/sha256")),
        image_blobs(new),
        "exactly 1.1's blobs"
    );
    let left = listed(&mut images).await;
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].id, new.config_digest);
}
