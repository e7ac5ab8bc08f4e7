//! The host collector: builds one [`HostReport`] per cycle from read-only sources.
//!
//! Sources: the Proxmox client (version, node status, guest lists, per-guest status and
//! config, storages, backup listings), SMART through the `smart` helper ([`SmartSource`],
//! on its own slower schedule), hwmon temperatures ([`SensorSource`]), the cloudflared
//! prober, the helper's audit log ([`AuditReader`]) and the reconcile engine's state.
//!
//! Partial failure, the rules the hub relies on:
//! - Proxmox unreachable (node status fails): `host` is `null`, no guests, no storage, and
//!   the error is in `errors`; the report is still sent ("agent alive, Proxmox down").
//! - One guest's status or config failing makes that guest `unknown` with `spec: null`;
//!   the other guests are reported as usual.
//! - SMART, sensors or cloudflared failing leaves those entries `unknown` or empty, with
//!   the reason in `errors`.
//! - Every error is logged once when it appears (or changes) and once when it clears,
//!   not every cycle.
//!
//! Per-guest requests (status + config) run on a fixed number of workers
//! ([`DEFAULT_GUEST_CONCURRENCY`]).
//!
//! Must never: call a mutating Proxmox endpoint or helper operation, or wake a sleeping
//! disk (SMART reads go through the helper with `-n standby`).

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use felhom_protocol::Vmid;
use tokio::sync::watch;
use tokio::time::Instant;

use super::audit::{AuditCommit, AuditError, AuditReader};
use super::cloudflared::{CloudflaredError, CloudflaredProber};
use super::heartbeat::Collect;
use super::report::{
    BackupReport, BackupVerification, CollectError, Component, CpuInfo, DiskHealth, DiskReport,
    ErrorKind, GuestReport, GuestSpec, GuestStatus, GuestType, HostInfo, HostReport, OpsReport,
    PbsReport, PbsState, ReconcileReport, RestoreProof, RestoreTestReport, RestoreTestResult,
    SensorReport, StorageReport, Timestamp, UsageBytes,
};
use super::smart::{SmartError, discover_disks, parse_smartctl};
use crate::config::Config;
use crate::proxmox::{self, ProxmoxError};
use crate::reconcile::normalize::{self, Field, Norm};

/// Workers for per-guest requests.
pub const DEFAULT_GUEST_CONCURRENCY: usize = 8;
/// Where whole disks are listed when `smart.devices` is not set.
pub const DEFAULT_BLOCK_DIR: &str = "/sys/block";

/// A boxed future, for the object-safe source traits.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One smartctl run as the helper returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmartRaw {
    pub stdout: Vec<u8>,
    pub exit_status: i32,
    pub truncated: bool,
}

/// Reads SMART for one disk (the `smart` helper in the daemon).
pub trait SmartSource: Send + Sync {
    /// `device` is a kernel disk name (`sda`, `nvme0n1`).
    fn read<'a>(&'a self, device: &'a str) -> BoxFuture<'a, Result<SmartRaw, String>>;
}

/// Reads hwmon temperatures (blocking; run off the async threads).
pub trait SensorSource: Send + Sync {
    fn read(&self) -> Result<Vec<SensorReport>, String>;
}

/// SMART through the `smart` helper instance.
impl SmartSource for crate::privileged::Client {
    fn read<'a>(&'a self, device: &'a str) -> BoxFuture<'a, Result<SmartRaw, String>> {
        Box::pin(async move {
            let dev = felhom_protocol::DiskDevice::new(device).map_err(|e| e.to_string())?;
            let out = self.smart_read(&dev).await.map_err(|e| e.to_string())?;
            Ok(SmartRaw {
                stdout: out.stdout,
                exit_status: out.exit_status,
                truncated: out.truncated,
            })
        })
    }
}

/// hwmon temperatures under a sysfs root (`sensors.hwmon_root`).
#[derive(Debug, Clone)]
pub struct HwmonSensors {
    pub root: PathBuf,
}

impl SensorSource for HwmonSensors {
    fn read(&self) -> Result<Vec<SensorReport>, String> {
        crate::sensors::read_hwmon(&self.root)
            .map(|v| {
                v.into_iter()
                    .map(|r| SensorReport {
                        chip: r.chip,
                        label: r.label,
                        temperature_c: r.temperature_c,
                    })
                    .collect()
            })
            .map_err(|e| e.to_string())
    }
}

