//! The simulated node's state: guests, storages, tasks and settings, with the task
//! engine that finishes tasks in the background, and the deterministic seed data.
//!
//! Owns all mutable PVE state; it lives behind one mutex that is never held across an
//! `await`. Must never: block, or let a task's effect depend on a client still being
//! connected (tasks finish on their own timers).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::guest::{Guest, Ha, Kind, Snapshot};
use super::storage::{BackupConf, Storage, Verification, Volume};
use super::tasks::{Task, TaskFaults, TaskTable, encode_upid};
use super::version::PveVersion;

/// Epoch seconds now.
pub fn now_epoch() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Runtime-tunable settings (`PUT /_sim/settings`).
#[derive(Debug, Clone)]
pub struct Settings {
    pub task_seconds: f64,
    pub latency_ms: u64,
    /// How fast a restore reads its archive: a restore task takes `task_seconds` plus
    /// archive size / this.
    pub restore_bytes_per_second: f64,
    /// How fast vzdump writes: a backup task takes `task_seconds` plus the archives'
    /// size / this.
    pub backup_bytes_per_second: f64,
}

/// Default restore speed: 16 GiB/s, so a seeded archive adds a few milliseconds.
pub const DEFAULT_RESTORE_BPS: f64 = 16.0 * 1024.0 * 1024.0 * 1024.0;

/// A task that ended in error: its last log lines and the exit status.
#[derive(Debug, Clone)]
pub struct TaskErr {
    pub lines: Vec<String>,
    pub msg: String,
}

impl From<String> for TaskErr {
    fn from(msg: String) -> Self {
        TaskErr {
            lines: Vec::new(),
            msg,
        }
    }
}

impl From<&str> for TaskErr {
    fn from(msg: &str) -> Self {
        TaskErr {
            lines: Vec::new(),
            msg: msg.to_owned(),
        }
    }
}

/// What happens when a task's time is up: log lines, or the error.
pub type FinishFn = Box<dyn FnOnce(&mut SimState) -> Result<Vec<String>, TaskErr> + Send>;
/// What undoes a task's preparation when it is failed or killed from outside.
pub type CleanupFn = Box<dyn FnOnce(&mut SimState) + Send>;
/// What a task that fails midway (a task fault) leaves behind, given the exit status:
/// its partial effect, and the error it ends with.
pub type PartialFn = Box<dyn FnOnce(&mut SimState, String) -> TaskErr + Send>;

/// The effect of a running task.
pub struct TaskWork {
    pub finish: FinishFn,
    pub cleanup: CleanupFn,
    /// A `task_fail` fault: stop with this exit status instead of finishing.
    pub injected_failure: Option<String>,
    /// A task fault (`/_sim/task-faults`): fail midway, leaving what `partial` leaves
    /// (without one: what `cleanup` leaves).
    pub midway: Option<Midway>,
    pub partial: Option<PartialFn>,
}

/// How a task fault makes a task fail.
#[derive(Debug, Clone)]
pub struct Midway {
    /// The exit status.
    pub msg: String,
    /// The guest keeps the lock the task held (a killed worker).
    pub keep_lock: bool,
}

impl std::fmt::Debug for TaskWork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskWork")
            .field("injected_failure", &self.injected_failure)
            .finish_non_exhaustive()
    }
}

/// The whole mutable node.
#[derive(Debug)]
pub struct SimState {
    pub node: String,
    pub version: PveVersion,
    pub guests: BTreeMap<u32, Guest>,
    /// Guests of the same cluster living on other nodes (PVE's cluster-wide vmlist):
    /// vmid → (node, kind). This node's API does not serve them; vzdump skips them and
    /// create refuses their vmids.
    pub other_nodes: BTreeMap<u32, (String, Kind)>,
    pub storages: Vec<Storage>,
    pub tasks: TaskTable,
    /// Armed task faults (`/_sim/task-faults`).
    pub task_faults: TaskFaults,
    pub work: HashMap<String, TaskWork>,
    /// Timers to start once the lock is released: `(upid, duration)`.
    pub timers: Vec<(String, Duration)>,
    pub settings: Settings,
    pub rng: fastrand::Rng,
    next_pid: u32,
    /// Epoch seconds the simulated node booted.
    pub boot_epoch: u64,
    /// SHA-256 fingerprint of the node certificate (shown in `GET /nodes`).
    pub ssl_fingerprint: String,
}

