//! The managed fstab entry: one line per mount name, marked by the option
//! `x-felhom.name=<name>` (mount(8) ignores `x-` options). Editing keeps every other line
//! byte for byte and replaces the file atomically (temp file, fsync, rename, fsync dir).
//!
//! The line (see [`Entry::line`]):
//! `/dev/disk/by-id/usb-… <mount point> <type> nosuid,nodev,noexec,noatime,nofail[,uid=0,gid=G,umask=0027],x-systemd.requires=/dev/disk/by-uuid/<uuid>,x-felhom.name=<name> 0 0`.
//! Keyed on the USB disk's udev name (only a USB-attached disk gets a `usb-` by-id link),
//! and systemd mounts it only while a file system with the UUID is present too.
//!
//! Must never: write a managed line without nosuid, nodev and noexec, change a line that
//! is not the name's managed line, or add a UUID or device that another line already uses.

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
    #[error("{what} already appears in fstab on another line: {other}")]
    InUse { what: String, other: String },
}

/// Options that would undo the managed line's protection (`defaults` implies
/// suid,dev,exec) or let ordinary users mount or unmount it. Dropped from a managed line.
const FORBIDDEN: [&str; 8] = [
    "suid", "dev", "exec", "defaults", "user", "users", "owner", "group",
];

/// The mount flags every managed mount gets, as fstab options; `mount(2)` gets the same
/// as `MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_NOATIME` (see `ops::RealSystem`).
pub const FLAG_OPTIONS: [&str; 4] = ["nosuid", "nodev", "noexec", "noatime"];

/// The file-system-specific mount data (the `data` argument of `mount(2)` and the same
/// options in fstab): vfat and exfat have no owners of their own, so files belong to
/// root, group the agent's, and others get nothing. The rest keep their own owners.
pub fn fs_data(fstype: Fstype, agent_gid: u32) -> Option<String> {
    match fstype {
        Fstype::Vfat | Fstype::Exfat => Some(format!("uid=0,gid={agent_gid},umask=0027")),
        Fstype::Ext4 | Fstype::Xfs | Fstype::Btrfs => None,
    }
}

fn option_tag(name: &MountName) -> String {
    format!("x-felhom.name={name}")
}

const REQUIRES_UUID: &str = "x-systemd.requires=/dev/disk/by-uuid/";

/// What the managed line for one name must say.
#[derive(Debug, Clone)]
pub struct Entry {
    /// `/dev/disk/by-id/usb-…`: the USB partition's udev name.
    pub spec: String,
    pub mount_point: String,
    pub fstype: Fstype,
    pub uuid: FsUuid,
    pub name: MountName,
    /// [`fs_data`].
    pub data: Option<String>,
}

impl Entry {
    /// Every option the managed line must carry, in the order it is written.
    fn required(&self) -> Vec<String> {
        let mut o: Vec<String> = FLAG_OPTIONS.iter().map(|s| s.to_string()).collect();
        o.push("nofail".into());
        if let Some(d) = &self.data {
            o.extend(d.split(',').map(str::to_string));
        }
        o.push(format!("{REQUIRES_UUID}{}", self.uuid));
        o.push(option_tag(&self.name));
        o
    }

    /// The exact line (without newline) for a managed mount with no operator additions.
    /// fsck pass 0: the host does not own the medium (fsck at boot would run on whatever
    /// file system it carries, and could hold the boot).
    pub fn line(&self) -> String {
        self.line_with(&[])
    }

    fn line_with(&self, extra: &[&str]) -> String {
        let mut opts = self.required();
        opts.extend(extra.iter().map(|s| s.to_string()));
        format!(
            "{} {} {} {} 0 0",
            self.spec,
            self.mount_point,
            self.fstype,
            opts.join(",")
        )
    }

    /// Whether an option an operator added to the managed line can stay: not a
    /// [`FORBIDDEN`] one, not another `x-felhom.` tag, and not a different value for an
    /// ownership or mask option we set (a mask may only add bits).
    fn keeps(&self, opt: &str) -> bool {
        if FORBIDDEN.contains(&opt) || opt.starts_with("x-felhom.") {
            return false;
        }
        let Some((key, value)) = opt.split_once('=') else {
            return true;
        };
        match key {
            "uid" | "gid" => self.required().iter().any(|r| r == opt),
            "umask" | "fmask" | "dmask" => {
                u32::from_str_radix(value, 8).is_ok_and(|m| m & 0o027 == 0o027 && m <= 0o777)
            }
            _ => true,
        }
    }
}

