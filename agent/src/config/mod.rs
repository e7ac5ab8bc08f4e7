//! Configuration: the validated, typed [`Config`] every part of the agent reads.
//!
//! Owns: the JSON file (default `/etc/felhom/agent.json`, `--config PATH`), the
//! `FELHOM_AGENT_*` environment overrides (each known field mapped to its variable name;
//! names are never parsed), secrets from files or systemd credentials, validation that names
//! the offending field, and the provenance of every value for `felhom-agent config check`.
//!
//! Must never: print, log or `Debug`-format a secret ([`Secret`] redacts itself), or accept
//! a TLS setup that switches verification off other than the explicit `insecure: true`.
//!
//! The loader is filled by issue 2; the section shapes below are the contract the other
//! modules code against.

mod secret;

use std::path::PathBuf;
use std::time::Duration;

pub use secret::Secret;

/// Default config file path.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/felhom/agent.json";

/// The whole, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The Proxmox node this agent runs on (as PVE names it).
    pub node: String,
    /// Where the agent keeps its state (journal, envelope, audit cursor). Owned by the
    /// agent's user.
    pub state_dir: PathBuf,
    pub proxmox: ProxmoxConfig,
    pub hub: HubConfig,
    pub privhelper: PrivhelperConfig,
    pub sensors: SensorsConfig,
    pub smart: SmartConfig,
    pub cloudflared: CloudflaredConfig,
    pub reconcile: ReconcileConfig,
    pub control: ControlConfig,
}

#[derive(Debug, Clone)]
pub struct ProxmoxConfig {
    /// e.g. `https://127.0.0.1:8006`; the client appends `/api2/json`.
    pub url: String,
    /// `user@realm!tokenname`
    pub token_id: String,
    pub token_secret: Secret,
    pub tls: TlsVerify,
}

/// Exactly one way to verify the Proxmox certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsVerify {
    /// SHA-256 of the leaf certificate's DER.
    PinSha256([u8; 32]),
    /// A PEM file with the CA(s) to trust (e.g. `/etc/pve/pve-root-ca.pem`).
    CaFile(PathBuf),
    /// Explicitly no verification; logged as a warning at every start.
    Insecure,
}

#[derive(Debug, Clone)]
pub struct HubConfig {
    pub mode: HubMode,
    /// Test bed only: lowers the poll-interval floor (60 s in production).
    pub test_min_poll_interval_seconds: Option<u64>,
}

#[derive(Debug, Clone)]
pub enum HubMode {
    Disabled,
    Enabled {
        /// https URL of the hub (base; the client appends `/api/agent/v1/report`).
        url: String,
        token: Secret,
        /// Extra CA to trust; system roots otherwise.
        ca_file: Option<PathBuf>,
    },
}

#[derive(Debug, Clone)]
pub struct PrivhelperConfig {
    /// Holds `privhelper-pct.sock`, `privhelper-usb.sock`, `privhelper-smart.sock`.
    pub socket_dir: PathBuf,
    /// The helper's audit log, readable by the agent's group.
    pub audit_log: PathBuf,
    pub timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct SensorsConfig {
    pub hwmon_root: PathBuf,
}

#[derive(Debug, Clone)]
pub struct SmartConfig {
    pub interval_seconds: u64,
    /// Disks to read; `None` means discover `sd*`/`nvme*` disks from sysfs.
    pub devices: Option<Vec<String>>,
}

#[derive(Debug, Clone)]
pub struct CloudflaredConfig {
    pub metrics_url: String,
    pub timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct ReconcileConfig {
    /// File provider of the desired state; `None` = empty provider (no actions).
    pub desired_file: Option<PathBuf>,
    pub shutdown_timeout_seconds: u64,
}

#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// The daemon's local control socket.
    pub socket: PathBuf,
}

impl Default for PrivhelperConfig {
    fn default() -> Self {
        PrivhelperConfig {
            socket_dir: PathBuf::from("/run/felhom"),
            audit_log: PathBuf::from("/var/log/felhom/privhelper-audit.jsonl"),
            timeout: Duration::from_secs(30),
        }
    }
}

impl Default for SensorsConfig {
    fn default() -> Self {
        SensorsConfig {
            hwmon_root: PathBuf::from("/sys/class/hwmon"),
        }
    }
}

impl Default for SmartConfig {
    fn default() -> Self {
        SmartConfig {
            interval_seconds: 1800,
            devices: None,
        }
    }
}

impl Default for CloudflaredConfig {
    fn default() -> Self {
        CloudflaredConfig {
            metrics_url: "http://127.0.0.1:20241".to_string(),
            timeout: Duration::from_secs(2),
        }
    }
}

impl Default for ReconcileConfig {
    fn default() -> Self {
        ReconcileConfig {
            desired_file: None,
            shutdown_timeout_seconds: 120,
        }
    }
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            socket: PathBuf::from("/run/felhom/agent.sock"),
        }
    }
}
