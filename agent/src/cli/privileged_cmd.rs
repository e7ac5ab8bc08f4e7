//! `felhom-agent privileged …`.

use super::{Cli, CliError, PrivilegedCmd};

pub fn run(_cli: &Cli, _cmd: &PrivilegedCmd) -> Result<(), CliError> {
    Err(super::not_built("privileged"))
}
