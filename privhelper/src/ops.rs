//! The three operation classes. Each function takes validated protocol values, does
//! exactly its one job through the [`System`] trait (the privileged effects), and
//! returns the response plus a detail object for the audit outcome.
//!
//! Must never: build a command line from anything but validated values, run a tool
//! other than the configured one, touch a path outside the configured roots, follow a
//! device path beyond one udev link into /dev (or say where a link points), mount a USB
//! file system with suid, dev or exec, or unmount a mount without its managed fstab line.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use felhom_protocol::{
    BLOCK_DEVICE_LINK_DIRS, BlockDeviceName, BlockDevicePath, DiskDevice, ErrorKind, FsUuid,
    Fstype, MountName, PctCreateSpec, Response, SMART_OUTPUT_CAP, SmartOutput, is_kernel_name,
    is_udev_link_name,
};
use serde_json::{Value, json};

use crate::config::{Config, Tools};
use crate::exec::{ExecError, Limits, ToolCaps, ToolOutput};
use crate::fstab;

/// Which side a failure falls on in the audit outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Refused by policy before any effect (not USB, unknown filesystem, name taken).
    Denied,
    /// Tried and failed (tool error, timeout, I/O).
    Failed,
}

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct OpError {
    pub kind: ErrorKind,
    pub verdict: Verdict,
    pub message: String,
}

impl OpError {
    fn denied(kind: ErrorKind, message: impl Into<String>) -> Self {
        OpError {
            kind,
            verdict: Verdict::Denied,
            message: message.into(),
        }
    }
    fn failed(kind: ErrorKind, message: impl Into<String>) -> Self {
        OpError {
            kind,
            verdict: Verdict::Failed,
            message: message.into(),
        }
    }
}

impl From<ExecError> for OpError {
    fn from(e: ExecError) -> Self {
        match e {
            ExecError::Timeout { .. } => OpError::failed(ErrorKind::Timeout, e.to_string()),
            other => OpError::failed(ErrorKind::Internal, other.to_string()),
        }
    }
}

impl From<fstab::FstabError> for OpError {
    fn from(e: fstab::FstabError) -> Self {
        match e {
            fstab::FstabError::NameInUse { .. } | fstab::FstabError::InUse { .. } => {
                OpError::denied(ErrorKind::NameInUse, e.to_string())
            }
            other => OpError::failed(ErrorKind::Internal, other.to_string()),
        }
    }
}

/// The privileged effects. [`RealSystem`] does them; tests use a recording fake.
pub trait System {
    fn run_tool(
        &self,
        tool: &Path,
        args: &[OsString],
        limits: Limits,
        caps: ToolCaps,
    ) -> Result<ToolOutput, ExecError>;
    /// Mounts with [`USB_MOUNT_FLAGS`] and `data` (the file-system-specific options).
    fn mount(
        &self,
        source: &Path,
        target: &Path,
        fstype: Fstype,
        data: Option<&str>,
    ) -> std::io::Result<()>;
    /// Sets [`USB_MOUNT_FLAGS`] (and `MS_RDONLY` when `read_only`) on the mount at `target`
    /// (a bind remount: the per-mount flags only, the file system is not touched).
    fn restrict(&self, target: &Path, read_only: bool) -> std::io::Result<()>;
    fn umount(&self, target: &Path) -> std::io::Result<()>;
    fn mountinfo(&self) -> std::io::Result<String>;
}

/// Every USB mount: no set-user-ID or file capabilities, no device nodes, no programs
/// run from the medium (whoever prepared it could otherwise hand any local account root),
/// and no access-time writes. The fstab line says the same ([`fstab::FLAG_OPTIONS`]).
pub const USB_MOUNT_FLAGS: nix::mount::MsFlags = nix::mount::MsFlags::MS_NOSUID
    .union(nix::mount::MsFlags::MS_NODEV)
    .union(nix::mount::MsFlags::MS_NOEXEC)
    .union(nix::mount::MsFlags::MS_NOATIME);

#[derive(Debug, Default)]
pub struct RealSystem;

