//! `felhom-agent selftest`.

use super::{Cli, CliError, SelftestArgs};

pub fn run(_cli: &Cli, _args: &SelftestArgs) -> Result<(), CliError> {
    Err(super::not_built("selftest"))
}
