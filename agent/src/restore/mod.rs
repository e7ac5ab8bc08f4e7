//! Restore tests: prove that a guest's newest backup restores and boots, in a scratch
//! guest that cannot reach the network, and destroy that guest again.
//!
//! Owns: one restore test at a time ([`RestoreTests::run`]): the choice of the backup (the
//! newest on any storage with `backup` content) and of a free scratch vmid, the restore
//! with `start=0`, `unique=1`, `onboot=0`, every `netN` detached (`link_down=1`), the name
//! suffixed `-restoretest` and a description naming the test and the archive; the removal
//! of what reaches outside the guest before it starts ([`rules`]); the boot check (running
//! within `boot_check_seconds`, for QEMU with the agent enabled also answering its ping,
//! then still running after `stable_seconds`); stop and destroy (`purge=1`,
//! `destroy-unreferenced-disks=1`) after every outcome; and the cleanup of a scratch guest
//! a crash left behind ([`RestoreTests::cleanup`], run first by every test).
//!
//! Rules:
//! - Every request that changes something runs in the scratch vmid's lane of the reconcile
//!   queue, with its permit, so nothing here can act on another vmid. A vmid outside
//!   `restore_tests.scratch_vmids` is refused before it reaches the queue.
//! - The journal row saying a scratch guest may exist is committed before the restore is
//!   sent; every later step updates it. A guest found on a scratch vmid is destroyed only
//!   when that row exists and the guest carries this test's marker in its description (or
//!   is the empty config a failed QEMU restore of this test leaves); any other guest there
//!   is left alone and the vmid skipped.
//! - Nothing is sent while the mutation gate is not open or the journal is in safe mode;
//!   a test that finds the gate closed halfway stops where it is, and the scratch guest is
//!   cleaned up by the next run once the gate opens.
//!
//! Must never: create, change or destroy a guest outside the scratch range, destroy a
//! guest it did not make, start a scratch guest with a network interface attached or a key
//! that reaches outside it, or run two restore tests at once.

pub mod rules;
pub mod schedule;

use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::Duration;

use felhom_protocol::Vmid;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::RestoreTestsConfig;
use crate::proxmox::{
    BackupItem, Client, ConfigChange, ConfigValue, GuestConfig, GuestKind, GuestPermit,
    ProxmoxError, QemuRestoreOptions, RestoreOptions, SetConfigOutcome, Upid, WaitOptions,
};
use crate::reconcile::Gate;
use crate::reconcile::journal::{Journal, JournalError, RestoreRecord, now_ms};
use crate::reconcile::queue::{OpFuture, Queue, QueueError};

/// Why a restore test could not be run or recorded (a test that ran and failed or was
/// skipped is a [`RestoreRecord`] with that result, not an error).
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("restore tests are not configured: {0}")]
    NotConfigured(String),
    #[error("mutations are not allowed now ({0}); the restore test waits")]
    NotAllowed(String),
    #[error("a restore test is already running")]
    Busy,
    #[error("guest {0} is not on this node")]
    NoSuchGuest(Vmid),
    #[error("no guest on this node has a backup to test")]
    NothingToTest,
    #[error("vmid {0} is outside the scratch range; a restore test never touches it")]
    OutsideScratch(Vmid),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("reading the node: {0}")]
    Proxmox(#[from] ProxmoxError),
    #[error("reconcile queue: {0}")]
    Queue(#[from] QueueError),
    #[error("journal worker stopped: {0}")]
    Blocking(String),
    #[error(
        "scratch guest {scratch} (restore test #{test}) could not be destroyed: {error}; no restore test runs until it is"
    )]
    ScratchNotDestroyed {
        scratch: u32,
        test: i64,
        error: String,
    },
}

/// The start of the reason of a test that says nothing about the backup.
pub const NO_VERDICT: &str =
    "no verdict on the backup (the guest is tested again at the next run): ";

/// The suffix of a scratch guest's hostname (LXC) or name (QEMU).
pub const NAME_SUFFIX: &str = "-restoretest";

/// The description marker of test `id`; the cleanup destroys only guests that carry it.
fn marker(id: i64) -> String {
    format!("felhom restore test #{id} ")
}

/// Everything a restore test runs on.
#[derive(Debug, Clone)]
pub struct RestoreDeps {
    pub client: Client,
    /// The reconcile queue; every mutation runs in the scratch vmid's lane.
    pub queue: Queue,
    pub journal: Arc<Journal>,
    pub gate: watch::Receiver<Gate>,
    /// `restore_tests.scratch_vmids`.
    pub scratch: RangeInclusive<u32>,
    pub settings: RestoreTestsConfig,
    /// Waiting for restore, start, stop and destroy tasks.
    pub task_wait: WaitOptions,
    /// How often the scratch guest's status is read while it boots and runs.
    pub poll: Duration,
}

