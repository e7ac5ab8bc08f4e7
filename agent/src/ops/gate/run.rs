//! The gated kinds: decide, make the undo point, act, check, undo on failure; and the
//! explicit `undo` and `release_undo`.
//!
//! Owns the order of steps per kind (see `docs/signed-ops.md`, "The reversibility gate")
//! and the result's `undo` object. Every request goes through [`Machine::task`], so a
//! resume never repeats a finished one.
//!
//! ## set_config: three commits
//! A `set_config` is the gate's most frequent kind and its undo point costs no request (the
//! previous values), so its steps are laid out to commit only where a crash needs a
//! record, and to reuse what the lane's precheck read just before (the guest's listing:
//! kind and power state; its config and digest). The precheck runs under the same lane
//! permit, so nothing in this agent changes the guest in between; a foreign edit
//! meanwhile moves the digest, and the write carries the digest read, so Proxmox refuses it.
//! 1. The intent (`running`, issue 12's commit, in the ops service).
//! 2. One commit (`op_update_with_undo`): the decision, the undo point (previous values of
//!    exactly the keys touched, the digest before, the power state before) with its
//!    `undo_points` row, and the action's slot (its start): the intent of the write.
//! 3. The write (`PUT …/config` with the digest before). An LXC write is synchronous; a
//!    QEMU one may answer with a task, whose UPID is committed the moment Proxmox answers
//!    and waited on. Then the config is read for the digest after, and the power state for
//!    the health check (it is still read after the change). Neither is committed yet.
//! 4. The end, in one commit with the steps so far (action outcome, digest after, health
//!    verdict): [`Final::Stepped`]. On a failed health check, the undo's first slot commit
//!    records them instead, before the previous values are written back.
//!
//! Resume (a kill -9 anywhere; the record says `running`):
//! - no undo point/slot in the record: nothing was sent; the steps start again (the
//!   decision is made again from fresh reads, since a resume has no precheck).
//! - the action's slot with an outcome: not sent again.
//! - the slot with a UPID (QEMU): waited on. Without one, a QEMU config task of ours since
//!   the slot began is adopted; otherwise (and for LXC) the config is read:
//!   - digest still the one before: the write did not happen; it is sent again, with the
//!     same digest guard, so it cannot apply twice;
//!   - digest moved and the touched keys hold the signed values: it happened; the digest
//!     now is the digest after;
//!   - otherwise someone else edited the config: `failed`, undo `not_possible`, nothing
//!     written over the edit.
//!
//!   A write Proxmox refused changed nothing, so a resume finds the digest unmoved and
//!   sends it again; refused again, it ends `failed` with nothing changed.
//! - the health check is read again (a read); the undo, if it fails, runs through its own
//!   slots, committed before the write back and guarded by the digest after, so the
//!   previous values are written back at most once with effect.
//!
//! Must never: act before the undo point is confirmed (a snapshot listed, a backup's archive
//! listed), remove an undo point outside `release_undo`, or overwrite a config that changed
//! since the gate's own write (the digest moved: the undo is `not_possible`).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::capability::{self, Plan};
use super::steps::Slot;
use super::steps::{BoxFut, Decided, Machine, Made, Outcome, Sent, Verdict, await_power};
use crate::ops::exec::{ExecEnv, Final, GuestRef, Seen, Unfinished, task_type};
use crate::proxmox::{
    ConfigChange, ConfigValue, GuestKind, GuestPermit, ProxmoxError, QemuRestoreOptions,
    RestoreOptions, SetConfigOutcome, SnapshotName, VzdumpCompress, VzdumpMode, VzdumpOptions,
    VzdumpOutcome,
};
use crate::reconcile::journal::{OpRecord, UndoPoint, UndoPointError, now_ms};

/// What a gated operation asks for (kept in the record's spec).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "gate", rename_all = "snake_case")]
pub enum GateOp {
    /// Config keys to set (`null`: delete).
    SetConfig {
        config: Map<String, Value>,
    },
    Rollback {
        snapshot: String,
        start: bool,
    },
    Restore {
        archive: String,
        storage: String,
        force: bool,
        start: bool,
    },
    DeleteSnapshot {
        name: String,
    },
    Destroy {
        purge: bool,
    },
    Undo {
        op_id: String,
    },
    ReleaseUndo {
        op_id: String,
    },
}

impl GateOp {
    pub fn kind(&self) -> &'static str {
        match self {
            GateOp::SetConfig { .. } => "set_config",
            GateOp::Rollback { .. } => "rollback",
            GateOp::Restore { .. } => "restore",
            GateOp::DeleteSnapshot { .. } => "delete_snapshot",
            GateOp::Destroy { .. } => "destroy",
            GateOp::Undo { .. } => "undo",
            GateOp::ReleaseUndo { .. } => "release_undo",
        }
    }
}

/// One gated operation: its guest, what it asks, and whether it was granted
/// `irreversible` (with that threshold of signatures: felhom-authz checked it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gated {
    pub guest: GuestRef,
    pub op: GateOp,
    #[serde(default)]
    pub irreversible: bool,
}

/// Who runs the operation, for a release's record (`signed:<op_id>` / `local:<user>`).
#[derive(Debug)]
pub struct Who<'a> {
    pub op_id: &'a str,
    pub by: String,
}

fn px(what: &'static str) -> impl FnOnce(ProxmoxError) -> Unfinished {
    move |source| Unfinished::Proxmox { what, source }
}

fn refused(reason: &'static str, message: String) -> Final {
    Final::Refused { reason, message }
}

fn undo_json(made: Option<&Made>, status: &str) -> Value {
    match made.filter(|m| m.kind != "none") {
        Some(m) => json!({"kind": m.kind, "ref": m.reference, "status": status}),
        None => json!({"kind": null, "ref": null, "status": "not_possible"}),
    }
}

fn health_timeout(env: &ExecEnv) -> Duration {
    env.health_timeout
}

fn type_of(kind: GuestKind, what: &str) -> &'static str {
    match (kind, what) {
        (GuestKind::Lxc, "rollback") => "vzrollback",
        (GuestKind::Qemu, "rollback") => "qmrollback",
        (GuestKind::Lxc, "delsnapshot") => "vzdelsnapshot",
        (GuestKind::Qemu, "delsnapshot") => "qmdelsnapshot",
        (GuestKind::Lxc, "restore") => "vzrestore",
        (GuestKind::Qemu, "restore") => "qmrestore",
        (GuestKind::Lxc, "destroy") => "vzdestroy",
        (GuestKind::Qemu, "destroy") => "qmdestroy",
        (GuestKind::Lxc, "config") => "vzconfig",
        (GuestKind::Qemu, "config") => "qmconfig",
        (k, w) => task_type(w, k),
    }
}

