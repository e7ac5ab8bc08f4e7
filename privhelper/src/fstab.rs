//! The managed fstab entry: one line per mount name, marked by the option
//! `x-felhom.name=<name>` (mount(8) ignores `x-` options). Editing keeps every other line
//! byte for byte and replaces the file atomically (temp file, fsync, rename, fsync dir).

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use felhom_protocol::{FsUuid, Fstype, MountName};

#[derive(Debug, thiserror::Error)]
pub enum FstabError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: refused: {reason}")]
    Unsafe { path: PathBuf, reason: String },
    #[error("mount name {name} is already used in fstab by {other}")]
    NameInUse { name: String, other: String },
}

fn option_tag(name: &MountName) -> String {
    format!("x-felhom.name={name}")
}

/// The exact line (without newline) for a managed mount.
pub fn managed_line(uuid: &FsUuid, mount_point: &str, fstype: Fstype, name: &MountName) -> String {
    format!(
        "UUID={uuid} {mount_point} {fstype} defaults,nofail,noatime,{} 0 2",
        option_tag(name)
    )
}

/// Lines with their terminators, so joining them gives the input back byte for byte.
fn split_lines(content: &[u8]) -> Vec<&[u8]> {
    content.split_inclusive(|&b| b == b'\n').collect()
}

fn fields(line: &[u8]) -> Vec<&[u8]> {
    line.split(|b| b.is_ascii_whitespace())
        .filter(|f| !f.is_empty())
        .collect()
}

fn is_comment(line: &[u8]) -> bool {
    line.iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_none_or(|&b| b == b'#')
}

/// Whether `line` is the managed entry for `name`.
fn is_managed_for(line: &[u8], name: &MountName) -> bool {
    if is_comment(line) {
        return false;
    }
    let f = fields(line);
    let tag = option_tag(name);
    f.get(3)
        .is_some_and(|opts| opts.split(|&b| b == b',').any(|o| o == tag.as_bytes()))
}

