//! The accept loop and one connection's state machine.
//!
//! Per connection: check the peer (`SO_PEERCRED`: root or the agent's uid; at most
//! [`MAX_OPEN_PER_UID`] open connections per uid other than root), then the first frame
//! must be `Hello` with our protocol version; after that `Ping` and the operations of
//! this instance's class. Anything refused (limit, peer, version, handshake, framing,
//! class, validation) is answered with a typed error where a frame can still be sent,
//! audited (coalesced per uid, see [`PeerBook`]), and ends that connection at once: the
//! helper keeps serving. Every frame is read, and every reply written, against an
//! absolute deadline ([`FRAME_DEADLINE`]), so a peer trickling bytes holds a thread for
//! that long at most. Operations run one at a time per instance; each has an
//! intent record on disk before it runs and an outcome record written before its reply
//! (and synced while the reply is on its way, see [`Server::reply_and_record`]).
//!
//! The loop exits after `idle_exit` without connections; systemd starts it again.

use std::io::{BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use felhom_protocol::{
    Class, ErrorKind, FrameError, MAX_REQUEST_FRAME, PROTOCOL_VERSION, Request, Response,
    decode_request, encode_response, frame_len,
};
use serde_json::{Value, json};

use crate::audit::{AuditLog, Entry};
use crate::config::{Config, Tools};
use crate::ops::{self, OpError, System, Verdict};
use crate::peer::{MAX_OPEN_PER_UID, Peer, PeerBook, Refusals, Refused};

/// How long a connected client may take to send a whole frame, counted from when we
/// start waiting for it (idle time before it included: the agent's client sends its
/// request right after the handshake and closes), and to take a whole reply.
const FRAME_DEADLINE: Duration = Duration::from_secs(10);
/// Connections served at once; further ones wait in the listen backlog.
const MAX_CONNECTIONS: usize = 32;

pub struct Server {
    pub class: Class,
    pub cfg: Config,
    pub tools: Tools,
    pub audit: AuditLog,
    pub sys: Box<dyn System + Send + Sync>,
    op_lock: Mutex<()>,
    peers: PeerBook,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("class", &self.class)
            .finish_non_exhaustive()
    }
}

pub fn log(class: Class, msg: &str) {
    eprintln!("felhom-privhelper[{class}]: {msg}");
}

impl Server {
    pub fn new(
        class: Class,
        cfg: Config,
        tools: Tools,
        audit: AuditLog,
        sys: Box<dyn System + Send + Sync>,
    ) -> Self {
        Server {
            class,
            cfg,
            tools,
            audit,
            sys,
            op_lock: Mutex::new(()),
            peers: PeerBook::default(),
        }
    }

    /// Serves until idle for `idle_exit`.
    ///
    /// Leader and followers: the thread holding the accept token waits for a connection,
    /// accepts it, passes the token on to an idle thread and serves the connection
    /// itself, so a connection is served by the very thread its arrival woke (no
    /// hand-over on its path; instrumented, that hop cost ~20 µs on a loaded host).
    /// Threads stay for the life of the process, at most [`MAX_CONNECTIONS`]; one is
    /// started when the leader finds none idle to take the token (further connections
    /// wait in the listen backlog). Only the token holder accepts, so its decision to
    /// exit when idle never races a connection it accepted.
    pub fn run(self: Arc<Self>, listener: UnixListener) -> std::io::Result<()> {
        let pool = Arc::new(Pool {
            listener,
            token: Mutex::new(()),
            exiting: AtomicBool::new(false),
            active: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            workers: AtomicUsize::new(0),
            last_activity: Mutex::new(Instant::now()),
        });
        let (exit_tx, exit_rx) = mpsc::channel::<std::io::Result<()>>();
        // Two threads from the start: a leader and one to take over when it serves.
        for _ in 0..2 {
            spawn_worker(&self, &pool, &exit_tx);
        }
        drop(exit_tx);
        exit_rx.recv().unwrap_or_else(|_| {
            Err(std::io::Error::other(
                "no connection thread could be started",
            ))
        })
    }

