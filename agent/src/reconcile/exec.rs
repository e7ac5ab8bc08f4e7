//! Executes one planned action inside its lane, journaled: intent before the request,
//! UPID as soon as Proxmox answers, outcome when it ends; and resumes an action found
//! unfinished in the journal after a crash.
//!
//! Owns: the order of journal commits and Proxmox calls for one action, Stop's
//! shutdown-then-stop sequence, and crash recovery per entry:
//! - a recorded UPID without an outcome is waited on, never re-sent;
//! - an entry with an outcome is `AlreadyApplied` (nothing is sent);
//! - an intent without a UPID is matched against the node's task list (our token, that
//!   guest and task type, started in or after the intent's second, and not a UPID the
//!   journal already holds for that guest, so an earlier action's task of the same type
//!   started in the same second is never taken for this one) and adopted if found; only
//!   if no such task exists and the guest still differs is the request sent again.
//!
//! Compare-and-set: every config write carries the config `digest` of the read its action
//! was planned from ([`super::plan::Basis`]), so PVE refuses it if anyone changed the
//! config since, also between the engine's last check and the write. That refusal ends
//! the entry as [`Outcome::Stale`]: nothing was written, and the engine plans again from
//! a fresh read (which sees the new digest) instead of retrying the old write.
//!
//! Must never: call a mutating Proxmox method before the intent is committed, or after the
//! journal entered safe mode; send a request again for an entry that has a UPID; write a
//! guest's config without the digest its action was planned against.

use std::sync::Arc;
use std::time::Duration;

use felhom_protocol::Vmid;

use super::journal::{Entry, IdemKey, Journal, JournalError, Outcome};
use super::normalize::{Field, GuestKind, Norm, Param};
use super::plan::{Action, ActualGuest, Op};
use super::pve::Pve;
use crate::proxmox::GuestPermit;
use crate::proxmox::{ConfigChange, ProxmoxError, SetConfigOutcome, Upid};

/// Why an action did not reach an outcome. The journal entry stays open (or the journal is
/// in safe mode); the next cycle resumes it.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("guest {vmid}: {what}: {source}")]
    Unfinished {
        vmid: Vmid,
        what: &'static str,
        #[source]
        source: ProxmoxError,
    },
    #[error("journal worker stopped: {0}")]
    Blocking(String),
}

/// Told which journal entry an action is working on (new intent, or a resumed one): the
/// engine shows it as the running action's operation id.
pub type EntryObserver = Arc<dyn Fn(&Entry) + Send + Sync>;

/// What the executor needs.
#[derive(Clone)]
pub struct ExecCtx {
    pub pve: Arc<dyn Pve>,
    pub journal: Arc<Journal>,
    /// Graceful-shutdown timeout before the hard stop.
    pub shutdown_timeout: Duration,
    /// How long a task (start, stop, qmconfig) may run before we stop waiting.
    pub task_timeout: Duration,
    pub observer: Option<EntryObserver>,
}

impl std::fmt::Debug for ExecCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecCtx")
            .field("journal", &self.journal)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .finish_non_exhaustive()
    }
}

/// Runs a journal call off the async workers (SQLite fsyncs).
async fn blocking<T: Send + 'static>(
    journal: &Arc<Journal>,
    f: impl FnOnce(&Journal) -> Result<T, JournalError> + Send + 'static,
) -> Result<T, ExecError> {
    let j = journal.clone();
    tokio::task::spawn_blocking(move || f(&j))
        .await
        .map_err(|e| ExecError::Blocking(e.to_string()))?
        .map_err(ExecError::from)
}

/// The worker type of the first task an action starts (None: LXC config is synchronous).
pub fn first_task_type(action: &Action) -> Option<&'static str> {
    match (&action.op, action.kind) {
        (Op::Start, GuestKind::Lxc) => Some("vzstart"),
        (Op::Start, GuestKind::Qemu) => Some("qmstart"),
        (Op::Stop, GuestKind::Lxc) => Some("vzshutdown"),
        (Op::Stop, GuestKind::Qemu) => Some("qmshutdown"),
        (Op::SetConfig { .. }, GuestKind::Lxc) => None,
        (Op::SetConfig { .. }, GuestKind::Qemu) => Some("qmconfig"),
    }
}

