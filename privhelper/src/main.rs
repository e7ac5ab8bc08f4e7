//! `felhom-privhelper`: the root side of the fence.
//!
//! Background: the agent never runs as root. The three things the Proxmox API cannot do
//! (pct create with keyctl, USB mount + fstab, SMART) are requested over a Unix socket
//! from this small synchronous program, which systemd starts on demand, one instance
//! per operation class, each with only that class's capabilities.
//!
//! Design: `serve` takes its socket from systemd (or binds `--listen` for development),
//! loads and checks the config, opens the audit log, drops capabilities to the class's
//! set, and serves (see [`server`]). `audit verify` checks the hash chain.
//!
//! Limitations / must never: no shell, no async runtime, no HTTP; never exit on bad
//! input; unsafe code only in [`sys`].
//!
//! ```text
//! felhom-privhelper serve --class pct|usb|smart [--config PATH] [--listen PATH]
//! felhom-privhelper audit verify [--log PATH] [--config PATH]
//! ```

mod audit;
mod capability;
mod clock;
mod config;
mod exec;
mod fstab;
mod ops;
mod peer;
mod server;
mod sys;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use felhom_protocol::Class;

const USAGE: &str = "usage:
  felhom-privhelper serve --class pct|usb|smart [--config PATH] [--listen PATH]
  felhom-privhelper audit verify [--log PATH] [--config PATH]
  felhom-privhelper --version";

#[derive(Debug, thiserror::Error)]
enum MainError {
    #[error("{0}\n{USAGE}")]
    Usage(String),
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Audit(#[from] audit::AuditError),
    #[error(transparent)]
    Sys(#[from] sys::SysError),
    #[error(transparent)]
    Caps(#[from] capability::CapError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("audit log verification FAILED at {0}")]
    VerifyFailed(audit::VerifyFailure),
}

impl MainError {
    fn code(&self) -> u8 {
        match self {
            MainError::VerifyFailed(_) => 1,
            _ => 2,
        }
    }
}

struct Flags {
    class: Option<Class>,
    config: Option<PathBuf>,
    listen: Option<PathBuf>,
    log: Option<PathBuf>,
}

fn parse_flags(args: &[String]) -> Result<Flags, MainError> {
    let mut f = Flags {
        class: None,
        config: None,
        listen: None,
        log: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| MainError::Usage(format!("{name} needs a value")))
        };
        match a.as_str() {
            "--class" => {
                f.class = Some(
                    value("--class")?
                        .parse()
                        .map_err(|e: felhom_protocol::ValueError| {
                            MainError::Usage(e.to_string())
                        })?,
                )
            }
            "--config" => f.config = Some(value("--config")?.into()),
            "--listen" => f.listen = Some(value("--listen")?.into()),
            "--log" => f.log = Some(value("--log")?.into()),
            other => return Err(MainError::Usage(format!("unknown argument {other:?}"))),
        }
    }
    Ok(f)
}

fn serve(f: Flags) -> Result<(), MainError> {
    let class = f
        .class
        .ok_or_else(|| MainError::Usage("serve needs --class".into()))?;
    if f.log.is_some() {
        return Err(MainError::Usage("--log belongs to audit verify".into()));
    }
    // Take the socket first: it is fd 3 and must not be mistaken for anything we open.
    let activated = sys::listener_from_systemd()?;
    let cfg = config::Config::load(f.config.as_deref())?;
    let tools = cfg.check_tools(class)?;
    let listener = match (activated, &f.listen) {
        (Some(l), None) => l,
        (Some(_), Some(_)) => {
            return Err(MainError::Usage(
                "--listen given, but systemd passed a socket".into(),
            ));
        }
        (None, Some(path)) => {
            server::log(
                class,
                &format!("development mode: listening on {}", path.display()),
            );
            if let Ok(md) = std::fs::symlink_metadata(path) {
                use std::os::unix::fs::FileTypeExt;
                if md.file_type().is_socket() {
                    let _ = std::fs::remove_file(path);
                }
            }
            std::os::unix::net::UnixListener::bind(path).map_err(|source| MainError::Io {
                what: format!("binding {}", path.display()),
                source,
            })?
        }
        (None, None) => {
            return Err(MainError::Usage(
                "no socket: start through systemd (felhom-privhelper-<class>.socket) or give --listen PATH".into(),
            ));
        }
    };
    let (audit, audit_warnings) = audit::AuditLog::open(
        &cfg.audit_log,
        cfg.audit_max_bytes,
        cfg.audit_keep,
        cfg.agent_gid,
    )?;
    // Before the capabilities are dropped (see `AuditLog::with_ack`).
    let audit = audit
        .for_class(class.as_str())
        .with_ack(Some(cfg.audit_ack.clone()));
    for w in cfg.warnings.iter().chain(audit_warnings.iter()) {
        server::log(class, &format!("warning: {w}"));
    }
    let kept = capability::drop_to_class(class)?;
    let mut names: Vec<String> = kept.iter().map(|c| c.to_string()).collect();
    names.sort();
    server::log(
        class,
        &format!(
            "serving (agent uid {}, capabilities: {})",
            cfg.agent_uid,
            if class == Class::Pct {
                format!("{} kept", names.len())
            } else {
                names.join(",")
            }
        ),
    );
    let srv = Arc::new(server::Server::new(
        class,
        cfg,
        tools,
        audit,
        Box::new(ops::RealSystem),
    ));
    srv.run(listener).map_err(|source| MainError::Io {
        what: "serving".into(),
        source,
    })
}

fn verify(f: Flags) -> Result<(), MainError> {
    if f.class.is_some() || f.listen.is_some() {
        return Err(MainError::Usage(
            "audit verify takes --log and --config only".into(),
        ));
    }
    let log = match f.log {
        Some(l) => l,
        None => config::Config::load(f.config.as_deref())?.audit_log,
    };
    let r = audit::verify(&log).map_err(MainError::VerifyFailed)?;
    for n in &r.notes {
        println!("note: {n}");
    }
    for o in &r.open_intents {
        println!(
            "warning: {}:{}: seq {}: intent for {} has no outcome: the helper stopped while it ran (crash, power loss, kill), or it is still running",
            o.file.display(),
            o.line,
            o.seq,
            o.op
        );
    }
    println!(
        "audit log OK: {} records{} in {} file(s), head matches",
        r.records,
        match (r.first_seq, r.last_seq) {
            (Some(a), Some(b)) => format!(" (seq {a}..={b})"),
            _ => String::new(),
        },
        r.files.len()
    );
    Ok(())
}

fn run(args: &[String]) -> Result<(), MainError> {
    match args.first().map(String::as_str) {
        Some("serve") => serve(parse_flags(&args[1..])?),
        Some("audit") if args.get(1).map(String::as_str) == Some("verify") => {
            verify(parse_flags(&args[2..])?)
        }
        Some("--version") => {
            println!(
                "felhom-privhelper {} (protocol {})",
                env!("CARGO_PKG_VERSION"),
                felhom_protocol::PROTOCOL_VERSION
            );
            Ok(())
        }
        Some("--help") | Some("-h") => {
            println!("{USAGE}");
            Ok(())
        }
        _ => Err(MainError::Usage("no command".into())),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("felhom-privhelper: {e}");
            ExitCode::from(e.code())
        }
    }
}