/// A config value as PVE's form would carry it, for comparisons.
fn form_text(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(if *b { "1" } else { "0" }.into()),
        other => Some(other.to_string()),
    }
}

fn config_value(v: &Value) -> ConfigValue {
    match v {
        Value::Bool(b) => ConfigValue::Bool(*b),
        Value::Number(n) if n.is_i64() => ConfigValue::Int(n.as_i64().unwrap_or_default()),
        Value::String(s) => ConfigValue::Str(s.clone()),
        other => ConfigValue::Str(other.to_string()),
    }
}

/// A config change that sets `values` (`null`: delete), with `digest`.
fn change_of(values: &Map<String, Value>, digest: Option<&str>) -> ConfigChange {
    let mut c = ConfigChange::new();
    for (k, v) in values {
        c = if v.is_null() {
            c.delete(k.clone())
        } else {
            c.set(k.clone(), config_value(v))
        };
    }
    if let Some(d) = digest {
        c = c.digest(d);
    }
    c
}

fn config_has(config: &Map<String, Value>, values: &Map<String, Value>) -> bool {
    values
        .iter()
        .all(|(k, v)| config.get(k).and_then(form_text) == form_text(v))
}

async fn read_config(env: &ExecEnv, g: &GuestRef) -> Result<Map<String, Value>, Unfinished> {
    Ok(env
        .pve
        .guest_config(g.kind, g.vmid)
        .await
        .map_err(px("reading the guest's config"))?
        .raw()
        .clone())
}

async fn exists(env: &ExecEnv, g: &GuestRef) -> Result<Option<(GuestKind, String)>, Unfinished> {
    Ok(env
        .pve
        .guests(g.kind)
        .await
        .map_err(px("listing the node's guests"))?
        .into_iter()
        .find(|x| x.vmid == g.vmid)
        .map(|x| (g.kind, x.status.as_str().to_string())))
}

async fn snapshot_listed(env: &ExecEnv, g: &GuestRef, name: &str) -> Result<bool, Unfinished> {
    Ok(env
        .pve
        .snapshots(g.kind, g.vmid)
        .await
        .map_err(px("listing the guest's snapshots"))?
        .iter()
        .any(|s| s.name == name))
}

/// Step 1: what the gate will do, or a refusal (nothing sent).
async fn decide(
    env: &ExecEnv,
    g: &Gated,
    op_id: &str,
    seen: Option<&Seen>,
) -> Result<Result<Decided, Final>, Unfinished> {
    let guest = &g.guest;
    let at_ms = now_ms();
    let mut d = Decided {
        plan: Plan::None {
            why: "nothing to undo".into(),
        },
        previous_values: false,
        power: None,
        previous: Map::new(),
        digest: None,
        existed: true,
        restore_storage: None,
        at_ms,
    };
    // What the precheck just read in this lane is reused, not read again.
    let found = match seen.and_then(|s| s.listing.clone()) {
        Some(l) => l.map(|(_, status)| (guest.kind, status)),
        None => exists(env, guest).await?,
    };
    if let GateOp::Restore { force, .. } = &g.op {
        match &found {
            None => {
                d.existed = false;
                d.plan = Plan::None {
                    why: "the guest is new: destroying it undoes the restore".into(),
                };
                return Ok(Ok(d));
            }
            Some(_) if !force => {
                return Ok(Err(refused(
                    "precondition_failed",
                    format!("guest {} exists; a restore over it needs force", guest.vmid),
                )));
            }
            Some(_) => {}
        }
    }
    let Some((_, status)) = found else {
        return Ok(Err(refused(
            "precondition_failed",
            format!("guest {} does not exist on this node", guest.vmid),
        )));
    };
    d.power = Some(
        if status == "running" {
            "running"
        } else {
            "stopped"
        }
        .to_string(),
    );
    let config = match seen.and_then(|s| s.config.clone()) {
        Some(c) => c,
        None => read_config(env, guest).await?,
    };
    d.digest = config
        .get("digest")
        .and_then(Value::as_str)
        .map(str::to_string);
    if guest.kind == GuestKind::Lxc {
        d.restore_storage = capability::volumes(guest.kind, &config)
            .ok()
            .and_then(|v| v.into_iter().find(|v| v.key == "rootfs"))
            .and_then(|v| v.storage);
    }
    let backup_storage = env.backup_storage.as_deref();
    let protected = capability::protected(&config);
    let not_reversible = |why: String| {
        refused(
            "not_reversible",
            format!(
                "no undo point can be made ({why}); it runs only when granted irreversible with that threshold of signatures"
            ),
        )
    };
    match &g.op {
        GateOp::SetConfig { config: set } => {
            // A resume decides without the precheck: the signed digest still holds.
            if let Some(want) = &guest.expect_digest
                && d.digest.as_deref() != Some(want.as_str())
            {
                return Ok(Err(refused(
                    "precondition_failed",
                    format!(
                        "guest {}'s config digest is {}, the operation expects {want}",
                        guest.vmid,
                        d.digest.as_deref().unwrap_or("none")
                    ),
                )));
            }
            d.previous_values = true;
            d.plan = Plan::None {
                why: "previous values".into(),
            };
            d.previous = set
                .keys()
                .map(|k| (k.clone(), config.get(k).cloned().unwrap_or(Value::Null)))
                .collect();
        }
        GateOp::Rollback { snapshot, .. } => {
            let storages = env
                .pve
                .storages()
                .await
                .map_err(px("listing the node's storages"))?;
            let snaps = env
                .pve
                .snapshots(guest.kind, guest.vmid)
                .await
                .map_err(px("listing the guest's snapshots"))?;
            match capability::for_rollback(
                guest.kind,
                &config,
                &storages,
                &snaps,
                snapshot,
                op_id,
                backup_storage,
            ) {
                Ok(Plan::None { why }) if !g.irreversible => return Ok(Err(not_reversible(why))),
                Ok(p) => d.plan = p,
                Err(e) => return Ok(Err(refused("precondition_failed", e.to_string()))),
            }
        }
        GateOp::Restore { .. } | GateOp::Destroy { .. } => {
            if protected {
                return Ok(Err(refused(
                    "protected",
                    format!(
                        "guest {} has protection: 1; it is never destroyed or restored over",
                        guest.vmid
                    ),
                )));
            }
            if matches!(g.op, GateOp::Restore { .. }) && status == "running" {
                return Ok(Err(refused(
                    "precondition_failed",
                    format!(
                        "guest {} is running; a restore over it needs it stopped",
                        guest.vmid
                    ),
                )));
            }
            match capability::for_backup(guest.kind, &config, backup_storage) {
                Ok(Plan::None { why })
                    if matches!(g.op, GateOp::Restore { .. }) && !g.irreversible =>
                {
                    return Ok(Err(not_reversible(why)));
                }
                Ok(p) => d.plan = p,
                Err(e) => return Ok(Err(refused("precondition_failed", e.to_string()))),
            }
        }
        GateOp::DeleteSnapshot { name } => {
            if !snapshot_listed(env, guest, name).await? || name == "current" {
                return Ok(Err(refused(
                    "precondition_failed",
                    format!("guest {} has no snapshot named {name}", guest.vmid),
                )));
            }
        }
        GateOp::Undo { .. } | GateOp::ReleaseUndo { .. } => {}
    }
    Ok(Ok(d))
}

