//! When scheduled restore tests run: every `interval_hours` since the last one started,
//! inside the optional local-time `window`, while the gate is open, and only when the
//! reconcile queue is idle (restore tests yield to reconcile and signed operations). One
//! guest per run, the oldest-tested first ([`super::RestoreTests::candidates`]). A scratch
//! guest left behind by a crash is cleaned up as soon as the gate is open, even with
//! scheduled tests disabled.
//!
//! Must never: start a test while another runs (the tests' own lock refuses it) or while
//! the queue has work.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{RestoreError, RestoreTests};
use crate::config::RestoreWindow;
use crate::reconcile::journal::now_ms;

/// How often the schedule looks.
pub const TICK: Duration = Duration::from_secs(60);
/// How soon it looks again when the queue was busy or a cleanup failed.
pub const RETRY: Duration = Duration::from_secs(5);

/// Whether a scheduled test is due: `interval_hours` since `last_started_ms` (none: at
/// once), and, with a window, `local_minute` inside it (unknown local time: not due).
pub fn due(
    now_ms: i64,
    last_started_ms: Option<i64>,
    interval_hours: u64,
    window: Option<RestoreWindow>,
    local_minute: Option<u16>,
) -> bool {
    let interval_ms = i64::try_from(interval_hours.saturating_mul(3_600_000)).unwrap_or(i64::MAX);
    let waited = last_started_ms.is_none_or(|last| now_ms.saturating_sub(last) >= interval_ms);
    let in_window = match window {
        None => true,
        Some(w) => local_minute.is_some_and(|m| w.contains(m)),
    };
    waited && in_window
}

/// Minutes after local midnight in the host's time zone (`TZ`, else `/etc/localtime`,
/// read by `jiff`'s pure-Rust tz database: no process, no `localtime_r`, which is not
/// thread-safe; `time`'s local offset refuses to work in a multi-threaded process).
/// `None` when the zone cannot be read: the window is then never open (and logged).
pub async fn local_minute() -> Option<u16> {
    let now = tokio::task::spawn_blocking(jiff::ZonedDateTime::now)
        .await
        .ok()?;
    let (h, m) = (
        u16::try_from(now.hour()).ok()?,
        u16::try_from(now.minute()).ok()?,
    );
    (h < 24 && m < 60).then_some(h * 60 + m)
}

/// Runs the schedule until `shutdown` turns true.
pub fn spawn(
    tests: Arc<RestoreTests>,
    busy: impl Fn() -> bool + Send + 'static,
    mut shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut gate = tests.gate();
        let mut wait = Duration::ZERO;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                // The gate opening (first envelope, unblocked) is a reason to look at once.
                r = gate.changed() => if r.is_err() { break },
                _ = shutdown.wait_for(|s| *s) => break,
            }
            wait = TICK;
            if let Some(why) = tests.closed() {
                tracing::debug!(why, "restore tests: the gate is closed");
                continue;
            }
            if busy() {
                tracing::debug!("restore tests: the reconcile queue is busy; looking again soon");
                wait = RETRY;
                continue;
            }
            let j = tests.journal().clone();
            let left = tokio::task::spawn_blocking(move || j.restore_left_behind()).await;
            if matches!(&left, Ok(Ok(l)) if !l.is_empty()) {
                match tests.cleanup().await {
                    Ok(n) => tracing::info!(
                        closed = n,
                        "restore tests: cleaned up after an interrupted test"
                    ),
                    Err(e) => {
                        tracing::warn!(error = %e, "restore tests: cleanup failed; trying again later")
                    }
                }
            }
            let s = tests.settings().clone();
            if !s.enabled {
                tracing::debug!("restore tests: scheduled tests are off");
                continue;
            }
            let j = tests.journal().clone();
            let last = match tokio::task::spawn_blocking(move || j.restore_recent(1)).await {
                Ok(Ok(r)) => r.first().map(|r| r.started_ms),
                other => {
                    tracing::warn!(?other, "restore tests: cannot read the journal");
                    continue;
                }
            };
            let minute = if s.window.is_some() {
                local_minute().await
            } else {
                None
            };
            if !due(now_ms(), last, s.interval_hours, s.window, minute) {
                tracing::debug!(local_minute = ?minute, last_started_ms = ?last, "restore tests: not due");
                continue;
            }
            match tests.run(None).await {
                Ok(r) => {
                    tracing::info!(vmid = r.vmid, result = ?r.result, "scheduled restore test done")
                }
                Err(RestoreError::NothingToTest) => {
                    tracing::debug!("restore tests: no guest with a backup")
                }
                Err(e) => tracing::warn!(error = %e, "scheduled restore test did not run"),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_after_the_interval_and_inside_the_window() {
        let h = 3_600_000;
        assert!(due(10 * h, None, 24, None, None));
        assert!(!due(10 * h, Some(9 * h), 24, None, None));
        assert!(due(33 * h, Some(9 * h), 24, None, None));
        let w = RestoreWindow {
            start_minute: 60,
            end_minute: 300,
        };
        assert!(due(33 * h, Some(9 * h), 24, Some(w), Some(120)));
        assert!(!due(33 * h, Some(9 * h), 24, Some(w), Some(600)));
        assert!(!due(33 * h, Some(9 * h), 24, Some(w), None));
    }

    #[tokio::test]
    async fn local_time_is_read() {
        let m = local_minute().await.expect("date runs");
        assert!(m < 24 * 60);
    }
}

#[cfg(test)]
mod local_time_tests {
    #[tokio::test]
    async fn the_local_minute_is_read_without_a_process() {
        let m = super::local_minute()
            .await
            .expect("the host's time zone is readable");
        assert!(m < 24 * 60, "{m}");
    }
}
