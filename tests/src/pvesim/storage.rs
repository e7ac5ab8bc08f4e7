//! Storages and the volumes the simulator tracks on them (backups and templates), and
//! the space guest disks made by the simulator (restores) take there.
//! Owns the storage list, content JSON, space accounting and which volumes can be
//! snapshotted (by storage type and image format); guest disks are named in guest
//! configs. Must never: let the reported `used` exceed `total`.

use serde_json::{Map, Value, json};

/// One storage.
#[derive(Debug, Clone)]
pub struct Storage {
    pub id: String,
    /// `dir`, `lvmthin`, `zfspool`, `nfs`, …
    pub stype: &'static str,
    pub content: Vec<&'static str>,
    /// Filesystem path for file-based storages.
    pub path: Option<String>,
    pub shared: bool,
    pub active: bool,
    pub enabled: bool,
    pub total: u64,
    /// Space taken by what the simulator does not track (seeded guests' disks, other
    /// files); the reported `used` adds the volumes and allocated disks below.
    pub used: u64,
    pub volumes: Vec<Volume>,
    /// Guest disks the simulator allocated here (restores): volume name → bytes.
    pub allocated: std::collections::BTreeMap<String, u64>,
}

/// A volume listed by the content endpoint.
#[derive(Debug, Clone)]
pub struct Volume {
    pub volid: String,
    /// `backup`, `vztmpl`, `iso`.
    pub content: &'static str,
    pub format: String,
    pub size: u64,
    pub ctime: u64,
    /// For backups: owner vmid and `lxc`/`qemu`.
    pub vmid: Option<u32>,
    pub subtype: Option<&'static str>,
    pub notes: Option<String>,
    pub protected: bool,
    /// The guest config recorded in a backup (for restore).
    pub backup_conf: Option<BackupConf>,
    /// PBS storages only: the last verify job's result.
    pub verification: Option<Verification>,
    /// Control flag: the archive's data is damaged, a restore from it fails.
    pub corrupt: bool,
    /// Control flag: a guest restored from this archive fails to start.
    pub start_fails: bool,
    /// Control flag: the QEMU guest agent of a VM restored from this archive never answers.
    pub agent_fails: bool,
    /// Control flag: a guest restored from this archive stops on its own this many
    /// seconds after each start.
    pub stops_after_seconds: Option<f64>,
}

/// A PBS backup's last verification, as PBS reports it and PVE passes it on.
#[derive(Debug, Clone)]
pub struct Verification {
    /// `ok` or `failed`.
    pub state: &'static str,
    /// The PBS verify task.
    pub upid: String,
}

/// What a backup archive carries about its guest.
#[derive(Debug, Clone)]
pub struct BackupConf {
    pub conf: std::collections::BTreeMap<String, String>,
    pub raw_lxc: Vec<(String, String)>,
}

/// The storage types the simulator knows (PVE's plugin names), as `&'static str`.
pub const TYPES: &[&str] = &[
    "dir",
    "nfs",
    "cifs",
    "glusterfs",
    "btrfs",
    "lvm",
    "lvmthin",
    "zfspool",
    "zfs",
    "rbd",
    "cephfs",
    "iscsi",
    "pbs",
];

/// The content types a storage can hold.
pub const CONTENTS: &[&str] = &[
    "rootdir", "images", "backup", "vztmpl", "iso", "snippets", "import",
];

/// A storage type's static name, or `None` when the simulator does not know it.
pub fn known_type(t: &str) -> Option<&'static str> {
    TYPES.iter().copied().find(|k| *k == t)
}

/// A content type's static name, or `None` when unknown.
pub fn known_content(c: &str) -> Option<&'static str> {
    CONTENTS.iter().copied().find(|k| *k == c)
}

/// Whether a storage of this type keeps guest images as files in a directory tree
/// (where the image format follows the file name).
pub fn is_file_based(stype: &str) -> bool {
    matches!(
        stype,
        "dir" | "nfs" | "cifs" | "glusterfs" | "btrfs" | "cephfs"
    )
}

/// The format of guest volume `volname` on a storage of type `stype`: on file-based
/// storages it follows the name (`101/vm-101-disk-0.qcow2` → `qcow2`, `subvol-…` →
/// `subvol`), elsewhere it is `raw` (`subvol` for ZFS datasets of containers).
pub fn volume_format(stype: &str, volname: &str) -> &'static str {
    let file = volname.rsplit('/').next().unwrap_or(volname);
    if file.starts_with("subvol-") || file.starts_with("basevol-") {
        return "subvol";
    }
    if is_file_based(stype) {
        for f in ["qcow2", "vmdk", "raw"] {
            if file.ends_with(&format!(".{f}")) {
                return f;
            }
        }
    }
    "raw"
}