/// The collector the daemon uses.
pub struct HostCollector {
    agent_id: crate::ops::AgentId,
    node: String,
    pve: Result<proxmox::Client, String>,
    guest_concurrency: usize,
    smart: Option<SmartSchedule>,
    sensors: Option<Arc<dyn SensorSource>>,
    cloudflared: Result<CloudflaredProber, String>,
    audit: Result<Arc<Mutex<AuditReader>>, AuditError>,
    pending_audit: Option<AuditCommit>,
    reconcile: Option<watch::Receiver<Option<ReconcileReport>>>,
    trust: Option<watch::Receiver<crate::ops::TrustState>>,
    ops: Option<Arc<dyn crate::ops::OpsFeed>>,
    /// The journal holding the restore tests (their results and each guest's proof).
    restore: Option<Arc<crate::reconcile::journal::Journal>>,
    /// The highest restore-test `seq` the last collected report carried.
    pending_restore: Option<u64>,
    /// The journal holding the gate's undo points (`ops.undo_points`).
    undo: Option<Arc<crate::reconcile::journal::Journal>>,
    /// `gate.undo_warn_fraction`.
    undo_warn_fraction: f64,
    log: ChangeLog,
}

impl std::fmt::Debug for HostCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostCollector")
            .field("agent_id", &self.agent_id)
            .field("node", &self.node)
            .field("guest_concurrency", &self.guest_concurrency)
            .finish_non_exhaustive()
    }
}

struct SmartSchedule {
    source: Arc<dyn SmartSource>,
    /// `None`: discover from `block_dir`.
    devices: Option<Vec<String>>,
    block_dir: PathBuf,
    interval: Duration,
    last_run: Option<Instant>,
    disks: Vec<DiskReport>,
    errors: Vec<CollectError>,
}

impl HostCollector {
    /// Builds the collector from the configuration. Nothing is read yet; a part that
    /// cannot be set up (e.g. a bad Proxmox URL) reports its error every cycle.
    pub fn new(cfg: &Config, agent_id: crate::ops::AgentId) -> Self {
        let pve = proxmox::Client::from_config(cfg).map_err(|e| e.to_string());
        let cloudflared =
            CloudflaredProber::new(&cfg.cloudflared.metrics_url, cfg.cloudflared.timeout)
                .map_err(|e| e.to_string());
        let audit = AuditReader::open(&cfg.privhelper.audit_log, &cfg.state_dir)
            .map(|r| Arc::new(Mutex::new(r)));
        HostCollector {
            agent_id,
            node: cfg.node.clone(),
            pve,
            guest_concurrency: DEFAULT_GUEST_CONCURRENCY,
            smart: None,
            sensors: None,
            cloudflared,
            audit,
            pending_audit: None,
            reconcile: None,
            trust: None,
            ops: None,
            restore: None,
            pending_restore: None,
            undo: None,
            undo_warn_fraction: cfg.gate.undo_warn_fraction,
            log: ChangeLog::default(),
        }
    }

    /// The collector with every source the daemon has: Proxmox, SMART through the helper
    /// (disks from `/sys/block` unless `smart.devices` names them) and hwmon.
    pub fn for_daemon(cfg: &Config, agent_id: crate::ops::AgentId) -> Self {
        HostCollector::new(cfg, agent_id)
            .with_smart(
                cfg,
                Arc::new(crate::privileged::Client::new(&cfg.privhelper)),
                Path::new(DEFAULT_BLOCK_DIR),
            )
            .with_sensors(Arc::new(HwmonSensors {
                root: cfg.sensors.hwmon_root.clone(),
            }))
    }

    /// Uses an already built Proxmox client (e.g. one with a custom timeout).
    pub fn with_proxmox(mut self, client: proxmox::Client) -> Self {
        self.pve = Ok(client);
        self
    }

    pub fn with_guest_concurrency(mut self, n: usize) -> Self {
        self.guest_concurrency = n.max(1);
        self
    }

    /// Reads SMART through `source` every `cfg.smart.interval_seconds`, for the
    /// configured devices or those found in `block_dir`.
    pub fn with_smart(
        mut self,
        cfg: &Config,
        source: Arc<dyn SmartSource>,
        block_dir: &Path,
    ) -> Self {
        self.smart = Some(SmartSchedule {
            source,
            devices: cfg.smart.devices.clone(),
            block_dir: block_dir.to_path_buf(),
            interval: Duration::from_secs(cfg.smart.interval_seconds.max(1)),
            last_run: None,
            disks: Vec::new(),
            errors: Vec::new(),
        });
        self
    }

    pub fn with_sensors(mut self, source: Arc<dyn SensorSource>) -> Self {
        self.sensors = Some(source);
        self
    }

    /// The reconcile engine's state, copied into each report.
    pub fn with_reconcile(mut self, rx: watch::Receiver<Option<ReconcileReport>>) -> Self {
        self.reconcile = Some(rx);
        self
    }

    /// The daemon's trust in operator keys (reloaded on SIGHUP), for the report's `ops`.
    pub fn with_trust(mut self, rx: watch::Receiver<crate::ops::TrustState>) -> Self {
        self.trust = Some(rx);
        self
    }

