//! The reconcile engine: observe, plan, and hand actions to the queue, in cycles.
//!
//! Owns: the cycle schedule (at start, on every change of the desired state or of the
//! mutation gate, when an action finishes, and at least once a minute), crash recovery at
//! the first open cycle, per-guest-and-action exponential backoff, journal compaction, and
//! the status the report and `felhom-agent status` show.
//!
//! Rules:
//! - Mutations happen only while the [`Gate`] is [`Gate::Open`] and the journal is not in
//!   safe mode. With the hub enabled the gate starts [`Gate::AwaitingEnvelope`] unless the
//!   envelope kept in `state_dir` already says not blocked; it is the `run` command that
//!   feeds the gate from the hub's envelopes. Reporting goes on in every state.
//! - A guest whose lane is busy is not planned for again until its lane is idle, so an
//!   action is never queued twice. Actions of one guest in one cycle run as one queue
//!   operation, in plan order, and stop at the first that fails.
//! - Unfinished journal entries are resumed (waited on, adopted or re-sent per
//!   [`super::exec`]) before anything new is planned for their guest.
//!
//! Must never: send a mutation while blocked or in safe mode (also right after a restart:
//! the gate starts closed), or retry a failing action faster than its backoff.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use felhom_protocol::Vmid;
use serde::Serialize;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::desired::{DesiredError, DesiredProvider, DesiredState, EmptyProvider, FileProvider};
use super::exec::{self, ExecCtx, ExecError};
use super::journal::{Journal, JournalError, Outcome, now_ms};
use super::plan::{Action, ActualGuest, Plan, Problem, Skipped, plan};
use super::pve::Pve;
use super::queue::{LaneView, Queue, QueueConfig, QueueStats};
use crate::config::Config;
use crate::proxmox::ProxmoxError;

/// Whether the engine may mutate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Gate {
    /// Hub disabled, or the hub's last envelope says not blocked.
    Open,
    /// The hub's envelope says `blocked: true`.
    Blocked,
    /// Hub enabled and no envelope yet (none kept in `state_dir` either).
    AwaitingEnvelope,
}

impl Gate {
    /// The gate for a kept or fresh envelope's `blocked` flag.
    pub fn from_blocked(blocked: bool) -> Gate {
        if blocked { Gate::Blocked } else { Gate::Open }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("observing the node: {0}")]
    Observe(#[source] ProxmoxError),
    #[error("no desired state: {0}")]
    Desired(#[source] Arc<DesiredError>),
}

/// Timings and limits.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    pub shutdown_timeout: Duration,
    pub task_timeout: Duration,
    /// A full cycle runs at least this often.
    pub resync_interval: Duration,
    /// How often the desired-state provider is polled for changes.
    pub poll_interval: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub queue: QueueConfig,
    /// Journal compaction: keep at least this many rows and everything younger than
    /// `compact_keep_age`.
    pub compact_keep_rows: usize,
    pub compact_keep_age: Duration,
}

impl EngineSettings {
    pub fn from_config(config: &Config) -> EngineSettings {
        EngineSettings {
            shutdown_timeout: Duration::from_secs(config.reconcile.shutdown_timeout_seconds),
            ..EngineSettings::default()
        }
    }
}

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings {
            shutdown_timeout: Duration::from_secs(120),
            task_timeout: Duration::from_secs(600),
            resync_interval: Duration::from_secs(60),
            poll_interval: Duration::from_secs(1),
            backoff_base: Duration::from_secs(5),
            backoff_max: Duration::from_secs(600),
            queue: QueueConfig::default(),
            compact_keep_rows: 10_000,
            compact_keep_age: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

/// An action that keeps failing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Failing {
    pub vmid: Vmid,
    pub action: String,
    pub attempts: u32,
    pub last_error: String,
    /// Wall-clock milliseconds since the epoch.
    pub next_retry_ms: i64,
}

/// What the engine is doing: the report's `reconcile` section and `felhom-agent status`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EngineStatus {
    pub gate: Gate,
    pub blocked: bool,
    pub safe_mode: Option<String>,
    pub desired_source: String,
    pub desired_error: Option<String>,
    pub desired_generation: Option<u64>,
    pub applied_generation: Option<u64>,
    pub queue: QueueStats,
    pub lanes: Vec<LaneView>,
    pub failing: Vec<Failing>,
    pub skipped: Vec<Skipped>,
    pub only_desired: Vec<Vmid>,
    pub only_actual: Vec<Vmid>,
    pub problems: Vec<Problem>,
    pub cycles: u64,
    pub last_cycle_ms: Option<i64>,
    pub last_cycle_error: Option<String>,
}

