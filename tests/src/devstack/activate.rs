//! Socket activation the way systemd does it for `felhom-privhelper-<class>.socket`
//! (`Accept=no`), for the local stack: the devstack binds and listens on the class's
//! socket itself, waits until a client connects (poll(2) on the listening socket; it
//! never accepts), then starts `felhom-privhelper serve --class C` with the listening
//! socket as fd 3 and `LISTEN_FDS=1`, `LISTEN_PID=<the helper's pid>`,
//! `LISTEN_FDNAMES=felhom-privhelper-<class>.socket`. When the helper exits after its
//! idle period the socket stays bound here, so the next connection waits in the backlog
//! and starts the helper again — idle exit and re-activation, as under systemd.
//!
//! `LISTEN_PID` must name the helper's own pid, which exists only after fork. Rust's
//! `Command` sets the environment before fork and offers no safe hook after it, so the
//! child runs a two-line `/bin/sh` trampoline that needs no unsafe code: it moves the
//! socket (handed over as stdin) to fd 3, exports `LISTEN_PID=$$` (the shell's pid) and
//! `exec`s the helper, which keeps that pid. No other descriptor is inherited: everything
//! this process opens is close-on-exec.
//!
//! A helper that exits with an error (it refused its config, say) is reported as a
//! failure and not restarted: systemd would also give up on a unit that fails at once.
//!
//! Must never: accept a connection itself, leave a helper running after [`Activator::stop`],
//! or leave the socket file behind.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use felhom_protocol::Class;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use tokio::sync::mpsc::UnboundedSender;

use super::procs::Proc;

/// Moves stdin (the listening socket) to fd 3, points stdin at /dev/null, and becomes
/// the helper with `LISTEN_PID` set to its own pid (`exec` keeps the pid).
pub const TRAMPOLINE: &str = "exec 3<&0 0</dev/null; export LISTEN_PID=$$; exec \"$0\" \"$@\"";

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("binding {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("socket {path}: {source}")]
    Setup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What an activator reports.
#[derive(Debug)]
pub enum HelperEvent {
    Activated {
        class: Class,
        pid: i32,
        /// 1 for the first activation, 2 for the next …
        n: u32,
    },
    Exited {
        class: Class,
        pid: i32,
        n: u32,
        status: ExitStatus,
        ran: Duration,
        /// We stopped it (shutdown), rather than it leaving on its own.
        stopped: bool,
    },
    /// The helper could not be started or failed at start; the class is out of service.
    Failed { class: Class, message: String },
}

/// How the helper is started.
#[derive(Debug, Clone)]
pub struct HelperCommand {
    pub bin: PathBuf,
    pub config: PathBuf,
    /// stdout and stderr of every activation, appended.
    pub log: PathBuf,
}

/// One class's socket and the thread that activates its helper.
#[derive(Debug)]
pub struct Activator {
    pub class: Class,
    pub socket: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<i32>>>,
}

/// Binds `<socket_dir>/privhelper-<class>.sock` with `mode` (and group `gid` when given),
/// listening, the way the `.socket` unit does.
pub fn bind(
    class: Class,
    socket_dir: &Path,
    mode: u32,
    gid: Option<u32>,
) -> Result<(PathBuf, UnixListener), ActivateError> {
    let path = socket_dir.join(class.socket_name());
    if let Ok(md) = std::fs::symlink_metadata(&path) {
        use std::os::unix::fs::FileTypeExt;
        if md.file_type().is_socket() {
            let _ = std::fs::remove_file(&path);
        }
    }
    let listener = UnixListener::bind(&path).map_err(|source| ActivateError::Bind {
        path: path.clone(),
        source,
    })?;
    let setup = |source| ActivateError::Setup {
        path: path.clone(),
        source,
    };
    if let Some(g) = gid {
        std::os::unix::fs::chown(&path, None, Some(g)).map_err(setup)?;
    }
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).map_err(setup)?;
    Ok((path, listener))
}