impl System for RealSystem {
    fn run_tool(
        &self,
        tool: &Path,
        args: &[OsString],
        limits: Limits,
        caps: ToolCaps,
    ) -> Result<ToolOutput, ExecError> {
        crate::exec::run(tool, args, limits, caps)
    }
    fn mount(
        &self,
        source: &Path,
        target: &Path,
        fstype: Fstype,
        data: Option<&str>,
    ) -> std::io::Result<()> {
        nix::mount::mount(
            Some(source),
            target,
            Some(fstype.as_str()),
            USB_MOUNT_FLAGS,
            data,
        )
        .map_err(std::io::Error::from)
    }
    fn restrict(&self, target: &Path, read_only: bool) -> std::io::Result<()> {
        use nix::mount::MsFlags;
        let mut flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | USB_MOUNT_FLAGS;
        if read_only {
            flags |= MsFlags::MS_RDONLY;
        }
        nix::mount::mount(None::<&str>, target, None::<&str>, flags, None::<&str>)
            .map_err(std::io::Error::from)
    }
    fn umount(&self, target: &Path) -> std::io::Result<()> {
        nix::mount::umount2(target, nix::mount::MntFlags::UMOUNT_NOFOLLOW)
            .map_err(std::io::Error::from)
    }
    fn mountinfo(&self) -> std::io::Result<String> {
        std::fs::read_to_string("/proc/self/mountinfo")
    }
}

pub type OpResult = Result<(Response, Value), OpError>;

fn stderr_tail(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(b);
    let t: String = s
        .chars()
        .rev()
        .take(2000)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    t.trim().to_string()
}

// ---------------------------------------------------------------- smart

/// `smartctl --json=c -a -n standby /dev/<device>`: exactly this, nothing else.
pub fn smart_argv(dev: &DiskDevice) -> Vec<OsString> {
    ["--json=c", "-a", "-n", "standby"]
        .into_iter()
        .map(OsString::from)
        .chain([OsString::from(dev.dev_path())])
        .collect()
}

pub fn smart_read(
    sys: &dyn System,
    tools: &Tools,
    timeout: Duration,
    dev: &DiskDevice,
) -> OpResult {
    let out = sys.run_tool(
        &tools.smartctl,
        &smart_argv(dev),
        Limits {
            timeout,
            stdout_cap: SMART_OUTPUT_CAP,
            stderr_cap: 16 * 1024,
        },
        ToolCaps::Class,
    )?;
    let exit_status = out.code.unwrap_or(-1);
    let detail = json!({
        "exit_status": exit_status,
        "signal": out.signal,
        "stdout_bytes": out.stdout.len(),
        "truncated": out.stdout_truncated,
    });
    Ok((
        Response::Smart(SmartOutput {
            stdout: out.stdout,
            exit_status,
            truncated: out.stdout_truncated,
        }),
        detail,
    ))
}

// ---------------------------------------------------------------- pct

/// The exact `pct create` argv for `spec` (after the tool path).
pub fn pct_argv(spec: &PctCreateSpec, keys_file: Option<&Path>) -> Vec<OsString> {
    let b = |v: bool| if v { "1" } else { "0" };
    let mut features = "keyctl=1".to_string();
    if spec.nesting {
        features.push_str(",nesting=1");
    }
    let mut a: Vec<OsString> = vec![
        "create".into(),
        spec.vmid.to_string().into(),
        spec.ostemplate.to_string().into(),
        "--hostname".into(),
        spec.hostname.to_string().into(),
        "--memory".into(),
        spec.memory_mib.to_string().into(),
        "--swap".into(),
        spec.swap_mib.to_string().into(),
        "--cores".into(),
        spec.cores.to_string().into(),
        "--rootfs".into(),
        format!("{}:{}", spec.rootfs.storage, spec.rootfs.size_gib).into(),
        "--net0".into(),
        spec.net.net0().into(),
        "--unprivileged".into(),
        "1".into(),
        "--features".into(),
        features.into(),
    ];
    if let Some(k) = keys_file {
        a.push("--ssh-public-keys".into());
        a.push(k.as_os_str().to_owned());
    }
    a.extend([
        "--start".into(),
        b(spec.start).into(),
        "--onboot".into(),
        b(spec.onboot).into(),
    ]);
    a
}

/// The args recorded in the audit log for a create request (keys by fingerprint only).
pub fn pct_audit_args(spec: &PctCreateSpec) -> Value {
    let keys: Vec<String> = spec
        .ssh_public_keys
        .keys()
        .iter()
        .map(|k| format!("sha256:{}", crate::audit::sha256_hex(k.as_str().as_bytes())))
        .collect();
    json!({
        "vmid": spec.vmid.get(),
        "ostemplate": spec.ostemplate.as_str(),
        "hostname": spec.hostname.as_str(),
        "memory_mib": spec.memory_mib.get(),
        "swap_mib": spec.swap_mib.get(),
        "cores": spec.cores.get(),
        "rootfs": format!("{}:{}", spec.rootfs.storage, spec.rootfs.size_gib),
        "net0": spec.net.net0(),
        "nesting": spec.nesting,
        "ssh_public_keys": keys,
        "start": spec.start,
        "onboot": spec.onboot,
    })
}

/// A private directory holding the keys file for the duration of one `pct create`.
struct KeysFile {
    dir: PathBuf,
    file: PathBuf,
}

