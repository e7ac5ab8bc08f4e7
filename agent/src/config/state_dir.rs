//! The `state_dir` owner check: commands that write there must run as its owner, so root
//! never leaves a file behind that the daemon (running as `felhom-agent`) cannot open.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::unistd::{Uid, User, geteuid};

/// Why a command may not write to the state directory.
#[derive(Debug, thiserror::Error)]
pub enum StateDirError {
    #[error(
        "state_dir {path} cannot be opened ({source}); create it owned by the agent's user (systemd's StateDirectory= does this)"
    )]
    Inaccessible {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state_dir {path} is not a directory")]
    NotADirectory { path: PathBuf },
    #[error(
        "`felhom-agent {command}` writes to {path}, which belongs to {owner}, but this runs as {current}; run it as the owner so the daemon can open what it writes: sudo -u {sudo_user} felhom-agent {command}"
    )]
    WrongUser {
        command: String,
        path: PathBuf,
        owner: String,
        current: String,
        sudo_user: String,
    },
}

/// Refuses unless the effective user owns `state_dir`. `command` is how the operator ran
/// it (e.g. `journal verify`), for the `sudo -u … felhom-agent <command>` hint.
pub fn ensure_state_dir_owner(state_dir: &Path, command: &str) -> Result<(), StateDirError> {
    check_owner(state_dir, geteuid().as_raw(), command)
}

fn user_label(uid: u32) -> String {
    match User::from_uid(Uid::from_raw(uid)) {
        Ok(Some(u)) => format!("{} (uid {uid})", u.name),
        _ => format!("uid {uid}"),
    }
}

fn sudo_user(uid: u32) -> String {
    match User::from_uid(Uid::from_raw(uid)) {
        Ok(Some(u)) => u.name,
        // sudo takes a numeric uid as `#N`; quoted so the shell does not read a comment.
        _ => format!("'#{uid}'"),
    }
}

fn check_owner(state_dir: &Path, euid: u32, command: &str) -> Result<(), StateDirError> {
    let meta = std::fs::metadata(state_dir).map_err(|source| StateDirError::Inaccessible {
        path: state_dir.to_path_buf(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(StateDirError::NotADirectory {
            path: state_dir.to_path_buf(),
        });
    }
    let owner = meta.uid();
    if owner == euid {
        return Ok(());
    }
    Err(StateDirError::WrongUser {
        command: command.to_string(),
        path: state_dir.to_path_buf(),
        owner: user_label(owner),
        current: user_label(euid),
        sudo_user: sudo_user(owner),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_passes_and_others_are_told_how_to_run() {
        let dir = tempfile::tempdir().unwrap();
        let me = geteuid().as_raw();
        check_owner(dir.path(), me, "journal verify").unwrap();

        let other = if me == 0 { 4242 } else { 0 };
        let err = check_owner(dir.path(), other, "journal verify").unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, StateDirError::WrongUser { .. }));
        assert!(msg.contains("sudo -u "), "{msg}");
        assert!(msg.contains("felhom-agent journal verify"), "{msg}");
        assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
    }

    #[test]
    fn root_is_refused_on_a_directory_owned_by_another_user() {
        if !geteuid().is_root() {
            eprintln!("SKIPPED: needs root to chown a directory to another user");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        // nobody exists on every Debian system; its uid is 65534.
        nix::unistd::chown(dir.path(), Some(Uid::from_raw(65534)), None).unwrap();
        let err = ensure_state_dir_owner(dir.path(), "run").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("uid 65534"), "{msg}");
        assert!(
            msg.contains("sudo -u nobody felhom-agent run")
                || msg.contains("sudo -u '#65534' felhom-agent run"),
            "{msg}"
        );
    }

    #[test]
    fn missing_and_non_directory_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        assert!(matches!(
            ensure_state_dir_owner(&missing, "run"),
            Err(StateDirError::Inaccessible { .. })
        ));
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(
            ensure_state_dir_owner(&file, "run"),
            Err(StateDirError::NotADirectory { .. })
        ));
    }
}
