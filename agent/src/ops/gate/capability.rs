//! Which undo point a gated operation can make, decided before anything is sent.
//!
//! Owns the pure decision from a guest's config, the node's storage list and (for a
//! rollback) the guest's snapshots, after `API-NOTES.md` section 11:
//! - a snapshot is possible iff every volume (`rootfs`, `mpN`, `scsiN`, `virtioN`, `sataN`,
//!   `ideN`, `efidisk0`, `tpmstate0`; CD-ROMs and `none` ignored) sits on a storage whose
//!   type can snapshot that volume's format (`zfspool`, `lvmthin`, `rbd`, `zfs`, `btrfs`:
//!   any; `dir`, `nfs`, `cifs`, `glusterfs`: only `.qcow2` images, so never a container;
//!   `lvm`, `iscsi` and anything unknown: no) and no container mount point is a bind or
//!   device mount (a host path instead of `storage:volume`);
//! - a backup captures the guest entirely unless a container has a bind/device mount point
//!   or a volume mount point without `backup=1`, or a VM disk says `backup=0` (vzdump skips
//!   those);
//! - a rollback's undo point is a snapshot when one is possible and no volume is on
//!   `zfspool` (ZFS rolls back only to the most recent snapshot, which the undo snapshot
//!   would then be), else a backup to `gate.backup_storage` when it captures everything,
//!   else none.
//!
//! Must never: talk to Proxmox or the journal; guess for a storage the node does not list
//! (an unknown storage can not snapshot).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::proxmox::{GuestKind, SnapshotItem, StorageItem};

/// Why a decision could not even be made from the inputs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapabilityError {
    #[error("snapshot {0:?} does not exist on this guest")]
    NoSuchSnapshot(String),
    #[error("config key {key} has a value that is not text: {value}")]
    NotText { key: String, value: String },
}

/// The kind of undo point, as results and the journal name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UndoKind {
    Snapshot,
    Backup,
    PreviousValues,
}

impl UndoKind {
    pub fn as_str(self) -> &'static str {
        match self {
            UndoKind::Snapshot => "snapshot",
            UndoKind::Backup => "backup",
            UndoKind::PreviousValues => "previous_values",
        }
    }
}

/// The undo point an operation will make, or why none can be made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "undo_kind", rename_all = "snake_case")]
pub enum Plan {
    /// A snapshot of the current state named `name`.
    Snapshot { name: String },
    /// A backup of the guest to `storage`.
    Backup { storage: String },
    /// None can be made; `why` says what stands in the way.
    None { why: String },
}

/// What a storage type can snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StorageType {
    /// Snapshots of every format.
    Any,
    /// Snapshots of `qcow2` images only (file-based storages).
    Qcow2Only,
    /// No snapshots.
    Never,
}

impl StorageType {
    fn of(t: &str) -> StorageType {
        match t {
            "zfspool" | "lvmthin" | "rbd" | "zfs" | "btrfs" => StorageType::Any,
            "dir" | "nfs" | "cifs" | "glusterfs" => StorageType::Qcow2Only,
            _ => StorageType::Never,
        }
    }
}

/// One disk or mount point of a guest config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Volume {
    /// The config key (`rootfs`, `mp0`, `scsi1`, ...).
    pub key: String,
    /// `Some(storage id)` for `storage:volume`; `None` for a host path (bind or device).
    pub storage: Option<String>,
    /// The volume (after `storage:`) or the host path.
    pub volume: String,
    /// The image format: `format=` when given, else the volume name's extension.
    pub qcow2: bool,
    /// `backup=1` (containers' volume mount points) / not `backup=0` (VM disks).
    pub backed_up: bool,
}

fn is_disk_key(kind: GuestKind, key: &str) -> bool {
    let numbered = |prefix: &str| {
        key.strip_prefix(prefix)
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    };
    match kind {
        GuestKind::Lxc => key == "rootfs" || numbered("mp"),
        GuestKind::Qemu => {
            key == "efidisk0"
                || key == "tpmstate0"
                || ["scsi", "virtio", "sata", "ide"]
                    .iter()
                    .any(|p| numbered(p))
        }
    }
}

