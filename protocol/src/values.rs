//! Validated value types used on both sides of the root fence and by the Proxmox client.
//!
//! Every type here has private fields, a fallible constructor, and serde `try_from` so that
//! JSON and bincode decoding go through the same check: a value that exists is valid.
//! Must never: expose a way to build an unchecked value, or accept a byte that could mean
//! something to a shell, a path walker or an option parser where the type does not need it.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Prefix of every [`ValueError`] message; the helper uses it to tell a rejected value
/// (audited as a validation refusal) from a malformed frame.
pub const VALUE_ERROR_PREFIX: &str = "invalid value for ";

/// Why a value was rejected. Carries the field name so the message says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("invalid value for {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

impl ValueError {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        ValueError::Invalid {
            field,
            reason: reason.into(),
        }
    }

    /// The field that was rejected.
    pub fn field(&self) -> &'static str {
        match self {
            ValueError::Invalid { field, .. } => field,
        }
    }
}

/// Quotes a rejected input for an error message: bounded, control characters escaped.
fn shown(s: &str) -> String {
    let mut out: String = s.chars().take(64).collect::<String>();
    if s.chars().count() > 64 {
        out.push('…');
    }
    format!("{out:?}")
}

/// Defines a `String` newtype with a checking constructor, serde `try_from`/`into`,
/// `FromStr`, `Display` and `as_str`.
macro_rules! string_newtype {
    ($(#[$m:meta])* $name:ident, $field:literal, $check:path) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// The field name used in error messages.
            pub const FIELD: &'static str = $field;

            pub fn new(s: impl Into<String>) -> Result<Self, ValueError> {
                let s = s.into();
                match $check(&s) {
                    Ok(()) => Ok($name(s)),
                    Err(reason) => Err(ValueError::invalid($field, format!("{} {}", shown(&s), reason))),
                }
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = ValueError;
            fn try_from(s: String) -> Result<Self, ValueError> {
                $name::new(s)
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }

        impl FromStr for $name {
            type Err = ValueError;
            fn from_str(s: &str) -> Result<Self, ValueError> {
                $name::new(s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

/// Defines a bounded integer newtype (serde `try_from = "u64"`).
macro_rules! bounded_u32 {
    ($(#[$m:meta])* $name:ident, $field:literal, $min:expr, $max:expr) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "u64", into = "u32")]
        pub struct $name(u32);

        impl $name {
            pub const MIN: u32 = $min;
            pub const MAX: u32 = $max;
            pub const FIELD: &'static str = $field;

            pub fn new(v: u64) -> Result<Self, ValueError> {
                if (Self::MIN as u64..=Self::MAX as u64).contains(&v) {
                    Ok($name(v as u32))
                } else {
                    Err(ValueError::invalid(
                        $field,
                        format!("{v} is outside {}..={}", Self::MIN, Self::MAX),
                    ))
                }
            }

            pub fn get(self) -> u32 {
                self.0
            }
        }

        impl TryFrom<u64> for $name {
            type Error = ValueError;
            fn try_from(v: u64) -> Result<Self, ValueError> {
                $name::new(v)
            }
        }

        impl From<$name> for u32 {
            fn from(v: $name) -> u32 {
                v.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

/// A Proxmox guest id. PVE accepts 100..=999_999_999 (`pve-vmid` format in pve-common).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u64", into = "u32")]
pub struct Vmid(u32);

impl Vmid {
    pub const MIN: u32 = 100;
    pub const MAX: u32 = 999_999_999;

    pub fn new(v: u64) -> Result<Self, ValueError> {
        if (Self::MIN as u64..=Self::MAX as u64).contains(&v) {
            Ok(Vmid(v as u32))
        } else {
            Err(ValueError::invalid(
                "vmid",
                format!("{v} is outside {}..={}", Self::MIN, Self::MAX),
            ))
        }
    }

    pub fn get(self) -> u32 {
        self.0
    }
}

impl TryFrom<u64> for Vmid {
    type Error = ValueError;
    fn try_from(v: u64) -> Result<Self, Self::Error> {
        Vmid::new(v)
    }
}

impl From<Vmid> for u32 {
    fn from(v: Vmid) -> u32 {
        v.0
    }
}

impl FromStr for Vmid {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || s.len() > 10 {
            return Err(ValueError::invalid(
                "vmid",
                format!("{} is not a number", shown(s)),
            ));
        }
        Vmid::new(
            s.parse::<u64>()
                .map_err(|e| ValueError::invalid("vmid", e.to_string()))?,
        )
    }
}

impl fmt::Display for Vmid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

bounded_u32!(
    /// Container memory in MiB (PVE's minimum is 16).
    MemoryMib, "memory_mib", 16, 4 * 1024 * 1024
);
bounded_u32!(
    /// Container swap in MiB.
    SwapMib, "swap_mib", 0, 4 * 1024 * 1024
);
bounded_u32!(
    /// CPU cores (PVE's `cores` range for containers is 1..=8192).
    Cores, "cores", 1, 8192
);
bounded_u32!(
    /// Root disk size in GiB.
    DiskSizeGib, "size_gib", 1, 64 * 1024
);

fn check_storage_id(s: &str) -> Result<(), &'static str> {
    // pve-storage-id: [a-z][a-z0-9\-\_\.]*[a-z0-9], case-insensitive.
    let b = s.as_bytes();
    if b.len() < 2 || b.len() > 64 {
        return Err("must be 2..=64 characters");
    }
    if !b[0].is_ascii_alphabetic() || !b[b.len() - 1].is_ascii_alphanumeric() {
        return Err("must start with a letter and end with a letter or digit");
    }
    if !b
        .iter()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
    {
        return Err("may only contain letters, digits, '-', '_' and '.'");
    }
    Ok(())
}

string_newtype!(
    /// A PVE storage id (`local`, `local-lvm`).
    StorageId, "storage", check_storage_id
);

const TEMPLATE_SUFFIXES: [&str; 5] = [".tar.gz", ".tar.xz", ".tar.zst", ".tar.bz2", ".tgz"];

fn check_volume_id(s: &str) -> Result<(), &'static str> {
    let Some((storage, rest)) = s.split_once(':') else {
        return Err("must look like storage:vztmpl/file");
    };
    check_storage_id(storage).map_err(|_| "has an invalid storage part")?;
    let Some(file) = rest.strip_prefix("vztmpl/") else {
        return Err("must be a container template (storage:vztmpl/file)");
    };
    let b = file.as_bytes();
    if b.is_empty() || b.len() > 200 {
        return Err("file name must be 1..=200 characters");
    }
    if !b[0].is_ascii_alphanumeric() {
        return Err("file name must start with a letter or digit");
    }
    if !b
        .iter()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b'+'))
    {
        return Err("file name may only contain letters, digits, '-', '_', '.' and '+'");
    }
    if file.contains("..") {
        return Err("file name must not contain '..'");
    }
    if !TEMPLATE_SUFFIXES.iter().any(|x| file.ends_with(x)) {
        return Err("file name must end in .tar.gz, .tar.xz, .tar.zst, .tar.bz2 or .tgz");
    }
    Ok(())
}

string_newtype!(
    /// A container template volume id: `storage:vztmpl/file`.
    VolumeId, "ostemplate", check_volume_id
);

fn check_hostname(s: &str) -> Result<(), &'static str> {
    if s.is_empty() || s.len() > 253 {
        return Err("must be 1..=253 characters");
    }
    for label in s.split('.') {
        let b = label.as_bytes();
        if b.is_empty() || b.len() > 63 {
            return Err("labels must be 1..=63 characters");
        }
        if !b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-') {
            return Err("may only contain ASCII letters, digits, '-' and '.'");
        }
        if b[0] == b'-' || b[b.len() - 1] == b'-' {
            return Err("labels must not start or end with '-'");
        }
    }
    Ok(())
}

string_newtype!(
    /// An RFC 1123 host name.
    Hostname, "hostname", check_hostname
);

fn check_mount_name(s: &str) -> Result<(), &'static str> {
    let b = s.as_bytes();
    if b.is_empty() || b.len() > 32 {
        return Err("must be 1..=32 characters");
    }
    if !(b[0].is_ascii_lowercase() || b[0].is_ascii_digit()) {
        return Err("must start with a-z or 0-9");
    }
    if !b
        .iter()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
    {
        return Err("may only contain a-z, 0-9 and '-'");
    }
    Ok(())
}

string_newtype!(
    /// The name of a managed USB mount: `[a-z0-9][a-z0-9-]{0,31}`; the mount point is
    /// `<mount_root>/<name>`.
    MountName, "name", check_mount_name
);

fn all_digits(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && s.bytes().all(|b| b.is_ascii_digit())
}

fn check_disk_device(s: &str) -> Result<(), &'static str> {
    const WHAT: &str = "must be a whole disk: sd[a-z]+, nvme<N>n<N> or nvme<N>";
    if let Some(rest) = s.strip_prefix("sd") {
        if !rest.is_empty() && rest.len() <= 4 && rest.bytes().all(|b| b.is_ascii_lowercase()) {
            return Ok(());
        }
        return Err(WHAT);
    }
    if let Some(rest) = s.strip_prefix("nvme") {
        let ok = match rest.split_once('n') {
            Some((ctrl, ns)) => all_digits(ctrl, 4) && all_digits(ns, 4),
            None => all_digits(rest, 4),
        };
        if ok {
            return Ok(());
        }
    }
    Err(WHAT)
}

string_newtype!(
    /// A whole disk for SMART: `sd[a-z]+`, `nvme\d+n\d+` or `nvme\d+` (kernel name, no
    /// `/dev/`).
    DiskDevice, "device", check_disk_device
);

impl DiskDevice {
    /// `/dev/<name>`.
    pub fn dev_path(&self) -> String {
        format!("/dev/{}", self.0)
    }
}

/// A kernel block device name as it appears directly in /dev (`sdb1`, `nvme0n1p1`,
/// `loop0`, `mmcblk0p1`): a lower-case letter, then lower-case letters and digits, ≤ 32.
pub fn is_kernel_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 32
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
}

/// The udev link directories a [`BlockDevicePath`] may name, below `/dev/disk/`.
pub const BLOCK_DEVICE_LINK_DIRS: [&str; 3] = ["by-id", "by-uuid", "by-path"];

/// One udev link name: 1..=200 bytes of `[A-Za-z0-9._:+@=-]`, not `.` or `..` (udev
/// replaces every other byte of a serial or a path with `_`).
pub fn is_udev_link_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 200
        && s != "."
        && s != ".."
        && s.bytes().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b':' | b'+' | b'@' | b'=')
        })
}

