//! The helper's configuration: `/etc/felhom/privhelper.json` or `--config PATH`.
//!
//! Root executes what this file names, so it is trusted only when root owns it and no
//! group or other may write it, and the same holds for every tool it names (and every
//! directory above them, unless sticky). Defaults are the production values; every
//! non-default path is reported as a warning at start.
//!
//! "Owned by root" precisely: owned by uid 0 or by the helper's own effective uid. For
//! the production helper (euid 0) that is root only. A helper running as an ordinary user
//! (the local stack, `felhom-devstack`) gains nothing from a file that same user can
//! write, so that user's files are trusted too; another user's never are.

use std::fs::Metadata;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/felhom/privhelper.json";
const MAX_CONFIG_BYTES: u64 = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not valid JSON config: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: refused: {reason}")]
    Untrusted { path: PathBuf, reason: String },
    #[error("{0}")]
    Invalid(String),
    #[error("agent user {0:?} does not exist")]
    NoSuchUser(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTools {
    pct: Option<PathBuf>,
    smartctl: Option<PathBuf>,
    blkid: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    agent_user: Option<String>,
    agent_uid: Option<u32>,
    agent_gid: Option<u32>,
    audit_log: Option<PathBuf>,
    audit_max_bytes: Option<u64>,
    audit_keep: Option<u32>,
    audit_ack: Option<PathBuf>,
    mount_root: Option<PathBuf>,
    fstab: Option<PathBuf>,
    sysfs_root: Option<PathBuf>,
    tools: Option<RawTools>,
    idle_exit_seconds: Option<u64>,
    tool_timeout_seconds: Option<u64>,
    pct_timeout_seconds: Option<u64>,
}

/// The tools root runs; each path checked and canonical.
#[derive(Debug, Clone)]
pub struct Tools {
    pub pct: PathBuf,
    pub smartctl: PathBuf,
    pub blkid: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub agent_uid: u32,
    pub agent_gid: u32,
    pub audit_log: PathBuf,
    pub audit_max_bytes: u64,
    pub audit_keep: u32,
    /// The agent's audit cursor (last `seq` the hub accepted); rotation keeps every
    /// unacknowledged intent and outcome (see `audit`).
    pub audit_ack: PathBuf,
    pub mount_root: PathBuf,
    pub fstab: PathBuf,
    pub sysfs_root: PathBuf,
    pub tools: Tools,
    pub idle_exit: Duration,
    /// smartctl and blkid.
    pub tool_timeout: Duration,
    /// pct create (template extraction can take minutes).
    pub pct_timeout: Duration,
    /// Non-default settings, reported at start.
    pub warnings: Vec<String>,
}

fn untrusted(path: &Path, reason: impl Into<String>) -> ConfigError {
    ConfigError::Untrusted {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Whether a file or directory owned by `owner` may be trusted by a helper running with
/// effective uid `euid`: root's always; our own user's too (a helper that is not root
/// could write such a file itself, so trusting it grants nothing); nobody else's.
pub fn trusted_owner(owner: u32, euid: u32) -> bool {
    owner == 0 || owner == euid
}

fn euid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

fn not_trusted_owner(owner: u32) -> String {
    let me = euid();
    if me == 0 {
        format!("owned by uid {owner}, not root")
    } else {
        format!("owned by uid {owner}, neither root nor this helper's uid {me}")
    }
}

/// Owned by root (or by the helper's own uid, see [`trusted_owner`]), not writable by
/// group or others.
fn check_root_owned(path: &Path, md: &Metadata) -> Result<(), ConfigError> {
    if !trusted_owner(md.uid(), euid()) {
        return Err(untrusted(path, not_trusted_owner(md.uid())));
    }
    if md.permissions().mode() & 0o022 != 0 {
        return Err(untrusted(
            path,
            format!(
                "mode {:o} is writable by group or others",
                md.permissions().mode() & 0o7777
            ),
        ));
    }
    Ok(())
}

/// A file root may execute: canonical path, regular, executable, root-owned, not
/// group/other-writable, and every directory above it root-owned and not writable by
/// others (a sticky directory such as /tmp is accepted, as only its owner may replace
/// entries in it). "Root-owned" as [`trusted_owner`] says.
pub fn check_trusted_tool(path: &Path) -> Result<PathBuf, ConfigError> {
    let canon = std::fs::canonicalize(path).map_err(|source| ConfigError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let md = std::fs::metadata(&canon).map_err(|source| ConfigError::Io {
        path: canon.clone(),
        source,
    })?;
    if !md.is_file() {
        return Err(untrusted(&canon, "not a regular file"));
    }
    if md.permissions().mode() & 0o111 == 0 {
        return Err(untrusted(&canon, "not executable"));
    }
    check_root_owned(&canon, &md)?;
    check_parents(&canon)?;
    Ok(canon)
}

fn check_parents(canon: &Path) -> Result<(), ConfigError> {
    let mut dir = canon.parent();
    while let Some(d) = dir {
        let md = std::fs::metadata(d).map_err(|source| ConfigError::Io {
            path: d.to_path_buf(),
            source,
        })?;
        let mode = md.permissions().mode();
        let sticky = mode & 0o1000 != 0;
        if !trusted_owner(md.uid(), euid()) {
            return Err(untrusted(
                d,
                format!("directory {}", not_trusted_owner(md.uid())),
            ));
        }
        if mode & 0o022 != 0 && !sticky {
            return Err(untrusted(d, "directory writable by group or others"));
        }
        dir = d.parent();
    }
    Ok(())
}

fn read_trusted_file(path: &Path) -> Result<String, ConfigError> {
    let io = |source| ConfigError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(path)
        .map_err(io)?;
    let md = f.metadata().map_err(io)?;
    if !md.is_file() {
        return Err(untrusted(path, "not a regular file"));
    }
    check_root_owned(path, &md)?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        check_parents(&std::fs::canonicalize(parent).map_err(io)?.join("x"))?;
    }
    let mut s = String::new();
    (&mut f)
        .take(MAX_CONFIG_BYTES + 1)
        .read_to_string(&mut s)
        .map_err(io)?;
    if s.len() as u64 > MAX_CONFIG_BYTES {
        return Err(untrusted(path, "larger than 64 KiB"));
    }
    Ok(s)
}

impl Config {
    /// Loads `path` (or the default). A missing default file means all defaults; a
    /// missing `--config` file is an error.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let (p, explicit) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_CONFIG_PATH), false),
        };
        let text = match read_trusted_file(&p) {
            Ok(t) => t,
            Err(ConfigError::Io { source, .. })
                if !explicit && source.kind() == std::io::ErrorKind::NotFound =>
            {
                "{}".to_string()
            }
            Err(e) => return Err(e),
        };
        let raw: RawConfig = serde_json::from_str(&text).map_err(|e| ConfigError::Parse {
            path: p.clone(),
            message: e.to_string(),
        })?;
        let mut cfg = Self::from_raw(raw)?;
        if explicit {
            cfg.warnings
                .insert(0, format!("config file {} (not the default)", p.display()));
        }
        Ok(cfg)
    }

    fn from_raw(raw: RawConfig) -> Result<Config, ConfigError> {
        let mut warnings = Vec::new();
        let (agent_uid, agent_gid) = match (&raw.agent_user, raw.agent_uid, raw.agent_gid) {
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
                return Err(ConfigError::Invalid(
                    "give agent_user or agent_uid/agent_gid, not both".into(),
                ));
            }
            (None, Some(uid), Some(gid)) => {
                warnings.push(format!(
                    "agent_uid {uid} / agent_gid {gid} given as numbers"
                ));
                (uid, gid)
            }
            (None, Some(_), None) | (None, None, Some(_)) => {
                return Err(ConfigError::Invalid(
                    "agent_uid and agent_gid go together".into(),
                ));
            }
            (name, None, None) => {
                let name = name.clone().unwrap_or_else(|| "felhom-agent".to_string());
                let user = nix::unistd::User::from_name(&name)
                    .map_err(|e| ConfigError::Invalid(format!("looking up {name:?}: {e}")))?
                    .ok_or_else(|| ConfigError::NoSuchUser(name.clone()))?;
                (user.uid.as_raw(), user.gid.as_raw())
            }
        };
        if agent_uid == 0 {
            return Err(ConfigError::Invalid(
                "the agent must not run as root (agent uid 0)".into(),
            ));
        }
        let mut path =
            |value: Option<PathBuf>, default: &str, what: &str| -> Result<PathBuf, ConfigError> {
                let p = value.unwrap_or_else(|| PathBuf::from(default));
                if !p.is_absolute() {
                    return Err(ConfigError::Invalid(format!(
                        "{what} must be an absolute path"
                    )));
                }
                if p != Path::new(default) {
                    warnings.push(format!("{what} is {} (default {default})", p.display()));
                }
                Ok(p)
            };
        let audit_log = path(
            raw.audit_log,
            "/var/log/felhom/privhelper-audit.jsonl",
            "audit_log",
        )?;
        let audit_ack = path(
            raw.audit_ack,
            "/var/lib/felhom-agent/audit-cursor.json",
            "audit_ack",
        )?;
        let mount_root = path(raw.mount_root, "/mnt/felhom", "mount_root")?;
        let fstab = path(raw.fstab, "/etc/fstab", "fstab")?;
        let sysfs_root = path(raw.sysfs_root, "/sys", "sysfs_root")?;
        let tools = raw.tools.unwrap_or(RawTools {
            pct: None,
            smartctl: None,
            blkid: None,
        });
        let pct = path(tools.pct, "/usr/sbin/pct", "tools.pct")?;
        let smartctl = path(tools.smartctl, "/usr/sbin/smartctl", "tools.smartctl")?;
        let blkid = path(tools.blkid, "/usr/sbin/blkid", "tools.blkid")?;
        let audit_keep = raw.audit_keep.unwrap_or(4);
        if !(1..=100).contains(&audit_keep) {
            return Err(ConfigError::Invalid("audit_keep must be 1..=100".into()));
        }
        let audit_max_bytes = raw.audit_max_bytes.unwrap_or(8 * 1024 * 1024);
        if audit_max_bytes < 4096 {
            return Err(ConfigError::Invalid(
                "audit_max_bytes must be at least 4096".into(),
            ));
        }
        let secs = |v: Option<u64>, d: u64, what: &str| -> Result<Duration, ConfigError> {
            let v = v.unwrap_or(d);
            if v == 0 || v > 86_400 {
                return Err(ConfigError::Invalid(format!("{what} must be 1..=86400")));
            }
            Ok(Duration::from_secs(v))
        };
        Ok(Config {
            agent_uid,
            agent_gid,
            audit_log,
            audit_max_bytes,
            audit_keep,
            audit_ack,
            mount_root,
            fstab,
            sysfs_root,
            tools: Tools {
                pct,
                smartctl,
                blkid,
            },
            idle_exit: secs(raw.idle_exit_seconds, 60, "idle_exit_seconds")?,
            tool_timeout: secs(raw.tool_timeout_seconds, 120, "tool_timeout_seconds")?,
            pct_timeout: secs(raw.pct_timeout_seconds, 1800, "pct_timeout_seconds")?,
            warnings,
        })
    }

    /// The tool paths root may run for `class`, checked now (a missing tool of another
    /// class does not stop this instance).
    pub fn check_tools(&self, class: felhom_protocol::Class) -> Result<Tools, ConfigError> {
        use felhom_protocol::Class;
        let mut t = self.tools.clone();
        match class {
            Class::Pct => t.pct = check_trusted_tool(&t.pct)?,
            Class::Usb => t.blkid = check_trusted_tool(&t.blkid)?,
            Class::Smart => t.smartctl = check_trusted_tool(&t.smartctl)?,
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(json: &str) -> Result<Config, ConfigError> {
        Config::from_raw(serde_json::from_str(json).unwrap())
    }

    #[test]
    fn numbers_instead_of_name() {
        let c = raw(r#"{"agent_uid": 990, "agent_gid": 990}"#).unwrap();
        assert_eq!((c.agent_uid, c.agent_gid), (990, 990));
        assert_eq!(
            c.audit_log,
            Path::new("/var/log/felhom/privhelper-audit.jsonl")
        );
        assert_eq!(c.idle_exit, Duration::from_secs(60));
        assert!(raw(r#"{"agent_uid": 990}"#).is_err());
        assert!(raw(r#"{"agent_uid": 0, "agent_gid": 0}"#).is_err());
        assert!(raw(r#"{"agent_user": "x", "agent_uid": 5, "agent_gid": 5}"#).is_err());
        assert!(
            serde_json::from_str::<RawConfig>(r#"{"agent_uid": 1, "shell": "/bin/sh"}"#).is_err()
        );
    }

    #[test]
    fn non_default_paths_warn() {
        let c = raw(r#"{"agent_uid": 990, "agent_gid": 990, "fstab": "/tmp/x/fstab", "tools": {"pct": "/tmp/pct"}}"#).unwrap();
        assert!(
            c.warnings
                .iter()
                .any(|w| w.contains("fstab is /tmp/x/fstab"))
        );
        assert!(c.warnings.iter().any(|w| w.contains("tools.pct")));
        assert!(raw(r#"{"agent_uid": 990, "agent_gid": 990, "fstab": "rel/fstab"}"#).is_err());
    }

    #[test]
    fn root_and_our_own_uid_are_trusted_owners_nobody_else() {
        // the production helper: root only
        assert!(trusted_owner(0, 0));
        assert!(!trusted_owner(1000, 0));
        // a helper running as uid 1000 (the local stack): root and itself
        assert!(trusted_owner(0, 1000));
        assert!(trusted_owner(1000, 1000));
        assert!(!trusted_owner(1001, 1000));
        assert!(!trusted_owner(65534, 1000));
    }

    #[test]
    fn tools_must_be_root_owned_and_not_writable() {
        let dir = std::env::temp_dir().join(format!("felhom-cfg-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let tool = dir.join("tool");
        std::fs::write(&tool, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        if nix::unistd::geteuid().is_root() {
            assert!(check_trusted_tool(&tool).is_ok());
            std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o775)).unwrap();
            assert!(check_trusted_tool(&tool).is_err());
            std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o644)).unwrap();
            assert!(check_trusted_tool(&tool).is_err());
            std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
            assert!(check_trusted_tool(&tool).is_err());
        } else {
            eprintln!("SKIP (needs root): ownership checks");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
