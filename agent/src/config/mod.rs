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
//! Precedence, field by field: environment variable, then the file, then the default. An
//! empty environment variable unsets the field (the default, if any, applies again). A
//! secret (`proxmox.token_secret`, `hub.token`) comes from exactly one place: the field
//! itself (file or env), its `*_file` companion, or the systemd credential
//! (`$CREDENTIALS_DIRECTORY/proxmox-token`, `…/hub-token`); two at once is an error.
//!
//! JSON names and their variables (`FELHOM_AGENT_` + path upper-cased, `.` → `_`):
//!
//! | field | default |
//! |---|---|
//! | `node` | required |
//! | `agent_id` | none: created once in `state_dir/agent-id` (32 lower-case hex) |
//! | `state_dir` | `/var/lib/felhom-agent` |
//! | `proxmox.url` | required (`https://…`) |
//! | `proxmox.token_id` | required (`user@realm!name`) |
//! | `proxmox.token_secret` / `proxmox.token_secret_file` / credential `proxmox-token` | one required |
//! | `proxmox.tls.pin_sha256` / `proxmox.tls.ca_file` / `proxmox.tls.insecure` | exactly one |
//! | `hub.mode` | `enabled` when `hub.url` is set, else `disabled` |
//! | `hub.url`, `hub.token` / `hub.token_file` / credential `hub-token` | needed when enabled |
//! | `hub.ca_file` / `hub.tls.pin_sha256` | at most one; system roots when neither |
//! | `hub.test_min_poll_interval_seconds` | unset (test bed only) |
//! | `privhelper.socket_dir`, `.audit_log`, `.timeout_seconds` | `/run/felhom-privhelper`, `/var/log/felhom/privhelper-audit.jsonl`, 30 |
//! | `sensors.hwmon_root` | `/sys/class/hwmon` |
//! | `smart.interval_seconds`, `smart.devices` (env: comma list) | 1800, discover |
//! | `cloudflared.metrics_url`, `.timeout_seconds` | `http://127.0.0.1:20241`, 2 |
//! | `reconcile.desired_source` | `file`: `reconcile.desired_file`, or no desired state when unset; `hub`: the hub's signed document (needs the hub enabled and no `desired_file`) |
//! | `reconcile.desired_file`, `.shutdown_timeout_seconds` | none, 120 |
//! | `control.socket` | `/run/felhom/agent.sock` |
//! | `authz.signers_file` | `/etc/felhom/signers.json` (absent: signed operations off) |
//! | `restore_tests.scratch_vmids` | none; `"A-B"`: the restore tests' scratch guests (signed operations may not target them) |
//! | `restore_tests.enabled` | false; true needs `scratch_vmids` and `storage` |
//! | `restore_tests.storage` | none: the target storage of the scratch guests' disks |
//! | `restore_tests.interval_hours`, `.window` | 24; none, or `"HH:MM-HH:MM"` local time (may span midnight) |
//! | `restore_tests.boot_check_seconds`, `.stable_seconds` | 120, 10 |
//! | `restore_tests.max_archive_bytes`, `.min_free_fraction` | none (no limit), 0.2 |
//!
//! Unknown keys in the file are rejected with their full path; every path in the file must
//! be absolute.

mod fields;
mod load;
mod secret;
mod state_dir;

use std::path::{Path, PathBuf};
use std::time::Duration;

#[allow(unused_imports)] // used by the proxmox client for node names in paths
pub(crate) use load::valid_node_name;
pub use load::{EnvMap, FieldOrigin, LoadedConfig, Provenance, Source, format_fingerprint};
pub use secret::Secret;
pub use state_dir::{StateDirError, ensure_state_dir_owner};

/// Default config file path.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/felhom/agent.json";
/// Default `authz.signers_file`.
pub const DEFAULT_SIGNERS_FILE: &str = "/etc/felhom/signers.json";
/// Default `state_dir`.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/felhom-agent";

/// Why a configuration could not be loaded. Every variant names the field or file; none
/// carries a secret value.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {detail}")]
    Syntax { path: PathBuf, detail: String },
    #[error("unknown key `{key}` in {path} (a typo?)")]
    UnknownKey { key: String, path: PathBuf },
    #[error("invalid {field} (from {origin}): {reason}")]
    Invalid {
        field: String,
        origin: String,
        reason: String,
    },
    #[error("{field} is not set: {hint}")]
    Missing { field: String, hint: String },
    #[error("{first} and {second} are both set: {hint}")]
    Conflict {
        first: String,
        second: String,
        hint: String,
    },
    #[error("cannot read the secret for {field} from {path}: {source}")]
    SecretFile {
        field: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("environment variable {var} is not valid UTF-8")]
    EnvNotUnicode { var: String },
}