fn check_block_device_path(s: &str) -> Result<(), &'static str> {
    const WHAT: &str =
        "must be /dev/<kernel name> or /dev/disk/by-id|by-uuid|by-path/<udev link name>";
    if s.len() > 255 {
        return Err("must be at most 255 bytes");
    }
    let Some(rest) = s.strip_prefix("/dev/") else {
        return Err(WHAT);
    };
    if is_kernel_name(rest) {
        return Ok(());
    }
    let link = rest.strip_prefix("disk/").and_then(|r| {
        let (dir, name) = r.split_once('/')?;
        BLOCK_DEVICE_LINK_DIRS.contains(&dir).then_some(name)
    });
    match link {
        Some(name) if is_udev_link_name(name) => Ok(()),
        _ => Err(WHAT),
    }
}

string_newtype!(
    /// A block device as the agent names it: `/dev/<kernel name>` (`/dev/sdb1`) or a udev
    /// link `/dev/disk/by-{id,uuid,path}/<name>` (`/dev/disk/by-id/usb-…-part1`). Nothing
    /// else under /dev (no `/dev/shm/…`, no nested paths). The helper reads such a link
    /// itself (one `readlink`, which must land on `/dev/<kernel name>`) and re-checks
    /// what it lands on; it never resolves any other path.
    BlockDevicePath, "device", check_block_device_path
);

