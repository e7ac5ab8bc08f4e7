//! `felhom-agent sensors`.

use super::{Cli, CliError};

pub fn run(_cli: &Cli) -> Result<(), CliError> {
    Err(super::not_built("sensors"))
}