    /// The signed-operations service: its held operations and the results the hub has not
    /// accepted yet go into each report's `ops`.
    pub fn with_ops_feed(mut self, feed: Arc<dyn crate::ops::OpsFeed>) -> Self {
        self.ops = Some(feed);
        self
    }

    /// The journal whose restore tests go into each report: the results the hub has not
    /// accepted yet (`restore_tests`) and each guest's last passed one (`restore_proof`).
    pub fn with_restore_journal(
        mut self,
        journal: Arc<crate::reconcile::journal::Journal>,
    ) -> Self {
        self.restore = Some(journal);
        self
    }

    /// The journal whose kept undo points go into each report's `ops.undo_points`, with an
    /// `errors` entry per storage they use more of than `gate.undo_warn_fraction`.
    pub fn with_undo_journal(mut self, journal: Arc<crate::reconcile::journal::Journal>) -> Self {
        self.undo = Some(journal);
        self
    }

    /// Fills `ops.undo_points` from the journal (a backup's size from the storage's listing
    /// when the gate did not record it) and adds the undo-space warnings, from the
    /// storages' totals this report read.
    async fn add_undo_points(&mut self, report: &mut HostReport) {
        let Some(j) = self.undo.clone() else {
            return;
        };
        let points = match tokio::task::spawn_blocking(move || crate::ops::undo_view::kept(&j))
            .await
        {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => {
                let kind = match e {
                    crate::ops::undo_view::UndoViewError::Journal(_) => ErrorKind::Io,
                    crate::ops::undo_view::UndoViewError::Malformed { .. } => ErrorKind::Integrity,
                };
                report
                    .errors
                    .push(err(Component::Ops, None, kind, format!("undo points: {e}")));
                return;
            }
            Err(_) => return,
        };
        report.ops.undo_points = points
            .into_iter()
            .map(|mut p| {
                if p.size_bytes.is_none()
                    && let Some(volid) = p.reference.as_deref()
                    && p.kind == crate::ops::wire::UndoKind::Backup
                {
                    p.size_bytes = report
                        .backups
                        .iter()
                        .find(|b| b.volid == volid)
                        .and_then(|b| b.size_bytes);
                }
                p
            })
            .collect();
        let storage = &report.storage;
        let warnings = crate::ops::undo_view::undo_space_warnings(
            &report.ops.undo_points,
            |id| {
                storage
                    .iter()
                    .find(|s| s.id == id)
                    .and_then(|s| s.total_bytes)
            },
            self.undo_warn_fraction,
        );
        for w in warnings {
            report.errors.push(err(
                Component::Ops,
                Some(w.storage.clone()),
                ErrorKind::UndoSpace,
                w.message(),
            ));
        }
    }

    /// Fills `restore_tests` (after the accepted cursor, at most 100) and each guest's
    /// `restore_proof` from the journal.
    async fn add_restore_tests(&mut self, report: &mut HostReport) {
        self.pending_restore = None;
        let Some(j) = self.restore.clone() else {
            return;
        };
        let read = tokio::task::spawn_blocking(move || {
            let after = j.restore_reported()?;
            Ok::<_, crate::reconcile::journal::JournalError>((
                j.restore_results_after(after, 100)?,
                j.restore_per_guest()?,
                j.restore_left_behind()?,
            ))
        })
        .await;
        let (results, per, left) = match read {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => {
                report.errors.push(err(
                    Component::Reconcile,
                    None,
                    ErrorKind::Io,
                    format!("restore tests: {e}"),
                ));
                return;
            }
            Err(_) => return,
        };
        let ts = |ms: i64| crate::timestamp::Timestamp::from_unix(ms.div_euclid(1000));
        // A scratch guest that cannot be destroyed blocks every further test: loud.
        for r in left.iter().filter(|r| r.cleanup_error.is_some()) {
            let scratch = r.scratch_vmid.map(|v| v.to_string()).unwrap_or_default();
            report.errors.push(err(
                Component::Reconcile,
                Some(scratch.clone()),
                ErrorKind::Other,
                format!(
                    "restore tests blocked: scratch guest {scratch} (test #{} of guest {}) cannot be destroyed since {}: {}",
                    r.id,
                    r.vmid,
                    r.cleanup_failing_since_ms
                        .and_then(ts)
                        .map(|t| t.to_string())
                        .unwrap_or_else(|| "?".into()),
                    r.cleanup_error.as_deref().unwrap_or("")
                ),
            ));
        }
        for r in &results {
            let result = match r.result.as_deref() {
                Some("passed") => RestoreTestResult::Passed,
                Some("failed") => RestoreTestResult::Failed,
                _ => RestoreTestResult::Skipped,
            };
            let Some(started_at) = ts(r.started_ms) else {
                continue;
            };
            report.restore_tests.push(RestoreTestReport {
                vmid: r.vmid,
                archive: r.archive.clone(),
                archive_ctime: r
                    .archive_ctime
                    .and_then(crate::timestamp::Timestamp::from_unix),
                scratch_vmid: r.scratch_vmid,
                started_at,
                duration_seconds: r.duration_seconds.unwrap_or(0.0),
                restore_seconds: r.restore_seconds,
                boot_seconds: r.boot_seconds,
                result,
                reason: r.reason.clone(),
                upids: r.upids.clone(),
            });
        }
        self.pending_restore = results.iter().filter_map(|r| r.seq).max();
        for g in &mut report.guests {
            if let Some((_, Some(passed))) = per.get(&g.vmid)
                && let (Some(archive), Some(at)) =
                    (passed.archive.clone(), passed.finished_ms.and_then(ts))
            {
                g.restore_proof = Some(RestoreProof {
                    archive,
                    passed_at: at,
                });
            }
        }
    }