impl KeysFile {
    fn create(spec: &PctCreateSpec) -> std::io::Result<KeysFile> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos();
        // mkdir fails if the name exists, so a directory planted by someone else is
        // never used; 0700 keeps others out of it.
        let dir = std::env::temp_dir().join(format!("felhom-pct-{}-{nanos}", std::process::id()));
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        let file = dir.join("authorized_keys");
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
            .open(&file)?;
        for k in spec.ssh_public_keys.keys() {
            writeln!(f, "{}", k.as_str())?;
        }
        f.sync_all()?;
        Ok(KeysFile { dir, file })
    }
}

impl Drop for KeysFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.file);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

pub fn pct_create(
    sys: &dyn System,
    tools: &Tools,
    timeout: Duration,
    spec: &PctCreateSpec,
) -> OpResult {
    let keys = if spec.ssh_public_keys.is_empty() {
        None
    } else {
        Some(KeysFile::create(spec).map_err(|e| {
            OpError::failed(
                ErrorKind::Internal,
                format!("writing the SSH keys file: {e}"),
            )
        })?)
    };
    let argv = pct_argv(spec, keys.as_ref().map(|k| k.file.as_path()));
    let out = sys.run_tool(
        &tools.pct,
        &argv,
        Limits {
            timeout,
            stdout_cap: 64 * 1024,
            stderr_cap: 64 * 1024,
        },
        ToolCaps::Class,
    )?;
    drop(keys);
    let detail = json!({"exit_status": out.code, "signal": out.signal});
    match out.code {
        Some(0) => Ok((
            Response::PctCreated {
                vmid: spec.vmid,
                output: String::from_utf8_lossy(&out.stdout).into_owned(),
            },
            detail,
        )),
        _ => Err(OpError::failed(
            ErrorKind::ToolFailed,
            format!(
                "pct create {} exited with {}: {}",
                spec.vmid,
                out.code.map_or_else(
                    || format!("signal {}", out.signal.unwrap_or(0)),
                    |c| c.to_string()
                ),
                stderr_tail(&out.stderr)
            ),
        )),
    }
}

// ---------------------------------------------------------------- usb

/// A resolved USB partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsbPartition {
    /// `/dev/<kname>`.
    pub dev: PathBuf,
    pub kname: String,
    pub rdev: (u64, u64),
    /// Its udev name `/dev/disk/by-id/usb-…` (the fstab line's device).
    pub by_id: String,
}

/// The kernel name a udev link points at: `../../<kname>` (what udev writes) or
/// `/dev/<kname>`; anything else is not followed.
fn kname_of_link(target: &Path) -> Option<String> {
    let t = target.to_str()?;
    let k = t
        .strip_prefix("../../")
        .or_else(|| t.strip_prefix("/dev/"))?;
    is_kernel_name(k).then(|| k.to_string())
}

/// Whether `path` is a real directory (not a symlink).
fn is_real_dir(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir())
}

/// The kernel name `device` names, found without following any link but one udev link
/// directly in `/dev/disk/by-{id,uuid,path}`, read with one `readlink` that must land on
/// `/dev/<kname>`. Nothing else is resolved (no canonicalize), and a refusal names only
/// the path the agent sent, never where a link points or an errno.
fn device_kname(device: &BlockDevicePath) -> Result<String, OpError> {
    let refuse = |why: &str| OpError::denied(ErrorKind::NotUsb, format!("{device}: {why}"));
    match device.name() {
        // Checked again here: this is the helper's own boundary.
        BlockDeviceName::Kernel(k) if is_kernel_name(k) => Ok(k.to_string()),
        BlockDeviceName::Link { dir, link }
            if BLOCK_DEVICE_LINK_DIRS.contains(&dir) && is_udev_link_name(link) =>
        {
            let base = Path::new("/dev/disk");
            if !is_real_dir(base) || !is_real_dir(&base.join(dir)) {
                return Err(refuse("no such udev link"));
            }
            let target =
                std::fs::read_link(device.as_str()).map_err(|_| refuse("no such udev link"))?;
            kname_of_link(&target)
                .ok_or_else(|| refuse("is not a udev link to a device node in /dev"))
        }
        _ => Err(refuse(
            "must be /dev/<kernel name> or /dev/disk/by-id|by-uuid|by-path/<udev link name>",
        )),
    }
}