/// Step 2: the undo point, made and confirmed, recorded with its row. `Err` refuses
/// `undo_point_failed` (nothing changed).
async fn make_undo_point<'a>(
    m: &mut Machine<'a>,
    g: &'a Gated,
    permit: &'a GuestPermit,
    d: &Decided,
) -> Result<Result<(), Final>, Unfinished> {
    let env = m.env;
    let guest = &g.guest;
    let op_id = m.op_id.clone();
    let base =
        |kind: &str, reference: Option<String>, storage: Option<String>, size: Option<u64>| {
            UndoPoint {
                op_id: op_id.clone(),
                op_kind: g.op.kind().to_string(),
                vmid: guest.vmid.get(),
                guest_kind: guest.kind.as_str().to_string(),
                kind: kind.to_string(),
                reference,
                storage,
                size_bytes: size,
                detail: json!({"power": d.power, "previous": d.previous, "digest": d.digest,
                "restore_storage": d.restore_storage}),
                created_ms: d.at_ms,
                status: "kept".into(),
                released_ms: None,
                released_by: None,
            }
        };
    match d.plan.clone() {
        Plan::None { .. } => {
            m.commit(|s| {
                s.undo_point = Some(Made {
                    kind: "none".into(),
                    reference: None,
                    storage: None,
                })
            })
            .await?;
            Ok(Ok(()))
        }
        Plan::Snapshot { name } => {
            let snap =
                SnapshotName::new(name.clone()).map_err(|e| Unfinished::Blocking(e.to_string()))?;
            let n1 = name.clone();
            let s2 = snap.clone();
            let o = m
                .task(
                    "undo_point",
                    task_type("snapshot", guest.kind),
                    move || -> BoxFut<'a, _> {
                        Box::pin(async move { snapshot_listed(env, guest, &n1).await })
                    },
                    move || -> BoxFut<'a, _> {
                        Box::pin(async move {
                            env.pve
                                .snapshot_create(permit, guest.kind, &s2, Some("felhom undo point"))
                                .await
                                .map(Sent::Task)
                        })
                    },
                )
                .await?;
            let listed = o.is_ok() && snapshot_listed(env, guest, &name).await?;
            if !listed {
                // Delete what a failed snapshot may have left.
                let n2 = name.clone();
                let s3 = snap.clone();
                m.task(
                    "undo_point_cleanup",
                    type_of(guest.kind, "delsnapshot"),
                    move || -> BoxFut<'a, _> {
                        Box::pin(async move { Ok(!snapshot_listed(env, guest, &n2).await?) })
                    },
                    move || -> BoxFut<'a, _> {
                        Box::pin(async move {
                            env.pve
                                .snapshot_delete(permit, guest.kind, &s3, true)
                                .await
                                .map(Sent::Task)
                        })
                    },
                )
                .await?;
                let why = match o {
                    Outcome::Failed { error } => error,
                    Outcome::Ok => format!("snapshot {name} is not listed after its task"),
                };
                return Ok(Err(refused(
                    "undo_point_failed",
                    format!("the undo snapshot could not be made ({why}); nothing was changed"),
                )));
            }
            let p = base("snapshot", Some(name.clone()), None, None);
            let made = Made {
                kind: "snapshot".into(),
                reference: Some(name),
                storage: None,
            };
            m.commit_with_undo(|s| s.undo_point = Some(made), p).await?;
            Ok(Ok(()))
        }
        Plan::Backup { storage } => {
            let protect = matches!(g.op, GateOp::Destroy { .. });
            let st1 = storage.clone();
            let st2 = storage.clone();
            let since = m
                .started_ms("undo_point")
                .unwrap_or_else(now_ms)
                .div_euclid(1000);
            let o = m
                .task(
                    "undo_point",
                    "vzdump",
                    move || -> BoxFut<'a, _> {
                        Box::pin(async move {
                            Ok(env
                                .pve
                                .backups(&st1, Some(guest.vmid))
                                .await
                                .map_err(px("listing backups"))?
                                .iter()
                                .any(|b| b.ctime.is_some_and(|c| c >= since)))
                        })
                    },
                    move || -> BoxFut<'a, _> {
                        Box::pin(async move {
                            let opts = VzdumpOptions {
                                storage: Some(st2),
                                mode: Some(VzdumpMode::Snapshot),
                                compress: Some(VzdumpCompress::Zstd),
                                remove: Some(false),
                                notes_template: Some("felhom undo point".into()),
                                protected: protect.then_some(true),
                            };
                            match env.pve.vzdump(permit, &opts).await? {
                                VzdumpOutcome::Task(u) => Ok(Sent::Task(u)),
                                VzdumpOutcome::NothingToDo => Err(ProxmoxError::InvalidRequest(
                                    "vzdump had nothing to do".into(),
                                )),
                            }
                        })
                    },
                )
                .await?;
            if let Outcome::Failed { error } = o {
                return Ok(Err(refused(
                    "undo_point_failed",
                    format!("the undo backup failed ({error}); nothing was changed"),
                )));
            }
            let item = match m.upid("undo_point") {
                Some(u) => match env.pve.vzdump_archive(&u, &storage, guest.vmid).await {
                    Ok(i) => Some(i),
                    Err(e) if e.is_transient() => {
                        return Err(px("finding the backup's archive")(e));
                    }
                    Err(_) => None,
                },
                None => {
                    let since = m
                        .started_ms("undo_point")
                        .unwrap_or_default()
                        .div_euclid(1000);
                    env.pve
                        .backups(&storage, Some(guest.vmid))
                        .await
                        .map_err(px("listing backups"))?
                        .into_iter()
                        .filter(|b| b.ctime.is_some_and(|c| c >= since))
                        .max_by_key(|b| b.ctime)
                }
            };
            let Some(item) = item else {
                return Ok(Err(refused(
                    "undo_point_failed",
                    format!(
                        "the undo backup's archive is not listed on {storage}; nothing was changed"
                    ),
                )));
            };
            if protect
                && !item.protected
                && let Err(e) = env
                    .pve
                    .backup_protect(permit, &storage, &item.volid, true)
                    .await
            {
                if e.is_transient() {
                    return Err(px("protecting the undo backup")(e));
                }
                return Ok(Err(refused(
                    "undo_point_failed",
                    format!(
                        "the undo backup {} could not be protected ({e}); nothing was changed",
                        item.volid
                    ),
                )));
            }
            let p = base(
                "backup",
                Some(item.volid.clone()),
                Some(storage.clone()),
                item.size,
            );
            let made = Made {
                kind: "backup".into(),
                reference: Some(item.volid),
                storage: Some(storage),
            };
            m.commit_with_undo(|s| s.undo_point = Some(made), p).await?;
            Ok(Ok(()))
        }
    }
}

