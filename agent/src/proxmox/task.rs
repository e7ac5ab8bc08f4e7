//! Waiting for a PVE task: poll `tasks/{upid}/status` with bounded backoff until it stops,
//! then judge its exit text (`OK` and `WARNINGS: N` succeed; anything else fails).

use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use super::client::Client;
use super::error::{PermissionDenied, ProxmoxError};
use super::types::TaskOutcome;
use super::upid::Upid;

/// How to wait.
#[derive(Debug, Clone, Copy)]
pub struct WaitOptions {
    /// Give up (with [`ProxmoxError::TaskTimeout`]) after this long.
    pub timeout: Duration,
    /// First pause between polls.
    pub initial_interval: Duration,
    /// The pause grows by half each poll, up to this.
    pub max_interval: Duration,
}

impl Default for WaitOptions {
    fn default() -> Self {
        WaitOptions {
            timeout: Duration::from_secs(600),
            initial_interval: Duration::from_millis(100),
            max_interval: Duration::from_secs(2),
        }
    }
}

impl WaitOptions {
    pub fn with_timeout(timeout: Duration) -> Self {
        WaitOptions {
            timeout,
            ..WaitOptions::default()
        }
    }
}

/// A task that stopped successfully.
#[derive(Debug, Clone, Serialize)]
pub struct TaskDone {
    pub upid: Upid,
    /// `OK` or `WARNINGS: N`.
    pub exitstatus: String,
    /// `Some(N)` for `WARNINGS: N`.
    pub warnings: Option<u32>,
}

impl Client {
    /// Polls until the task stops. Transient errors (connection, timeout, 502/503/595/596)
    /// are retried until the deadline; other errors end the wait.
    pub async fn wait_task(
        &self,
        upid: &Upid,
        opts: WaitOptions,
    ) -> Result<TaskDone, ProxmoxError> {
        let start = Instant::now();
        let deadline = start + opts.timeout;
        let mut interval = opts.initial_interval.max(Duration::from_millis(10));
        let max = opts.max_interval.max(interval);
        loop {
            match self.task_status(upid).await {
                Ok(status) => {
                    if let Some(outcome) = status.outcome() {
                        let exitstatus = status
                            .exitstatus
                            .clone()
                            .unwrap_or_else(|| "unexpected status".to_string());
                        return match outcome {
                            TaskOutcome::Ok => Ok(TaskDone {
                                upid: upid.clone(),
                                exitstatus,
                                warnings: None,
                            }),
                            TaskOutcome::Warnings(n) => {
                                tracing::warn!(upid = %upid, warnings = n, "task finished with warnings");
                                Ok(TaskDone {
                                    upid: upid.clone(),
                                    exitstatus,
                                    warnings: Some(n),
                                })
                            }
                            TaskOutcome::Failed(text) => Err(task_failed(upid, text)),
                        };
                    }
                }
                Err(e) if e.is_transient() => {
                    tracing::debug!(upid = %upid, error = %e, "task poll failed, retrying");
                }
                Err(e) => return Err(e),
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ProxmoxError::TaskTimeout {
                    upid: upid.clone(),
                    waited: now - start,
                });
            }
            tokio::time::sleep(interval.min(deadline - now)).await;
            interval = (interval + interval / 2).min(max);
        }
    }
}

fn task_failed(upid: &Upid, exitstatus: String) -> ProxmoxError {
    ProxmoxError::TaskFailed {
        upid: upid.clone(),
        permission: PermissionDenied::parse(&exitstatus).map(Box::new),
        exitstatus,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes() {
        assert_eq!(TaskOutcome::from_exitstatus("OK"), TaskOutcome::Ok);
        assert_eq!(
            TaskOutcome::from_exitstatus("WARNINGS: 3"),
            TaskOutcome::Warnings(3)
        );
        for failed in [
            "WARNINGS: ",
            "WARNINGS: x",
            "unexpected status",
            "ok",
            "command 'lxc-start' failed: exit code 1",
        ] {
            assert!(
                matches!(TaskOutcome::from_exitstatus(failed), TaskOutcome::Failed(_)),
                "{failed}"
            );
        }
    }

    #[test]
    fn a_failed_permission_task_names_the_privilege() {
        let upid: Upid = "UPID:pve:0003F401:01B3E0AA:66A1B400:vzdump:101:agent@pve!deploy:"
            .parse()
            .unwrap();
        let e = task_failed(
            &upid,
            "Permission check failed (/vms/101, VM.Backup)".into(),
        );
        let msg = e.to_string();
        assert!(msg.contains("task vzdump on guest 101 failed"), "{msg}");
        assert!(msg.contains("grant VM.Backup on /vms/101"), "{msg}");
    }
}
