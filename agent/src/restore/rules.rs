//! Pure rules over a guest's config for a restore test: which keys reach outside the guest,
//! how a network interface is detached, what the scratch guest's disks need on the target
//! storage. No I/O here.

use serde_json::Value;

use crate::proxmox::{GuestConfig, GuestKind};

/// The text of a config value (PVE sends most as strings, some as numbers).
fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `prefix` followed by digits only (`net0`, `mp12`).
fn numbered(key: &str, prefix: &str) -> bool {
    key.strip_prefix(prefix)
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// The network interface keys (`netN`), sorted.
pub fn net_keys(cfg: &GuestConfig) -> Vec<String> {
    let mut keys: Vec<String> = cfg
        .raw()
        .keys()
        .filter(|k| numbered(k, "net"))
        .cloned()
        .collect();
    keys.sort();
    keys
}

/// `value` with `link_down=1` (any earlier `link_down` replaced). `drop_mac` removes the
/// MAC address (`hwaddr=` for LXC; for QEMU the `model=MAC` first item becomes `model`),
/// for a restore override where `unique=1` is to choose a new one.
pub fn detached(kind: GuestKind, value: &str, drop_mac: bool) -> String {
    let mut out: Vec<String> = Vec::new();
    for (i, part) in value.split(',').enumerate() {
        let part = part.trim();
        if part.is_empty() || part.starts_with("link_down=") {
            continue;
        }
        if drop_mac {
            match kind {
                GuestKind::Lxc if part.starts_with("hwaddr=") => continue,
                GuestKind::Qemu if i == 0 => {
                    // `virtio=BC:24:11:..` or `model=virtio,macaddr=..`.
                    if let Some((model, _mac)) = part.split_once('=')
                        && model != "model"
                    {
                        out.push(model.to_string());
                        continue;
                    }
                }
                GuestKind::Qemu if part.starts_with("macaddr=") => continue,
                _ => {}
            }
        }
        out.push(part.to_string());
    }
    out.push("link_down=1".to_string());
    out.join(",")
}

/// True when the interface value carries `link_down=1`.
pub fn is_detached(value: &str) -> bool {
    value.split(',').any(|p| p.trim() == "link_down=1")
}

/// Why a config key reaches outside the guest, or `None`. LXC: a mount point whose
/// volume is a host path (bind) or device, `devN`, `hookscript`; QEMU: `hostpciN`,
/// `usbN`, `serialN`, `parallelN`, `virtiofsN` (a host directory), a disk or CD drive
/// that is a host path (a passed-through block device: the scratch guest would write to
/// the real guest's disk), `args` (raw QEMU arguments), `hookscript`. Raw `lxc.*` lines
/// are checked separately.
pub fn reaches_outside(kind: GuestKind, key: &str, value: &Value) -> Option<String> {
    if key == "hookscript" {
        return Some("a hook script runs on the host".to_string());
    }
    match kind {
        GuestKind::Lxc => {
            if numbered(key, "mp") {
                let v = text(value);
                let volume = v.split(',').next().unwrap_or("").trim();
                let volume = volume.strip_prefix("volume=").unwrap_or(volume);
                if volume.starts_with("/dev/") {
                    return Some(format!("a device mount point ({volume})"));
                }
                if volume.starts_with('/') {
                    return Some(format!("a bind mount point ({volume})"));
                }
                None
            } else if numbered(key, "dev") {
                Some("a host device passed through".to_string())
            } else {
                None
            }
        }
        GuestKind::Qemu => {
            if numbered(key, "hostpci") {
                Some("a host PCI device passed through".to_string())
            } else if numbered(key, "usb") {
                Some("a host USB device passed through".to_string())
            } else if numbered(key, "serial") {
                Some("a host serial port".to_string())
            } else if numbered(key, "parallel") {
                Some("a host parallel port".to_string())
            } else if numbered(key, "virtiofs") {
                Some("a host directory shared in (virtiofs)".to_string())
            } else if key == "args" {
                Some("raw QEMU arguments".to_string())
            } else if ["scsi", "virtio", "sata", "ide"]
                .iter()
                .any(|p| numbered(key, p))
            {
                let v = text(value);
                let volume = v.split(',').next().unwrap_or("").trim();
                let volume = volume.strip_prefix("file=").unwrap_or(volume);
                volume
                    .starts_with('/')
                    .then(|| format!("a host block device or file passed through ({volume})"))
            } else {
                None
            }
        }
    }
}

/// The keys of `cfg` that reach outside the guest, with why, sorted by key.
pub fn outside_keys(kind: GuestKind, cfg: &GuestConfig) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = cfg
        .raw()
        .iter()
        .filter_map(|(k, v)| reaches_outside(kind, k, v).map(|why| (k.clone(), why)))
        .collect();
    out.sort();
    out
}

