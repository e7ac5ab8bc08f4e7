//! Local control: who owns `state_dir`, and the socket (`/run/felhom/agent.sock`) through
//! which CLI commands reach the running daemon.
//!
//! Owns:
//! - [`StateLock`]: an exclusive `flock` on `state_dir/agent.lock`. Exactly one process owns
//!   the queue and the journal at a time: the daemon for its lifetime, or a CLI command that
//!   found no daemon. The lock file names the holder's pid for the error message.
//! - The wire: one JSON [`Request`] line from the client, one JSON [`Reply`] line back,
//!   each capped at [`MAX_MESSAGE`] bytes.
//! - [`ControlServer`]: binds the socket (mode 0660, group `felhom-agent` when that group
//!   exists; root may always connect), answers each connection through a [`Handler`].
//! - [`request`]: the client side; [`ControlError::NotRunning`] tells the CLI to take the
//!   lock and do the work itself.
//! - [`DaemonHandler`]: the daemon's answers (status, plan, journal show/verify) over the
//!   reconcile engine, and the mutating CLI commands (`selftest --task`, `privileged
//!   create-keyctl`), which it hands to a [`Mutations`] implementation together with the
//!   daemon's queue, so they run in the guest's lane like every other mutation; and
//!   `ops undo` / `ops release`, which it queues through the signed-operations service and
//!   answers with the new operation's decision (waiting at most [`MAX_LOCAL_WAIT`]).
//! - [`Peer`]: who is connected (`SO_PEERCRED`). Undo and release are for root and the
//!   agent's own user only; members of the socket's group are refused them.
//!
//! Must never: let two processes own the journal (the lock is taken before the journal is
//! opened and held until exit), remove a socket file it does not own (only while holding
//! the lock, and only a socket), or read an unbounded message.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;

use tokio::sync::watch;

use crate::hub::envelope::SavedEnvelope;
use crate::reconcile::Queue;
use crate::reconcile::engine::EngineHandle;
use crate::reconcile::pve::BoxFut;

/// Lock file inside `state_dir`.
pub const LOCK_FILE: &str = "agent.lock";
/// The hub's kept envelope inside `state_dir` (written by the hub loop).
pub const ENVELOPE_FILE: &str = "hub-envelope.json";
/// Largest request or reply line.
pub const MAX_MESSAGE: usize = 4 * 1024 * 1024;
/// The group whose members may use the socket.
pub const SOCKET_GROUP: &str = "felhom-agent";

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("state_dir lock {path}: {source}")]
    LockIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "state_dir is in use by another felhom-agent process{} (lock {path}); if the daemon is starting, try again in a moment",
        holder.as_ref().map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    Locked {
        path: PathBuf,
        holder: Option<String>,
    },
    #[error("control socket {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no felhom-agent daemon is listening on {path}")]
    NotRunning { path: PathBuf },
    #[error("control socket {path}: {detail}")]
    Protocol { path: PathBuf, detail: String },
    #[error("{message}")]
    Remote { kind: ErrorKind, message: String },
}

/// Exclusive ownership of `state_dir` (journal, queue). Released when dropped.
#[derive(Debug)]
pub struct StateLock {
    _flock: nix::fcntl::Flock<File>,
    path: PathBuf,
}

