//! Runs one accepted signed operation in its lane, and resumes one found `running` after a
//! crash.
//!
//! Owns: [`OpSpec`] (what the verified payload asks for, kept in the operation's record so
//! a resume needs no re-parse), the preconditions checked in the lane (the guest exists and
//! is of the signed type, `expect.config_digest` matches, a snapshot name is free, a new
//! container's vmid is free), and per kind the order of requests and journal commits:
//! each UPID is committed as soon as Proxmox answers, and a resume never sends a request
//! again that may have reached Proxmox:
//! - a recorded UPID is waited on;
//! - without one, the node's task list is searched for our token's task of the kind's type
//!   for that guest, started at or after the intent's second and not already known to the
//!   journal (reconcile's or a signed operation's), and adopted;
//! - only when none exists and the guest is not already in the asked-for state is the
//!   request sent.
//!
//! Helper operations (`create_container`, `usb_mount`, `usb_unmount`) are idempotent at
//! the helper or checked against the node (a container that exists is not created again).
//!
//! The gated kinds of issue 13 (`set_config`, `rollback`, `restore`, `delete_snapshot`,
//! `destroy`, `undo`, `release_undo`) are carried out by the reversibility gate
//! ([`super::gate`]): undo point first, then the action, the health check, and the undo on
//! failure, each step committed in the record's `gate` object.
//!
//! Must never: send a request before the caller committed the intent, or report a
//! guess: a lost wait leaves the operation `running` ([`Unfinished`]) to be resumed.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use felhom_authz::{
    Action, BackupCompress, BackupMode, Grant, GuestOp, GuestType, HostOp, OpPayload,
};
use felhom_protocol::{BlockDevicePath, MountName, PctCreateSpec, Vmid};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::gate::{self, GateOp, Gated, Who};
use crate::privileged;
use crate::proxmox::{
    Client, GuestKind, GuestPermit, ProxmoxError, SnapshotName, Upid, VzdumpCompress, VzdumpMode,
    VzdumpOptions, VzdumpOutcome,
};
use crate::reconcile::journal::{Journal, JournalError};
use crate::reconcile::pve::Pve;

/// The guest a guest operation acts on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestRef {
    pub kind: GuestKind,
    pub vmid: Vmid,
    /// `expect.config_digest`.
    pub expect_digest: Option<String>,
}

/// What a verified operation asks for, as its record keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum OpSpec {
    Start {
        guest: GuestRef,
    },
    Stop {
        guest: GuestRef,
        timeout_seconds: Option<u32>,
    },
    Reboot {
        guest: GuestRef,
    },
    Snapshot {
        guest: GuestRef,
        name: String,
        description: Option<String>,
    },
    Backup {
        guest: GuestRef,
        storage: String,
        mode: VzdumpMode,
        compress: Option<VzdumpCompress>,
        notes: Option<String>,
    },
    CreateContainer {
        guest: GuestRef,
        spec: Box<PctCreateSpec>,
    },
    UsbMount {
        device: BlockDevicePath,
        name: MountName,
    },
    UsbUnmount {
        name: MountName,
    },
    /// `config`: PVE key → value; `null` deletes the key.
    SetConfig {
        guest: GuestRef,
        config: BTreeMap<String, Value>,
    },
    Rollback {
        guest: GuestRef,
        snapshot: String,
        start: bool,
        /// Granted `irreversible` (with that threshold): runs without an undo point when
        /// none can be made.
        #[serde(default)]
        irreversible: bool,
    },
    Restore {
        guest: GuestRef,
        archive: String,
        storage: String,
        force: bool,
        start: bool,
        /// As for `Rollback`.
        #[serde(default)]
        irreversible: bool,
    },
    DeleteSnapshot {
        guest: GuestRef,
        name: String,
    },
    Destroy {
        guest: GuestRef,
        purge: bool,
    },
    Undo {
        guest: GuestRef,
        op_id: String,
    },
    ReleaseUndo {
        guest: GuestRef,
        op_id: String,
    },
}

