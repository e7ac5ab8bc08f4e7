//! The only module of the helper with `unsafe`: adopting the socket systemd passes
//! (`LISTEN_FDS`) and removing the activation variables from our own environment.
//! Every block says why it is sound.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;

use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::sys::socket::{SockType, getsockopt, sockopt};

/// First fd systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

#[derive(Debug, thiserror::Error)]
pub enum SysError {
    #[error("LISTEN_FDS={0:?}: expected exactly one socket")]
    FdCount(String),
    #[error("fd 3 from systemd is not a listening AF_UNIX stream socket: {0}")]
    NotListening(String),
}

/// Takes the listening socket systemd passed, if `LISTEN_PID` names this process.
/// Returns `Ok(None)` when the process was not socket-activated.
pub fn listener_from_systemd() -> Result<Option<UnixListener>, SysError> {
    let pid_matches = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    if !pid_matches {
        return Ok(None);
    }
    let count = std::env::var("LISTEN_FDS").unwrap_or_default();
    clear_activation_env();
    if count != "1" {
        return Err(SysError::FdCount(count));
    }
    // SAFETY: LISTEN_PID names this process and LISTEN_FDS=1, so by the sd_listen_fds
    // protocol fd 3 is open and was handed to us; nothing else in this process has taken
    // it (this runs once, before any other fd is opened by us). The borrow lives only
    // for the checks below.
    let fd = unsafe { BorrowedFd::borrow_raw(LISTEN_FDS_START) };
    match getsockopt(&fd, sockopt::SockType) {
        Ok(SockType::Stream) => {}
        Ok(other) => return Err(SysError::NotListening(format!("type {other:?}"))),
        Err(e) => return Err(SysError::NotListening(e.to_string())),
    }
    match getsockopt(&fd, sockopt::AcceptConn) {
        Ok(true) => {}
        Ok(false) => return Err(SysError::NotListening("not listening".into())),
        Err(e) => return Err(SysError::NotListening(e.to_string())),
    }
    // Tools we execute must not inherit the listening socket.
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
        .map_err(|e| SysError::NotListening(format!("FD_CLOEXEC: {e}")))?;
    // SAFETY: fd 3 is an open socket handed to this process (checked above); ownership is
    // taken exactly once here, so it will be closed exactly once.
    let owned = unsafe { OwnedFd::from_raw_fd(LISTEN_FDS_START) };
    debug_assert_eq!(owned.as_raw_fd(), LISTEN_FDS_START);
    Ok(Some(UnixListener::from(owned)))
}

fn clear_activation_env() {
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        // SAFETY: called from `main`'s thread before the helper starts any other thread
        // (serve() spawns connection threads only after this returns), so no other thread
        // can read the environment concurrently.
        unsafe { std::env::remove_var(var) };
    }
}
