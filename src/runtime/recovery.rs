//! A starting berthd rebuilds its view from its records, the monitors and the
//! kernel before it serves: pods and containers come back, work a crash cut
//! in half is rolled back, and after a reboot (a new kernel boot id) every
//! container is reported exited and stale pins are dropped.

use std::collections::HashSet;
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
                    // A start a crash cut short: the orphan pass undoes it.
                    tracing::debug!(dir = %dir.display(), error = %e, "a pod without a record");
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
                // A stop that a crash cut short: finish it, without holding up
                // the start (a killed PID 1 waits until every process of its
                // namespace is reaped, by whoever adopted them).
                let pin = self.pod_paths(&pod.id).ns.join("pid");
                tokio::task::spawn_blocking(move || super::infra::stop(pid, &pin));
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
                    // A creation cut before its record: the orphan pass undoes it.
                    tracing::debug!(bundle = %bundle.display(), error = %e, "a container without a record");
                    continue;
                }
            };
            // A committed container's monitor wrote its status before the record.
            let mut status = monitor::read_status(&bundle).unwrap_or_else(|e| {
                tracing::warn!(container = %record.id, error = %e, "no monitor status");
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
            if live {
                // Back into berth's monitors cgroup, should anything have moved it.
                if let Err(e) = self.adopt_monitor(&bundle) {
                    tracing::warn!(container = %id, error = %e, "cannot adopt the monitor");
                }
                let runtime = self.clone();
                tokio::spawn(async move { runtime.watch_container(id).await });
            }
        }
    }

    /// Removes what no record owns and no creation in flight has reserved:
    /// halves of pod and container creations a crash cut short, namespace
    /// pins, cgroups and writable layers. Everything looked at is under
    /// berth's own state dir, root and cgroup parent. Runs at start and then
    /// periodically; blocking.
    pub fn remove_orphans(&self) {
        let (pods, containers): (HashSet<String>, HashSet<String>) = {
            let t = self.tables();
            (
                t.pods.keys().chain(t.pod_names.values()).cloned().collect(),
                t.containers
                    .keys()
                    .chain(t.container_names.values())
                    .cloned()
                    .collect(),
            )
        };
        for entry in entries(&self.config.state_dir.join("containers")) {
            let id = entry.file_name().to_string_lossy().into_owned();
            if !containers.contains(&id) {
                // The client never got this id. A launch may still be under way: end it.
                tracing::info!(container = %id, "removing a half-made container");
                let paths = self.container_paths(&id);
                monitor::kill_launched(&paths.bundle);
                rootfs::unmount(&paths.rootfs());
                let _ = std::fs::remove_dir_all(&paths.layer);
                let _ = std::fs::remove_dir_all(&paths.bundle);
            }
        }
        for entry in entries(&self.config.state_dir.join("pods")) {
            let id = entry.file_name().to_string_lossy().into_owned();
            if !pods.contains(&id) {
                tracing::info!(pod = %id, "removing a half-made pod");
                let paths = self.pod_paths(&id);
                rootfs::unmount(&paths.shm());
                let _ = std::fs::remove_dir_all(&paths.dir);
            }
        }
        for entry in entries(&self.config.state_dir.join("ns")) {
            let id = entry.file_name().to_string_lossy().into_owned();
            if !pods.contains(&id) {
                tracing::info!(pod = %id, "removing orphaned namespace pins");
                super::infra::remove_unrecorded(&entry.path().join("pid"));
                namespace::remove_pins(&entry.path(), &namespace::ALL_KINDS);
                let _ = std::fs::remove_dir(entry.path());
            }
        }
        // Pod and container cgroups under berth's parent that no record owns.
        let parent = self.parent_cgroup();
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
                    // Under systemd the parent slice may hold other units.
                    let Some(pod_id) = self.pod_of_cgroup(&name) else {
                        continue;
                    };
                    if !pods.contains(pod_id) {
                        tracing::info!(pod = %pod_id, cgroup = %name, "removing an orphaned pod cgroup");
                        // A transient slice outlives its cgroup until stopped.
                        if let Some(sd) = &self.systemd
                            && let Err(e) = sd.stop(&name)
                        {
                            tracing::warn!(pod = %pod_id, error = %e, "cannot stop an orphaned pod slice");
                        }
                        self.cgroups.remove_tree(&format!("{parent}/{name}"));
                    }
                }
            }
        }
        for (pod_id, cgroup) in &pod_cgroups {
            if let Ok(dirs) = self.cgroups.dirs(cgroup) {
                for dir in dirs {
                    for e in entries(&dir) {
                        if !e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                            continue;
                        }
                        let name = e.file_name().to_string_lossy().into_owned();
                        let Some(id) = self.container_of_cgroup(&name) else {
                            continue;
                        };
                        // The pod's infra scope, under systemd.
                        if self.systemd.is_some() && id == pod_id.as_str() {
                            continue;
                        }
                        if !containers.contains(id) {
                            tracing::info!(container = %id, cgroup = %name, "removing an orphaned container cgroup");
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