impl OpSpec {
    pub fn from_payload(p: &OpPayload) -> OpSpec {
        match &p.action {
            Action::Guest { target, expect, op } => {
                let guest = GuestRef {
                    kind: match target.guest_type {
                        GuestType::Lxc => GuestKind::Lxc,
                        GuestType::Qemu => GuestKind::Qemu,
                    },
                    vmid: target.vmid,
                    expect_digest: expect
                        .as_ref()
                        .map(|e| e.config_digest.as_str().to_string()),
                };
                match op {
                    GuestOp::Start => OpSpec::Start { guest },
                    GuestOp::Stop(s) => OpSpec::Stop {
                        guest,
                        timeout_seconds: s.timeout_seconds.map(|t| t.get()),
                    },
                    GuestOp::Reboot => OpSpec::Reboot { guest },
                    GuestOp::Snapshot(s) => OpSpec::Snapshot {
                        guest,
                        name: s.name.as_str().to_string(),
                        description: s.description.as_ref().map(|d| d.as_str().to_string()),
                    },
                    GuestOp::Backup(b) => OpSpec::Backup {
                        guest,
                        storage: b.storage.as_str().to_string(),
                        mode: match b.mode {
                            BackupMode::Snapshot => VzdumpMode::Snapshot,
                            BackupMode::Suspend => VzdumpMode::Suspend,
                            BackupMode::Stop => VzdumpMode::Stop,
                        },
                        compress: b.compress.map(|c| match c {
                            BackupCompress::None => VzdumpCompress::None,
                            BackupCompress::Gzip => VzdumpCompress::Gzip,
                            BackupCompress::Lzo => VzdumpCompress::Lzo,
                            BackupCompress::Zstd => VzdumpCompress::Zstd,
                        }),
                        notes: b.notes.as_ref().map(|n| n.as_str().to_string()),
                    },
                    GuestOp::CreateContainer(spec) => OpSpec::CreateContainer {
                        guest,
                        spec: spec.clone(),
                    },
                    GuestOp::SetConfig(p) => OpSpec::SetConfig {
                        guest,
                        config: p.to_json_map(),
                    },
                    GuestOp::Rollback { snapshot, start } => OpSpec::Rollback {
                        guest,
                        snapshot: snapshot.as_str().to_string(),
                        start: *start,
                        irreversible: p.grant == Grant::Irreversible,
                    },
                    GuestOp::Restore {
                        archive,
                        storage,
                        force,
                        start,
                    } => OpSpec::Restore {
                        guest,
                        archive: archive.as_str().to_string(),
                        storage: storage.as_str().to_string(),
                        force: *force,
                        start: *start,
                        irreversible: p.grant == Grant::Irreversible,
                    },
                    GuestOp::DeleteSnapshot { name } => OpSpec::DeleteSnapshot {
                        guest,
                        name: name.as_str().to_string(),
                    },
                    GuestOp::Destroy { purge } => OpSpec::Destroy {
                        guest,
                        purge: *purge,
                    },
                    GuestOp::Undo { op_id } => OpSpec::Undo {
                        guest,
                        op_id: op_id.as_str().to_string(),
                    },
                    GuestOp::ReleaseUndo { op_id } => OpSpec::ReleaseUndo {
                        guest,
                        op_id: op_id.as_str().to_string(),
                    },
                }
            }
            Action::Host(HostOp::UsbMount { device, name }) => OpSpec::UsbMount {
                device: device.clone(),
                name: name.clone(),
            },
            Action::Host(HostOp::UsbUnmount { name }) => OpSpec::UsbUnmount { name: name.clone() },
        }
    }

    pub fn guest(&self) -> Option<&GuestRef> {
        match self {
            OpSpec::Start { guest }
            | OpSpec::Stop { guest, .. }
            | OpSpec::Reboot { guest }
            | OpSpec::Snapshot { guest, .. }
            | OpSpec::Backup { guest, .. }
            | OpSpec::CreateContainer { guest, .. }
            | OpSpec::SetConfig { guest, .. }
            | OpSpec::Rollback { guest, .. }
            | OpSpec::Restore { guest, .. }
            | OpSpec::DeleteSnapshot { guest, .. }
            | OpSpec::Destroy { guest, .. }
            | OpSpec::Undo { guest, .. }
            | OpSpec::ReleaseUndo { guest, .. } => Some(guest),
            OpSpec::UsbMount { .. } | OpSpec::UsbUnmount { .. } => None,
        }
    }

    /// Whether it is one of issue 13's gated kinds.
    pub fn is_gated(&self) -> bool {
        matches!(
            self,
            OpSpec::SetConfig { .. }
                | OpSpec::Rollback { .. }
                | OpSpec::Restore { .. }
                | OpSpec::DeleteSnapshot { .. }
                | OpSpec::Destroy { .. }
                | OpSpec::Undo { .. }
                | OpSpec::ReleaseUndo { .. }
        )
    }

    /// The kind's wire name.
    pub fn kind_name(&self) -> &'static str {
        match self {
            OpSpec::Start { .. } => "start",
            OpSpec::Stop { .. } => "stop",
            OpSpec::Reboot { .. } => "reboot",
            OpSpec::Snapshot { .. } => "snapshot",
            OpSpec::Backup { .. } => "backup",
            OpSpec::CreateContainer { .. } => "create_container",
            OpSpec::UsbMount { .. } => "usb_mount",
            OpSpec::UsbUnmount { .. } => "usb_unmount",
            OpSpec::SetConfig { .. } => "set_config",
            OpSpec::Rollback { .. } => "rollback",
            OpSpec::Restore { .. } => "restore",
            OpSpec::DeleteSnapshot { .. } => "delete_snapshot",
            OpSpec::Destroy { .. } => "destroy",
            OpSpec::Undo { .. } => "undo",
            OpSpec::ReleaseUndo { .. } => "release_undo",
        }
    }

    /// Whether it changes a guest the desired state manages (then the desired state is the
    /// authority: `conflicts_with_desired`). Snapshots and backups in `snapshot` or
    /// `suspend` mode leave the guest as it is. Every gated kind that changes the guest's
    /// config, power state, disks or existence is refused there (issue 13). Deleting a
    /// snapshot (`delete_snapshot`, `release_undo`) changes none of what the desired state
    /// governs, as taking one does not: refusing those would leave the undo points of a
    /// guest that came under the desired state impossible to release.
    pub fn conflicts_with_desired(&self) -> bool {
        match self {
            OpSpec::Start { .. }
            | OpSpec::Stop { .. }
            | OpSpec::Reboot { .. }
            | OpSpec::CreateContainer { .. }
            | OpSpec::SetConfig { .. }
            | OpSpec::Rollback { .. }
            | OpSpec::Restore { .. }
            | OpSpec::Destroy { .. }
            | OpSpec::Undo { .. } => true,
            OpSpec::Backup { mode, .. } => *mode == VzdumpMode::Stop,
            OpSpec::Snapshot { .. }
            | OpSpec::DeleteSnapshot { .. }
            | OpSpec::ReleaseUndo { .. }
            | OpSpec::UsbMount { .. }
            | OpSpec::UsbUnmount { .. } => false,
        }
    }

    /// The gate's view of a gated kind (`None` for the others).
    pub fn gated(&self) -> Option<Gated> {
        let (guest, op, irreversible) = match self.clone() {
            OpSpec::SetConfig { guest, config } => (
                guest,
                GateOp::SetConfig {
                    config: config.into_iter().collect(),
                },
                false,
            ),
            OpSpec::Rollback {
                guest,
                snapshot,
                start,
                irreversible,
            } => (guest, GateOp::Rollback { snapshot, start }, irreversible),
            OpSpec::Restore {
                guest,
                archive,
                storage,
                force,
                start,
                irreversible,
            } => (
                guest,
                GateOp::Restore {
                    archive,
                    storage,
                    force,
                    start,
                },
                irreversible,
            ),
            OpSpec::DeleteSnapshot { guest, name } => {
                (guest, GateOp::DeleteSnapshot { name }, true)
            }
            OpSpec::Destroy { guest, purge } => (guest, GateOp::Destroy { purge }, true),
            OpSpec::Undo { guest, op_id } => (guest, GateOp::Undo { op_id }, false),
            OpSpec::ReleaseUndo { guest, op_id } => (guest, GateOp::ReleaseUndo { op_id }, true),
            _ => return None,
        };
        Some(Gated {
            guest,
            op,
            irreversible,
        })
    }
}