impl Config {
    /// Loads `path` (default [`DEFAULT_CONFIG_PATH`]) with the process environment's
    /// overrides and secrets. `SIGHUP` reload calls this too.
    pub fn load(path: Option<&Path>) -> Result<LoadedConfig, ConfigError> {
        Config::load_with_env(path, &process_env()?)
    }

    /// [`Config::load`] with an explicit environment (tests, reload with a captured env).
    pub fn load_with_env(path: Option<&Path>, env: &EnvMap) -> Result<LoadedConfig, ConfigError> {
        load::load(path, env)
    }

    /// Only the host-local sections ([`HostConfig`]) of the same file and environment:
    /// what `privileged …` and `sensors` need. The Proxmox and hub sections, and their
    /// secrets, are neither read nor required, so an operator can run these where the
    /// daemon's systemd credentials are not available.
    pub fn load_host(path: Option<&Path>) -> Result<HostConfig, ConfigError> {
        load::load_host(path, &process_env()?)
    }

    /// A complete config for tests: the given node, state dir and Proxmox section, every
    /// other section at its default and the hub disabled. Not used by the binary.
    pub fn for_tests(node: &str, state_dir: PathBuf, proxmox: ProxmoxConfig) -> Config {
        Config {
            node: node.to_string(),
            agent_id: None,
            state_dir,
            proxmox,
            hub: HubConfig {
                mode: HubMode::Disabled,
                test_min_poll_interval_seconds: None,
            },
            privhelper: PrivhelperConfig::default(),
            sensors: SensorsConfig::default(),
            smart: SmartConfig::default(),
            cloudflared: CloudflaredConfig::default(),
            reconcile: ReconcileConfig::default(),
            control: ControlConfig::default(),
            authz: AuthzConfig::default(),
            scratch_vmids: None,
            restore_tests: RestoreTestsConfig::default(),
            gate: GateConfig::default(),
        }
    }
}

/// The variables the loader may read, taken from the process environment. Only known
/// names are looked up; nothing else of the environment is copied.
fn process_env() -> Result<EnvMap, ConfigError> {
    let mut env = EnvMap::new();
    let names = fields::FIELDS
        .iter()
        .map(|f| f.env)
        .chain([fields::CREDENTIALS_DIRECTORY]);
    for name in names {
        if let Some(v) = std::env::var_os(name) {
            let v = v.into_string().map_err(|_| ConfigError::EnvNotUnicode {
                var: name.to_string(),
            })?;
            env.insert(name.to_string(), v);
        }
    }
    Ok(env)
}

/// The whole, validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The Proxmox node this agent runs on (as PVE names it).
    pub node: String,
    /// This host's identity for signed operations when set here; otherwise it is read
    /// from (or created once in) `state_dir/agent-id` ([`crate::ops::identity`]).
    pub agent_id: Option<felhom_authz::AgentId>,
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
    pub authz: AuthzConfig,
    /// The restore tests' scratch range (`restore_tests.scratch_vmids`): a signed guest
    /// operation on one of these vmids is refused `invalid_params`.
    pub scratch_vmids: Option<std::ops::RangeInclusive<u32>>,
    /// The rest of the `restore_tests` section.
    pub restore_tests: RestoreTestsConfig,
    /// The reversibility gate of signed guest operations.
    pub gate: GateConfig,
}

/// `gate`: where undo backups go, how long a guest may take to be healthy after a gated
/// operation, and when the undo points' share of a storage is reported.
#[derive(Debug, Clone, PartialEq)]
pub struct GateConfig {
    /// The storage undo backups are written to. No default: an operator chooses where the
    /// way back of a change lives. Signed operations need it (`config check` fails
    /// without it while a signers file is in place).
    pub backup_storage: Option<String>,
    /// How long a guest may take to reach the power state its operation asks for.
    pub health_timeout_seconds: u64,
    /// Above this share of a storage's size, summed over the undo points kept on it, the
    /// report carries an error.
    pub undo_warn_fraction: f64,
}