    /// Builds one report (`sent_at` is set again by the loop just before sending).
    pub async fn collect_report(&mut self) -> HostReport {
        let mut report = HostReport::new(&self.agent_id, &self.node);
        // The engine's state before anything is read: a report that says the desired
        // state is applied then lists the guests as they were after that, never from
        // before (the reads below take a while, the engine goes on meanwhile).
        report.reconcile = self.reconcile.as_ref().and_then(|rx| rx.borrow().clone());
        if let Some(rx) = &self.trust {
            report.ops = OpsReport::from_trust(&rx.borrow());
        }
        if let Some(feed) = &self.ops {
            let (held, pending) = feed.snapshot();
            report.ops.held = held;
            report.ops.pending_results = pending;
        }
        let pve = self.pve.clone();
        let concurrency = self.guest_concurrency;
        let cloudflared = self.cloudflared.clone();
        let sensors = self.sensors.clone();
        let audit = self.audit.clone();

        let proxmox_part = async {
            match &pve {
                Ok(client) => Some(collect_proxmox(client, concurrency).await),
                Err(e) => {
                    let mut p = ProxmoxPart::default();
                    p.errors
                        .push(err(Component::Proxmox, None, ErrorKind::Other, e.clone()));
                    Some(p)
                }
            }
        };
        let smart_part = async {
            if let Some(s) = self.smart.as_mut() {
                s.run_if_due().await;
            }
        };
        let cloudflared_part = async {
            match &cloudflared {
                Ok(p) => {
                    let probe = p.probe().await;
                    let e = probe.error.map(|e| {
                        let kind = match e {
                            CloudflaredError::Status { .. } => ErrorKind::Http,
                            CloudflaredError::Timeout { .. } => ErrorKind::Timeout,
                            CloudflaredError::Request { .. } => ErrorKind::Unreachable,
                            CloudflaredError::Setup { .. } => ErrorKind::Other,
                        };
                        err(Component::Cloudflared, None, kind, e.to_string())
                    });
                    (probe.report, e)
                }
                Err(e) => (
                    report.cloudflared.clone(),
                    Some(err(
                        Component::Cloudflared,
                        None,
                        ErrorKind::Other,
                        e.clone(),
                    )),
                ),
            }
        };
        let sensors_part = async {
            match sensors {
                None => (Vec::new(), None),
                Some(src) => match tokio::task::spawn_blocking(move || src.read()).await {
                    Ok(Ok(mut v)) => {
                        v.sort_by(|a, b| (&a.chip, &a.label).cmp(&(&b.chip, &b.label)));
                        (v, None)
                    }
                    Ok(Err(e)) => (
                        Vec::new(),
                        Some(err(Component::Sensors, None, ErrorKind::Io, e)),
                    ),
                    Err(e) => (
                        Vec::new(),
                        Some(err(
                            Component::Sensors,
                            None,
                            ErrorKind::Other,
                            e.to_string(),
                        )),
                    ),
                },
            }
        };
        let audit_part = async {
            match audit {
                Err(e) => (Vec::new(), vec![e], None),
                Ok(reader) => {
                    let batch = tokio::task::spawn_blocking(move || {
                        reader.lock().map(|mut r| r.read_batch()).ok()
                    })
                    .await
                    .ok()
                    .flatten()
                    .unwrap_or_default();
                    (batch.records, batch.errors, batch.commit)
                }
            }
        };
        let (
            pve_part,
            (),
            (cf, cf_err),
            (sensor_list, sensor_err),
            (audit_records, audit_errors, commit),
        ) = tokio::join!(
            proxmox_part,
            smart_part,
            cloudflared_part,
            sensors_part,
            audit_part
        );

        let pve_part = pve_part.unwrap_or_default();
        report.errors.extend(pve_part.errors);
        report.guests = pve_part.guests;
        report.storage = pve_part.storage;
        report.backups = pve_part.backups;
        report.pbs = pve_part.pbs;
        if let Some(mut host) = pve_part.host {
            if let Some(s) = &self.smart {
                host.disks = s.disks.clone();
                report.errors.extend(s.errors.iter().cloned());
            }
            host.sensors = sensor_list;
            report.host = Some(host);
        }
        report.errors.extend(sensor_err);
        report.cloudflared = cf;
        report.errors.extend(cf_err);
        report.audit = audit_records;
        report.errors.extend(audit_errors.into_iter().map(|e| {
            let kind = match e {
                AuditError::Io { .. } | AuditError::Cursor { .. } => ErrorKind::Io,
                _ => ErrorKind::Integrity,
            };
            err(Component::Audit, None, kind, e.to_string())
        }));
        self.pending_audit = commit;
        self.add_restore_tests(&mut report).await;
        self.add_undo_points(&mut report).await;
        self.log.observe(&report.errors);
        report
    }

