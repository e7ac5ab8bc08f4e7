//! This host's identity for signed operations: the `agent_id`.
//!
//! Owns: `state_dir/agent-id` (32 lower-case hex characters, 128 random bits, mode 0644),
//! created once (at the daemon's first start, or by a `selftest --hub` before it, which
//! sends a report and so needs the id) and read ever after, and the rule that a configured
//! `agent_id` wins over the file.
//! Must never: replace or "repair" an existing file (a new id would silently re-bind the
//! host: every operation signed for it would be refused and any signed for the new id
//! accepted), write a partial file (temp file, fsync, then a link that fails when the
//! name exists, then fsync of the directory), or create the file from a command that only
//! reads (`status`, `config check`, `ops verify`).

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use felhom_authz::AgentId;
use ring::rand::SecureRandom;

/// The file in `state_dir` that holds the id.
pub const AGENT_ID_FILE: &str = "agent-id";

/// The id file is never larger than this (32 hex characters and a newline, with room).
const MAX_FILE_BYTES: u64 = 64;

/// Why the agent's identity could not be read or created.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read the agent id file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the agent id file {path} is corrupt ({reason}); it is this host's identity and is never replaced: restore it from a backup, or set agent_id in the configuration"
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error("cannot create the agent id file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the system's random number generator failed")]
    Random,
    #[error(
        "this host has no agent id yet: the daemon creates {path} at its first start (or set agent_id in the configuration)"
    )]
    NotCreated { path: PathBuf },
}

/// Where the effective `agent_id` came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentitySource {
    /// `agent_id` in the configuration.
    Config,
    /// `state_dir/agent-id`, as it was.
    File,
    /// `state_dir/agent-id`, created just now.
    Created,
}

impl IdentitySource {
    pub fn as_str(self) -> &'static str {
        match self {
            IdentitySource::Config => "config",
            IdentitySource::File => "file",
            IdentitySource::Created => "created",
        }
    }
}

/// The path of the id file in `state_dir`.
pub fn agent_id_path(state_dir: &Path) -> PathBuf {
    state_dir.join(AGENT_ID_FILE)
}

/// Reads `state_dir/agent-id`; `Ok(None)` when it does not exist. Never writes.
pub fn read_agent_id(state_dir: &Path) -> Result<Option<AgentId>, IdentityError> {
    let path = agent_id_path(state_dir);
    let read_err = |source| IdentityError::Read {
        path: path.clone(),
        source,
    };
    let meta = match std::fs::symlink_metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(read_err(e)),
    };
    let corrupt = |reason: String| IdentityError::Corrupt {
        path: path.clone(),
        reason,
    };
    if !meta.file_type().is_file() {
        return Err(corrupt("not a regular file".into()));
    }
    let mut bytes = Vec::new();
    std::fs::File::open(&path)
        .map_err(read_err)?
        .take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(corrupt(format!("more than {MAX_FILE_BYTES} bytes")));
    }
    let text = std::str::from_utf8(&bytes).map_err(|_| corrupt("not text".into()))?;
    let id = text.strip_suffix('\n').unwrap_or(text);
    AgentId::new(id).map(Some).map_err(corrupt)
}

/// A new random id: 128 bits from the system's generator.
fn random_agent_id() -> Result<AgentId, IdentityError> {
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| IdentityError::Random)?;
    AgentId::new(hex::encode(bytes)).map_err(|_| IdentityError::Random)
}

/// Writes a new id to `state_dir/agent-id` (0644) without ever replacing a file there:
/// the complete, fsynced temp file is hard-linked to the name, which fails if it exists.
fn create_agent_id(state_dir: &Path) -> Result<AgentId, IdentityError> {
    let path = agent_id_path(state_dir);
    let write_err = |source| IdentityError::Write {
        path: path.clone(),
        source,
    };
    let id = random_agent_id()?;
    let tmp = state_dir.join(format!(".{AGENT_ID_FILE}.tmp.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)?;
        // The umask may have taken bits away; the id is public, 0644 exactly.
        f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
        f.write_all(format!("{id}\n").as_bytes())?;
        f.sync_all()?;
        std::fs::hard_link(&tmp, &path)?;
        std::fs::File::open(state_dir)?.sync_all()
    })();
    let _ = std::fs::remove_file(&tmp);
    result.map_err(write_err)?;
    Ok(id)
}