/// The volumes of a guest config, in key order. CD-ROM drives and `none` are left out.
pub fn volumes(
    kind: GuestKind,
    config: &Map<String, Value>,
) -> Result<Vec<Volume>, CapabilityError> {
    let mut out = Vec::new();
    for (key, value) in config {
        if !is_disk_key(kind, key) {
            continue;
        }
        let text = value.as_str().ok_or_else(|| CapabilityError::NotText {
            key: key.clone(),
            value: value.to_string(),
        })?;
        let mut parts = text.split(',');
        let first = parts.next().unwrap_or("").trim();
        let opts: Vec<(&str, &str)> = parts
            .filter_map(|p| p.split_once('='))
            .map(|(k, v)| (k.trim(), v.trim()))
            .collect();
        let opt = |name: &str| opts.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
        // A VM's `file=` may be spelled out.
        let first = if first.contains('=') {
            first.split_once('=').map(|(_, v)| v).unwrap_or(first)
        } else {
            first
        };
        if kind == GuestKind::Qemu && (first == "none" || opt("media") == Some("cdrom")) {
            continue;
        }
        let (storage, volume) = if first.starts_with('/') {
            (None, first.to_string())
        } else {
            match first.split_once(':') {
                Some((s, v)) => (Some(s.to_string()), v.to_string()),
                None => (None, first.to_string()),
            }
        };
        let qcow2 = match opt("format") {
            Some(f) => f == "qcow2",
            None => volume.ends_with(".qcow2"),
        };
        let flag = |v: Option<&str>| v.map(|v| matches!(v, "1" | "yes" | "true" | "on"));
        let backed_up = match kind {
            GuestKind::Lxc if key == "rootfs" => true,
            GuestKind::Lxc => storage.is_some() && flag(opt("backup")).unwrap_or(false),
            GuestKind::Qemu => flag(opt("backup")).unwrap_or(true),
        };
        out.push(Volume {
            key: key.clone(),
            storage,
            volume,
            qcow2,
            backed_up,
        });
    }
    Ok(out)
}

/// `Ok(())` when a snapshot of the whole guest is possible, else why not.
pub fn snapshot_possible(
    kind: GuestKind,
    vols: &[Volume],
    storages: &[StorageItem],
) -> Result<(), String> {
    for v in vols {
        let Some(sid) = &v.storage else {
            return Err(format!(
                "{} is a bind or device mount ({}), which cannot be snapshotted",
                v.key, v.volume
            ));
        };
        let Some(st) = storages.iter().find(|s| &s.storage == sid) else {
            return Err(format!(
                "{} is on storage {sid}, which this node does not list",
                v.key
            ));
        };
        let t = st.storage_type.as_str();
        match StorageType::of(t) {
            StorageType::Any => {}
            StorageType::Qcow2Only if kind == GuestKind::Qemu && v.qcow2 => {}
            StorageType::Qcow2Only => {
                return Err(format!(
                    "{} is on {sid} ({t}), which snapshots only qcow2 images of VMs",
                    v.key
                ));
            }
            StorageType::Never => {
                return Err(format!(
                    "{} is on {sid} ({t}), which cannot snapshot",
                    v.key
                ));
            }
        }
    }
    Ok(())
}

/// `Ok(())` when a backup captures every volume, else what it would leave out.
pub fn backup_complete(vols: &[Volume]) -> Result<(), String> {
    let missed: Vec<String> = vols
        .iter()
        .filter(|v| !v.backed_up)
        .map(|v| match &v.storage {
            None => format!("{} (bind or device mount {})", v.key, v.volume),
            Some(_) => format!("{} (excluded from backups)", v.key),
        })
        .collect();
    if missed.is_empty() {
        Ok(())
    } else {
        Err(format!("a backup would not capture {}", missed.join(", ")))
    }
}

