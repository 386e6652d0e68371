//! A starting berthd rebuilds its view from its records, the monitors and the
//! kernel before it serves: pods and containers come back, work a crash cut
//! in half is rolled back, and after a reboot (a new kernel boot id) every
//! container is reported exited and stale pins are dropped.

use std::path::Path;
use std::sync::Arc;

use tokio::sync::watch;

use super::container::{ContainerPaths, ContainerRecord, ContainerState};
use super::namespace;
use super::pod::{PodRecord, PodState};
use super::{
    ContainerEntry, Runtime, RuntimeError, container_name_key, lost_status, rootfs, state_of,
};
use crate::monitor;
use crate::store::{self, Durability};

const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

fn entries(dir: &Path) -> impl Iterator<Item = std::fs::DirEntry> {
    std::fs::read_dir(dir).into_iter().flatten().flatten()
}

impl Runtime {
    /// Whether the kernel booted since the last berthd wrote its boot id.
    fn rebooted(&self) -> Result<bool, RuntimeError> {
        let current = std::fs::read_to_string(BOOT_ID).unwrap_or_default();
        let recorded = self.config.state_dir.join("boot_id");
        let previous = std::fs::read_to_string(&recorded).ok();
        store::write_atomic(&recorded, current.as_bytes(), Durability::Crash)?;
        Ok(previous.is_some_and(|p| p != current))
    }

    pub(super) fn recover(self: &Arc<Self>) -> Result<(), RuntimeError> {
        let rebooted = self.rebooted()?;
        if rebooted {
            tracing::warn!("the node rebooted: every container is reported exited");
        }
        self.recover_pods(rebooted);
        self.recover_containers(rebooted);
        self.remove_orphans();
        Ok(())
    }

    fn recover_pods(&self, rebooted: bool) {
        for entry in entries(&self.config.state_dir.join("pods")) {
            let dir = entry.path();
            let mut pod = match store::read_json::<PodRecord>(&dir.join("pod.json")) {
                Ok(pod) => pod,
                Err(e) => {
                    // A pod whose start a crash cut short: undo what it made.
                    tracing::info!(dir = %dir.display(), error = %e, "removing a half-made pod");
                    let id = entry.file_name().to_string_lossy().into_owned();
                    let paths = self.pod_paths(&id);
                    namespace::remove_pins(&paths.ns, &namespace::ALL_KINDS);
                    rootfs::unmount(&paths.shm());
                    self.cgroups
                        .remove_if_empty(&format!("{}/{id}", self.config.cgroup.parent));
                    let _ = std::fs::remove_dir_all(&dir);
                    continue;
                }
            };
            if rebooted && pod.state == PodState::Ready {
                // Its namespaces died with the old kernel; the pins are plain files now.
                let paths = self.pod_paths(&pod.id);
                namespace::remove_pins(&paths.ns, &namespace::ALL_KINDS);
                let _ = std::fs::remove_file(paths.ns.join("pid"));
                pod.state = PodState::NotReady;
                pod.infra_pid = None;
                if let Err(e) = store::write_json(&paths.record(), &pod, Durability::Crash) {
                    tracing::warn!(pod = %pod.id, error = %e, "cannot record the pod as stopped");
                }
            }
            if pod.state == PodState::NotReady
                && let Some(pid) = pod.infra_pid
            {
                // EXPERIMENT: finish a stop a crash cut short.
                super::infra::stop(pid, &self.pod_paths(&pod.id).ns.join("pid"));
            }
            let mut t = self.tables();
            t.pod_names
                .insert(PodRecord::reserved_name(&pod.config), pod.id.clone());
            t.pods.insert(pod.id.clone(), pod);
        }
    }