impl Default for GateConfig {
    fn default() -> Self {
        GateConfig {
            backup_storage: None,
            health_timeout_seconds: 120,
            undo_warn_fraction: 0.2,
        }
    }
}

/// `restore_tests` (besides `scratch_vmids`, kept on [`Config`]).
#[derive(Debug, Clone, PartialEq)]
pub struct RestoreTestsConfig {
    /// Scheduled restore tests on; `restore-test run` works whenever the range and storage
    /// are set.
    pub enabled: bool,
    /// Target storage for the scratch guests' disks.
    pub storage: Option<String>,
    pub interval_hours: u64,
    /// Local time window the scheduled tests start in; `None`: any time.
    pub window: Option<RestoreWindow>,
    /// How long a scratch guest may take to run (and, for QEMU with the agent, answer).
    pub boot_check_seconds: u64,
    /// How long it must then stay running.
    pub stable_seconds: u64,
    /// Larger archives are skipped.
    pub max_archive_bytes: Option<u64>,
    /// A test is skipped when the target storage's free share would drop below this.
    pub min_free_fraction: f64,
}

impl Default for RestoreTestsConfig {
    fn default() -> Self {
        RestoreTestsConfig {
            enabled: false,
            storage: None,
            interval_hours: 24,
            window: None,
            boot_check_seconds: 120,
            stable_seconds: 10,
            max_archive_bytes: None,
            min_free_fraction: 0.2,
        }
    }
}

/// A daily window in local time, minutes after midnight; `end < start` spans midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestoreWindow {
    pub start_minute: u16,
    pub end_minute: u16,
}

impl RestoreWindow {
    /// True when `minute` (after local midnight) is inside the window (end excluded).
    pub fn contains(&self, minute: u16) -> bool {
        if self.start_minute < self.end_minute {
            (self.start_minute..self.end_minute).contains(&minute)
        } else {
            minute >= self.start_minute || minute < self.end_minute
        }
    }
}

impl std::fmt::Display for RestoreWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hm = |m: u16| format!("{:02}:{:02}", m / 60, m % 60);
        write!(f, "{}-{}", hm(self.start_minute), hm(self.end_minute))
    }
}

/// The sections of [`Config`] that concern this host only (no Proxmox, no hub).
#[derive(Debug, Clone)]
pub struct HostConfig {
    pub state_dir: PathBuf,
    pub privhelper: PrivhelperConfig,
    pub sensors: SensorsConfig,
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
        /// How the hub's certificate is verified.
        tls: HubTls,
    },
}

/// How the hub's certificate is verified: the system roots unless `hub.ca_file` or
/// `hub.tls.pin_sha256` is set (at most one of the two).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HubTls {
    SystemRoots,
    /// Trust only the CA(s) in this PEM file.
    CaFile(PathBuf),
    /// Exactly the leaf certificate with this SHA-256 of its DER (names not checked); a
    /// self-signed certificate, even a CA certificate used as the server's, works.
    PinSha256([u8; 32]),
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
    /// Where the desired state comes from.
    pub desired_source: DesiredSource,
    /// File provider of the desired state (source `file` only); `None` = empty provider
    /// (no actions).
    pub desired_file: Option<PathBuf>,
    pub shutdown_timeout_seconds: u64,
}

/// `reconcile.desired_source`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DesiredSource {
    /// `reconcile.desired_file` on this host (or nothing when it is unset).
    #[default]
    File,
    /// The signed desired-state document the hub serves (`GET /api/agent/v1/desired`).
    Hub,
}

impl DesiredSource {
    pub fn as_str(self) -> &'static str {
        match self {
            DesiredSource::File => "file",
            DesiredSource::Hub => "hub",
        }
    }
}

#[derive(Debug, Clone)]
pub struct ControlConfig {
    /// The daemon's local control socket.
    pub socket: PathBuf,
}

#[derive(Debug, Clone)]
pub struct AuthzConfig {
    /// The operator keys this host trusts (`signers.json`); absent: signed operations off.
    pub signers_file: PathBuf,
}

impl Default for AuthzConfig {
    fn default() -> Self {
        AuthzConfig {
            signers_file: PathBuf::from(DEFAULT_SIGNERS_FILE),
        }
    }
}

impl Default for PrivhelperConfig {
    fn default() -> Self {
        PrivhelperConfig {
            socket_dir: PathBuf::from("/run/felhom-privhelper"),
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
            desired_source: DesiredSource::File,
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

#[cfg(test)]
mod tests;