struct Backoff {
    attempts: u32,
    last_error: String,
    retry_at: Instant,
    retry_at_ms: i64,
}

#[derive(Default)]
struct Observed {
    gate: Option<Gate>,
    desired_error: Option<String>,
    desired_generation: Option<u64>,
    applied_generation: Option<u64>,
    skipped: Vec<Skipped>,
    only_desired: Vec<Vmid>,
    only_actual: Vec<Vmid>,
    problems: Vec<Problem>,
    cycles: u64,
    last_cycle_ms: Option<i64>,
    last_cycle_error: Option<String>,
}

struct Shared {
    queue: Queue,
    journal: Arc<Journal>,
    pve: Arc<dyn Pve>,
    provider: Arc<dyn DesiredProvider>,
    settings: EngineSettings,
    desired: Mutex<Option<Arc<DesiredState>>>,
    observed: Mutex<Observed>,
    failing: Mutex<HashMap<(Vmid, &'static str), Backoff>>,
    kick: Notify,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Everything the engine runs on.
pub struct EngineDeps {
    pub pve: Arc<dyn Pve>,
    pub journal: Arc<Journal>,
    pub provider: Arc<dyn DesiredProvider>,
    pub gate: watch::Receiver<Gate>,
    pub settings: EngineSettings,
}

impl std::fmt::Debug for EngineDeps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineDeps")
            .field("journal", &self.journal)
            .field("provider", &self.provider)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// The running engine. Dropping it without [`EngineHandle::shutdown`] stops the loop.
pub struct EngineHandle {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for EngineHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineHandle")
            .field("queue", &self.shared.queue)
            .finish_non_exhaustive()
    }
}

/// The engine (see the module docs).
#[derive(Debug)]
pub struct Engine;

impl Engine {
    /// Builds the engine from the configuration: journal in `state_dir`, provider from
    /// `reconcile.desired_file` (empty provider when unset). The caller holds the
    /// `state_dir` lock ([`crate::control::StateLock`]).
    pub fn spawn_from_config(
        config: &Config,
        pve: Arc<dyn Pve>,
        gate: watch::Receiver<Gate>,
    ) -> Result<EngineHandle, EngineError> {
        let journal = Arc::new(Journal::open(&config.state_dir)?);
        let provider: Arc<dyn DesiredProvider> = match &config.reconcile.desired_file {
            Some(path) => Arc::new(FileProvider::new(path)),
            None => Arc::new(EmptyProvider::default()),
        };
        Ok(Engine::spawn(EngineDeps {
            pve,
            journal,
            provider,
            gate,
            settings: EngineSettings::from_config(config),
        }))
    }

    /// Starts the engine loop and its queue on the current Tokio runtime.
    pub fn spawn(deps: EngineDeps) -> EngineHandle {
        let shared = Arc::new(Shared {
            queue: Queue::start(deps.settings.queue),
            journal: deps.journal,
            pve: deps.pve,
            provider: deps.provider,
            settings: deps.settings,
            desired: Mutex::new(None),
            observed: Mutex::new(Observed::default()),
            failing: Mutex::new(HashMap::new()),
            kick: Notify::new(),
        });
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run_loop(shared.clone(), deps.gate, stop_rx));
        EngineHandle {
            shared,
            stop,
            task: Mutex::new(Some(task)),
        }
    }
}

impl EngineHandle {
    /// The queue: every guest mutation from elsewhere (selftest, operator commands) is
    /// submitted here while the daemon runs.
    pub fn queue(&self) -> &Queue {
        &self.shared.queue
    }

    pub fn journal(&self) -> &Arc<Journal> {
        &self.shared.journal
    }

    /// Asks for a cycle now.
    pub fn kick(&self) {
        self.shared.kick.notify_one();
    }

