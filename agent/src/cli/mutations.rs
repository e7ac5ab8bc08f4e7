//! The mutating CLI commands (`selftest --task`, `privileged create-keyctl`) and where they
//! run: on the daemon's queue while it is up (the control socket hands them over, see
//! [`DaemonMutations`]), else on a local queue with the `state_dir` lock held
//! ([`LocalQueue`]). Either way the command is one operation in its guest's lane, so it
//! never overlaps another mutation of that guest, and the output and exit codes are the
//! same.
//!
//! Must never: run a mutation outside a queue lane, or take the local path while a daemon
//! owns `state_dir` (the lock refuses it).

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use felhom_protocol::{PctCreateSpec, Vmid};
use serde_json::{Value, json};

use super::CliError;
use crate::config::Config;
use crate::control::{ErrorKind, Mutations, Reply, Request, StateLock};
use crate::privileged::{self, PctCreated, PrivilegedError};
use crate::proxmox::Client;
use crate::reconcile::pve::BoxFut;
use crate::reconcile::{Queue, QueueConfig, QueueError};

/// How long a local queue's operation may still finish when the command ends.
const LOCAL_GRACE: Duration = Duration::from_secs(5);

/// A queue of this process, with `state_dir` owned (no daemon runs).
#[derive(Debug)]
pub(crate) struct LocalQueue {
    queue: Queue,
    _lock: StateLock,
}

impl LocalQueue {
    /// Checks that this runs as `state_dir`'s owner, takes its lock, starts a queue.
    /// `command` is how the operator ran it (for the `runuser -u` hint).
    pub(crate) fn take(state_dir: &Path, command: &str) -> Result<LocalQueue, CliError> {
        crate::config::ensure_state_dir_owner(state_dir, command)?;
        let lock = StateLock::acquire(state_dir)?;
        Ok(LocalQueue {
            queue: Queue::start(QueueConfig {
                max_running: 1,
                max_queued: 1,
            }),
            _lock: lock,
        })
    }

    pub(crate) fn queue(&self) -> &Queue {
        &self.queue
    }

    /// Stops the queue, then releases the lock.
    pub(crate) async fn close(self) {
        self.queue.shutdown(LOCAL_GRACE).await;
    }
}

/// Why `create-keyctl` did not create the guest.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CreateError {
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error(transparent)]
    Helper(#[from] PrivilegedError),
}

impl From<CreateError> for CliError {
    fn from(e: CreateError) -> Self {
        match &e {
            CreateError::Helper(h) if h.is_unreachable() => CliError::Unreachable(e.to_string()),
            _ => CliError::Problem(e.to_string()),
        }
    }
}

/// `pct create` with keyctl through the `pct` helper, as one operation in the lane of the
/// spec's vmid.
pub(crate) async fn create_on_queue(
    client: &privileged::Client,
    queue: &Queue,
    spec: PctCreateSpec,
) -> Result<PctCreated, CreateError> {
    let client = client.clone();
    let handle = queue.submit(spec.vmid, "create-keyctl", move |_permit| {
        Box::pin(async move { client.create_keyctl(&spec).await })
    })?;
    Ok(handle.await??)
}

/// The daemon's side: runs the mutating requests on its queue with its own clients
/// (swapped on SIGHUP).
pub(crate) struct DaemonMutations {
    proxmox: Mutex<Client>,
    privileged: Mutex<privileged::Client>,
}

impl std::fmt::Debug for DaemonMutations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonMutations").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl DaemonMutations {
    pub(crate) fn new(proxmox: Client, config: &Config) -> DaemonMutations {
        DaemonMutations {
            proxmox: Mutex::new(proxmox),
            privileged: Mutex::new(privileged::Client::new(&config.privhelper)),
        }
    }

    /// Takes the clients of a reloaded configuration (for the next request).
    pub(crate) fn reload(&self, proxmox: Client, config: &Config) {
        *lock(&self.proxmox) = proxmox;
        *lock(&self.privileged) = privileged::Client::new(&config.privhelper);
    }
}

fn error_reply(e: CliError) -> Reply {
    let kind = match e.exit() {
        super::Exit::Usage => ErrorKind::Usage,
        super::Exit::Unreachable => ErrorKind::Unreachable,
        _ => ErrorKind::Problem,
    };
    Reply::Error {
        kind,
        message: e.to_string(),
    }
}

impl Mutations for DaemonMutations {
    fn run(&self, queue: Queue, req: Request) -> BoxFut<'_, Reply> {
        Box::pin(async move {
            match req {
                Request::SelftestTask { vmid } => {
                    let vmid = match Vmid::new(vmid) {
                        Ok(v) => v,
                        Err(e) => return error_reply(CliError::Usage(format!("--vmid: {e}"))),
                    };
                    tracing::info!(vmid = %vmid, "control: selftest --task queued in the guest's lane");
                    let client = lock(&self.proxmox).clone();
                    match super::selftest::task_on_queue(&client, &queue, vmid).await {
                        Ok(run) => match serde_json::to_value(&run) {
                            Ok(body) => {
                                tracing::info!(vmid = %vmid, "control: selftest --task finished");
                                Reply::Ok { body }
                            }
                            Err(e) => error_reply(CliError::Problem(e.to_string())),
                        },
                        Err(e) => {
                            tracing::warn!(vmid = %vmid, error = %e, "control: selftest --task did not run");
                            error_reply(e)
                        }
                    }
                }
                Request::CreateKeyctl { spec } => {
                    let vmid = spec.vmid;
                    tracing::info!(vmid = %vmid, "control: create-keyctl queued in the guest's lane");
                    let client = lock(&self.privileged).clone();
                    match create_on_queue(&client, &queue, spec).await {
                        Ok(c) => {
                            tracing::info!(vmid = %c.vmid, "control: create-keyctl finished");
                            Reply::Ok {
                                body: json!({"vmid": c.vmid, "output": c.output}),
                            }
                        }
                        Err(e) => {
                            tracing::warn!(vmid = %vmid, error = %e, "control: create-keyctl failed");
                            error_reply(e.into())
                        }
                    }
                }
                other => error_reply(CliError::Usage(format!(
                    "{other:?} is not a mutating command"
                ))),
            }
        })
    }
}

/// Reads the daemon's `create-keyctl` answer.
pub(crate) fn created_from(body: &Value) -> Result<PctCreated, CliError> {
    let vmid = body["vmid"]
        .as_u64()
        .and_then(|v| Vmid::new(v).ok())
        .ok_or_else(|| CliError::Problem(format!("the daemon's answer has no vmid: {body}")))?;
    let output = body["output"].as_str().unwrap_or_default().to_string();
    Ok(PctCreated { vmid, output })
}
