//! `felhom-hubsim`: the hub in one process (see `docs/testbed.md`).
//!
//! ```text
//! felhom-hubsim [--listen 127.0.0.1:0] [--token T] [--admin-token T] [--poll-interval N]
//! ```
//! Prints one JSON line once it accepts connections:
//! `{"url":"https://127.0.0.1:PORT","token":"…","ca_file":"/tmp/…/hubsim-ca.pem","admin_token":"…"}`,
//! then logs to stderr only. Exits 0 on SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use felhom_testbed::hubsim::{HubSim, server};
use serde_json::json;

struct Args {
    listen: SocketAddr,
    token: String,
    admin_token: String,
    poll_interval: Option<u64>,
}

fn random_token() -> String {
    let mut bytes = [0u8; 16];
    for b in &mut bytes {
        *b = fastrand::u8(..);
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        listen: "127.0.0.1:0".parse().map_err(|e| format!("{e}"))?,
        token: random_token(),
        admin_token: random_token(),
        poll_interval: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => {
                args.listen = value()?.parse().map_err(|e| format!("--listen: {e}"))?;
            }
            "--token" => args.token = value()?,
            "--admin-token" => args.admin_token = value()?,
            "--poll-interval" => {
                args.poll_interval = Some(
                    value()?
                        .parse()
                        .map_err(|e| format!("--poll-interval: {e}"))?,
                );
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("felhom-hubsim: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("felhom-hubsim: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async move {
        let dir = match tempfile::Builder::new().prefix("felhom-hubsim-").tempdir() {
            Ok(d) => d,
            Err(e) => {
                eprintln!("felhom-hubsim: temp dir: {e}");
                return ExitCode::from(1);
            }
        };
        let envelope = match args.poll_interval {
            Some(n) => json!({ "poll_interval_seconds": n }),
            None => json!({}),
        };
        let sim = Arc::new(HubSim::new(
            args.token.clone(),
            args.admin_token.clone(),
            envelope,
        ));
        let listening = match server::serve(sim, args.listen, dir.path()).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("felhom-hubsim: {e}");
                return ExitCode::from(2);
            }
        };
        println!(
            "{}",
            json!({
                "url": format!("https://{}", listening.addr),
                "token": args.token,
                "ca_file": listening.ca_file,
                "admin_token": args.admin_token,
            })
        );
        eprintln!("felhom-hubsim: listening on {}", listening.addr);
        let (Ok(mut term), Ok(mut int)) = (
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()),
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()),
        ) else {
            eprintln!("felhom-hubsim: cannot install signal handlers");
            return ExitCode::from(1);
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        listening.task.abort();
        drop(dir);
        ExitCode::SUCCESS
    })
}
