//! `felhom-agent run`: the daemon. Also the CLI side of `selftest --hub`.
//!
//! Start order: the `state_dir` lock first (a second daemon stops there, before it could
//! report or mutate), then the hub heartbeat ([`crate::hub::service::HubService`]), then
//! the reconcile engine and the control socket ([`crate::control::DaemonParts`]); then it
//! tells systemd it is ready and pings the watchdog when `WATCHDOG_USEC` is set.
//!
//! Wiring:
//! - The engine's mutation gate follows the hub: hub disabled → open; enabled and no
//!   envelope yet (none from this run, none kept in `state_dir`) → awaiting the envelope;
//!   otherwise the envelope's `blocked`. The kept envelope is loaded before the engine's
//!   first cycle, so a `blocked: true` holds right after a restart even if the hub is
//!   unreachable. The hub loop logs changes of `blocked`, `desired_generation` and
//!   `has_signed_ops`; the gate logs its own changes.
//! - The report's `reconcile` section is refreshed from the engine's status whenever it
//!   changes (each cycle, each operation start and end).
//! - `selftest --task` and `privileged create-keyctl` reach the daemon over the control
//!   socket and run on its queue ([`super::mutations`]).
//!
//! - Signed operations (issue 12, not run yet): the `agent_id` is read, or created once,
//!   before anything else starts (a corrupt `state_dir/agent-id` stops the start, exit 2);
//!   the signers file is loaded and its state logged (`signed operations: …`). A malformed
//!   file stops the start (exit 2); at SIGHUP it is re-read, and a malformed one then turns
//!   signed operations off (logged as an error) rather than keep a trust the file no
//!   longer states.
//!
//! Signals: SIGTERM/SIGINT stop it: reporting stops (the report in flight gets a short
//! grace), queued actions are cancelled and running ones get [`DRAIN_GRACE`] to finish
//! (an action cut off stays open in the journal and is resumed at the next start), then
//! exit 0. SIGHUP reloads the configuration without a restart: the hub settings (a rotated
//! token, say), the Proxmox client, the helper client, the desired-state file and the
//! guest shutdown timeout; `state_dir` and `control.socket` need a restart (logged). A
//! configuration that fails to load or build keeps the running one.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use super::mutations::DaemonMutations;
use super::{Cli, CliError};
use crate::config::{Config, HubMode};
use crate::control::{ControlError, DaemonOptions, DaemonParts, SignedOpsView, StateLock};
use crate::hub::client::HubClientError;
use crate::hub::envelope::{EnvelopeStore, SavedEnvelope};
use crate::hub::service::{HubService, HubServiceError, notify, selftest_exchange};
use crate::ops::channel::{Channel, ChannelDeps};
use crate::ops::exec::ExecEnv;
use crate::ops::identity;
use crate::ops::service::{OpsDeps, OpsService};
use crate::ops::trust::{TrustState, agent_uid, load_trust};
use crate::ops::{AgentId, IdentitySource};
use crate::reconcile::engine::{EngineReload, source_for};
use crate::reconcile::status::ReconcileReport;
use crate::reconcile::{EngineHandle, Gate};

/// How long running reconcile actions may still finish after SIGTERM (systemd's default
/// stop timeout is 90 s).
pub const DRAIN_GRACE: Duration = Duration::from_secs(30);

pub fn run(cli: &Cli) -> Result<(), CliError> {
    let cfg = load(cli.config.as_deref())?;
    // The daemon writes its state (envelope, audit cursor, journal) there.
    crate::config::ensure_state_dir_owner(&cfg.state_dir, "felhom-agent run")
        .map_err(|e| CliError::Usage(e.to_string()))?;
    let (agent_id, source) = identity::load_or_create(cfg.agent_id.as_ref(), &cfg.state_dir)
        .map_err(|e| CliError::Usage(e.to_string()))?;
    tracing::info!(agent_id = %agent_id, source = source.as_str(), "agent identity");
    // `status` says `file` for an id this start created: that is where it lives now.
    let source = match source {
        IdentitySource::Created => IdentitySource::File,
        other => other,
    };
    let trust = load_trust(&cfg.authz.signers_file, agent_uid(&cfg.state_dir))
        .map_err(|e| CliError::Usage(e.to_string()))?;
    log_trust(&trust);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| CliError::Problem(format!("cannot start the async runtime: {e}")))?;
    runtime.block_on(daemon(cli.config.clone(), cfg, (agent_id, source), trust))
}