impl SimState {
    pub fn new(
        node: &str,
        version: PveVersion,
        settings: Settings,
        seed: u64,
        fingerprint: String,
    ) -> SimState {
        let mut rng = fastrand::Rng::with_seed(seed);
        let now = now_epoch();
        let uptime = 86_400 * 12 + rng.u64(0..86_400);
        SimState {
            node: node.to_owned(),
            version,
            guests: BTreeMap::new(),
            other_nodes: BTreeMap::new(),
            storages: Vec::new(),
            tasks: TaskTable::default(),
            task_faults: TaskFaults::default(),
            work: HashMap::new(),
            timers: Vec::new(),
            settings,
            next_pid: 0x0010_0000 + rng.u32(0..0x0008_0000),
            rng,
            boot_epoch: now - uptime,
            ssl_fingerprint: fingerprint,
        }
    }

    pub fn storage(&self, id: &str) -> Option<&Storage> {
        self.storages.iter().find(|s| s.id == id)
    }

    pub fn storage_mut(&mut self, id: &str) -> Option<&mut Storage> {
        self.storages.iter_mut().find(|s| s.id == id)
    }

    /// A fresh worker pid.
    pub fn alloc_pid(&mut self) -> u32 {
        self.next_pid = self.next_pid.wrapping_add(1 + self.rng.u32(0..40));
        if self.next_pid > 0x003F_FFFF {
            self.next_pid = 0x1000;
        }
        self.next_pid
    }

    /// Starts a task: records it (running), remembers its work and queues its timer.
    /// Returns the UPID.
    pub fn start_task(
        &mut self,
        wtype: &str,
        id: &str,
        user: &str,
        first_log: Vec<String>,
        work: TaskWork,
        extra: Duration,
    ) -> String {
        let pid = self.alloc_pid();
        let now = now_epoch();
        let pstart = now.saturating_sub(self.boot_epoch) * 100 + u64::from(self.rng.u8(0..100));
        let upid = encode_upid(&self.node, pid, pstart, now, wtype, id, user);
        let task = Task {
            upid: upid.clone(),
            node: self.node.clone(),
            pid,
            pstart,
            starttime: now,
            wtype: wtype.to_owned(),
            id: id.to_owned(),
            user: user.to_owned(),
            exit: None,
            endtime: None,
            log: first_log,
        };
        self.tasks.push(task);
        self.work.insert(upid.clone(), work);
        let secs = self.settings.task_seconds.max(0.0);
        self.timers
            .push((upid.clone(), Duration::from_secs_f64(secs) + extra));
        upid
    }

    /// Runs a task's end (called by its timer).
    pub fn finish_task(&mut self, upid: &str) {
        let Some(work) = self.work.remove(upid) else {
            return;
        };
        // The lock the task's guest holds now, for a fault that keeps it.
        let held = work
            .midway
            .as_ref()
            .filter(|m| m.keep_lock && work.injected_failure.is_none())
            .and_then(|_| self.tasks.get(upid))
            .and_then(|t| t.id.parse::<u32>().ok())
            .and_then(|vmid| Some((vmid, self.guests.get(&vmid)?.lock()?.to_owned())));
        let result = match (work.injected_failure, work.midway, work.partial) {
            (Some(msg), _, _) | (None, Some(Midway { msg, .. }), None) => {
                (work.cleanup)(self);
                Err(TaskErr::from(msg))
            }
            (None, Some(m), Some(partial)) => Err(partial(self, m.msg)),
            (None, None, _) => (work.finish)(self),
        };
        if let Some((vmid, lock)) = held
            && let Some(g) = self.guests.get_mut(&vmid)
        {
            g.conf.insert("lock".into(), lock);
            g.touch();
        }
        self.stop_task(upid, result);
    }

    /// Kills a running task (DELETE task, overrule-shutdown): undo and record.
    pub fn kill_task(&mut self, upid: &str, reason: &str) -> bool {
        let Some(work) = self.work.remove(upid) else {
            return false;
        };
        (work.cleanup)(self);
        self.stop_task(upid, Err(TaskErr::from(reason)));
        true
    }