/// pve-storage's `volume_has_feature(snapshot)`: ZFS, LVM-thin, Ceph RBD and btrfs can
/// snapshot any volume; directory-like storages only qcow2 images (so never a
/// container's raw image or subvolume); thick LVM, iSCSI, PBS and the rest cannot.
pub fn volume_can_snapshot(stype: &str, volname: &str) -> bool {
    match stype {
        "zfspool" | "zfs" | "lvmthin" | "rbd" | "btrfs" => true,
        "dir" | "nfs" | "cifs" | "glusterfs" | "cephfs" => volume_format(stype, volname) == "qcow2",
        _ => false,
    }
}

impl Storage {
    /// A new empty, active storage of `stype` holding `content`.
    pub fn new(id: &str, stype: &'static str, content: Vec<&'static str>, total: u64) -> Storage {
        Storage {
            id: id.to_owned(),
            stype,
            content,
            path: is_file_based(stype).then(|| format!("/mnt/pve/{id}")),
            shared: matches!(
                stype,
                "nfs" | "cifs" | "glusterfs" | "rbd" | "cephfs" | "pbs"
            ),
            active: true,
            enabled: true,
            total,
            used: 0,
            volumes: Vec::new(),
            allocated: std::collections::BTreeMap::new(),
        }
    }

    pub fn has_content(&self, c: &str) -> bool {
        self.content.contains(&c)
    }

    /// The item of `GET /nodes/{node}/storage`.
    pub fn list_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("storage".to_owned(), json!(self.id));
        m.insert("type".to_owned(), json!(self.stype));
        m.insert("content".to_owned(), json!(self.content.join(",")));
        m.insert("active".to_owned(), json!(u8::from(self.active)));
        m.insert("enabled".to_owned(), json!(u8::from(self.enabled)));
        m.insert("shared".to_owned(), json!(u8::from(self.shared)));
        if self.active {
            let used = self.used_bytes();
            m.insert("total".to_owned(), json!(self.total));
            m.insert("used".to_owned(), json!(used));
            m.insert("avail".to_owned(), json!(self.total - used));
            m.insert(
                "used_fraction".to_owned(),
                json!(used as f64 / self.total.max(1) as f64),
            );
        }
        Value::Object(m)
    }

    /// Used bytes as reported: the untracked base, backups and allocated disks, capped
    /// at `total`.
    pub fn used_bytes(&self) -> u64 {
        let tracked =
            self.volumes.iter().map(|v| v.size).sum::<u64>() + self.allocated.values().sum::<u64>();
        self.used.saturating_add(tracked).min(self.total)
    }

    /// Free bytes as reported.
    pub fn avail(&self) -> u64 {
        self.total - self.used_bytes()
    }

    /// Sets the untracked base so that `avail` becomes `avail` (control API).
    pub fn set_avail(&mut self, avail: u64) {
        let tracked =
            self.volumes.iter().map(|v| v.size).sum::<u64>() + self.allocated.values().sum::<u64>();
        self.used = self.total.saturating_sub(avail).saturating_sub(tracked);
    }

    /// Frees a guest disk: an allocated one is dropped, any other (a seeded guest's,
    /// counted in the base) lowers the base by its size.
    pub fn free_disk(&mut self, volname: &str, size: u64) {
        if self.allocated.remove(volname).is_none() {
            self.used = self.used.saturating_sub(size);
        }
    }

    /// A Proxmox Backup Server datastore (backups are snapshots there, not files).
    pub fn is_pbs(&self) -> bool {
        self.stype == "pbs"
    }

    /// The filesystem path of a backup file on this storage, as vzdump logs it.
    pub fn dump_path(&self, file: &str) -> String {
        match &self.path {
            Some(p) => format!("{p}/dump/{file}"),
            None => format!("/mnt/pve/{}/dump/{file}", self.id),
        }
    }
}

impl Volume {
    /// The control view: the content item plus the control flags.
    pub fn control_json(&self) -> Value {
        let mut v = self.content_json();
        v["corrupt"] = json!(self.corrupt);
        v["start_fails"] = json!(self.start_fails);
        v["agent_fails"] = json!(self.agent_fails);
        v["stops_after_seconds"] = json!(self.stops_after_seconds);
        v
    }

    /// The item of `GET /nodes/{node}/storage/{storage}/content`.
    pub fn content_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("volid".to_owned(), json!(self.volid));
        m.insert("content".to_owned(), json!(self.content));
        m.insert("format".to_owned(), json!(self.format));
        m.insert("size".to_owned(), json!(self.size));
        m.insert("ctime".to_owned(), json!(self.ctime));
        if let Some(v) = self.vmid {
            m.insert("vmid".to_owned(), json!(v));
        }
        if let Some(s) = self.subtype {
            m.insert("subtype".to_owned(), json!(s));
        }
        if let Some(n) = &self.notes {
            m.insert("notes".to_owned(), json!(n));
        }
        if self.protected {
            m.insert("protected".to_owned(), json!(1));
        }
        if let Some(v) = &self.verification {
            m.insert(
                "verification".to_owned(),
                json!({"state": v.state, "upid": v.upid}),
            );
        }
        Value::Object(m)
    }
}