/// The deterministic name of an operation's undo snapshot: `felhom-undo-<12 hex of op_id>`.
pub fn undo_snapshot_name(op_id: &str) -> String {
    let hex: String = op_id.chars().take(12).collect();
    format!("felhom-undo-{hex}")
}

fn on_zfspool(vols: &[Volume], storages: &[StorageItem]) -> Option<String> {
    vols.iter().find_map(|v| {
        let sid = v.storage.as_ref()?;
        storages
            .iter()
            .any(|s| &s.storage == sid && s.storage_type == "zfspool")
            .then(|| format!("{} is on {sid} (zfspool), where only the most recent snapshot can be rolled back to", v.key))
    })
}

fn backup_or_none(vols: &[Volume], backup_storage: Option<&str>, before: Option<String>) -> Plan {
    let prefix = before.map(|b| format!("{b}; ")).unwrap_or_default();
    match (backup_complete(vols), backup_storage) {
        (Ok(()), Some(s)) => Plan::Backup {
            storage: s.to_string(),
        },
        (Ok(()), None) => Plan::None {
            why: format!("{prefix}no gate.backup_storage is configured for an undo backup"),
        },
        (Err(why), _) => Plan::None {
            why: format!("{prefix}{why}"),
        },
    }
}

/// The undo point of a rollback of the guest to `target`.
pub fn for_rollback(
    kind: GuestKind,
    config: &Map<String, Value>,
    storages: &[StorageItem],
    snapshots: &[SnapshotItem],
    target: &str,
    op_id: &str,
    backup_storage: Option<&str>,
) -> Result<Plan, CapabilityError> {
    if !snapshots
        .iter()
        .any(|s| !s.is_current() && s.name == target)
    {
        return Err(CapabilityError::NoSuchSnapshot(target.to_string()));
    }
    let vols = volumes(kind, config)?;
    let why_not = match snapshot_possible(kind, &vols, storages) {
        Ok(()) => match on_zfspool(&vols, storages) {
            None => {
                return Ok(Plan::Snapshot {
                    name: undo_snapshot_name(op_id),
                });
            }
            Some(z) => z,
        },
        Err(e) => e,
    };
    Ok(backup_or_none(&vols, backup_storage, Some(why_not)))
}

/// The undo point of a force-restore over the guest, and of a destroy: a backup, when it
/// captures everything.
pub fn for_backup(
    kind: GuestKind,
    config: &Map<String, Value>,
    backup_storage: Option<&str>,
) -> Result<Plan, CapabilityError> {
    let vols = volumes(kind, config)?;
    Ok(backup_or_none(&vols, backup_storage, None))
}