/// Why this guest cannot be restore-tested at all, judged from its config before the
/// restore: its data would be missing (a bind or device mount point holds it, and PVE
/// refuses to restore one for a token anyway).
pub fn cannot_test(kind: GuestKind, cfg: &GuestConfig) -> Option<String> {
    if kind != GuestKind::Lxc {
        return None;
    }
    outside_keys(kind, cfg)
        .into_iter()
        .find(|(k, _)| numbered(k, "mp"))
        .map(|(k, why)| {
            format!(
                "{k} is {why}: its data is not in the backup and a restore through the API cannot recreate it"
            )
        })
}

/// A disk size as PVE writes it (`8G`, `512M`, `100K`, `1T`, bare bytes).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 1u64 << 10),
        b'M' | b'm' => (&s[..s.len() - 1], 1 << 20),
        b'G' | b'g' => (&s[..s.len() - 1], 1 << 30),
        b'T' | b't' => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(mult);
    }
    let f: f64 = num.parse().ok()?;
    (f.is_finite() && f >= 0.0).then_some((f * mult as f64) as u64)
}

/// The bytes the guest's storage-backed disks take (what a restore allocates on the
/// target storage): `rootfs`/`mpN` volumes for LXC; `scsiN`, `virtioN`, `sataN`, `ideN`,
/// `efidisk0`, `tpmstate0` for QEMU (CD-ROMs and host paths not counted).
pub fn disk_bytes(kind: GuestKind, cfg: &GuestConfig) -> u64 {
    let is_disk = |k: &str| match kind {
        GuestKind::Lxc => k == "rootfs" || numbered(k, "mp"),
        GuestKind::Qemu => {
            ["scsi", "virtio", "sata", "ide"]
                .iter()
                .any(|p| numbered(k, p))
                || k == "efidisk0"
                || k == "tpmstate0"
        }
    };
    cfg.raw()
        .iter()
        .filter(|(k, _)| is_disk(k))
        .map(|(_, v)| text(v))
        .filter(|v| {
            let volume = v.split(',').next().unwrap_or("").trim();
            let volume = volume
                .strip_prefix("file=")
                .or_else(|| volume.strip_prefix("volume="))
                .unwrap_or(volume);
            !volume.starts_with('/') && volume != "none" && !v.contains("media=cdrom")
        })
        .filter_map(|v| {
            v.split(',')
                .find_map(|p| p.trim().strip_prefix("size="))
                .and_then(parse_size)
        })
        .fold(0u64, u64::saturating_add)
}