/// How an operation ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Final {
    Applied(Map<String, Value>),
    Failed(String),
    /// A gated operation's end: `applied`, `failed` or `rolled_back`, with its result
    /// (which carries the `undo` object).
    Ended {
        state: &'static str,
        message: Option<String>,
        result: Map<String, Value>,
    },
    /// Refused in the lane (`precondition_failed`); nothing was sent.
    Refused {
        reason: &'static str,
        message: String,
    },
    /// A gated end together with the gate's last steps (its `gate` object), recorded in
    /// the same commit as the end.
    Stepped {
        gate: Value,
        end: Box<Final>,
    },
}

/// The operation could not reach an end now (Proxmox unreachable, a lost wait, the
/// journal): it stays as it is and is tried again.
#[derive(Debug, thiserror::Error)]
pub enum Unfinished {
    #[error("{what}: {source}")]
    Proxmox {
        what: &'static str,
        #[source]
        source: ProxmoxError,
    },
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("journal worker stopped: {0}")]
    Blocking(String),
}

fn px(what: &'static str) -> impl FnOnce(ProxmoxError) -> Unfinished {
    move |source| Unfinished::Proxmox { what, source }
}

/// What an operation runs with.
#[derive(Clone)]
pub struct ExecEnv {
    pub pve: Client,
    pub privileged: privileged::Client,
    pub journal: Arc<Journal>,
    /// Graceful-shutdown timeout of `stop` when the operation names none.
    pub shutdown_timeout: Duration,
    /// How long a task may run before we stop waiting (the operation then stays running).
    pub task_timeout: Duration,
    /// `gate.backup_storage`: where undo backups go.
    pub backup_storage: Option<String>,
    /// `gate.health_timeout_seconds`.
    pub health_timeout: Duration,
}

impl std::fmt::Debug for ExecEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecEnv")
            .field("shutdown_timeout", &self.shutdown_timeout)
            .finish_non_exhaustive()
    }
}

async fn blocking<T: Send + 'static>(
    journal: &Arc<Journal>,
    f: impl FnOnce(&Journal) -> Result<T, JournalError> + Send + 'static,
) -> Result<T, Unfinished> {
    let j = journal.clone();
    tokio::task::spawn_blocking(move || f(&j))
        .await
        .map_err(|e| Unfinished::Blocking(e.to_string()))?
        .map_err(Unfinished::from)
}

/// The guest as the node lists it: kind and status, `None` when it does not exist.
async fn find_guest(env: &ExecEnv, vmid: Vmid) -> Result<Option<(GuestKind, String)>, Unfinished> {
    let list = env
        .pve
        .list()
        .await
        .map_err(px("listing the node's guests"))?;
    Ok(list
        .into_iter()
        .find(|g| g.vmid == vmid)
        .map(|g| (g.kind, g.status)))
}

async fn status(env: &ExecEnv, g: &GuestRef) -> Result<String, Unfinished> {
    Ok(env
        .pve
        .guest_status(g.kind, g.vmid)
        .await
        .map_err(px("reading the guest's status"))?
        .status
        .as_str()
        .to_string())
}

fn refused(message: String) -> Final {
    Final::Refused {
        reason: "precondition_failed",
        message,
    }
}

/// What the precheck read in the guest's lane, handed on to the gate so it does not read
/// it again: the gate runs under the same lane permit right after, so nothing else in this
/// agent mutates the guest in between, and a foreign edit meanwhile is caught by the digest
/// guard on the gate's write.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Seen {
    /// The node's listing of the guest (kind, power state): `None` when not read,
    /// `Some(None)` when the guest is not listed.
    pub listing: Option<Option<(GuestKind, String)>>,
    /// The guest's config as read (with its `digest`), when read.
    pub config: Option<Map<String, Value>>,
}

/// The preconditions checked in the lane before the intent; `Some` refuses.
pub async fn precheck(env: &ExecEnv, spec: &OpSpec) -> Result<Option<Final>, Unfinished> {
    Ok(precheck_seen(env, spec).await?.0)
}

