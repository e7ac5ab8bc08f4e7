//! The host's trust in operator keys, as the agent loads it: `authz.signers_file`.
//!
//! Owns: reading the signers file (no symlink followed, size capped), the owner/mode rule
//! applied to the opened file, and the three outcomes: no file (signed operations off),
//! a file that is not safely owned (off, with the exact reason), a valid file (on).
//! Must never: fall back to "fewer keys" or to "off" when the file is present but
//! malformed (that is a configuration error), or trust a file the agent itself could
//! rewrite.

use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use felhom_authz::trust::MAX_SIGNERS_FILE_BYTES;
use felhom_authz::{FileCheckError, Grant, Trust, TrustError, check_file_metadata};

/// Why the signers file could not be used at all: a configuration error (exit 2).
#[derive(Debug, thiserror::Error)]
pub enum TrustFileError {
    #[error("cannot read the signers file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the signers file {path} is invalid: {source}")]
    Invalid { path: PathBuf, source: TrustError },
}

/// What the agent may do with signed operations.
#[derive(Debug, Clone)]
pub enum TrustState {
    /// No signers file: signed operations are off.
    Disabled { path: PathBuf },
    /// The file is there but its owner or mode is not safe: off, and why.
    Untrusted {
        path: PathBuf,
        reason: FileCheckError,
    },
    /// Signed operations are on with this trust.
    Enabled { path: PathBuf, trust: Arc<Trust> },
}

impl TrustState {
    pub fn is_enabled(&self) -> bool {
        matches!(self, TrustState::Enabled { .. })
    }

    /// The trust, when operations are on.
    pub fn trust(&self) -> Option<&Trust> {
        match self {
            TrustState::Enabled { trust, .. } => Some(trust),
            _ => None,
        }
    }

    /// One line for `status` and the log.
    pub fn describe(&self) -> String {
        match self {
            TrustState::Disabled { path } => format!("disabled (no {})", path.display()),
            TrustState::Untrusted { path, reason } => {
                format!("disabled: {} {reason}", path.display())
            }
            TrustState::Enabled { path, trust } => format!(
                "enabled ({}: {}; threshold reversible {}, irreversible {})",
                path.display(),
                trust.names().join(", "),
                trust.threshold(Grant::Reversible),
                trust.threshold(Grant::Irreversible)
            ),
        }
    }

    /// The machine-readable form for `status --json` and `config check --json`.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::json;
        match self {
            TrustState::Disabled { path } => json!({
                "enabled": false,
                "state": "disabled",
                "signers_file": path.display().to_string(),
                "reason": format!("no {}", path.display()),
            }),
            TrustState::Untrusted { path, reason } => json!({
                "enabled": false,
                "state": "untrusted_file",
                "signers_file": path.display().to_string(),
                "reason": format!("{} {reason}", path.display()),
            }),
            TrustState::Enabled { path, trust } => json!({
                "enabled": true,
                "state": "enabled",
                "signers_file": path.display().to_string(),
                "signers": trust.names(),
                "threshold": {
                    "reversible": trust.threshold(Grant::Reversible),
                    "irreversible": trust.threshold(Grant::Irreversible),
                },
                "max_validity_seconds": trust.max_validity_seconds(),
                "clock_skew_seconds": trust.clock_skew_seconds(),
            }),
        }
    }
}

/// The uid the daemon runs as: the owner of `state_dir` (the daemon refuses to run as
/// anyone else), or this process's when `state_dir` does not exist yet. A command run by
/// root for the operator thus judges the file as the daemon will.
pub fn agent_uid(state_dir: &Path) -> u32 {
    std::fs::metadata(state_dir)
        .map(|m| m.uid())
        .unwrap_or_else(|_| nix::unistd::geteuid().as_raw())
}