    pub fn status(&self) -> EngineStatus {
        let s = &self.shared;
        let o = lock(&s.observed);
        let gate = o.gate.unwrap_or(Gate::AwaitingEnvelope);
        let mut failing: Vec<Failing> = lock(&s.failing)
            .iter()
            .map(|((vmid, action), b)| Failing {
                vmid: *vmid,
                action: action.to_string(),
                attempts: b.attempts,
                last_error: b.last_error.clone(),
                next_retry_ms: b.retry_at_ms,
            })
            .collect();
        failing.sort_by(|a, b| (a.vmid, &a.action).cmp(&(b.vmid, &b.action)));
        EngineStatus {
            gate,
            blocked: gate != Gate::Open,
            safe_mode: s.journal.safe_mode(),
            desired_source: s.provider.describe(),
            desired_error: o.desired_error.clone(),
            desired_generation: o.desired_generation,
            applied_generation: o.applied_generation,
            queue: s.queue.stats(),
            lanes: s.queue.lanes(),
            failing,
            skipped: o.skipped.clone(),
            only_desired: o.only_desired.clone(),
            only_actual: o.only_actual.clone(),
            problems: o.problems.clone(),
            cycles: o.cycles,
            last_cycle_ms: o.last_cycle_ms,
            last_cycle_error: o.last_cycle_error.clone(),
        }
    }

    /// What a cycle would do now (observe and plan; nothing is queued).
    pub async fn plan(&self) -> Result<Plan, EngineError> {
        let desired = lock(&self.shared.desired).clone();
        let desired = match desired {
            Some(d) => d,
            None => match self.shared.provider.poll() {
                Some(Ok(d)) => d,
                Some(Err(e)) => return Err(EngineError::Desired(e)),
                None => Arc::new(DesiredState::default()),
            },
        };
        plan_now(self.shared.pve.as_ref(), &desired).await
    }

    /// Stops the loop, then the queue: running actions get `grace` to finish.
    pub async fn shutdown(&self, grace: Duration) {
        let _ = self.stop.send(true);
        let task = lock(&self.task).take();
        if let Some(t) = task {
            let _ = t.await;
        }
        let report = self.shared.queue.shutdown(grace).await;
        tracing::info!(
            cancelled_queued = report.cancelled_queued,
            cancelled_running = report.cancelled_running,
            "reconcile engine stopped"
        );
    }
}

impl Drop for EngineHandle {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = lock(&self.task).take() {
            t.abort();
        }
    }
}

/// Observes the node for `desired` and plans, without queueing anything. Used by the
/// engine's cycles and by `felhom-agent plan`.
pub async fn plan_now(pve: &dyn Pve, desired: &DesiredState) -> Result<Plan, EngineError> {
    let (actual, problems) = observe(pve, desired).await?;
    let mut p = plan(desired, &actual);
    p.problems.extend(problems);
    p.problems.sort_by_key(|p| p.vmid);
    Ok(p)
}

/// Lists the node and reads config and status of the guests the desired state names.
async fn observe(
    pve: &dyn Pve,
    desired: &DesiredState,
) -> Result<(Vec<ActualGuest>, Vec<Problem>), EngineError> {
    let list = pve.list().await.map_err(EngineError::Observe)?;
    let wanted: HashSet<Vmid> = desired.guests.iter().map(|g| g.vmid).collect();
    let mut actual = Vec::with_capacity(list.len());
    let mut problems = Vec::new();
    for g in list {
        if !wanted.contains(&g.vmid) {
            // Only reported as "on the node only": no need to read it.
            actual.push(ActualGuest {
                vmid: g.vmid,
                kind: g.kind,
                status: g.status,
                template: false,
                lock: None,
                ha_managed: false,
                config: serde_json::Map::new(),
            });
            continue;
        }
        match pve.guest(g.kind, g.vmid).await {
            Ok(a) => actual.push(a),
            Err(e) if e.is_transient() => return Err(EngineError::Observe(e)),
            Err(e) => problems.push(Problem {
                vmid: g.vmid,
                message: format!("reading the guest: {e}"),
            }),
        }
    }
    Ok((actual, problems))
}

