//! The only module of the helper with `unsafe`: adopting the socket systemd passes
//! (`LISTEN_FDS`), removing the activation variables from our own environment,
//! `pidfd_open(2)` (which std and nix do not offer on stable), and starting a tool with
//! no capabilities (`prctl` and `capset(2)` between fork and exec). Every block says why
//! it is sound.

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

/// A pidfd for `pid` (Linux 5.3+): readable once the process has exited, so one poll(2)
/// can wait for a tool's output and its exit together.
pub fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and a flags word by value and touches no memory of
    // ours; the result is checked before use.
    let fd = unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this fd to us, open and owned by no one else, so
    // taking ownership is sound and it is closed exactly once.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `struct __user_cap_header_struct` (linux/capability.h).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

/// `struct __user_cap_data_struct`; version 3 takes two of them (capabilities 0–31, 32–63).
#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// Makes the child `cmd` starts hold no capabilities although it runs as uid 0.
///
/// Between fork and exec the child sets `no_new_privs` and empties its effective,
/// permitted and inheritable sets (which empties ambient too). Neither needs a
/// capability. On exec, the kernel would give a uid-0 program the bounding set; under
/// `no_new_privs` it gives no more than the permitted set the caller had, which is now
/// empty (`cap_bprm_creds_from_file`). The bounding set itself cannot be emptied: that
/// needs `CAP_SETPCAP`, which the usb instance does not hold. If either call fails, the
/// spawn fails and the tool does not run.
pub fn exec_without_capabilities(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec. It calls only prctl(2)
    // and capset(2) (async-signal-safe system calls), reads nothing shared, allocates
    // nothing (the structures are on its stack) and builds its error from errno only
    // (`last_os_error` does not allocate).
    unsafe {
        cmd.pre_exec(|| {
            if nix::libc::prctl(nix::libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let mut header = CapHeader {
                version: LINUX_CAPABILITY_VERSION_3,
                pid: 0,
            };
            let data = [CapData {
                effective: 0,
                permitted: 0,
                inheritable: 0,
            }; 2];
            if nix::libc::syscall(
                nix::libc::SYS_capset,
                &mut header as *mut CapHeader,
                data.as_ptr(),
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
}