/// Logs the signed-operations state: at start, and after each SIGHUP.
fn log_trust(state: &TrustState) {
    match state {
        TrustState::Enabled { .. } | TrustState::Disabled { .. } => {
            tracing::info!("signed operations: {}", state.describe())
        }
        TrustState::Untrusted { .. } => tracing::warn!("signed operations: {}", state.describe()),
    }
}

/// The signers file again (SIGHUP). A malformed file turns operations off: the running
/// trust is never kept once the file says something else.
fn reload_trust(cfg: &Config, running: &watch::Sender<TrustState>) {
    let loaded = load_trust(&cfg.authz.signers_file, agent_uid(&cfg.state_dir));
    let state = match &loaded {
        Ok(state) => state.clone(),
        Err(_) => TrustState::Disabled {
            path: cfg.authz.signers_file.clone(),
        },
    };
    // In force before it is logged: whoever reads the log line sees it in `status`.
    running.send_replace(state);
    match loaded {
        Ok(state) => log_trust(&state),
        Err(e) => {
            tracing::error!(error = %e, "signed operations: disabled until the signers file is fixed")
        }
    }
}

fn load(path: Option<&std::path::Path>) -> Result<Config, CliError> {
    let loaded = Config::load(path).map_err(|e| CliError::Usage(e.to_string()))?;
    for w in &loaded.warnings {
        tracing::warn!("{w}");
    }
    Ok(loaded.config)
}

