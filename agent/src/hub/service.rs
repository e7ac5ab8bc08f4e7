//! The hub side of the daemon: builds the heartbeat from the configuration, reloads it on
//! SIGHUP, and the systemd notifications (`READY=1`, `RELOADING=1`, `STOPPING=1`, watchdog).
//! Also the one-shot `selftest --hub` exchange.
//!
//! The daemon (`felhom-agent run`) starts [`HubService`] and hands
//! [`HubService::envelopes`] to the reconcile engine; the engine's state comes back through
//! the `watch` channel given to [`HubService::start`] and goes into every report.
//!
//! Must never: start reporting with a configuration that failed validation (the old one
//! stays on a failed reload), or log the token.

use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::client::{DEFAULT_TIMEOUT, HubClient, HubClientError, HubEndpoint};
use super::collector::HostCollector;
use super::envelope::{ControlEnvelope, EnvelopeStore, SavedEnvelope, poll_floor};
use super::heartbeat::{Command, Heartbeat, SHUTDOWN_GRACE, Stats};
use super::report::ReconcileReport;
use crate::config::{Config, HubMode};
use std::sync::Arc;

use crate::ops::{AgentId, OpsFeed, TrustState};

/// Request deadline when the test bed lowered the poll floor (so a hanging hub costs a
/// test seconds, not half a minute).
pub const TEST_BED_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors setting up or talking to the hub outside the loop.
#[derive(Debug, thiserror::Error)]
pub enum HubServiceError {
    #[error("hub reporting is disabled (hub.mode = disabled); set hub.url and a token")]
    Disabled,
    #[error(transparent)]
    Client(#[from] HubClientError),
    #[error("the hub loop is not running")]
    Stopped,
}

/// The hub client for `cfg`; `None` when reporting is disabled.
pub fn reporter_for(cfg: &Config) -> Result<Option<HubClient>, HubClientError> {
    match &cfg.hub.mode {
        HubMode::Disabled => Ok(None),
        HubMode::Enabled { url, token, tls } => HubClient::new(&HubEndpoint {
            url: url.clone(),
            token: token.clone(),
            tls: tls.clone(),
            timeout: if cfg.hub.test_min_poll_interval_seconds.is_some() {
                TEST_BED_TIMEOUT
            } else {
                DEFAULT_TIMEOUT
            },
        })
        .map(Some),
    }
}

/// The running heartbeat.
#[derive(Debug)]
pub struct HubService {
    commands: mpsc::Sender<Command<HostCollector, HubClient>>,
    envelopes: watch::Receiver<Option<SavedEnvelope>>,
    stats: watch::Receiver<Stats>,
    reconcile: watch::Receiver<Option<ReconcileReport>>,
    /// Fixed for the daemon's lifetime (a reload never changes the identity).
    agent_id: AgentId,
    /// The daemon's trust (SIGHUP reloads it), for the report's `ops`.
    trust: watch::Receiver<TrustState>,
    /// Held operations and pending results, for the report's `ops`.
    ops: Option<Arc<dyn OpsFeed>>,
    /// The journal of the restore tests and the gate's undo points, for `restore_tests`,
    /// `restore_proof` and `ops.undo_points`.
    restore: Option<Arc<crate::reconcile::journal::Journal>>,
    task: JoinHandle<()>,
}

impl HubService {
    /// Starts the heartbeat for `cfg` (no reports when the hub is disabled). Fails when
    /// the hub client cannot be built (e.g. an unreadable `hub.ca_file`).
    pub fn start(
        cfg: &Config,
        agent_id: AgentId,
        trust: watch::Receiver<TrustState>,
        reconcile: watch::Receiver<Option<ReconcileReport>>,
        ops: Option<Arc<dyn OpsFeed>>,
        restore: Option<Arc<crate::reconcile::journal::Journal>>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<HubService, HubServiceError> {
        let reporter = reporter_for(cfg)?;
        match &reporter {
            Some(r) => tracing::info!(url = %r.report_url(), "hub reporting enabled"),
            None => tracing::info!("hub reporting disabled (hub.mode = disabled)"),
        }
        if let Some(s) = cfg.hub.test_min_poll_interval_seconds {
            tracing::warn!(
                seconds = s,
                "hub.test_min_poll_interval_seconds is set: the poll-interval floor is lowered for the test bed; not for production"
            );
        }
        let mut collector = HostCollector::for_daemon(cfg, agent_id.clone())
            .with_reconcile(reconcile.clone())
            .with_trust(trust.clone());
        if let Some(feed) = &ops {
            collector = collector.with_ops_feed(feed.clone());
        }
        if let Some(j) = &restore {
            collector = collector
                .with_restore_journal(j.clone())
                .with_undo_journal(j.clone());
        }
        let heartbeat = Heartbeat::new(
            collector,
            reporter,
            poll_floor(cfg.hub.test_min_poll_interval_seconds),
            Some(EnvelopeStore::new(&cfg.state_dir)),
        );
        let envelopes = heartbeat.subscribe();
        let stats = heartbeat.stats();
        let (commands, rx) = mpsc::channel(4);
        let task = tokio::spawn(heartbeat.run(rx, shutdown));
        Ok(HubService {
            commands,
            envelopes,
            stats,
            reconcile,
            agent_id,
            trust,
            ops,
            restore,
            task,
        })
    }

    /// The last envelope from the hub (or saved from before the restart): the reconcile
    /// engine's input for `blocked`, `desired_generation` and `has_signed_ops`.
    pub fn envelopes(&self) -> watch::Receiver<Option<SavedEnvelope>> {
        self.envelopes.clone()
    }

    pub fn stats(&self) -> watch::Receiver<Stats> {
        self.stats.clone()
    }

    /// Applies a reloaded configuration between cycles. On error the running one stays.
    pub async fn reload(&self, cfg: &Config) -> Result<(), HubServiceError> {
        let reporter = reporter_for(cfg)?;
        let mut collector = HostCollector::for_daemon(cfg, self.agent_id.clone())
            .with_reconcile(self.reconcile.clone())
            .with_trust(self.trust.clone());
        if let Some(feed) = &self.ops {
            collector = collector.with_ops_feed(feed.clone());
        }
        if let Some(j) = &self.restore {
            collector = collector
                .with_restore_journal(j.clone())
                .with_undo_journal(j.clone());
        }
        self.commands
            .send(Command::Reload {
                collector,
                reporter,
                floor: poll_floor(cfg.hub.test_min_poll_interval_seconds),
            })
            .await
            .map_err(|_| HubServiceError::Stopped)
    }

    /// Asks for a report now.
    pub async fn report_now(&self) -> Result<(), HubServiceError> {
        self.commands
            .send(Command::ReportNow)
            .await
            .map_err(|_| HubServiceError::Stopped)
    }

    /// Waits for the loop to end after shutdown (at most the grace plus a second).
    pub async fn join(self) {
        let mut task = self.task;
        if tokio::time::timeout(SHUTDOWN_GRACE + Duration::from_secs(1), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
}

/// `selftest --hub`: collect once, send one report, return the hub's envelope. The audit
/// list is sent empty so the daemon's cursor (and its "each record once" rule) is not
/// touched.
pub async fn selftest_exchange(
    cfg: &Config,
    agent_id: AgentId,
    trust: TrustState,
) -> Result<ControlEnvelope, HubServiceError> {
    let Some(client) = reporter_for(cfg)? else {
        return Err(HubServiceError::Disabled);
    };
    let mut collector =
        HostCollector::for_daemon(cfg, agent_id).with_trust(watch::channel(trust).1);
    let mut report = collector.collect_report().await;
    report.audit.clear();
    report.sent_at = super::report::Timestamp::now();
    Ok(client.post_report(&report).await?)
}

/// systemd notifications; all are no-ops outside systemd (`NOTIFY_SOCKET` unset).
pub mod notify {
    use std::time::Duration;

    fn send(states: &[sd_notify::NotifyState<'_>]) {
        if let Err(e) = sd_notify::notify(states) {
            tracing::debug!(error = %e, "sd_notify failed");
        }
    }

    pub fn ready() {
        send(&[sd_notify::NotifyState::Ready]);
    }

    pub fn stopping() {
        send(&[sd_notify::NotifyState::Stopping]);
    }

    /// `RELOADING=1` with the monotonic timestamp systemd ≥ 253 requires.
    pub fn reloading() {
        match sd_notify::NotifyState::monotonic_usec_now() {
            Ok(now) => send(&[sd_notify::NotifyState::Reloading, now]),
            Err(_) => send(&[sd_notify::NotifyState::Reloading]),
        }
    }

    pub fn status(text: &str) {
        send(&[sd_notify::NotifyState::Status(text)]);
    }

    /// How often to ping the watchdog (half of `WATCHDOG_USEC`), when it is enabled for
    /// this process.
    pub fn watchdog_period() -> Option<Duration> {
        sd_notify::watchdog_enabled().map(|d| (d / 2).max(Duration::from_millis(100)))
    }

    pub fn watchdog() {
        send(&[sd_notify::NotifyState::Watchdog]);
    }
}
