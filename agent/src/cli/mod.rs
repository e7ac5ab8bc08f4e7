//! Command line: parsing, dispatch, and the one mapping from errors to exit codes.
//!
//! Exit codes, for every command: 0 ok; 1 the command ran and found a problem (unhealthy,
//! task failed, verification failed); 2 usage or configuration error; 3 a dependency
//! (Proxmox, hub, helper) could not be reached.
//!
//! Each command group lives in its own file and returns `Result<(), CliError>`; only
//! [`CliError::exit`] decides the exit code. This is the binary's edge: the one place where
//! typed errors from the modules are turned into text for the operator.
//!
//! Output: results go to stdout, logs and error messages to stderr (logs through `tracing`,
//! filtered by `FELHOM_AGENT_LOG`, else `RUST_LOG`, default `info`). With `--json`, stdout carries exactly one JSON
//! document. A command that fails before printing its own document leaves it to `main`,
//! which prints `{"ok": false, "exit": <code>, "error": "<message>"}`; a command that
//! already printed its document (e.g. a selftest report with problems) returns
//! [`CliError::Reported`] so nothing more is written to stdout.

mod config_cmd;
mod daemon_cmds;
mod mutations;
mod ops_cmd;
mod privileged_cmd;
mod run_cmd;
mod selftest;
mod sensors_cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// The four outcomes every command maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Ok = 0,
    Problem = 1,
    Usage = 2,
    Unreachable = 3,
}

impl Exit {
    /// The exit for a code another process reported (unknown codes count as a problem).
    pub fn from_code(code: u8) -> Exit {
        match code {
            0 => Exit::Ok,
            2 => Exit::Usage,
            3 => Exit::Unreachable,
            _ => Exit::Problem,
        }
    }
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> ExitCode {
        ExitCode::from(e as u8)
    }
}

/// What a command can end with besides success. Built at the edge from module errors.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The command ran and found a problem (exit 1).
    #[error("{0}")]
    Problem(String),
    /// Bad usage or configuration (exit 2).
    #[error("{0}")]
    Usage(String),
    /// A dependency could not be reached (exit 3).
    #[error("{0}")]
    Unreachable(String),
    /// The command already printed its full output (its `--json` document included);
    /// `main` only writes `summary` to stderr and exits with `exit`.
    #[error("{summary}")]
    Reported { exit: Exit, summary: String },
}

impl CliError {
    pub fn exit(&self) -> Exit {
        match self {
            CliError::Problem(_) => Exit::Problem,
            CliError::Usage(_) => Exit::Usage,
            CliError::Unreachable(_) => Exit::Unreachable,
            CliError::Reported { exit, .. } => *exit,
        }
    }
}

impl From<crate::config::ConfigError> for CliError {
    fn from(e: crate::config::ConfigError) -> Self {
        CliError::Usage(e.to_string())
    }
}

impl From<crate::config::StateDirError> for CliError {
    fn from(e: crate::config::StateDirError) -> Self {
        CliError::Usage(e.to_string())
    }
}

impl From<crate::proxmox::ProxmoxError> for CliError {
    /// Unreachable (network, timeout) → 3; wrong setup (token, privilege, pin, CA) → 2;
    /// anything else (a failed task, an unexpected answer) → 1.
    fn from(e: crate::proxmox::ProxmoxError) -> Self {
        if e.is_unreachable() {
            CliError::Unreachable(e.to_string())
        } else if e.is_config_problem() {
            CliError::Usage(e.to_string())
        } else {
            CliError::Problem(e.to_string())
        }
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "felhom-agent",
    version,
    about = "Proxmox VE host agent for the felhom hub"
)]
pub struct Cli {
    /// Configuration file.
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Machine-readable output (documented in the README).
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: heartbeat reports to the hub and the reconcile engine.
    Run,
    /// Read-only health report; `--task --vmid N` runs the gated reversible exercise;
    /// `--hub` sends one report to the hub and prints the envelope.
    Selftest(SelftestArgs),
    /// Configuration commands.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Daemon state, queue depth, safe mode, last envelope.
    Status,
    /// What reconcile would do now, without doing it.
    Plan,
    /// The op journal.
    #[command(subcommand)]
    Journal(JournalCmd),
    /// Calls into the root helper.
    #[command(subcommand)]
    Privileged(PrivilegedCmd),
    /// Temperatures from hwmon (no privilege needed).
    Sensors,
    /// Signed operations.
    #[command(subcommand)]
    Ops(OpsCmd),
    /// Restore tests: restore a guest's newest backup into a scratch guest, boot it, destroy it.
    #[command(subcommand, name = "restore-test")]
    RestoreTest(RestoreTestCmd),
}