/// Lines with their terminators, so joining them gives the input back byte for byte.
fn split_lines(content: &[u8]) -> Vec<&[u8]> {
    content.split_inclusive(|&b| b == b'\n').collect()
}

fn fields(line: &[u8]) -> Vec<&str> {
    line.split(|b| b.is_ascii_whitespace())
        .filter(|f| !f.is_empty())
        .map(|f| std::str::from_utf8(f).unwrap_or("\u{fffd}"))
        .collect()
}

fn is_comment(line: &[u8]) -> bool {
    line.iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_none_or(|&b| b == b'#')
}

fn options(f: &[&str]) -> Vec<String> {
    f.get(3)
        .map(|o| o.split(',').map(str::to_string).collect())
        .unwrap_or_default()
}

/// Whether `line` is the managed entry for `name`.
fn is_managed_for(line: &[u8], name: &MountName) -> bool {
    if is_comment(line) {
        return false;
    }
    let tag = option_tag(name);
    options(&fields(line)).contains(&tag)
}

/// Every file system UUID a line names: `UUID=u` (quoted or not) or
/// `/dev/disk/by-uuid/u` as the device, and `x-systemd.requires=/dev/disk/by-uuid/u`.
fn uuids_of(f: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(spec) = f.first() {
        if let Some(u) = spec.strip_prefix("UUID=") {
            out.push(u.trim_matches('"').to_ascii_lowercase());
        } else if let Some(u) = spec.strip_prefix("/dev/disk/by-uuid/") {
            out.push(u.to_ascii_lowercase());
        }
    }
    for o in options(f) {
        if let Some(u) = o.strip_prefix(REQUIRES_UUID) {
            out.push(u.to_ascii_lowercase());
        }
    }
    out
}

fn shown(line: &[u8]) -> String {
    String::from_utf8_lossy(line).trim().to_string()
}

/// The managed line for `name`, if there is one: (device, file system type).
pub fn managed_entry(content: &[u8], name: &MountName) -> Option<(String, String)> {
    split_lines(content)
        .into_iter()
        .find(|l| is_managed_for(l, name))
        .map(|l| {
            let f = fields(l);
            (
                f.first().unwrap_or(&"").to_string(),
                f.get(2).unwrap_or(&"").to_string(),
            )
        })
}