/// Step 3: the mutation itself.
async fn act<'a>(
    m: &mut Machine<'a>,
    g: &'a Gated,
    permit: &'a GuestPermit,
    d: &Decided,
) -> Result<Outcome, Unfinished> {
    let env = m.env;
    let guest = &g.guest;
    match &g.op {
        GateOp::Rollback { snapshot, start } => {
            let snap = SnapshotName::new(snapshot.clone())
                .map_err(|e| Unfinished::Blocking(e.to_string()))?;
            let start = *start;
            m.task(
                "action",
                type_of(guest.kind, "rollback"),
                || -> BoxFut<'a, _> { Box::pin(async { Ok(false) }) },
                move || -> BoxFut<'a, _> {
                    Box::pin(async move {
                        env.pve
                            .snapshot_rollback(permit, guest.kind, &snap, start)
                            .await
                            .map(Sent::Task)
                    })
                },
            )
            .await
        }
        GateOp::Restore {
            archive,
            storage,
            force,
            start,
        } => {
            let existed = d.existed;
            restore_slot(
                m,
                "action",
                guest,
                permit,
                archive,
                Some(storage.clone()),
                *force,
                *start,
                existed,
            )
            .await
        }
        GateOp::Destroy { purge } => {
            let purge = *purge;
            m.task(
                "action",
                type_of(guest.kind, "destroy"),
                move || -> BoxFut<'a, _> {
                    Box::pin(async move { Ok(exists(env, guest).await?.is_none()) })
                },
                move || -> BoxFut<'a, _> {
                    Box::pin(async move {
                        env.pve
                            .destroy(permit, guest.kind, purge, false)
                            .await
                            .map(Sent::Task)
                    })
                },
            )
            .await
        }
        GateOp::DeleteSnapshot { name } => {
            let snap =
                SnapshotName::new(name.clone()).map_err(|e| Unfinished::Blocking(e.to_string()))?;
            m.task(
                "action",
                type_of(guest.kind, "delsnapshot"),
                move || -> BoxFut<'a, _> {
                    Box::pin(async move { Ok(!snapshot_listed(env, guest, name).await?) })
                },
                move || -> BoxFut<'a, _> {
                    Box::pin(async move {
                        env.pve
                            .snapshot_delete(permit, guest.kind, &snap, false)
                            .await
                            .map(Sent::Task)
                    })
                },
            )
            .await
        }
        // set_config runs its own steps; undo and release are not mutations of their own.
        GateOp::SetConfig { .. } | GateOp::Undo { .. } | GateOp::ReleaseUndo { .. } => {
            Ok(Outcome::Failed {
                error: "not run through the generic steps".into(),
            })
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn restore_slot<'a>(
    m: &mut Machine<'a>,
    slot: &str,
    guest: &'a GuestRef,
    permit: &'a GuestPermit,
    archive: &str,
    storage: Option<String>,
    force: bool,
    start: bool,
    existed: bool,
) -> Result<Outcome, Unfinished> {
    let env = m.env;
    let archive = archive.to_string();
    m.task(
        slot,
        type_of(guest.kind, "restore"),
        move || -> BoxFut<'a, _> {
            Box::pin(async move {
                // A restore to a free vmid is there once the guest is listed, unlocked.
                if existed {
                    return Ok(false);
                }
                if exists(env, guest).await?.is_none() {
                    return Ok(false);
                }
                let c = read_config(env, guest).await?;
                Ok(c.get("lock").is_none())
            })
        },
        move || -> BoxFut<'a, _> {
            Box::pin(async move {
                let u = match guest.kind {
                    GuestKind::Lxc => {
                        let o = RestoreOptions {
                            archive,
                            storage,
                            force,
                            start,
                            ..RestoreOptions::default()
                        };
                        env.pve.lxc_restore(permit, &o).await?
                    }
                    GuestKind::Qemu => {
                        let o = QemuRestoreOptions {
                            archive,
                            storage,
                            force,
                            start,
                            ..QemuRestoreOptions::default()
                        };
                        env.pve.qemu_restore(permit, &o).await?
                    }
                };
                Ok(Sent::Task(u))
            })
        },
    )
    .await
}