async fn run_loop(
    shared: Arc<Shared>,
    mut gate: watch::Receiver<Gate>,
    mut stop: watch::Receiver<bool>,
) {
    let mut next_cycle = Instant::now();
    let mut recovered = false;
    let mut gate_alive = true;
    let mut last_compact: Option<Instant> = None;
    loop {
        if let Some(new) = shared.provider.poll() {
            let mut o = lock(&shared.observed);
            match new {
                Ok(d) => {
                    tracing::info!(generation = d.generation, guests = d.guests.len(),
                        source = %shared.provider.describe(), "desired state loaded");
                    o.desired_error = None;
                    o.desired_generation = Some(d.generation);
                    *lock(&shared.desired) = Some(d);
                }
                Err(e) => {
                    tracing::error!(error = %e, "desired state unusable; no changes until it is fixed");
                    o.desired_error = Some(e.to_string());
                    *lock(&shared.desired) = None;
                }
            }
            next_cycle = Instant::now();
        }
        if Instant::now() >= next_cycle {
            let g = *gate.borrow_and_update();
            cycle(&shared, g, &mut recovered).await;
            next_cycle = Instant::now() + shared.settings.resync_interval;
            if last_compact.is_none_or(|t| t.elapsed() > Duration::from_secs(3600)) {
                compact(&shared).await;
                last_compact = Some(Instant::now());
            }
        }
        let gate_changed = async {
            if gate_alive {
                gate.changed().await.is_ok()
            } else {
                std::future::pending().await
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(shared.settings.poll_interval) => {}
            _ = shared.kick.notified() => next_cycle = Instant::now(),
            alive = gate_changed => {
                gate_alive = alive;
                next_cycle = Instant::now();
            }
            _ = stop.changed() => return,
        }
    }
}

async fn compact(shared: &Arc<Shared>) {
    if shared.journal.safe_mode().is_some() {
        return;
    }
    let j = shared.journal.clone();
    let rows = shared.settings.compact_keep_rows;
    let age = shared.settings.compact_keep_age.as_millis() as i64;
    match tokio::task::spawn_blocking(move || j.compact(rows, age)).await {
        Ok(Ok(n)) if n > 0 => tracing::info!(removed = n, "journal compacted"),
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "journal compaction failed"),
        Err(e) => tracing::error!(error = %e, "journal compaction task failed"),
    }
}

async fn cycle(shared: &Arc<Shared>, gate: Gate, recovered: &mut bool) {
    {
        let mut o = lock(&shared.observed);
        if o.gate != Some(gate) {
            tracing::info!(?gate, "mutation gate");
        }
        o.gate = Some(gate);
        o.cycles += 1;
        o.last_cycle_ms = Some(now_ms());
    }
    let desired = lock(&shared.desired).clone();
    let Some(desired) = desired else {
        return; // no usable desired state: report only
    };
    let p = match plan_now(shared.pve.as_ref(), &desired).await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "reconcile cycle could not observe the node");
            lock(&shared.observed).last_cycle_error = Some(e.to_string());
            return;
        }
    };
    let busy: HashSet<Vmid> = shared.queue.lanes().iter().map(|l| l.vmid).collect();
    {
        let mut o = lock(&shared.observed);
        o.last_cycle_error = None;
        o.skipped = p.skipped.clone();
        o.only_desired = p.only_desired.clone();
        o.only_actual = p.only_actual.clone();
        o.problems = p.problems.clone();
        if p.is_converged() && p.problems.is_empty() && busy.is_empty() {
            if o.applied_generation != Some(p.generation) {
                tracing::info!(generation = p.generation, "desired state applied");
            }
            o.applied_generation = Some(p.generation);
        }
    }
    // Guests no longer drifting are not failing any more.
    {
        let drifting: HashSet<(Vmid, &'static str)> =
            p.actions.iter().map(|a| (a.vmid, a.op.name())).collect();
        lock(&shared.failing).retain(|k, _| drifting.contains(k));
    }
    if gate != Gate::Open || shared.journal.safe_mode().is_some() {
        return; // no mutation while blocked or in safe mode
    }
    let mut busy = busy;
    if !*recovered {
        match recover(shared).await {
            Ok(resumed) => {
                busy.extend(resumed);
                *recovered = true;
            }
            Err(e) => {
                tracing::error!(error = %e, "reading open journal entries failed");
                return;
            }
        }
    }
    let mut per_guest: BTreeMap<Vmid, Vec<Action>> = BTreeMap::new();
    for a in p.actions {
        per_guest.entry(a.vmid).or_default().push(a);
    }
    let now = Instant::now();
    for (vmid, actions) in per_guest {
        if busy.contains(&vmid) {
            continue;
        }
        let waiting = {
            let f = lock(&shared.failing);
            actions.iter().any(|a| {
                f.get(&(vmid, a.op.name()))
                    .is_some_and(|b| b.retry_at > now)
            })
        };
        if waiting {
            continue;
        }
        let label = actions
            .iter()
            .map(|a| a.op.name())
            .collect::<Vec<_>>()
            .join("+");
        let sh = shared.clone();
        let submitted = shared.queue.submit(vmid, label, move |permit| {
            Box::pin(async move {
                let ctx = exec_ctx(&sh);
                for action in actions {
                    let name = action.op.name();
                    let result = exec::run(&ctx, permit, action).await;
                    let ok = note_result(&sh, vmid, name, &result);
                    if !ok {
                        break;
                    }
                }
                sh.kick.notify_one();
            })
        });
        if let Err(e) = submitted {
            tracing::warn!(error = %e, "not queued this cycle");
            break;
        }
    }
}