    fn stop_task(&mut self, upid: &str, result: Result<Vec<String>, TaskErr>) {
        let now = now_epoch();
        if let Some(t) = self.tasks.get_mut(upid) {
            match result {
                Ok(lines) => {
                    // `$rpcenv->warn` lines: the task ends with WARNINGS, still a success.
                    let warnings = lines.iter().filter(|l| l.starts_with("WARN: ")).count();
                    t.log.extend(lines);
                    if warnings > 0 {
                        t.log.push(format!("TASK WARNINGS: {warnings}"));
                        t.exit = Some(format!("WARNINGS: {warnings}"));
                    } else {
                        t.log.push("TASK OK".to_owned());
                        t.exit = Some("OK".to_owned());
                    }
                }
                Err(TaskErr { lines, msg }) => {
                    t.log.extend(lines);
                    let msg = msg.trim_end_matches('\n').to_owned();
                    t.log.push(format!("TASK ERROR: {msg}"));
                    t.exit = Some(msg);
                }
            }
            t.endtime = Some(now.max(t.starttime));
        }
    }

    /// Frees the storage-backed disks of a config (destroy, or a failed restore).
    pub fn free_disks(&mut self, kind: Kind, conf: &BTreeMap<String, String>) -> Vec<String> {
        let mut freed = Vec::new();
        for (_, sid, name, size) in super::guest::config_disks(kind, conf) {
            if let Some(s) = self.storage_mut(&sid) {
                s.free_disk(&name, size);
                freed.push(format!("{sid}:{name}"));
            }
        }
        freed
    }

    /// Marks a guest's config written (new digest).
    pub fn touch(&mut self, vmid: u32) {
        if let Some(g) = self.guests.get_mut(&vmid) {
            g.touch();
        }
    }

    /// Stops the guests whose `stops_after_seconds` ran out (as their own crash would:
    /// no task). Called before every request is served and state is shown.
    pub fn settle(&mut self) {
        let now = std::time::Instant::now();
        let due: Vec<u32> = self
            .guests
            .values()
            .filter(|g| g.running && g.stops_at.is_some_and(|t| t <= now))
            .map(|g| g.vmid)
            .collect();
        for vmid in due {
            self.set_running(vmid, false);
        }
    }

    /// After a config change of `vmid` was written: a running guest flagged
    /// `stops_after_config_change` stops now (the flag is spent).
    pub fn config_changed(&mut self, vmid: u32) {
        let hit = self
            .guests
            .get_mut(&vmid)
            .is_some_and(|g| std::mem::take(&mut g.stops_after_config_change) && g.running);
        if hit {
            self.set_running(vmid, false);
        }
    }

    /// Starts a guest now (applies pending changes, as PVE does at start).
    pub fn set_running(&mut self, vmid: u32, running: bool) {
        let pid = if running { self.alloc_pid() } else { 0 };
        let now = now_epoch();
        let mut rng = self.rng.fork();
        if let Some(g) = self.guests.get_mut(&vmid) {
            if running && !g.running {
                apply_pending(g, &mut rng);
                g.started_at = now;
                g.pid = pid;
                g.stops_at = g
                    .stops_after_seconds
                    .map(|s| std::time::Instant::now() + Duration::from_secs_f64(s.max(0.0)));
            }
            if !running {
                g.stops_at = None;
            }
            g.running = running;
            if let Some(ha) = &mut g.ha {
                ha.state = if running { "started" } else { "stopped" }.to_owned();
            }
            g.touch();
        }
    }