    fn recover_containers(self: &Arc<Self>, rebooted: bool) {
        for entry in entries(&self.config.state_dir.join("containers")) {
            let bundle = entry.path();
            let record = match store::read_json::<ContainerRecord>(&bundle.join("container.json")) {
                Ok(r) => r,
                Err(e) => {
                    tracing::info!(bundle = %bundle.display(), error = %e, "removing a half-made container");
                    let id = entry.file_name().to_string_lossy().into_owned();
                    let paths = self.container_paths(&id);
                    rootfs::unmount(&paths.rootfs());
                    let _ = std::fs::remove_dir_all(&paths.layer);
                    let _ = std::fs::remove_dir_all(&bundle);
                    continue;
                }
            };
            let mut late = false;
            let mut status = monitor::read_status(&bundle).unwrap_or_else(|e| {
                tracing::warn!(container = %record.id, error = %e, "no monitor status");
                late = true;
                lost_status("the container's monitor left no status")
            });
            let mut live = matches!(
                state_of(&status),
                ContainerState::Created | ContainerState::Running
            );
            if rebooted && live {
                status = lost_status("the node rebooted while the container existed");
                live = false;
            }
            let id = record.id.clone();
            self.images.hold(&id, record.layers.clone());
            {
                let mut t = self.tables();
                t.container_names
                    .insert(container_name_key(&record), id.clone());
                let (tx, _) = watch::channel(status);
                t.containers
                    .insert(id.clone(), ContainerEntry { record, status: tx });
            }
            if late && !rebooted {
                // EXPERIMENT: a monitor still being created writes its status late.
                let runtime = self.clone();
                let bundle = bundle.clone();
                tokio::spawn(async move {
                    for _ in 0..50 {
                        if let Ok(s) = monitor::read_status(&bundle) {
                            tracing::info!(container = %id, "monitor status appeared late");
                            if let Some(e) = runtime.tables().containers.get(&id) {
                                e.status.send_replace(s.clone());
                            }
                            if matches!(
                                state_of(&s),
                                ContainerState::Created | ContainerState::Running
                            ) {
                                runtime.watch_container(id).await;
                            }
                            return;
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                });
                continue;
            }
            if live {
                let rel = format!("{}/monitors", self.config.cgroup.parent);
                let _ = self.cgroups.create(&rel);
                if let (Ok(files), Some(pid)) = (
                    self.cgroups.procs_files(&rel),
                    self.tables()
                        .containers
                        .get(&id)
                        .map(|e| e.status.borrow().monitor_pid),
                ) {
                    for f in files {
                        let _ = std::fs::write(f, pid.to_string());
                    }
                }
                let runtime = self.clone();
                tokio::spawn(async move { runtime.watch_container(id).await });
            }
        }
    }

    /// Pins and writable layers that no record owns are leftovers of a crash.
    fn remove_orphans(&self) {
        let (pods, containers): (Vec<String>, Vec<String>) = {
            let t = self.tables();
            (
                t.pods.keys().cloned().collect(),
                t.containers.keys().cloned().collect(),
            )
        };
        for entry in entries(&self.config.state_dir.join("ns")) {
            let id = entry.file_name().to_string_lossy().into_owned();
            if !pods.contains(&id) {
                tracing::info!(pod = %id, "removing orphaned namespace pins");
                namespace::remove_pins(&entry.path(), &namespace::ALL_KINDS);
                let _ = std::fs::remove_file(entry.path().join("pid"));
                let _ = std::fs::remove_dir(entry.path());
            }
        }
        // EXPERIMENT: cgroups no record owns.
        let parent = self.config.cgroup.parent.clone();
        let pod_cgroups: Vec<(String, String)> = {
            let t = self.tables();
            t.pods
                .values()
                .map(|p| (p.id.clone(), p.cgroup.clone()))
                .collect()
        };
        if let Ok(dirs) = self.cgroups.dirs(&parent) {
            for dir in dirs {
                for e in entries(&dir) {
                    if !e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                        continue;
                    }
                    let name = e.file_name().to_string_lossy().into_owned();
                    if name == "monitors" {
                        continue;
                    }
                    if !pods.contains(&name) {
                        tracing::info!(pod = %name, "removing an orphaned pod cgroup");
                        self.cgroups.remove_tree(&format!("{parent}/{name}"));
                    }
                }
            }
        }
        for (_, cgroup) in &pod_cgroups {
            if let Ok(dirs) = self.cgroups.dirs(cgroup) {
                for dir in dirs {
                    for e in entries(&dir) {
                        if !e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                            continue;
                        }
                        let name = e.file_name().to_string_lossy().into_owned();
                        if !containers.contains(&name) {
                            tracing::info!(container = %name, "removing an orphaned container cgroup");
                            self.cgroups.remove_tree(&format!("{cgroup}/{name}"));
                        }
                    }
                }
            }
        }
        for entry in entries(&self.config.root.join("containers")) {
            let id = entry.file_name().to_string_lossy().into_owned();
            if !containers.contains(&id) {
                tracing::info!(container = %id, "removing an orphaned writable layer");
                let paths: ContainerPaths = self.container_paths(&id);
                rootfs::unmount(&paths.rootfs());
                let _ = std::fs::remove_dir_all(&paths.layer);
            }
        }
    }
}