    /// One connection thread: follower (waiting for the token), leader (waiting for a
    /// connection), then serving what it accepted.
    fn worker(self: Arc<Self>, pool: Arc<Pool>, exit: mpsc::Sender<std::io::Result<()>>) {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        use std::os::fd::AsFd;
        loop {
            pool.waiting.fetch_add(1, Ordering::SeqCst);
            let token = pool.token.lock().unwrap_or_else(|p| p.into_inner());
            pool.waiting.fetch_sub(1, Ordering::SeqCst);
            if pool.exiting.load(Ordering::SeqCst) {
                return;
            }
            let stream = loop {
                let ready = {
                    let mut fds = [PollFd::new(pool.listener.as_fd(), PollFlags::POLLIN)];
                    match poll(&mut fds, PollTimeout::from(500u16)) {
                        Ok(n) => n > 0,
                        Err(nix::errno::Errno::EINTR) => false,
                        Err(e) => {
                            pool.exiting.store(true, Ordering::SeqCst);
                            let _ = exit.send(Err(e.into()));
                            return;
                        }
                    }
                };
                if !ready {
                    self.record_refusals(false);
                    if pool.active.load(Ordering::SeqCst) == 0
                        && pool.idle_for() >= self.cfg.idle_exit
                    {
                        self.record_refusals(true);
                        log(self.class, "idle, exiting (the socket starts us again)");
                        pool.exiting.store(true, Ordering::SeqCst);
                        let _ = exit.send(Ok(()));
                        return;
                    }
                    continue;
                }
                match pool.listener.accept() {
                    Ok((s, _)) => break s,
                    Err(e) => {
                        log(self.class, &format!("accept: {e}"));
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            };
            pool.active.fetch_add(1, Ordering::SeqCst);
            pool.touch();
            if pool.waiting.load(Ordering::SeqCst) == 0
                && pool.workers.load(Ordering::SeqCst) < MAX_CONNECTIONS
            {
                spawn_worker(&self, &pool, &exit);
            }
            drop(token);
            self.connection(stream);
            pool.touch();
            pool.active.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn base(&self, kind: &'static str, peer: &Peer) -> Entry {
        Entry::new(kind)
            .with("class", self.class.as_str())
            .with("peer", serde_json::to_value(peer).unwrap_or(Value::Null))
    }

    fn audit(&self, e: &Entry) -> Result<u64, ()> {
        self.audit.append(e).map_err(|err| {
            log(self.class, &format!("AUDIT WRITE FAILED: {err}"));
        })
    }

    /// Audits a refusal (coalesced per uid, see [`PeerBook`]) and answers it when `conn`
    /// is given; the caller then ends the connection.
    fn refuse(&self, conn: Option<&mut Conn>, peer: &Peer, r: Refusal<'_>) {
        let Refusal {
            category,
            kind,
            message,
            op,
            args,
        } = r;
        let now = Instant::now();
        let due = self.peers.refused(
            Refused {
                peer: peer.clone(),
                category,
                error: kind.as_str(),
                reason: message.clone(),
                op: op.map(str::to_string),
                args,
            },
            now,
        );
        // On disk before the refusal is answered (when it is not counted into the next).
        for r in due.into_iter().chain(self.peers.due(now, false)) {
            self.record_refused(&r);
        }
        if let Some(conn) = conn {
            let _ = conn.send(&Response::Error { kind, message });
        }
    }

    /// Writes one `refused` record standing for `r.count` refusals of one uid: the last
    /// one in full, all of them counted by category.
    fn record_refused(&self, r: &Refusals) {
        let last = &r.last;
        let e = self
            .base("refused", &last.peer)
            .with("result", "denied")
            .with("category", last.category)
            .with("error", last.error)
            .with("reason", last.reason.clone())
            .with(
                "op",
                last.op.clone().map(Value::from).unwrap_or(Value::Null),
            )
            .with("args", last.args.clone())
            .with("count", r.count)
            .with(
                "categories",
                r.categories
                    .iter()
                    .map(|(k, v)| ((*k).to_string(), Value::from(*v)))
                    .collect::<serde_json::Map<_, _>>(),
            );
        let _ = self.audit(&e);
        log(
            self.class,
            &format!(
                "refused ({}) pid {} uid {}: {}{}",
                last.category,
                last.peer.pid,
                last.peer.uid,
                last.reason,
                if r.count > 1 {
                    format!(" (and {} more refusals of this uid)", r.count - 1)
                } else {
                    String::new()
                }
            ),
        );
    }

    /// Writes the counted refusals whose window has passed (`all`: every one).
    fn record_refusals(&self, all: bool) {
        for r in self.peers.due(Instant::now(), all) {
            self.record_refused(&r);
        }
    }

    fn connection(&self, stream: UnixStream) {
        let peer = match Peer::of(&stream) {
            Ok(p) => p,
            Err(e) => {
                log(self.class, &format!("SO_PEERCRED: {e}"));
                return;
            }
        };
        let Some(_admitted) = self.peers.admit(peer.uid) else {
            self.refuse(
                None,
                &peer,
                Refusal {
                    category: "limit",
                    kind: ErrorKind::PeerRefused,
                    message: format!(
                        "uid {} already has {MAX_OPEN_PER_UID} connections open",
                        peer.uid
                    ),
                    op: None,
                    args: Value::Null,
                },
            );
            // Closed at once, unanswered: answering could block on this very peer.
            return;
        };
        if !peer.allowed(self.cfg.agent_uid) {
            let msg = format!(
                "uid {} is not served (only root and the agent's uid {})",
                peer.uid, self.cfg.agent_uid
            );
            let bytes = encode_response(&Response::Error {
                kind: ErrorKind::PeerRefused,
                message: msg.clone(),
            })
            .unwrap_or_default();
            self.refuse(
                None,
                &peer,
                Refusal {
                    category: "peer",
                    kind: ErrorKind::PeerRefused,
                    message: msg,
                    op: None,
                    args: Value::Null,
                },
            );
            // The answer goes out only if the socket takes it at once, and the connection
            // is closed at once: nothing this peer does can hold the thread. What it
            // already sent is read off first (without waiting), so its side sees the
            // answer and an orderly end rather than a reset.
            send_without_blocking(&stream, &bytes);
            let _ = stream.shutdown(std::net::Shutdown::Write);
            drain_without_blocking(&stream);
            return;
        }
        let mut conn = Conn::new(stream);
        let mut greeted = false;
        loop {
            conn.reader.get_mut().deadline = Some(Instant::now() + FRAME_DEADLINE);
            let req = match read_frame(&mut conn.reader) {
                Ok(None) => return,
                Ok(Some(Ok(req))) => req,
                Ok(Some(Err(FrameError::Invalid(msg)))) => {
                    self.refuse(
                        Some(&mut conn),
                        &peer,
                        Refusal {
                            category: "validation",
                            kind: ErrorKind::Invalid,
                            message: msg,
                            op: None,
                            args: Value::Null,
                        },
                    );
                    return;
                }
                Ok(Some(Err(e))) => {
                    self.refuse(
                        Some(&mut conn),
                        &peer,
                        Refusal {
                            category: "framing",
                            kind: ErrorKind::Framing,
                            message: e.to_string(),
                            op: None,
                            args: Value::Null,
                        },
                    );
                    return;
                }
                Err(e) => {
                    self.refuse(
                        Some(&mut conn),
                        &peer,
                        Refusal {
                            category: "framing",
                            kind: ErrorKind::Framing,
                            message: format!("reading a frame: {e}"),
                            op: None,
                            args: Value::Null,
                        },
                    );
                    return;
                }
            };
            match req {
                Request::Hello { version } if version == PROTOCOL_VERSION => {
                    greeted = true;
                    let hello = Response::Hello {
                        version: PROTOCOL_VERSION,
                        class: self.class,
                    };
                    if conn.send_or_hold(&hello).is_err() {
                        return;
                    }
                }
                Request::Hello { version } => {
                    let msg = format!(
                        "protocol version mismatch: client speaks {version}, this helper speaks {PROTOCOL_VERSION}"
                    );
                    self.refuse(
                        Some(&mut conn),
                        &peer,
                        Refusal {
                            category: "version",
                            kind: ErrorKind::VersionMismatch,
                            message: msg,
                            op: None,
                            args: json!({"version": version}),
                        },
                    );
                    return;
                }
                _ if !greeted => {
                    let op = req.operation().map(|o| o.as_str());
                    self.refuse(
                        Some(&mut conn),
                        &peer,
                        Refusal {
                            category: "handshake",
                            kind: ErrorKind::HandshakeRequired,
                            message: "the first frame must be Hello".into(),
                            op,
                            args: Value::Null,
                        },
                    );
                    return;
                }
                Request::Ping => {
                    if conn.send(&Response::Pong { class: self.class }).is_err() {
                        return;
                    }
                }
                req => {
                    let Some(op) = req.operation() else { return };
                    if op.class() != self.class {
                        let msg = format!(
                            "{op} belongs to the {} helper; this is the {} helper",
                            op.class(),
                            self.class
                        );
                        self.refuse(
                            Some(&mut conn),
                            &peer,
                            Refusal {
                                category: "class",
                                kind: ErrorKind::WrongClass,
                                message: msg,
                                op: Some(op.as_str()),
                                args: Value::Null,
                            },
                        );
                        return;
                    }
                    let (resp, outcome) = self.execute(&peer, &req);
                    if self.reply_and_record(&mut conn, &resp, outcome).is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// Sends an operation's reply and makes its outcome record durable: the record is
    /// written first, the reply goes out while the writers' lock is still held, and the
    /// record is synced and named by the head after that, so the client does not wait for
    /// the fdatasync and no reader under the lock sees the head behind the log. A reply
    /// too big for the socket buffer is finished after the lock is released.
    fn reply_and_record(
        &self,
        conn: &mut Conn,
        resp: &Response,
        outcome: Option<Entry>,
    ) -> std::io::Result<()> {
        let bytes = conn.after_held(encode_response(resp).map_err(std::io::Error::other)?);
        let stream = conn.stream();
        let sent = match outcome {
            None => 0,
            Some(outcome) => match self
                .audit
                .append_then(&outcome, |_| send_without_blocking(stream, &bytes))
            {
                Ok((_, sent)) => sent,
                Err((err, sent)) => {
                    log(self.class, &format!("AUDIT WRITE FAILED: {err}"));
                    sent.unwrap_or(0)
                }
            },
        };
        write_until(stream, &bytes[sent..], Instant::now() + FRAME_DEADLINE)
    }

    /// Runs one operation between its intent record (on disk first) and its outcome
    /// (returned for [`Server::reply_and_record`]; `None` when the intent could not be
    /// written and nothing ran).
    fn execute(&self, peer: &Peer, req: &Request) -> (Response, Option<Entry>) {
        let Some(op) = req.operation() else {
            return (
                Response::Error {
                    kind: ErrorKind::Internal,
                    message: "not an operation".into(),
                },
                None,
            );
        };
        let args = match req {
            Request::PctCreateKeyctl(spec) => ops::pct_audit_args(spec),
            Request::UsbMount { device, name } => {
                json!({"device": device.as_str(), "name": name.as_str()})
            }
            Request::UsbUnmount { name } => json!({"name": name.as_str()}),
            Request::SmartRead { device } => json!({"device": device.as_str()}),
            Request::Hello { .. } | Request::Ping => Value::Null,
        };
        let _serial = self.op_lock.lock().unwrap_or_else(|p| p.into_inner());
        let intent = self
            .base("intent", peer)
            .with("op", op.as_str())
            .with("args", args.clone());
        // On disk before anything runs.
        let Ok(intent_seq) = self.audit(&intent) else {
            return (
                Response::Error {
                    kind: ErrorKind::Audit,
                    message: "the audit log cannot be written; nothing was executed".into(),
                },
                None,
            );
        };
        let started = Instant::now();
        let sys = self.sys.as_ref();
        let result: Result<(Response, Value), OpError> = match req {
            Request::SmartRead { device } => {
                ops::smart_read(sys, &self.tools, self.cfg.tool_timeout, device)
            }
            Request::PctCreateKeyctl(spec) => {
                ops::pct_create(sys, &self.tools, self.cfg.pct_timeout, spec)
            }
            Request::UsbMount { device, name } => {
                ops::usb_mount(sys, &self.cfg, &self.tools, device, name)
            }
            Request::UsbUnmount { name } => ops::usb_unmount(sys, &self.cfg, name),
            Request::Hello { .. } | Request::Ping => unreachable_op(),
        };
        let duration_ms = started.elapsed().as_secs_f64() * 1000.0;
        let mut outcome = self
            .base("outcome", peer)
            .with("op", op.as_str())
            .with("args", args)
            .with("intent_seq", intent_seq)
            .with("duration_ms", (duration_ms * 1000.0).round() / 1000.0);
        let resp = match result {
            Ok((resp, detail)) => {
                outcome = outcome.with("result", "ok").with("detail", detail);
                resp
            }
            Err(e) => {
                let verdict = match e.verdict {
                    Verdict::Denied => "denied",
                    Verdict::Failed => "failed",
                };
                outcome = outcome
                    .with("result", verdict)
                    .with("error", e.kind.as_str())
                    .with("reason", e.message.clone());
                Response::Error {
                    kind: e.kind,
                    message: e.message,
                }
            }
        };
        (resp, Some(outcome))
    }
}

/// The connection threads' shared state (see [`Server::run`]).
struct Pool {
    listener: UnixListener,
    /// Held by the one thread that waits for and accepts the next connection.
    token: Mutex<()>,
    /// Set by the leader that decided to exit (idle or a fatal error): no one accepts.
    exiting: AtomicBool,
    /// Connections being served.
    active: AtomicUsize,
    /// Threads waiting for the token.
    waiting: AtomicUsize,
    workers: AtomicUsize,
    last_activity: Mutex<Instant>,
}

impl Pool {
    fn touch(&self) {
        *self.last_activity.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    fn idle_for(&self) -> Duration {
        self.last_activity
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
    }
}

/// Starts one more connection thread (counted in `pool.workers`); a failure is logged
/// and the pool goes on with the threads it has.
fn spawn_worker(server: &Arc<Server>, pool: &Arc<Pool>, exit: &mpsc::Sender<std::io::Result<()>>) {
    let (me, p, x) = (Arc::clone(server), Arc::clone(pool), exit.clone());
    pool.workers.fetch_add(1, Ordering::SeqCst);
    let spawned = std::thread::Builder::new()
        .name("conn".into())
        .spawn(move || me.worker(p, x));
    if let Err(e) = spawned {
        pool.workers.fetch_sub(1, Ordering::SeqCst);
        log(
            server.class,
            &format!("cannot start a connection thread: {e}"),
        );
    }
}

/// One refusal: what kind, why, and the operation and arguments where known.
struct Refusal<'a> {
    category: &'static str,
    kind: ErrorKind,
    message: String,
    op: Option<&'a str>,
    args: Value,
}

fn unreachable_op() -> Result<(Response, Value), OpError> {
    Err(OpError {
        kind: ErrorKind::Internal,
        verdict: Verdict::Failed,
        message: "control frame routed as an operation".into(),
    })
}

/// `Ok(None)`: clean EOF between frames. `Ok(Some(Err))`: a bad frame. `Err`: I/O (a
/// truncated frame or a timeout).
fn read_frame(stream: &mut impl Read) -> std::io::Result<Option<Result<Request, FrameError>>> {
    let mut header = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match stream.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            // Idle between frames for the whole read timeout: close quietly (a slow
            // partial frame is a framing fault, reported below).
            Err(e)
                if got == 0
                    && matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
            {
                return Ok(None);
            }
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("truncated header ({got} of 4 bytes)"),
                ));
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let len = match frame_len(header, MAX_REQUEST_FRAME) {
        Ok(l) => l,
        Err(e) => return Ok(Some(Err(e))),
    };
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            std::io::Error::new(
                e.kind(),
                format!("truncated frame: expected {len} bytes of payload"),
            )
        } else {
            e
        }
    })?;
    Ok(Some(decode_request(&payload)))
}

/// Writes all of `bytes` by `deadline` (each `write` waits only for what is left of it).
fn write_until(stream: &mut UnixStream, bytes: &[u8], deadline: Instant) -> std::io::Result<()> {
    let mut done = 0;
    while done < bytes.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client did not take the reply in time",
            ));
        }
        stream.set_write_timeout(Some(left))?;
        match stream.write(&bytes[done..]) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads and discards what the peer has already sent (at most 64 KiB), without waiting.
fn drain_without_blocking(stream: &UnixStream) {
    use nix::sys::socket::{MsgFlags, recv};
    use std::os::fd::AsRawFd;
    let mut buf = [0u8; 4096];
    for _ in 0..16 {
        match recv(stream.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// The connection's socket as the frame reader sees it: every `read` waits only for what
/// is left until `deadline` (set per frame), so the frame as a whole is bounded, however
/// the peer spaces its bytes.
struct Timed {
    stream: UnixStream,
    deadline: Option<Instant>,
}

impl Read for Timed {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if let Some(deadline) = self.deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "frame deadline passed",
                ));
            }
            self.stream.set_read_timeout(Some(left))?;
        }
        self.stream.read(buf)
    }
}