    /// The hub accepted the last collected report: move the audit cursor past its records.
    pub fn report_accepted(&mut self) {
        if let (Some(commit), Ok(reader)) = (self.pending_audit.take(), &self.audit)
            && let Ok(mut r) = reader.lock()
            && let Err(e) = r.commit(commit)
        {
            tracing::warn!(error = %e, "could not save the audit cursor; the records will be sent again");
        }
    }
}

impl Collect for HostCollector {
    fn collect(&mut self) -> impl Future<Output = HostReport> + Send {
        self.collect_report()
    }

    fn accepted(&mut self, report: &HostReport) {
        self.report_accepted();
        if let (Some(seq), Some(j)) = (self.pending_restore.take(), &self.restore)
            && let Err(e) = j.restore_mark_reported(seq)
        {
            tracing::warn!(error = %e, "could not save the restore-test cursor; the results will be sent again");
        }
        if let Some(feed) = &self.ops {
            let seqs: Vec<u64> = report.ops.pending_results.iter().map(|r| r.seq).collect();
            if !seqs.is_empty() {
                feed.delivered(&seqs);
            }
        }
    }
}

fn err(
    component: Component,
    subject: Option<String>,
    kind: ErrorKind,
    message: String,
) -> CollectError {
    CollectError {
        component,
        subject,
        kind,
        message,
    }
}

fn pve_kind(e: &ProxmoxError) -> ErrorKind {
    match e {
        ProxmoxError::Transport { .. }
        | ProxmoxError::Tls { .. }
        | ProxmoxError::PinMismatch { .. } => ErrorKind::Unreachable,
        ProxmoxError::Timeout { .. } => ErrorKind::Timeout,
        ProxmoxError::Unauthorized { .. } => ErrorKind::Auth,
        ProxmoxError::PermissionDenied { .. } => ErrorKind::Permission,
        ProxmoxError::Api { status, .. } if *status == 595 || *status == 596 => {
            ErrorKind::Unreachable
        }
        ProxmoxError::Api { .. } => ErrorKind::Http,
        ProxmoxError::Decode { .. } | ProxmoxError::BadConfigValue { .. } => ErrorKind::Decode,
        _ => ErrorKind::Other,
    }
}

fn pve_err(component: Component, subject: Option<String>, e: &ProxmoxError) -> CollectError {
    err(component, subject, pve_kind(e), e.to_string())
}

#[derive(Default)]
struct ProxmoxPart {
    host: Option<HostInfo>,
    guests: Vec<GuestReport>,
    storage: Vec<StorageReport>,
    backups: Vec<BackupReport>,
    pbs: Vec<PbsReport>,
    errors: Vec<CollectError>,
}

async fn collect_proxmox(client: &proxmox::Client, concurrency: usize) -> ProxmoxPart {
    let mut part = ProxmoxPart::default();
    let (version, status) = tokio::join!(client.version(), client.node_status());
    let status = match status {
        Ok(s) => s,
        Err(e) => {
            let unreachable = e.is_unreachable()
                || matches!(
                    e,
                    ProxmoxError::Tls { .. } | ProxmoxError::PinMismatch { .. }
                );
            part.errors.push(pve_err(Component::Proxmox, None, &e));
            if unreachable {
                // Proxmox is down: everything else would time out the same way.
                return part;
            }
            // e.g. 403 on node status: the guests may still be readable
            let (guests, storages) =
                tokio::join!(collect_guests(client, concurrency), collect_storage(client));
            merge_lists(&mut part, guests, storages);
            return part;
        }
    };
    let pve_version = match version {
        Ok(v) => Some(v.version),
        Err(e) => {
            part.errors
                .push(pve_err(Component::Proxmox, Some("version".into()), &e));
            None
        }
    };
    part.host = Some(HostInfo {
        pve_version,
        kernel: host_kernel(&status),
        uptime_seconds: status.uptime.unwrap_or(0),
        cpu: CpuInfo {
            usage: status.cpu.unwrap_or(0.0).clamp(0.0, 1.0),
            cores: status
                .cpuinfo
                .as_ref()
                .and_then(|c| c.cpus)
                .and_then(|c| u32::try_from(c).ok())
                .unwrap_or(0),
            loadavg: status.loadavg.clone(),
        },
        memory: UsageBytes {
            total_bytes: status.memory.total.unwrap_or(0),
            used_bytes: status.memory.used.unwrap_or(0),
        },
        rootfs: UsageBytes {
            total_bytes: status.rootfs.total.unwrap_or(0),
            used_bytes: status.rootfs.used.unwrap_or(0),
        },
        disks: Vec::new(),
        sensors: Vec::new(),
    });
    let (guests, storages) =
        tokio::join!(collect_guests(client, concurrency), collect_storage(client));
    merge_lists(&mut part, guests, storages);
    part
}