/// Adds (or makes exact) the managed entry for `name`. Returns `None` when the content
/// already has exactly that one line. Refuses when another line mounts at `mount_point`
/// or another filesystem holds the name.
pub fn with_entry(
    content: &[u8],
    name: &MountName,
    line: &str,
    mount_point: &str,
) -> Result<Option<Vec<u8>>, FstabError> {
    let lines = split_lines(content);
    let mut managed = Vec::new();
    for l in &lines {
        if is_managed_for(l, name) {
            managed.push(*l);
        } else if !is_comment(l) && fields(l).get(1) == Some(&mount_point.as_bytes()) {
            return Err(FstabError::NameInUse {
                name: name.to_string(),
                other: String::from_utf8_lossy(l).trim_end().to_string(),
            });
        }
    }
    let want_uuid = fields(line.as_bytes())[0].to_vec();
    for m in &managed {
        if fields(m).first().map(|f| f.to_vec()) != Some(want_uuid.clone()) {
            return Err(FstabError::NameInUse {
                name: name.to_string(),
                other: String::from_utf8_lossy(m).trim_end().to_string(),
            });
        }
    }
    let exact = format!("{line}\n");
    if managed.len() == 1 && managed[0] == exact.as_bytes() {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(content.len() + exact.len());
    for l in &lines {
        if !is_managed_for(l, name) {
            out.extend_from_slice(l);
        }
    }
    if !out.is_empty() && out.last() != Some(&b'\n') {
        out.push(b'\n');
    }
    out.extend_from_slice(exact.as_bytes());
    Ok(Some(out))
}

/// Removes every managed entry for `name`; `None` if there was none.
pub fn without_entry(content: &[u8], name: &MountName) -> Option<Vec<u8>> {
    let lines = split_lines(content);
    if !lines.iter().any(|l| is_managed_for(l, name)) {
        return None;
    }
    Some(
        lines
            .into_iter()
            .filter(|l| !is_managed_for(l, name))
            .flatten()
            .copied()
            .collect(),
    )
}

/// Reads the fstab (not through a symlink; root-owned, not writable by others).
pub fn read(path: &Path) -> Result<Vec<u8>, FstabError> {
    let io = |source| FstabError::Io {
        path: path.to_path_buf(),
        source,
    };
    let md = std::fs::symlink_metadata(path).map_err(io)?;
    if !md.is_file() {
        return Err(FstabError::Unsafe {
            path: path.to_path_buf(),
            reason: "not a regular file (symlinks refused)".into(),
        });
    }
    if md.uid() != 0 || md.permissions().mode() & 0o022 != 0 {
        return Err(FstabError::Unsafe {
            path: path.to_path_buf(),
            reason: "must be owned by root and not writable by group or others".into(),
        });
    }
    std::fs::read(path).map_err(io)
}

/// Replaces `path` with `content` atomically: a reader (or a crash) sees the old file or
/// the new one, never a mix.
pub fn write_atomic(path: &Path, content: &[u8]) -> Result<(), FstabError> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| FstabError::Io { path: p, source }
    };
    let dir = path.parent().unwrap_or(Path::new("/"));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "fstab".into());
    let tmp = dir.join(format!(".{file_name}.felhom-tmp"));
    let mode = std::fs::symlink_metadata(path)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0o644);
    // A stale temp file from a killed run is ours to remove (the directory is root's).
    let _ = std::fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io(&tmp))?;
    f.write_all(content).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io(path))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &[u8] = b"# /etc/fstab: static file system information.\n#\nUUID=1111-2222 /boot/efi vfat umask=0077 0 1\n/dev/pve/root / ext4 errors=remount-ro 0 1\n\tproc /proc proc defaults 0 0   \n";

    fn n(s: &str) -> MountName {
        MountName::new(s).unwrap()
    }

    #[test]
    fn add_then_remove_restores_bytes() {
        let uuid = FsUuid::new("0f3c1a9e-8d2b-4c1e-9a55-3b7d2e1f0a11").unwrap();
        let line = managed_line(&uuid, "/mnt/felhom/backup", Fstype::Ext4, &n("backup"));
        assert_eq!(
            line,
            "UUID=0f3c1a9e-8d2b-4c1e-9a55-3b7d2e1f0a11 /mnt/felhom/backup ext4 defaults,nofail,noatime,x-felhom.name=backup 0 2"
        );
        let added = with_entry(BASE, &n("backup"), &line, "/mnt/felhom/backup")
            .unwrap()
            .unwrap();
        assert!(added.starts_with(BASE));
        assert_eq!(
            with_entry(&added, &n("backup"), &line, "/mnt/felhom/backup").unwrap(),
            None
        );
        assert_eq!(without_entry(&added, &n("backup")).unwrap(), BASE);
        assert_eq!(without_entry(BASE, &n("backup")), None);
        // A name that is a prefix of another is not confused with it.
        assert_eq!(without_entry(&added, &n("back")), None);
    }

    #[test]
    fn refuses_foreign_uses_of_the_name() {
        let uuid = FsUuid::new("abcd-ef01").unwrap();
        let line = managed_line(&uuid, "/mnt/felhom/x", Fstype::Vfat, &n("x"));
        let other = b"/dev/sdz1 /mnt/felhom/x ext4 defaults 0 0\n";
        assert!(with_entry(other, &n("x"), &line, "/mnt/felhom/x").is_err());
        let uuid2 = FsUuid::new("1234-5678").unwrap();
        let line2 = managed_line(&uuid2, "/mnt/felhom/x", Fstype::Vfat, &n("x"));
        let with1 = with_entry(b"", &n("x"), &line, "/mnt/felhom/x")
            .unwrap()
            .unwrap();
        assert!(matches!(
            with_entry(&with1, &n("x"), &line2, "/mnt/felhom/x"),
            Err(FstabError::NameInUse { .. })
        ));
    }
}
