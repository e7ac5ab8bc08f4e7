//! Command line: parsing, dispatch, and the one mapping from errors to exit codes.
//!
//! Exit codes, for every command: 0 ok; 1 the command ran and found a problem; 2 usage or
//! configuration error; 3 a dependency (Proxmox, hub, helper) could not be reached.

use std::process::ExitCode;

/// The four outcomes every command maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Ok = 0,
    Problem = 1,
    Usage = 2,
    Unreachable = 3,
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> ExitCode {
        ExitCode::from(e as u8)
    }
}

pub fn main() -> ExitCode {
    eprintln!("felhom-agent: not built yet");
    Exit::Usage.into()
}