fn hard_stop_type(kind: GuestKind) -> &'static str {
    match kind {
        GuestKind::Lxc => "vzstop",
        GuestKind::Qemu => "qmstop",
    }
}

/// The client's config change for the action's parameters, based on `digest` (the config
/// digest of the read the action was planned from).
pub fn config_change(params: &[Param], digest: &str) -> ConfigChange {
    let mut change = ConfigChange::new().digest(digest);
    for p in params {
        change = match p {
            Param::Set(k, v) => change.set(k.clone(), v.clone()),
            Param::Delete(k) => change.delete(k.clone()),
        };
    }
    change
}

/// Whether `guest` already is what `action` would make it.
pub fn already_done(action: &Action, guest: &ActualGuest) -> bool {
    match &action.op {
        Op::Start => guest.status == "running",
        Op::Stop => guest.status == "stopped",
        Op::SetConfig { fields, values, .. } => {
            fields.iter().zip(values).all(|(f, want): (&Field, &Norm)| {
                f.actual(guest.kind, &guest.config).as_ref() == Ok(want)
            })
        }
    }
}

/// Whether the guest is still in the state (status and config digest) `action` was
/// planned against. The engine checks this when an operation starts in its lane: a plan
/// made from a read that an operation finishing meanwhile (or a change by hand) made stale
/// must not be sent; the next cycle plans again from a fresh read.
pub async fn basis_holds(ctx: &ExecCtx, action: &Action) -> Result<bool, ExecError> {
    let now = read_guest(
        ctx,
        action.kind,
        action.vmid,
        "reading the guest before acting",
    )
    .await?;
    Ok(now.basis() == action.basis)
}

/// Plans-to-outcome for one action in its lane. The idempotency key is derived here, from
/// the journal position at execution time, so a retry after a crash derives the same key.
pub async fn run(
    ctx: &ExecCtx,
    permit: &GuestPermit,
    action: Action,
) -> Result<Outcome, ExecError> {
    debug_assert_eq!(permit.vmid(), action.vmid);
    let vmid = action.vmid;
    let prior = blocking(&ctx.journal, move |j| j.last_finished(vmid)).await?;
    let key = IdemKey::derive(&action, prior);
    let k = key.clone();
    if let Some(existing) = blocking(&ctx.journal, move |j| j.by_key(&k)).await? {
        return match existing.outcome {
            Some(_) => Ok(Outcome::AlreadyApplied),
            None => resume(ctx, permit, existing).await,
        };
    }
    let a = action.clone();
    let entry = blocking(&ctx.journal, move |j| j.record_intent(&key, &a)).await?;
    tracing::info!(vmid = %vmid, action = %action, key = %entry.key, "intent recorded");
    observe(ctx, &entry);
    send(ctx, permit, entry).await
}

/// Sends the action of a committed intent, records UPIDs and the outcome.
async fn send(ctx: &ExecCtx, permit: &GuestPermit, entry: Entry) -> Result<Outcome, ExecError> {
    let id = entry.id;
    let kind = entry.action.kind;
    let outcome = match &entry.action.op {
        Op::Start => match ctx.pve.start(permit, kind).await {
            Ok(upid) => {
                record_upid(ctx, id, &upid).await?;
                wait(ctx, entry.vmid, &upid, ctx.task_timeout).await?
            }
            Err(e) => failed(e),
        },
        Op::Stop => stop_sequence(ctx, permit, &entry, None).await?,
        Op::SetConfig { params, .. } => match &entry.action.basis.digest {
            // PVE always sends one; without it the write could not be a compare-and-set.
            None => Outcome::Failed {
                error: format!(
                    "guest {}: its config was read without a digest, so a write could overwrite a concurrent change; nothing sent",
                    entry.vmid
                ),
            },
            Some(digest) => {
                let change = config_change(params, digest);
                match ctx.pve.set_config(permit, kind, &change).await {
                    Ok(SetConfigOutcome::Applied) => Outcome::Succeeded { detail: None },
                    Ok(SetConfigOutcome::Task(upid)) => {
                        record_upid(ctx, id, &upid).await?;
                        wait(ctx, entry.vmid, &upid, ctx.task_timeout).await?
                    }
                    Err(e @ ProxmoxError::ConfigChanged { .. }) => {
                        tracing::info!(vmid = %entry.vmid, error = %e, "config changed since it was planned; nothing written");
                        Outcome::Stale {
                            detail: e.to_string(),
                        }
                    }
                    Err(e) => failed(e),
                }
            }
        },
    };
    finish(ctx, id, outcome).await
}

