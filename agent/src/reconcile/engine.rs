//! The reconcile engine: observe, plan, and hand actions to the queue, in cycles.
//!
//! Owns: the cycle schedule (at start, on every change of the desired state or of the
//! mutation gate, when an action finishes, and at least once a minute), crash recovery at
//! the first open cycle, per-guest-and-action exponential backoff, journal compaction, and
//! the status `felhom-agent status` shows (the report's section is built from it in
//! [`super::status`]).
//!
//! Rules:
//! - Mutations happen only while the [`Gate`] is [`Gate::Open`] and the journal is not in
//!   safe mode. With the hub enabled the gate starts [`Gate::AwaitingEnvelope`] unless the
//!   envelope kept in `state_dir` already says not blocked; it is the `run` command that
//!   feeds the gate from the hub's envelopes. Reporting goes on in every state.
//! - A guest whose lane is busy (at any moment of the cycle's observation) is not planned
//!   for again until its lane is idle, so an action is never queued twice. Actions of one
//!   guest in one cycle run as one queue operation, in plan order, and stop at the first
//!   that fails. When the operation gets its lane it first checks that the guest is still
//!   in the state (status, config digest) the plan was made from; if not (an operation
//!   that finished while the cycle was reading, a change by hand), nothing is sent and the
//!   next cycle plans from a fresh read. That check alone leaves a window before the
//!   write, so every config write also carries the plan's digest and PVE refuses it if the
//!   config changed meanwhile ([`super::exec`]); such a refusal is handled the same way:
//!   no backoff, no `failing` entry, the rest of the operation dropped, a cycle at once.
//! - Unfinished journal entries are resumed (waited on, adopted or re-sent per
//!   [`super::exec`]) before anything new is planned for their guest. This is checked at
//!   every open cycle, not only after a restart: an entry whose resumption could not be
//!   queued (queue full) or that was left open by a lost wait is picked up by the next
//!   cycle, with the same backoff as a failing action.
//! - Settings that are safe to change at run time (desired-state source, shutdown timeout,
//!   the Proxmox client) are swapped by [`EngineHandle::reload`] (the source also by
//!   [`EngineHandle::set_source`]); each queued operation keeps the ones it started with.
//! - The desired state comes from `reconcile.desired_source` ([`source_for`]): the file
//!   (anti-rollback through the journal) or the hub's signed document
//!   ([`crate::ops::desired::HubDesired`]). Config changes made toward a signed desired
//!   state are not gated by the reversibility gate; that gate is for operations.
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
use super::exec::{self, EntryObserver, ExecCtx, ExecError};
use super::journal::{Entry, Journal, JournalError, Outcome, now_ms};
use super::plan::{Action, ActualGuest, Plan, Problem, Skipped, plan};
use super::pve::Pve;
use super::queue::{LaneView, Queue, QueueConfig, QueueStats};
use crate::config::{Config, DesiredSource};
use crate::ops::desired::HubDesired;
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
    #[error("no usable desired state: {0}")]
    DesiredText(String),
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

/// One queued or running action (or another lane operation: `selftest-task`,
/// `create-keyctl`), for `status` and the report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ActionView {
    pub vmid: Vmid,
    /// `start`, `stop`, `set-config`, or the lane operation's label.
    pub action: String,
    /// The journal entry's idempotency key, once its intent is recorded.
    pub op_id: Option<String>,
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
    /// Actions running now (one per busy guest at most).
    pub running: Vec<ActionView>,
    /// Actions waiting in a lane, in run order per guest.
    pub queued: Vec<ActionView>,
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

/// The running operation of a lane the engine queued: its actions and which one runs.
struct Progress {
    actions: Vec<&'static str>,
    current: usize,
    op_id: Option<String>,
}