fn helper_command(class: Class, spec: &HelperCommand) -> Command {
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(TRAMPOLINE)
        .arg(&spec.bin)
        .args(["serve", "--class", class.as_str(), "--config"])
        .arg(&spec.config)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("LISTEN_FDS", "1")
        .env(
            "LISTEN_FDNAMES",
            format!("felhom-privhelper-{}.socket", class.as_str()),
        );
    cmd
}

impl Activator {
    /// Starts the activation thread for `listener` (bound at `socket`).
    pub fn start(
        class: Class,
        socket: PathBuf,
        listener: UnixListener,
        spec: HelperCommand,
        events: UnboundedSender<HelperEvent>,
    ) -> Activator {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("activate-{class}"))
            .spawn(move || activation_loop(class, listener, spec, events, s));
        Activator {
            class,
            socket,
            stop,
            thread: thread.ok(),
        }
    }

    /// Stops the helper if it runs (SIGTERM, then SIGKILL), closes and removes the socket.
    /// Returns every helper pid this activator started.
    pub fn stop(&mut self) -> Vec<i32> {
        self.stop.store(true, Ordering::SeqCst);
        let pids = self
            .thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default();
        let _ = std::fs::remove_file(&self.socket);
        pids
    }
}

impl Drop for Activator {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop();
        }
    }
}

/// Whether a connection is waiting (`None`: poll failed).
fn wait_readable(listener: &UnixListener, timeout_ms: u16) -> Option<bool> {
    let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::from(timeout_ms)) {
        Ok(n) => Some(n > 0),
        Err(nix::errno::Errno::EINTR) => Some(false),
        Err(_) => None,
    }
}

fn activation_loop(
    class: Class,
    listener: UnixListener,
    spec: HelperCommand,
    events: UnboundedSender<HelperEvent>,
    stop: Arc<AtomicBool>,
) -> Vec<i32> {
    let mut pids = Vec::new();
    let mut n = 0u32;
    let failed = |message: String| {
        let _ = events.send(HelperEvent::Failed { class, message });
    };
    while !stop.load(Ordering::SeqCst) {
        match wait_readable(&listener, 100) {
            Some(true) => {}
            Some(false) => continue,
            None => {
                failed(format!(
                    "poll on the {class} socket failed: {}",
                    std::io::Error::last_os_error()
                ));
                break;
            }
        }
        let fd = match listener.try_clone() {
            Ok(l) => OwnedFd::from(l),
            Err(e) => {
                failed(format!("duplicating the {class} socket: {e}"));
                break;
            }
        };
        let mut cmd = helper_command(class, &spec);
        let name = format!("felhom-privhelper ({class})");
        let mut helper = match Proc::spawn_with_stdin(&name, &mut cmd, &spec.log, fd) {
            Ok(p) => p,
            Err(e) => {
                failed(e.to_string());
                break;
            }
        };
        n += 1;
        pids.push(helper.pid());
        let _ = events.send(HelperEvent::Activated {
            class,
            pid: helper.pid(),
            n,
        });
        let started = Instant::now();
        let (status, stopped) = loop {
            if let Some(st) = helper.poll_exit() {
                break (Some(st), false);
            }
            if stop.load(Ordering::SeqCst) {
                break (
                    helper.stop(Duration::from_secs(3)).ok().map(|e| e.status),
                    true,
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let Some(status) = status else {
            failed(format!(
                "lost track of the {class} helper (pid {})",
                helper.pid()
            ));
            break;
        };
        let _ = events.send(HelperEvent::Exited {
            class,
            pid: helper.pid(),
            n,
            status,
            ran: started.elapsed(),
            stopped,
        });
        if !stopped && !status.success() {
            failed(format!(
                "felhom-privhelper --class {class} exited with {status} (see {})",
                spec.log.display()
            ));
            break;
        }
    }
    pids
}