/// [`precheck`], and what it read (for the gate).
pub async fn precheck_seen(
    env: &ExecEnv,
    spec: &OpSpec,
) -> Result<(Option<Final>, Seen), Unfinished> {
    let mut seen = Seen::default();
    let Some(g) = spec.guest() else {
        return Ok((None, seen));
    };
    // Undo and release may act on a guest that is gone (a destroy's undo); the gate
    // checks the rest itself.
    if matches!(spec, OpSpec::Undo { .. } | OpSpec::ReleaseUndo { .. }) {
        return Ok((None, seen));
    }
    let found = find_guest(env, g.vmid).await?;
    seen.listing = Some(found.clone());
    if matches!(spec, OpSpec::Restore { .. }) && found.is_none() {
        return Ok((None, seen));
    }
    if let OpSpec::CreateContainer { .. } = spec {
        let r = found.map(|(kind, _)| {
            refused(format!(
                "vmid {} already exists on this node ({kind})",
                g.vmid
            ))
        });
        return Ok((r, seen));
    }
    let Some((kind, status)) = found else {
        let r = refused(format!("guest {} does not exist on this node", g.vmid));
        return Ok((Some(r), seen));
    };
    if kind != g.kind {
        let r = refused(format!(
            "guest {} is {kind}, the operation was signed for {}",
            g.vmid, g.kind
        ));
        return Ok((Some(r), seen));
    }
    // A gated kind reads the config anyway (its decision needs it): read once, here.
    if g.expect_digest.is_some() || spec.is_gated() {
        let config = env
            .pve
            .guest_config(g.kind, g.vmid)
            .await
            .map_err(px("reading the guest's config"))?
            .raw()
            .clone();
        let have = config
            .get("digest")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        seen.config = Some(config);
        if let Some(want) = &g.expect_digest
            && &have != want
        {
            let r = refused(format!(
                "guest {}'s config digest is {have}, the operation expects {want}",
                g.vmid
            ));
            return Ok((Some(r), seen));
        }
    }
    let r = match spec {
        OpSpec::Reboot { .. } if status != "running" => Some(refused(format!(
            "guest {} is {status}; only a running guest can be rebooted",
            g.vmid
        ))),
        OpSpec::Snapshot { name, .. } => {
            let snaps = env
                .pve
                .snapshots(g.kind, g.vmid)
                .await
                .map_err(px("listing the guest's snapshots"))?;
            snaps.iter().any(|s| &s.name == name).then(|| {
                refused(format!(
                    "guest {} already has a snapshot named {name}",
                    g.vmid
                ))
            })
        }
        _ => None,
    };
    Ok((r, seen))
}

/// Where an operation stands, from its record: the UPIDs so far and when its intent was
/// committed (a resume searches the task list from that second).
#[derive(Debug, Clone)]
pub struct Progress {
    pub op_id: String,
    pub intent_ms: i64,
    pub upids: Vec<String>,
    /// True when resuming after a crash or a lost wait.
    pub resuming: bool,
    /// The gate's steps so far (the record's `gate`).
    pub gate: Value,
    /// Who asked: `local:<user>` for a local request, else `signed:<op_id>`.
    pub by: String,
    /// What the precheck read just before, in this lane (`None` when resuming).
    pub seen: Option<Seen>,
}