/// The restore tests of this host. One test at a time.
#[derive(Debug)]
pub struct RestoreTests {
    deps: RestoreDeps,
    storage: String,
    one: tokio::sync::Mutex<()>,
}

/// A guest that has backups, with its last test time (0: never tested).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub vmid: Vmid,
    pub kind: GuestKind,
    pub last_tested_ms: i64,
}

/// The outcome of the in-lane steps: a final result, or `None` to go on.
type Verdict = Option<(&'static str, String)>;

impl RestoreTests {
    /// The restore tests of a config: `None` when `restore_tests.scratch_vmids` or
    /// `.storage` is not set (then nothing here ever runs).
    pub fn from_config(
        cfg: &crate::config::Config,
        client: Client,
        queue: Queue,
        journal: Arc<Journal>,
        gate: watch::Receiver<Gate>,
    ) -> Option<RestoreTests> {
        let scratch = cfg.scratch_vmids.clone()?;
        let storage = cfg.restore_tests.storage.clone()?;
        Some(RestoreTests {
            deps: RestoreDeps {
                client,
                queue,
                journal,
                gate,
                scratch,
                settings: cfg.restore_tests.clone(),
                task_wait: WaitOptions::with_timeout(Duration::from_secs(3600)),
                poll: Duration::from_secs(1),
            },
            storage,
            one: tokio::sync::Mutex::new(()),
        })
    }

    pub fn new(deps: RestoreDeps) -> Result<RestoreTests, RestoreError> {
        let storage = deps.settings.storage.clone().ok_or_else(|| {
            RestoreError::NotConfigured("restore_tests.storage is not set".to_string())
        })?;
        Ok(RestoreTests {
            deps,
            storage,
            one: tokio::sync::Mutex::new(()),
        })
    }

    pub fn journal(&self) -> &Arc<Journal> {
        &self.deps.journal
    }

    /// The mutation gate the tests follow.
    pub fn gate(&self) -> watch::Receiver<Gate> {
        self.deps.gate.clone()
    }

    pub fn settings(&self) -> &RestoreTestsConfig {
        &self.deps.settings
    }

    /// Why nothing may be changed now, or `None` when the gate is open and the journal
    /// is not in safe mode.
    pub fn closed(&self) -> Option<String> {
        if let Some(why) = self.deps.journal.safe_mode() {
            return Some(format!("the journal is in safe mode: {why}"));
        }
        match *self.deps.gate.borrow() {
            Gate::Open => None,
            Gate::Blocked => Some("blocked by the hub".to_string()),
            Gate::AwaitingEnvelope => Some("waiting for the hub's first envelope".to_string()),
        }
    }

    async fn journal_put(&self, rec: &mut RestoreRecord) -> Result<(), RestoreError> {
        let j = self.deps.journal.clone();
        let mut r = rec.clone();
        let r = tokio::task::spawn_blocking(move || j.restore_put(&mut r).map(|()| r))
            .await
            .map_err(|e| RestoreError::Blocking(e.to_string()))??;
        *rec = r;
        Ok(())
    }

    async fn journal_read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Journal) -> Result<T, JournalError> + Send + 'static,
    ) -> Result<T, RestoreError> {
        let j = self.deps.journal.clone();
        Ok(tokio::task::spawn_blocking(move || f(&j))
            .await
            .map_err(|e| RestoreError::Blocking(e.to_string()))??)
    }

    /// Runs `op` in `vmid`'s lane; `vmid` must be a scratch vmid.
    async fn in_lane<T: Send + 'static>(
        &self,
        vmid: Vmid,
        label: &'static str,
        op: impl for<'p> FnOnce(&'p GuestPermit) -> OpFuture<'p, T> + Send + 'static,
    ) -> Result<T, RestoreError> {
        if !self.deps.scratch.contains(&vmid.get()) {
            return Err(RestoreError::OutsideScratch(vmid));
        }
        Ok(self.deps.queue.submit(vmid, label, op)?.await?)
    }

    /// The guests of this node (not in the scratch range, not templates) with their kind.
    async fn guests(&self) -> Result<Vec<(Vmid, GuestKind)>, RestoreError> {
        let mut out = Vec::new();
        for kind in [GuestKind::Lxc, GuestKind::Qemu] {
            for g in self.deps.client.guests(kind).await? {
                if !g.template && !self.deps.scratch.contains(&g.vmid.get()) {
                    out.push((g.vmid, kind));
                }
            }
        }
        Ok(out)
    }

    /// Every vmid that exists on this node (both kinds).
    async fn existing(&self) -> Result<Vec<(Vmid, GuestKind)>, RestoreError> {
        let mut out = Vec::new();
        for kind in [GuestKind::Lxc, GuestKind::Qemu] {
            for g in self.deps.client.guests(kind).await? {
                out.push((g.vmid, kind));
            }
        }
        Ok(out)
    }

    /// Every backup on the node's active storages with `backup` content, for `vmid` or all.
    async fn backups(&self, vmid: Option<Vmid>) -> Result<Vec<BackupItem>, RestoreError> {
        let mut out = Vec::new();
        for s in self.deps.client.storages().await? {
            if s.active == Some(false) || !s.contents().any(|c| c == "backup") {
                continue;
            }
            out.extend(self.deps.client.backups(&s.storage, vmid).await?);
        }
        Ok(out)
    }

    /// Guests with backups, oldest-tested first (never tested first, then by vmid).
    pub async fn candidates(&self) -> Result<Vec<Candidate>, RestoreError> {
        let guests = self.guests().await?;
        let backups = self.backups(None).await?;
        let per = self.journal_read(|j| j.restore_per_guest()).await?;
        let mut out: Vec<Candidate> = guests
            .into_iter()
            .filter(|(v, _)| backups.iter().any(|b| b.vmid == Some(*v)))
            .map(|(vmid, kind)| Candidate {
                vmid,
                kind,
                last_tested_ms: per
                    .get(&vmid.get())
                    .map(|(last, _)| last.started_ms)
                    .unwrap_or(0),
            })
            .collect();
        out.sort_by_key(|c| (c.last_tested_ms, c.vmid.get()));
        Ok(out)
    }

    /// Runs one restore test: of `vmid`, or of the oldest-tested guest with a backup.
    /// Cleans up what an earlier test left behind first. The record it returns is final.
    pub async fn run(&self, vmid: Option<Vmid>) -> Result<RestoreRecord, RestoreError> {
        let _one = self.one.try_lock().map_err(|_| RestoreError::Busy)?;
        if let Some(why) = self.closed() {
            return Err(RestoreError::NotAllowed(why));
        }
        self.cleanup_locked().await?;
        let (vmid, kind) = match vmid {
            Some(v) => {
                let found = self.guests().await?.into_iter().find(|(g, _)| *g == v);
                found.ok_or(RestoreError::NoSuchGuest(v))?
            }
            None => {
                let c = self.candidates().await?;
                let first = c.first().ok_or(RestoreError::NothingToTest)?;
                (first.vmid, first.kind)
            }
        };
        let t0 = Instant::now();
        let mut rec = RestoreRecord {
            id: 0,
            vmid: vmid.get(),
            kind: kind.as_str().to_string(),
            archive: None,
            archive_ctime: None,
            archive_size: None,
            scratch_vmid: None,
            started_ms: now_ms(),
            step: "planned".to_string(),
            scratch: "gone".to_string(),
            restore_seconds: None,
            boot_seconds: None,
            duration_seconds: None,
            result: None,
            reason: None,
            upids: Vec::new(),
            finished_ms: None,
            seq: None,
            retry: false,
            cleanup_error: None,
            cleanup_failing_since_ms: None,
        };
        let verdict = match self.test(&mut rec, vmid, kind).await {
            Ok(v) => v,
            Err(e @ (RestoreError::Journal(_) | RestoreError::Blocking(_))) => return Err(e),
            // PVE could not be read (or the queue stopped): nothing was learnt about the
            // backup, so this is no `failed`; the guest keeps its place in the round-robin.
            Err(e) => {
                rec.retry = true;
                Some(("skipped", format!("{NO_VERDICT}{e}")))
            }
        };
        let (result, reason) =
            verdict.unwrap_or(("failed", "the test ended without a verdict".to_string()));
        // Stop and destroy the scratch guest after every outcome.
        let cleanup_note = if rec.scratch == "maybe" {
            match self.destroy_scratch(&mut rec, true).await {
                Ok(()) => None,
                Err(e @ (RestoreError::Journal(_) | RestoreError::Blocking(_))) => {
                    return Err(e);
                }
                Err(e) => {
                    note_cleanup_failure(&mut rec, &e);
                    Some(format!(
                        "; the scratch guest is not destroyed yet ({e}); the next run retries"
                    ))
                }
            }
        } else {
            None
        };
        rec.result = Some(result.to_string());
        rec.reason = match (result, cleanup_note) {
            ("passed", None) => None,
            ("passed", Some(n)) => Some(n.trim_start_matches("; ").to_string()),
            (_, n) => Some(format!("{reason}{}", n.unwrap_or_default())),
        };
        if result != "passed" && rec.reason.is_none() {
            rec.reason = Some(reason);
        }
        rec.step = "done".to_string();
        rec.finished_ms = Some(now_ms());
        rec.duration_seconds = Some(t0.elapsed().as_secs_f64());
        self.journal_put(&mut rec).await?;
        tracing::info!(vmid = rec.vmid, scratch = ?rec.scratch_vmid, result = ?rec.result,
            reason = ?rec.reason, "restore test finished");
        Ok(rec)
    }

    /// The steps up to the verdict; the caller cleans up.
    async fn test(
        &self,
        rec: &mut RestoreRecord,
        vmid: Vmid,
        kind: GuestKind,
    ) -> Result<Verdict, RestoreError> {
        let s = &self.deps.settings;
        // The newest backup of the guest, of its kind.
        let newest = self
            .backups(Some(vmid))
            .await?
            .into_iter()
            .filter(|b| b.vmid == Some(vmid))
            .filter(|b| b.subtype.as_deref().is_none_or(|t| t == kind.as_str()))
            .max_by_key(|b| b.ctime.unwrap_or(0));
        let Some(backup) = newest else {
            return Ok(Some(("skipped", format!("guest {vmid} has no backup"))));
        };
        rec.archive = Some(backup.volid.clone());
        rec.archive_ctime = backup.ctime;
        rec.archive_size = backup.size;
        if let (Some(max), Some(size)) = (s.max_archive_bytes, backup.size)
            && size > max
        {
            return Ok(Some((
                "skipped",
                format!(
                    "the archive is {size} bytes, above restore_tests.max_archive_bytes ({max})"
                ),
            )));
        }
        // The guest's config: what may not be restored, and what the disks need.
        let source = self.deps.client.guest_config(kind, vmid).await?;
        if let Some(why) = rules::cannot_test(kind, &source) {
            return Ok(Some(("skipped", why)));
        }
        let need = rules::disk_bytes(kind, &source).max(backup.size.unwrap_or(0));
        if let Some(why) = self.room_for(need).await? {
            return Ok(Some(("skipped", why)));
        }
        let Some(scratch) = self.free_scratch().await? else {
            return Ok(Some((
                "skipped",
                format!(
                    "no free scratch vmid in {}-{} (a vmid taken by a guest no restore test made is left alone)",
                    self.deps.scratch.start(),
                    self.deps.scratch.end()
                ),
            )));
        };
        if let Some(why) = self.closed() {
            return Ok(Some(("skipped", format!("not started: {why}"))));
        }

        // Intent: from here on a scratch guest may exist.
        rec.scratch_vmid = Some(scratch.get());
        rec.scratch = "maybe".to_string();
        rec.step = "restoring".to_string();
        self.journal_put(rec).await?;
        if rec.id == 0 {
            return Err(RestoreError::NotConfigured("journal gave no id".into()));
        }
        let name = source
            .str(match kind {
                GuestKind::Lxc => "hostname",
                GuestKind::Qemu => "name",
            })
            .ok()
            .flatten()
            .unwrap_or("guest")
            .to_string();
        let mut overrides = std::collections::BTreeMap::new();
        let name_key = match kind {
            GuestKind::Lxc => "hostname",
            GuestKind::Qemu => "name",
        };
        overrides.insert(
            name_key.to_string(),
            ConfigValue::from(scratch_name(&name, scratch)),
        );
        overrides.insert("onboot".to_string(), ConfigValue::from(false));
        overrides.insert(
            "description".to_string(),
            ConfigValue::from(format!(
                "{}of {} (guest {vmid}): a scratch guest, destroyed when the test ends",
                marker(rec.id),
                backup.volid
            )),
        );
        for k in rules::net_keys(&source) {
            if let Some(v) = source.get(&k).and_then(|v| v.as_str()) {
                overrides.insert(k, ConfigValue::from(rules::detached(kind, v, true)));
            }
        }
        let client = self.deps.client.clone();
        let storage = self.storage.clone();
        let archive = backup.volid.clone();
        let restore_start = Instant::now();
        let refused = self
            .in_lane(scratch, "restore-test: restore", move |p| {
                Box::pin(async move {
                    match kind {
                        GuestKind::Lxc => {
                            let o = RestoreOptions {
                                archive,
                                storage: Some(storage),
                                unique: true,
                                start: false,
                                overrides,
                                ..Default::default()
                            };
                            client.lxc_restore(p, &o).await
                        }
                        GuestKind::Qemu => {
                            let o = QemuRestoreOptions {
                                archive,
                                storage: Some(storage),
                                unique: true,
                                start: false,
                                overrides,
                                ..Default::default()
                            };
                            client.qemu_restore(p, &o).await
                        }
                    }
                })
            })
            .await?;
        let upid: Upid = match refused {
            Ok(u) => u,
            // No answer: PVE may have started the restore; the scratch guest stays
            // `maybe` and is cleaned up (by its marker) like any other.
            Err(e) if e.is_unreachable() => {
                return Err(e.into());
            }
            Err(e) => {
                // Refused before a task started: nothing was made, and nothing was learnt
                // about the backup (vmid taken elsewhere in the cluster, permission, …).
                rec.scratch = "gone".to_string();
                return Ok(Some((
                    "skipped",
                    format!("PVE refused the restore before it started: {e}"),
                )));
            }
        };
        rec.upids.push(upid.to_string());
        self.journal_put(rec).await?;
        let waited = self.deps.client.wait_task(&upid, self.deps.task_wait).await;
        rec.restore_seconds = Some(restore_start.elapsed().as_secs_f64());
        match waited {
            Ok(_) => {}
            Err(e @ ProxmoxError::TaskFailed { .. }) => {
                return Ok(Some((
                    "failed",
                    format!("the restore failed: {}", task_text(&e)),
                )));
            }
            // The task's end could not be read: no verdict.
            Err(e) => return Err(e.into()),
        }
        rec.step = "restored".to_string();
        self.journal_put(rec).await?;

        // Detach what the restore left attached and remove what reaches outside.
        if let Some(why) = self.closed() {
            return Ok(Some((
                "skipped",
                format!("stopped after the restore: {why}"),
            )));
        }
        let restored = match self.prepare(scratch, kind).await? {
            Ok(cfg) => cfg,
            Err(why) => return Ok(Some(("skipped", why))),
        };
        rec.step = "prepared".to_string();
        self.journal_put(rec).await?;

        // Start, then the boot and stability checks.
        if let Some(why) = self.closed() {
            return Ok(Some(("skipped", format!("not started: {why}"))));
        }
        rec.step = "starting".to_string();
        self.journal_put(rec).await?;
        let boot_start = Instant::now();
        let client = self.deps.client.clone();
        let upid = self
            .in_lane(scratch, "restore-test: start", move |p| {
                Box::pin(async move { client.start(p, kind).await })
            })
            .await?;
        let upid = match upid {
            Ok(u) => u,
            Err(e) if e.is_unreachable() => {
                return Err(e.into());
            }
            // PVE refused the request (a start that fails is a failed task, below).
            Err(e) => {
                return Ok(Some((
                    "skipped",
                    format!("PVE refused to start the scratch guest: {e}"),
                )));
            }
        };
        rec.upids.push(upid.to_string());
        rec.step = "checking".to_string();
        self.journal_put(rec).await?;
        match self.deps.client.wait_task(&upid, self.deps.task_wait).await {
            Ok(_) => {}
            Err(e @ ProxmoxError::TaskFailed { .. }) => {
                return Ok(Some((
                    "failed",
                    format!("the scratch guest did not start: {}", task_text(&e)),
                )));
            }
            Err(e) => return Err(e.into()),
        }
        // The backed-up config decides (the restored one), not the guest's current one.
        let agent = kind == GuestKind::Qemu && rules::agent_enabled(&restored);
        let verdict = self.check(scratch, kind, agent, boot_start).await?;
        match verdict {
            Ok(boot) => {
                rec.boot_seconds = Some(boot);
                Ok(Some(("passed", String::new())))
            }
            Err(why) => Ok(Some(("failed", why))),
        }
    }

    /// Whether `need` bytes fit on the target storage with `min_free_fraction` left.
    async fn room_for(&self, need: u64) -> Result<Option<String>, RestoreError> {
        let storages = self.deps.client.storages().await?;
        let Some(s) = storages.iter().find(|s| s.storage == self.storage) else {
            return Ok(Some(format!(
                "the target storage {} is not on this node",
                self.storage
            )));
        };
        if s.active == Some(false) {
            return Ok(Some(format!(
                "the target storage {} is not active",
                s.storage
            )));
        }
        let (Some(total), Some(avail)) = (s.total, s.avail) else {
            return Ok(Some(format!(
                "the target storage {} reports no size",
                s.storage
            )));
        };
        let min = (self.deps.settings.min_free_fraction * total as f64) as u64;
        if avail < need || avail - need < min {
            return Ok(Some(format!(
                "the target storage {} has {avail} of {total} bytes free; the scratch guest needs {need}, which would leave less than restore_tests.min_free_fraction ({})",
                s.storage, self.deps.settings.min_free_fraction
            )));
        }
        Ok(None)
    }

    /// The lowest scratch vmid with no guest and no left-behind test on it.
    async fn free_scratch(&self) -> Result<Option<Vmid>, RestoreError> {
        let existing = self.existing().await?;
        let left = self.journal_read(|j| j.restore_left_behind()).await?;
        for n in self.deps.scratch.clone() {
            let taken = existing.iter().any(|(v, _)| v.get() == n)
                || left.iter().any(|r| r.scratch_vmid == Some(n));
            if !taken && let Ok(v) = Vmid::new(u64::from(n)) {
                return Ok(Some(v));
            }
        }
        Ok(None)
    }

    /// Detaches every interface and removes what reaches outside; then reads the config
    /// again: `Ok(config)` to start, or `Err(why)` it must not start.
    async fn prepare(
        &self,
        scratch: Vmid,
        kind: GuestKind,
    ) -> Result<Result<GuestConfig, String>, RestoreError> {
        let cfg = self.deps.client.guest_config(kind, scratch).await?;
        if kind == GuestKind::Lxc && !cfg.lxc_raw()?.is_empty() {
            return Ok(Err(
                "the restored config has raw lxc.* keys, which the API cannot remove".to_string(),
            ));
        }
        let mut change = ConfigChange::new();
        for k in rules::net_keys(&cfg) {
            if let Some(v) = cfg.get(&k).and_then(|v| v.as_str())
                && !rules::is_detached(v)
            {
                change = change.set(k.clone(), rules::detached(kind, v, false));
            }
        }
        for (k, _) in rules::outside_keys(kind, &cfg) {
            change = change.delete(k);
        }
        if !(change.set.is_empty() && change.delete.is_empty()) {
            if let Some(d) = cfg.digest()? {
                change = change.digest(d);
            }
            let client = self.deps.client.clone();
            let wait = self.deps.task_wait;
            let r = self
                .in_lane(scratch, "restore-test: detach", move |p| {
                    Box::pin(async move {
                        match client.set_config(p, kind, &change).await? {
                            SetConfigOutcome::Applied => Ok(()),
                            SetConfigOutcome::Task(u) => client.wait_task(&u, wait).await.map(drop),
                        }
                    })
                })
                .await?;
            if let Err(e) = r {
                return Ok(Err(format!(
                    "could not detach the scratch guest from the outside: {e}"
                )));
            }
        }
        let cfg = self.deps.client.guest_config(kind, scratch).await?;
        let attached: Vec<String> = rules::net_keys(&cfg)
            .into_iter()
            .filter(|k| {
                cfg.get(k)
                    .and_then(|v| v.as_str())
                    .is_none_or(|v| !rules::is_detached(v))
            })
            .collect();
        let outside = rules::outside_keys(kind, &cfg);
        if !attached.is_empty() || !outside.is_empty() {
            return Ok(Err(format!(
                "the scratch guest still has attached interfaces {attached:?} or outside keys {:?}; not started",
                outside.iter().map(|(k, _)| k).collect::<Vec<_>>()
            )));
        }
        Ok(Ok(cfg))
    }

    /// Running within the boot window (and the agent answering), then still running after
    /// `stable_seconds`. `Ok(boot seconds)` or `Err(why)`.
    async fn check(
        &self,
        scratch: Vmid,
        kind: GuestKind,
        agent: bool,
        boot_start: Instant,
    ) -> Result<Result<f64, String>, RestoreError> {
        let s = &self.deps.settings;
        let boot_deadline = boot_start + Duration::from_secs(s.boot_check_seconds);
        loop {
            let st = self.deps.client.guest_status(kind, scratch).await?;
            if st.is_running() {
                break;
            }
            if Instant::now() >= boot_deadline {
                return Ok(Err(format!(
                    "the scratch guest was not running within {} s",
                    s.boot_check_seconds
                )));
            }
            tokio::time::sleep(self.deps.poll).await;
        }
        if agent {
            loop {
                let client = self.deps.client.clone();
                let r = self
                    .in_lane(scratch, "restore-test: agent ping", move |p| {
                        Box::pin(async move { client.agent_ping(p).await })
                    })
                    .await?;
                match r {
                    Ok(()) => break,
                    // The token may not ask (a missing `VM.GuestAgent.Audit`): nothing
                    // about the guest, and waiting does not change it.
                    Err(e) if e.is_config_problem() => return Err(e.into()),
                    // PVE itself did not answer: that says nothing about the guest.
                    Err(e) if e.is_unreachable() && Instant::now() >= boot_deadline => {
                        return Err(e.into());
                    }
                    Err(e) if Instant::now() >= boot_deadline => {
                        return Ok(Err(format!(
                            "the guest agent did not answer within {} s: {e}",
                            s.boot_check_seconds
                        )));
                    }
                    Err(_) => tokio::time::sleep(self.deps.poll).await,
                }
            }
        }
        let boot = boot_start.elapsed().as_secs_f64();
        let stable_until = Instant::now() + Duration::from_secs(s.stable_seconds);
        loop {
            let st = self.deps.client.guest_status(kind, scratch).await?;
            if !st.is_running() {
                return Ok(Err(format!(
                    "the scratch guest stopped within {} s of booting",
                    s.stable_seconds
                )));
            }
            let now = Instant::now();
            if now >= stable_until {
                return Ok(Ok(boot));
            }
            tokio::time::sleep(self.deps.poll.min(stable_until - now)).await;
        }
    }

    /// Stops (when running) and destroys the scratch guest of `rec`, then records it
    /// gone. `made_now`: this run made it (a failed QEMU restore leaves an empty config
    /// without the marker); otherwise the guest must carry the marker.
    async fn destroy_scratch(
        &self,
        rec: &mut RestoreRecord,
        made_now: bool,
    ) -> Result<(), RestoreError> {
        let Some(n) = rec.scratch_vmid else {
            rec.scratch = "gone".to_string();
            return Ok(());
        };
        let scratch = Vmid::new(u64::from(n))
            .map_err(|_| RestoreError::NotConfigured(format!("journal names scratch vmid {n}")))?;
        if let Some(why) = self.closed() {
            return Err(RestoreError::NotAllowed(why));
        }
        // Our own tasks on it first (a restore still running after a crash).
        for u in &rec.upids {
            if let Ok(u) = u.parse::<Upid>() {
                let _ = self.deps.client.wait_task(&u, self.deps.task_wait).await;
            }
        }
        let Some((_, kind)) = self
            .existing()
            .await?
            .into_iter()
            .find(|(v, _)| *v == scratch)
        else {
            rec.scratch = "gone".to_string();
            rec.step = if rec.result.is_some() {
                "done"
            } else {
                "cleaning"
            }
            .to_string();
            self.journal_put(rec).await?;
            return Ok(());
        };
        // Wait out a lock (a restore whose task id was never recorded).
        let deadline = Instant::now() + Duration::from_secs(self.deps.settings.boot_check_seconds);
        let cfg = loop {
            let cfg = self.deps.client.guest_config(kind, scratch).await?;
            if cfg.lock()?.is_none() || Instant::now() >= deadline {
                break cfg;
            }
            tokio::time::sleep(self.deps.poll).await;
        };
        if !self.is_ours(rec, &cfg, made_now) {
            tracing::warn!(
                scratch = n,
                "a guest no restore test made is on a scratch vmid; left alone"
            );
            rec.scratch = "gone".to_string();
            self.journal_put(rec).await?;
            return Ok(());
        }
        rec.step = "cleaning".to_string();
        self.journal_put(rec).await?;
        let client = self.deps.client.clone();
        let wait = self.deps.task_wait;
        let upids: Vec<String> = self
            .in_lane(scratch, "restore-test: destroy", move |p| {
                Box::pin(async move {
                    let mut upids = Vec::new();
                    if client.guest_status(kind, p.vmid()).await?.is_running() {
                        let u = client.stop(p, kind).await?;
                        upids.push(u.to_string());
                        client.wait_task(&u, wait).await?;
                    }
                    let u = client.destroy(p, kind, true, true).await?;
                    upids.push(u.to_string());
                    client.wait_task(&u, wait).await?;
                    Ok::<_, ProxmoxError>(upids)
                })
            })
            .await??;
        rec.upids.extend(upids);
        rec.scratch = "gone".to_string();
        rec.cleanup_error = None;
        rec.cleanup_failing_since_ms = None;
        self.journal_put(rec).await?;
        Ok(())
    }

    fn is_ours(&self, rec: &RestoreRecord, cfg: &GuestConfig, made_now: bool) -> bool {
        let desc = cfg.description().ok().flatten().unwrap_or("");
        if desc.starts_with(&marker(rec.id)) {
            return true;
        }
        // A failed QEMU restore of this test leaves an empty config behind: destroyed only
        // by the run that just saw its own restore fail there. After a crash an empty
        // guest on the vmid may be anyone's (`qm create` without a name): left alone.
        let empty = cfg.get("description").is_none()
            && cfg.get("name").is_none()
            && cfg.get("hostname").is_none();
        empty && made_now
    }

    /// The scratch guests that could not be destroyed (each blocks further tests until it
    /// is): their tests' records, with `cleanup_error` and `cleanup_failing_since_ms` set.
    pub async fn not_destroyed(&self) -> Result<Vec<RestoreRecord>, RestoreError> {
        let left = self.journal_read(|j| j.restore_left_behind()).await?;
        Ok(left
            .into_iter()
            .filter(|r| r.cleanup_error.is_some())
            .collect())
    }

    /// Cleans up every scratch guest earlier tests left behind; closes their records.
    /// Returns how many records it closed.
    pub async fn cleanup(&self) -> Result<usize, RestoreError> {
        let _one = self.one.try_lock().map_err(|_| RestoreError::Busy)?;
        self.cleanup_locked().await
    }

    async fn cleanup_locked(&self) -> Result<usize, RestoreError> {
        let left = self.journal_read(|j| j.restore_left_behind()).await?;
        let mut n = 0;
        for mut rec in left {
            tracing::info!(id = rec.id, scratch = ?rec.scratch_vmid, step = %rec.step,
                "cleaning up after an interrupted restore test");
            match self.destroy_scratch(&mut rec, false).await {
                Ok(()) => {}
                Err(
                    e @ (RestoreError::Journal(_)
                    | RestoreError::Blocking(_)
                    | RestoreError::NotAllowed(_)),
                ) => return Err(e),
                Err(e) => {
                    // Loud and safe: recorded (status and the report show it), and no
                    // further test runs while a scratch guest is left over.
                    note_cleanup_failure(&mut rec, &e);
                    self.journal_put(&mut rec).await?;
                    tracing::error!(id = rec.id, scratch = ?rec.scratch_vmid, error = %e,
                        "the scratch guest of a restore test cannot be destroyed");
                    return Err(RestoreError::ScratchNotDestroyed {
                        scratch: rec.scratch_vmid.unwrap_or(0),
                        test: rec.id,
                        error: e.to_string(),
                    });
                }
            }
            if rec.result.is_none() {
                rec.result = Some("skipped".to_string());
                rec.reason = Some(format!(
                    "the test did not finish (the agent stopped during `{}`); its scratch guest was cleaned up",
                    rec.step
                ));
                rec.step = "done".to_string();
                rec.finished_ms = Some(now_ms());
                self.journal_put(&mut rec).await?;
            }
            n += 1;
        }
        Ok(n)
    }
}