#[derive(Debug, Subcommand)]
pub enum RestoreTestCmd {
    /// Run one restore test now (through the daemon when it runs): of guest `--vmid`, or
    /// of the oldest-tested guest with a backup. Exit 0 passed, 1 failed or skipped.
    Run {
        #[arg(long)]
        vmid: Option<u64>,
    },
    /// The newest restore tests, with their results.
    List {
        /// How many (newest first).
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
}

#[derive(Debug, Subcommand)]
pub enum OpsCmd {
    /// Verify a signed envelope file against this host's trust, agent_id, node and the
    /// current time, without running or recording it (exit 0 valid, 1 refused, 2
    /// configuration error).
    Verify { file: PathBuf },
    /// The newest signed operations this host received, with their decisions, and every
    /// undo point the reversibility gate keeps.
    List {
        /// How many (newest first).
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// One signed operation: its record, envelope, every result sent about it, and its
    /// undo point (kept or released).
    Show { op_id: String },
    /// Undo an applied operation from its undo point, through the running daemon (root or
    /// the agent's user). Waits for the undo's decision: exit 0 applied, 1 otherwise.
    Undo {
        /// The operation to undo (32 lower-case hex characters).
        op_id: felhom_authz::OpId,
        /// How long to wait for the decision, in seconds (at most 3600).
        #[arg(long, default_value_t = 600, value_name = "SECONDS")]
        wait: u32,
    },
    /// Remove an operation's undo point from the node (snapshot or backup deleted), through
    /// the running daemon (root or the agent's user); it can then no longer be undone.
    /// Waits for the decision: exit 0 applied, 1 otherwise.
    Release {
        /// The operation whose undo point goes (32 lower-case hex characters).
        op_id: felhom_authz::OpId,
        /// How long to wait for the decision, in seconds (at most 3600).
        #[arg(long, default_value_t = 600, value_name = "SECONDS")]
        wait: u32,
    },
}

#[derive(Debug, Args)]
pub struct SelftestArgs {
    /// Run the reversible snapshot/rollback/delete exercise (needs --vmid).
    #[arg(long, requires = "vmid")]
    pub task: bool,
    /// The guest for --task.
    #[arg(long, requires = "task")]
    pub vmid: Option<u64>,
    /// Collect once, send one report to the hub, print the envelope.
    #[arg(long, conflicts_with = "task")]
    pub hub: bool,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// Print the effective configuration (secrets redacted) and where each value came from.
    Check,
}

#[derive(Debug, Subcommand)]
pub enum JournalCmd {
    /// Print the journal's recent entries.
    Show,
    /// Check the journal's integrity (and leave safe mode when healthy).
    Verify,
}

#[derive(Debug, Subcommand)]
pub enum PrivilegedCmd {
    /// Handshake with the helper instances (all classes, or one).
    Ping {
        #[arg(long, value_name = "pct|usb|smart")]
        class: Option<String>,
    },
    /// Read SMART data of one disk (e.g. sda, nvme0n1).
    Smart { device: String },
    /// Mount a USB-attached partition under the mount root and keep its fstab entry.
    UsbMount { device: String, name: String },
    /// Unmount a managed USB mount and remove its fstab entry.
    UsbUnmount { name: String },
    /// Create an unprivileged LXC container with keyctl=1 from a JSON spec.
    CreateKeyctl { spec: PathBuf },
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() {
                Exit::Usage
            } else {
                Exit::Ok
            };
            let _ = e.print();
            return code.into();
        }
    };
    init_logging();
    let result = match &cli.command {
        Command::Run => run_cmd::run(&cli),
        Command::Selftest(args) => selftest::run(&cli, args),
        Command::Config(ConfigCmd::Check) => config_cmd::check(&cli),
        Command::Status => daemon_cmds::status(&cli),
        Command::Plan => daemon_cmds::plan(&cli),
        Command::Journal(cmd) => daemon_cmds::journal(&cli, cmd),
        Command::Privileged(cmd) => privileged_cmd::run(&cli, cmd),
        Command::Sensors => sensors_cmd::run(&cli),
        Command::Ops(OpsCmd::Verify { file }) => ops_cmd::verify(&cli, file),
        Command::Ops(OpsCmd::List { limit }) => daemon_cmds::ops_list(&cli, *limit),
        Command::Ops(OpsCmd::Show { op_id }) => daemon_cmds::ops_show(&cli, op_id),
        Command::Ops(OpsCmd::Undo { op_id, wait }) => {
            daemon_cmds::ops_local(&cli, daemon_cmds::LocalOp::Undo, op_id, *wait)
        }
        Command::Ops(OpsCmd::Release { op_id, wait }) => {
            daemon_cmds::ops_local(&cli, daemon_cmds::LocalOp::Release, op_id, *wait)
        }
        Command::RestoreTest(RestoreTestCmd::Run { vmid }) => {
            daemon_cmds::restore_test_run(&cli, *vmid)
        }
        Command::RestoreTest(RestoreTestCmd::List { limit }) => {
            daemon_cmds::restore_test_list(&cli, *limit)
        }
    };
    match result {
        Ok(()) => Exit::Ok.into(),
        Err(e) => {
            if cli.json && !matches!(e, CliError::Reported { .. }) {
                print_json(&serde_json::json!({
                    "ok": false,
                    "exit": e.exit() as u8,
                    "error": e.to_string(),
                }));
            }
            eprintln!("felhom-agent: {e}");
            e.exit().into()
        }
    }
}