/// The daemon's identity: the configured id, else the file's, else a new one written to
/// the file. A corrupt file is an error, never replaced.
pub fn load_or_create(
    configured: Option<&AgentId>,
    state_dir: &Path,
) -> Result<(AgentId, IdentitySource), IdentityError> {
    if let Some(id) = configured {
        return Ok((id.clone(), IdentitySource::Config));
    }
    if let Some(id) = read_agent_id(state_dir)? {
        return Ok((id, IdentitySource::File));
    }
    match create_agent_id(state_dir) {
        Ok(id) => Ok((id, IdentitySource::Created)),
        // Someone else created it meanwhile: theirs is the identity.
        Err(IdentityError::Write { source, .. })
            if source.kind() == std::io::ErrorKind::AlreadyExists =>
        {
            read_agent_id(state_dir)?
                .map(|id| (id, IdentitySource::File))
                .ok_or(IdentityError::NotCreated {
                    path: agent_id_path(state_dir),
                })
        }
        Err(e) => Err(e),
    }
}

/// The identity as read-only commands see it (`status`, `config check`, `ops verify`):
/// the configured id, else the file's; `Ok(None)` when neither exists yet.
pub fn current(
    configured: Option<&AgentId>,
    state_dir: &Path,
) -> Result<Option<(AgentId, IdentitySource)>, IdentityError> {
    if let Some(id) = configured {
        return Ok(Some((id.clone(), IdentitySource::Config)));
    }
    Ok(read_agent_id(state_dir)?.map(|id| (id, IdentitySource::File)))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn created_once_then_stable() {
        let dir = tempfile::tempdir().unwrap();
        assert!(current(None, dir.path()).unwrap().is_none());
        let (a, src) = load_or_create(None, dir.path()).unwrap();
        assert_eq!(src, IdentitySource::Created);
        assert_eq!(a.as_str().len(), 32);
        let path = agent_id_path(dir.path());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), format!("{a}\n"));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o644);
        // A restart reads the same id and creates nothing.
        for _ in 0..3 {
            let (b, src) = load_or_create(None, dir.path()).unwrap();
            assert_eq!((b, src), (a.clone(), IdentitySource::File));
        }
        assert_eq!(current(None, dir.path()).unwrap().unwrap().0, a);
        // No temp file is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [AGENT_ID_FILE]);
    }

    #[test]
    fn two_hosts_get_different_ids() {
        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let a = load_or_create(None, d1.path()).unwrap().0;
        let b = load_or_create(None, d2.path()).unwrap().0;
        assert_ne!(a, b);
    }

    #[test]
    fn the_configured_id_wins_and_the_file_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let on_file = load_or_create(None, dir.path()).unwrap().0;
        let configured = AgentId::new("0123456789abcdef0123456789abcdef").unwrap();
        let (id, src) = load_or_create(Some(&configured), dir.path()).unwrap();
        assert_eq!((id, src), (configured.clone(), IdentitySource::Config));
        assert_eq!(
            current(Some(&configured), dir.path()).unwrap().unwrap().0,
            configured
        );
        assert_eq!(read_agent_id(dir.path()).unwrap().unwrap(), on_file);
        // A configured id creates no file where there was none.
        let empty = tempfile::tempdir().unwrap();
        load_or_create(Some(&configured), empty.path()).unwrap();
        assert!(!agent_id_path(empty.path()).exists());
    }

    #[test]
    fn a_corrupt_file_is_refused_and_kept() {
        for bad in [
            &b""[..],
            b"\n",
            b"0123456789ABCDEF0123456789ABCDEF\n",
            b"0123456789abcdef0123456789abcde\n",
            b"0123456789abcdef0123456789abcdef0\n",
            b"0123456789abcdef0123456789abcdef\n\n",
            b" 0123456789abcdef0123456789abcdef",
            b"\xff\xfe",
            &[b'0'; 100],
        ] {
            let dir = tempfile::tempdir().unwrap();
            let path = agent_id_path(dir.path());
            std::fs::write(&path, bad).unwrap();
            let e = load_or_create(None, dir.path()).unwrap_err();
            assert!(matches!(e, IdentityError::Corrupt { .. }), "{bad:?}: {e}");
            assert!(e.to_string().contains("never replaced"), "{e}");
            assert!(matches!(
                current(None, dir.path()),
                Err(IdentityError::Corrupt { .. })
            ));
            assert_eq!(std::fs::read(&path).unwrap(), bad, "the file is untouched");
        }
    }

    #[test]
    fn a_directory_or_symlink_in_its_place_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(agent_id_path(dir.path())).unwrap();
        assert!(matches!(
            load_or_create(None, dir.path()),
            Err(IdentityError::Corrupt { .. })
        ));
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, "0123456789abcdef0123456789abcdef\n").unwrap();
        std::os::unix::fs::symlink(&target, agent_id_path(dir.path())).unwrap();
        assert!(matches!(
            load_or_create(None, dir.path()),
            Err(IdentityError::Corrupt { .. })
        ));
    }

    #[test]
    fn accepted_without_the_newline() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            agent_id_path(dir.path()),
            "00112233445566778899aabbccddeeff",
        )
        .unwrap();
        assert_eq!(
            load_or_create(None, dir.path()).unwrap().0.as_str(),
            "00112233445566778899aabbccddeeff"
        );
    }
}