/// The `/dev/disk/by-id/usb-…` udev link of `kname` (the first in byte order if there
/// are several). udev makes `usb-` links only for disks on the USB bus; the fstab line is
/// keyed on it, so at boot no other device can be mounted in its place.
fn usb_by_id(kname: &str) -> Result<String, OpError> {
    let dir = Path::new("/dev/disk/by-id");
    let mut found: Vec<String> = Vec::new();
    if is_real_dir(dir)
        && let Ok(entries) = std::fs::read_dir(dir)
    {
        for e in entries.flatten() {
            let Some(name) = e.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if name.starts_with("usb-")
                && is_udev_link_name(&name)
                && std::fs::read_link(e.path())
                    .ok()
                    .and_then(|t| kname_of_link(&t))
                    .is_some_and(|k| k == kname)
            {
                found.push(name);
            }
        }
    }
    found.sort();
    found
        .into_iter()
        .next()
        .map(|n| format!("/dev/disk/by-id/{n}"))
        .ok_or_else(|| {
            OpError::denied(
                ErrorKind::NotUsb,
                format!(
                    "{kname}: udev has no /dev/disk/by-id/usb-… link for it (the fstab entry is keyed on that name)"
                ),
            )
        })
}

/// Finds the device node `device` names ([`device_kname`]), a block device directly in
/// /dev, then checks in sysfs that it is a partition on a USB-attached disk:
/// `<sysfs>/class/block/<kname>` resolves inside `<sysfs>/devices/` through a `usb…`
/// component, has a `partition` file, and its `dev` matches the node's major:minor; and
/// finds its `usb-` udev link ([`usb_by_id`]). The same check runs on the real /sys and
/// on a test tree.
pub fn resolve_usb_partition(
    device: &BlockDevicePath,
    sysfs_root: &Path,
) -> Result<UsbPartition, OpError> {
    let not_usb = |m: String| OpError::denied(ErrorKind::NotUsb, m);
    let kname = device_kname(device)?;
    let dev = Path::new("/dev").join(&kname);
    let md = std::fs::symlink_metadata(&dev)
        .map_err(|_| not_usb(format!("{device}: no such block device")))?;
    if !md.file_type().is_block_device() {
        return Err(not_usb(format!("{device}: not a block device")));
    }
    let rdev = (
        nix::sys::stat::major(md.rdev()),
        nix::sys::stat::minor(md.rdev()),
    );
    let sys_devices = std::fs::canonicalize(sysfs_root.join("devices"))
        .map_err(|e| not_usb(format!("sysfs {}: {e}", sysfs_root.display())))?;
    let link = sysfs_root.join("class/block").join(&kname);
    let real =
        std::fs::canonicalize(&link).map_err(|e| not_usb(format!("{}: {e}", link.display())))?;
    if !real.starts_with(&sys_devices) {
        return Err(not_usb(format!(
            "{} is outside {}",
            real.display(),
            sys_devices.display()
        )));
    }
    let usb = real
        .strip_prefix(&sys_devices)
        .map(|rel| {
            rel.components()
                .any(|c| c.as_os_str().to_string_lossy().starts_with("usb"))
        })
        .unwrap_or(false);
    if !usb {
        return Err(not_usb(format!(
            "{kname} is not attached through USB ({})",
            real.display()
        )));
    }
    if !real.join("partition").is_file() {
        return Err(not_usb(format!("{kname} is not a partition")));
    }
    let sys_dev = std::fs::read_to_string(real.join("dev")).unwrap_or_default();
    if sys_dev.trim() != format!("{}:{}", rdev.0, rdev.1) {
        return Err(not_usb(format!(
            "{kname}: sysfs says device {} but {} is {}:{}",
            sys_dev.trim(),
            dev.display(),
            rdev.0,
            rdev.1
        )));
    }
    let by_id = usb_by_id(&kname)?;
    Ok(UsbPartition {
        dev,
        kname,
        rdev,
        by_id,
    })
}

/// `blkid -p -o export <dev>` → (TYPE, UUID). blkid parses the untrusted medium, so it
/// runs with no capabilities ([`ToolCaps::None`]).
fn probe(
    sys: &dyn System,
    tools: &Tools,
    timeout: Duration,
    dev: &Path,
) -> Result<(Fstype, FsUuid), OpError> {
    let out = sys.run_tool(
        &tools.blkid,
        &[
            "-p".into(),
            "-o".into(),
            "export".into(),
            dev.as_os_str().to_owned(),
        ],
        Limits {
            timeout,
            stdout_cap: 16 * 1024,
            stderr_cap: 4 * 1024,
        },
        ToolCaps::None,
    )?;
    if out.code != Some(0) {
        return Err(OpError::denied(
            ErrorKind::UnsupportedFilesystem,
            format!(
                "{}: blkid found no filesystem (exit {:?}) {}",
                dev.display(),
                out.code,
                stderr_tail(&out.stderr)
            ),
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k).and_then(|r| r.strip_prefix('=')))
            .map(str::to_string)
    };
    let ty = get("TYPE").unwrap_or_default();
    let fstype: Fstype = ty.parse().map_err(|e: felhom_protocol::ValueError| {
        OpError::denied(
            ErrorKind::UnsupportedFilesystem,
            format!("{}: {e}", dev.display()),
        )
    })?;
    let uuid = FsUuid::new(get("UUID").unwrap_or_default()).map_err(|e| {
        OpError::denied(
            ErrorKind::UnsupportedFilesystem,
            format!("{}: {e}", dev.display()),
        )
    })?;
    Ok((fstype, uuid))
}

