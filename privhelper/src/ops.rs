//! The three operation classes. Each function takes validated protocol values, does
//! exactly its one job through the [`System`] trait (the privileged effects), and
//! returns the response plus a detail object for the audit outcome.
//!
//! Must never: build a command line from anything but validated values, run a tool
//! other than the configured one, or touch a path outside the configured roots.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use felhom_protocol::{
    BlockDevicePath, DiskDevice, ErrorKind, FsUuid, Fstype, MountName, PctCreateSpec, Response,
    SMART_OUTPUT_CAP, SmartOutput,
};
use serde_json::{Value, json};

use crate::config::{Config, Tools};
use crate::exec::{ExecError, Limits, ToolOutput};
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
            fstab::FstabError::NameInUse { .. } => {
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
    ) -> Result<ToolOutput, ExecError>;
    fn mount(&self, source: &Path, target: &Path, fstype: Fstype) -> std::io::Result<()>;
    fn umount(&self, target: &Path) -> std::io::Result<()>;
    fn mountinfo(&self) -> std::io::Result<String>;
}

#[derive(Debug, Default)]
pub struct RealSystem;

impl System for RealSystem {
    fn run_tool(
        &self,
        tool: &Path,
        args: &[OsString],
        limits: Limits,
    ) -> Result<ToolOutput, ExecError> {
        crate::exec::run(tool, args, limits)
    }
    fn mount(&self, source: &Path, target: &Path, fstype: Fstype) -> std::io::Result<()> {
        nix::mount::mount(
            Some(source),
            target,
            Some(fstype.as_str()),
            nix::mount::MsFlags::MS_NOATIME,
            None::<&str>,
        )
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
    /// `/dev/<kname>` after following symlinks.
    pub dev: PathBuf,
    pub kname: String,
    pub rdev: (u64, u64),
}

fn is_kname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// Follows `device`'s symlinks to `/dev/<kname>` (a block device directly in /dev), then
/// checks in sysfs that it is a partition on a USB-attached disk:
/// `<sysfs>/class/block/<kname>` resolves inside `<sysfs>/devices/` through a `usb…`
/// component, has a `partition` file, and its `dev` matches the node's major:minor.
/// The same check runs on the real /sys and on a test tree.
pub fn resolve_usb_partition(
    device: &BlockDevicePath,
    sysfs_root: &Path,
) -> Result<UsbPartition, OpError> {
    let not_usb = |m: String| OpError::denied(ErrorKind::NotUsb, m);
    let dev =
        std::fs::canonicalize(device.as_str()).map_err(|e| not_usb(format!("{device}: {e}")))?;
    let kname = match (dev.parent(), dev.file_name().and_then(|n| n.to_str())) {
        (Some(p), Some(n)) if p == Path::new("/dev") && is_kname(n) => n.to_string(),
        _ => {
            return Err(not_usb(format!(
                "{device} resolves to {}, not a device node in /dev",
                dev.display()
            )));
        }
    };
    let md = std::fs::metadata(&dev).map_err(|e| not_usb(format!("{}: {e}", dev.display())))?;
    if !md.file_type().is_block_device() {
        return Err(not_usb(format!("{} is not a block device", dev.display())));
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
    Ok(UsbPartition { dev, kname, rdev })
}

/// `blkid -p -o export <dev>` → (TYPE, UUID).
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

/// major:minor of what is mounted at `target`, if anything (the topmost mount).
pub fn mounted_at(mountinfo: &str, target: &Path) -> Option<(u64, u64)> {
    let t = target.to_string_lossy();
    mountinfo.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        if f.len() > 4 && unescape_mountinfo(f[4]) == t {
            let (ma, mi) = f[2].split_once(':')?;
            Some((ma.parse().ok()?, mi.parse().ok()?))
        } else {
            None
        }
    })
}

fn io_failed(what: &str, path: &Path, e: std::io::Error) -> OpError {
    OpError::failed(
        ErrorKind::Internal,
        format!("{what} {}: {e}", path.display()),
    )
}