/// Records a failed destroy of `rec`'s scratch guest: the error, and since when (kept
/// from the first failure). A closed gate is no failure: the destroy only waits.
fn note_cleanup_failure(rec: &mut RestoreRecord, e: &RestoreError) {
    if matches!(e, RestoreError::NotAllowed(_)) {
        return;
    }
    rec.cleanup_error = Some(e.to_string());
    rec.cleanup_failing_since_ms.get_or_insert_with(now_ms);
}

/// `<name>-restoretest`, cut so that the whole stays a valid DNS label (63 bytes).
fn scratch_name(name: &str, scratch: Vmid) -> String {
    let base: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .collect();
    let base = if base.is_empty() {
        format!("scratch{scratch}")
    } else {
        base
    };
    let keep = 63 - NAME_SUFFIX.len();
    let base = &base[..base.len().min(keep)];
    format!("{}{NAME_SUFFIX}", base.trim_end_matches('-'))
}

/// A task error as one line: the task's exit status when it failed, else the error.
fn task_text(e: &ProxmoxError) -> String {
    match e {
        ProxmoxError::TaskFailed { exitstatus, .. } => exitstatus.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scratch_names_stay_dns_labels() {
        let v = Vmid::new(9900).unwrap();
        assert_eq!(scratch_name("web01", v), "web01-restoretest");
        assert_eq!(scratch_name("", v), "scratch9900-restoretest");
        let long = "a".repeat(80);
        assert_eq!(scratch_name(&long, v).len(), 63);
        assert_eq!(scratch_name("db.example", v), "dbexample-restoretest");
    }
}
