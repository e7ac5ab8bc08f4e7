//! `felhom-pvesim`: a Proxmox VE node in one process. (Issue 2.)
//!
//! Prints one JSON start line on stdout once it accepts connections, logs to stderr,
//! exits 0 on SIGTERM/SIGINT and removes its temporary CA directory. See
//! `docs/testbed.md` for the contract.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use felhom_testbed::http::{ServeOptions, bind_loopback, serve};
use felhom_testbed::pvesim::{Options, Sim, acl, random_secret, version::PveVersion};
use felhom_testbed::tls::TestPki;

#[derive(Debug, Parser)]
#[command(
    name = "felhom-pvesim",
    about = "A simulated Proxmox VE node (HTTPS API) for tests"
)]
struct Cli {
    /// Address to listen on (loopback only).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Node name.
    #[arg(long, default_value = "pve1")]
    node: String,
    /// Number of seeded guests (LXC and QEMU mixed).
    #[arg(long, default_value_t = 12)]
    guests: usize,
    /// Seconds each task runs (fractional).
    #[arg(long, default_value_t = 0.2)]
    task_seconds: f64,
    /// PVE version to imitate: 9.1, 8.4, 8.1 or 7.4.
    #[arg(long, default_value = "9.1")]
    pve_version: PveVersion,
    /// Seconds every 401 is delayed (PVE: about 3).
    #[arg(long, default_value_t = 0.0)]
    auth_delay: f64,
    /// Milliseconds added to every PVE API request (asynchronously).
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// JSON file with further, restricted tokens.
    #[arg(long)]
    acl: Option<std::path::PathBuf>,
    /// Seed of the generated guests.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Token id of the full-privilege token.
    #[arg(long, default_value = "root@pam!felhom")]
    token_id: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("felhom-pvesim: {e}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    if !(0.0..=3600.0).contains(&cli.task_seconds) {
        return Err("--task-seconds must be within 0..=3600".into());
    }
    if !(0.0..=60.0).contains(&cli.auth_delay) {
        return Err("--auth-delay must be within 0..=60".into());
    }
    if !felhom_testbed::pvesim::schema::is_dns_name(&cli.node) || cli.node.contains('.') {
        return Err(format!("--node {:?} is not a valid node name", cli.node).into());
    }
    let extra = match &cli.acl {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| acl::AclError::Read {
                path: path.display().to_string(),
                source,
            })?;
            acl::parse_acl_file(&path.display().to_string(), &text)?
        }
        None => Vec::new(),
    };
    let pki = TestPki::generate(
        "Proxmox Virtual Environment",
        &format!("{}.local", cli.node),
        &["127.0.0.1", "::1", "localhost", &cli.node],
    )?;
    let tmp = tempfile::Builder::new()
        .prefix("felhom-pvesim-")
        .tempdir()?;
    let ca_file = pki.write_ca_pem(tmp.path(), "pve-root-ca.pem")?;
    let opts = Options {
        node: cli.node.clone(),
        guests: cli.guests,
        task_seconds: cli.task_seconds,
        version: cli.pve_version,
        auth_delay: Duration::from_secs_f64(cli.auth_delay),
        latency_ms: cli.latency_ms,
        seed: cli.seed,
        token_id: cli.token_id.clone(),
    };
    let secret = random_secret();
    let admin = random_secret();
    let sim = Arc::new(Sim::new(
        &opts,
        secret.clone(),
        admin.clone(),
        extra,
        pki.leaf_pin_sha256(),
    )?);
    let tls = pki.server_config()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = bind_loopback(cli.listen).await?;
        let addr = listener.local_addr()?;
        let host = match addr.ip() {
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
            ip => ip.to_string(),
        };
        let line = serde_json::json!({
            "url": format!("https://{host}:{}", addr.port()),
            "pin_sha256": pki.leaf_pin_sha256(),
            "ca_file": ca_file,
            "node": cli.node,
            "token_id": cli.token_id,
            "token_secret": secret,
            "admin_token": admin,
            "pve_version": cli.pve_version.to_string(),
        });
        println!("{line}");
        use std::io::Write;
        std::io::stdout().flush()?;
        eprintln!(
            "felhom-pvesim: PVE {} node {} listening on {addr} ({} guests)",
            cli.pve_version, cli.node, cli.guests
        );
        let server = tokio::spawn(serve(listener, tls, sim, ServeOptions::default()));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        server.abort();
        eprintln!("felhom-pvesim: shutting down");
        Ok::<(), Box<dyn std::error::Error>>(())
    })?;
    drop(tmp);
    Ok(())
}