fn observe(ctx: &ExecCtx, entry: &Entry) {
    if let Some(o) = &ctx.observer {
        o(entry);
    }
}

/// The UPIDs the journal holds for `vmid`: never adopted for another entry.
/// The guest as the node has it now; a failed read leaves the entry open.
async fn read_guest(
    ctx: &ExecCtx,
    kind: GuestKind,
    vmid: Vmid,
    what: &'static str,
) -> Result<ActualGuest, ExecError> {
    ctx.pve
        .guest(kind, vmid)
        .await
        .map_err(|source| ExecError::Unfinished { vmid, what, source })
}

/// The task of `task_type` that `entry`'s request may have started before a crash kept
/// its UPID from the journal: our token's, begun at or after the intent, and not one the
/// journal already holds for this guest.
async fn find_started_task(
    ctx: &ExecCtx,
    entry: &Entry,
    task_type: &str,
) -> Result<Option<Upid>, ExecError> {
    let vmid = entry.vmid;
    let since = entry.intent_ms.div_euclid(1000);
    let known = blocking(&ctx.journal, move |j| j.upids_of(vmid)).await?;
    ctx.pve
        .find_task(vmid, task_type, since, &known)
        .await
        .map_err(|source| ExecError::Unfinished {
            vmid,
            what: "searching the task list",
            source,
        })
}

async fn finish(ctx: &ExecCtx, id: i64, outcome: Outcome) -> Result<Outcome, ExecError> {
    let o = outcome.clone();
    blocking(&ctx.journal, move |j| j.record_outcome(id, &o)).await?;
    Ok(outcome)
}

async fn record_upid(ctx: &ExecCtx, id: i64, upid: &Upid) -> Result<(), ExecError> {
    let u = upid.as_str().to_string();
    blocking(&ctx.journal, move |j| j.record_upid(id, &u)).await
}

fn failed(e: ProxmoxError) -> Outcome {
    Outcome::Failed {
        error: e.to_string(),
    }
}

/// Waits for a task: its end is an outcome; losing sight of it is not (entry stays open).
async fn wait(
    ctx: &ExecCtx,
    vmid: Vmid,
    upid: &Upid,
    timeout: Duration,
) -> Result<Outcome, ExecError> {
    match ctx.pve.wait(upid, timeout).await {
        Ok(done) => Ok(Outcome::Succeeded {
            detail: done.warnings.map(|n| format!("{n} warnings")),
        }),
        Err(e @ ProxmoxError::TaskFailed { .. }) => Ok(failed(e)),
        Err(source) => Err(ExecError::Unfinished {
            vmid,
            what: "waiting for the task",
            source,
        }),
    }
}

/// Graceful shutdown (unless one is already recorded), then a hard stop only if the guest
/// is still running.
async fn stop_sequence(
    ctx: &ExecCtx,
    permit: &GuestPermit,
    entry: &Entry,
    recorded_shutdown: Option<Upid>,
) -> Result<Outcome, ExecError> {
    let resuming = recorded_shutdown.is_some();
    let kind = entry.action.kind;
    let vmid = entry.vmid;
    let shutdown = match recorded_shutdown {
        Some(upid) => Some(upid),
        None => match ctx.pve.shutdown(permit, kind, ctx.shutdown_timeout).await {
            Ok(upid) => {
                record_upid(ctx, entry.id, &upid).await?;
                Some(upid)
            }
            // e.g. "not running": the state check below decides.
            Err(e) => {
                tracing::warn!(vmid = %vmid, error = %e, "shutdown refused");
                None
            }
        },
    };
    if let Some(upid) = &shutdown {
        // The task ends by itself after the timeout; a failure here just means "still up".
        let margin = ctx.shutdown_timeout + Duration::from_secs(30);
        if let Outcome::Failed { error } = wait(ctx, vmid, upid, margin).await? {
            tracing::warn!(vmid = %vmid, %error, "graceful shutdown did not succeed");
        }
    }
    finish_stop(ctx, permit, entry, resuming).await
}