/// Runs (or resumes) `spec`. The intent is committed. `permit` is the guest's lane permit
/// (`None` for host operations).
pub async fn execute(
    env: &ExecEnv,
    spec: &OpSpec,
    permit: Option<&GuestPermit>,
    progress: &Progress,
) -> Result<Final, Unfinished> {
    let mut upids: Vec<Upid> = Vec::new();
    for u in &progress.upids {
        match u.parse::<Upid>() {
            Ok(u) => upids.push(u),
            Err(e) => {
                return Ok(Final::Failed(format!(
                    "the journal holds an unreadable task id {u:?}: {e}"
                )));
            }
        }
    }
    match (spec, permit) {
        (OpSpec::UsbMount { device, name }, _) => {
            Ok(match env.privileged.usb_mount(device, name).await {
                Ok(m) => Final::Applied(obj(json!({
                    "name": m.name.as_str(),
                    "mount_point": m.mount_point,
                    "uuid": m.uuid.as_str(),
                    "fstype": m.fstype.as_str(),
                    "already_mounted": m.already_mounted,
                    "fstab_changed": m.fstab_changed,
                }))),
                Err(e) => Final::Failed(format!("usb helper: {e}")),
            })
        }
        (OpSpec::UsbUnmount { name }, _) => Ok(match env.privileged.usb_unmount(name).await {
            Ok(u) => Final::Applied(obj(json!({
                "name": u.name.as_str(),
                "was_mounted": u.was_mounted,
                "fstab_changed": u.fstab_changed,
            }))),
            Err(e) => Final::Failed(format!("usb helper: {e}")),
        }),
        (_, None) => Ok(Final::Failed(
            "a guest operation ran outside its guest's lane".into(),
        )),
        (
            OpSpec::SetConfig { .. }
            | OpSpec::Rollback { .. }
            | OpSpec::Restore { .. }
            | OpSpec::DeleteSnapshot { .. }
            | OpSpec::Destroy { .. }
            | OpSpec::Undo { .. }
            | OpSpec::ReleaseUndo { .. },
            Some(p),
        ) => {
            #[cfg(feature = "bench-gate-off")]
            if let OpSpec::SetConfig { guest, config } = spec
                && super::bench_gate_off::gate_off()
            {
                return super::bench_gate_off::set_config(env, guest, config, p, &progress.op_id)
                    .await;
            }
            let Some(g) = spec.gated() else {
                return Ok(Final::Failed("a gated kind without its gate".into()));
            };
            let who = Who {
                op_id: &progress.op_id,
                by: progress.by.clone(),
            };
            gate::run(
                env,
                &g,
                p,
                who,
                &progress.gate,
                progress.resuming,
                progress.seen.as_ref(),
            )
            .await
        }
        (OpSpec::CreateContainer { guest, spec }, Some(_)) => {
            if progress.resuming && find_guest(env, guest.vmid).await?.is_some() {
                return Ok(Final::Applied(obj(
                    json!({"vmid": guest.vmid.get(), "resumed": true}),
                )));
            }
            match env.privileged.create_keyctl(spec).await {
                Ok(c) => Ok(Final::Applied(obj(json!({"vmid": c.vmid.get()})))),
                Err(e) => {
                    let why = format!("pct helper: {e}");
                    Ok(Final::Failed(
                        match destroy_half_made(env, guest, spec, permit).await? {
                            Some(done) => format!("{why}; {done}"),
                            None => why,
                        },
                    ))
                }
            }
        }
        (OpSpec::Start { guest }, Some(p)) => {
            let ty = task_type("start", guest.kind);
            if let Some(u) = recorded_or_adopted(env, progress, guest.vmid, ty, &upids).await? {
                return wait_final(env, &u, env.task_timeout, Map::new()).await;
            }
            if status(env, guest).await? == "running" {
                return Ok(Final::Applied(obj(json!({"changed": false}))));
            }
            match env.pve.start(p, guest.kind).await {
                Ok(u) => {
                    record_upid(env, &progress.op_id, &u).await?;
                    wait_final(env, &u, env.task_timeout, Map::new()).await
                }
                Err(e) => Ok(Final::Failed(e.to_string())),
            }
        }
        (
            OpSpec::Stop {
                guest,
                timeout_seconds,
            },
            Some(p),
        ) => {
            let timeout = timeout_seconds
                .map(|t| Duration::from_secs(u64::from(t)))
                .unwrap_or(env.shutdown_timeout);
            stop(env, guest, p, progress, &upids, timeout).await
        }
        (OpSpec::Reboot { guest }, Some(p)) => {
            let ty = task_type("reboot", guest.kind);
            if let Some(u) = recorded_or_adopted(env, progress, guest.vmid, ty, &upids).await? {
                return wait_final(env, &u, env.task_timeout, Map::new()).await;
            }
            match env.pve.reboot(p, guest.kind, None).await {
                Ok(u) => {
                    record_upid(env, &progress.op_id, &u).await?;
                    wait_final(env, &u, env.task_timeout, Map::new()).await
                }
                Err(e) => Ok(Final::Failed(e.to_string())),
            }
        }
        (
            OpSpec::Snapshot {
                guest,
                name,
                description,
            },
            Some(p),
        ) => {
            let done = obj(json!({"snapshot": name}));
            let ty = task_type("snapshot", guest.kind);
            if let Some(u) = recorded_or_adopted(env, progress, guest.vmid, ty, &upids).await? {
                return wait_final(env, &u, env.task_timeout, done).await;
            }
            if progress.resuming {
                let snaps = env
                    .pve
                    .snapshots(guest.kind, guest.vmid)
                    .await
                    .map_err(px("listing the guest's snapshots"))?;
                if snaps.iter().any(|s| &s.name == name) {
                    return Ok(Final::Applied(done));
                }
            }
            let snap = match SnapshotName::new(name.clone()) {
                Ok(s) => s,
                Err(e) => return Ok(Final::Failed(e.to_string())),
            };
            match env
                .pve
                .snapshot_create(p, guest.kind, &snap, description.as_deref())
                .await
            {
                Ok(u) => {
                    record_upid(env, &progress.op_id, &u).await?;
                    match wait_final(env, &u, env.task_timeout, done).await? {
                        Final::Failed(why) => {
                            let cleaned = delete_partial_snapshot(env, guest, p, &snap).await?;
                            Ok(Final::Failed(match cleaned {
                                Some(c) => format!("{why}; {c}"),
                                None => why,
                            }))
                        }
                        other => Ok(other),
                    }
                }
                Err(e) => Ok(Final::Failed(e.to_string())),
            }
        }
        (
            OpSpec::Backup {
                guest,
                storage,
                mode,
                compress,
                notes,
            },
            Some(p),
        ) => {
            let u = match recorded_or_adopted(env, progress, guest.vmid, "vzdump", &upids).await? {
                Some(u) => u,
                None => {
                    let opts = VzdumpOptions {
                        storage: Some(storage.clone()),
                        mode: Some(*mode),
                        compress: *compress,
                        notes_template: notes.clone(),
                        ..VzdumpOptions::default()
                    };
                    match env.pve.vzdump(p, &opts).await {
                        Ok(VzdumpOutcome::Task(u)) => {
                            record_upid(env, &progress.op_id, &u).await?;
                            u
                        }
                        Ok(VzdumpOutcome::NothingToDo) => {
                            return Ok(Final::Failed(format!(
                                "vzdump had nothing to do: guest {} is not on this node",
                                guest.vmid
                            )));
                        }
                        Err(e) => return Ok(Final::Failed(e.to_string())),
                    }
                }
            };
            match wait_final(env, &u, env.task_timeout, Map::new()).await? {
                Final::Applied(mut r) => {
                    match env.pve.vzdump_archive(&u, storage, guest.vmid).await {
                        Ok(item) => {
                            r.insert("volid".into(), Value::String(item.volid));
                        }
                        Err(e) if e.is_transient() => {
                            return Err(Unfinished::Proxmox {
                                what: "finding the backup's archive",
                                source: e,
                            });
                        }
                        Err(e) => {
                            tracing::warn!(vmid = %guest.vmid, upid = %u, error = %e, "backup finished but its archive could not be named");
                            r.insert("volid".into(), Value::Null);
                        }
                    }
                    Ok(Final::Applied(r))
                }
                other => Ok(other),
            }
        }
    }
}