/// Loads `path` for an agent running as `agent_uid`.
pub fn load_trust(path: &Path, agent_uid: u32) -> Result<TrustState, TrustFileError> {
    let read_err = |source| TrustFileError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(TrustState::Disabled {
                path: path.to_path_buf(),
            });
        }
        // O_NOFOLLOW on a symlink: a link is not the file root placed there.
        Err(e) if e.raw_os_error() == Some(nix::errno::Errno::ELOOP as i32) => {
            return Ok(TrustState::Untrusted {
                path: path.to_path_buf(),
                reason: FileCheckError::NotRegular,
            });
        }
        Err(e) => return Err(read_err(e)),
    };
    // The checks apply to the file that was opened, not to whatever the name points at
    // by the time it is read.
    let meta = file.metadata().map_err(read_err)?;
    if let Err(reason) = check_file_metadata(&meta, agent_uid) {
        return Ok(TrustState::Untrusted {
            path: path.to_path_buf(),
            reason,
        });
    }
    let mut bytes = Vec::new();
    file.take(MAX_SIGNERS_FILE_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    let trust = Trust::from_json(&bytes).map_err(|source| TrustFileError::Invalid {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(TrustState::Enabled {
        path: path.to_path_buf(),
        trust: Arc::new(trust),
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    // RFC 8032 test 1 and 2 public keys.
    const K1: &str = "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=";
    const K2: &str = "PUAXw+hDiVqStwqnTRt+vJyYLM8uxJaMwM1V8Sr0Zgw=";

    fn good() -> String {
        format!(
            r#"{{"keys":[{{"name":"alice","ed25519":"{K1}"}},{{"name":"bob","ed25519":"{K2}"}}],"threshold":{{"reversible":1,"irreversible":2}}}}"#
        )
    }

    /// Writes `body` with `mode`, owned by the test's uid; `agent` is judged as another
    /// uid unless given.
    fn file(dir: &Path, body: &str, mode: u32) -> PathBuf {
        let p = dir.join("signers.json");
        std::fs::write(&p, body).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    fn me() -> u32 {
        nix::unistd::geteuid().as_raw()
    }

    #[test]
    fn no_file_is_disabled() {
        let dir = tempfile::tempdir().unwrap();
        let s = load_trust(&dir.path().join("signers.json"), 1000).unwrap();
        assert!(matches!(s, TrustState::Disabled { .. }));
        assert!(!s.is_enabled());
        assert_eq!(s.to_json()["enabled"], false);
    }

    #[test]
    fn a_root_owned_file_is_enabled_for_another_uid() {
        if me() != 0 {
            eprintln!("skipped: needs root to own the file as root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let p = file(dir.path(), &good(), 0o644);
        let s = load_trust(&p, 1000).unwrap();
        assert!(s.is_enabled(), "{}", s.describe());
        assert_eq!(s.trust().unwrap().names(), ["alice", "bob"]);
        assert!(s.describe().contains("alice, bob"), "{}", s.describe());
        // The same file, judged for an agent running as root: it could rewrite it.
        let s = load_trust(&p, 0).unwrap();
        assert!(
            matches!(
                s,
                TrustState::Untrusted {
                    reason: FileCheckError::AgentOwnsFile,
                    ..
                }
            ),
            "{}",
            s.describe()
        );
    }

    #[test]
    fn unsafe_owner_or_mode_keeps_operations_off_and_says_why() {
        let dir = tempfile::tempdir().unwrap();
        if me() == 0 {
            let p = file(dir.path(), &good(), 0o664);
            let s = load_trust(&p, 1000).unwrap();
            assert!(!s.is_enabled());
            assert!(
                s.describe().contains("writable by its group or by others"),
                "{}",
                s.describe()
            );
            assert_eq!(s.to_json()["state"], "untrusted_file");
            let p = file(dir.path(), &good(), 0o602);
            assert!(!load_trust(&p, 1000).unwrap().is_enabled());
            std::os::unix::fs::chown(&p, Some(1000), None).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
            let s = load_trust(&p, 1001).unwrap();
            assert!(
                s.describe().contains("owned by uid 1000, not by root"),
                "{}",
                s.describe()
            );
        } else {
            let p = file(dir.path(), &good(), 0o644);
            let s = load_trust(&p, me()).unwrap();
            assert!(s.describe().contains("not by root"), "{}", s.describe());
        }
        // A symlink is never followed, wherever it points.
        let link = dir.path().join("link.json");
        std::os::unix::fs::symlink(dir.path().join("signers.json"), &link).unwrap();
        let s = load_trust(&link, 1000).unwrap();
        assert!(
            matches!(
                s,
                TrustState::Untrusted {
                    reason: FileCheckError::NotRegular,
                    ..
                }
            ),
            "{}",
            s.describe()
        );
    }

    #[test]
    fn a_malformed_file_is_a_configuration_error() {
        if me() != 0 {
            eprintln!("skipped: needs root to own the file as root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        for (body, want) in [
            (
                r#"{"keys":[{"name":"a","ed25519":"AAAA"}],"threshold":{"reversible":1,"irreversible":1}}"#
                    .to_string(),
                "32",
            ),
            (
                format!(
                    r#"{{"keys":[{{"name":"a","ed25519":"{K1}"}},{{"name":"a","ed25519":"{K2}"}}],"threshold":{{"reversible":1,"irreversible":1}}}}"#
                ),
                "listed twice",
            ),
            (
                format!(
                    r#"{{"keys":[{{"name":"a","ed25519":"{K1}"}}],"threshold":{{"reversible":0,"irreversible":1}}}}"#
                ),
                "is 0",
            ),
            (
                format!(
                    r#"{{"keys":[{{"name":"a","ed25519":"{K1}"}}],"threshold":{{"reversible":1,"irreversible":2}}}}"#
                ),
                "distinct keys",
            ),
            ("{".to_string(), "not valid"),
        ] {
            let p = file(dir.path(), &body, 0o644);
            let e = load_trust(&p, 1000).unwrap_err();
            assert!(matches!(e, TrustFileError::Invalid { .. }), "{e}");
            assert!(e.to_string().contains(want), "{e} / {want}");
        }
    }
}
