//! Guests (containers and VMs): their configuration as PVE stores it, pending changes,
//! snapshots, run state, and the JSON views the API serves.
//!
//! Owns: the config-file round trip (description as `#` comment lines, sorted keys,
//! `[pve:pending]` and snapshot sections), the SHA-1 digest of that text, the typing of
//! config values in JSON (integers as numbers, booleans as 0/1, `number` as strings), and
//! the list/status objects. Must never: emit `null` for an unset key (unset = absent).

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use super::schema::{self, Fmt, Ty};
use super::version::PveVersion;

/// Container or VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Lxc,
    Qemu,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Lxc => "lxc",
            Kind::Qemu => "qemu",
        }
    }
    /// `CT` or `VM`, as in `CT 101 already running`.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Lxc => "CT",
            Kind::Qemu => "VM",
        }
    }
    /// The config directory in `/etc/pve/nodes/<node>/`.
    pub fn conf_dir(self) -> &'static str {
        match self {
            Kind::Lxc => "lxc",
            Kind::Qemu => "qemu-server",
        }
    }
}

/// HA resource state of a guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ha {
    /// `started` or `stopped`.
    pub state: String,
}

/// One snapshot.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The copied config (including `parent` when the guest had one).
    pub conf: BTreeMap<String, String>,
    pub snaptime: u64,
    /// Stored description (comment-encoded round trip applied, ends in `\n`).
    pub description: Option<String>,
    /// `prepare` while being taken, `delete` while being removed.
    pub snapstate: Option<&'static str>,
    pub vmstate: bool,
    /// Creation order (ZFS orders a dataset's snapshots by creation, finer than
    /// `snaptime`'s seconds): see [`next_snapshot_order`].
    pub order: u64,
}

/// A process-wide increasing number for each snapshot taken.
pub fn next_snapshot_order() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// A guest.
#[derive(Debug, Clone)]
pub struct Guest {
    pub vmid: u32,
    pub kind: Kind,
    /// Applied config. `description` is stored in its read-back form.
    pub conf: BTreeMap<String, String>,
    /// Raw `lxc.*` lines (containers only).
    pub raw_lxc: Vec<(String, String)>,
    pub pending: BTreeMap<String, String>,
    pub pending_delete: Vec<String>,
    pub snapshots: BTreeMap<String, Snapshot>,
    pub running: bool,
    pub ha: Option<Ha>,
    /// Epoch seconds when it last started.
    pub started_at: u64,
    pub pid: u32,
    pub digest: String,
    /// Control flag: its start tasks fail (as a guest that does not boot).
    pub start_fails: bool,
    /// Control flag (VMs): its QEMU guest agent never answers.
    pub agent_fails: bool,
    /// Control flag: after each start it stops on its own this many seconds later (a
    /// guest that boots and then dies).
    pub stops_after_seconds: Option<f64>,
    /// When the running guest stops on its own (set at start from the flag above).
    pub stops_at: Option<std::time::Instant>,
    /// Control flag: the next config change (PUT/POST config) stops it if it runs, as a
    /// change that breaks a guest would; cleared once it has acted.
    pub stops_after_config_change: bool,
}

/// How a config value is typed in JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JsonTy {
    Int,
    Bool,
    Str,
}

const LXC_INT: &[&str] = &["cores", "cpuunits", "memory", "swap", "tty", "snaptime"];
const LXC_BOOL: &[&str] = &[
    "onboot",
    "template",
    "console",
    "protection",
    "unprivileged",
    "debug",
];
const QEMU_INT: &[&str] = &[
    "cores",
    "sockets",
    "memory",
    "balloon",
    "vcpus",
    "cpuunits",
    "shares",
    "snaptime",
    "migrate_downtime",
];
const QEMU_BOOL: &[&str] = &[
    "onboot",
    "template",
    "protection",
    "numa",
    "kvm",
    "acpi",
    "tablet",
    "localtime",
    "reboot",
    "freeze",
];

/// The JSON type of config key `key` for `kind`.
pub fn json_ty(kind: Kind, key: &str) -> JsonTy {
    let (ints, bools) = match kind {
        Kind::Lxc => (LXC_INT, LXC_BOOL),
        Kind::Qemu => (QEMU_INT, QEMU_BOOL),
    };
    if ints.contains(&key) {
        JsonTy::Int
    } else if bools.contains(&key) {
        JsonTy::Bool
    } else {
        JsonTy::Str
    }
}