/// Step 4: whether the guest is as the operation asks.
async fn health(env: &ExecEnv, g: &Gated, d: &Decided) -> Result<Verdict, Unfinished> {
    let guest = &g.guest;
    let want = match &g.op {
        GateOp::SetConfig { .. } => d.power.clone().unwrap_or_else(|| "stopped".into()),
        GateOp::Rollback { start, .. } => if *start { "running" } else { "stopped" }.into(),
        GateOp::Restore { start, .. } => {
            if let Err(e) = env.pve.guest_config(guest.kind, guest.vmid).await {
                if e.is_transient() {
                    return Err(px("reading the restored guest's config")(e));
                }
                return Ok(Verdict {
                    ok: false,
                    detail: format!("the restored guest's config is not readable: {e}"),
                });
            }
            if !*start {
                return Ok(Verdict {
                    ok: true,
                    detail: "config readable".into(),
                });
            }
            "running".into()
        }
        _ => {
            return Ok(Verdict {
                ok: true,
                detail: "no health check".into(),
            });
        }
    };
    Ok(
        match await_power(env, guest.kind, guest.vmid, &want, health_timeout(env)).await? {
            None => Verdict {
                ok: true,
                detail: format!("{want} as asked"),
            },
            Some(seen) => Verdict {
                ok: false,
                detail: format!(
                    "guest {} is {seen}, not {want}, after {} s",
                    guest.vmid,
                    health_timeout(env).as_secs()
                ),
            },
        },
    )
}

/// What an undo works from: the undone operation's kind, decision and undo point.
struct UndoFrom<'b> {
    op: &'b GateOp,
    decided: &'b Decided,
    made: Option<&'b Made>,
    digest_after: Option<&'b str>,
}

/// Runs the undo of `from` in slots named `prefix…`, then brings the power state back and
/// checks it. The verdict says what happened; `not_possible` in the detail when the config
/// moved.
async fn run_undo<'a>(
    m: &mut Machine<'a>,
    prefix: &str,
    guest: &'a GuestRef,
    permit: &'a GuestPermit,
    from: UndoFrom<'_>,
) -> Result<Verdict, Unfinished> {
    let env = m.env;
    let main = format!("{prefix}_main");
    let made = from.made.filter(|m| m.kind != "none");
    let outcome = match (from.op, made) {
        (GateOp::SetConfig { .. }, _) => {
            let previous = from.decided.previous.clone();
            if m.outcome(&main).is_none() && !m.steps.slots.contains_key(&main) {
                let now = read_config(env, guest).await?;
                let have = now.get("digest").and_then(Value::as_str).unwrap_or("");
                let after = from.digest_after.unwrap_or("");
                if have != after {
                    return Ok(Verdict {
                        ok: false,
                        detail: format!(
                            "not_possible: the config changed since the gate wrote it (digest {after} after the change, {have} now); not overwritten"
                        ),
                    });
                }
            }
            let change = change_of(&previous, from.digest_after);
            let prev2 = previous.clone();
            m.task(
                &main,
                type_of(guest.kind, "config"),
                move || -> BoxFut<'a, _> {
                    Box::pin(async move { Ok(config_has(&read_config(env, guest).await?, &prev2)) })
                },
                move || -> BoxFut<'a, _> {
                    Box::pin(async move {
                        match env.pve.set_config(permit, guest.kind, &change).await? {
                            SetConfigOutcome::Applied => Ok(Sent::Done),
                            SetConfigOutcome::Task(u) => Ok(Sent::Task(u)),
                        }
                    })
                },
            )
            .await?
        }
        (
            _,
            Some(Made {
                kind,
                reference: Some(r),
                ..
            }),
        ) if kind == "snapshot" => {
            let snap =
                SnapshotName::new(r.clone()).map_err(|e| Unfinished::Blocking(e.to_string()))?;
            m.task(
                &main,
                type_of(guest.kind, "rollback"),
                || -> BoxFut<'a, _> { Box::pin(async { Ok(false) }) },
                move || -> BoxFut<'a, _> {
                    Box::pin(async move {
                        env.pve
                            .snapshot_rollback(permit, guest.kind, &snap, false)
                            .await
                            .map(Sent::Task)
                    })
                },
            )
            .await?
        }
        (GateOp::Restore { .. }, None) if !from.decided.existed => {
            m.task(
                &main,
                type_of(guest.kind, "destroy"),
                move || -> BoxFut<'a, _> {
                    Box::pin(async move { Ok(exists(env, guest).await?.is_none()) })
                },
                move || -> BoxFut<'a, _> {
                    Box::pin(async move {
                        if exists(env, guest).await.ok().flatten().is_none() {
                            return Ok(Sent::Done);
                        }
                        env.pve
                            .destroy(permit, guest.kind, true, false)
                            .await
                            .map(Sent::Task)
                    })
                },
            )
            .await?
        }
        (
            _,
            Some(Made {
                kind,
                reference: Some(r),
                ..
            }),
        ) if kind == "backup" => {
            // Over the guest, except after a destroy (then the guest is gone and a
            // listed, unlocked guest means the restore is done).
            let force = !matches!(from.op, GateOp::Destroy { .. });
            let existed = force;
            let storage = from.decided.restore_storage.clone();
            restore_slot(m, &main, guest, permit, r, storage, force, false, existed).await?
        }
        _ => {
            return Ok(Verdict {
                ok: false,
                detail: "not_possible: no undo point was made".into(),
            });
        }
    };
    if let Outcome::Failed { error } = outcome {
        return Ok(Verdict {
            ok: false,
            detail: format!("the undo failed: {error}"),
        });
    }
    let Some(want) = from.decided.power.clone() else {
        return Ok(Verdict {
            ok: true,
            detail: "undone".into(),
        });
    };
    let power = format!("{prefix}_power");
    let w1 = want.clone();
    let w2 = want.clone();
    let ty = if want == "running" {
        task_type("start", guest.kind)
    } else {
        task_type("stop", guest.kind)
    };
    let o = m
        .task(
            &power,
            ty,
            move || -> BoxFut<'a, _> {
                Box::pin(async move {
                    Ok(env
                        .pve
                        .guest_status(guest.kind, guest.vmid)
                        .await
                        .map_err(px("reading the guest's status"))?
                        .status
                        .as_str()
                        == w1)
                })
            },
            move || -> BoxFut<'a, _> {
                Box::pin(async move {
                    let now = env.pve.guest_status(guest.kind, guest.vmid).await?;
                    if now.status.as_str() == w2 {
                        return Ok(Sent::Done);
                    }
                    if w2 == "running" {
                        env.pve.start(permit, guest.kind).await.map(Sent::Task)
                    } else {
                        env.pve.stop(permit, guest.kind).await.map(Sent::Task)
                    }
                })
            },
        )
        .await?;
    if let Outcome::Failed { error } = o {
        return Ok(Verdict {
            ok: false,
            detail: format!("undone, but the power state was not restored: {error}"),
        });
    }
    Ok(
        match await_power(env, guest.kind, guest.vmid, &want, health_timeout(env)).await? {
            None => Verdict {
                ok: true,
                detail: format!("undone; {want} as before"),
            },
            Some(seen) => Verdict {
                ok: false,
                detail: format!("undone, but the guest is {seen}, not {want} as before"),
            },
        },
    )
}

