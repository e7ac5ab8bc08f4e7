//! `felhom-devstack`: the whole product on loopback, narrated live (see
//! `felhom_testbed::devstack` and the README's "Try it").
//!
//! ```text
//! cargo run --release -p felhom-testbed --bin felhom-devstack -- [--cycles N] [--guests N]
//!     [--interval SECS] [--idle-exit SECS] [--run-dir DIR] [--usb-loop] [--no-build]
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use felhom_testbed::devstack::{self, Options};

/// Runs felhom-pvesim, felhom-hubsim, socket-activated felhom-privhelper instances with
/// fake pct/smartctl, and felhom-agent run, all on loopback, and tells what flows.
#[derive(Debug, Parser)]
#[command(name = "felhom-devstack", version)]
struct Args {
    /// Stop after this many reports accepted by the hub (default: run until Ctrl-C).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    cycles: Option<u64>,
    /// Guests of the simulated Proxmox node (at least 12).
    #[arg(long, default_value_t = 36, value_name = "N")]
    guests: u32,
    /// Seconds between the agent's reports (the hub's poll_interval_seconds).
    #[arg(long, default_value_t = 3, value_name = "SECS")]
    interval: u64,
    /// Seconds a helper stays up without connections before it exits.
    #[arg(long, default_value_t = 1, value_name = "SECS")]
    idle_exit: u64,
    /// Directory for logs, state and sockets (default: .devstack/run-<time>/ in the
    /// workspace). Must not exist or be empty.
    #[arg(long, value_name = "DIR")]
    run_dir: Option<PathBuf>,
    /// As root: mount a loop-device image as the USB disk (otherwise the usb helper
    /// shows its refusal path).
    #[arg(long)]
    usb_loop: bool,
    /// Use the binaries next to this one as they are; never run cargo build.
    #[arg(long)]
    no_build: bool,
}

fn main() -> ExitCode {
    let a = Args::parse();
    devstack::main(Options {
        cycles: a.cycles,
        guests: a.guests,
        interval_seconds: a.interval,
        idle_exit_seconds: a.idle_exit,
        run_dir: a.run_dir,
        usb_loop: a.usb_loop,
        build: !a.no_build,
    })
}