/// The log filter directives: `FELHOM_AGENT_LOG` (the documented knob, e.g.
/// `Environment=FELHOM_AGENT_LOG=debug` in a drop-in), else `RUST_LOG`, else `info`. An
/// empty value counts as unset.
fn log_directives(var: impl Fn(&str) -> Option<String>) -> String {
    ["FELHOM_AGENT_LOG", "RUST_LOG"]
        .into_iter()
        .filter_map(var)
        .find(|v| !v.trim().is_empty())
        .unwrap_or_else(|| "info".to_string())
}

/// Logs to stderr, filtered by [`log_directives`]. Idempotent; every command, `run`
/// included, sets logging up here once.
/// Under journald (stderr is the stream `JOURNAL_STREAM` names) lines carry no time of
/// their own: the journal stamps each one, and two timestamps per line only confuse.
fn init_logging() {
    let directives = log_directives(|name| std::env::var(name).ok());
    let filter = tracing_subscriber::EnvFilter::try_new(&directives).unwrap_or_else(|e| {
        eprintln!("felhom-agent: log filter {directives:?} is not valid ({e}); logging at info");
        tracing_subscriber::EnvFilter::new("info")
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .with_target(false);
    let journal = std::env::var("JOURNAL_STREAM").is_ok_and(|v| {
        std::fs::metadata("/proc/self/fd/2").is_ok_and(|m| is_journal_stream(&v, &m))
    });
    let _ = if journal {
        builder.without_time().try_init()
    } else {
        builder.try_init()
    };
}

/// Whether `meta` (of stderr) is the stream `JOURNAL_STREAM` (`DEV:INODE`, decimal) names;
/// a variable inherited by a child whose stderr went elsewhere does not match.
fn is_journal_stream(value: &str, meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some((dev, ino)) = value.split_once(':') else {
        return false;
    };
    dev.parse() == Ok(meta.dev()) && ino.parse() == Ok(meta.ino())
}

/// Prints one JSON document on stdout.
pub(crate) fn print_json(v: &impl serde::Serialize) {
    match serde_json::to_string_pretty(v) {
        Ok(s) => println!("{s}"),
        // Our report types have string keys only, so this does not happen; if it ever
        // did, say so rather than print half a document.
        Err(e) => eprintln!("felhom-agent: cannot encode the JSON output: {e}"),
    }
}

/// Loads the configuration named by `--config` (default [`crate::config::DEFAULT_CONFIG_PATH`])
/// with environment overrides and secrets, and logs its warnings. Every command that needs
/// the config calls this.
pub(crate) fn load_config(cli: &Cli) -> Result<crate::config::Config, CliError> {
    let loaded = load_config_full(cli)?;
    for w in &loaded.warnings {
        tracing::warn!("{w}");
    }
    Ok(loaded.config)
}

/// The host-local sections only (`privileged …`, `sensors`): no Proxmox or hub secret
/// needed.
pub(crate) fn load_host_config(cli: &Cli) -> Result<crate::config::HostConfig, CliError> {
    Ok(crate::config::Config::load_host(cli.config.as_deref())?)
}

/// [`load_config`] with the provenance and without logging the warnings (`config check`
/// prints them itself).
pub(crate) fn load_config_full(cli: &Cli) -> Result<crate::config::LoadedConfig, CliError> {
    Ok(crate::config::Config::load(cli.config.as_deref())?)
}

#[cfg(test)]
mod log_tests {
    use super::log_directives;

    #[test]
    fn felhom_agent_log_wins_then_rust_log_then_info() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert_eq!(
            log_directives(env(&[("FELHOM_AGENT_LOG", "debug"), ("RUST_LOG", "warn")])),
            "debug"
        );
        assert_eq!(log_directives(env(&[("RUST_LOG", "warn")])), "warn");
        assert_eq!(
            log_directives(env(&[("FELHOM_AGENT_LOG", " "), ("RUST_LOG", "warn")])),
            "warn"
        );
        assert_eq!(log_directives(env(&[])), "info");
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn journal_stream_matches_only_the_named_device_and_inode() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("stream");
        std::fs::write(&f, b"").unwrap();
        let m = std::fs::metadata(&f).unwrap();
        assert!(super::is_journal_stream(
            &format!("{}:{}", m.dev(), m.ino()),
            &m
        ));
        assert!(!super::is_journal_stream(
            &format!("{}:{}", m.dev(), m.ino() + 1),
            &m
        ));
        for bad in [
            "",
            ":",
            "x:y",
            &m.ino().to_string(),
            &format!("{}:{}:", m.dev(), m.ino()),
        ] {
            assert!(!super::is_journal_stream(bad, &m), "{bad:?}");
        }
    }
}