/// `protection: 1` in a config.
pub fn protected(config: &Map<String, Value>) -> bool {
    match config.get("protection") {
        Some(Value::Number(n)) => n.as_u64() == Some(1),
        Some(Value::String(s)) => s == "1",
        Some(Value::Bool(b)) => *b,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn storages() -> Vec<StorageItem> {
        [
            ("local", "dir"),
            ("local-lvm", "lvmthin"),
            ("tank", "zfspool"),
            ("ceph", "rbd"),
            ("zfs-iscsi", "zfs"),
            ("bt", "btrfs"),
            ("nas", "nfs"),
            ("smb", "cifs"),
            ("gluster", "glusterfs"),
            ("thick", "lvm"),
            ("san", "iscsi"),
            ("nas-backup", "nfs"),
            ("pbs", "pbs"),
        ]
        .iter()
        .map(|(id, t)| {
            serde_json::from_value(json!({"storage": id, "type": t, "content": "images,rootdir"}))
                .unwrap()
        })
        .collect()
    }

    fn snaps(names: &[&str]) -> Vec<SnapshotItem> {
        names
            .iter()
            .chain(std::iter::once(&"current"))
            .map(|n| serde_json::from_value(json!({"name": n})).unwrap())
            .collect()
    }

    fn cfg(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    const OP: &str = "0123456789abcdef0123456789abcdef";

    fn rollback(kind: GuestKind, c: Value) -> Plan {
        for_rollback(
            kind,
            &cfg(c),
            &storages(),
            &snaps(&["before"]),
            "before",
            OP,
            Some("nas-backup"),
        )
        .unwrap()
    }

    fn snapshot() -> Plan {
        Plan::Snapshot {
            name: "felhom-undo-0123456789ab".into(),
        }
    }

    fn backup() -> Plan {
        Plan::Backup {
            storage: "nas-backup".into(),
        }
    }

    #[test]
    fn every_storage_type_for_a_container_rootfs() {
        for (sid, want) in [
            ("local-lvm", snapshot()),
            ("ceph", snapshot()),
            ("zfs-iscsi", snapshot()),
            ("bt", snapshot()),
            // zfspool can snapshot, but the undo snapshot would hide the target: backup.
            ("tank", backup()),
            // file storages snapshot only qcow2, which containers never use.
            ("local", backup()),
            ("nas", backup()),
            ("smb", backup()),
            ("gluster", backup()),
            ("thick", backup()),
            ("san", backup()),
            ("unknown-store", backup()),
        ] {
            let got = rollback(
                GuestKind::Lxc,
                json!({"rootfs": format!("{sid}:subvol-101-disk-0,size=8G"), "memory": 512}),
            );
            assert_eq!(got, want, "{sid}");
        }
    }

    #[test]
    fn a_vm_on_a_file_storage_snapshots_only_with_qcow2() {
        for (disk, want) in [
            ("local:101/vm-101-disk-0.qcow2,size=32G", snapshot()),
            ("nas:101/vm-101-disk-0.qcow2,size=32G", snapshot()),
            ("local:101/vm-101-disk-0.raw,size=32G", backup()),
            ("local:101/vm-101-disk-0.vmdk,size=32G", backup()),
            ("local:101/vm-101-disk-0.raw,format=qcow2", snapshot()),
            ("thick:vm-101-disk-0,size=32G", backup()),
            ("local-lvm:vm-101-disk-0,size=32G", snapshot()),
            ("tank:vm-101-disk-0,size=32G", backup()),
        ] {
            let got = rollback(
                GuestKind::Qemu,
                json!({"scsi0": disk, "ide2": "local:iso/debian.iso,media=cdrom", "memory": 2048}),
            );
            assert_eq!(got, want, "{disk}");
        }
    }

    #[test]
    fn every_vm_disk_key_counts_and_cdroms_do_not() {
        let base = json!({"scsi0": "local-lvm:vm-101-disk-0", "ide2": "none,media=cdrom",
            "sata3": "local:iso/x.iso,media=cdrom", "ide0": "none"});
        assert_eq!(rollback(GuestKind::Qemu, base.clone()), snapshot());
        for key in ["virtio1", "sata0", "ide1", "efidisk0", "tpmstate0", "scsi7"] {
            let mut c = base.clone();
            c[key] = json!("thick:vm-101-disk-9,size=4M");
            assert_eq!(rollback(GuestKind::Qemu, c), backup(), "{key}");
        }
        // Not disks: net, unused, a key that only looks numbered.
        let mut c = base;
        c["net0"] = json!("virtio=AA:BB:CC:DD:EE:FF,bridge=vmbr0");
        c["unused0"] = json!("thick:vm-101-disk-5");
        c["scsihw"] = json!("virtio-scsi-pci");
        assert_eq!(rollback(GuestKind::Qemu, c), snapshot());
    }

    #[test]
    fn bind_and_device_mounts_make_a_container_unsnapshottable_and_a_backup_incomplete() {
        for mp in ["/srv/data,mp=/data", "/dev/sdb1,mp=/mnt/usb"] {
            let got = rollback(
                GuestKind::Lxc,
                json!({"rootfs": "local-lvm:vm-101-disk-0,size=8G", "mp0": mp}),
            );
            let Plan::None { why } = got else {
                panic!("{mp}: {got:?}")
            };
            assert!(
                why.contains("mp0") && why.contains("bind or device"),
                "{why}"
            );
            assert!(why.contains("would not capture"), "{why}");
        }
        // A container on dir with a bind mount: neither snapshot nor complete backup.
        let got = rollback(
            GuestKind::Lxc,
            json!({"rootfs": "local:101/vm-101-disk-0.raw,size=8G", "mp1": "/srv/x,mp=/x"}),
        );
        assert!(matches!(got, Plan::None { .. }), "{got:?}");
    }

    #[test]
    fn a_backup_is_complete_only_when_every_volume_is_in_it() {
        // A container's volume mount point is backed up only with backup=1.
        let c = json!({"rootfs": "local:101/vm-101-disk-0.raw", "mp0": "local:101/vm-101-disk-1.raw,mp=/d"});
        assert!(matches!(rollback(GuestKind::Lxc, c), Plan::None { .. }));
        let c = json!({"rootfs": "local:101/vm-101-disk-0.raw", "mp0": "local:101/vm-101-disk-1.raw,mp=/d,backup=1"});
        assert_eq!(rollback(GuestKind::Lxc, c), backup());
        // A VM disk with backup=0 is left out.
        let c = json!({"scsi0": "thick:vm-101-disk-0", "scsi1": "thick:vm-101-disk-1,backup=0"});
        assert!(matches!(rollback(GuestKind::Qemu, c), Plan::None { .. }));
        // Snapshots do not care about backup=0.
        let c = json!({"scsi0": "local-lvm:vm-101-disk-0", "scsi1": "local-lvm:vm-101-disk-1,backup=0"});
        assert_eq!(rollback(GuestKind::Qemu, c), snapshot());
        // Without a backup storage there is no backup to fall back on.
        let got = for_rollback(
            GuestKind::Lxc,
            &cfg(json!({"rootfs": "local:101/vm-101-disk-0.raw"})),
            &storages(),
            &snaps(&["before"]),
            "before",
            OP,
            None,
        )
        .unwrap();
        let Plan::None { why } = got else { panic!() };
        assert!(why.contains("backup_storage"), "{why}");
    }

    #[test]
    fn force_restore_and_destroy_need_a_complete_backup() {
        let ok = cfg(json!({"rootfs": "tank:subvol-101-disk-0"}));
        assert_eq!(
            for_backup(GuestKind::Lxc, &ok, Some("nas-backup")).unwrap(),
            backup()
        );
        let bind = cfg(json!({"rootfs": "tank:subvol-101-disk-0", "mp0": "/srv,mp=/srv"}));
        assert!(matches!(
            for_backup(GuestKind::Lxc, &bind, Some("nas-backup")).unwrap(),
            Plan::None { .. }
        ));
    }

    #[test]
    fn a_rollback_target_must_exist_and_current_is_not_one() {
        let c = cfg(json!({"rootfs": "local-lvm:vm-101-disk-0"}));
        for target in ["missing", "current"] {
            assert_eq!(
                for_rollback(
                    GuestKind::Lxc,
                    &c,
                    &storages(),
                    &snaps(&["before"]),
                    target,
                    OP,
                    None
                ),
                Err(CapabilityError::NoSuchSnapshot(target.into()))
            );
        }
        let bad = cfg(json!({"rootfs": 5}));
        assert!(matches!(
            for_rollback(
                GuestKind::Lxc,
                &bad,
                &storages(),
                &snaps(&["before"]),
                "before",
                OP,
                None
            ),
            Err(CapabilityError::NotText { .. })
        ));
    }

    #[test]
    fn protection_and_the_undo_snapshot_name() {
        assert!(protected(&cfg(json!({"protection": 1}))));
        assert!(protected(&cfg(json!({"protection": "1"}))));
        assert!(!protected(&cfg(json!({"protection": 0}))));
        assert!(!protected(&cfg(json!({}))));
        assert_eq!(undo_snapshot_name(OP), "felhom-undo-0123456789ab");
        assert!(crate::proxmox::SnapshotName::new(undo_snapshot_name(OP)).is_ok());
    }
}
