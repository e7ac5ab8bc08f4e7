//! `felhom-agent run`: the daemon. Also the CLI side of `selftest --hub`.
//!
//! Starts the hub heartbeat ([`crate::hub::service::HubService`]), tells systemd it is
//! ready, pings the watchdog when `WATCHDOG_USEC` is set, and handles signals:
//! SIGTERM/SIGINT stop it (the report in flight gets a short grace, then exit 0), SIGHUP
//! reloads the configuration (a rotated hub token, say) without a restart; a configuration
//! that fails to load or build keeps the running one.
//!
//! Seam for the reconcile engine (issue 5): it is started in [`daemon`] next to the hub,
//! takes `hub.envelopes()` (blocked, desired_generation, has_signed_ops) and publishes its
//! state into `reconcile_tx`, which every report carries.

use std::path::PathBuf;

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use super::{Cli, CliError};
use crate::config::Config;
use crate::hub::client::HubClientError;
use crate::hub::report::ReconcileReport;
use crate::hub::service::{HubService, HubServiceError, notify, selftest_exchange};

pub fn run(cli: &Cli) -> Result<(), CliError> {
    init_logging();
    let cfg = load(cli.config.as_deref())?;
    // The daemon writes its state (envelope, audit cursor, journal) there.
    crate::config::ensure_state_dir_owner(&cfg.state_dir, "felhom-agent run")
        .map_err(|e| CliError::Usage(e.to_string()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| CliError::Problem(format!("cannot start the async runtime: {e}")))?;
    runtime.block_on(daemon(cli.config.clone(), cfg))
}

fn load(path: Option<&std::path::Path>) -> Result<Config, CliError> {
    let loaded = Config::load(path).map_err(|e| CliError::Usage(e.to_string()))?;
    for w in &loaded.warnings {
        tracing::warn!("{w}");
    }
    Ok(loaded.config)
}

/// Logs to stderr (the journal under systemd); level from `FELHOM_AGENT_LOG`, default
/// `info`.
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FELHOM_AGENT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}

async fn daemon(config_path: Option<PathBuf>, cfg: Config) -> Result<(), CliError> {
    let sig = |kind: SignalKind, name: &str| {
        signal(kind).map_err(|e| CliError::Problem(format!("cannot handle {name}: {e}")))
    };
    let mut sigterm = sig(SignalKind::terminate(), "SIGTERM")?;
    let mut sigint = sig(SignalKind::interrupt(), "SIGINT")?;
    let mut sighup = sig(SignalKind::hangup(), "SIGHUP")?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    // The reconcile engine publishes its state here; `None` until it runs.
    let (reconcile_tx, reconcile_rx) = watch::channel::<Option<ReconcileReport>>(None);
    let hub = HubService::start(&cfg, reconcile_rx, shutdown_rx.clone())
        .map_err(|e| CliError::Usage(e.to_string()))?;
    // Issue 5 starts the reconcile engine here with `hub.envelopes()` and `reconcile_tx`.
    let _engine_seam = (hub.envelopes(), reconcile_tx);

    let watchdog = notify::watchdog_period().map(|period| {
        let mut shutdown = shutdown_rx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tokio::select! {
                    _ = tick.tick() => notify::watchdog(),
                    _ = shutdown.wait_for(|s| *s) => break,
                }
            }
        })
    });
    notify::ready();
    tracing::info!(node = %cfg.node, version = env!("CARGO_PKG_VERSION"), "felhom-agent running");

    loop {
        tokio::select! {
            _ = sigterm.recv() => { tracing::info!("SIGTERM: stopping"); break; }
            _ = sigint.recv() => { tracing::info!("SIGINT: stopping"); break; }
            _ = sighup.recv() => {
                notify::reloading();
                match reload(config_path.as_deref(), &hub).await {
                    Ok(()) => tracing::info!("SIGHUP: configuration reloaded"),
                    Err(e) => tracing::error!(error = %e, "SIGHUP: reload failed; keeping the running configuration"),
                }
                notify::ready();
            }
        }
    }
    notify::stopping();
    let _ = shutdown_tx.send(true);
    hub.join().await;
    if let Some(w) = watchdog {
        w.abort();
    }
    tracing::info!("stopped");
    Ok(())
}

async fn reload(path: Option<&std::path::Path>, hub: &HubService) -> Result<(), String> {
    let loaded = Config::load(path).map_err(|e| e.to_string())?;
    for w in &loaded.warnings {
        tracing::warn!("{w}");
    }
    hub.reload(&loaded.config).await.map_err(|e| e.to_string())
}

/// `selftest --hub`: one collect + report; prints the envelope (JSON with `--json`).
pub fn selftest_hub(cli: &Cli) -> Result<(), CliError> {
    let cfg = load(cli.config.as_deref())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Problem(format!("cannot start the async runtime: {e}")))?;
    let envelope = runtime
        .block_on(selftest_exchange(&cfg))
        .map_err(|e| match &e {
            HubServiceError::Disabled => CliError::Usage(e.to_string()),
            HubServiceError::Client(HubClientError::Setup(_)) => CliError::Usage(e.to_string()),
            HubServiceError::Client(HubClientError::Http(h))
                if h.status == 401 || h.status == 403 =>
            {
                CliError::Usage(format!("{e} (check hub.token)"))
            }
            HubServiceError::Client(HubClientError::Envelope(_)) => {
                CliError::Problem(e.to_string())
            }
            HubServiceError::Client(_) | HubServiceError::Stopped => {
                CliError::Unreachable(e.to_string())
            }
        })?;
    if cli.json {
        let text = serde_json::to_string_pretty(&envelope)
            .map_err(|e| CliError::Problem(e.to_string()))?;
        println!("{text}");
    } else {
        let floor = crate::hub::envelope::poll_floor(cfg.hub.test_min_poll_interval_seconds);
        println!("hub accepted the report");
        println!(
            "  poll_interval_seconds: {} (next report in {} s)",
            envelope
                .poll_interval_seconds
                .map_or_else(|| "default".to_owned(), |s| s.to_string()),
            envelope.poll_interval(floor).as_secs()
        );
        println!("  blocked:               {}", envelope.blocked);
        println!("  desired_generation:    {}", envelope.desired_generation);
        println!("  has_signed_ops:        {}", envelope.has_signed_ops);
    }
    Ok(())
}