/// A failed `create_container` may leave the container half made: destroyed through the
/// API (`purge`) when the vmid exists, is not running, and its config is the one this
/// operation described ([`looks_like_ours`]). A guest someone else put on that vmid
/// meanwhile (the precheck found it free) is left alone and the result says so.
/// `Some(what happened)` when there was a guest on the vmid.
async fn destroy_half_made(
    env: &ExecEnv,
    guest: &GuestRef,
    spec: &PctCreateSpec,
    permit: Option<&GuestPermit>,
) -> Result<Option<String>, Unfinished> {
    let (Some(p), Some((_, status))) = (permit, find_guest(env, guest.vmid).await?) else {
        return Ok(None);
    };
    let config = env
        .pve
        .guest_config(guest.kind, guest.vmid)
        .await
        .map_err(px("reading the half-made container's config"))?;
    if status == "running" || !looks_like_ours(config.raw(), spec) {
        tracing::warn!(vmid = %guest.vmid, %status, "create_container failed; the guest on its vmid is not the one it described: left alone");
        return Ok(Some(format!(
            "guest {} exists ({status}) but is not the container this operation described; left alone",
            guest.vmid
        )));
    }
    tracing::warn!(vmid = %guest.vmid, "create_container failed and left the container: destroying it");
    Ok(Some(
        match env.pve.destroy(p, guest.kind, true, true).await {
            Ok(u) => match Pve::wait(&env.pve, &u, env.task_timeout).await {
                Ok(_) => "the half-made container was destroyed".to_string(),
                Err(e) => format!("destroying the half-made container failed: {e}"),
            },
            Err(e) => format!("destroying the half-made container failed: {e}"),
        },
    ))
}

/// Whether a container's config is the one `spec` describes: its hostname, memory, swap
/// and cores as the spec set them. A config without them (a creation that stopped before
/// writing them) is not taken as ours: destroying a guest is only done on evidence.
fn looks_like_ours(config: &Map<String, Value>, spec: &PctCreateSpec) -> bool {
    let num = |k: &str| -> Option<u64> {
        match config.get(k)? {
            Value::Number(n) => n.as_u64(),
            Value::String(s) => s.parse().ok(),
            _ => None,
        }
    };
    config.get("hostname").and_then(Value::as_str) == Some(spec.hostname.as_str())
        && num("memory") == Some(u64::from(spec.memory_mib.get()))
        && num("swap") == Some(u64::from(spec.swap_mib.get()))
        && num("cores") == Some(u64::from(spec.cores.get()))
}

/// A failed snapshot may leave a partial snapshot in the config: deleted with `force`.
async fn delete_partial_snapshot(
    env: &ExecEnv,
    guest: &GuestRef,
    permit: &GuestPermit,
    name: &SnapshotName,
) -> Result<Option<String>, Unfinished> {
    let listed = env
        .pve
        .snapshots(guest.kind, guest.vmid)
        .await
        .map_err(px("listing the guest's snapshots"))?
        .iter()
        .any(|s| s.name == name.as_str());
    if !listed {
        return Ok(None);
    }
    tracing::warn!(vmid = %guest.vmid, snapshot = %name, "failed snapshot left a partial one: deleting it");
    Ok(Some(
        match env
            .pve
            .snapshot_delete(permit, guest.kind, name, true)
            .await
        {
            Ok(u) => match Pve::wait(&env.pve, &u, env.task_timeout).await {
                Ok(_) => format!("the partial snapshot {name} was deleted"),
                Err(e) => format!("deleting the partial snapshot {name} failed: {e}"),
            },
            Err(e) => format!("deleting the partial snapshot {name} failed: {e}"),
        },
    ))
}

fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

pub fn task_type(what: &str, kind: GuestKind) -> &'static str {
    match (what, kind) {
        ("start", GuestKind::Lxc) => "vzstart",
        ("start", GuestKind::Qemu) => "qmstart",
        ("shutdown", GuestKind::Lxc) => "vzshutdown",
        ("shutdown", GuestKind::Qemu) => "qmshutdown",
        ("stop", GuestKind::Lxc) => "vzstop",
        ("stop", GuestKind::Qemu) => "qmstop",
        ("reboot", GuestKind::Lxc) => "vzreboot",
        ("reboot", GuestKind::Qemu) => "qmreboot",
        ("snapshot", GuestKind::Lxc) => "vzsnapshot",
        ("snapshot", GuestKind::Qemu) => "qmsnapshot",
        _ => "vzdump",
    }
}

async fn record_upid(env: &ExecEnv, op_id: &str, upid: &Upid) -> Result<(), Unfinished> {
    let (id, u) = (op_id.to_string(), upid.as_str().to_string());
    blocking(&env.journal, move |j| {
        j.op_update(&id, |r| r.upids.push(u), None).map(|_| ())
    })
    .await
}

/// The last recorded UPID of `ty`, or, when resuming without one, our task of `ty` for the
/// guest that the request may have started before a crash kept its UPID from the journal.
async fn recorded_or_adopted(
    env: &ExecEnv,
    progress: &Progress,
    vmid: Vmid,
    ty: &str,
    upids: &[Upid],
) -> Result<Option<Upid>, Unfinished> {
    if let Some(u) = upids.iter().rev().find(|u| u.task_type() == ty) {
        return Ok(Some(u.clone()));
    }
    if !progress.resuming {
        return Ok(None);
    }
    let v = vmid.get();
    let known = blocking(&env.journal, move |j| {
        let mut k = j.upids_of(vmid)?;
        k.extend(j.op_upids_of(v)?);
        Ok(k)
    })
    .await?;
    let since = progress.intent_ms.div_euclid(1000);
    let found = env
        .pve
        .find_task(vmid, ty, since, &known)
        .await
        .map_err(px("searching the task list"))?;
    if let Some(u) = &found {
        tracing::info!(op_id = %progress.op_id, upid = %u, "adopting the task an interrupted operation started");
        record_upid(env, &progress.op_id, u).await?;
    }
    Ok(found)
}