/// Unescapes mountinfo's octal escapes (`\040` for space).
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One line of /proc/self/mountinfo, the parts we use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// major:minor; an anonymous `0:NN` for btrfs.
    pub dev: (u64, u64),
    pub fstype: String,
    /// The device the file system was mounted from, as mount(2) was given it.
    pub source: String,
    /// The per-mount options (`rw,nosuid,nodev,noexec,noatime`).
    pub options: Vec<String>,
}

/// What is mounted at `target`, if anything (the topmost mount).
pub fn mounted_at(mountinfo: &str, target: &Path) -> Option<MountEntry> {
    let t = target.to_string_lossy();
    mountinfo.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        if f.len() > 4 && unescape_mountinfo(f[4]) == t {
            let (ma, mi) = f[2].split_once(':')?;
            let sep = f.iter().position(|x| *x == "-")?;
            Some(MountEntry {
                dev: (ma.parse().ok()?, mi.parse().ok()?),
                fstype: f.get(sep + 1)?.to_string(),
                source: unescape_mountinfo(f.get(sep + 2)?),
                options: f.get(5)?.split(',').map(str::to_string).collect(),
            })
        } else {
            None
        }
    })
}

/// Whether the mount `m` is `part`'s file system: the same device number, or (btrfs
/// shows an anonymous `0:NN` device) the same type mounted from the same device node.
fn is_mount_of(m: &MountEntry, part: &UsbPartition, fstype: Fstype) -> bool {
    m.dev == part.rdev || (m.fstype == fstype.as_str() && Path::new(&m.source) == part.dev)
}

fn io_failed(what: &str, path: &Path, e: std::io::Error) -> OpError {
    OpError::failed(
        ErrorKind::Internal,
        format!("{what} {}: {e}", path.display()),
    )
}

/// The mount root: created 0700 if missing (its parent must exist), so no local account
/// can reach a medium's files, whatever modes the medium carries; must be a real
/// directory (not a symlink) owned by root and not writable by group or others. One
/// readable by others (0755, what earlier versions created) loses its bits for others;
/// traverse-only for others (0711) is an operator's choice and kept (docs/privhelper.md).
/// Returns its canonical path, so that mount points compare equal to what mountinfo shows.
fn check_mount_root(root: &Path) -> Result<PathBuf, OpError> {
    if std::fs::symlink_metadata(root).is_err() {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(root)
            .map_err(|e| io_failed("creating", root, e))?;
    }
    let md = std::fs::symlink_metadata(root).map_err(|e| io_failed("reading", root, e))?;
    if !md.is_dir() || md.uid() != 0 || md.permissions().mode() & 0o022 != 0 {
        return Err(OpError::failed(
            ErrorKind::Internal,
            format!(
                "mount root {} must be a directory (not a symlink) owned by root and not writable by group or others",
                root.display()
            ),
        ));
    }
    let mode = md.permissions().mode() & 0o7777;
    if mode & 0o004 != 0 {
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(mode & !0o007))
            .map_err(|e| io_failed("closing to others", root, e))?;
    }
    std::fs::canonicalize(root).map_err(|e| io_failed("resolving", root, e))
}

/// Creates `<root>/<name>` if missing and opens it without following symlinks.
fn open_mount_point(root: &Path, name: &MountName) -> Result<(std::fs::File, PathBuf), OpError> {
    let mp = root.join(name.as_str());
    match std::fs::DirBuilder::new().mode(0o700).create(&mp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_failed("creating", &mp, e)),
    }
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_DIRECTORY | nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(&mp)
        .map_err(|e| {
            OpError::denied(
                ErrorKind::NameInUse,
                format!(
                    "{} is not a plain directory (symlinks refused): {e}",
                    mp.display()
                ),
            )
        })?;
    Ok((f, mp))
}

fn mount_error(e: std::io::Error, what: String) -> OpError {
    let kind = if e.raw_os_error() == Some(nix::libc::EBUSY) {
        ErrorKind::Busy
    } else {
        ErrorKind::ToolFailed
    };
    OpError::failed(kind, format!("{what}: {e}"))
}