/// What a [`BlockDevicePath`] names, split.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockDeviceName<'a> {
    /// `/dev/<kernel name>`.
    Kernel(&'a str),
    /// `/dev/disk/<dir>/<link>`, `dir` one of [`BLOCK_DEVICE_LINK_DIRS`].
    Link { dir: &'a str, link: &'a str },
}

impl BlockDevicePath {
    /// Accepts a kernel name (`sdb1`) or a `/dev/…` path.
    pub fn parse_user(s: &str) -> Result<Self, ValueError> {
        if s.starts_with('/') {
            Self::new(s)
        } else {
            Self::new(format!("/dev/{s}"))
        }
    }

    /// The two accepted shapes, split (the constructor guarantees one of them).
    pub fn name(&self) -> BlockDeviceName<'_> {
        let rest = &self.0["/dev/".len()..];
        match rest.strip_prefix("disk/").and_then(|r| r.split_once('/')) {
            Some((dir, link)) if !is_kernel_name(rest) => BlockDeviceName::Link { dir, link },
            _ => BlockDeviceName::Kernel(rest),
        }
    }
}

fn check_bridge(s: &str) -> Result<(), &'static str> {
    let b = s.as_bytes();
    if b.is_empty() || b.len() > 15 {
        return Err("must be 1..=15 characters (IFNAMSIZ)");
    }
    if !b[0].is_ascii_alphabetic() {
        return Err("must start with a letter");
    }
    if !b
        .iter()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
    {
        return Err("may only contain letters, digits, '_', '.' and '-'");
    }
    Ok(())
}