/// Sends as much of `bytes` as the socket takes without waiting; returns how much.
fn send_without_blocking(stream: &UnixStream, bytes: &[u8]) -> usize {
    use nix::sys::socket::{MsgFlags, send as sock_send};
    use std::os::fd::AsRawFd;
    let mut sent = 0;
    while sent < bytes.len() {
        match sock_send(
            stream.as_raw_fd(),
            &bytes[sent..],
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        ) {
            Ok(0) => break,
            Ok(n) => sent += n,
            Err(nix::errno::Errno::EINTR) => {}
            // EAGAIN: the rest goes out blocking, after the lock is released; any other
            // error shows up again there.
            Err(_) => break,
        }
    }
    sent
}

/// One client's connection: requests are read through a buffer (a Hello the client
/// pipelined with its request arrives in the same read), replies go straight out.
///
/// The answer to a Hello is held back while the client's next frame is already here,
/// and goes out in the same write as the next reply: the client, which sent both
/// frames at once, then wakes once instead of twice. At most one answer is held (a
/// client streaming Hellos without reading gets them answered one by one, as socket
/// back-pressure expects), every later reply or refusal sends it first, and it is sent
/// when the connection ends.
struct Conn {
    reader: BufReader<Timed>,
    held: Vec<u8>,
}