fn exec_ctx(shared: &Shared) -> ExecCtx {
    ExecCtx {
        pve: shared.pve.clone(),
        journal: shared.journal.clone(),
        shutdown_timeout: shared.settings.shutdown_timeout,
        task_timeout: shared.settings.task_timeout,
    }
}

/// Records an action's result in the backoff table; true when it succeeded.
fn note_result(
    shared: &Shared,
    vmid: Vmid,
    action: &'static str,
    result: &Result<Outcome, ExecError>,
) -> bool {
    let error = match result {
        Ok(o) if o.is_success() => {
            lock(&shared.failing).remove(&(vmid, action));
            return true;
        }
        Ok(Outcome::Failed { error }) => error.clone(),
        Ok(_) => String::new(),
        Err(e) => e.to_string(),
    };
    let mut f = lock(&shared.failing);
    let b = f.entry((vmid, action)).or_insert(Backoff {
        attempts: 0,
        last_error: String::new(),
        retry_at: Instant::now(),
        retry_at_ms: 0,
    });
    b.attempts += 1;
    let exp = b.attempts.saturating_sub(1).min(16);
    let delay = shared
        .settings
        .backoff_base
        .saturating_mul(1u32 << exp)
        .min(shared.settings.backoff_max);
    b.retry_at = Instant::now() + delay;
    b.retry_at_ms = now_ms() + delay.as_millis() as i64;
    b.last_error = error.clone();
    tracing::warn!(vmid = %vmid, action, attempts = b.attempts, retry_in = ?delay, %error, "action failed");
    false
}

/// Queues the resumption of every open journal entry; returns the guests involved.
async fn recover(shared: &Arc<Shared>) -> Result<Vec<Vmid>, JournalError> {
    let j = shared.journal.clone();
    let open = tokio::task::spawn_blocking(move || j.open_entries())
        .await
        .unwrap_or_else(|e| Err(JournalError::SafeMode(format!("journal worker: {e}"))))?;
    let mut per_guest: BTreeMap<Vmid, Vec<_>> = BTreeMap::new();
    for e in open {
        per_guest.entry(e.vmid).or_default().push(e);
    }
    let mut vmids = Vec::new();
    for (vmid, entries) in per_guest {
        tracing::info!(vmid = %vmid, entries = entries.len(), "resuming unfinished journal entries");
        let sh = shared.clone();
        let submitted = shared.queue.submit(vmid, "resume", move |permit| {
            Box::pin(async move {
                let ctx = exec_ctx(&sh);
                for entry in entries {
                    let name = entry.action.op.name();
                    let result = exec::resume(&ctx, permit, entry).await;
                    if !note_result(&sh, vmid, name, &result) {
                        break;
                    }
                }
                sh.kick.notify_one();
            })
        });
        match submitted {
            Ok(_) => vmids.push(vmid),
            Err(e) => tracing::warn!(error = %e, "resume not queued"),
        }
    }
    Ok(vmids)
}

#[cfg(test)]
mod tests;