impl StateLock {
    /// Takes the lock or fails at once with [`ControlError::Locked`].
    pub fn acquire(state_dir: &Path) -> Result<StateLock, ControlError> {
        let path = state_dir.join(LOCK_FILE);
        let io = |source| ControlError::LockIo {
            path: path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        let mut flock =
            match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
                Ok(f) => f,
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                    let holder = std::fs::read_to_string(&path)
                        .ok()
                        .map(|s| s.trim().to_string())
                        .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()));
                    return Err(ControlError::Locked { path, holder });
                }
                Err((_, e)) => return Err(io(std::io::Error::from(e))),
            };
        flock.set_len(0).map_err(io)?;
        writeln!(&mut *flock, "{}", std::process::id()).map_err(io)?;
        Ok(StateLock {
            _flock: flock,
            path,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// What a CLI command asks the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status,
    Plan,
    JournalShow {
        limit: u32,
    },
    JournalVerify,
    /// `selftest --task --vmid N`: the reversible snapshot exercise, in the guest's lane.
    SelftestTask {
        vmid: u64,
    },
    /// `privileged create-keyctl SPEC.json`: creates the guest in the lane of its vmid.
    CreateKeyctl {
        spec: felhom_protocol::PctCreateSpec,
    },
    /// `ops list`: the newest signed operations.
    OpsList {
        limit: u32,
    },
    /// `ops show OP_ID`: one operation and the results sent about it.
    OpsShow {
        op_id: String,
    },
    /// `restore-test run [--vmid N]`: one restore test now, in the scratch vmid's lanes.
    RestoreTestRun {
        vmid: Option<u64>,
    },
    /// `restore-test list`: the newest restore tests.
    RestoreTestList {
        limit: u32,
    },
    /// `ops undo OP_ID`: undo that operation from its undo point, as an operation of its
    /// own in the guest's lane; the reply waits up to `wait_seconds` for its decision.
    /// Root or the agent's user only.
    OpsUndo {
        op_id: felhom_authz::OpId,
        wait_seconds: u32,
    },
    /// `ops release OP_ID`: remove that operation's undo point from the node, as an
    /// operation of its own; waits like [`Request::OpsUndo`]. Root or the agent's user only.
    OpsRelease {
        op_id: felhom_authz::OpId,
        wait_seconds: u32,
    },
}

impl Request {
    /// Whether the request changes a guest (and so must run on the daemon's queue).
    pub fn is_mutation(&self) -> bool {
        matches!(
            self,
            Request::SelftestTask { .. }
                | Request::CreateKeyctl { .. }
                | Request::RestoreTestRun { .. }
                | Request::OpsUndo { .. }
                | Request::OpsRelease { .. }
        )
    }
}

/// How a failed request maps to the CLI's exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    Problem,
    Usage,
    Unreachable,
}

/// The daemon's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Reply {
    Ok { body: Value },
    Error { kind: ErrorKind, message: String },
}

/// Who is on the other end of a connection, from the kernel (`SO_PEERCRED`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// `None` when the kernel did not say (then nothing that needs a user is allowed).
    pub uid: Option<u32>,
}

impl Peer {
    /// Who may undo or release: root, or the user the daemon runs as (`daemon_uid`).
    /// Members of the socket's group may read through the socket, not this. `Ok` names
    /// the asker as the journal records it (`local:<user name>`, or `local:uid <N>`).
    pub fn may_change_undo(&self, daemon_uid: u32) -> Result<String, String> {
        let Some(uid) = self.uid else {
            return Err("the kernel did not name the peer of this connection; only root or the agent's user may undo or release".into());
        };
        if uid != 0 && uid != daemon_uid {
            return Err(format!(
                "only root or the agent's user (uid {daemon_uid}) may undo or release an operation; this request came from uid {uid}"
            ));
        }
        Ok(
            match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
                Ok(Some(u)) if !u.name.is_empty() => format!("local:{}", u.name),
                _ => format!("local:uid {uid}"),
            },
        )
    }
}

/// The restore tests' part of `status`: the scratch guests that cannot be destroyed
/// (which block further tests), or the error reading them.
async fn restore_status(tests: &crate::restore::RestoreTests) -> Value {
    match tests.not_destroyed().await {
        Ok(list) => {
            let items: Vec<Value> = list
                .iter()
                .map(|r| {
                    let since = r
                        .cleanup_failing_since_ms
                        .and_then(|ms| crate::timestamp::Timestamp::from_unix(ms.div_euclid(1000)));
                    serde_json::json!({
                        "test": r.id,
                        "vmid": r.vmid,
                        "scratch_vmid": r.scratch_vmid,
                        "since": since,
                        "last_error": r.cleanup_error,
                    })
                })
                .collect();
            serde_json::json!({ "blocked": !items.is_empty(), "not_destroyed": items })
        }
        Err(e) => serde_json::json!({ "error": e.to_string() }),
    }
}