    /// Seeds `n` guests, storages, templates and a few backups, deterministically.
    pub fn seed(&mut self, n: usize) {
        let gib = 1u64 << 30;
        self.storages = vec![
            Storage {
                id: "local".into(),
                stype: "dir",
                content: vec!["vztmpl", "iso", "backup"],
                path: Some("/var/lib/vz".into()),
                shared: false,
                active: true,
                enabled: true,
                total: 100 * gib,
                used: 14 * gib,
                allocated: BTreeMap::new(),
                volumes: vec![Volume {
                    volid: "local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst".into(),
                    content: "vztmpl",
                    format: "tzst".into(),
                    size: 126_080_279,
                    ctime: self.boot_epoch - 86_400 * 30,
                    vmid: None,
                    subtype: None,
                    notes: None,
                    protected: false,
                    backup_conf: None,
                    verification: None,
                    corrupt: false,
                    start_fails: false,
                    agent_fails: false,
                    stops_after_seconds: None,
                }],
            },
            Storage {
                id: "local-lvm".into(),
                stype: "lvmthin",
                content: vec!["rootdir", "images"],
                path: None,
                shared: false,
                active: true,
                enabled: true,
                total: 800 * gib,
                used: 90 * gib,
                volumes: vec![],
                allocated: BTreeMap::new(),
            },
            Storage {
                id: "nas-backup".into(),
                stype: "nfs",
                content: vec!["backup"],
                path: Some("/mnt/pve/nas-backup".into()),
                shared: true,
                active: true,
                enabled: true,
                total: 4000 * gib,
                used: 1200 * gib,
                volumes: vec![],
                allocated: BTreeMap::new(),
            },
            Storage {
                id: "pbs-offsite".into(),
                stype: "pbs",
                content: vec!["backup"],
                path: None,
                shared: true,
                active: true,
                enabled: true,
                total: 8000 * gib,
                used: 2100 * gib,
                volumes: vec![],
                allocated: BTreeMap::new(),
            },
        ];
        let mut rng = self.rng.fork();
        let now = now_epoch();
        for i in 0..n {
            let vmid = 101 + i as u32;
            let kind = if i % 3 == 2 { Kind::Qemu } else { Kind::Lxc };
            let mut g = match kind {
                Kind::Lxc => seed_lxc(vmid, &mut rng),
                Kind::Qemu => seed_qemu(vmid, &mut rng),
            };
            g.running = match i {
                0 | 2 | 3 => true,
                1 | 4 | 5 => false,
                _ => rng.u8(0..3) != 0,
            };
            if i == 3 {
                g.ha = Some(Ha {
                    state: "started".into(),
                });
            }
            if i == 4 {
                g.conf.insert("lock".into(), "backup".into());
            }
            if i == 5 {
                g.conf.insert("template".into(), "1".into());
                g.running = false;
            }
            if i == 1 && kind == Kind::Lxc {
                // On a dir storage: no snapshots possible here.
                g.conf.insert(
                    "rootfs".into(),
                    format!("local:{vmid}/vm-{vmid}-disk-0.raw,size=8G"),
                );
            }
            if i == 7 && kind == Kind::Lxc {
                g.conf.remove("unprivileged");
                g.conf
                    .insert("features".into(), "fuse=1,mknod=1,nesting=1".into());
                g.raw_lxc = vec![
                    ("lxc.cgroup2.devices.allow".into(), "c 226:0 rwm".into()),
                    (
                        "lxc.mount.entry".into(),
                        "/dev/dri dev/dri none bind,optional,create=dir".into(),
                    ),
                ];
            }
            if g.running {
                g.started_at = now - 3600 - rng.u64(0..86_400);
                g.pid = self.alloc_pid();
            }
            if i % 4 == 0 && !g.is_template() && i != 1 {
                let t0 = now - 86_400 * 7;
                let mut c1 = g.conf.clone();
                c1.remove("lock");
                c1.remove("description");
                g.snapshots.insert(
                    "pre-upgrade".into(),
                    Snapshot {
                        conf: c1.clone(),
                        snaptime: t0,
                        description: Some("before upgrade\n".into()),
                        snapstate: None,
                        vmstate: false,
                        order: super::guest::next_snapshot_order(),
                    },
                );
                c1.insert("parent".into(), "pre-upgrade".into());
                g.snapshots.insert(
                    "nightly".into(),
                    Snapshot {
                        conf: c1,
                        snaptime: t0 + 86_400,
                        description: None,
                        snapstate: None,
                        vmstate: false,
                        order: super::guest::next_snapshot_order(),
                    },
                );
                g.conf.insert("parent".into(), "nightly".into());
            }
            g.touch();
            if i < 2 || i == 5 {
                let ctime = now - 86_400 * 2 + vmid as u64;
                let volume = backup_volume("local", false, &g, ctime, "zstd", None, false);
                if let Some(s) = self.storage_mut("local") {
                    s.volumes.push(volume);
                }
            }
            // PBS: 101 verified ok (and an older one too), 102 failed its verification,
            // 103 not verified yet (verify jobs run after the backups).
            if i < 3 {
                // Its own generator, so the PBS datastore leaves the seeded guests as
                // they were before it existed (tests and the devstack name their states).
                let mut rng = fastrand::Rng::with_seed(0x9b5_0000 + u64::from(vmid));
                let ctime = now - 86_400 + vmid as u64;
                let mut volumes = Vec::new();
                let mut v = backup_volume("pbs-offsite", true, &g, ctime, "zstd", None, false);
                v.verification = match i {
                    0 => Some(pbs_verification("ok", ctime + 3600, &mut rng)),
                    1 => Some(pbs_verification("failed", ctime + 3600, &mut rng)),
                    _ => None,
                };
                volumes.push(v);
                if i == 0 {
                    let older = ctime - 86_400 * 7;
                    let mut v = backup_volume("pbs-offsite", true, &g, older, "zstd", None, true);
                    v.verification = Some(pbs_verification("ok", older + 3600, &mut rng));
                    volumes.push(v);
                }
                if let Some(s) = self.storage_mut("pbs-offsite") {
                    s.volumes.extend(volumes);
                }
            }
            self.guests.insert(vmid, g);
        }
    }
}