/// Runs (or resumes) a gated operation. The intent is committed. `seen`: what the
/// precheck read just before in this lane (`None` when resuming). The end carries the
/// gate's steps ([`Final::Stepped`]), so the last ones are recorded with it in one commit.
pub async fn run(
    env: &ExecEnv,
    g: &Gated,
    permit: &GuestPermit,
    who: Who<'_>,
    gate: &Value,
    resuming: bool,
    seen: Option<&Seen>,
) -> Result<Final, Unfinished> {
    let mut m = Machine::new(env, who.op_id, g.guest.vmid, gate, resuming);
    let end = run_steps(&mut m, g, permit, &who, seen).await?;
    Ok(Final::Stepped {
        gate: serde_json::to_value(&m.steps).unwrap_or(Value::Null),
        end: Box::new(end),
    })
}

async fn run_steps<'a>(
    m: &mut Machine<'a>,
    g: &'a Gated,
    permit: &'a GuestPermit,
    who: &Who<'_>,
    seen: Option<&Seen>,
) -> Result<Final, Unfinished> {
    let env = m.env;
    match &g.op {
        GateOp::Undo { op_id } => return undo_op(m, g, permit, op_id).await,
        GateOp::ReleaseUndo { op_id } => return release(m, g, permit, op_id, &who.by).await,
        GateOp::SetConfig { config } => return set_config(m, g, permit, config, seen).await,
        _ => {}
    }
    if m.steps.decided.is_none() {
        match decide(env, g, who.op_id, seen).await? {
            Ok(d) => m.commit(|s| s.decided = Some(d)).await?,
            Err(f) => return Ok(f),
        }
    }
    let Some(d) = m.steps.decided.clone() else {
        return Ok(Final::Failed("the gate's decision was not recorded".into()));
    };
    if m.steps.undo_point.is_none()
        && let Err(f) = make_undo_point(m, g, permit, &d).await?
    {
        return Ok(f);
    }
    let made = m.steps.undo_point.clone();
    let action = act(m, g, permit, &d).await?;
    finish(m, g, permit, &d, made, action).await
}

/// After the action: the health check (committed unless already known), then the end,
/// or the undo and its end.
async fn finish<'a>(
    m: &mut Machine<'a>,
    g: &'a Gated,
    permit: &'a GuestPermit,
    d: &Decided,
    made: Option<Made>,
    action: Outcome,
) -> Result<Final, Unfinished> {
    let env = m.env;
    let d = d.clone();
    let failure = match &action {
        Outcome::Failed { error } => Some(error.clone()),
        Outcome::Ok => {
            if m.steps.health.is_none() {
                let v = health(env, g, &d).await?;
                m.commit(|s| s.health = Some(v)).await?;
            }
            let h = m.steps.health.clone().unwrap_or(Verdict {
                ok: false,
                detail: "no verdict".into(),
            });
            (!h.ok).then_some(h.detail)
        }
    };
    let Some(why) = failure else {
        let mut r = Map::new();
        r.insert("undo".into(), undo_json(made.as_ref(), "kept"));
        if let Some(Made { kind, .. }) = &made
            && kind == "none"
            && let Plan::None { why } = &d.plan
        {
            r.insert("undo_why_none".into(), json!(why));
        }
        return Ok(Final::Ended {
            state: "applied",
            message: None,
            result: r,
        });
    };
    let mut r = Map::new();
    // Irreversible kinds are not undone automatically; their undo point (a destroy's
    // backup) stays. A refused config write changed nothing (PVE writes a config file
    // whole or not at all): writing the previous values back could only overwrite an
    // edit someone else made meanwhile.
    let config_refused =
        matches!(g.op, GateOp::SetConfig { .. }) && matches!(action, Outcome::Failed { .. });
    if config_refused || matches!(g.op, GateOp::Destroy { .. } | GateOp::DeleteSnapshot { .. }) {
        r.insert("undo".into(), undo_json(made.as_ref(), "kept"));
        return Ok(Final::Ended {
            state: "failed",
            message: Some(why),
            result: r,
        });
    }
    if m.steps.undo.is_none() {
        let after = m.steps.digest_after.clone();
        let v = run_undo(
            m,
            "undo",
            &g.guest,
            permit,
            UndoFrom {
                op: &g.op,
                decided: &d,
                made: made.as_ref(),
                digest_after: after.as_deref(),
            },
        )
        .await?;
        m.commit(|s| s.undo = Some(v)).await?;
    }
    let u = m.steps.undo.clone().unwrap_or(Verdict {
        ok: false,
        detail: "no verdict".into(),
    });
    if u.ok {
        r.insert("undo".into(), undo_json(made.as_ref(), "kept"));
        Ok(Final::Ended {
            state: "rolled_back",
            message: Some(format!("{why}; undone: {}", u.detail)),
            result: r,
        })
    } else {
        let status = if u.detail.starts_with("not_possible") {
            "not_possible"
        } else {
            "kept"
        };
        let mut j = undo_json(made.as_ref(), status);
        j["status"] = json!(status);
        r.insert("undo".into(), j);
        Ok(Final::Ended {
            state: "failed",
            message: Some(format!("{why}; {}", u.detail)),
            result: r,
        })
    }
}

/// `set_config`'s action slot.
const ACTION: &str = "action";

