//! Running a tool: the configured absolute path, a fixed argv, never a shell, a cleared
//! environment (only a fixed `PATH` and `LC_ALL=C` are set, never inherited), stdin from
//! /dev/null, its own process group (killed whole on timeout), and capped output.
//!
//! The tool inherits the capability bounding set this instance dropped to at start
//! (see [`crate::capability`]), or, with [`ToolCaps::None`], starts with no capabilities
//! at all ([`crate::sys::exec_without_capabilities`]); nothing here raises anything.

use std::ffi::OsString;
use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The only environment a tool sees.
pub const TOOL_ENV: [(&str, &str); 2] =
    [("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), ("LC_ALL", "C")];

/// The capabilities a tool starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolCaps {
    /// What a uid-0 program gets on exec: the instance's bounding set (smartctl, pct).
    Class,
    /// None (effective, permitted, inheritable and ambient empty, `no_new_privs` set):
    /// blkid, which parses a file system from media someone else prepared.
    None,
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub timeout: Duration,
    pub stdout_cap: usize,
    pub stderr_cap: usize,
}

#[derive(Debug)]
pub struct ToolOutput {
    pub stdout: Vec<u8>,
    pub stdout_truncated: bool,
    pub stderr: Vec<u8>,
    /// Exit code, or `None` when a signal ended it.
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("cannot start {tool}: {source}")]
    Spawn {
        tool: String,
        source: std::io::Error,
    },
    #[error("{tool} did not finish within {secs} s and was killed")]
    Timeout { tool: String, secs: u64 },
    #[error("waiting for {tool}: {source}")]
    Wait {
        tool: String,
        source: std::io::Error,
    },
}

/// Output kept from one pipe: at most `cap` bytes, the rest drained and noted.
struct Capped {
    kept: Vec<u8>,
    cap: usize,
    truncated: bool,
}

impl Capped {
    fn new(cap: usize) -> Self {
        Capped {
            kept: Vec::new(),
            cap,
            truncated: false,
        }
    }
    fn push(&mut self, data: &[u8]) {
        let room = self.cap.saturating_sub(self.kept.len());
        if data.len() > room {
            self.truncated = true;
        }
        self.kept.extend_from_slice(&data[..data.len().min(room)]);
    }
}