struct Shared {
    queue: Queue,
    journal: Arc<Journal>,
    pve: Mutex<Arc<dyn Pve>>,
    provider: Mutex<Arc<dyn DesiredProvider>>,
    /// The hub's provider when the source is the hub (the same object as `provider`).
    hub: Mutex<Option<Arc<HubDesired>>>,
    settings: Mutex<EngineSettings>,
    desired: Mutex<Option<Arc<DesiredState>>>,
    observed: Mutex<Observed>,
    failing: Mutex<HashMap<(Vmid, &'static str), Backoff>>,
    progress: Mutex<HashMap<Vmid, Progress>>,
    /// Guests with an engine operation queued or running (those kick a cycle when they
    /// end; other lane operations do not).
    engine_lanes: Mutex<HashSet<Vmid>>,
    /// The gate as fed now (what `status` shows before the first cycle has seen it).
    gate_now: watch::Receiver<Gate>,
    kick: Notify,
    /// Bumped whenever the status may have changed (cycle, operation start or end).
    changes: watch::Sender<u64>,
}

impl Shared {
    fn pve(&self) -> Arc<dyn Pve> {
        lock(&self.pve).clone()
    }
    fn provider(&self) -> Arc<dyn DesiredProvider> {
        lock(&self.provider).clone()
    }
    fn settings(&self) -> EngineSettings {
        lock(&self.settings).clone()
    }
    fn changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// What [`EngineHandle::reload`] swaps; `None` keeps the running value.
#[derive(Default)]
pub struct EngineReload {
    pub provider: Option<Arc<dyn DesiredProvider>>,
    pub pve: Option<Arc<dyn Pve>>,
    pub shutdown_timeout: Option<Duration>,
}

impl std::fmt::Debug for EngineReload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineReload")
            .field("provider", &self.provider)
            .field("pve", &self.pve.is_some())
            .field("shutdown_timeout", &self.shutdown_timeout)
            .finish()
    }
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
    /// `reconcile.desired_source` ([`source_for`], on the same journal). With the hub
    /// source, [`EngineHandle::hub_desired`] reaches the provider; its kept document is
    /// handed to reconcile only after [`HubDesired::reverify`]. The caller holds the
    /// `state_dir` lock ([`crate::control::StateLock`]).
    pub fn spawn_from_config(
        config: &Config,
        pve: Arc<dyn Pve>,
        gate: watch::Receiver<Gate>,
    ) -> Result<EngineHandle, EngineError> {
        let journal = Arc::new(Journal::open(&config.state_dir)?);
        let source = source_for(config, &journal);
        Ok(Engine::spawn_with_source(
            EngineDeps {
                pve,
                journal,
                provider: source.provider.clone(),
                gate,
                settings: EngineSettings::from_config(config),
            },
            source.hub,
        ))
    }

    /// Starts the engine loop and its queue on the current Tokio runtime.
    pub fn spawn(deps: EngineDeps) -> EngineHandle {
        Engine::spawn_with_source(deps, None)
    }