/// `set_config`: see the module doc ("set_config: three commits"). One commit before the
/// write (decision, previous values as the undo point, the action's slot: its intent),
/// the write (a QEMU task's UPID committed as Proxmox answers), the digest after and the
/// health check kept in memory and recorded with the end (or with the undo's first step).
async fn set_config<'a>(
    m: &mut Machine<'a>,
    g: &'a Gated,
    permit: &'a GuestPermit,
    values: &'a Map<String, Value>,
    seen: Option<&Seen>,
) -> Result<Final, Unfinished> {
    let env = m.env;
    let guest = &g.guest;
    let made = Made {
        kind: "previous_values".into(),
        reference: None,
        storage: None,
    };
    if m.steps.decided.is_none() {
        let op_id = m.op_id.clone();
        match decide(env, g, &op_id, seen).await? {
            Ok(d) => m.steps.decided = Some(d),
            Err(f) => return Ok(f),
        }
    }
    let Some(d) = m.steps.decided.clone() else {
        return Ok(Final::Failed("the gate's decision was not recorded".into()));
    };
    // The decision, the undo point and the action's slot in one commit: the intent of
    // the write. (A record from before this layout may hold the decision alone, or the
    // undo point without the slot: then nothing was sent yet either.)
    let mut fresh = false;
    if m.steps.undo_point.is_none() || !m.steps.slots.contains_key(ACTION) {
        let at = now_ms();
        m.steps.slots.insert(
            ACTION.into(),
            Slot {
                started_ms: at,
                upid: None,
                outcome: None,
            },
        );
        if m.steps.undo_point.is_none() {
            let point = previous_values_point(&m.op_id, g, &d);
            let mk = made.clone();
            m.commit_with_undo(|s| s.undo_point = Some(mk), point)
                .await?;
        } else {
            m.commit(|_| {}).await?;
        }
        fresh = true;
    }
    let action = match m.outcome(ACTION).cloned() {
        Some(o) => o,
        None => {
            let mut upid = m.upid(ACTION);
            let mut send = fresh && upid.is_none();
            if !fresh && upid.is_none() {
                // Resumed with the slot open: did the write happen?
                if guest.kind == GuestKind::Qemu {
                    upid = m.adopt(ACTION, type_of(guest.kind, "config")).await?;
                }
                if upid.is_none() {
                    let now = read_config(env, guest).await?;
                    let have = now
                        .get("digest")
                        .and_then(Value::as_str)
                        .map(str::to_string);
                    match (&d.digest, &have) {
                        // Not written: send it (again). Its digest guard makes a double
                        // apply impossible.
                        (Some(before), Some(h)) if before == h => send = true,
                        // Written: the digest moved and the keys hold the signed values.
                        _ if config_has(&now, values) => m.steps.digest_after = have,
                        // Nothing to tell a write by: the values are not there, write.
                        (None, _) => send = true,
                        // Someone else edited the config: not ours to write over.
                        (Some(before), _) => {
                            let msg = format!(
                                "the config changed before the change was known to be written (digest {before} before, {} now, without the signed values); nothing written over it",
                                have.as_deref().unwrap_or("none")
                            );
                            m.steps.slots.entry(ACTION.into()).and_modify(|s| {
                                s.outcome = Some(Outcome::Failed { error: msg.clone() })
                            });
                            let mut r = Map::new();
                            r.insert("undo".into(), undo_json(Some(&made), "not_possible"));
                            return Ok(Final::Ended {
                                state: "failed",
                                message: Some(msg),
                                result: r,
                            });
                        }
                    }
                }
            }
            let o = match upid {
                Some(u) => m.wait(&u).await?,
                None if send => {
                    let change = change_of(values, d.digest.as_deref());
                    match env.pve.set_config(permit, guest.kind, &change).await {
                        Ok(SetConfigOutcome::Applied) => Outcome::Ok,
                        Ok(SetConfigOutcome::Task(u)) => {
                            m.record_upid(ACTION, &u).await?;
                            m.wait(&u).await?
                        }
                        // It may have reached Proxmox: the resume reads the digest.
                        Err(e) if e.is_transient() => {
                            return Err(px("writing the guest's config")(e));
                        }
                        Err(e) => Outcome::Failed {
                            error: e.to_string(),
                        },
                    }
                }
                None => Outcome::Ok,
            };
            if let Some(s) = m.steps.slots.get_mut(ACTION) {
                s.outcome = Some(o.clone());
            }
            o
        }
    };
    if action.is_ok() {
        if m.steps.digest_after.is_none() {
            let c = read_config(env, guest).await?;
            m.steps.digest_after = c.get("digest").and_then(Value::as_str).map(str::to_string);
        }
        if m.steps.health.is_none() {
            m.steps.health = Some(health(env, g, &d).await?);
        }
    }
    finish(m, g, permit, &d, Some(made), action).await
}

/// The previous values of a `set_config` as its undo point's row.
fn previous_values_point(op_id: &str, g: &Gated, d: &Decided) -> UndoPoint {
    UndoPoint {
        op_id: op_id.to_string(),
        op_kind: g.op.kind().to_string(),
        vmid: g.guest.vmid.get(),
        guest_kind: g.guest.kind.as_str().to_string(),
        kind: "previous_values".into(),
        reference: None,
        storage: None,
        size_bytes: None,
        detail: json!({"power": d.power, "previous": d.previous, "digest": d.digest,
            "restore_storage": d.restore_storage}),
        created_ms: d.at_ms,
        status: "kept".into(),
        released_ms: None,
        released_by: None,
    }
}

/// `undo`: runs the undo of an applied operation from its kept undo point.
async fn undo_op<'a>(
    m: &mut Machine<'a>,
    g: &'a Gated,
    permit: &'a GuestPermit,
    undone: &str,
) -> Result<Final, Unfinished> {
    let env = m.env;
    let (rec, point) = match load_undone(env, undone).await? {
        Ok(x) => x,
        Err(f) => return Ok(f),
    };
    if rec.vmid != Some(g.guest.vmid.get()) {
        return Ok(refused(
            "precondition_failed",
            format!(
                "operation {undone} acted on guest {:?}, not on {}",
                rec.vmid, g.guest.vmid
            ),
        ));
    }
    let spec: Option<Gated> = gated_of(&rec.spec);
    let steps: super::steps::Steps = serde_json::from_value(rec.gate.clone()).unwrap_or_default();
    let (Some(spec), Some(decided)) = (spec, steps.decided.clone()) else {
        return Ok(refused(
            "not_reversible",
            format!("operation {undone} is not a gated operation"),
        ));
    };
    let ok_state = rec.state == "applied" || rec.state == "failed";
    let Some(point) = point.filter(|p| p.status == "kept" && ok_state) else {
        return Ok(refused(
            "not_reversible",
            format!(
                "operation {undone} ({}) has no kept undo point to undo from",
                rec.state
            ),
        ));
    };
    if point.kind == "none" {
        return Ok(refused(
            "not_reversible",
            format!("operation {undone} made no undo point"),
        ));
    }
    let made = Made {
        kind: point.kind.clone(),
        reference: point.reference.clone(),
        storage: point.storage.clone(),
    };
    if m.steps.undo.is_none() {
        let v = run_undo(
            m,
            "undo",
            &g.guest,
            permit,
            UndoFrom {
                op: &spec.op,
                decided: &decided,
                made: Some(&made),
                digest_after: steps.digest_after.as_deref(),
            },
        )
        .await?;
        m.commit(|s| s.undo = Some(v)).await?;
    }
    let u = m.steps.undo.clone().unwrap_or(Verdict {
        ok: false,
        detail: "no verdict".into(),
    });
    let mut r = Map::new();
    r.insert("undone_op_id".into(), json!(undone));
    let status = if u.detail.starts_with("not_possible") {
        "not_possible"
    } else {
        "kept"
    };
    r.insert("undo".into(), undo_json(Some(&made), status));
    if status == "not_possible" {
        r["undo"]["status"] = json!("not_possible");
    }
    Ok(Final::Ended {
        state: if u.ok { "applied" } else { "failed" },
        message: (!u.ok).then_some(u.detail),
        result: r,
    })
}