string_newtype!(
    /// A Linux bridge name (`vmbr0`).
    BridgeName, "bridge", check_bridge
);

/// `ip=dhcp` or an address with prefix length.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum NetIp {
    Dhcp,
    Cidr { addr: IpAddr, prefix: u8 },
}

impl NetIp {
    pub fn new(s: &str) -> Result<Self, ValueError> {
        let err = |r: &str| ValueError::invalid("ip", format!("{} {r}", shown(s)));
        if s == "dhcp" {
            return Ok(NetIp::Dhcp);
        }
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| err("must be \"dhcp\" or ADDRESS/PREFIX"))?;
        if !p.bytes().all(|b| b.is_ascii_digit()) || p.is_empty() || p.len() > 3 {
            return Err(err("has an invalid prefix length"));
        }
        let addr: IpAddr = a.parse().map_err(|_| err("has an invalid address"))?;
        let prefix: u8 = p.parse().map_err(|_| err("has an invalid prefix length"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix == 0 || prefix > max {
            return Err(err("has a prefix length out of range"));
        }
        Ok(NetIp::Cidr { addr, prefix })
    }
}

impl TryFrom<String> for NetIp {
    type Error = ValueError;
    fn try_from(s: String) -> Result<Self, ValueError> {
        NetIp::new(&s)
    }
}

impl From<NetIp> for String {
    fn from(v: NetIp) -> String {
        v.to_string()
    }
}

impl fmt::Display for NetIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetIp::Dhcp => f.write_str("dhcp"),
            NetIp::Cidr { addr, prefix } => write!(f, "{addr}/{prefix}"),
        }
    }
}

/// A gateway address (serialized as text so JSON and bincode agree).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Gateway(IpAddr);

impl Gateway {
    pub fn new(s: &str) -> Result<Self, ValueError> {
        s.parse::<IpAddr>()
            .map(Gateway)
            .map_err(|_| ValueError::invalid("gw", format!("{} is not an IP address", shown(s))))
    }
    pub fn addr(self) -> IpAddr {
        self.0
    }
}