fn seed_lxc(vmid: u32, rng: &mut fastrand::Rng) -> Guest {
    let mut conf = BTreeMap::new();
    let names = ["web", "db", "cache", "mail", "git", "dns", "proxy", "build"];
    let host = format!("{}{:02}", names[(vmid as usize) % names.len()], vmid % 100);
    conf.insert("arch".into(), "amd64".into());
    conf.insert("cores".into(), (1 + rng.u8(0..4)).to_string());
    conf.insert("hostname".into(), host);
    conf.insert(
        "memory".into(),
        ["512", "1024", "2048"][rng.usize(0..3)].into(),
    );
    conf.insert("swap".into(), "512".into());
    conf.insert(
        "net0".into(),
        format!(
            "name=eth0,bridge=vmbr0,firewall=1,hwaddr={},ip=dhcp,type=veth",
            super::guest::random_mac(rng)
        ),
    );
    conf.insert("ostype".into(), "debian".into());
    conf.insert(
        "rootfs".into(),
        format!(
            "local-lvm:vm-{vmid}-disk-0,size={}G",
            [4, 8, 16][rng.usize(0..3)]
        ),
    );
    conf.insert("unprivileged".into(), "1".into());
    conf.insert("onboot".into(), "1".into());
    if vmid % 2 == 1 {
        conf.insert("tags".into(), "prod;web".into());
        conf.insert("description".into(), "managed by felhom\n".into());
    }
    if vmid.is_multiple_of(5) {
        conf.insert("features".into(), "nesting=1".into());
        conf.insert("cpulimit".into(), "1.5".into());
    }
    new_guest(vmid, Kind::Lxc, conf)
}

fn seed_qemu(vmid: u32, rng: &mut fastrand::Rng) -> Guest {
    let mut conf = BTreeMap::new();
    conf.insert("boot".into(), "order=scsi0;ide2;net0".into());
    conf.insert("cores".into(), (1 + rng.u8(0..4)).to_string());
    conf.insert("cpu".into(), "x86-64-v2-AES".into());
    conf.insert("ide2".into(), "none,media=cdrom".into());
    conf.insert("memory".into(), ["2048", "4096"][rng.usize(0..2)].into());
    conf.insert("meta".into(), "creation-qemu=8.1.5,ctime=1706000000".into());
    conf.insert("name".into(), format!("vm{vmid}"));
    conf.insert(
        "net0".into(),
        format!(
            "virtio={},bridge=vmbr0,firewall=1",
            super::guest::random_mac(rng)
        ),
    );
    conf.insert("numa".into(), "0".into());
    conf.insert("ostype".into(), "l26".into());
    conf.insert(
        "scsi0".into(),
        format!("local-lvm:vm-{vmid}-disk-0,iothread=1,size=32G"),
    );
    conf.insert("scsihw".into(), "virtio-scsi-single".into());
    conf.insert(
        "smbios1".into(),
        format!(
            "uuid=6c1ad1a0-{:04x}-4c1e-9a52-{:012x}",
            vmid,
            rng.u64(0..1 << 48)
        ),
    );
    conf.insert("sockets".into(), "1".into());
    conf.insert("agent".into(), "1".into());
    conf.insert("onboot".into(), "1".into());
    new_guest(vmid, Kind::Qemu, conf)
}