/// A config value in JSON, typed the way PVE's `check_type` leaves it.
pub fn typed(kind: Kind, key: &str, value: &str) -> Value {
    match json_ty(kind, key) {
        JsonTy::Int | JsonTy::Bool => value
            .parse::<i64>()
            .map(Value::from)
            .unwrap_or_else(|_| Value::String(value.to_owned())),
        JsonTy::Str => Value::String(value.to_owned()),
    }
}

/// PVE's `encode_text`: control characters, bytes ≥ 0x80, `%` and `:` percent-encoded.
pub fn encode_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if !(0x20..0x7f).contains(&b) || b == b'%' || b == b':' {
            out.push_str(&format!("%{b:02X}"));
        } else {
            out.push(b as char);
        }
    }
    out
}

/// The description as PVE gives it back after storing it as `#` lines: trailing empty
/// lines dropped, every line with `\n`. `None` when nothing is left.
pub fn normalize_description(s: &str) -> Option<String> {
    let mut lines: Vec<&str> = s.split('\n').collect();
    while lines.last().is_some_and(|l| l.is_empty()) {
        lines.pop();
    }
    if lines.is_empty() {
        return None;
    }
    Some(lines.iter().map(|l| format!("{l}\n")).collect())
}

/// PVE's `get_unique_tags`: split, lower-case, sort, de-duplicate, join by `;`.
pub fn normalize_tags(s: &str) -> String {
    let mut tags: Vec<String> = schema::split_list(s)
        .into_iter()
        .map(|t| t.to_lowercase())
        .collect();
    tags.sort();
    tags.dedup();
    tags.join(";")
}

/// A fresh locally administered MAC with PVE's default prefix `BC:24:11`.
pub fn random_mac(rng: &mut fastrand::Rng) -> String {
    format!(
        "BC:24:11:{:02X}:{:02X}:{:02X}",
        rng.u8(..),
        rng.u8(..),
        rng.u8(..)
    )
}

/// Re-prints a container `netX` value canonically, adding `type=veth` and a generated
/// `hwaddr` when missing (`parse_lxc_network` + `print_lxc_network`).
pub fn canonical_lxc_net(
    value: &str,
    key: &str,
    rng: &mut fastrand::Rng,
) -> Result<String, String> {
    let mut m = schema::parse_propstr(&schema::LXC_NET, value, key)?;
    m.insert("type".to_owned(), "veth".to_owned());
    if !m.contains_key("hwaddr") {
        m.insert("hwaddr".to_owned(), random_mac(rng));
    }
    Ok(schema::print_propstr(&schema::LXC_NET, &m))
}

/// Re-prints a VM `netX` value canonically with a generated MAC when missing.
pub fn canonical_qemu_net(
    value: &str,
    key: &str,
    rng: &mut fastrand::Rng,
) -> Result<String, String> {
    let mut m = schema::parse_propstr(&schema::QEMU_NET, value, key)?;
    if !m.contains_key("macaddr") {
        m.insert("macaddr".to_owned(), random_mac(rng));
    }
    Ok(schema::print_propstr(&schema::QEMU_NET, &m))
}

/// Parses a size like `8G`, `512M`, `100K`, `1T` or plain bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let (num, mult) = match s.chars().last()? {
        'K' | 'k' => (&s[..s.len() - 1], 1u64 << 10),
        'M' | 'm' => (&s[..s.len() - 1], 1 << 20),
        'G' | 'g' => (&s[..s.len() - 1], 1 << 30),
        'T' | 't' => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    if let Ok(n) = num.parse::<u64>() {
        return Some(n * mult);
    }
    num.parse::<f64>().ok().map(|f| (f * mult as f64) as u64)
}

/// The `size=` of a volume property string, in bytes.
pub fn volume_size(value: &str) -> Option<u64> {
    value
        .split(',')
        .find_map(|p| p.strip_prefix("size="))
        .and_then(parse_size)
}

/// The volume id (first part) of a disk/mount-point property string.
pub fn volume_of(value: &str) -> Option<&str> {
    let first = value.split(',').next()?;
    let first = first.strip_prefix("volume=").unwrap_or(first);
    schema::parse_volume_id(first).map(|_| first)
}