impl TryFrom<String> for Gateway {
    type Error = ValueError;
    fn try_from(s: String) -> Result<Self, ValueError> {
        Gateway::new(&s)
    }
}

impl From<Gateway> for String {
    fn from(v: Gateway) -> String {
        v.0.to_string()
    }
}

impl fmt::Display for Gateway {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

const SSH_KEY_TYPES: [&str; 7] = [
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
];

fn b64_value(c: u8) -> Option<u32> {
    Some(match c {
        b'A'..=b'Z' => (c - b'A') as u32,
        b'a'..=b'z' => (c - b'a') as u32 + 26,
        b'0'..=b'9' => (c - b'0') as u32 + 52,
        b'+' => 62,
        b'/' => 63,
        _ => return None,
    })
}

/// Decodes standard base64 (with padding). `None` on any malformed input.
fn b64_decode(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    if b.is_empty() || !b.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(b.len() / 4 * 3);
    for (i, chunk) in b.chunks(4).enumerate() {
        let last = i == b.len() / 4 - 1;
        let pad = chunk.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return None;
        }
        let mut n: u32 = 0;
        for &c in &chunk[..4 - pad] {
            n = (n << 6) | b64_value(c)?;
        }
        n <<= 6 * pad as u32;
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..3 - pad]);
    }
    Some(out)
}

fn check_ssh_key(s: &str) -> Result<(), &'static str> {
    if s.len() > 8192 {
        return Err("is longer than 8192 bytes");
    }
    if !s.bytes().all(|c| (0x20..0x7f).contains(&c)) {
        return Err("may only contain printable ASCII on one line");
    }
    let mut parts = s.splitn(3, ' ');
    let kind = parts.next().unwrap_or("");
    let blob = parts.next().unwrap_or("");
    let comment = parts.next().unwrap_or("");
    if !SSH_KEY_TYPES.contains(&kind) {
        return Err("has an unsupported key type");
    }
    let Some(raw) = b64_decode(blob) else {
        return Err("has a malformed base64 key blob");
    };
    // The blob starts with the key type as an SSH string: u32 length + bytes.
    if raw.len() < 4 + kind.len()
        || raw[..4] != (kind.len() as u32).to_be_bytes()
        || &raw[4..4 + kind.len()] != kind.as_bytes()
    {
        return Err("has a key blob that does not match its type");
    }
    if comment.len() > 256 {
        return Err("has a comment longer than 256 bytes");
    }
    Ok(())
}

string_newtype!(
    /// One OpenSSH public key line: `type base64 [comment]`, printable ASCII, no newline.
    SshPublicKey, "ssh_public_keys", check_ssh_key
);

/// A Linux filesystem type the USB operation accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fstype {
    Ext4,
    Xfs,
    Btrfs,
    Vfat,
    Exfat,
}

impl Fstype {
    pub const ALL: [Fstype; 5] = [
        Fstype::Ext4,
        Fstype::Xfs,
        Fstype::Btrfs,
        Fstype::Vfat,
        Fstype::Exfat,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Fstype::Ext4 => "ext4",
            Fstype::Xfs => "xfs",
            Fstype::Btrfs => "btrfs",
            Fstype::Vfat => "vfat",
            Fstype::Exfat => "exfat",
        }
    }
}

impl FromStr for Fstype {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, ValueError> {
        Fstype::ALL
            .into_iter()
            .find(|f| f.as_str() == s)
            .ok_or_else(|| {
                ValueError::invalid(
                    "fstype",
                    format!("{} is not one of ext4, xfs, btrfs, vfat, exfat", shown(s)),
                )
            })
    }
}