/// Adds, keeps or updates the managed entry for `entry.name`. Returns `None` when the
/// content already has a current managed line, which is then kept byte for byte.
///
/// Current means: one managed line for the name, with our device, mount point and type,
/// every required option, nothing [`Entry::keeps`] would drop, and `0 0`. So an operator
/// may add options (`x-systemd.device-timeout=5s`, `ro`, `nosymfollow`, a stricter
/// `umask`); they are kept. Otherwise the line is rewritten in place (an older line of
/// this helper, an edited device or type, a dropped or loosening option): the required
/// options, then the operator's options that can stay, in their order, `0 0`.
///
/// Refused (nothing changes): another line mounts at the mount point; the name's line
/// names another file system (by UUID); another line names the same UUID or device.
pub fn with_entry(content: &[u8], entry: &Entry) -> Result<Option<Vec<u8>>, FstabError> {
    let lines = split_lines(content);
    let uuid = entry.uuid.as_str().to_ascii_lowercase();
    let mut managed = Vec::new();
    for l in &lines {
        if is_comment(l) {
            continue;
        }
        let f = fields(l);
        if is_managed_for(l, &entry.name) {
            managed.push(*l);
            continue;
        }
        if f.get(1) == Some(&entry.mount_point.as_str()) {
            return Err(FstabError::NameInUse {
                name: entry.name.to_string(),
                other: shown(l),
            });
        }
        if uuids_of(&f).contains(&uuid) {
            return Err(FstabError::InUse {
                what: format!("file system UUID {}", entry.uuid),
                other: shown(l),
            });
        }
        if f.first() == Some(&entry.spec.as_str()) {
            return Err(FstabError::InUse {
                what: format!("device {}", entry.spec),
                other: shown(l),
            });
        }
    }
    for m in &managed {
        if !uuids_of(&fields(m)).contains(&uuid) {
            return Err(FstabError::NameInUse {
                name: entry.name.to_string(),
                other: shown(m),
            });
        }
    }
    let (want, current) = match managed.as_slice() {
        [] => (entry.line(), false),
        [one, rest @ ..] => {
            let f = fields(one);
            let opts = options(&f);
            let required = entry.required();
            let extra: Vec<&str> = opts
                .iter()
                .filter(|o| !required.contains(o) && entry.keeps(o))
                .map(String::as_str)
                .collect();
            let current = rest.is_empty()
                && f.len() == 6
                && f[0] == entry.spec
                && f[1] == entry.mount_point
                && f[2] == entry.fstype.as_str()
                && f[4] == "0"
                && f[5] == "0"
                && required.iter().all(|r| opts.contains(r))
                && opts.iter().all(|o| required.contains(o) || entry.keeps(o));
            (entry.line_with(&extra), current)
        }
    };
    if current {
        return Ok(None);
    }
    let exact = format!("{want}\n");
    let mut out = Vec::with_capacity(content.len() + exact.len());
    let mut placed = false;
    for l in &lines {
        if is_managed_for(l, &entry.name) {
            // The first managed line is replaced where it stands; duplicates go.
            if !placed {
                out.extend_from_slice(exact.as_bytes());
                placed = true;
            }
        } else {
            out.extend_from_slice(l);
        }
    }
    if !placed {
        if !out.is_empty() && out.last() != Some(&b'\n') {
            out.push(b'\n');
        }
        out.extend_from_slice(exact.as_bytes());
    }
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
    const BY_ID: &str = "/dev/disk/by-id/usb-Felhom_Test_0123-0:0-part1";

    fn n(s: &str) -> MountName {
        MountName::new(s).unwrap()
    }

    fn entry(uuid: &str, name: &str, fstype: Fstype) -> Entry {
        Entry {
            spec: BY_ID.into(),
            mount_point: format!("/mnt/felhom/{name}"),
            fstype,
            uuid: FsUuid::new(uuid).unwrap(),
            name: n(name),
            data: fs_data(fstype, 990),
        }
    }

    const U: &str = "0f3c1a9e-8d2b-4c1e-9a55-3b7d2e1f0a11";

    #[test]
    fn add_then_remove_restores_bytes() {
        let e = entry(U, "backup", Fstype::Ext4);
        assert_eq!(
            e.line(),
            format!(
                "{BY_ID} /mnt/felhom/backup ext4 nosuid,nodev,noexec,noatime,nofail,x-systemd.requires=/dev/disk/by-uuid/{U},x-felhom.name=backup 0 0"
            )
        );
        let added = with_entry(BASE, &e).unwrap().unwrap();
        assert!(added.starts_with(BASE));
        assert_eq!(with_entry(&added, &e).unwrap(), None);
        assert_eq!(without_entry(&added, &n("backup")).unwrap(), BASE);
        assert_eq!(without_entry(BASE, &n("backup")), None);
        // A name that is a prefix of another is not confused with it.
        assert_eq!(without_entry(&added, &n("back")), None);
        assert_eq!(
            managed_entry(&added, &n("backup")),
            Some((BY_ID.to_string(), "ext4".to_string()))
        );
        assert_eq!(managed_entry(&added, &n("back")), None);
    }

    #[test]
    fn vfat_and_exfat_get_owner_group_and_mask() {
        assert_eq!(
            fs_data(Fstype::Vfat, 990).as_deref(),
            Some("uid=0,gid=990,umask=0027")
        );
        assert_eq!(
            fs_data(Fstype::Exfat, 7).as_deref(),
            Some("uid=0,gid=7,umask=0027")
        );
        for f in [Fstype::Ext4, Fstype::Xfs, Fstype::Btrfs] {
            assert_eq!(fs_data(f, 990), None);
        }
        assert_eq!(
            entry("ABCD-EF01", "stick", Fstype::Vfat).line(),
            format!(
                "{BY_ID} /mnt/felhom/stick vfat nosuid,nodev,noexec,noatime,nofail,uid=0,gid=990,umask=0027,x-systemd.requires=/dev/disk/by-uuid/ABCD-EF01,x-felhom.name=stick 0 0"
            )
        );
    }

    #[test]
    fn refuses_foreign_uses_of_the_name() {
        let e = entry("abcd-ef01", "x", Fstype::Vfat);
        let other = b"/dev/sdz1 /mnt/felhom/x ext4 defaults 0 0\n";
        assert!(matches!(
            with_entry(other, &e),
            Err(FstabError::NameInUse { .. })
        ));
        let with1 = with_entry(b"", &e).unwrap().unwrap();
        let e2 = entry("1234-5678", "x", Fstype::Vfat);
        assert!(matches!(
            with_entry(&with1, &e2),
            Err(FstabError::NameInUse { .. })
        ));
    }

    #[test]
    fn refuses_a_uuid_or_device_another_line_uses() {
        let e = entry(U, "backup", Fstype::Ext4);
        let upper = U.to_ascii_uppercase();
        for other in [
            format!("UUID={U} / ext4 errors=remount-ro 0 1\n"),
            format!("UUID=\"{upper}\" /srv ext4 defaults 0 2\n"),
            format!("/dev/disk/by-uuid/{U} /srv ext4 defaults 0 2\n"),
            // Another managed name holding the same file system.
            entry(U, "other", Fstype::Ext4).line() + "\n",
            format!("{BY_ID} /srv ext4 defaults 0 2\n"),
        ] {
            let content = [BASE, other.as_bytes()].concat();
            assert!(
                matches!(with_entry(&content, &e), Err(FstabError::InUse { .. })),
                "{other}"
            );
        }
        // Commented out, it does not count.
        let content = [
            BASE,
            format!("#UUID={U} /srv ext4 defaults 0 2\n").as_bytes(),
        ]
        .concat();
        assert!(with_entry(&content, &e).unwrap().is_some());
    }

    #[test]
    fn an_operators_additions_are_kept_and_loosening_options_are_not() {
        let e = entry(U, "backup", Fstype::Ext4);
        let line = e.line();
        // Tightened by hand: extra options after ours, or between them.
        for edited in [
            line.replace(" 0 0", ",ro,x-systemd.device-timeout=5s 0 0"),
            line.replace("nofail,", "nofail,nosymfollow,"),
            format!("{}\t0 0", line.trim_end_matches(" 0 0")),
        ] {
            let content = [BASE, edited.as_bytes(), b"\n"].concat();
            assert_eq!(with_entry(&content, &e).unwrap(), None, "{edited}");
        }
        // Loosened: the option goes, the operator's other additions stay, in place.
        let tail = b"tmpfs /tmp tmpfs defaults 0 0\n";
        for (edited, want) in [
            (
                line.replace(" 0 0", ",ro,suid 0 0"),
                line.replace(" 0 0", ",ro 0 0"),
            ),
            (line.replace("nosuid,", ""), line.clone()),
            (line.replace(" 0 0", ",defaults 0 0"), line.clone()),
            (line.replace(" 0 0", " 0 2"), line.clone()),
            (
                line.replace(
                    "x-felhom.name=backup",
                    "x-felhom.name=backup,x-felhom.name=evil",
                ),
                line.clone(),
            ),
            // The line an earlier version of this helper wrote.
            (
                format!(
                    "UUID={U} /mnt/felhom/backup ext4 defaults,nofail,noatime,x-felhom.name=backup,x-systemd.device-timeout=5s 0 2"
                ),
                line.replace(" 0 0", ",x-systemd.device-timeout=5s 0 0"),
            ),
        ] {
            let content = [BASE, edited.as_bytes(), b"\n", tail].concat();
            let got = with_entry(&content, &e).unwrap().expect(&edited);
            assert_eq!(
                String::from_utf8(got).unwrap(),
                format!(
                    "{}{want}\n{}",
                    String::from_utf8_lossy(BASE),
                    String::from_utf8_lossy(tail)
                ),
                "{edited}"
            );
        }
        // vfat: a stricter mask stays, a looser one or another owner goes.
        let v = entry("ABCD-EF01", "stick", Fstype::Vfat);
        let vl = v.line();
        let strict = vl.replace(" 0 0", ",fmask=0177,dmask=0077 0 0");
        assert_eq!(
            with_entry(&[strict.as_bytes(), b"\n"].concat(), &v).unwrap(),
            None
        );
        let loose = vl.replace(" 0 0", ",umask=0000,uid=1000,gid=990 0 0");
        assert_eq!(
            with_entry(&[loose.as_bytes(), b"\n"].concat(), &v).unwrap(),
            Some(format!("{vl}\n").into_bytes())
        );
    }
}