/// After the shutdown phase: hard stop if still running.
async fn finish_stop(
    ctx: &ExecCtx,
    permit: &GuestPermit,
    entry: &Entry,
    resuming: bool,
) -> Result<Outcome, ExecError> {
    let kind = entry.action.kind;
    let vmid = entry.vmid;
    if resuming {
        // The crash may have fallen after the hard stop was sent and before its UPID was
        // recorded: adopt it rather than stop twice.
        if let Some(upid) = find_started_task(ctx, entry, hard_stop_type(kind)).await? {
            record_upid(ctx, entry.id, &upid).await?;
            return wait(ctx, vmid, &upid, ctx.task_timeout).await;
        }
    }
    let now = read_guest(ctx, kind, vmid, "reading the guest after shutdown").await?;
    if now.status != "running" {
        return Ok(Outcome::Succeeded { detail: None });
    }
    tracing::info!(vmid = %vmid, "still running after graceful shutdown: hard stop");
    match ctx.pve.stop(permit, kind).await {
        Ok(upid) => {
            record_upid(ctx, entry.id, &upid).await?;
            wait(ctx, vmid, &upid, ctx.task_timeout).await
        }
        Err(e) => Ok(failed(e)),
    }
}

/// Resumes an entry that has an intent but no outcome (after a crash, or a lost wait).
pub async fn resume(
    ctx: &ExecCtx,
    permit: &GuestPermit,
    entry: Entry,
) -> Result<Outcome, ExecError> {
    // The entry as the journal has it now: a resume queued earlier may have finished it.
    let id = entry.id;
    let entry = match blocking(&ctx.journal, move |j| j.get(id)).await? {
        Some(e) if e.is_open() => e,
        Some(e) => return Ok(e.outcome.unwrap_or(Outcome::AlreadyApplied)),
        None => {
            return Err(ExecError::Journal(JournalError::NoSuchEntry {
                path: ctx.journal.path().to_path_buf(),
                id,
            }));
        }
    };
    observe(ctx, &entry);
    let kind = entry.action.kind;
    let vmid = entry.vmid;
    let mut upids: Vec<Upid> = Vec::with_capacity(entry.upids.len());
    for u in &entry.upids {
        match u.parse::<Upid>() {
            Ok(u) => upids.push(u),
            Err(e) => {
                return Err(ExecError::Journal(JournalError::Decode {
                    path: ctx.journal.path().to_path_buf(),
                    id: entry.id,
                    what: "upid",
                    detail: e.to_string(),
                }));
            }
        }
    }
    // No UPID recorded: did the request reach Proxmox before the crash?
    if upids.is_empty()
        && let Some(task_type) = first_task_type(&entry.action)
        && let Some(upid) = find_started_task(ctx, &entry, task_type).await?
    {
        tracing::info!(vmid = %vmid, upid = %upid, "adopting the task an interrupted intent started");
        record_upid(ctx, entry.id, &upid).await?;
        upids.push(upid);
    }
    if let Some(last) = upids.last().cloned() {
        tracing::info!(vmid = %vmid, upid = %last, "resuming: waiting on the recorded task");
        let outcome = match &entry.action.op {
            Op::Stop if last.task_type() != hard_stop_type(kind) => {
                stop_sequence(ctx, permit, &entry, Some(last)).await?
            }
            _ => wait(ctx, vmid, &last, ctx.task_timeout).await?,
        };
        return finish(ctx, entry.id, outcome).await;
    }
    // Nothing was started (or LXC config, which has no task): send only if still needed.
    let now = read_guest(ctx, kind, vmid, "reading the guest to resume").await?;
    if already_done(&entry.action, &now) {
        tracing::info!(vmid = %vmid, action = %entry.action, "resuming: already applied");
        return finish(ctx, entry.id, Outcome::AlreadyApplied).await;
    }
    tracing::info!(vmid = %vmid, action = %entry.action, "resuming: no task found and the guest still differs; sending");
    send(ctx, permit, entry).await
}