impl fmt::Display for Fstype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn check_fs_uuid(s: &str) -> Result<(), &'static str> {
    // ext4/xfs/btrfs: 8-4-4-4-12 hex; vfat/exfat: XXXX-XXXX.
    let b = s.as_bytes();
    if b.is_empty() || b.len() > 36 {
        return Err("must be 1..=36 characters");
    }
    if !b.iter().all(|c| c.is_ascii_hexdigit() || *c == b'-') || b[0] == b'-' {
        return Err("may only contain hex digits and '-'");
    }
    Ok(())
}

string_newtype!(
    /// A filesystem UUID as blkid prints it (hex and '-').
    FsUuid, "uuid", check_fs_uuid
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmid_range_is_pves() {
        assert!(Vmid::new(99).is_err());
        assert_eq!(Vmid::new(100).unwrap().get(), 100);
        assert_eq!(Vmid::new(999_999_999).unwrap().get(), 999_999_999);
        assert!(Vmid::new(1_000_000_000).is_err());
        assert!("0101x".parse::<Vmid>().is_err());
        assert!("".parse::<Vmid>().is_err());
        assert_eq!("101".parse::<Vmid>().unwrap().get(), 101);
    }

    #[test]
    fn vmid_decoding_validates() {
        assert!(serde_json::from_str::<Vmid>("42").is_err());
        assert_eq!(serde_json::from_str::<Vmid>("120").unwrap().get(), 120);
        assert_eq!(
            serde_json::to_string(&Vmid::new(120).unwrap()).unwrap(),
            "120"
        );
    }

    #[test]
    fn string_values_reject_hostile_input() {
        let hostile = [
            "",
            "..",
            "../etc",
            "a;rm -rf /",
            "a b",
            "a\0b",
            "a\nb",
            "$(id)",
            "`id`",
            "é",
            "a|b",
            "a&b",
            "-rf",
        ];
        for h in hostile {
            assert!(Hostname::new(h).is_err() || h == "-rf", "hostname {h:?}");
            assert!(MountName::new(h).is_err(), "mount name {h:?}");
            assert!(DiskDevice::new(h).is_err(), "disk {h:?}");
            assert!(BridgeName::new(h).is_err(), "bridge {h:?}");
            assert!(VolumeId::new(h).is_err(), "volume {h:?}");
            assert!(StorageId::new(h).is_err(), "storage {h:?}");
            assert!(SshPublicKey::new(h).is_err(), "ssh {h:?}");
        }
        assert!(Hostname::new("-rf").is_err());
        assert!(MountName::new("a".repeat(33)).is_err());
        assert!(MountName::new("a".repeat(32)).is_ok());
        assert!(MountName::new("Backup").is_err());
        assert!(MountName::new("-x").is_err());
        assert!(Hostname::new("web1").is_ok());
        assert!(Hostname::new("web1.example.org").is_ok());
        assert!(Hostname::new(format!("{}.x", "a".repeat(64))).is_err());
    }

    #[test]
    fn disk_devices() {
        for ok in ["sda", "sdab", "nvme0", "nvme0n1", "nvme12n3"] {
            assert!(DiskDevice::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "sda1",
            "sd",
            "nvme",
            "nvme0n",
            "nvme0n1p1",
            "loop0",
            "hda",
            "SDA",
            "sdé",
        ] {
            assert!(DiskDevice::new(bad).is_err(), "{bad}");
        }
        assert_eq!(DiskDevice::new("sdb").unwrap().dev_path(), "/dev/sdb");
    }

    #[test]
    fn block_device_paths() {
        assert!(BlockDevicePath::parse_user("sdb1").is_ok());
        for ok in [
            "/dev/sdb1",
            "/dev/nvme0n1p1",
            "/dev/loop7",
            "/dev/disk/by-id/usb-JMicron_0123-0:0-part1",
            "/dev/disk/by-uuid/0f3c1a9e-8d2b-4c1e-9a55-3b7d2e1f0a11",
            "/dev/disk/by-path/pci-0000:00:14.0-usb-0:1:1.0-scsi-0:0:0:0-part1",
        ] {
            assert!(BlockDevicePath::new(ok).is_ok(), "{ok}");
        }
        assert_eq!(
            BlockDevicePath::new("/dev/sdb1").unwrap().name(),
            BlockDeviceName::Kernel("sdb1")
        );
        assert_eq!(
            BlockDevicePath::new("/dev/disk/by-id/usb-X-part1")
                .unwrap()
                .name(),
            BlockDeviceName::Link {
                dir: "by-id",
                link: "usb-X-part1"
            }
        );
        for bad in [
            "/dev/../etc/shadow",
            "/etc/passwd",
            "/dev/",
            "/dev//sda",
            "/dev/sd a",
            "/dev/x;y",
            // Anywhere else under /dev, e.g. where any user can plant a symlink.
            "/dev/shm/x",
            "/dev/mqueue/x",
            "/dev/disk/by-id",
            "/dev/disk/by-label/backup",
            "/dev/disk/by-partuuid/x",
            "/dev/disk/by-id/a/b",
            "/dev/disk/by-id/..",
            "/dev/disk/by-id/.",
            "/dev/mapper/x",
            "/dev/dm-0",
            "/dev/SDB1",
            "/dev/1sda",
        ] {
            assert!(BlockDevicePath::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn volume_ids() {
        assert!(VolumeId::new("local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst").is_ok());
        for bad in [
            "local:iso/x.iso",
            "local:vztmpl/../x.tar.gz",
            "local:vztmpl/x",
            "local:vztmpl/sub/x.tar.gz",
            "/var/lib/vz/x.tar.gz",
            "local:vztmpl/-x.tar.gz",
        ] {
            assert!(VolumeId::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn net_values() {
        assert_eq!(NetIp::new("dhcp").unwrap(), NetIp::Dhcp);
        assert_eq!(
            NetIp::new("192.0.2.10/24").unwrap().to_string(),
            "192.0.2.10/24"
        );
        assert!(NetIp::new("2001:db8::5/64").is_ok());
        for bad in [
            "192.0.2.10",
            "192.0.2.10/33",
            "192.0.2.10/0",
            "x/24",
            "dhcp6",
            "1.2.3.4/24,gw=1",
        ] {
            assert!(NetIp::new(bad).is_err(), "{bad}");
        }
        assert!(Gateway::new("192.0.2.1").is_ok());
        assert!(Gateway::new("192.0.2.1,x").is_err());
    }

    #[test]
    fn ssh_keys() {
        // 32 zero bytes as the ed25519 key; blob = string "ssh-ed25519" + string key.
        let mut raw = Vec::new();
        raw.extend_from_slice(&11u32.to_be_bytes());
        raw.extend_from_slice(b"ssh-ed25519");
        raw.extend_from_slice(&32u32.to_be_bytes());
        raw.extend_from_slice(&[7u8; 32]);
        let b64 = b64_encode(&raw);
        let line = format!("ssh-ed25519 {b64} user@host");
        assert!(SshPublicKey::new(line.clone()).is_ok());
        assert!(SshPublicKey::new(format!("ssh-rsa {b64} user@host")).is_err());
        assert!(SshPublicKey::new(format!("{line}\nssh-ed25519 {b64}")).is_err());
        assert!(SshPublicKey::new("ssh-ed25519 AAAA user@host").is_err());
    }

    fn b64_encode(data: &[u8]) -> String {
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for c in data.chunks(3) {
            let n = (c[0] as u32) << 16
                | (*c.get(1).unwrap_or(&0) as u32) << 8
                | *c.get(2).unwrap_or(&0) as u32;
            for i in 0..4 {
                if i <= c.len() {
                    out.push(T[(n >> (18 - 6 * i)) as usize & 63] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    #[test]
    fn fstypes() {
        assert_eq!("ext4".parse::<Fstype>().unwrap(), Fstype::Ext4);
        assert!("ntfs".parse::<Fstype>().is_err());
        assert!("EXT4".parse::<Fstype>().is_err());
    }
}