async fn daemon(
    config_path: Option<PathBuf>,
    cfg: Config,
    (agent_id, agent_id_source): (AgentId, IdentitySource),
    trust: TrustState,
) -> Result<(), CliError> {
    let sig = |kind: SignalKind, name: &str| {
        signal(kind).map_err(|e| CliError::Problem(format!("cannot handle {name}: {e}")))
    };
    let mut sigterm = sig(SignalKind::terminate(), "SIGTERM")?;
    let mut sigint = sig(SignalKind::interrupt(), "SIGINT")?;
    let mut sighup = sig(SignalKind::hangup(), "SIGHUP")?;

    let lock = StateLock::acquire(&cfg.state_dir).map_err(|e| match e {
        ControlError::Locked { .. } => CliError::Problem(e.to_string()),
        other => CliError::Usage(other.to_string()),
    })?;
    let proxmox = crate::proxmox::Client::from_config(&cfg)
        .map_err(|e| CliError::Usage(format!("proxmox: {e}")))?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);

    // The engine starts before the hub, so the first report already carries its state.
    // Its gate starts from the envelope kept in state_dir (the hub loop loads the same
    // one) and then follows the hub's envelopes.
    let kept = match EnvelopeStore::new(&cfg.state_dir).load() {
        Ok(kept) => kept,
        Err(e) => {
            tracing::warn!(error = %e, "ignoring the saved hub envelope");
            None
        }
    };
    let (hub_on_tx, hub_on_rx) = watch::channel(hub_enabled(&cfg));
    let initial = gate_for(*hub_on_rx.borrow(), kept.as_ref());
    tracing::info!(gate = ?initial, "reconcile gate at start");
    let (gate_tx, gate_rx) = watch::channel(initial);
    let (envelope_tx, envelope_rx) = watch::channel(kept);
    // The current trust: `status` shows it; the operations channel (a later change) reads it.
    let (trust_tx, trust_rx) = watch::channel(trust);

    let mutations = Arc::new(DaemonMutations::new(proxmox.clone(), &cfg));
    let ops_slot = Arc::new(std::sync::OnceLock::new());
    let restore_slot = Arc::new(std::sync::OnceLock::new());
    let parts = DaemonParts::start(
        lock,
        &cfg,
        Arc::new(proxmox.clone()),
        gate_rx,
        DaemonOptions {
            envelope: Some(envelope_rx),
            mutations: Some(mutations.clone()),
            signed_ops: Some(SignedOpsView {
                agent_id: agent_id.clone(),
                agent_id_source,
                trust: trust_rx.clone(),
                service: ops_slot.clone(),
            }),
            restore: restore_slot.clone(),
        },
    )
    .map_err(|e| CliError::Usage(e.to_string()))?;
    // Signed operations run on the engine's queue and journal, behind the same gate.
    let ops = OpsService::start(OpsDeps {
        journal: parts.engine.journal().clone(),
        agent_id: agent_id.clone(),
        node: cfg.node.clone(),
        trust: trust_rx,
        gate: gate_tx.subscribe(),
        engine: parts.engine.clone(),
        env: exec_env(&cfg, proxmox.clone(), parts.engine.journal().clone()),
        scratch_vmids: cfg.scratch_vmids.clone(),
    });
    let _ = ops_slot.set(ops.clone());
    // Restore tests run on the same queue and journal, behind the same gate, yielding to
    // reconcile and signed operations (a running test holds only scratch lanes).
    let restore_schedule = crate::restore::RestoreTests::from_config(
        &cfg,
        proxmox.clone(),
        parts.engine.queue().clone(),
        parts.engine.journal().clone(),
        gate_tx.subscribe(),
    )
    .map(|tests| {
        let tests = Arc::new(tests);
        let _ = restore_slot.set(tests.clone());
        let queue = parts.engine.queue().clone();
        let busy = move || {
            let s = queue.stats();
            s.running > 0 || s.queued > 0
        };
        crate::restore::schedule::spawn(tests, busy, shutdown_rx.clone())
    });
    let (reconcile_tx, reconcile_rx) = watch::channel(Some(parts.engine.status().report()));
    let publisher = tokio::spawn(publish_reconcile(
        parts.engine.clone(),
        reconcile_tx,
        shutdown_rx.clone(),
    ));

    let hub = HubService::start(
        &cfg,
        agent_id.clone(),
        trust_tx.subscribe(),
        reconcile_rx,
        Some(ops.clone() as Arc<dyn crate::ops::OpsFeed>),
        Some(parts.engine.journal().clone()),
        shutdown_rx.clone(),
    )
    .map_err(|e| CliError::Usage(e.to_string()))?;
    // The kept signed desired state, verified against this start's trust before the engine
    // follows it.
    reverify_desired(
        &parts.engine,
        &ops,
        &trust_tx.borrow(),
        &agent_id,
        &cfg.node,
    )
    .await;
    let channel = Channel::start(
        &cfg,
        ChannelDeps {
            ops: ops.clone(),
            envelopes: hub.envelopes(),
            trust: trust_tx.subscribe(),
            desired: parts.engine.hub_desired(),
            agent_id: agent_id.clone(),
            node: cfg.node.clone(),
            shutdown: shutdown_rx.clone(),
        },
    );
    let gate_task = tokio::spawn(follow_hub(
        hub.envelopes(),
        hub_on_rx,
        gate_tx,
        envelope_tx,
        shutdown_rx.clone(),
    ));

    let watchdog = notify::watchdog_period().map(|period| {
        let mut shutdown = shutdown_rx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tokio::select! {
                    _ = tick.tick() => notify::watchdog(),
                    _ = shutdown.wait_for(|s| *s) => break,
                }
            }
        })
    });
    notify::ready();
    tracing::info!(node = %cfg.node, agent_id = %agent_id, version = env!("CARGO_PKG_VERSION"),
        socket = %cfg.control.socket.display(), "felhom-agent running");

    let mut running = cfg;
    loop {
        tokio::select! {
            _ = sigterm.recv() => { tracing::info!("SIGTERM: stopping"); break; }
            _ = sigint.recv() => { tracing::info!("SIGINT: stopping"); break; }
            _ = sighup.recv() => {
                notify::reloading();
                let daemon = Reloadable { hub: &hub, engine: &parts.engine, mutations: &mutations, hub_on: &hub_on_tx, ops: &ops };
                match reload(config_path.as_deref(), &daemon, &running).await {
                    Ok(new) => {
                        if new.agent_id.is_some() && new.agent_id.as_ref() != Some(&agent_id) {
                            tracing::warn!(running = %agent_id, "agent_id changed in the configuration: takes effect at the next restart");
                        }
                        running = new;
                        tracing::info!("SIGHUP: configuration reloaded");
                    }
                    Err(e) => tracing::error!(error = %e, "SIGHUP: reload failed; keeping the running configuration"),
                }
                // Re-read even when the rest of the configuration failed to reload: a key
                // removed from the signers file must stop counting now.
                reload_trust(&running, &trust_tx);
                channel.reload(&running);
                reverify_desired(&parts.engine, &ops, &trust_tx.borrow(), &agent_id, &running.node).await;
                notify::ready();
            }
        }
    }
    notify::stopping();
    let _ = shutdown_tx.send(true);
    // Reporting stops and the queue drains at the same time.
    tokio::join!(hub.join(), parts.shutdown(DRAIN_GRACE));
    let _ = publisher.await;
    ops.stop();
    channel.stop();
    gate_task.abort();
    if let Some(r) = restore_schedule {
        r.abort();
    }
    if let Some(w) = watchdog {
        w.abort();
    }
    tracing::info!("stopped");
    Ok(())
}