/// True when the QEMU config enables the guest agent (`agent: 1` or `enabled=1,…`).
pub fn agent_enabled(cfg: &GuestConfig) -> bool {
    let Some(v) = cfg.get("agent") else {
        return false;
    };
    let v = text(v);
    v.split(',').any(|p| {
        let p = p.trim();
        p == "1" || p == "enabled=1"
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg(v: Value) -> GuestConfig {
        match v {
            Value::Object(m) => GuestConfig::from_raw(m),
            _ => unreachable!(),
        }
    }

    #[test]
    fn interfaces_are_detached_with_or_without_their_mac() {
        let lxc = "name=eth0,bridge=vmbr0,hwaddr=BC:24:11:00:00:01,ip=dhcp,link_down=0";
        assert_eq!(
            detached(GuestKind::Lxc, lxc, true),
            "name=eth0,bridge=vmbr0,ip=dhcp,link_down=1"
        );
        assert_eq!(
            detached(GuestKind::Lxc, lxc, false),
            "name=eth0,bridge=vmbr0,hwaddr=BC:24:11:00:00:01,ip=dhcp,link_down=1"
        );
        let vm = "virtio=BC:24:11:00:00:02,bridge=vmbr0,firewall=1";
        assert_eq!(
            detached(GuestKind::Qemu, vm, true),
            "virtio,bridge=vmbr0,firewall=1,link_down=1"
        );
        assert_eq!(
            detached(
                GuestKind::Qemu,
                "model=e1000,macaddr=BC:24:11:00:00:03",
                true
            ),
            "model=e1000,link_down=1"
        );
        assert!(is_detached(&detached(GuestKind::Qemu, vm, false)));
        assert!(!is_detached(vm));
        assert!(!is_detached("virtio,link_down=0"));
    }

    #[test]
    fn what_reaches_outside_the_guest() {
        let c = cfg(json!({
            "rootfs": "local-lvm:vm-101-disk-0,size=8G",
            "mp0": "/srv/data,mp=/data",
            "mp1": "local-lvm:vm-101-disk-1,mp=/x,size=2G",
            "mp2": "/dev/sdb1,mp=/dev-mount",
            "dev0": "/dev/ttyUSB0",
            "hookscript": "local:snippets/hook.pl",
            "net0": "name=eth0,bridge=vmbr0",
        }));
        let keys: Vec<String> = outside_keys(GuestKind::Lxc, &c)
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, ["dev0", "hookscript", "mp0", "mp2"]);
        assert!(
            cannot_test(GuestKind::Lxc, &c)
                .unwrap()
                .starts_with("mp0 is a bind mount")
        );
        assert_eq!(disk_bytes(GuestKind::Lxc, &c), 10 << 30);
        assert_eq!(net_keys(&c), ["net0"]);

        let vm = cfg(json!({
            "scsi0": "local-lvm:vm-103-disk-0,size=32G",
            "ide2": "local:iso/x.iso,media=cdrom",
            "efidisk0": "local-lvm:vm-103-disk-1,size=4M",
            "hostpci0": "0000:01:00.0",
            "usb1": "host=1234:5678",
            "serial0": "socket",
            "net1": "virtio=BC:24:11:00:00:02,bridge=vmbr0",
            "agent": "enabled=1,fstrim_cloned_disks=1",
            "scsi1": "/dev/disk/by-id/ata-WDC_WD40-XYZ,backup=0,size=3726G",
            "sata0": "file=/dev/sdc,size=1T",
            "ide0": "none,media=cdrom",
            "ide3": "/dev/cdrom,media=cdrom",
            "virtiofs0": "dirid=share,cache=auto",
            "parallel0": "/dev/parport0",
            "args": "-drive file=/dev/sda,if=virtio",
        }));
        let keys: Vec<String> = outside_keys(GuestKind::Qemu, &vm)
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(
            keys,
            [
                "args",
                "hostpci0",
                "ide3",
                "parallel0",
                "sata0",
                "scsi1",
                "serial0",
                "usb1",
                "virtiofs0"
            ]
        );
        assert!(cannot_test(GuestKind::Qemu, &vm).is_none());
        assert_eq!(disk_bytes(GuestKind::Qemu, &vm), (32 << 30) + (4 << 20));
        assert!(agent_enabled(&vm));
        assert!(!agent_enabled(&cfg(json!({"agent": "0"}))));
        assert!(agent_enabled(&cfg(json!({"agent": 1}))));
        assert!(!agent_enabled(&cfg(json!({}))));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("8G"), Some(8 << 30));
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("1.5G"), Some(3 << 29));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("xG"), None);
    }
}