pub fn usb_mount(
    sys: &dyn System,
    cfg: &Config,
    tools: &Tools,
    device: &BlockDevicePath,
    name: &MountName,
) -> OpResult {
    let part = resolve_usb_partition(device, &cfg.sysfs_root)?;
    let (fstype, uuid) = probe(sys, tools, cfg.tool_timeout, &part.dev)?;
    let root = check_mount_root(&cfg.mount_root)?;
    let mp = root.join(name.as_str());
    let mp_str = mp.to_string_lossy().into_owned();
    let data = fstab::fs_data(fstype, cfg.agent_gid);
    let entry = fstab::Entry {
        spec: part.by_id.clone(),
        mount_point: mp_str.clone(),
        fstype,
        uuid: uuid.clone(),
        name: name.clone(),
        data: data.clone(),
    };
    let old = fstab::read(&cfg.fstab)?;
    // Check the fstab before any effect, so a taken name or UUID changes nothing.
    let new = fstab::with_entry(&old, &entry)?;
    let info = sys
        .mountinfo()
        .map_err(|e| io_failed("reading", Path::new("/proc/self/mountinfo"), e))?;
    let mut flags_restricted = false;
    let already_mounted = match mounted_at(&info, &mp) {
        Some(m) if is_mount_of(&m, &part, fstype) => {
            // Adopted (mounted by hand, or by a version without these flags): it gets
            // them now, not only at the next boot.
            let opts = |o: &str| m.options.iter().any(|x| x == o);
            if !fstab::FLAG_OPTIONS.iter().all(|f| opts(f)) {
                sys.restrict(&mp, opts("ro")).map_err(|e| {
                    mount_error(e, format!("remount {} nosuid,nodev,noexec", mp.display()))
                })?;
                flags_restricted = true;
            }
            true
        }
        Some(m) => {
            return Err(OpError::denied(
                ErrorKind::NameInUse,
                format!(
                    "{} already has another filesystem mounted ({}, device {}:{})",
                    mp.display(),
                    m.fstype,
                    m.dev.0,
                    m.dev.1
                ),
            ));
        }
        None => false,
    };
    if !already_mounted {
        let (dir, mp) = open_mount_point(&root, name)?;
        // Mount onto the directory we opened (no symlink can be swapped in).
        use std::os::fd::AsRawFd;
        let target = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
        sys.mount(&part.dev, &target, fstype, data.as_deref())
            .map_err(|e| {
                mount_error(
                    e,
                    format!(
                        "mount {} on {} ({fstype})",
                        part.dev.display(),
                        mp.display()
                    ),
                )
            })?;
    }
    let fstab_changed = match new {
        Some(content) => {
            if let Err(e) = fstab::write_atomic(&cfg.fstab, &content) {
                // Without its fstab line the mount would not be managed (UsbUnmount
                // leaves unmanaged mounts alone): take back what this call mounted.
                if !already_mounted {
                    let _ = sys.umount(&mp);
                }
                return Err(e.into());
            }
            true
        }
        None => false,
    };
    let detail = json!({
        "dev": part.dev.to_string_lossy(),
        "by_id": part.by_id,
        "uuid": uuid.as_str(),
        "fstype": fstype.as_str(),
        "mount_point": mp_str,
        "already_mounted": already_mounted,
        "flags_restricted": flags_restricted,
        "fstab_changed": fstab_changed,
    });
    Ok((
        Response::UsbMounted {
            name: name.clone(),
            mount_point: mp_str,
            uuid,
            fstype,
            already_mounted,
            fstab_changed,
        },
        detail,
    ))
}