/// Whether `key` is a disk of `kind` (rootfs/mpN or a QEMU drive).
pub fn is_disk_key(kind: Kind, key: &str) -> bool {
    let num = |p: &str| {
        key.strip_prefix(p)
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    };
    match kind {
        Kind::Lxc => key == "rootfs" || num("mp"),
        Kind::Qemu => {
            num("scsi")
                || num("virtio")
                || num("sata")
                || num("ide")
                || key == "efidisk0"
                || key == "tpmstate0"
        }
    }
}

/// The storage-backed disks of a config: `(key, storage, volume name, size)`; bind and
/// device mount points (host paths) and CD-ROMs are not volumes and are left out.
pub fn config_disks(
    kind: Kind,
    conf: &BTreeMap<String, String>,
) -> Vec<(String, String, String, u64)> {
    let mut disks = conf
        .iter()
        .filter(|(k, v)| is_disk_key(kind, k) && !v.contains("media=cdrom"))
        .filter_map(|(k, v)| {
            let volid = volume_of(v)?;
            let (sid, name) = schema::parse_volume_id(volid)?;
            Some((
                k.clone(),
                sid.to_owned(),
                name.to_owned(),
                volume_size(v).unwrap_or(0),
            ))
        })
        .collect::<Vec<_>>();
    // The root disk first: PVE numbers a container's disks from its rootfs (stable sort).
    disks.sort_by_key(|d| d.0 != "rootfs");
    disks
}

