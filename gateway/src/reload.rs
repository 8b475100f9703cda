//! Live reloading: the configuration file is re-read when it changes and on SIGHUP.
//!
//! The file is watched by polling its metadata (following symlinks) rather than through
//! inotify, because the ways operators replace configuration—editing in place, `mv` over it,
//! or Kubernetes swapping a `..data` symlink to a new directory—change what the path resolves
//! to, and polling sees all of them alike. Files next to it (editor swap files, backups) are
//! never looked at. A file that fails validation is logged once and leaves the last good
//! generation in force.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::config::{GatewayConfig, Overrides};
use crate::generation::{Generation, Secrets};
use crate::metrics::Metrics;
use crate::store::Stores;

/// How often the file's metadata is checked.
const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// How long a change must hold still before it is read, so a save in several writes is read
/// once, whole.
const DEBOUNCE: Duration = Duration::from_millis(200);

/// What identifies one version of the file on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FileStamp {
    resolved: Option<PathBuf>,
    inode: u64,
    length: u64,
    modified_ns: i64,
}

/// Re-reads the configuration and swaps in a new generation when it validates.
pub struct Reloader {
    path: PathBuf,
    overrides: Overrides,
    secrets: Secrets,
    stores: Stores,
    current: Arc<ArcSwap<Generation>>,
    metrics: Arc<Metrics>,
    /// Serialises reloads from the watcher and from SIGHUP.
    lock: Mutex<()>,
}

impl Reloader {
    pub fn new(
        path: PathBuf,
        overrides: Overrides,
        secrets: Secrets,
        stores: Stores,
        current: Arc<ArcSwap<Generation>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            path,
            overrides,
            secrets,
            stores,
            current,
            metrics,
            lock: Mutex::new(()),
        }
    }

    /// Loads the file and, if it is valid, makes it the configuration in force. Returns
    /// whether it was applied.
    pub fn reload(&self, trigger: &'static str) -> bool {
        let _serialised = self
            .lock
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let previous = self.current.load();
        let env = |name: &str| std::env::var(name).ok();
        let outcome = GatewayConfig::load_with(&self.path, &env, &self.overrides)
            .map_err(anyhow::Error::from)
            .and_then(|config| {
                let number = previous.number + 1;
                Generation::build(number, config, &self.secrets, self.stores.clone())
            });
        match outcome {
            Ok(generation) => {
                warn_about_restart_only_keys(&previous.config, &generation.config);
                let number = generation.number;
                self.current.store(Arc::new(generation));
                self.metrics.reloads.with_label_values(&["ok"]).inc();
                self.metrics.config_generation.set(number as i64);
                tracing::info!(
                    trigger,
                    config.generation = number,
                    "configuration reloaded"
                );
                true
            }
            Err(error) => {
                self.metrics.reloads.with_label_values(&["failed"]).inc();
                tracing::error!(
                    trigger,
                    config.generation = previous.number,
                    error = %format!("{error:#}"),
                    "configuration rejected; the last good one stays in force"
                );
                false
            }
        }
    }

    /// Watches the file from a background thread for the life of the process.
    pub fn spawn_watcher(self: Arc<Self>) {
        std::thread::Builder::new()
            .name("config-watch".into())
            .spawn(move || {
                let mut seen = self.stamp();
                loop {
                    std::thread::sleep(POLL_INTERVAL);
                    let now = self.stamp();
                    if now == seen {
                        continue;
                    }
                    // Wait for the writer to finish before reading.
                    let mut settled = now;
                    loop {
                        std::thread::sleep(DEBOUNCE);
                        let again = self.stamp();
                        if again == settled {
                            break;
                        }
                        settled = again;
                    }
                    seen = settled;
                    if seen.is_some() {
                        self.reload("file-change");
                    }
                }
            })
            .expect("spawning the config watcher thread");
    }

    /// Reloads on every SIGHUP.
    pub fn spawn_sighup_handler(self: Arc<Self>) -> std::io::Result<()> {
        let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGHUP])?;
        std::thread::Builder::new()
            .name("config-sighup".into())
            .spawn(move || {
                for _ in signals.forever() {
                    self.reload("sighup");
                }
            })?;
        Ok(())
    }

    fn stamp(&self) -> Option<FileStamp> {
        let metadata = std::fs::metadata(&self.path).ok()?;
        Some(FileStamp {
            resolved: std::fs::canonicalize(&self.path).ok(),
            inode: metadata.ino(),
            length: metadata.len(),
            modified_ns: metadata.mtime() * 1_000_000_000 + metadata.mtime_nsec(),
        })
    }
}

fn warn_about_restart_only_keys(old: &GatewayConfig, new: &GatewayConfig) {
    let changed = old.listen != new.listen
        || old.admin_listen != new.admin_listen
        || old.threads != new.threads
        || old.max_tracked_clients != new.max_tracked_clients
        || old.store != new.store;
    if changed {
        tracing::warn!(
            "server.listen, server.admin_listen, server.threads and [store] apply at restart"
        );
    }
}
