//! The `state_dir` owner check: commands that write there must run as its owner, so root
//! never leaves a file behind that the daemon (running as `felhom-agent`) cannot open.
//!
//! The effective uid comes from `geteuid(2)` and user names from the system's user
//! database (`getpwuid_r`/`getpwnam_r` through NSS, so LDAP or systemd-homed users are
//! named too), both through nix. Must never: spawn a process (no `sudo`, `id`) or fail
//! the check only because a uid has no name.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

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
        "`felhom-agent {command}` writes to {path}, which belongs to {owner}, but this runs as {current}; run it as the owner so the daemon can open what it writes: {run_as} felhom-agent {command}"
    )]
    WrongUser {
        command: String,
        path: PathBuf,
        owner: String,
        current: String,
        /// The command prefix that runs as the owner (`runuser`/`setpriv`, util-linux;
        /// PVE has no `sudo`).
        run_as: String,
    },
}

/// Refuses unless the effective user owns `state_dir`. `command` is how the operator ran
/// it (e.g. `journal verify`), for the `runuser -u … -- felhom-agent <command>` hint.
pub fn ensure_state_dir_owner(state_dir: &Path, command: &str) -> Result<(), StateDirError> {
    check_owner(state_dir, effective_uid(), command)
}

/// The effective uid of this process.
pub(crate) fn effective_uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// The user name of `uid` from the user database (NSS: files, LDAP, systemd, …); `None`
/// when it has no entry or the lookup fails (the message then shows the bare uid).
fn user_name(uid: u32) -> Option<String> {
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(user)) if !user.name.is_empty() => Some(user.name),
        _ => None,
    }
}

fn user_label(uid: u32) -> String {
    match user_name(uid) {
        Some(name) => format!("{name} (uid {uid})"),
        None => format!("uid {uid}"),
    }
}

/// How to run a command as `uid` (group `gid`) with what a PVE host has: `runuser` takes
/// only names, so a uid without one goes through `setpriv`.
fn run_as(uid: u32, gid: u32) -> String {
    match user_name(uid) {
        Some(name) => format!("runuser -u {name} --"),
        None => format!("setpriv --reuid={uid} --regid={gid} --clear-groups"),
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
        run_as: run_as(owner, meta.gid()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_passes_and_others_are_told_how_to_run() {
        let dir = tempfile::tempdir().unwrap();
        let me = effective_uid();
        check_owner(dir.path(), me, "journal verify").unwrap();

        let other = if me == 0 { 4242 } else { 0 };
        let err = check_owner(dir.path(), other, "journal verify").unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, StateDirError::WrongUser { .. }));
        assert!(
            msg.contains("runuser -u ") || msg.contains("setpriv --reuid="),
            "{msg}"
        );
        assert!(msg.contains("felhom-agent journal verify"), "{msg}");
        assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
    }

    #[test]
    fn root_is_refused_on_a_directory_owned_by_another_user() {
        if effective_uid() != 0 {
            eprintln!("SKIPPED: needs root to chown a directory to another user");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        // nobody exists on every Debian system; its uid is 65534.
        std::os::unix::fs::chown(dir.path(), Some(65534), None).unwrap();
        let err = ensure_state_dir_owner(dir.path(), "run").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("uid 65534"), "{msg}");
        assert!(
            msg.contains("runuser -u nobody -- felhom-agent run")
                || msg.contains("setpriv --reuid=65534 --regid=0 --clear-groups felhom-agent run"),
            "{msg}"
        );
    }

    #[test]
    fn effective_uid_matches_what_the_process_creates() {
        // A file this process creates is owned by its effective uid.
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            std::fs::metadata(dir.path()).unwrap().uid(),
            effective_uid()
        );
        assert_eq!(user_name(0).as_deref(), Some("root"));
        // The name and the uid agree both ways through the user database.
        let me = effective_uid();
        if let Some(name) = user_name(me) {
            let back = nix::unistd::User::from_name(&name).unwrap().unwrap();
            assert_eq!(back.uid.as_raw(), me);
        }
        // A uid nobody has gets no name (the message then shows the number).
        assert_eq!(user_name(3_999_999_999), None);
    }

    /// A user that exists only through NSS (a systemd userdb drop-in record read by
    /// nss-systemd), not in /etc/passwd; removed on drop.
    struct NssOnlyUser {
        files: Vec<std::path::PathBuf>,
        created_dir: bool,
    }

    impl Drop for NssOnlyUser {
        fn drop(&mut self) {
            for f in &self.files {
                let _ = std::fs::remove_file(f);
            }
            if self.created_dir {
                let _ = std::fs::remove_dir("/run/userdb");
            }
        }
    }

    #[test]
    fn a_user_known_only_through_nss_is_named() {
        if effective_uid() != 0 {
            eprintln!("SKIPPED: needs root to add a userdb record and chown a directory");
            return;
        }
        let nss = std::fs::read_to_string("/etc/nsswitch.conf").unwrap_or_default();
        let has_systemd = nss
            .lines()
            .any(|l| l.starts_with("passwd:") && l.split_whitespace().any(|w| w == "systemd"));
        let module = [
            "/lib/x86_64-linux-gnu",
            "/usr/lib/x86_64-linux-gnu",
            "/lib/aarch64-linux-gnu",
            "/usr/lib/aarch64-linux-gnu",
            "/usr/lib64",
            "/usr/lib",
        ]
        .iter()
        .any(|d| Path::new(d).join("libnss_systemd.so.2").exists());
        if !has_systemd || !module {
            eprintln!("SKIPPED: nss-systemd is not configured for passwd on this machine");
            return;
        }
        let uid = 4_170_000 + std::process::id() % 100_000;
        let name = format!("fhnss{}", std::process::id() % 100_000);
        let created_dir = std::fs::create_dir("/run/userdb").is_ok();
        let record = Path::new("/run/userdb").join(format!("{name}.user"));
        let by_uid = Path::new("/run/userdb").join(format!("{uid}.user"));
        let _guard = NssOnlyUser {
            files: vec![record.clone(), by_uid.clone()],
            created_dir,
        };
        std::fs::write(
            &record,
            format!(
                r#"{{"userName":"{name}","uid":{uid},"gid":{uid},"disposition":"regular","homeDirectory":"/nonexistent","shell":"/usr/sbin/nologin"}}"#
            ),
        )
        .unwrap();
        std::os::unix::fs::symlink(format!("{name}.user"), &by_uid).unwrap();
        let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
        assert!(!passwd.contains(&name), "the user must not be a files user");
        // Both lookups go through NSS.
        let user = nix::unistd::User::from_name(&name)
            .unwrap()
            .expect("NSS user");
        assert_eq!(user.uid.as_raw(), uid);
        assert_eq!(user_name(uid).as_deref(), Some(name.as_str()));

        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::chown(dir.path(), Some(uid), None).unwrap();
        let err = ensure_state_dir_owner(dir.path(), "journal verify").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains(&format!("{name} (uid {uid})")), "{msg}");
        assert!(
            msg.contains(&format!("runuser -u {name} -- felhom-agent journal verify")),
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