/// Answers requests in the daemon.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, req: Request, peer: Peer) -> BoxFut<'_, Reply>;
}

/// Runs the mutating requests ([`Request::is_mutation`]) on the daemon's `queue`. The CLI
/// implements it, since it owns those commands' output; the same code runs on a local
/// queue when no daemon is up.
pub trait Mutations: Send + Sync + 'static {
    fn run(&self, queue: Queue, req: Request) -> BoxFut<'_, Reply>;
}

/// The listening control socket. Dropping it stops accepting and removes the socket file.
#[derive(Debug)]
pub struct ControlServer {
    path: PathBuf,
    task: JoinHandle<()>,
}

impl ControlServer {
    /// Binds `path` (replacing a stale socket: the caller's [`StateLock`] proves no other
    /// daemon runs), sets mode 0660 and the `felhom-agent` group, and serves `handler`.
    pub fn start(
        path: &Path,
        _lock: &StateLock,
        handler: Arc<dyn Handler>,
    ) -> Result<ControlServer, ControlError> {
        let err = |source| ControlError::Socket {
            path: path.to_path_buf(),
            source,
        };
        match std::fs::symlink_metadata(path) {
            Ok(md) if md.file_type().is_socket() => std::fs::remove_file(path).map_err(err)?,
            Ok(_) => {
                return Err(err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "exists and is not a socket; not removing it",
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(e)),
        }
        let listener = UnixListener::bind(path).map_err(err)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(err)?;
        match nix::unistd::Group::from_name(SOCKET_GROUP) {
            Ok(Some(g)) => {
                if let Err(e) = nix::unistd::chown(path, None, Some(g.gid)) {
                    tracing::warn!(socket = %path.display(), error = %e, "cannot give the control socket to group {SOCKET_GROUP}");
                }
            }
            _ => {
                tracing::info!(socket = %path.display(), "group {SOCKET_GROUP} does not exist; the control socket keeps the daemon's group")
            }
        }
        let p = path.to_path_buf();
        let task = tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        let h = handler.clone();
                        let p = p.clone();
                        tokio::spawn(async move {
                            if let Err(e) = serve_one(stream, h.as_ref()).await {
                                tracing::warn!(socket = %p.display(), error = %e, "control connection failed");
                            }
                        });
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "control socket accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        Ok(ControlServer {
            path: path.to_path_buf(),
            task,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn read_line_capped<R: tokio::io::AsyncRead + Unpin>(
    r: R,
) -> Result<Option<Vec<u8>>, String> {
    let mut reader = BufReader::new(r).take(MAX_MESSAGE as u64 + 1);
    let mut buf = Vec::new();
    let n = reader
        .read_until(b'\n', &mut buf)
        .await
        .map_err(|e| e.to_string())?;
    if n == 0 {
        return Ok(None);
    }
    if buf.len() > MAX_MESSAGE {
        return Err(format!("message larger than {MAX_MESSAGE} bytes"));
    }
    Ok(Some(buf))
}

async fn serve_one(mut stream: UnixStream, handler: &dyn Handler) -> Result<(), String> {
    let peer = match stream.peer_cred() {
        Ok(cred) => {
            tracing::debug!(uid = cred.uid(), pid = ?cred.pid(), "control connection");
            Peer {
                uid: Some(cred.uid()),
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "control connection without peer credentials");
            Peer { uid: None }
        }
    };
    let (r, mut w) = stream.split();
    let line = tokio::time::timeout(Duration::from_secs(10), read_line_capped(r))
        .await
        .map_err(|_| "no request within 10 s".to_string())??;
    let Some(line) = line else { return Ok(()) };
    let reply = match serde_json::from_slice::<Request>(&line) {
        Ok(req) => handler.handle(req, peer).await,
        Err(e) => Reply::Error {
            kind: ErrorKind::Usage,
            message: format!("bad request: {e}"),
        },
    };
    let mut out = serde_json::to_vec(&reply).map_err(|e| e.to_string())?;
    out.push(b'\n');
    w.write_all(&out).await.map_err(|e| e.to_string())?;
    w.shutdown().await.map_err(|e| e.to_string())
}

/// Sends one request to the daemon. [`ControlError::NotRunning`] when nothing listens.
pub async fn request(path: &Path, req: &Request) -> Result<Value, ControlError> {
    let proto = |detail: String| ControlError::Protocol {
        path: path.to_path_buf(),
        detail,
    };
    let mut stream = match UnixStream::connect(path).await {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Err(ControlError::NotRunning {
                path: path.to_path_buf(),
            });
        }
        Err(source) => {
            return Err(ControlError::Socket {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let mut line = serde_json::to_vec(req).map_err(|e| proto(e.to_string()))?;
    line.push(b'\n');
    stream
        .write_all(&line)
        .await
        .map_err(|source| ControlError::Socket {
            path: path.to_path_buf(),
            source,
        })?;
    let (r, _w) = stream.split();
    let reply = read_line_capped(r)
        .await
        .map_err(proto)?
        .ok_or_else(|| proto("the daemon closed the connection without answering".into()))?;
    match serde_json::from_slice::<Reply>(&reply).map_err(|e| proto(e.to_string()))? {
        Reply::Ok { body } => Ok(body),
        Reply::Error { kind, message } => Err(ControlError::Remote { kind, message }),
    }
}

/// The kept hub envelope, if any (raw JSON; the hub module owns its shape).
pub fn read_envelope(state_dir: &Path) -> Option<Value> {
    let bytes = std::fs::read(state_dir.join(ENVELOPE_FILE)).ok()?;
    if bytes.len() > MAX_MESSAGE {
        return None;
    }
    serde_json::from_slice(&bytes).ok()
}

/// The daemon's answers, over its engine.
pub struct DaemonHandler {
    pub engine: Arc<EngineHandle>,
    pub state_dir: PathBuf,
    /// The hub service's last envelope (what `status` shows); without it, the copy kept
    /// in `state_dir`.
    pub envelope: Option<watch::Receiver<Option<SavedEnvelope>>>,
    /// Runs the mutating requests; `None` refuses them.
    pub mutations: Option<Arc<dyn Mutations>>,
    /// The daemon's `agent_id` and the signers file as it last loaded it (start, SIGHUP),
    /// for `status`; without them `status` reads both itself.
    pub signed_ops: Option<SignedOpsView>,
    /// The restore tests, once the daemon started them (unset: not configured).
    pub restore: Arc<std::sync::OnceLock<Arc<crate::restore::RestoreTests>>>,
}

/// What `status` shows of signed operations, as the running daemon holds it.
#[derive(Debug, Clone)]
pub struct SignedOpsView {
    pub agent_id: crate::ops::AgentId,
    pub agent_id_source: crate::ops::IdentitySource,
    pub trust: watch::Receiver<crate::ops::TrustState>,
    /// The signed-operations service, once the daemon started it.
    pub service: Arc<std::sync::OnceLock<Arc<crate::ops::service::OpsService>>>,
}

impl std::fmt::Debug for DaemonHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonHandler")
            .field("state_dir", &self.state_dir)
            .finish_non_exhaustive()
    }
}

fn ok(v: impl Serialize) -> Reply {
    match serde_json::to_value(v) {
        Ok(body) => Reply::Ok { body },
        Err(e) => Reply::Error {
            kind: ErrorKind::Problem,
            message: e.to_string(),
        },
    }
}

fn problem(e: impl std::fmt::Display) -> Reply {
    Reply::Error {
        kind: ErrorKind::Problem,
        message: e.to_string(),
    }
}

/// Longest a local undo or release waits for its decision before the reply says it is
/// still under way.
pub const MAX_LOCAL_WAIT: Duration = Duration::from_secs(3600);

impl DaemonHandler {
    /// `ops undo` / `ops release`: checks the peer, queues the request through the
    /// signed-operations service, and waits (bounded) for the new operation's decision.
    async fn local_op(
        &self,
        req: crate::ops::service::LocalRequest,
        peer: Peer,
        wait: Duration,
    ) -> Reply {
        let usage = |message: String| Reply::Error {
            kind: ErrorKind::Usage,
            message,
        };
        let by = match peer.may_change_undo(nix::unistd::geteuid().as_raw()) {
            Ok(by) => by,
            Err(e) => return usage(e),
        };
        let Some(svc) = self.signed_ops.as_ref().and_then(|so| so.service.get()) else {
            return usage("the signed-operations service is not running in this daemon".into());
        };
        // Subscribed before submitting, so a decision that comes at once is not missed.
        let mut changes = svc.changes();
        let (what, target) = match &req {
            crate::ops::service::LocalRequest::Undo { op_id } => ("undo", op_id.clone()),
            crate::ops::service::LocalRequest::Release { op_id } => ("release", op_id.clone()),
        };
        let op_id = match svc.submit_local(req, &by).await {
            Ok(id) => id,
            Err(e) => return problem(format!("{what} not queued: {e}")),
        };
        tracing::info!(%op_id, %by, "local {what} queued");
        let deadline = tokio::time::Instant::now() + wait.min(MAX_LOCAL_WAIT);
        loop {
            let j = svc.journal().clone();
            let (id, undone) = (op_id.clone(), target.clone());
            let shown = tokio::task::spawn_blocking(move || {
                let v = crate::ops::service::show_json(&j, &id)?;
                let point = crate::ops::undo_view::show_json(
                    &j,
                    &undone,
                    crate::reconcile::journal::now_ms(),
                )?;
                Ok::<_, crate::ops::service::OpsError>((v, point))
            })
            .await;
            let (v, point) = match shown {
                Ok(Ok(x)) => x,
                Ok(Err(e)) => return problem(e),
                Err(e) => return problem(e),
            };
            let state = v
                .as_ref()
                .and_then(|v| v["state"].as_str())
                .unwrap_or("held")
                .to_string();
            let done = !matches!(state.as_str(), "held" | "running");
            let now = tokio::time::Instant::now();
            if done || now >= deadline {
                return ok(serde_json::json!({
                    "op_id": op_id,
                    "requested_by": by,
                    "state": state,
                    "final": done,
                    "operation": v,
                    "undone_op_id": target,
                    "undo_point": point,
                }));
            }
            // The service's change counter moves with every decision; the bounded step is
            // only a backstop for a change it does not count.
            let step = (deadline - now).min(Duration::from_secs(2));
            if let Ok(Err(_)) = tokio::time::timeout(step, changes.changed()).await {
                // The service is gone (shutting down): no more changes will be counted.
                tokio::time::sleep(step).await;
            }
        }
    }
}

impl Handler for DaemonHandler {
    fn handle(&self, req: Request, peer: Peer) -> BoxFut<'_, Reply> {
        Box::pin(async move {
            match req {
                Request::Status => {
                    let last_envelope = match &self.envelope {
                        Some(rx) => {
                            let saved = rx.borrow().clone();
                            serde_json::to_value(saved).unwrap_or(Value::Null)
                        }
                        None => read_envelope(&self.state_dir).unwrap_or(Value::Null),
                    };
                    let mut v = serde_json::json!({
                        "daemon": "running",
                        "pid": std::process::id(),
                        "reconcile": self.engine.status(),
                        "last_envelope": last_envelope,
                    });
                    if let Some(tests) = self.restore.get() {
                        v["restore_tests"] = restore_status(tests).await;
                    }
                    if let Some(so) = &self.signed_ops {
                        v["agent_id"] = so.agent_id.as_str().into();
                        v["agent_id_source"] = so.agent_id_source.as_str().into();
                        v["ops"] = so.trust.borrow().to_json();
                        if let Some(svc) = so.service.get() {
                            use crate::ops::OpsFeed;
                            let (held, pending) = svc.snapshot();
                            v["ops"]["held"] = serde_json::to_value(held).unwrap_or_default();
                            v["ops"]["pending_results"] = pending.len().into();
                        }
                        // The kept undo points; `status` sums the backups per storage.
                        let j = self.engine.journal().clone();
                        match tokio::task::spawn_blocking(move || crate::ops::undo_view::kept(&j))
                            .await
                        {
                            Ok(Ok(points)) => {
                                v["ops"]["undo_points"] =
                                    serde_json::to_value(points).unwrap_or_default()
                            }
                            Ok(Err(e)) => v["ops"]["undo_points_error"] = e.to_string().into(),
                            Err(e) => v["ops"]["undo_points_error"] = e.to_string().into(),
                        }
                    }
                    ok(v)
                }
                req @ (Request::SelftestTask { .. } | Request::CreateKeyctl { .. }) => {
                    match &self.mutations {
                        Some(m) => {
                            let reply = m.run(self.engine.queue().clone(), req).await;
                            // The guest may need reconciling after what the command did.
                            self.engine.kick();
                            reply
                        }
                        None => Reply::Error {
                            kind: ErrorKind::Usage,
                            message: "this daemon does not run mutating commands".into(),
                        },
                    }
                }
                Request::Plan => match self.engine.plan().await {
                    Ok(p) => ok(p),
                    Err(e) => Reply::Error {
                        kind: ErrorKind::Unreachable,
                        message: e.to_string(),
                    },
                },
                Request::JournalShow { limit } => {
                    let j = self.engine.journal().clone();
                    let limit = limit.clamp(1, 10_000) as usize;
                    match tokio::task::spawn_blocking(move || {
                        j.recent(limit).map(|e| (e, j.safe_mode()))
                    })
                    .await
                    {
                        Ok(Ok((entries, safe_mode))) => ok(serde_json::json!({
                            "safe_mode": safe_mode,
                            "entries": entries,
                        })),
                        Ok(Err(e)) => problem(e),
                        Err(e) => problem(e),
                    }
                }
                Request::OpsList { limit } => {
                    let j = self.engine.journal().clone();
                    let limit = limit.clamp(1, 10_000) as usize;
                    match tokio::task::spawn_blocking(move || {
                        let mut v = crate::ops::service::list_json(&j, limit)?;
                        v["undo_points"] = crate::ops::undo_view::list_json(
                            &j,
                            crate::reconcile::journal::now_ms(),
                        )?;
                        Ok::<_, crate::ops::service::OpsError>(v)
                    })
                    .await
                    {
                        Ok(Ok(v)) => ok(v),
                        Ok(Err(e)) => problem(e),
                        Err(e) => problem(e),
                    }
                }
                Request::OpsShow { op_id } => {
                    let j = self.engine.journal().clone();
                    match tokio::task::spawn_blocking(move || {
                        let Some(mut v) = crate::ops::service::show_json(&j, &op_id)? else {
                            return Ok(None);
                        };
                        v["undo_point"] = crate::ops::undo_view::show_json(
                            &j,
                            &op_id,
                            crate::reconcile::journal::now_ms(),
                        )?;
                        Ok::<_, crate::ops::service::OpsError>(Some(v))
                    })
                    .await
                    {
                        Ok(Ok(Some(v))) => ok(v),
                        Ok(Ok(None)) => Reply::Error {
                            kind: ErrorKind::Usage,
                            message: "no such operation in the replay store".into(),
                        },
                        Ok(Err(e)) => problem(e),
                        Err(e) => problem(e),
                    }
                }
                Request::RestoreTestRun { vmid } => {
                    let Some(tests) = self.restore.get() else {
                        return Reply::Error {
                            kind: ErrorKind::Usage,
                            message: "restore tests are not configured (restore_tests.scratch_vmids and restore_tests.storage)".into(),
                        };
                    };
                    let vmid = match vmid.map(felhom_protocol::Vmid::new).transpose() {
                        Ok(v) => v,
                        Err(e) => {
                            return Reply::Error {
                                kind: ErrorKind::Usage,
                                message: e.to_string(),
                            };
                        }
                    };
                    match tests.run(vmid).await {
                        Ok(rec) => ok(rec),
                        Err(e) => problem(e),
                    }
                }
                Request::OpsUndo {
                    op_id,
                    wait_seconds,
                } => {
                    self.local_op(
                        crate::ops::service::LocalRequest::Undo {
                            op_id: op_id.as_str().to_string(),
                        },
                        peer,
                        Duration::from_secs(wait_seconds.into()),
                    )
                    .await
                }
                Request::OpsRelease {
                    op_id,
                    wait_seconds,
                } => {
                    self.local_op(
                        crate::ops::service::LocalRequest::Release {
                            op_id: op_id.as_str().to_string(),
                        },
                        peer,
                        Duration::from_secs(wait_seconds.into()),
                    )
                    .await
                }
                Request::RestoreTestList { limit } => {
                    let j = self.engine.journal().clone();
                    let limit = limit.clamp(1, 10_000) as usize;
                    match tokio::task::spawn_blocking(move || j.restore_recent(limit)).await {
                        Ok(Ok(tests)) => ok(serde_json::json!({ "restore_tests": tests })),
                        Ok(Err(e)) => problem(e),
                        Err(e) => problem(e),
                    }
                }
                Request::JournalVerify => {
                    let j = self.engine.journal().clone();
                    match tokio::task::spawn_blocking(move || j.verify()).await {
                        Ok(Ok(report)) => {
                            self.engine.kick();
                            ok(report)
                        }
                        Ok(Err(e)) => problem(e),
                        Err(e) => problem(e),
                    }
                }
            }
        })
    }
}

/// What the daemon holds for its lifetime: the `state_dir` lock, the reconcile engine and
/// the control socket. The `run` command builds this once and keeps it until exit.
#[derive(Debug)]
pub struct DaemonParts {
    pub engine: Arc<EngineHandle>,
    pub server: ControlServer,
    /// Held last: released after the engine and the socket are gone.
    pub lock: StateLock,
}

/// Errors of [`DaemonParts::start`].
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Engine(#[from] crate::reconcile::engine::EngineError),
}

/// What the daemon adds to the control socket besides the engine.
#[derive(Default)]
pub struct DaemonOptions {
    /// The hub service's envelopes, for `status`.
    pub envelope: Option<watch::Receiver<Option<SavedEnvelope>>>,
    /// Runs `selftest --task` and `privileged create-keyctl` on the daemon's queue.
    pub mutations: Option<Arc<dyn Mutations>>,
    /// The daemon's identity and trust, for `status`.
    pub signed_ops: Option<SignedOpsView>,
    /// Filled with the restore tests once the daemon started them.
    pub restore: Arc<std::sync::OnceLock<Arc<crate::restore::RestoreTests>>>,
}

impl std::fmt::Debug for DaemonOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonOptions")
            .field("envelope", &self.envelope.is_some())
            .field("mutations", &self.mutations.is_some())
            .field("signed_ops", &self.signed_ops.is_some())
            .finish()
    }
}

impl DaemonParts {
    /// With the `state_dir` lock held (the caller takes it first, before anything else of
    /// the daemon starts, so a second daemon stops there), starts the engine (journal,
    /// queue, desired-state provider from the config) and serves the control socket.
    /// `gate` is fed from the hub's envelopes (`Gate::Open` when the hub is disabled).
    pub fn start(
        lock: StateLock,
        config: &crate::config::Config,
        pve: Arc<dyn crate::reconcile::pve::Pve>,
        gate: watch::Receiver<crate::reconcile::Gate>,
        options: DaemonOptions,
    ) -> Result<DaemonParts, DaemonError> {
        let engine = Arc::new(crate::reconcile::Engine::spawn_from_config(
            config, pve, gate,
        )?);
        let server = ControlServer::start(
            &config.control.socket,
            &lock,
            Arc::new(DaemonHandler {
                engine: engine.clone(),
                state_dir: config.state_dir.clone(),
                envelope: options.envelope,
                mutations: options.mutations,
                signed_ops: options.signed_ops,
                restore: options.restore,
            }),
        )?;
        Ok(DaemonParts {
            engine,
            server,
            lock,
        })
    }

    /// Stops taking requests, then stops the engine (running actions get `grace`).
    pub async fn shutdown(self, grace: Duration) {
        drop(self.server);
        self.engine.shutdown(grace).await;
        drop(self.lock);
    }
}

#[cfg(test)]
mod tests;
