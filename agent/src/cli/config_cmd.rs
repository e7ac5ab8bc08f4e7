//! `felhom-agent config`.

use super::{Cli, CliError};

pub fn check(_cli: &Cli) -> Result<(), CliError> {
    Err(super::not_built("config"))
}