/// Whether key is `<prefix><digits>`.
pub fn is_indexed(key: &str, prefix: &str) -> bool {
    key.strip_prefix(prefix)
        .is_some_and(|n| !n.is_empty() && n.len() <= 3 && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The LXC config schema (`json_config_properties`), for PUT config and create.
pub fn lxc_key_ty(key: &str) -> Option<Ty> {
    const LOCKS: &[&str] = &[
        "backup",
        "create",
        "destroyed",
        "disk",
        "fstrim",
        "migrate",
        "mounted",
        "rollback",
        "snapshot",
        "snapshot-delete",
    ];
    const OSTYPES: &[&str] = &[
        "debian",
        "devuan",
        "ubuntu",
        "centos",
        "fedora",
        "opensuse",
        "archlinux",
        "alpine",
        "gentoo",
        "nixos",
        "unmanaged",
    ];
    Some(match key {
        "arch" => Ty::Enum(&["amd64", "i386", "arm64", "armhf", "riscv32", "riscv64"]),
        "cmode" => Ty::Enum(&["shell", "console", "tty"]),
        "console" | "debug" | "onboot" | "protection" | "template" | "unprivileged" => Ty::Bool,
        "cores" => Ty::int(1, 8192),
        "cpulimit" => Ty::Num {
            min: Some(0.0),
            max: Some(8192.0),
        },
        "cpuunits" => Ty::int(0, 500_000),
        "description" => Ty::Str {
            fmt: Fmt::None,
            max_len: Some(8192),
        },
        "features" => Ty::fmt(Fmt::Features),
        "hookscript" => Ty::fmt(Fmt::VolumeId),
        "hostname" => Ty::Str {
            fmt: Fmt::DnsName,
            max_len: Some(255),
        },
        "lock" => Ty::Enum(LOCKS),
        "memory" => Ty::int_min(16),
        "nameserver" => Ty::fmt(Fmt::IpList),
        "ostype" => Ty::Enum(OSTYPES),
        "rootfs" => Ty::str(),
        "searchdomain" => Ty::fmt(Fmt::DnsNameList),
        "startup" => Ty::fmt(Fmt::Startup),
        "swap" => Ty::int_min(0),
        "tags" => Ty::fmt(Fmt::TagList),
        "timezone" => Ty::str(),
        "tty" => Ty::int(0, 6),
        "entrypoint" | "env" => Ty::str(),
        k if is_indexed(k, "net") => Ty::fmt(Fmt::LxcNet),
        k if is_indexed(k, "mp") || is_indexed(k, "unused") || is_indexed(k, "dev") => Ty::str(),
        _ => return None,
    })
}

/// The QEMU config schema (the subset the simulator models), for PUT/POST config.
pub fn qemu_key_ty(key: &str) -> Option<Ty> {
    Some(match key {
        "name" => Ty::fmt(Fmt::DnsName),
        "description" => Ty::Str {
            fmt: Fmt::None,
            max_len: Some(8192),
        },
        "onboot" | "protection" | "template" | "numa" | "kvm" | "acpi" | "tablet" | "localtime"
        | "reboot" | "freeze" => Ty::Bool,
        "cores" => Ty::int(1, 1024),
        "sockets" => Ty::int(1, 16),
        "vcpus" => Ty::int(1, 16384),
        "memory" => Ty::str(),
        "balloon" => Ty::int_min(0),
        "shares" => Ty::int(0, 50000),
        "cpuunits" => Ty::int(1, 262_144),
        "cpulimit" => Ty::Num {
            min: Some(0.0),
            max: Some(128.0),
        },
        "cpu" | "boot" | "bootdisk" | "agent" | "scsihw" | "machine" | "bios" | "vga"
        | "smbios1" | "vmgenid" | "meta" | "args" | "hookscript" | "affinity"
        | "vmstatestorage" | "serial0" | "audio0" => Ty::str(),
        "ostype" => Ty::Enum(&[
            "other", "wxp", "w2k", "w2k3", "w2k8", "wvista", "win7", "win8", "win10", "win11",
            "l24", "l26", "solaris",
        ]),
        "tags" => Ty::fmt(Fmt::TagList),
        "startup" => Ty::fmt(Fmt::Startup),
        "lock" => Ty::Enum(&[
            "backup",
            "clone",
            "create",
            "migrate",
            "rollback",
            "snapshot",
            "snapshot-delete",
            "suspending",
            "suspended",
        ]),
        k if is_indexed(k, "net") => Ty::fmt(Fmt::QemuNet),
        k if is_disk_key(Kind::Qemu, k)
            || is_indexed(k, "unused")
            || is_indexed(k, "usb")
            || is_indexed(k, "hostpci")
            || is_indexed(k, "ipconfig") =>
        {
            Ty::str()
        }
        "ciuser" | "cipassword" | "sshkeys" | "nameserver" | "searchdomain" | "citype" => Ty::str(),
        _ => return None,
    })
}

fn render_section(out: &mut String, conf: &BTreeMap<String, String>, extra: &[(&str, String)]) {
    if let Some(d) = conf.get("description") {
        for line in d.strip_suffix('\n').unwrap_or(d).split('\n') {
            out.push('#');
            out.push_str(&encode_text(line));
            out.push('\n');
        }
    }
    let mut all: BTreeMap<&str, &str> = conf
        .iter()
        .filter(|(k, _)| k.as_str() != "description")
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    for (k, v) in extra {
        all.insert(k, v);
    }
    for (k, v) in all {
        out.push_str(k);
        out.push_str(": ");
        out.push_str(v);
        out.push('\n');
    }
}

impl Guest {
    /// The config file text, as `write_pct_config` / `write_vm_config` would write it.
    pub fn render_conf(&self) -> String {
        let mut out = String::with_capacity(512);
        render_section(&mut out, &self.conf, &[]);
        for (k, v) in &self.raw_lxc {
            out.push_str(&format!("{k}: {v}\n"));
        }
        if !self.pending.is_empty() || !self.pending_delete.is_empty() {
            out.push_str(match self.kind {
                Kind::Lxc => "\n[pve:pending]\n",
                Kind::Qemu => "\n[PENDING]\n",
            });
            let mut extra = Vec::new();
            if !self.pending_delete.is_empty() {
                extra.push(("delete", self.pending_delete.join(",")));
            }
            render_section(&mut out, &self.pending, &extra);
        }
        for (name, snap) in &self.snapshots {
            out.push_str(&format!("\n[{name}]\n"));
            let mut conf = snap.conf.clone();
            if let Some(d) = &snap.description {
                conf.insert("description".to_owned(), d.clone());
            } else {
                conf.remove("description");
            }
            let mut extra = vec![("snaptime", snap.snaptime.to_string())];
            if let Some(s) = snap.snapstate {
                extra.push(("snapstate", s.to_owned()));
            }
            if snap.vmstate {
                extra.push((
                    "vmstate",
                    format!("local-lvm:vm-{}-state-{name}", self.vmid),
                ));
            }
            render_section(&mut out, &conf, &extra);
        }
        out
    }

    /// Recomputes the digest; call after every write (PVE's digest changes on any write).
    pub fn touch(&mut self) {
        let text = self.render_conf();
        let d = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, text.as_bytes());
        self.digest = hex::encode(d.as_ref());
    }

    pub fn lock(&self) -> Option<&str> {
        self.conf.get("lock").map(String::as_str)
    }

    pub fn is_template(&self) -> bool {
        self.conf.get("template").is_some_and(|v| v == "1")
    }

    /// `CT is locked (backup)` when locked.
    pub fn check_lock(&self) -> Result<(), String> {
        match self.lock() {
            Some(l) => Err(format!("{} is locked ({l})", self.kind.label())),
            None => Ok(()),
        }
    }

    /// The config with pending values merged (default) or only applied ones.
    pub fn merged_conf(&self, current: bool) -> BTreeMap<String, String> {
        let mut c = self.conf.clone();
        if !current {
            for (k, v) in &self.pending {
                c.insert(k.clone(), v.clone());
            }
            for k in &self.pending_delete {
                c.remove(k);
            }
        }
        c
    }

    /// `GET .../config`.
    pub fn config_json(&self, current: bool) -> Value {
        let mut m = Map::new();
        for (k, v) in self.merged_conf(current) {
            m.insert(k.clone(), typed(self.kind, &k, &v));
        }
        m.insert("digest".to_owned(), Value::String(self.digest.clone()));
        if !self.raw_lxc.is_empty() {
            m.insert(
                "lxc".to_owned(),
                Value::Array(self.raw_lxc.iter().map(|(k, v)| json!([k, v])).collect()),
            );
        }
        Value::Object(m)
    }

    /// `GET .../config?snapshot=<name>`.
    pub fn snapshot_config_json(&self, snap: &Snapshot) -> Value {
        let mut m = Map::new();
        for (k, v) in &snap.conf {
            m.insert(k.clone(), typed(self.kind, k, v));
        }
        if let Some(d) = &snap.description {
            m.insert("description".to_owned(), Value::String(d.clone()));
        }
        m.insert("snaptime".to_owned(), json!(snap.snaptime));
        if let Some(s) = snap.snapstate {
            m.insert("snapstate".to_owned(), json!(s));
        }
        m.insert("digest".to_owned(), Value::String(self.digest.clone()));
        Value::Object(m)
    }

    /// `GET .../pending`.
    pub fn pending_json(&self) -> Value {
        let mut keys: Vec<&String> = self.conf.keys().chain(self.pending.keys()).collect();
        keys.extend(self.pending_delete.iter());
        keys.sort();
        keys.dedup();
        let mut out = Vec::new();
        for k in keys {
            let mut m = Map::new();
            m.insert("key".to_owned(), json!(k));
            if let Some(v) = self.conf.get(k) {
                m.insert("value".to_owned(), typed(self.kind, k, v));
            }
            if let Some(v) = self.pending.get(k) {
                m.insert("pending".to_owned(), typed(self.kind, k, v));
            }
            if self.pending_delete.contains(k) {
                m.insert("delete".to_owned(), json!(1));
            }
            out.push(Value::Object(m));
        }
        Value::Array(out)
    }

    /// The snapshot list with `current` last (callers shuffle the others).
    pub fn snapshot_list_json(&self) -> Vec<Value> {
        let mut out = Vec::new();
        for (name, s) in &self.snapshots {
            let mut m = Map::new();
            m.insert("name".to_owned(), json!(name));
            m.insert(
                "description".to_owned(),
                json!(s.description.clone().unwrap_or_default()),
            );
            m.insert("snaptime".to_owned(), json!(s.snaptime));
            if let Some(p) = s.conf.get("parent") {
                m.insert("parent".to_owned(), json!(p));
            }
            if let Some(st) = s.snapstate {
                m.insert("snapstate".to_owned(), json!(st));
            }
            if self.kind == Kind::Qemu && s.vmstate {
                m.insert("vmstate".to_owned(), json!(1));
            }
            out.push(Value::Object(m));
        }
        out
    }

    pub fn current_snapshot_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("name".to_owned(), json!("current"));
        m.insert("description".to_owned(), json!("You are here!"));
        m.insert("digest".to_owned(), json!(self.digest));
        m.insert("running".to_owned(), json!(u8::from(self.running)));
        if let Some(p) = self.conf.get("parent") {
            m.insert("parent".to_owned(), json!(p));
        }
        Value::Object(m)
    }

    fn conf_int(&self, key: &str) -> Option<u64> {
        self.conf.get(key).and_then(|v| v.parse().ok())
    }

    /// Memory in MiB (LXC default 512; QEMU default 2048, `memory` may be `current=N`).
    pub fn memory_mib(&self) -> u64 {
        match self.kind {
            Kind::Lxc => self.conf_int("memory").unwrap_or(512),
            Kind::Qemu => self
                .conf
                .get("memory")
                .and_then(|v| {
                    v.strip_prefix("current=")
                        .unwrap_or(v)
                        .split(',')
                        .next()?
                        .parse()
                        .ok()
                })
                .unwrap_or(2048),
        }
    }

    pub fn name(&self) -> String {
        match self.kind {
            Kind::Lxc => self
                .conf
                .get("hostname")
                .map(|h| h.split_whitespace().collect::<String>())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| format!("CT{}", self.vmid)),
            Kind::Qemu => self
                .conf
                .get("name")
                .cloned()
                .unwrap_or_else(|| format!("VM{}", self.vmid)),
        }
    }

    fn max_disk(&self) -> u64 {
        match self.kind {
            Kind::Lxc => self
                .conf
                .get("rootfs")
                .and_then(|r| volume_size(r))
                .unwrap_or(4 << 30),
            Kind::Qemu => self
                .conf
                .iter()
                .filter(|(k, v)| is_disk_key(Kind::Qemu, k) && !v.contains("media=cdrom"))
                .filter_map(|(_, v)| volume_size(v))
                .next()
                .unwrap_or(0),
        }
    }

    fn cpus(&self) -> Value {
        match self.kind {
            Kind::Lxc => {
                if let Some(l) = self
                    .conf
                    .get("cpulimit")
                    .and_then(|c| c.parse::<f64>().ok())
                    && l > 0.0
                {
                    if l.fract() == 0.0 {
                        return json!(l as u64);
                    }
                    return json!(l);
                }
                json!(self.conf_int("cores").unwrap_or(8))
            }
            Kind::Qemu => {
                json!(self.conf_int("cores").unwrap_or(1) * self.conf_int("sockets").unwrap_or(1))
            }
        }
    }

    /// Deterministic per-guest noise for counters.
    fn noise(&self, salt: u64) -> u64 {
        let mut x = (self.vmid as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ salt.wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x ^= x >> 31;
        x
    }

    /// The list item (`GET /nodes/{node}/lxc|qemu`).
    pub fn list_json(&self, version: PveVersion, now: u64) -> Map<String, Value> {
        let mut m = Map::new();
        let maxmem = self.memory_mib() << 20;
        let uptime = if self.running {
            now.saturating_sub(self.started_at)
        } else {
            0
        };
        m.insert(
            "status".to_owned(),
            json!(if self.running { "running" } else { "stopped" }),
        );
        m.insert("name".to_owned(), json!(self.name()));
        m.insert("cpus".to_owned(), self.cpus());
        m.insert("maxmem".to_owned(), json!(maxmem));
        m.insert("maxdisk".to_owned(), json!(self.max_disk()));
        m.insert("uptime".to_owned(), json!(uptime));
        if self.running {
            let mem = maxmem / 16 + self.noise(1) % (maxmem / 8).max(1);
            let cpu = (130 + self.noise(2) % 10_000) as f64 / 1_000_000.0;
            m.insert("cpu".to_owned(), json!(cpu));
            m.insert("mem".to_owned(), json!(mem));
            let io = uptime.max(1);
            m.insert(
                "netin".to_owned(),
                json!(io * (1000 + self.noise(3) % 5000)),
            );
            m.insert("netout".to_owned(), json!(io * (100 + self.noise(4) % 900)));
            m.insert(
                "diskread".to_owned(),
                json!(io * (2000 + self.noise(5) % 9000)),
            );
            m.insert(
                "diskwrite".to_owned(),
                json!(io * (500 + self.noise(6) % 4000)),
            );
            m.insert("pid".to_owned(), json!(self.pid));
        } else {
            for k in ["mem", "netin", "netout", "diskread", "diskwrite"] {
                m.insert(k.to_owned(), json!(0));
            }
            m.insert("cpu".to_owned(), json!(0));
        }
        match self.kind {
            Kind::Lxc => {
                let vmid = if version.lxc_list_vmid_is_string() {
                    json!(self.vmid.to_string())
                } else {
                    json!(self.vmid)
                };
                m.insert("vmid".to_owned(), vmid);
                m.insert("type".to_owned(), json!("lxc"));
                m.insert(
                    "maxswap".to_owned(),
                    json!(self.conf_int("swap").unwrap_or(512) << 20),
                );
                m.insert("swap".to_owned(), json!(0));
                let disk = if self.running {
                    self.max_disk() / 7 + self.noise(7) % (1 << 28)
                } else {
                    0
                };
                m.insert("disk".to_owned(), json!(disk));
                if self.running && version.lxc_has_pressure_fields() {
                    for (i, k) in [
                        "pressurecpusome",
                        "pressurecpufull",
                        "pressureiosome",
                        "pressureiofull",
                        "pressurememorysome",
                        "pressurememoryfull",
                    ]
                    .iter()
                    .enumerate()
                    {
                        let v = (self.noise(20 + i as u64) % 300) as f64 / 100.0;
                        m.insert((*k).to_owned(), json!(v));
                    }
                }
            }
            Kind::Qemu => {
                m.insert("vmid".to_owned(), json!(self.vmid));
                m.insert("disk".to_owned(), json!(0));
            }
        }
        if let Some(t) = self.conf.get("tags") {
            m.insert("tags".to_owned(), json!(t));
        }
        if let Some(l) = self.lock() {
            m.insert("lock".to_owned(), json!(l));
        }
        if self.is_template() {
            m.insert("template".to_owned(), json!(1));
        }
        m
    }

    /// `GET .../status/current`.
    pub fn status_json(&self, version: PveVersion, now: u64) -> Value {
        let mut m = self.list_json(version, now);
        m.insert("vmid".to_owned(), json!(self.vmid));
        let ha = match &self.ha {
            Some(h) => json!({"managed": 1, "state": h.state}),
            None => json!({"managed": 0}),
        };
        m.insert("ha".to_owned(), ha);
        if self.kind == Kind::Qemu {
            m.insert(
                "qmpstatus".to_owned(),
                json!(if self.running { "running" } else { "stopped" }),
            );
            if let Some(a) = self.conf.get("agent") {
                let enabled = a.split(',').any(|p| p == "1" || p == "enabled=1");
                m.insert("agent".to_owned(), json!(u8::from(enabled)));
            }
            if self.running {
                let maxmem = self.memory_mib() << 20;
                let (qemu, machine) = version.qemu();
                m.insert("running-qemu".to_owned(), json!(qemu));
                m.insert("running-machine".to_owned(), json!(machine));
                m.insert("balloon".to_owned(), json!(maxmem));
                m.insert("balloon_min".to_owned(), json!(maxmem));
                m.insert("shares".to_owned(), json!(1000));
                let free = maxmem / 3;
                m.insert("freemem".to_owned(), json!(free));
                m.insert(
                    "ballooninfo".to_owned(),
                    json!({"actual": maxmem, "max_mem": maxmem, "free_mem": free, "total_mem": maxmem - (1 << 26),
                           "major_page_faults": 1811, "minor_page_faults": 3_803_793, "mem_swapped_in": 0,
                           "mem_swapped_out": 0, "last_update": now}),
                );
                let mut blockstat = Map::new();
                for (k, v) in &self.conf {
                    if is_disk_key(Kind::Qemu, k) {
                        let rd = self.noise(30) % (1 << 30);
                        blockstat.insert(
                            k.clone(),
                            json!({"rd_bytes": rd, "wr_bytes": rd / 2, "rd_operations": rd / 4096,
                                   "wr_operations": rd / 8192, "flush_operations": 100, "failed_rd_operations": 0,
                                   "failed_wr_operations": 0, "account_failed": true, "account_invalid": true,
                                   "idle_time_ns": 4_427_685_914u64, "timed_stats": [],
                                   "wr_highest_offset": volume_size(v).unwrap_or(0) / 4}),
                        );
                    }
                }
                m.insert("blockstat".to_owned(), Value::Object(blockstat));
                let mut nics = Map::new();
                for k in self.conf.keys().filter(|k| is_indexed(k, "net")) {
                    let idx = &k[3..];
                    nics.insert(
                        format!("tap{}i{idx}", self.vmid),
                        json!({"netin": self.noise(31) % (1 << 30), "netout": self.noise(32) % (1 << 26)}),
                    );
                }
                m.insert("nics".to_owned(), Value::Object(nics));
                m.insert(
                    "proxmox-support".to_owned(),
                    json!({"pbs-dirty-bitmap": true, "pbs-dirty-bitmap-migration": true,
                           "pbs-dirty-bitmap-savevm": true, "query-bitmap-info": true, "pbs-masterkey": true,
                           "backup-max-workers": true, "pbs-library-version": "1.4.1 (UNKNOWN)"}),
                );
            }
        }
        Value::Object(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_disks_lists_volumes_root_first_without_bind_mounts_or_cdroms() {
        let conf: BTreeMap<String, String> = [
            ("mp0", "local-lvm:vm-101-disk-1,mp=/data,size=2G"),
            ("mp1", "/srv/share,mp=/share"),
            ("rootfs", "local-lvm:vm-101-disk-0,size=8G"),
            ("memory", "512"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let d = config_disks(Kind::Lxc, &conf);
        let keys: Vec<&str> = d.iter().map(|x| x.0.as_str()).collect();
        assert_eq!(keys, ["rootfs", "mp0"]);
        assert_eq!(d[0].1, "local-lvm");
        assert_eq!((d[0].2.as_str(), d[0].3), ("vm-101-disk-0", 8 << 30));
        let vm: BTreeMap<String, String> = [
            ("ide2", "none,media=cdrom"),
            ("scsi0", "local-lvm:vm-103-disk-0,iothread=1,size=32G"),
            ("efidisk0", "local-lvm:vm-103-disk-1,efitype=4m,size=4M"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let keys: Vec<String> = config_disks(Kind::Qemu, &vm)
            .into_iter()
            .map(|x| x.0)
            .collect();
        assert_eq!(keys, ["efidisk0", "scsi0"]);
    }

    #[test]
    fn description_round_trip() {
        assert_eq!(normalize_description("hello").as_deref(), Some("hello\n"));
        assert_eq!(normalize_description("a\n\nb").as_deref(), Some("a\n\nb\n"));
        assert_eq!(normalize_description("a\n\n\n").as_deref(), Some("a\n"));
        assert_eq!(normalize_description("\n\n"), None);
        assert_eq!(normalize_description("x\r").as_deref(), Some("x\r\n"));
        assert_eq!(encode_text("é: 50%\r"), "%C3%A9%3A 50%25%0D");
    }

    #[test]
    fn tags_are_split_lowercased_sorted_deduplicated() {
        assert_eq!(normalize_tags("Web,prod"), "prod;web");
        assert_eq!(normalize_tags("b a;b  C"), "a;b;c");
    }

    #[test]
    fn lxc_net_gets_type_and_a_generated_uppercase_mac() {
        let mut rng = fastrand::Rng::with_seed(1);
        let n = canonical_lxc_net(
            "bridge=vmbr0,ip=dhcp,name=eth0,firewall=yes",
            "net0",
            &mut rng,
        )
        .unwrap();
        assert!(
            n.starts_with("name=eth0,bridge=vmbr0,firewall=1,hwaddr=BC:24:11:"),
            "{n}"
        );
        assert!(n.ends_with(",ip=dhcp,type=veth"), "{n}");
        let mac = n
            .split(',')
            .find_map(|p| p.strip_prefix("hwaddr="))
            .unwrap();
        assert_eq!(mac, mac.to_uppercase());
        let kept =
            canonical_lxc_net("name=eth0,hwaddr=bc:24:11:aa:bb:cc", "net0", &mut rng).unwrap();
        assert_eq!(kept, "name=eth0,hwaddr=bc:24:11:aa:bb:cc,type=veth");
    }

    #[test]
    fn sizes() {
        assert_eq!(
            volume_size("local-lvm:vm-101-disk-0,size=8G"),
            Some(8 << 30)
        );
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(
            volume_of("local-lvm:vm-101-disk-0,size=8G"),
            Some("local-lvm:vm-101-disk-0")
        );
        assert_eq!(volume_of("/mnt/foo,mp=/x"), None);
    }
}