fn hub_enabled(cfg: &Config) -> bool {
    matches!(cfg.hub.mode, HubMode::Enabled { .. })
}

/// The mutation gate for the hub's state: disabled → open; no envelope yet (none kept
/// either) → awaiting it; else what the envelope says.
pub fn gate_for(hub_enabled: bool, envelope: Option<&SavedEnvelope>) -> Gate {
    match (hub_enabled, envelope) {
        (false, _) => Gate::Open,
        (true, None) => Gate::AwaitingEnvelope,
        (true, Some(saved)) => Gate::from_blocked(saved.envelope.blocked),
    }
}

/// Feeds the gate from the hub's envelopes and the hub's on/off state (SIGHUP), and
/// hands each envelope on to `status`.
async fn follow_hub(
    mut envelopes: watch::Receiver<Option<SavedEnvelope>>,
    mut hub_on: watch::Receiver<bool>,
    gate: watch::Sender<Gate>,
    last_envelope: watch::Sender<Option<SavedEnvelope>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut first = true;
    loop {
        if !first {
            tokio::select! {
                r = envelopes.changed() => if r.is_err() { return },
                r = hub_on.changed() => if r.is_err() { return },
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
        first = false;
        let enabled = *hub_on.borrow_and_update();
        let envelope = envelopes.borrow_and_update().clone();
        let g = gate_for(enabled, envelope.as_ref());
        last_envelope.send_replace(envelope);
        gate.send_if_modified(|current| {
            if *current == g {
                return false;
            }
            tracing::info!(from = ?*current, to = ?g, hub_enabled = enabled, "reconcile gate changed");
            *current = g;
            true
        });
    }
}

/// Keeps the report's `reconcile` section equal to the engine's status.
async fn publish_reconcile(
    engine: Arc<EngineHandle>,
    tx: watch::Sender<Option<ReconcileReport>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut changes = engine.changes();
    loop {
        let report = engine.status().report();
        tx.send_if_modified(|current| {
            if current.as_ref() == Some(&report) {
                return false;
            }
            *current = Some(report);
            true
        });
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

/// Verifies the kept signed desired state (hub source) against the current trust: at start
/// and after every SIGHUP. A document that no longer verifies stops being followed and the
/// refusal goes to the hub.
async fn reverify_desired(
    engine: &EngineHandle,
    ops: &Arc<OpsService>,
    trust: &TrustState,
    agent_id: &AgentId,
    node: &str,
) {
    let Some(hub) = engine.hub_desired() else {
        return;
    };
    let trust = trust.clone();
    let ctx = felhom_authz::Context {
        agent_id: agent_id.clone(),
        node: node.to_string(),
        now: crate::ops::service::unix_now(),
        scratch_vmids: None,
    };
    let o = ops.clone();
    let _ = tokio::task::spawn_blocking(move || {
        if let Some(decision) = hub.reverify(trust.trust(), &ctx)
            && !decision.unchanged
            && let Err(e) = o.add_result(|seq| decision.to_result(seq))
        {
            tracing::error!(error = %e, "could not record the desired state's refusal");
        }
    })
    .await;
    engine.kick();
}

/// What signed operations run with: the daemon's clients and journal, the guest shutdown
/// timeout.
fn exec_env(
    cfg: &Config,
    proxmox: crate::proxmox::Client,
    journal: Arc<crate::reconcile::journal::Journal>,
) -> ExecEnv {
    ExecEnv {
        pve: proxmox,
        privileged: crate::privileged::Client::new(&cfg.privhelper),
        journal,
        shutdown_timeout: Duration::from_secs(cfg.reconcile.shutdown_timeout_seconds),
        task_timeout: Duration::from_secs(600),
        backup_storage: cfg.gate.backup_storage.clone(),
        health_timeout: Duration::from_secs(cfg.gate.health_timeout_seconds),
    }
}

/// What SIGHUP reaches.
struct Reloadable<'a> {
    hub: &'a HubService,
    engine: &'a EngineHandle,
    mutations: &'a DaemonMutations,
    hub_on: &'a watch::Sender<bool>,
    ops: &'a OpsService,
}

/// Loads the configuration again and applies what is safe to change at run time. Nothing
/// changes unless the new configuration loads and every client for it can be built.
async fn reload(
    path: Option<&std::path::Path>,
    d: &Reloadable<'_>,
    running: &Config,
) -> Result<Config, String> {
    let loaded = Config::load(path).map_err(|e| e.to_string())?;
    for w in &loaded.warnings {
        tracing::warn!("{w}");
    }
    let new = loaded.config;
    let proxmox = crate::proxmox::Client::from_config(&new).map_err(|e| format!("proxmox: {e}"))?;
    d.hub.reload(&new).await.map_err(|e| e.to_string())?;
    // A reloaded hub setting (a new token, a new hub) is tried at once, not after the
    // backoff of the old one's failures.
    if hub_enabled(&new) {
        let _ = d.hub.report_now().await;
    }
    d.hub_on.send_replace(hub_enabled(&new));
    if new.reconcile.desired_file != running.reconcile.desired_file
        || new.reconcile.desired_source != running.reconcile.desired_source
    {
        d.engine.set_source(source_for(&new, d.engine.journal()));
    }
    d.engine.reload(EngineReload {
        provider: None,
        pve: Some(Arc::new(proxmox.clone())),
        shutdown_timeout: Some(Duration::from_secs(new.reconcile.shutdown_timeout_seconds)),
    });
    d.ops
        .reload(exec_env(&new, proxmox.clone(), d.engine.journal().clone()));
    d.mutations.reload(proxmox, &new);
    if new.state_dir != running.state_dir {
        tracing::warn!(running = %running.state_dir.display(), configured = %new.state_dir.display(),
            "state_dir changed: takes effect at the next restart");
    }
    if new.control.socket != running.control.socket {
        tracing::warn!(running = %running.control.socket.display(), configured = %new.control.socket.display(),
            "control.socket changed: takes effect at the next restart");
    }
    Ok(new)
}

/// `selftest --hub`: one collect + report; prints the envelope (JSON with `--json`).
pub fn selftest_hub(cli: &Cli) -> Result<(), CliError> {
    let cfg = load(cli.config.as_deref())?;
    // A report carries the agent_id; before the daemon's first start this creates it.
    let (agent_id, _) = identity::load_or_create(cfg.agent_id.as_ref(), &cfg.state_dir)
        .map_err(|e| CliError::Usage(e.to_string()))?;
    let trust = load_trust(&cfg.authz.signers_file, agent_uid(&cfg.state_dir))
        .map_err(|e| CliError::Usage(e.to_string()))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Problem(format!("cannot start the async runtime: {e}")))?;
    let envelope = runtime
        .block_on(selftest_exchange(&cfg, agent_id, trust))
        .map_err(|e| match &e {
            HubServiceError::Disabled => CliError::Usage(e.to_string()),
            HubServiceError::Client(HubClientError::Setup(_) | HubClientError::Tls(_)) => {
                CliError::Usage(e.to_string())
            }
            HubServiceError::Client(HubClientError::Http(h))
                if h.status == 401 || h.status == 403 =>
            {
                CliError::Usage(format!("{e} (check hub.token)"))
            }
            HubServiceError::Client(HubClientError::Envelope(_)) => {
                CliError::Problem(e.to_string())
            }
            HubServiceError::Client(_) | HubServiceError::Stopped => {
                CliError::Unreachable(e.to_string())
            }
        })?;
    if cli.json {
        let text = serde_json::to_string_pretty(&envelope)
            .map_err(|e| CliError::Problem(e.to_string()))?;
        println!("{text}");
    } else {
        let floor = crate::hub::envelope::poll_floor(cfg.hub.test_min_poll_interval_seconds);
        println!("hub accepted the report");
        println!(
            "  poll_interval_seconds: {} (next report in {} s)",
            envelope
                .poll_interval_seconds
                .map_or_else(|| "default".to_owned(), |s| s.to_string()),
            envelope.poll_interval(floor).as_secs()
        );
        println!("  blocked:               {}", envelope.blocked);
        println!("  desired_generation:    {}", envelope.desired_generation);
        println!("  has_signed_ops:        {}", envelope.has_signed_ops);
    }
    Ok(())
}