/// Waits for a task: its end is the operation's; losing sight of it leaves it running.
async fn wait_final(
    env: &ExecEnv,
    upid: &Upid,
    timeout: Duration,
    done: Map<String, Value>,
) -> Result<Final, Unfinished> {
    match Pve::wait(&env.pve, upid, timeout).await {
        Ok(d) => {
            let mut done = done;
            if let Some(w) = d.warnings {
                done.insert("warnings".into(), json!(w));
            }
            Ok(Final::Applied(done))
        }
        Err(e @ ProxmoxError::TaskFailed { .. }) => Ok(Final::Failed(e.to_string())),
        Err(source) => Err(Unfinished::Proxmox {
            what: "waiting for the task",
            source,
        }),
    }
}

/// Graceful shutdown (unless one is recorded or found), then a hard stop only if the guest
/// is still running: reconcile's stop, for one signed operation.
async fn stop(
    env: &ExecEnv,
    g: &GuestRef,
    permit: &GuestPermit,
    progress: &Progress,
    upids: &[Upid],
    timeout: Duration,
) -> Result<Final, Unfinished> {
    let hard = task_type("stop", g.kind);
    let soft = task_type("shutdown", g.kind);
    if let Some(u) = recorded_or_adopted(env, progress, g.vmid, hard, upids).await? {
        return wait_final(env, &u, env.task_timeout, Map::new()).await;
    }
    let shutdown = match recorded_or_adopted(env, progress, g.vmid, soft, upids).await? {
        Some(u) => Some(u),
        None => {
            if status(env, g).await? != "running" {
                return Ok(Final::Applied(obj(json!({"changed": false}))));
            }
            match Pve::shutdown(&env.pve, permit, g.kind, timeout).await {
                Ok(u) => {
                    record_upid(env, &progress.op_id, &u).await?;
                    Some(u)
                }
                Err(e) => {
                    tracing::warn!(vmid = %g.vmid, error = %e, "shutdown refused");
                    None
                }
            }
        }
    };
    if let Some(u) = &shutdown
        && let Final::Failed(error) =
            wait_final(env, u, timeout + Duration::from_secs(30), Map::new()).await?
    {
        tracing::warn!(vmid = %g.vmid, %error, "graceful shutdown did not succeed");
    }
    if status(env, g).await? != "running" {
        return Ok(Final::Applied(obj(json!({"changed": true}))));
    }
    tracing::info!(vmid = %g.vmid, "still running after graceful shutdown: hard stop");
    match env.pve.stop(permit, g.kind).await {
        Ok(u) => {
            record_upid(env, &progress.op_id, &u).await?;
            wait_final(
                env,
                &u,
                env.task_timeout,
                obj(json!({"changed": true, "hard_stop": true})),
            )
            .await
        }
        Err(e) => Ok(Final::Failed(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use felhom_authz::{
        AgentId, BackupVolid, Grant, Kind, OpId, SetConfigParams, SnapshotName, Target,
    };
    use felhom_protocol::StorageId;

    use super::*;
    use crate::config::{PrivhelperConfig, ProxmoxConfig, Secret, TlsVerify};

    const OTHER: &str = "ffeeddccbbaa99887766554433221100";

    fn payload(kind: Kind, op: GuestOp) -> OpPayload {
        OpPayload {
            op_id: OpId::new("0".repeat(32)).unwrap(),
            agent_id: AgentId::new("1".repeat(32)).unwrap(),
            node: "pve1".into(),
            not_before: 0,
            not_after: 10,
            kind,
            action: Action::Guest {
                target: Target {
                    guest_type: GuestType::Lxc,
                    vmid: Vmid::new(101).unwrap(),
                },
                expect: None,
                op,
            },
            grant: Grant::Irreversible,
            reason: String::new(),
            signers: vec!["alice".into()],
            payload_sha256: [0; 32],
        }
    }

    fn snap(s: &str) -> SnapshotName {
        SnapshotName::try_from(s.to_string()).unwrap()
    }

    /// Every gated kind, its spec as the record keeps it, and whether it conflicts with
    /// the desired state.
    fn gated() -> Vec<(OpPayload, Value, bool)> {
        let config: SetConfigParams =
            serde_json::from_value(json!({"config": {"memory": 1024, "protection": null}}))
                .unwrap();
        let vz = "nas:backup/vzdump-lxc-101-2025_01_31-02_00_05.tar.zst";
        let guest = json!({"kind": "lxc", "vmid": 101, "expect_digest": null});
        vec![
            (
                payload(Kind::SetConfig, GuestOp::SetConfig(config)),
                json!({"op": "set_config", "guest": guest,
                       "config": {"memory": 1024, "protection": null}}),
                true,
            ),
            (
                payload(
                    Kind::Rollback,
                    GuestOp::Rollback {
                        snapshot: snap("daily"),
                        start: true,
                    },
                ),
                json!({"op": "rollback", "guest": guest, "snapshot": "daily", "start": true,
                       "irreversible": true}),
                true,
            ),
            (
                payload(
                    Kind::Restore,
                    GuestOp::Restore {
                        archive: BackupVolid::new(vz).unwrap(),
                        storage: StorageId::new("local-lvm").unwrap(),
                        force: true,
                        start: false,
                    },
                ),
                json!({"op": "restore", "guest": guest, "archive": vz,
                       "storage": "local-lvm", "force": true, "start": false,
                       "irreversible": true}),
                true,
            ),
            (
                payload(
                    Kind::DeleteSnapshot,
                    GuestOp::DeleteSnapshot { name: snap("old") },
                ),
                json!({"op": "delete_snapshot", "guest": guest, "name": "old"}),
                false,
            ),
            (
                payload(Kind::Destroy, GuestOp::Destroy { purge: true }),
                json!({"op": "destroy", "guest": guest, "purge": true}),
                true,
            ),
            (
                payload(
                    Kind::Undo,
                    GuestOp::Undo {
                        op_id: OpId::new(OTHER).unwrap(),
                    },
                ),
                json!({"op": "undo", "guest": guest, "op_id": OTHER}),
                true,
            ),
            (
                payload(
                    Kind::ReleaseUndo,
                    GuestOp::ReleaseUndo {
                        op_id: OpId::new(OTHER).unwrap(),
                    },
                ),
                json!({"op": "release_undo", "guest": guest, "op_id": OTHER}),
                false,
            ),
        ]
    }

    #[test]
    fn gated_kinds_map_to_plain_specs_that_read_back() {
        for (p, want, conflicts) in gated() {
            let spec = OpSpec::from_payload(&p);
            assert_eq!(serde_json::to_value(&spec).unwrap(), want, "{:?}", p.kind);
            let back: OpSpec = serde_json::from_value(want).unwrap();
            assert_eq!(back, spec);
            assert_eq!(spec.kind_name(), p.kind.as_str());
            assert!(spec.is_gated());
            assert_eq!(spec.conflicts_with_desired(), conflicts, "{:?}", p.kind);
            assert_eq!(spec.guest().map(|g| g.vmid.get()), Some(101));
        }
    }

    /// Proxmox at a closed loopback port: any request fails, so an answer without an
    /// error shows nothing was asked.
    fn env(dir: &std::path::Path) -> ExecEnv {
        let pve = Client::new(
            &ProxmoxConfig {
                url: "https://127.0.0.1:1".into(),
                token_id: "felhom@pve!agent".into(),
                token_secret: Secret::new("unused"),
                tls: TlsVerify::Insecure,
            },
            "pve1",
        )
        .unwrap();
        ExecEnv {
            pve,
            privileged: privileged::Client::new(&PrivhelperConfig {
                socket_dir: dir.join("no-helpers"),
                audit_log: dir.join("audit.log"),
                timeout: Duration::from_secs(5),
            }),
            journal: Arc::new(Journal::open(dir).unwrap()),
            shutdown_timeout: Duration::from_secs(5),
            task_timeout: Duration::from_secs(5),
            backup_storage: Some("nas-backup".into()),
            health_timeout: Duration::from_secs(5),
        }
    }

    #[tokio::test]
    async fn undo_and_release_pass_the_lane_check_without_a_request() {
        // They may act on a guest that is gone (a destroy's undo): the gate checks them.
        let dir = tempfile::tempdir().unwrap();
        let env = env(dir.path());
        for (p, _, _) in gated() {
            let spec = OpSpec::from_payload(&p);
            let r = precheck(&env, &spec).await;
            match p.kind {
                Kind::Undo | Kind::ReleaseUndo => assert_eq!(r.unwrap(), None),
                // the others read the node, which is unreachable here
                _ => assert!(r.is_err(), "{:?}", p.kind),
            }
        }
    }

    #[test]
    fn the_grant_reaches_the_gate() {
        let mut p = payload(
            Kind::Rollback,
            GuestOp::Rollback {
                snapshot: snap("daily"),
                start: false,
            },
        );
        p.grant = Grant::Reversible;
        assert!(!OpSpec::from_payload(&p).gated().unwrap().irreversible);
        p.grant = Grant::Irreversible;
        assert!(OpSpec::from_payload(&p).gated().unwrap().irreversible);
        // irreversible kinds always run as such
        let d = payload(Kind::Destroy, GuestOp::Destroy { purge: false });
        assert!(OpSpec::from_payload(&d).gated().unwrap().irreversible);
        assert!(
            OpSpec::from_payload(&payload(Kind::Start, GuestOp::Start))
                .gated()
                .is_none()
        );
    }

    #[test]
    fn only_the_container_the_spec_described_is_taken_for_a_half_made_one() {
        let spec: PctCreateSpec = serde_json::from_value(json!({
            "vmid": 120, "ostemplate": "local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst",
            "hostname": "web1", "memory_mib": 1024, "swap_mib": 512, "cores": 2,
            "rootfs": {"storage": "local-lvm", "size_gib": 8},
            "net": {"bridge": "vmbr0", "ip": "dhcp", "gw": null},
            "nesting": false, "ssh_public_keys": [], "start": false, "onboot": false
        }))
        .expect("spec");
        let ours = obj(json!({"hostname": "web1", "memory": 1024, "swap": "512", "cores": 2}));
        assert!(looks_like_ours(&ours, &spec));
        for (k, v) in [
            ("hostname", json!("db1")),
            ("memory", json!(2048)),
            ("swap", json!(0)),
            ("cores", json!("4")),
        ] {
            let mut other = ours.clone();
            other.insert(k.into(), v);
            assert!(!looks_like_ours(&other, &spec), "{k}");
            other.remove(k);
            assert!(!looks_like_ours(&other, &spec), "{k} absent");
        }
    }
}