/// Unmounts a managed mount: one that has its fstab line (`x-felhom.name=<name>`). Whatever
/// else is mounted at `<mount_root>/<name>` is left alone (`name_in_use`), and so is a
/// mount of another type than the line's. No line and nothing mounted: a no-op success.
pub fn usb_unmount(sys: &dyn System, cfg: &Config, name: &MountName) -> OpResult {
    let root = std::fs::canonicalize(&cfg.mount_root).unwrap_or_else(|_| cfg.mount_root.clone());
    let mp = root.join(name.as_str());
    let old = fstab::read(&cfg.fstab)?;
    let managed = fstab::managed_entry(&old, name);
    let info = sys
        .mountinfo()
        .map_err(|e| io_failed("reading", Path::new("/proc/self/mountinfo"), e))?;
    let mounted = mounted_at(&info, &mp);
    match (&managed, &mounted) {
        (None, Some(m)) => {
            return Err(OpError::denied(
                ErrorKind::NameInUse,
                format!(
                    "{} has a {} file system mounted that is not a felhom mount (no fstab line with x-felhom.name={name}); left alone",
                    mp.display(),
                    m.fstype
                ),
            ));
        }
        (Some((_, ty)), Some(m)) if m.fstype != *ty => {
            return Err(OpError::denied(
                ErrorKind::NameInUse,
                format!(
                    "{} has a {} file system mounted, not the {ty} of its fstab line; left alone",
                    mp.display(),
                    m.fstype
                ),
            ));
        }
        _ => {}
    }
    let was_mounted = mounted.is_some();
    if was_mounted {
        sys.umount(&mp)
            .map_err(|e| mount_error(e, format!("umount {}", mp.display())))?;
    }
    let fstab_changed = match fstab::without_entry(&old, name) {
        Some(content) => {
            fstab::write_atomic(&cfg.fstab, &content)?;
            true
        }
        None => false,
    };
    // Remove the (now empty) mount point of a managed mount; a non-empty one stays.
    if managed.is_some()
        && let Ok(md) = std::fs::symlink_metadata(&mp)
        && md.is_dir()
    {
        let _ = std::fs::remove_dir(&mp);
    }
    let detail = json!({"mount_point": mp.to_string_lossy(), "was_mounted": was_mounted, "fstab_changed": fstab_changed});
    Ok((
        Response::UsbUnmounted {
            name: name.clone(),
            was_mounted,
            fstab_changed,
        },
        detail,
    ))
}

#[cfg(test)]
pub(crate) mod fake {
    use super::*;
    use std::sync::Mutex;

    /// Records every effect; answers tools from a canned output.
    #[derive(Debug, Default)]
    pub struct RecordingSystem {
        pub calls: Mutex<Vec<String>>,
        pub tool_code: i32,
        pub tool_stdout: Vec<u8>,
    }

