//! `felhom-agent status | plan | journal …`: talk to the running daemon (or take the lock).

use super::{Cli, CliError, JournalCmd};

pub fn status(_cli: &Cli) -> Result<(), CliError> {
    Err(super::not_built("status"))
}

pub fn plan(_cli: &Cli) -> Result<(), CliError> {
    Err(super::not_built("plan"))
}

pub fn journal(_cli: &Cli, _cmd: &JournalCmd) -> Result<(), CliError> {
    Err(super::not_built("journal"))
}