pub fn new_guest(vmid: u32, kind: Kind, conf: BTreeMap<String, String>) -> Guest {
    let mut g = Guest {
        vmid,
        kind,
        conf,
        raw_lxc: Vec::new(),
        pending: BTreeMap::new(),
        pending_delete: Vec::new(),
        snapshots: BTreeMap::new(),
        running: false,
        ha: None,
        started_at: 0,
        pid: 0,
        digest: String::new(),
        start_fails: false,
        agent_fails: false,
        stops_after_seconds: None,
        stops_at: None,
        stops_after_config_change: false,
    };
    g.touch();
    g
}

/// `vzdump-<kind>-<vmid>-YYYY_MM_DD-HH_MM_SS.<ext>` for `ctime` and `compress`.
pub fn backup_file_name(kind: Kind, vmid: u32, ctime: u64, compress: &str) -> (String, String) {
    let t = time::OffsetDateTime::from_unix_timestamp(ctime as i64)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let stamp = format!(
        "{:04}_{:02}_{:02}-{:02}_{:02}_{:02}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    );
    let base = match kind {
        Kind::Lxc => "tar",
        Kind::Qemu => "vma",
    };
    let ext = match compress {
        "gzip" => ".gz",
        "lzo" | "1" => ".lzo",
        "zstd" => ".zst",
        _ => "",
    };
    let format = format!("{base}{ext}");
    (
        format!("vzdump-{}-{vmid}-{stamp}.{format}", kind.as_str()),
        format,
    )
}

/// The PBS snapshot path of a backup: `ct/101/2025-01-31T02:00:05Z` (`vm/…` for QEMU).
pub fn pbs_snapshot(kind: Kind, vmid: u32, ctime: u64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(ctime as i64)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let btype = match kind {
        Kind::Lxc => "ct",
        Kind::Qemu => "vm",
    };
    format!(
        "{btype}/{vmid}/{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// A PBS verify task's result (`upid` in PBS's own UPID form).
fn pbs_verification(state: &'static str, at: u64, rng: &mut fastrand::Rng) -> Verification {
    Verification {
        state,
        upid: format!(
            "UPID:pbs:{:08X}:{:08X}:{:08X}:{at:08X}:verificationjob:offsite\\x3av\\x2d{:08x}\\x2d{:04x}:root@pam:",
            rng.u32(1000..0x0040_0000),
            rng.u32(..),
            rng.u32(0..64),
            rng.u32(..),
            rng.u16(..),
        ),
    }
}

/// A backup volume of `g` on `storage` (a PBS datastore when `pbs`: a snapshot, format
/// `pbs-ct`/`pbs-vm`, compression is PBS's own).
pub fn backup_volume(
    storage: &str,
    pbs: bool,
    g: &Guest,
    ctime: u64,
    compress: &str,
    notes: Option<String>,
    protected: bool,
) -> Volume {
    let (file, format) = if pbs {
        let btype = match g.kind {
            Kind::Lxc => "ct",
            Kind::Qemu => "vm",
        };
        (pbs_snapshot(g.kind, g.vmid, ctime), format!("pbs-{btype}"))
    } else {
        backup_file_name(g.kind, g.vmid, ctime, compress)
    };
    let mut conf = g.conf.clone();
    conf.remove("lock");
    conf.remove("parent");
    Volume {
        volid: format!("{storage}:backup/{file}"),
        content: "backup",
        format,
        size: (g.memory_mib() << 18) + u64::from(g.vmid) * 4096,
        ctime,
        vmid: Some(g.vmid),
        subtype: Some(g.kind.as_str()),
        notes,
        protected,
        backup_conf: Some(BackupConf {
            conf,
            raw_lxc: g.raw_lxc.clone(),
        }),
        verification: None,
        corrupt: false,
        start_fails: false,
        agent_fails: false,
        stops_after_seconds: None,
    }
}

/// Applies pending values (PVE does this when a guest starts).
pub fn apply_pending(g: &mut Guest, rng: &mut fastrand::Rng) {
    for k in std::mem::take(&mut g.pending_delete) {
        g.conf.remove(&k);
    }
    for (k, v) in std::mem::take(&mut g.pending) {
        let v = if super::guest::is_indexed(&k, "net") && g.kind == Kind::Lxc {
            super::guest::canonical_lxc_net(&v, &k, rng).unwrap_or(v)
        } else {
            v
        };
        g.conf.insert(k, v);
    }
}
