//! The heartbeat loop: collect, POST, adopt the envelope, wait, repeat.
//!
//! Timing: the first report goes at once; after an accepted report the next one waits the
//! envelope's `poll_interval_seconds` clamped to `[floor, 3600]` (floor 60 s, or the test
//! bed's `hub.test_min_poll_interval_seconds`); after a failed cycle it retries with a
//! jittered exponential backoff (5 s, 10 s, 20 s … each drawn from its upper half) never
//! longer than that interval. The loop never ends because a collection or a report failed.
//!
//! Inputs besides the clock: a shutdown signal (the in-flight POST gets a short grace to
//! finish, then is abandoned), and [`Command`]s: `Reload` swaps collector, reporter and
//! floor between cycles (SIGHUP), `ReportNow` skips the wait.
//!
//! The next report is always due at the end of the last accepted report plus the interval
//! in force *now*: when the interval changes during a wait (a reload that changes the
//! floor), the running wait is rescheduled, so a shorter interval cuts it short instead of
//! taking effect only after it.
//!
//! Outputs: the last envelope is saved in `state_dir` (only when it changed) and published
//! on a `watch` channel for the reconcile side ([`Heartbeat::subscribe`]); changes of
//! `blocked`, `desired_generation`, `has_signed_ops` and of the interval are logged.
//!
//! The collector and the reporter are traits so the timing rules are tested here with a
//! paused clock; the daemon plugs in the real collector and [`super::client::HubClient`].
//!
//! Must never: busy-loop, wait longer than the interval after a failure, or log the token.

use std::future::Future;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep_until, timeout};

use super::client::{HubClient, HubClientError};
use super::envelope::{ControlEnvelope, EnvelopeStore, SavedEnvelope};
use super::report::{HostReport, Timestamp};

/// First retry delay after a failed cycle (doubles per consecutive failure).
pub const BACKOFF_BASE: Duration = Duration::from_secs(5);
/// How long an in-flight report may still finish after a shutdown request.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// A whole cycle (collect + POST) is abandoned after this long.
pub const CYCLE_DEADLINE: Duration = Duration::from_secs(300);

/// Builds one report per cycle. Collection never fails as a whole: what could not be read
/// goes into the report's `errors`.
pub trait Collect: Send {
    fn collect(&mut self) -> impl Future<Output = HostReport> + Send;
    /// The hub accepted `report` (e.g. advance the audit cursor past its records).
    fn accepted(&mut self, report: &HostReport);
}

/// Delivers one report and returns the hub's answer.
pub trait Report: Send + Sync {
    fn send(
        &self,
        report: &HostReport,
    ) -> impl Future<Output = Result<ControlEnvelope, HubClientError>> + Send;
}

impl Report for HubClient {
    fn send(
        &self,
        report: &HostReport,
    ) -> impl Future<Output = Result<ControlEnvelope, HubClientError>> + Send {
        self.post_report(report)
    }
}

/// What the loop can be told between cycles.
#[derive(Debug)]
pub enum Command<C, R> {
    /// New configuration (SIGHUP): replaces collector and reporter (`None` = hub
    /// disabled: no reports until the next reload) and the interval floor.
    Reload {
        collector: C,
        reporter: Option<R>,
        floor: Duration,
    },
    /// Report now instead of waiting for the interval.
    ReportNow,
}

/// Counters of the loop, for status output and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub cycles: u64,
    pub accepted: u64,
    pub failed: u64,
    pub consecutive_failures: u32,
    pub last_error: Option<String>,
}

/// The heartbeat loop's state.
#[derive(Debug)]
pub struct Heartbeat<C, R> {
    collector: C,
    reporter: Option<R>,
    floor: Duration,
    store: Option<EnvelopeStore>,
    envelope: Option<SavedEnvelope>,
    envelope_tx: watch::Sender<Option<SavedEnvelope>>,
    stats_tx: watch::Sender<Stats>,
    grace: Duration,
    cycle_deadline: Duration,
}

enum Cycle {
    Accepted(ControlEnvelope),
    Failed(String),
    Shutdown,
}