/// The gated spec of a record (its `spec` as the ops service keeps it).
fn gated_of(spec: &Value) -> Option<Gated> {
    serde_json::from_value::<crate::ops::exec::OpSpec>(spec.clone())
        .ok()?
        .gated()
}

async fn load_undone(
    env: &ExecEnv,
    undone: &str,
) -> Result<Result<(OpRecord, Option<UndoPoint>), Final>, Unfinished> {
    let id = undone.to_string();
    let j = env.journal.clone();
    let (rec, point) = tokio::task::spawn_blocking(move || {
        Ok::<_, crate::reconcile::journal::JournalError>((j.op_get(&id)?, j.undo_point_get(&id)?))
    })
    .await
    .map_err(|e| Unfinished::Blocking(e.to_string()))??;
    match rec {
        Some(r) => Ok(Ok((r, point))),
        None => Ok(Err(refused(
            "not_reversible",
            format!("no operation {undone} is known to this agent"),
        ))),
    }
}

/// `release_undo`: removes an undo point from the node and marks it released.
async fn release<'a>(
    m: &mut Machine<'a>,
    g: &'a Gated,
    permit: &'a GuestPermit,
    undone: &str,
    by: &str,
) -> Result<Final, Unfinished> {
    let env = m.env;
    let guest = &g.guest;
    let (_, point) = match load_undone(env, undone).await? {
        Ok(x) => x,
        Err(f) => return Ok(f),
    };
    let Some(point) = point else {
        return Ok(refused(
            "precondition_failed",
            format!("operation {undone} has no undo point"),
        ));
    };
    if point.vmid != guest.vmid.get() {
        return Ok(refused(
            "precondition_failed",
            format!(
                "the undo point of {undone} is guest {}'s, not {}'s",
                point.vmid, guest.vmid
            ),
        ));
    }
    let mut r = Map::new();
    r.insert("released_op_id".into(), json!(undone));
    let done = |r: &mut Map<String, Value>| {
        r.insert(
            "undo".into(),
            json!({"kind": point.kind, "ref": point.reference, "status": "released"}),
        );
    };
    if point.status == "released" && m.steps.health.is_none() {
        return Ok(refused(
            "precondition_failed",
            format!("the undo point of {undone} was already released"),
        ));
    }
    let o = match (
        point.kind.as_str(),
        point.reference.clone(),
        point.storage.clone(),
    ) {
        ("snapshot", Some(name), _) => {
            let snap =
                SnapshotName::new(name.clone()).map_err(|e| Unfinished::Blocking(e.to_string()))?;
            let n2 = name.clone();
            m.task(
                "release",
                type_of(guest.kind, "delsnapshot"),
                move || -> BoxFut<'a, _> {
                    Box::pin(async move { Ok(!snapshot_listed(env, guest, &n2).await?) })
                },
                move || -> BoxFut<'a, _> {
                    Box::pin(async move {
                        if !snapshot_listed(env, guest, &name).await.unwrap_or(true) {
                            return Ok(Sent::Done);
                        }
                        env.pve
                            .snapshot_delete(permit, guest.kind, &snap, false)
                            .await
                            .map(Sent::Task)
                    })
                },
            )
            .await?
        }
        ("backup", Some(volid), Some(storage)) => {
            let (v1, s1, v2, s2) = (
                volid.clone(),
                storage.clone(),
                volid.clone(),
                storage.clone(),
            );
            let listed = move |v: String, s: String| async move {
                Ok::<bool, Unfinished>(
                    env.pve
                        .backups(&s, Some(guest.vmid))
                        .await
                        .map_err(px("listing backups"))?
                        .iter()
                        .any(|b| b.volid == v),
                )
            };
            m.task(
                "release",
                "imgdel",
                move || -> BoxFut<'a, _> { Box::pin(async move { Ok(!listed(v1, s1).await?) }) },
                move || -> BoxFut<'a, _> {
                    Box::pin(async move {
                        let item = env
                            .pve
                            .backups(&s2, Some(guest.vmid))
                            .await?
                            .into_iter()
                            .find(|b| b.volid == v2);
                        let Some(item) = item else {
                            return Ok(Sent::Done);
                        };
                        if item.protected {
                            env.pve.backup_protect(permit, &s2, &v2, false).await?;
                        }
                        match env.pve.backup_delete(permit, &s2, &v2).await? {
                            Some(u) => Ok(Sent::Task(u)),
                            None => Ok(Sent::Done),
                        }
                    })
                },
            )
            .await?
        }
        _ => Outcome::Ok,
    };
    if let Outcome::Failed { error } = o {
        return Ok(Final::Ended {
            state: "failed",
            message: Some(format!("the undo point could not be removed: {error}")),
            result: r,
        });
    }
    if m.steps.health.is_none() {
        m.commit(|s| {
            s.health = Some(Verdict {
                ok: true,
                detail: "removed from the node".into(),
            })
        })
        .await?;
    }
    let id = undone.to_string();
    let by = by.to_string();
    let j = env.journal.clone();
    let marked = tokio::task::spawn_blocking(move || j.undo_point_release(&id, now_ms(), &by))
        .await
        .map_err(|e| Unfinished::Blocking(e.to_string()))?;
    match marked {
        Ok(_) | Err(UndoPointError::AlreadyReleased(_)) => {}
        Err(UndoPointError::Journal(e)) => return Err(Unfinished::Journal(e)),
        Err(e) => return Ok(Final::Failed(e.to_string())),
    }
    done(&mut r);
    Ok(Final::Ended {
        state: "applied",
        message: None,
        result: r,
    })
}