/// `backup/vzdump-lxc-101-2025_01_31-02_00_05.tar.zst` → `(lxc, 101)`; on PBS
/// (`backup/ct/101/2025-01-31T02:00:05Z`, `backup/vm/…`) likewise.
pub fn parse_backup_name(volname: &str) -> Option<(&'static str, u32)> {
    let file = volname.strip_prefix("backup/")?;
    let pbs: Vec<&str> = file.split('/').collect();
    if let [btype, id, time] = pbs.as_slice() {
        let kind = match *btype {
            "ct" => "lxc",
            "vm" => "qemu",
            _ => return None,
        };
        if time.is_empty() {
            return None;
        }
        return Some((kind, id.parse().ok()?));
    }
    let rest = file.strip_prefix("vzdump-")?;
    let (kind, rest) = if let Some(r) = rest.strip_prefix("lxc-") {
        ("lxc", r)
    } else if let Some(r) = rest.strip_prefix("qemu-") {
        ("qemu", r)
    } else {
        return None;
    };
    let vmid = rest.split('-').next()?.parse().ok()?;
    Some((kind, vmid))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn storage(total: u64, used: u64) -> Storage {
        Storage {
            id: "local-lvm".into(),
            stype: "lvmthin",
            content: vec!["rootdir", "images"],
            path: None,
            shared: false,
            active: true,
            enabled: true,
            total,
            used,
            volumes: Vec::new(),
            allocated: Default::default(),
        }
    }

    #[test]
    fn allocated_disks_count_as_used_and_free_back_exactly() {
        let mut s = storage(100, 40);
        s.allocated.insert("vm-9900-disk-0".into(), 25);
        assert_eq!((s.used_bytes(), s.avail()), (65, 35));
        assert_eq!(s.list_json()["avail"], 35);
        // An allocated disk is dropped; any other disk lowers the base.
        s.free_disk("vm-9900-disk-0", 25);
        assert_eq!(s.avail(), 60);
        s.free_disk("vm-101-disk-0", 10);
        assert_eq!((s.used, s.avail()), (30, 70));
        s.free_disk("vm-102-disk-0", 1000);
        assert_eq!(s.used, 0);
    }

    #[test]
    fn set_avail_keeps_tracked_space_and_used_never_exceeds_total() {
        let mut s = storage(100, 40);
        s.allocated.insert("vm-9900-disk-0".into(), 30);
        s.set_avail(10);
        assert_eq!((s.used, s.avail()), (60, 10));
        s.set_avail(100);
        assert_eq!((s.used, s.used_bytes(), s.avail()), (0, 30, 70));
        s.used = 500;
        assert_eq!((s.used_bytes(), s.avail()), (100, 0));
    }

    #[test]
    fn snapshot_support_follows_type_and_format() {
        for (stype, volname, yes) in [
            ("zfspool", "subvol-101-disk-0", true),
            ("zfspool", "vm-103-disk-0", true),
            ("lvmthin", "vm-101-disk-0", true),
            ("rbd", "vm-101-disk-0", true),
            ("btrfs", "101/vm-101-disk-0.raw", true),
            ("dir", "101/vm-101-disk-0.raw", false),
            ("dir", "101/subvol-101-disk-0.subvol", false),
            ("dir", "103/vm-103-disk-0.qcow2", true),
            ("nfs", "103/vm-103-disk-0.qcow2", true),
            ("nfs", "103/vm-103-disk-0.vmdk", false),
            ("cifs", "103/vm-103-disk-0.raw", false),
            ("lvm", "vm-101-disk-0", false),
            ("iscsi", "0.0.1.scsi-x", false),
            ("pbs", "backup/ct/101/2025-01-31T02:00:05Z", false),
        ] {
            assert_eq!(
                volume_can_snapshot(stype, volname),
                yes,
                "{stype}:{volname}"
            );
        }
        assert_eq!(volume_format("dir", "101/vm-101-disk-0.qcow2"), "qcow2");
        assert_eq!(volume_format("zfspool", "subvol-101-disk-0"), "subvol");
        assert_eq!(volume_format("lvmthin", "vm-101-disk-0"), "raw");
        assert_eq!(known_type("zfspool"), Some("zfspool"));
        assert_eq!(known_type("floppy"), None);
    }

    #[test]
    fn backup_names() {
        assert_eq!(
            parse_backup_name("backup/vzdump-lxc-101-2025_01_31-02_00_05.tar.zst"),
            Some(("lxc", 101))
        );
        assert_eq!(
            parse_backup_name("backup/vzdump-qemu-100-2025_01_31-02_00_05.vma.zst"),
            Some(("qemu", 100))
        );
        assert_eq!(parse_backup_name("vztmpl/debian.tar.zst"), None);
        assert_eq!(
            parse_backup_name("backup/ct/101/2025-01-31T02:00:05Z"),
            Some(("lxc", 101))
        );
        assert_eq!(
            parse_backup_name("backup/vm/103/2025-01-31T02:00:05Z"),
            Some(("qemu", 103))
        );
        assert_eq!(
            parse_backup_name("backup/host/pve1/2025-01-31T02:00:05Z"),
            None
        );
    }
}