    /// [`Engine::spawn`] with the hub's provider (`deps.provider` must be the same object)
    /// reachable through [`EngineHandle::hub_desired`].
    pub fn spawn_with_source(deps: EngineDeps, hub: Option<Arc<HubDesired>>) -> EngineHandle {
        let (changes, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            queue: Queue::start(deps.settings.queue),
            journal: deps.journal,
            pve: Mutex::new(deps.pve),
            provider: Mutex::new(deps.provider),
            hub: Mutex::new(hub),
            settings: Mutex::new(deps.settings),
            desired: Mutex::new(None),
            observed: Mutex::new(Observed::default()),
            failing: Mutex::new(HashMap::new()),
            progress: Mutex::new(HashMap::new()),
            engine_lanes: Mutex::new(HashSet::new()),
            gate_now: deps.gate.clone(),
            kick: Notify::new(),
            changes,
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

/// The desired-state provider the configuration names, WITHOUT the journal: the file
/// source without its anti-rollback record, and for the hub source the empty provider
/// (the hub's provider lives on the journal). The daemon uses [`source_for`].
pub fn provider_for(config: &Config) -> Arc<dyn DesiredProvider> {
    match (
        config.reconcile.desired_source,
        &config.reconcile.desired_file,
    ) {
        (DesiredSource::File, Some(path)) => Arc::new(FileProvider::new(path)),
        _ => Arc::new(EmptyProvider::default()),
    }
}

/// The desired-state source the configuration names, built on the daemon's journal.
#[derive(Debug, Clone)]
pub struct ConfiguredSource {
    /// What the engine polls.
    pub provider: Arc<dyn DesiredProvider>,
    /// `reconcile.desired_source: "hub"`: the same object as `provider`, for offering it
    /// the hub's documents and verifying it again on reload.
    pub hub: Option<Arc<HubDesired>>,
}

/// `reconcile.desired_source`: `file` with `reconcile.desired_file` (its adopted
/// generation kept in `journal`, so a rollback is refused), `file` without a file (the
/// empty provider), or `hub` ([`HubDesired::open`] on `journal`: nothing kept is handed
/// out before [`HubDesired::reverify`]).
pub fn source_for(config: &Config, journal: &Arc<Journal>) -> ConfiguredSource {
    match (
        config.reconcile.desired_source,
        &config.reconcile.desired_file,
    ) {
        (DesiredSource::Hub, _) => {
            let hub = Arc::new(HubDesired::open(journal.clone()));
            ConfiguredSource {
                provider: hub.clone(),
                hub: Some(hub),
            }
        }
        (DesiredSource::File, Some(path)) => ConfiguredSource {
            provider: Arc::new(FileProvider::with_journal(path, journal.clone())),
            hub: None,
        },
        (DesiredSource::File, None) => ConfiguredSource {
            provider: Arc::new(EmptyProvider::default()),
            hub: None,
        },
    }
}

impl EngineHandle {
    /// The queue: every guest mutation from elsewhere (selftest, operator commands) is
    /// submitted here while the daemon runs.
    pub fn queue(&self) -> &Queue {
        &self.shared.queue
    }

    /// A counter that moves whenever the status may have changed (a cycle ended, an
    /// operation started or finished): the daemon refreshes the report from it.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.shared.changes.subscribe()
    }

    /// Swaps the settings that are safe to change while running (SIGHUP). Operations
    /// already queued keep what they started with; a new provider is read at once.
    pub fn reload(&self, r: EngineReload) {
        let s = &self.shared;
        if let Some(p) = r.provider {
            tracing::info!(source = %p.describe(), "desired-state source changed");
            *lock(&s.provider) = p;
        }
        if let Some(pve) = r.pve {
            *lock(&s.pve) = pve;
        }
        if let Some(t) = r.shutdown_timeout {
            lock(&s.settings).shutdown_timeout = t;
        }
        s.kick.notify_one();
    }

    /// Replaces the desired-state source (SIGHUP with another `reconcile.desired_source`
    /// or `desired_file`; build it with [`source_for`] on [`EngineHandle::journal`]). The
    /// new provider is read at once.
    pub fn set_source(&self, source: ConfiguredSource) {
        *lock(&self.shared.hub) = source.hub;
        self.reload(EngineReload {
            provider: Some(source.provider),
            ..EngineReload::default()
        });
    }

    /// The hub's desired-state provider while it is the source in use (after a reload to
    /// another provider: `None`).
    pub fn hub_desired(&self) -> Option<Arc<HubDesired>> {
        let provider = self.shared.provider();
        lock(&self.shared.hub)
            .clone()
            .filter(|h| std::ptr::addr_eq(Arc::as_ptr(h), Arc::as_ptr(&provider)))
    }

    /// The description of the desired-state source in use (`empty`, `file /path`, `hub`).
    pub fn desired_source(&self) -> String {
        self.shared.provider().describe()
    }

    pub fn journal(&self) -> &Arc<Journal> {
        &self.shared.journal
    }

    /// Whether the active desired state names `vmid` (its power or config is the desired
    /// state's to decide: a signed operation that would change it is refused).
    pub fn manages(&self, vmid: Vmid) -> bool {
        lock(&self.shared.desired)
            .as_ref()
            .is_some_and(|d| d.guests.iter().any(|g| g.vmid == vmid))
    }

    /// Asks for a cycle now.
    pub fn kick(&self) {
        self.shared.kick.notify_one();
    }

    pub fn status(&self) -> EngineStatus {
        let s = &self.shared;
        let o = lock(&s.observed);
        let gate = o.gate.unwrap_or_else(|| *s.gate_now.borrow());
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
        let lanes = s.queue.lanes();
        let (running, queued) = action_views(&lanes, &lock(&s.progress));
        EngineStatus {
            gate,
            blocked: gate != Gate::Open,
            safe_mode: s.journal.safe_mode(),
            desired_source: s.provider().describe(),
            desired_error: o.desired_error.clone(),
            desired_generation: o.desired_generation,
            applied_generation: o.applied_generation,
            queue: s.queue.stats(),
            lanes,
            running,
            queued,
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
            None => {
                // Unusable, or not loaded yet: the engine loads it before its first cycle
                // (polling the provider here would take that change from the engine).
                let mut changes = self.changes();
                let first_cycle = changes.wait_for(|_| lock(&self.shared.observed).cycles > 0);
                let _ = tokio::time::timeout(Duration::from_secs(5), first_cycle).await;
                if let Some(e) = lock(&self.shared.observed).desired_error.clone() {
                    return Err(EngineError::DesiredText(e));
                }
                lock(&self.shared.desired).clone().unwrap_or_default()
            }
        };
        plan_now(self.shared.pve().as_ref(), &desired).await
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

/// Running and queued actions from the lanes and the engine's progress records.
fn action_views(
    lanes: &[LaneView],
    progress: &HashMap<Vmid, Progress>,
) -> (Vec<ActionView>, Vec<ActionView>) {
    let mut running = Vec::new();
    let mut queued = Vec::new();
    let view = |vmid, action: &str, op_id: Option<String>| ActionView {
        vmid,
        action: action.to_string(),
        op_id,
    };
    for lane in lanes {
        if let Some(label) = &lane.running {
            match progress.get(&lane.vmid) {
                Some(p) if p.current < p.actions.len() => {
                    running.push(view(lane.vmid, p.actions[p.current], p.op_id.clone()));
                    for a in &p.actions[p.current + 1..] {
                        queued.push(view(lane.vmid, a, None));
                    }
                }
                _ => running.push(view(lane.vmid, label, None)),
            }
        }
        for label in &lane.queued {
            for part in label.split('+') {
                queued.push(view(lane.vmid, part, None));
            }
        }
    }
    (running, queued)
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
    let mut gate_alive = true;
    let mut last_compact: Option<Instant> = None;
    loop {
        let provider = shared.provider();
        if let Some(new) = provider.poll() {
            let mut o = lock(&shared.observed);
            match new {
                Ok(d) => {
                    tracing::info!(generation = d.generation, guests = d.guests.len(),
                        source = %provider.describe(), "desired state loaded");
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
        let settings = shared.settings();
        if Instant::now() >= next_cycle {
            let g = *gate.borrow_and_update();
            // A cycle waiting on a slow Proxmox must not hold up shutdown; stopping
            // between its awaits loses nothing (what it queued stays queued).
            let follow_up = tokio::select! {
                f = cycle(&shared, g) => f,
                _ = stop.changed() => return,
            };
            shared.changed();
            let resync = Instant::now() + settings.resync_interval;
            next_cycle = follow_up.map_or(resync, |t| t.min(resync));
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
            _ = tokio::time::sleep(settings.poll_interval) => {}
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
    let settings = shared.settings();
    let rows = settings.compact_keep_rows;
    let age = settings.compact_keep_age.as_millis() as i64;
    match tokio::task::spawn_blocking(move || j.compact(rows, age)).await {
        Ok(Ok(n)) if n > 0 => tracing::info!(removed = n, "journal compacted"),
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "journal compaction failed"),
        Err(e) => tracing::error!(error = %e, "journal compaction task failed"),
    }
}

/// One observe-plan-queue pass. Returns when a follow-up cycle is due sooner than the
/// resync: a guest with work was skipped because its lane was busy (an operator command,
/// say, which does not wake the engine when it ends), or a failing action's backoff ends.
async fn cycle(shared: &Arc<Shared>, gate: Gate) -> Option<Instant> {
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
        return None; // no usable desired state: report only
    };
    // Guests busy at any moment of the observation are left for a later cycle.
    let busy_before: HashSet<Vmid> = shared.queue.lanes().iter().map(|l| l.vmid).collect();
    let p = match plan_now(shared.pve().as_ref(), &desired).await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(error = %e, "reconcile cycle could not observe the node");
            lock(&shared.observed).last_cycle_error = Some(e.to_string());
            return None;
        }
    };
    let mut busy: HashSet<Vmid> = shared.queue.lanes().iter().map(|l| l.vmid).collect();
    busy.extend(busy_before);
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
    // Guests no longer drifting are not failing any more (unless an open journal entry
    // of theirs is still being retried: that keeps its own backoff).
    let open_keys = match open_entries(shared).await {
        Ok(open) => open,
        Err(e) => {
            tracing::error!(error = %e, "reading open journal entries failed");
            return None;
        }
    };
    {
        let keep: HashSet<(Vmid, &'static str)> = p
            .actions
            .iter()
            .map(|a| (a.vmid, a.op.name()))
            .chain(open_keys.iter().map(|e| (e.vmid, e.action.op.name())))
            .collect();
        lock(&shared.failing).retain(|k, _| keep.contains(k));
    }
    if gate != Gate::Open || shared.journal.safe_mode().is_some() {
        return None; // no mutation while blocked or in safe mode
    }
    let poll = shared.settings().poll_interval;
    let mut follow_up: Option<Instant> = None;
    let mut due = |t: Instant| follow_up = Some(follow_up.map_or(t, |f| f.min(t)));
    // Unfinished entries first: their guests get nothing new this cycle.
    if let Some(t) = resume_open(shared, open_keys, &mut busy) {
        due(t);
    }
    let mut per_guest: BTreeMap<Vmid, Vec<Action>> = BTreeMap::new();
    for a in p.actions {
        per_guest.entry(a.vmid).or_default().push(a);
    }
    let now = Instant::now();
    for (vmid, actions) in per_guest {
        if busy.contains(&vmid) {
            if !lock(&shared.engine_lanes).contains(&vmid) {
                // an operator command holds the lane; it does not wake us when it ends
                due(now + poll);
            }
            continue;
        }
        let retry_at = {
            let f = lock(&shared.failing);
            actions
                .iter()
                .filter_map(|a| f.get(&(vmid, a.op.name())).map(|b| b.retry_at))
                .filter(|t| *t > now)
                .max()
        };
        if let Some(t) = retry_at {
            due(t);
            continue;
        }
        let names: Vec<&'static str> = actions.iter().map(|a| a.op.name()).collect();
        let label = names.join("+");
        let sh = shared.clone();
        let submitted = shared.queue.submit(vmid, label, move |permit| {
            Box::pin(async move {
                start_progress(&sh, vmid, names);
                let ctx = exec_ctx(&sh, vmid);
                // The plan came from a read taken before this operation got its lane.
                if let Some(first) = actions.first() {
                    match exec::basis_holds(&ctx, first).await {
                        Ok(true) => {}
                        Ok(false) => {
                            tracing::info!(vmid = %vmid, "guest changed since it was planned; planning again");
                            end_progress(&sh, vmid);
                            return;
                        }
                        Err(e) => {
                            tracing::warn!(vmid = %vmid, error = %e, "guest not readable before acting; planning again");
                            end_progress(&sh, vmid);
                            return;
                        }
                    }
                }
                for (i, action) in actions.into_iter().enumerate() {
                    step_progress(&sh, vmid, i);
                    let name = action.op.name();
                    let result = exec::run(&ctx, permit, action).await;
                    if !note_result(&sh, vmid, name, &result) {
                        break;
                    }
                }
                end_progress(&sh, vmid);
            })
        });
        match submitted {
            Ok(_) => {
                lock(&shared.engine_lanes).insert(vmid);
            }
            Err(e) => {
                tracing::warn!(error = %e, "not queued this cycle");
                due(now + poll);
                break;
            }
        }
    }
    follow_up
}

fn start_progress(shared: &Shared, vmid: Vmid, actions: Vec<&'static str>) {
    lock(&shared.progress).insert(
        vmid,
        Progress {
            actions,
            current: 0,
            op_id: None,
        },
    );
    shared.changed();
}

fn step_progress(shared: &Shared, vmid: Vmid, current: usize) {
    if let Some(p) = lock(&shared.progress).get_mut(&vmid) {
        p.current = current;
        p.op_id = None;
    }
    shared.changed();
}

/// The operation is over: forget its progress and ask for a cycle.
fn end_progress(shared: &Shared, vmid: Vmid) {
    lock(&shared.progress).remove(&vmid);
    lock(&shared.engine_lanes).remove(&vmid);
    shared.changed();
    shared.kick.notify_one();
}

fn exec_ctx(shared: &Arc<Shared>, vmid: Vmid) -> ExecCtx {
    let settings = shared.settings();
    let weak = Arc::downgrade(shared);
    let observer: EntryObserver = Arc::new(move |entry| {
        if let Some(sh) = weak.upgrade() {
            if let Some(p) = lock(&sh.progress).get_mut(&vmid) {
                p.op_id = Some(entry.key.as_str().to_string());
            }
            sh.changed();
        }
    });
    ExecCtx {
        pve: shared.pve(),
        journal: shared.journal.clone(),
        shutdown_timeout: settings.shutdown_timeout,
        task_timeout: settings.task_timeout,
        observer: Some(observer),
    }
}

/// Records an action's result in the backoff table; true when it succeeded (the
/// operation goes on with its next action). A write refused because the guest changed
/// since it was planned is no failure: no backoff, no `failing` entry; the operation stops
/// (its other actions were planned from the same stale read) and ending it asks for a
/// cycle, which plans again from a fresh read.
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
        Ok(Outcome::Stale { .. }) => {
            tracing::info!(vmid = %vmid, action, "guest changed before the write; planning again from a fresh read");
            return false;
        }
        Ok(Outcome::Failed { error }) => error.clone(),
        Ok(_) => String::new(),
        Err(e) => e.to_string(),
    };
    let settings = shared.settings();
    let mut f = lock(&shared.failing);
    let b = f.entry((vmid, action)).or_insert(Backoff {
        attempts: 0,
        last_error: String::new(),
        retry_at: Instant::now(),
        retry_at_ms: 0,
    });
    b.attempts += 1;
    let exp = b.attempts.saturating_sub(1).min(16);
    let delay = settings
        .backoff_base
        .saturating_mul(1u32 << exp)
        .min(settings.backoff_max);
    b.retry_at = Instant::now() + delay;
    b.retry_at_ms = now_ms() + delay.as_millis() as i64;
    b.last_error = error.clone();
    tracing::warn!(vmid = %vmid, action, attempts = b.attempts, retry_in = ?delay, %error, "action failed");
    false
}

async fn open_entries(shared: &Shared) -> Result<Vec<Entry>, JournalError> {
    let j = shared.journal.clone();
    tokio::task::spawn_blocking(move || j.open_entries())
        .await
        .unwrap_or_else(|e| Err(JournalError::SafeMode(format!("journal worker: {e}"))))
}

/// Queues the resumption of the open journal entries of every guest whose lane is idle.
/// Every guest with an open entry is added to `busy`, queued or not (queue full, backing
/// off), so nothing new is planned for it before its entry is finished; one that could not
/// be queued is tried again next cycle.
fn resume_open(
    shared: &Arc<Shared>,
    open: Vec<Entry>,
    busy: &mut HashSet<Vmid>,
) -> Option<Instant> {
    let mut per_guest: BTreeMap<Vmid, Vec<Entry>> = BTreeMap::new();
    for e in open {
        per_guest.entry(e.vmid).or_default().push(e);
    }
    let now = Instant::now();
    let poll = shared.settings().poll_interval;
    let mut follow_up: Option<Instant> = None;
    let mut full = false;
    for (vmid, entries) in per_guest {
        let engine_owned = lock(&shared.engine_lanes).contains(&vmid);
        if !busy.insert(vmid) || full {
            // its lane is busy (maybe resuming it already), or no room left
            if full || !engine_owned {
                follow_up = Some(follow_up.map_or(now + poll, |f| f.min(now + poll)));
            }
            continue;
        }
        let retry_at = {
            let f = lock(&shared.failing);
            entries
                .iter()
                .filter_map(|e| f.get(&(vmid, e.action.op.name())).map(|b| b.retry_at))
                .filter(|t| *t > now)
                .max()
        };
        if let Some(t) = retry_at {
            follow_up = Some(follow_up.map_or(t, |f| f.min(t)));
            continue;
        }
        let names: Vec<&'static str> = entries.iter().map(|e| e.action.op.name()).collect();
        let sh = shared.clone();
        let n = entries.len();
        let submitted = shared.queue.submit(vmid, "resume", move |permit| {
            Box::pin(async move {
                start_progress(&sh, vmid, names);
                let ctx = exec_ctx(&sh, vmid);
                for (i, entry) in entries.into_iter().enumerate() {
                    step_progress(&sh, vmid, i);
                    let name = entry.action.op.name();
                    let result = exec::resume(&ctx, permit, entry).await;
                    if !note_result(&sh, vmid, name, &result) {
                        break;
                    }
                }
                end_progress(&sh, vmid);
            })
        });
        match submitted {
            Ok(_) => {
                lock(&shared.engine_lanes).insert(vmid);
                tracing::info!(vmid = %vmid, entries = n, "resuming unfinished journal entries")
            }
            Err(e) => {
                tracing::warn!(error = %e, "resume not queued; tried again next cycle");
                follow_up = Some(follow_up.map_or(now + poll, |f| f.min(now + poll)));
                full = true;
            }
        }
    }
    follow_up
}

#[cfg(test)]
mod tests;
