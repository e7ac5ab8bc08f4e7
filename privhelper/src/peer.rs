//! Who is on the other end of a connection (`SO_PEERCRED`), and whether we serve them.

use std::os::unix::net::UnixStream;

use nix::sys::socket::{getsockopt, sockopt};
use serde::Serialize;

/// `/proc/<pid>/comm` (at most 16 bytes with its newline, one read).
fn comm_of(pid: i32) -> Option<String> {
    use std::io::Read;
    let mut buf = [0u8; 64];
    let n = std::fs::File::open(format!("/proc/{pid}/comm"))
        .and_then(|mut f| f.read(&mut buf))
        .ok()?;
    Some(
        String::from_utf8_lossy(&buf[..n])
            .trim_end_matches('\n')
            .chars()
            .take(32)
            .collect(),
    )
}

/// The peer as the kernel reports it at connect time, plus its command name where
/// `/proc` shows it (it may not: the process may be gone or hidden by `ProtectProc=`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Peer {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
    pub comm: Option<String>,
}

impl Peer {
    pub fn of(stream: &UnixStream) -> std::io::Result<Peer> {
        let cred = getsockopt(stream, sockopt::PeerCredentials).map_err(std::io::Error::from)?;
        let pid = cred.pid();
        Ok(Peer {
            pid,
            uid: cred.uid(),
            gid: cred.gid(),
            comm: comm_of(pid),
        })
    }

    /// Only root and the agent's uid are served. Group membership is not enough: the
    /// socket's group lets a process connect, the uid decides whether it is served.
    pub fn allowed(&self, agent_uid: u32) -> bool {
        self.uid == 0 || self.uid == agent_uid
    }
}