fn merge_lists(
    part: &mut ProxmoxPart,
    guests: (Vec<GuestReport>, Vec<CollectError>),
    storage: StoragePart,
) {
    part.guests = guests.0;
    part.errors.extend(guests.1);
    part.storage = storage.storage;
    part.backups = storage.backups;
    part.pbs = storage.pbs;
    part.errors.extend(storage.errors);
}

/// The running kernel's release: `current-kernel.release` (PVE ≥ 8.1), else taken from
/// `kversion` (older nodes).
fn host_kernel(status: &proxmox::NodeStatus) -> Option<String> {
    status
        .current_kernel
        .as_ref()
        .map(|k| k.release.trim())
        .filter(|r| !r.is_empty())
        .map(str::to_owned)
        .or_else(|| status.kversion.as_deref().map(kernel_release))
}

/// `Linux 6.8.12-4-pve #1 SMP …` → `6.8.12-4-pve`; anything else is kept whole.
fn kernel_release(kversion: &str) -> String {
    let mut words = kversion.split_whitespace();
    match (words.next(), words.next()) {
        (Some("Linux"), Some(release)) => release.to_owned(),
        _ => kversion.trim().to_owned(),
    }
}

struct ListedGuest {
    kind: proxmox::GuestKind,
    item: proxmox::GuestListItem,
}

async fn collect_guests(
    client: &proxmox::Client,
    concurrency: usize,
) -> (Vec<GuestReport>, Vec<CollectError>) {
    let mut errors = Vec::new();
    let mut listed = Vec::new();
    let (lxc, qemu) = tokio::join!(
        client.guests(proxmox::GuestKind::Lxc),
        client.guests(proxmox::GuestKind::Qemu)
    );
    for (kind, result) in [
        (proxmox::GuestKind::Lxc, lxc),
        (proxmox::GuestKind::Qemu, qemu),
    ] {
        match result {
            Ok(items) => listed.extend(items.into_iter().map(|item| ListedGuest { kind, item })),
            Err(e) => errors.push(pve_err(
                Component::Proxmox,
                Some(format!("{kind} list")),
                &e,
            )),
        }
    }
    listed.sort_by_key(|g| g.item.vmid);
    let listed = Arc::new(listed);
    let next = Arc::new(AtomicUsize::new(0));
    let workers = concurrency.min(listed.len()).max(1);
    let mut handles = Vec::with_capacity(workers);
    for _ in 0..workers {
        let listed = listed.clone();
        let next = next.clone();
        let client = client.clone();
        handles.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(g) = listed.get(i) else { break };
                out.push((i, guest_report(&client, g).await));
            }
            out
        }));
    }
    let mut results: Vec<(usize, (GuestReport, Option<CollectError>))> =
        Vec::with_capacity(listed.len());
    for h in handles {
        match h.await {
            Ok(v) => results.extend(v),
            Err(e) => errors.push(err(
                Component::Guest,
                None,
                ErrorKind::Other,
                format!("guest worker failed: {e}"),
            )),
        }
    }
    results.sort_by_key(|(i, _)| *i);
    let mut guests = Vec::with_capacity(results.len());
    for (_, (g, e)) in results {
        guests.push(g);
        errors.extend(e);
    }
    (guests, errors)
}