/// The mount root: created 0755 if missing (its parent must exist); must be a real
/// directory (not a symlink) owned by root and not writable by group or others.
fn check_mount_root(root: &Path) -> Result<(), OpError> {
    if std::fs::symlink_metadata(root).is_err() {
        std::fs::DirBuilder::new()
            .mode(0o755)
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
    Ok(())
}

/// Creates `<root>/<name>` if missing and opens it without following symlinks.
fn open_mount_point(root: &Path, name: &MountName) -> Result<(std::fs::File, PathBuf), OpError> {
    let mp = root.join(name.as_str());
    match std::fs::DirBuilder::new().mode(0o755).create(&mp) {
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

pub fn usb_mount(
    sys: &dyn System,
    cfg: &Config,
    tools: &Tools,
    device: &BlockDevicePath,
    name: &MountName,
) -> OpResult {
    let part = resolve_usb_partition(device, &cfg.sysfs_root)?;
    let (fstype, uuid) = probe(sys, tools, cfg.tool_timeout, &part.dev)?;
    check_mount_root(&cfg.mount_root)?;
    let mp = cfg.mount_root.join(name.as_str());
    let mp_str = mp.to_string_lossy().into_owned();
    let line = fstab::managed_line(&uuid, &mp_str, fstype, name);
    let old = fstab::read(&cfg.fstab)?;
    // Check the fstab before any effect, so a taken name changes nothing.
    let new = fstab::with_entry(&old, name, &line, &mp_str)?;
    let info = sys
        .mountinfo()
        .map_err(|e| io_failed("reading", Path::new("/proc/self/mountinfo"), e))?;
    let already_mounted = match mounted_at(&info, &mp) {
        Some(d) if d == part.rdev => true,
        Some(d) => {
            return Err(OpError::denied(
                ErrorKind::NameInUse,
                format!(
                    "{} already has another filesystem mounted (device {}:{})",
                    mp.display(),
                    d.0,
                    d.1
                ),
            ));
        }
        None => false,
    };
    if !already_mounted {
        let (dir, mp) = open_mount_point(&cfg.mount_root, name)?;
        // Mount onto the directory we opened (no symlink can be swapped in).
        use std::os::fd::AsRawFd;
        let target = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
        sys.mount(&part.dev, &target, fstype).map_err(|e| {
            let kind = if e.raw_os_error() == Some(nix::libc::EBUSY) {
                ErrorKind::Busy
            } else {
                ErrorKind::ToolFailed
            };
            OpError::failed(
                kind,
                format!(
                    "mount {} on {} ({fstype}): {e}",
                    part.dev.display(),
                    mp.display()
                ),
            )
        })?;
    }
    let fstab_changed = match new {
        Some(content) => {
            fstab::write_atomic(&cfg.fstab, &content)?;
            true
        }
        None => false,
    };
    let detail = json!({
        "dev": part.dev.to_string_lossy(),
        "uuid": uuid.as_str(),
        "fstype": fstype.as_str(),
        "mount_point": mp_str,
        "already_mounted": already_mounted,
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

pub fn usb_unmount(sys: &dyn System, cfg: &Config, name: &MountName) -> OpResult {
    let mp = cfg.mount_root.join(name.as_str());
    let old = fstab::read(&cfg.fstab)?;
    let info = sys
        .mountinfo()
        .map_err(|e| io_failed("reading", Path::new("/proc/self/mountinfo"), e))?;
    let was_mounted = mounted_at(&info, &mp).is_some();
    if was_mounted {
        sys.umount(&mp).map_err(|e| {
            let kind = if e.raw_os_error() == Some(nix::libc::EBUSY) {
                ErrorKind::Busy
            } else {
                ErrorKind::ToolFailed
            };
            OpError::failed(kind, format!("umount {}: {e}", mp.display()))
        })?;
    }
    let fstab_changed = match fstab::without_entry(&old, name) {
        Some(content) => {
            fstab::write_atomic(&cfg.fstab, &content)?;
            true
        }
        None => false,
    };
    // Remove the (now empty) mount point we created; a non-empty or foreign one stays.
    if let Ok(md) = std::fs::symlink_metadata(&mp)
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
        fn mount(&self, s: &Path, t: &Path, f: Fstype) -> std::io::Result<()> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("mount {} {} {f}", s.display(), t.display()));
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
    fn mountinfo_lookup() {
        let mi = "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n90 22 7:0 / /mnt/felhom/my\\040disk rw - ext4 /dev/loop0 rw\n";
        assert_eq!(
            mounted_at(mi, Path::new("/mnt/felhom/my disk")),
            Some((7, 0))
        );
        assert_eq!(mounted_at(mi, Path::new("/mnt/felhom/other")), None);
    }
}
