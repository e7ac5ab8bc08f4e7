//! `felhom-agent selftest`.

use super::{Cli, CliError, SelftestArgs};

pub fn run(cli: &Cli, args: &SelftestArgs) -> Result<(), CliError> {
    if args.hub {
        return super::run_cmd::selftest_hub(cli);
    }
    Err(super::not_built("selftest"))
}