impl<C: Collect, R: Report> Heartbeat<C, R> {
    /// `store` keeps the last envelope across restarts (loaded here). `reporter: None`
    /// runs the loop without reporting (hub disabled).
    pub fn new(
        collector: C,
        reporter: Option<R>,
        floor: Duration,
        store: Option<EnvelopeStore>,
    ) -> Self {
        let envelope = match store.as_ref().map(EnvelopeStore::load) {
            Some(Ok(saved)) => saved,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "ignoring the saved hub envelope");
                None
            }
            None => None,
        };
        if let Some(saved) = &envelope {
            tracing::info!(
                blocked = saved.envelope.blocked,
                desired_generation = saved.envelope.desired_generation,
                has_signed_ops = saved.envelope.has_signed_ops,
                received_at = %saved.received_at,
                "starting from the saved hub envelope"
            );
        }
        let (envelope_tx, _) = watch::channel(envelope.clone());
        let (stats_tx, _) = watch::channel(Stats::default());
        Heartbeat {
            collector,
            reporter,
            floor,
            store,
            envelope,
            envelope_tx,
            stats_tx,
            grace: SHUTDOWN_GRACE,
            cycle_deadline: CYCLE_DEADLINE,
        }
    }

    /// Changes the shutdown grace and the cycle deadline (tests).
    pub fn with_timeouts(mut self, grace: Duration, cycle_deadline: Duration) -> Self {
        self.grace = grace;
        self.cycle_deadline = cycle_deadline;
        self
    }

    /// The last envelope (saved or received), for the reconcile side.
    pub fn subscribe(&self) -> watch::Receiver<Option<SavedEnvelope>> {
        self.envelope_tx.subscribe()
    }

    pub fn stats(&self) -> watch::Receiver<Stats> {
        self.stats_tx.subscribe()
    }

    /// The interval the loop waits after an accepted report.
    pub fn interval(&self) -> Duration {
        match &self.envelope {
            Some(s) => s.envelope.poll_interval(self.floor),
            None => super::envelope::clamp_interval(None, self.floor),
        }
    }

    /// Runs until `shutdown` turns true (or its sender is dropped).
    pub async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command<C, R>>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut next = Instant::now();
        // End of the last accepted report while no failure followed it: the base the next
        // report is scheduled from when the interval changes during the wait.
        let mut last_accepted: Option<Instant> = None;
        let mut commands_open = true;
        loop {
            if *shutdown.borrow() {
                return;
            }
            let reporting = self.reporter.is_some();
            tokio::select! {
                biased;
                changed = shutdown.changed() => {
                    if changed.is_err() {
                        return; // the sender is gone: nobody can stop us later
                    }
                    continue;
                }
                cmd = commands.recv(), if commands_open => {
                    match cmd {
                        Some(Command::Reload { collector, reporter, floor }) => {
                            let was = self.reporter.is_some();
                            let old_interval = self.interval();
                            self.collector = collector;
                            self.reporter = reporter;
                            self.floor = floor;
                            tracing::info!(hub_reporting = self.reporter.is_some(), "configuration reloaded");
                            if !was {
                                next = Instant::now();
                            } else if let Some(last) = last_accepted
                                && self.interval() != old_interval
                            {
                                next = last + self.interval();
                                tracing::info!(
                                    poll_interval_seconds = self.interval().as_secs(),
                                    "poll interval changed; next report rescheduled"
                                );
                            }
                        }
                        Some(Command::ReportNow) => next = Instant::now(),
                        None => commands_open = false,
                    }
                    continue;
                }
                _ = sleep_until(next), if reporting => {}
            }
            match self.cycle(&mut shutdown).await {
                Cycle::Shutdown => return,
                Cycle::Accepted(envelope) => {
                    self.adopt(envelope);
                    let wait = self.interval();
                    self.stats_tx.send_modify(|s| {
                        s.cycles += 1;
                        s.accepted += 1;
                        if s.consecutive_failures > 0 {
                            tracing::info!(
                                after_failures = s.consecutive_failures,
                                "hub reachable again"
                            );
                        }
                        s.consecutive_failures = 0;
                        s.last_error = None;
                    });
                    tracing::debug!(next_in_seconds = wait.as_secs(), "report accepted");
                    let now = Instant::now();
                    last_accepted = Some(now);
                    next = now + wait;
                }
                Cycle::Failed(error) => {
                    let mut failures = 0;
                    self.stats_tx.send_modify(|s| {
                        s.cycles += 1;
                        s.failed += 1;
                        s.consecutive_failures = s.consecutive_failures.saturating_add(1);
                        s.last_error = Some(error.clone());
                        failures = s.consecutive_failures;
                    });
                    last_accepted = None;
                    let wait = backoff(failures, self.interval());
                    tracing::warn!(
                        error = %error,
                        consecutive_failures = failures,
                        retry_in_ms = wait.as_millis() as u64,
                        "report failed"
                    );
                    next = Instant::now() + wait;
                }
            }
            if *shutdown.borrow() {
                return;
            }
        }
    }

    /// One collect + POST; on shutdown the POST gets `grace` to finish.
    async fn cycle(&mut self, shutdown: &mut watch::Receiver<bool>) -> Cycle {
        let Some(reporter) = self.reporter.as_ref() else {
            return Cycle::Failed("hub reporting is disabled".into());
        };
        let grace = self.grace;
        let deadline = self.cycle_deadline;
        let collector = &mut self.collector;
        let (outcome, shutting_down) = {
            let work = timeout(deadline, async {
                let mut report = collector.collect().await;
                report.sent_at = Timestamp::now();
                let result = reporter.send(&report).await;
                (report, result)
            });
            tokio::pin!(work);
            let first = tokio::select! {
                biased;
                r = &mut work => Some(r),
                _ = wait_true(shutdown) => None,
            };
            match first {
                Some(r) => (Some(r), false),
                None => match timeout(grace, &mut work).await {
                    Ok(r) => (Some(r), true),
                    Err(_) => {
                        tracing::info!("shutdown: abandoned the report in flight");
                        (None, true)
                    }
                },
            }
        };
        let result = match outcome {
            None => return Cycle::Shutdown,
            Some(Err(_)) => Cycle::Failed(format!(
                "cycle took longer than {} s and was abandoned",
                self.cycle_deadline.as_secs()
            )),
            Some(Ok((report, Ok(envelope)))) => {
                self.collector.accepted(&report);
                Cycle::Accepted(envelope)
            }
            Some(Ok((_, Err(e)))) => Cycle::Failed(e.to_string()),
        };
        if shutting_down {
            if let Cycle::Accepted(envelope) = result {
                self.adopt(envelope);
            }
            return Cycle::Shutdown;
        }
        result
    }

    /// Takes a new envelope: logs what changed, saves and publishes it.
    fn adopt(&mut self, envelope: ControlEnvelope) {
        let before = self.envelope.as_ref().map(|s| s.envelope.clone());
        let old_interval = self.interval();
        let changed = before.as_ref() != Some(&envelope);
        let old_control = before.as_ref().map(ControlEnvelope::control);
        let new_control = envelope.control();
        if old_control != Some(new_control) {
            tracing::info!(
                blocked = new_control.blocked,
                desired_generation = new_control.desired_generation,
                has_signed_ops = new_control.has_signed_ops,
                "hub control changed"
            );
        }
        let saved = SavedEnvelope {
            envelope,
            received_at: Timestamp::now(),
        };
        self.envelope = Some(saved.clone());
        let new_interval = self.interval();
        if new_interval != old_interval {
            tracing::info!(
                poll_interval_seconds = new_interval.as_secs(),
                asked = ?saved.envelope.poll_interval_seconds,
                "poll interval changed"
            );
        }
        if changed
            && let Some(store) = &self.store
            && let Err(e) = store.save(&saved)
        {
            tracing::warn!(error = %e, "could not save the hub envelope");
        }
        self.envelope_tx.send_replace(Some(saved));
    }
}

async fn wait_true(rx: &mut watch::Receiver<bool>) {
    // A dropped sender counts as shutdown.
    let _ = rx.wait_for(|v| *v).await;
}

/// The wait after `failures` consecutive failed cycles: 5 s × 2^(failures−1), capped at
/// `interval`, drawn uniformly from its upper half.
pub fn backoff(failures: u32, interval: Duration) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    let base = BACKOFF_BASE
        .saturating_mul(1u32 << exp)
        .min(interval)
        .max(Duration::from_millis(2));
    let half = base / 2;
    let span = (base - half).as_millis() as u64;
    half + Duration::from_millis(fastrand::u64(0..=span))
}

#[cfg(test)]
mod tests;