/// Runs `tool args…` under `limits`. Both pipes are read in this thread with poll(2)
/// (no helper threads: fewer wake-ups on a loaded host), until both reach EOF or the
/// deadline passes; then the tool is reaped.
pub fn run(
    tool: &Path,
    args: &[OsString],
    limits: Limits,
    caps: ToolCaps,
) -> Result<ToolOutput, ExecError> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;

    let name = tool.display().to_string();
    let mut cmd = Command::new(tool);
    cmd.args(args)
        .env_clear()
        .envs(TOOL_ENV)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    if caps == ToolCaps::None {
        crate::sys::exec_without_capabilities(&mut cmd);
    }
    let mut child = cmd.spawn().map_err(|source| ExecError::Spawn {
        tool: name.clone(),
        source,
    })?;
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let deadline = Instant::now() + limits.timeout;
    let mut out = Capped::new(limits.stdout_cap);
    let mut err = Capped::new(limits.stderr_cap);
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let mut buf = [0u8; 16 * 1024];
    // Readable once the tool has exited (so its exit wakes the same poll as its output);
    // without pidfd support we fall back to checking between short polls.
    let pidfd = crate::sys::pidfd_open(pid.as_raw()).ok();
    // Set once the tool has exited: descendants that kept its pipes open get a short
    // grace period, not the whole timeout.
    let mut exited: Option<(std::process::ExitStatus, Instant)> = None;
    loop {
        let pipes_open = stdout.is_some() || stderr.is_some();
        if exited.is_some() && !pipes_open {
            break;
        }
        let now = Instant::now();
        if let Some((_, grace)) = exited
            && now >= grace
        {
            break;
        }
        let left = deadline.saturating_duration_since(now);
        if left.is_zero() {
            break;
        }
        let left = match exited {
            Some((_, grace)) => left.min(grace.saturating_duration_since(now)),
            None => left,
        };
        let cap_ms = if pidfd.is_some() { 60_000 } else { 10 };
        let timeout = PollTimeout::try_from(left.as_millis().clamp(1, cap_ms) as u64)
            .unwrap_or(PollTimeout::MAX);
        let (out_ready, err_ready, exit_ready) = {
            let mut fds = Vec::with_capacity(3);
            if let Some(o) = &stdout {
                fds.push(PollFd::new(o.as_fd(), PollFlags::POLLIN));
            }
            if let Some(e) = &stderr {
                fds.push(PollFd::new(e.as_fd(), PollFlags::POLLIN));
            }
            if exited.is_none()
                && let Some(p) = &pidfd
            {
                fds.push(PollFd::new(p.as_fd(), PollFlags::POLLIN));
            }
            match poll(&mut fds, timeout) {
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    return Err(ExecError::Wait {
                        tool: name,
                        source: e.into(),
                    });
                }
            }
            let ready = |fd: &PollFd<'_>| fd.revents().is_some_and(|r| !r.is_empty());
            let mut it = fds.iter();
            let o = stdout.is_some() && it.next().is_some_and(ready);
            let e = stderr.is_some() && it.next().is_some_and(ready);
            let x = exited.is_none() && pidfd.is_some() && it.next().is_some_and(ready);
            (o, e, x)
        };
        if exited.is_none() && (exit_ready || pidfd.is_none() || !pipes_open) {
            match child.try_wait() {
                Ok(Some(st)) => exited = Some((st, Instant::now() + Duration::from_millis(500))),
                Ok(None) => {}
                Err(source) => return Err(ExecError::Wait { tool: name, source }),
            }
        }
        if out_ready && let Some(o) = stdout.as_mut() {
            match o.read(&mut buf) {
                Ok(0) => stdout = None,
                Ok(n) => out.push(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => stdout = None,
            }
        }
        if err_ready && let Some(e) = stderr.as_mut() {
            match e.read(&mut buf) {
                Ok(0) => stderr = None,
                Ok(n) => err.push(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => stderr = None,
            }
        }
    }
    let status = match exited {
        Some((st, _)) => Some(st),
        None => {
            // Out of time (or the tool never exited while its pipes were open): the whole
            // process group — the tool and whatever it started.
            let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait();
            None
        }
    };
    let Some(status) = status else {
        return Err(ExecError::Timeout {
            tool: name,
            secs: limits.timeout.as_secs(),
        });
    };
    Ok(ToolOutput {
        stdout: out.kept,
        stdout_truncated: out.truncated,
        stderr: err.kept,
        code: status.code(),
        signal: status.signal(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(ms: u64) -> Limits {
        Limits {
            timeout: Duration::from_millis(ms),
            stdout_cap: 10,
            stderr_cap: 100,
        }
    }

    #[test]
    fn cleared_env_cap_and_status() {
        let out = run(
            Path::new("/usr/bin/env"),
            &[],
            Limits {
                timeout: Duration::from_secs(10),
                stdout_cap: 4096,
                stderr_cap: 100,
            },
            ToolCaps::Class,
        )
        .unwrap();
        let env = String::from_utf8(out.stdout).unwrap();
        let mut lines: Vec<&str> = env.lines().collect();
        lines.sort();
        assert_eq!(
            lines,
            vec!["LC_ALL=C", "PATH=/usr/sbin:/usr/bin:/sbin:/bin"]
        );
        let out = run(
            Path::new("/usr/bin/seq"),
            &["1000".into()],
            limits(10_000),
            ToolCaps::Class,
        )
        .unwrap();
        assert_eq!(out.stdout, b"1\n2\n3\n4\n5\n");
        assert!(out.stdout_truncated);
        assert_eq!(out.code, Some(0));
        let out = run(
            Path::new("/bin/false"),
            &[],
            limits(10_000),
            ToolCaps::Class,
        )
        .unwrap();
        assert_eq!(out.code, Some(1));
    }

    #[test]
    fn a_descendant_holding_the_pipe_does_not_hold_us() {
        let t = std::time::Instant::now();
        let out = run(
            Path::new("/bin/sh"),
            &["-c".into(), "sleep 30 & echo started".into()],
            limits(20_000),
            ToolCaps::Class,
        )
        .unwrap();
        assert_eq!(out.code, Some(0));
        assert_eq!(out.stdout, b"started\n");
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    }

    /// The `Cap*` and `NoNewPrivs` lines of a tool's own /proc/self/status.
    fn tool_status(caps: ToolCaps) -> Vec<String> {
        let out = run(
            Path::new("/bin/grep"),
            &[
                "-E".into(),
                "^(Cap(Inh|Prm|Eff|Amb)|NoNewPrivs):".into(),
                "/proc/self/status".into(),
            ],
            Limits {
                timeout: Duration::from_secs(10),
                stdout_cap: 4096,
                stderr_cap: 100,
            },
            caps,
        )
        .unwrap();
        assert_eq!(out.code, Some(0));
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect()
    }

    #[test]
    fn a_tool_without_capabilities_has_none() {
        let none = tool_status(ToolCaps::None);
        assert_eq!(
            none,
            [
                "CapInh: 0000000000000000",
                "CapPrm: 0000000000000000",
                "CapEff: 0000000000000000",
                "CapAmb: 0000000000000000",
                "NoNewPrivs: 1",
            ],
        );
        if nix::unistd::geteuid().is_root() {
            // The same tool as root otherwise holds what root holds.
            let class = tool_status(ToolCaps::Class);
            assert_ne!(class[1], "CapPrm: 0000000000000000", "{class:?}");
        } else {
            eprintln!("SKIP (needs root): the tool's capabilities without the drop");
        }
    }

    #[test]
    fn timeout_kills_the_group() {
        let t = std::time::Instant::now();
        let err = run(
            Path::new("/bin/sleep"),
            &["30".into()],
            limits(200),
            ToolCaps::Class,
        )
        .unwrap_err();
        assert!(matches!(err, ExecError::Timeout { .. }), "{err}");
        assert!(t.elapsed() < Duration::from_secs(10));
    }
}
