//! The local stack's child processes: starting each in its own process group with its
//! output in a log file, stopping it (SIGTERM, then SIGKILL after a grace period) and
//! reaping it, and the safety nets that keep "no process left behind" true: the devstack
//! is a child subreaper (an orphaned grandchild comes back to it and is swept at the
//! end), and a panic hook kills every registered child before the process aborts.
//!
//! Own process groups: Ctrl-C in a terminal signals the foreground process group; the
//! children are not in it, so the devstack alone decides the order in which they stop
//! (agent first, simulators last).
//!
//! Must never: signal a pid it did not start or that was already reaped (a reaped pid may
//! be reused), or return from [`Proc::stop`] before the child is reaped.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error("starting {name} ({program}): {source}")]
    Spawn {
        name: String,
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("log file {path}: {source}")]
    Log {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("waiting for {name}: {source}")]
    Wait {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("becoming a child subreaper: {0}")]
    Subreaper(#[source] nix::Error),
}

/// Pids started and not yet reaped (what the panic hook kills).
static LIVE: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());

fn live() -> std::sync::MutexGuard<'static, BTreeSet<i32>> {
    LIVE.lock().unwrap_or_else(|p| p.into_inner())
}

/// Records a started child (its pid is also its process group id).
pub fn register(pid: i32) {
    live().insert(pid);
}

/// Forgets a reaped child.
pub fn unregister(pid: i32) {
    live().remove(&pid);
}

/// Kills every registered child's process group, then runs the default hook. Under
/// `panic = "abort"` no destructor runs after a panic, so this is the last chance.
pub fn install_panic_hook() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if let Ok(pids) = LIVE.try_lock() {
            for &pid in pids.iter() {
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        default(info);
    }));
}

/// Orphaned descendants (a helper's tool whose helper was killed, say) are re-parented
/// to us instead of init, so [`sweep`] can find and reap them.
pub fn become_subreaper() -> Result<(), ProcError> {
    nix::sys::prctl::set_child_subreaper(true).map_err(ProcError::Subreaper)
}

/// Opens (appending) a log file for a child's stdout/stderr.
pub fn log_file(path: &Path) -> Result<File, ProcError> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| ProcError::Log {
            path: path.to_path_buf(),
            source,
        })
}

/// One child process.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    pub log: PathBuf,
    pub started: Instant,
    child: Child,
    exit: Option<ExitStatus>,
}

/// How a [`Proc`] ended.
#[derive(Debug, Clone, Copy)]
pub struct Ended {
    pub status: ExitStatus,
    /// It needed SIGKILL after the grace period.
    pub killed: bool,
    /// It had exited before we asked it to stop.
    pub already: bool,
}

impl Proc {
    /// Starts `cmd` in its own process group, stdin from /dev/null, stdout and stderr
    /// appended to `log`.
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> Result<Proc, ProcError> {
        Self::spawn_with_stdin(name, cmd, log, Stdio::null())
    }

    /// Like [`Proc::spawn`] with `stdin` as the child's fd 0.
    pub fn spawn_with_stdin(
        name: &str,
        cmd: &mut Command,
        log: &Path,
        stdin: impl Into<Stdio>,
    ) -> Result<Proc, ProcError> {
        cmd.stdin(stdin);
        let out = log_file(log)?;
        let err = out.try_clone().map_err(|source| ProcError::Log {
            path: log.to_path_buf(),
            source,
        })?;
        cmd.stdout(out).stderr(err);
        Self::spawn_raw(name, cmd, log)
    }

    /// Like [`Proc::spawn`], but stdout is a pipe handed back (a simulator's start line);
    /// stderr goes to `log`.
    pub fn spawn_piped(
        name: &str,
        cmd: &mut Command,
        log: &Path,
    ) -> Result<(Proc, ChildStdout), ProcError> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file(log)?);
        let mut p = Self::spawn_raw(name, cmd, log)?;
        let out = p.child.stdout.take().ok_or_else(|| ProcError::Spawn {
            name: name.to_owned(),
            program: format!("{:?}", cmd.get_program()),
            source: std::io::Error::other("no stdout pipe"),
        })?;
        Ok((p, out))
    }

    fn spawn_raw(name: &str, cmd: &mut Command, log: &Path) -> Result<Proc, ProcError> {
        cmd.process_group(0);
        let child = cmd.spawn().map_err(|source| ProcError::Spawn {
            name: name.to_owned(),
            program: cmd.get_program().to_string_lossy().into_owned(),
            source,
        })?;
        register(child.id() as i32);
        Ok(Proc {
            name: name.to_owned(),
            log: log.to_path_buf(),
            started: Instant::now(),
            child,
            exit: None,
        })
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Its exit status if it has exited (reaped now if it just did).
    pub fn poll_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none()
            && let Ok(Some(st)) = self.child.try_wait()
        {
            unregister(self.pid());
            self.exit = Some(st);
        }
        self.exit
    }

    /// Waits up to `within` for it to exit on its own.
    pub fn wait_for(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = self.poll_exit() {
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, up to `grace` to exit, then SIGKILL; always reaped on return.
    pub fn stop(&mut self, grace: Duration) -> Result<Ended, ProcError> {
        if let Some(status) = self.poll_exit() {
            return Ok(Ended {
                status,
                killed: false,
                already: true,
            });
        }
        let _ = kill(Pid::from_raw(self.pid()), Signal::SIGTERM);
        if let Some(status) = self.wait_for(grace) {
            return Ok(Ended {
                status,
                killed: false,
                already: false,
            });
        }
        let _ = killpg(Pid::from_raw(self.pid()), Signal::SIGKILL);
        let status = self.child.wait().map_err(|source| ProcError::Wait {
            name: self.name.clone(),
            source,
        })?;
        unregister(self.pid());
        self.exit = Some(status);
        Ok(Ended {
            status,
            killed: true,
            already: false,
        })
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Only reached on an error path that skipped `stop`; never leave it running.
        if self.exit.is_none() {
            let _ = self.stop(Duration::from_secs(2));
        }
    }
}

/// Pids whose parent is `parent`, with their command names (from /proc).
pub fn children_of(parent: i32) -> Vec<(i32, String)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ppid …; comm may contain spaces and parentheses.
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let comm = stat
            .find('(')
            .map(|open| stat[open + 1..close].to_string())
            .unwrap_or_default();
        let ppid = stat[close + 1..]
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<i32>().ok());
        if ppid == Some(parent) {
            out.push((pid, comm));
        }
    }
    out
}

/// Finds every child still ours (orphaned grandchildren included, as we are a
/// subreaper), stops and reaps them. Returns what was found ("name (pid N)").
pub fn sweep(grace: Duration) -> Vec<String> {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    let me = std::process::id() as i32;
    let found = children_of(me);
    let names: Vec<String> = found
        .iter()
        .map(|(pid, comm)| format!("{comm} (pid {pid})"))
        .collect();
    for (pid, _) in &found {
        let _ = kill(Pid::from_raw(*pid), Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    let mut left: Vec<i32> = found.iter().map(|(p, _)| *p).collect();
    while !left.is_empty() {
        left.retain(|&pid| {
            !matches!(
                waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)),
                Ok(WaitStatus::Exited(..)) | Ok(WaitStatus::Signaled(..)) | Err(_)
            )
        });
        if Instant::now() >= deadline {
            for &pid in &left {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                let _ = waitpid(Pid::from_raw(pid), None);
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for (pid, _) in &found {
        unregister(*pid);
    }
    names
}

/// Whether `pid` still exists (zombies included).
pub fn alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}