    impl System for RecordingSystem {
        fn run_tool(
            &self,
            tool: &Path,
            args: &[OsString],
            _l: Limits,
            _c: ToolCaps,
        ) -> Result<ToolOutput, ExecError> {
            let mut line = tool.display().to_string();
            for a in args {
                line.push(' ');
                line.push_str(&a.to_string_lossy());
            }
            self.calls.lock().unwrap().push(line);
            Ok(ToolOutput {
                stdout: self.tool_stdout.clone(),
                stdout_truncated: false,
                stderr: b"boom".to_vec(),
                code: Some(self.tool_code),
                signal: None,
            })
        }
        fn mount(&self, s: &Path, t: &Path, f: Fstype, data: Option<&str>) -> std::io::Result<()> {
            self.calls.lock().unwrap().push(format!(
                "mount {} {} {f} {}",
                s.display(),
                t.display(),
                data.unwrap_or("-")
            ));
            Ok(())
        }
        fn restrict(&self, t: &Path, ro: bool) -> std::io::Result<()> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("restrict {} {ro}", t.display()));
            Ok(())
        }
        fn umount(&self, t: &Path) -> std::io::Result<()> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("umount {}", t.display()));
            Ok(())
        }
        fn mountinfo(&self) -> std::io::Result<String> {
            Ok(String::new())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::RecordingSystem;
    use super::*;

    fn tools() -> Tools {
        Tools {
            pct: "/usr/sbin/pct".into(),
            smartctl: "/usr/sbin/smartctl".into(),
            blkid: "/usr/sbin/blkid".into(),
        }
    }

    const SPEC: &str = r#"{"vmid": 120, "ostemplate": "local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst", "hostname": "web1", "memory_mib": 1024, "swap_mib": 512, "cores": 2, "rootfs": {"storage": "local-lvm", "size_gib": 8}, "net": {"bridge": "vmbr0", "ip": "dhcp", "gw": null}, "nesting": true, "ssh_public_keys": [], "start": false, "onboot": true}"#;

    #[test]
    fn pct_command_line_is_exact() {
        let sys = RecordingSystem::default();
        let spec = PctCreateSpec::from_json(SPEC).unwrap();
        pct_create(&sys, &tools(), Duration::from_secs(5), &spec).unwrap();
        assert_eq!(
            sys.calls.lock().unwrap().as_slice(),
            [
                "/usr/sbin/pct create 120 local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst --hostname web1 --memory 1024 --swap 512 --cores 2 --rootfs local-lvm:8 --net0 name=eth0,bridge=vmbr0,ip=dhcp --unprivileged 1 --features keyctl=1,nesting=1 --start 0 --onboot 1"
            ]
        );
    }

    #[test]
    fn pct_failure_is_typed() {
        let sys = RecordingSystem {
            tool_code: 255,
            ..Default::default()
        };
        let spec = PctCreateSpec::from_json(SPEC).unwrap();
        let e = pct_create(&sys, &tools(), Duration::from_secs(5), &spec).unwrap_err();
        assert_eq!(e.kind, ErrorKind::ToolFailed);
        assert!(
            e.message.contains("255") && e.message.contains("boom"),
            "{}",
            e.message
        );
    }

    #[test]
    fn smart_command_line_is_exact() {
        let sys = RecordingSystem {
            tool_code: 4,
            tool_stdout: b"{}".to_vec(),
            ..Default::default()
        };
        let (resp, _) = smart_read(
            &sys,
            &tools(),
            Duration::from_secs(5),
            &DiskDevice::new("nvme0n1").unwrap(),
        )
        .unwrap();
        assert_eq!(
            sys.calls.lock().unwrap().as_slice(),
            ["/usr/sbin/smartctl --json=c -a -n standby /dev/nvme0n1"]
        );
        assert!(matches!(
            resp,
            Response::Smart(SmartOutput { exit_status: 4, .. })
        ));
    }

    #[test]
    fn pct_command_line_with_ipv6() {
        let sys = RecordingSystem::default();
        let spec = PctCreateSpec::from_json(&SPEC.replace(
            r#""ip": "dhcp", "gw": null"#,
            r#""ip": "2001:db8::5/64", "gw": "2001:db8::1""#,
        ))
        .unwrap();
        pct_create(&sys, &tools(), Duration::from_secs(5), &spec).unwrap();
        let calls = sys.calls.lock().unwrap();
        assert!(
            calls[0].contains(" --net0 name=eth0,bridge=vmbr0,ip6=2001:db8::5/64,gw6=2001:db8::1 "),
            "{}",
            calls[0]
        );
        assert_eq!(
            pct_audit_args(&spec)["net0"],
            "name=eth0,bridge=vmbr0,ip6=2001:db8::5/64,gw6=2001:db8::1"
        );
        // IPv4 keeps ip=/gw=.
        let v4 = PctCreateSpec::from_json(&SPEC.replace(
            r#""ip": "dhcp", "gw": null"#,
            r#""ip": "192.0.2.5/24", "gw": "192.0.2.1""#,
        ))
        .unwrap();
        assert_eq!(
            pct_argv(&v4, None)
                .iter()
                .skip_while(|a| *a != "--net0")
                .nth(1)
                .unwrap(),
            "name=eth0,bridge=vmbr0,ip=192.0.2.5/24,gw=192.0.2.1"
        );
    }

    #[test]
    fn mountinfo_lookup() {
        let mi = "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n90 22 7:0 / /mnt/felhom/my\\040disk rw,nosuid shared:5 - ext4 /dev/loop0 rw\n91 22 0:77 / /mnt/felhom/b rw - btrfs /dev/loop1 rw,space_cache=v2\n";
        let m = mounted_at(mi, Path::new("/mnt/felhom/my disk")).unwrap();
        assert_eq!(
            (m.dev, m.fstype.as_str(), m.source.as_str()),
            ((7, 0), "ext4", "/dev/loop0")
        );
        assert_eq!(m.options, ["rw", "nosuid"]);
        assert_eq!(mounted_at(mi, Path::new("/mnt/felhom/other")), None);
        // btrfs: an anonymous device number; recognised by type and source.
        let b = mounted_at(mi, Path::new("/mnt/felhom/b")).unwrap();
        let part = UsbPartition {
            dev: "/dev/loop1".into(),
            kname: "loop1".into(),
            rdev: (7, 1),
            by_id: "/dev/disk/by-id/usb-x".into(),
        };
        assert!(is_mount_of(&b, &part, Fstype::Btrfs));
        assert!(!is_mount_of(&b, &part, Fstype::Ext4));
        let other = UsbPartition {
            dev: "/dev/loop2".into(),
            ..part
        };
        assert!(!is_mount_of(&b, &other, Fstype::Btrfs));
    }

    #[test]
    fn udev_links_are_read_one_step_into_dev_only() {
        assert_eq!(
            kname_of_link(Path::new("../../sdb1")).as_deref(),
            Some("sdb1")
        );
        assert_eq!(
            kname_of_link(Path::new("/dev/sdb1")).as_deref(),
            Some("sdb1")
        );
        for bad in [
            "../../shm/x",
            "../../../etc/shadow",
            "/root/.ssh/id_ed25519",
            "/dev/shm/x",
            "sdb1",
            "../sdb1",
            "../../SDB1",
        ] {
            assert_eq!(kname_of_link(Path::new(bad)), None, "{bad}");
        }
    }

    #[test]
    fn usb_mount_flags_are_nosuid_nodev_noexec_noatime() {
        use nix::mount::MsFlags;
        assert_eq!(
            USB_MOUNT_FLAGS,
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC | MsFlags::MS_NOATIME
        );
    }
}