async fn guest_report(
    client: &proxmox::Client,
    g: &ListedGuest,
) -> (GuestReport, Option<CollectError>) {
    let vmid = g.item.vmid;
    let mut report = GuestReport {
        vmid: vmid.get(),
        guest_type: match g.kind {
            proxmox::GuestKind::Lxc => GuestType::Lxc,
            proxmox::GuestKind::Qemu => GuestType::Qemu,
        },
        name: g
            .item
            .name
            .clone()
            .unwrap_or_else(|| default_name(g.kind, vmid)),
        status: GuestStatus::Unknown,
        ha_managed: false,
        lock: g.item.lock.clone(),
        template: g.item.template,
        spec: None,
        restore_proof: None,
    };
    let subject = Some(vmid.to_string());
    let status = match client.guest_status(g.kind, vmid).await {
        Ok(s) => s,
        Err(e) => return (report, Some(pve_err(Component::Guest, subject, &e))),
    };
    let config = match client.guest_config(g.kind, vmid).await {
        Ok(c) => c,
        Err(e) => return (report, Some(pve_err(Component::Guest, subject, &e))),
    };
    report.ha_managed = status.ha.managed;
    report.lock = status.lock.clone();
    report.template = status.template;
    if let Some(name) = &status.name {
        report.name = name.clone();
    }
    match guest_spec(g.kind, config.raw()) {
        Ok(spec) => {
            report.spec = Some(spec);
            report.status = match status.status {
                proxmox::RunState::Running => GuestStatus::Running,
                proxmox::RunState::Stopped => GuestStatus::Stopped,
                proxmox::RunState::Other(_) => GuestStatus::Unknown,
            };
            (report, None)
        }
        Err(e) => (
            report,
            Some(err(
                Component::Guest,
                subject,
                ErrorKind::Decode,
                e.to_string(),
            )),
        ),
    }
}

fn default_name(kind: proxmox::GuestKind, vmid: Vmid) -> String {
    match kind {
        proxmox::GuestKind::Lxc => format!("CT{vmid}"),
        proxmox::GuestKind::Qemu => format!("VM{vmid}"),
    }
}

/// The managed fields of a raw PVE config, normalized by the reconcile side's rules.
pub fn guest_spec(
    kind: proxmox::GuestKind,
    config: &serde_json::Map<String, serde_json::Value>,
) -> Result<GuestSpec, normalize::NormalizeError> {
    let nkind = match kind {
        proxmox::GuestKind::Lxc => normalize::GuestKind::Lxc,
        proxmox::GuestKind::Qemu => normalize::GuestKind::Qemu,
    };
    let get = |f: Field| -> Result<Option<Norm>, normalize::NormalizeError> {
        if f.applies_to(nkind) {
            f.actual(nkind, config).map(Some)
        } else {
            Ok(None)
        }
    };
    let int = |n: Option<Norm>| match n {
        Some(Norm::Int(v)) => Some(v),
        _ => None,
    };
    let text = |n: Option<Norm>| match n {
        Some(Norm::Text(t)) => Some(t),
        _ => None,
    };
    let boolean = |n: Option<Norm>| match n {
        Some(Norm::Bool(b)) => Some(b),
        _ => None,
    };
    Ok(GuestSpec {
        memory: int(get(Field::Memory)?).unwrap_or(512),
        swap: int(get(Field::Swap)?),
        cores: int(get(Field::Cores)?),
        cpulimit: match get(Field::Cpulimit)? {
            Some(Norm::Decimal(d)) => d,
            _ => "0".into(),
        },
        onboot: boolean(get(Field::Onboot)?).unwrap_or(false),
        description: text(get(Field::Description)?).unwrap_or_default(),
        tags: match get(Field::Tags)? {
            Some(Norm::Tags(t)) => t.into_iter().collect(),
            _ => Vec::new(),
        },
        hostname: text(get(Field::Hostname)?),
        nesting: boolean(get(Field::Nesting)?),
    })
}

#[derive(Default)]
struct StoragePart {
    storage: Vec<StorageReport>,
    backups: Vec<BackupReport>,
    pbs: Vec<PbsReport>,
    errors: Vec<CollectError>,
}