impl Conn {
    fn new(stream: UnixStream) -> Self {
        Conn {
            reader: BufReader::new(Timed {
                stream,
                deadline: None,
            }),
            held: Vec::new(),
        }
    }

    fn stream(&mut self) -> &mut UnixStream {
        &mut self.reader.get_mut().stream
    }

    /// `bytes` preceded by the held answer, if any (which is no longer held).
    fn after_held(&mut self, bytes: Vec<u8>) -> Vec<u8> {
        if self.held.is_empty() {
            return bytes;
        }
        let mut out = std::mem::take(&mut self.held);
        out.extend_from_slice(&bytes);
        out
    }

    fn send(&mut self, resp: &Response) -> std::io::Result<()> {
        let bytes = self.after_held(encode_response(resp).map_err(std::io::Error::other)?);
        write_until(self.stream(), &bytes, Instant::now() + FRAME_DEADLINE)
    }

    /// Sends `resp`, or holds it when nothing is held yet and a whole next frame is
    /// already buffered (its reply will carry this one).
    fn send_or_hold(&mut self, resp: &Response) -> std::io::Result<()> {
        let buffered = self.reader.buffer();
        let next_frame_here = buffered.len() >= 4
            && frame_len(
                [buffered[0], buffered[1], buffered[2], buffered[3]],
                MAX_REQUEST_FRAME,
            )
            .is_ok_and(|len| buffered.len() - 4 >= len);
        if self.held.is_empty() && next_frame_here {
            self.held = encode_response(resp).map_err(std::io::Error::other)?;
            return Ok(());
        }
        self.send(resp)
    }
}

impl Drop for Conn {
    /// A held answer still goes out when the connection ends (e.g. the client sent Hello
    /// and a frame, then closed its side).
    fn drop(&mut self) {
        if !self.held.is_empty() {
            let held = std::mem::take(&mut self.held);
            let _ = write_until(self.stream(), &held, Instant::now() + FRAME_DEADLINE);
        }
    }
}
