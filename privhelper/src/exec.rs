//! Running a tool: the configured absolute path, a fixed argv, never a shell, a cleared
//! environment (only a fixed `PATH` and `LC_ALL=C` are set, never inherited), stdin from
//! /dev/null, its own process group (killed whole on timeout), and capped output.
//!
//! The tool inherits the capability bounding set this instance dropped to at start
//! (see [`crate::capability`]); nothing here raises anything.

use std::ffi::OsString;
use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The only environment a tool sees.
pub const TOOL_ENV: [(&str, &str); 2] =
    [("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), ("LC_ALL", "C")];

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

/// Reads `r` to EOF, keeping at most `cap` bytes (the rest is drained and counted).
fn read_capped(mut r: impl Read, cap: usize) -> (Vec<u8>, bool) {
    let mut kept = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let mut truncated = false;
    loop {
        match r.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let room = cap.saturating_sub(kept.len());
                if n > room {
                    truncated = true;
                }
                kept.extend_from_slice(&buf[..n.min(room)]);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    (kept, truncated)
}

/// Runs `tool args…` under `limits`.
pub fn run(tool: &Path, args: &[OsString], limits: Limits) -> Result<ToolOutput, ExecError> {
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
    let mut child = cmd.spawn().map_err(|source| ExecError::Spawn {
        tool: name.clone(),
        source,
    })?;
    let pid = child.id() as i32;
    let (tx, rx) = mpsc::channel::<u8>();
    let out_thread = child.stdout.take().map(|out| {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let r = read_capped(out, limits.stdout_cap);
            let _ = tx.send(1);
            r
        })
    });
    let err_thread = child.stderr.take().map(|err| {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let r = read_capped(err, limits.stderr_cap);
            let _ = tx.send(2);
            r
        })
    });
    drop(tx);
    let deadline = std::time::Instant::now() + limits.timeout;
    let mut timed_out = false;
    // Wait until both pipes reach EOF (the tool and anything it left behind closed them)
    // or the deadline passes.
    let mut open = out_thread.is_some() as u8 + err_thread.is_some() as u8;
    while open > 0 {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(_) => open -= 1,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                timed_out = true;
                break;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    if timed_out {
        // The whole process group: the tool and whatever it started.
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let status = child.wait().map_err(|source| ExecError::Wait {
        tool: name.clone(),
        source,
    })?;
    if timed_out {
        // Pipes close once the group is dead; the readers then finish.
        let _ = out_thread.map(|t| t.join());
        let _ = err_thread.map(|t| t.join());
        return Err(ExecError::Timeout {
            tool: name,
            secs: limits.timeout.as_secs(),
        });
    }
    let (stdout, stdout_truncated) = out_thread.and_then(|t| t.join().ok()).unwrap_or_default();
    let (stderr, _) = err_thread.and_then(|t| t.join().ok()).unwrap_or_default();
    Ok(ToolOutput {
        stdout,
        stdout_truncated,
        stderr,
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
        )
        .unwrap();
        let env = String::from_utf8(out.stdout).unwrap();
        let mut lines: Vec<&str> = env.lines().collect();
        lines.sort();
        assert_eq!(
            lines,
            vec!["LC_ALL=C", "PATH=/usr/sbin:/usr/bin:/sbin:/bin"]
        );
        let out = run(Path::new("/usr/bin/seq"), &["1000".into()], limits(10_000)).unwrap();
        assert_eq!(out.stdout, b"1\n2\n3\n4\n5\n");
        assert!(out.stdout_truncated);
        assert_eq!(out.code, Some(0));
        let out = run(Path::new("/bin/false"), &[], limits(10_000)).unwrap();
        assert_eq!(out.code, Some(1));
    }

    #[test]
    fn timeout_kills_the_group() {
        let t = std::time::Instant::now();
        let err = run(Path::new("/bin/sleep"), &["30".into()], limits(200)).unwrap_err();
        assert!(matches!(err, ExecError::Timeout { .. }), "{err}");
        assert!(t.elapsed() < Duration::from_secs(10));
    }
}