async fn collect_storage(client: &proxmox::Client) -> StoragePart {
    let mut part = StoragePart::default();
    let items = match client.storages().await {
        Ok(v) => v,
        Err(e) => {
            part.errors.push(pve_err(Component::Storage, None, &e));
            return part;
        }
    };
    let mut listings = Vec::new();
    for s in &items {
        let active = s.active.unwrap_or(false);
        if active && s.contents().any(|c| c == "backup") {
            let client = client.clone();
            let id = s.storage.clone();
            listings.push((
                id.clone(),
                tokio::spawn(async move { client.backups(&id, None).await }),
            ));
        }
    }
    let mut counts: HashMap<String, (u64, Option<i64>)> = HashMap::new();
    for (id, handle) in listings {
        match handle.await {
            Ok(Ok(items)) => {
                let entry = counts.entry(id.clone()).or_insert((0, None));
                for b in items {
                    entry.0 += 1;
                    entry.1 = entry.1.max(b.ctime);
                    part.backups.push(BackupReport {
                        volid: b.volid,
                        storage: id.clone(),
                        vmid: b.vmid.map(Vmid::get),
                        ctime: b.ctime,
                        size_bytes: b.size,
                        format: b.format,
                        protected: b.protected,
                        verification: b.verification.map(|v| BackupVerification {
                            state: v.state,
                            upid: v.upid,
                        }),
                    });
                }
            }
            Ok(Err(e)) => part.errors.push(pve_err(Component::Backups, Some(id), &e)),
            Err(e) => part.errors.push(err(
                Component::Backups,
                Some(id),
                ErrorKind::Other,
                e.to_string(),
            )),
        }
    }
    part.backups
        .sort_by(|a, b| (&a.storage, a.ctime, &a.volid).cmp(&(&b.storage, b.ctime, &b.volid)));
    for s in items {
        let active = s.active.unwrap_or(false);
        let mut content: Vec<String> = s.contents().map(str::to_owned).collect();
        content.sort();
        content.dedup();
        if s.storage_type == "pbs" && s.enabled != Some(false) {
            let listed = counts.get(&s.storage);
            part.pbs.push(PbsReport {
                id: s.storage.clone(),
                state: if active {
                    PbsState::Active
                } else {
                    PbsState::Inactive
                },
                total_bytes: s.total,
                used_bytes: s.used,
                avail_bytes: s.avail,
                backup_count: listed.map(|c| c.0),
                newest_backup_ctime: listed.and_then(|c| c.1),
            });
        }
        part.storage.push(StorageReport {
            id: s.storage,
            storage_type: s.storage_type,
            content,
            active,
            total_bytes: s.total,
            used_bytes: s.used,
            avail_bytes: s.avail,
        });
    }
    part.storage.sort_by(|a, b| a.id.cmp(&b.id));
    part.pbs.sort_by(|a, b| a.id.cmp(&b.id));
    part
}

impl SmartSchedule {
    async fn run_if_due(&mut self) {
        let due = self.last_run.is_none_or(|t| t.elapsed() >= self.interval);
        if !due {
            return;
        }
        self.last_run = Some(Instant::now());
        let mut errors = Vec::new();
        let devices = match &self.devices {
            Some(d) => d.clone(),
            None => match discover_disks(&self.block_dir) {
                Ok(d) => d,
                Err(e) => {
                    errors.push(err(Component::Smart, None, ErrorKind::Io, e.to_string()));
                    Vec::new()
                }
            },
        };
        let previous: HashMap<String, DiskReport> = self
            .disks
            .drain(..)
            .map(|d| (d.device.clone(), d))
            .collect();
        let mut disks = Vec::with_capacity(devices.len());
        for device in devices {
            let read_at = Timestamp::now();
            let parsed = match self.source.read(&device).await {
                Ok(raw) => parse_smartctl(
                    &device,
                    &raw.stdout,
                    raw.exit_status,
                    raw.truncated,
                    read_at,
                ),
                Err(reason) => super::smart::ParsedDisk {
                    disk: DiskReport::unread(&device, read_at),
                    error: Some(SmartError::Smartctl {
                        device: device.clone(),
                        exit_status: -1,
                        message: reason,
                    }),
                },
            };
            let mut disk = parsed.disk;
            // A sleeping disk keeps its identity from the last real read.
            if disk.health == DiskHealth::Standby
                && let Some(prev) = previous.get(&device)
            {
                disk.model = disk.model.or_else(|| prev.model.clone());
                disk.serial = disk.serial.or_else(|| prev.serial.clone());
            }
            if let Some(e) = parsed.error {
                let kind = match e {
                    SmartError::NotJson { .. } => ErrorKind::Decode,
                    SmartError::Discover { .. } => ErrorKind::Io,
                    _ => ErrorKind::Other,
                };
                errors.push(err(
                    Component::Smart,
                    Some(device.clone()),
                    kind,
                    e.to_string(),
                ));
            }
            disks.push(disk);
        }
        self.disks = disks;
        self.errors = errors;
    }
}

/// Logs each error once when it appears or changes, and once when it clears.
#[derive(Default)]
struct ChangeLog {
    last: HashMap<(Component, Option<String>), String>,
}

impl ChangeLog {
    fn observe(&mut self, errors: &[CollectError]) {
        let mut now: HashMap<(Component, Option<String>), String> = HashMap::new();
        for e in errors {
            let key = (e.component, e.subject.clone());
            let entry = now.entry(key).or_default();
            if !entry.is_empty() {
                entry.push_str("; ");
            }
            entry.push_str(&e.message);
        }
        for (key, message) in &now {
            if self.last.get(key) != Some(message) {
                tracing::warn!(component = ?key.0, subject = ?key.1, error = %message, "collection problem");
            }
        }
        for key in self.last.keys() {
            if !now.contains_key(key) {
                tracing::info!(component = ?key.0, subject = ?key.1, "collection problem cleared");
            }
        }
        self.last = now;
    }
}

#[cfg(test)]
mod tests;
