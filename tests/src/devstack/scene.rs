//! Everything the local stack writes before it starts the agent and the helpers: the run
//! directory's layout, the helper's config and fake tools (answering from the host-tool
//! fixtures, which are compiled in), the sample hwmon tree, the agent's config and
//! secrets, the desired state that differs from the simulated node, the `pct create`
//! spec for the keyctl call, and (as root) the `signers.json` with the throw-away
//! operator key of the signed operations the devstack shows.
//!
//! The helper trusts its config and tools only when they and every directory above them
//! are owned by root or by the helper's own uid and not writable by group or others
//! (`docs/privhelper.md`); [`check_trusted_chain`] says in advance whether a run directory
//! qualifies, so the devstack can pick another one instead of watching the helper refuse.
//!
//! As root the agent runs as uid 65534 (as `felhom-agent` on a host): its state directory,
//! config and secrets are given to it, the socket directory is `1770 root:65534` (as
//! `/run/felhom`), and every directory above the run directory must let it pass
//! ([`check_traversable`]). The agent trusts `signers.json` only when root owns it and it
//! does not, which is why the signed operations need root.
//!
//! Must never: write outside the run directory, or leave a secret readable by others.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

/// The SMART fixtures the fake smartctl answers from, and the sensors fixture of the
/// hwmon tree (`tests/fixtures/hosttools`, compiled in so the binary needs no checkout).
const FIXTURES: [(&str, &str); 6] = [
    (
        "smartctl-sata-healthy.json",
        include_str!("../../fixtures/hosttools/smartctl-sata-healthy.json"),
    ),
    (
        "smartctl-sata-passed-reallocated-sectors.json",
        include_str!("../../fixtures/hosttools/smartctl-sata-passed-reallocated-sectors.json"),
    ),
    (
        "smartctl-usb-jmicron-sata-failing.json",
        include_str!("../../fixtures/hosttools/smartctl-usb-jmicron-sata-failing.json"),
    ),
    (
        "smartctl-nvme-healthy.json",
        include_str!("../../fixtures/hosttools/smartctl-nvme-healthy.json"),
    ),
    (
        "smartctl-nvme-failing-critical-warning.json",
        include_str!("../../fixtures/hosttools/smartctl-nvme-failing-critical-warning.json"),
    ),
    (
        "sensors-intel-coretemp-nvme-acpitz.json",
        include_str!("../../fixtures/hosttools/sensors-intel-coretemp-nvme-acpitz.json"),
    ),
];

/// The disks the agent reads (`smart.devices`) and what the fake smartctl answers for
/// each: healthy SATA, SATA with reallocated sectors, a failing disk behind a USB bridge,
/// one asleep, a healthy NVMe.
pub const DISKS: [(&str, &str); 5] = [
    ("sda", "smartctl-sata-healthy.json"),
    ("sdb", "smartctl-sata-passed-reallocated-sectors.json"),
    ("sdc", "smartctl-usb-jmicron-sata-failing.json"),
    ("sdd", "standby"),
    ("nvme0n1", "smartctl-nvme-healthy.json"),
];

/// The `pct create` the devstack asks the pct helper for (fake pct answers).
pub const KEYCTL_VMID: u32 = 150;

/// The desired state: differs from the seeded `felhom-pvesim --guests N` node (N ≥ 12)
/// in power and config on LXC and QEMU guests, and names the HA-managed (104), locked
/// (105) and template (106) guests, which the agent must leave alone.
pub fn desired_state() -> Value {
    json!({
        "generation": 1,
        "guests": [
            // LXC, running: memory and description change while it runs
            {"vmid": 101, "power": "running", "config": {"memory": 1024, "description": "web frontend (felhom devstack)"}},
            // LXC, stopped: start it, enable nesting
            {"vmid": 102, "power": "running", "config": {"nesting": true}},
            // QEMU, running: shut it down
            {"vmid": 103, "power": "stopped"},
            // HA-managed: its power belongs to the HA manager → skipped
            {"vmid": 104, "power": "stopped"},
            // locked (backup) → skipped
            {"vmid": 105, "power": "running"},
            // template → skipped
            {"vmid": 106, "power": "running"},
            // LXC, running: fewer cores, no start at boot, tags
            {"vmid": 107, "power": "running", "config": {"cores": 1, "onboot": false, "tags": ["devstack", "mail"]}},
            // QEMU, stopped: more memory, then start
            {"vmid": 109, "power": "running", "config": {"memory": 4096}},
            // QEMU, running: cores and description change
            {"vmid": 112, "power": "running", "config": {"cores": 2, "description": "api (felhom devstack)"}},
            // already as desired: nothing to do
            {"vmid": 110, "power": "running"}
        ]
    })
}

/// A valid ed25519 public key for the keyctl spec (the audit log names it by hash only).
const DEMO_KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl devstack@felhom";

#[derive(Debug, thiserror::Error)]
pub enum SceneError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("sample hwmon tree: {0}")]
    Hwmon(#[from] crate::hwmon::HwmonTreeError),
    #[error("{0}")]
    Untrusted(String),
    #[error(transparent)]
    Signers(#[from] crate::signing::SigningError),
    #[error(
        "no blkid at /usr/sbin/blkid or /sbin/blkid (package util-linux); the usb helper needs it"
    )]
    NoBlkid,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SceneError + '_ {
    move |source| SceneError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn mkdir(p: &Path, mode: u32) -> Result<(), SceneError> {
    std::fs::create_dir_all(p).map_err(io(p))?;
    set_mode(p, mode)
}

fn set_mode(p: &Path, mode: u32) -> Result<(), SceneError> {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).map_err(io(p))
}

fn write(p: &Path, content: &[u8], mode: u32) -> Result<(), SceneError> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(p)
        .map_err(io(p))?;
    f.write_all(content).map_err(io(p))?;
    // `mode` at creation is filtered by the umask; say it exactly.
    set_mode(p, mode)
}

fn write_json(p: &Path, v: &Value, mode: u32) -> Result<(), SceneError> {
    let mut text = serde_json::to_vec_pretty(v).unwrap_or_default();
    text.push(b'\n');
    write(p, &text, mode)
}

/// Whether the helper (running with effective uid `euid`) will trust files in `dir`:
/// `dir` and every directory above it owned by root or `euid`, and not writable by group
/// or others unless sticky. `Err` says which directory fails and why.
pub fn check_trusted_chain(dir: &Path, euid: u32) -> Result<(), SceneError> {
    let mut d = Some(dir);
    while let Some(p) = d {
        let md = std::fs::metadata(p).map_err(io(p))?;
        let mode = md.permissions().mode();
        if md.uid() != 0 && md.uid() != euid {
            return Err(SceneError::Untrusted(format!(
                "{} is owned by uid {}: the helper trusts only directories of root or its own uid {euid}",
                p.display(),
                md.uid()
            )));
        }
        if mode & 0o022 != 0 && mode & 0o1000 == 0 {
            return Err(SceneError::Untrusted(format!(
                "{} is writable by group or others (mode {:o}): the helper would refuse its config below it",
                p.display(),
                mode & 0o7777
            )));
        }
        d = p.parent();
    }
    Ok(())
}

/// Whether a process of `uid` (not root) can reach files below `dir`: `dir` and every
/// directory above it searchable by it (by others, or by their owner when that is
/// `uid`). `Err` names the first that is not.
pub fn check_traversable(dir: &Path, uid: u32) -> Result<(), SceneError> {
    let mut d = Some(dir);
    while let Some(p) = d {
        let md = std::fs::metadata(p).map_err(io(p))?;
        let mode = md.permissions().mode();
        let ok = if md.uid() == uid {
            mode & 0o100 != 0
        } else {
            mode & 0o001 != 0
        };
        if !ok {
            return Err(SceneError::Untrusted(format!(
                "{} (mode {:o}) cannot be searched by uid {uid}, the uid the agent runs as under root",
                p.display(),
                mode & 0o7777
            )));
        }
        d = p.parent();
    }
    Ok(())
}

/// The run directory's paths.
#[derive(Debug, Clone)]
pub struct Layout {
    pub root: PathBuf,
    pub etc: PathBuf,
    pub logs: PathBuf,
    pub tools: PathBuf,
    pub fixtures: PathBuf,
    pub state: PathBuf,
    pub sockets: PathBuf,
    pub audit_dir: PathBuf,
    pub audit_log: PathBuf,
    pub hwmon: PathBuf,
    pub mount_root: PathBuf,
    pub fstab: PathBuf,
    pub sysfs: PathBuf,
    pub helper_config: PathBuf,
    pub agent_config: PathBuf,
    pub desired: PathBuf,
    pub keyctl_spec: PathBuf,
    pub signers: PathBuf,
    pub control_socket: PathBuf,
    pub narrative: PathBuf,
    pub reports: PathBuf,
}

impl Layout {
    pub fn new(root: &Path) -> Layout {
        let r = |p: &str| root.join(p);
        Layout {
            root: root.to_path_buf(),
            etc: r("etc"),
            logs: r("logs"),
            tools: r("tools"),
            fixtures: r("fixtures"),
            state: r("state"),
            sockets: r("run"),
            audit_dir: r("audit"),
            audit_log: r("audit/privhelper-audit.jsonl"),
            hwmon: r("hwmon"),
            mount_root: r("mnt/felhom"),
            fstab: r("etc/fstab"),
            sysfs: r("sys"),
            helper_config: r("etc/privhelper.json"),
            agent_config: r("etc/agent.json"),
            desired: r("etc/desired.json"),
            keyctl_spec: r("etc/keyctl-spec.json"),
            signers: r("etc/signers.json"),
            control_socket: r("run/agent.sock"),
            narrative: r("devstack.log"),
            reports: r("hub-reports.jsonl"),
        }
    }

    pub fn log(&self, name: &str) -> PathBuf {
        self.logs.join(name)
    }

    /// `path` relative to the run directory when it is inside it.
    pub fn rel<'a>(&self, path: &'a Path) -> std::borrow::Cow<'a, str> {
        match path.strip_prefix(&self.root) {
            Ok(r) => r.to_string_lossy(),
            Err(_) => path.to_string_lossy(),
        }
    }

    /// Creates the directories (the run directory itself must exist). As root, the
    /// state directory belongs to the agent's uid and the socket directory lets its group
    /// in (the agent makes its control socket there).
    pub fn create(&self, agent_uid: u32, agent_gid: u32, is_root: bool) -> Result<(), SceneError> {
        set_mode(&self.root, 0o755)?;
        for d in [
            &self.etc,
            &self.logs,
            &self.tools,
            &self.fixtures,
            &self.hwmon,
        ] {
            mkdir(d, 0o755)?;
        }
        mkdir(&self.state, 0o700)?;
        // Helper sockets and the agent's control socket in one directory (on a host the
        // helpers' are in root-only /run/felhom-privhelper, the agent's in /run/felhom).
        mkdir(&self.sockets, 0o755)?;
        if is_root {
            std::os::unix::fs::chown(&self.state, Some(agent_uid), Some(agent_gid))
                .map_err(io(&self.state))?;
            // as tmpfiles.d makes /run/felhom: sticky, so the agent cannot remove the
            // helpers' sockets
            std::os::unix::fs::chown(&self.sockets, Some(0), Some(agent_gid))
                .map_err(io(&self.sockets))?;
            set_mode(&self.sockets, 0o1770)?;
        }
        if let Some(parent) = self.mount_root.parent() {
            mkdir(parent, 0o755)?;
        }
        // As tmpfiles.d makes /var/log/felhom: setgid, group of the agent, so the agent
        // can read the helper's audit log.
        mkdir(&self.audit_dir, 0o750)?;
        if is_root {
            std::os::unix::fs::chown(&self.audit_dir, Some(0), Some(agent_gid))
                .map_err(io(&self.audit_dir))?;
        }
        set_mode(&self.audit_dir, 0o2750)
    }
}

/// The fixtures, written into the run directory (the fake smartctl reads them there).
pub fn write_fixtures(l: &Layout) -> Result<(), SceneError> {
    for (name, text) in FIXTURES {
        write(&l.fixtures.join(name), text.as_bytes(), 0o644)?;
    }
    Ok(())
}

/// Copies the fake tools into `tools/` (a copy, not a link: each finds its settings next
/// to its own path) and writes their settings.
pub fn write_fake_tools(l: &Layout, smartctl: &Path, pct: &Path) -> Result<(), SceneError> {
    let smart_dst = l.tools.join("felhom-fake-smartctl");
    let pct_dst = l.tools.join("felhom-fake-pct");
    for (src, dst) in [(smartctl, &smart_dst), (pct, &pct_dst)] {
        std::fs::copy(src, dst).map_err(io(src))?;
        set_mode(dst, 0o755)?;
    }
    let mut devices = serde_json::Map::new();
    for (dev, fx) in DISKS {
        let v = if fx == "standby" {
            json!({"standby": true})
        } else {
            json!({"fixture": l.fixtures.join(fx)})
        };
        devices.insert(dev.to_owned(), v);
    }
    devices.insert(
        "nvme1n1".into(),
        json!({"fixture": l.fixtures.join("smartctl-nvme-failing-critical-warning.json")}),
    );
    write_json(
        &l.tools.join("felhom-fake-smartctl.json"),
        &json!({"record": l.log("smartctl-calls.jsonl"), "devices": devices}),
        0o644,
    )?;
    write_json(
        &l.tools.join("felhom-fake-pct.json"),
        &json!({"record": l.log("pct-calls.jsonl")}),
        0o644,
    )
}

/// The sample hwmon tree (`sensors.hwmon_root`); returns the number of temperatures.
pub fn write_hwmon(l: &Layout) -> Result<(PathBuf, usize), SceneError> {
    let fixture = FIXTURES
        .iter()
        .find(|(n, _)| n.starts_with("sensors-"))
        .map(|(_, t)| *t)
        .unwrap_or("{}");
    let tree = crate::hwmon::write_sample_tree(&l.hwmon, fixture)?;
    Ok((tree.hwmon_root, tree.expected.len()))
}

fn blkid() -> Result<PathBuf, SceneError> {
    ["/usr/sbin/blkid", "/sbin/blkid"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or(SceneError::NoBlkid)
}

/// The helper's config: the agent's uid/gid, everything under the run directory, the
/// fake tools, a short idle exit. `sysfs_root` is the real `/sys` (USB checks against the
/// real machine) unless a fake tree marks a loop device as USB.
pub fn write_helper_config(
    l: &Layout,
    agent_uid: u32,
    agent_gid: u32,
    idle_exit_seconds: u64,
    sysfs_root: &Path,
) -> Result<(), SceneError> {
    write(&l.fstab, crate::privhelper::SAMPLE_FSTAB.as_bytes(), 0o644)?;
    let cfg = json!({
        "agent_uid": agent_uid,
        "agent_gid": agent_gid,
        "audit_log": l.audit_log,
        "mount_root": l.mount_root,
        "fstab": l.fstab,
        "sysfs_root": sysfs_root,
        "tools": {
            "pct": l.tools.join("felhom-fake-pct"),
            "smartctl": l.tools.join("felhom-fake-smartctl"),
            "blkid": blkid()?,
        },
        "idle_exit_seconds": idle_exit_seconds,
        "tool_timeout_seconds": 20,
        "pct_timeout_seconds": 60,
    });
    write_json(&l.helper_config, &cfg, 0o644)
}

/// What the agent's config points at.
#[derive(Debug, Clone)]
pub struct AgentInputs<'a> {
    pub node: &'a str,
    pub pve_url: &'a str,
    pub pve_token_id: &'a str,
    pub pve_token_secret: &'a str,
    pub pve_pin: &'a str,
    pub hub_url: &'a str,
    pub hub_token: &'a str,
    pub hub_ca_file: &'a Path,
    pub cloudflared_url: &'a str,
    pub hwmon_root: &'a Path,
    pub interval_seconds: u64,
    /// This host's identity (the signed operations are bound to it).
    pub agent_id: &'a str,
    /// As root: the agent's uid and gid, which get its config and secrets.
    pub agent_owner: Option<(u32, u32)>,
}

/// The agent's config, its two secrets (0600, the agent's), the hub's CA (copied: the
/// simulator's temporary directory is private to it) and the desired state. The config
/// names `signers.json` in the run directory ([`write_signers`] writes it as root; without
/// it signed operations are off).
pub fn write_agent_config(l: &Layout, a: &AgentInputs<'_>) -> Result<(), SceneError> {
    let pve_secret = l.etc.join("proxmox-token-secret");
    let hub_token = l.etc.join("hub-token");
    write(&pve_secret, a.pve_token_secret.as_bytes(), 0o600)?;
    write(&hub_token, a.hub_token.as_bytes(), 0o600)?;
    let hub_ca = l.etc.join("hub-ca.pem");
    std::fs::copy(a.hub_ca_file, &hub_ca).map_err(io(a.hub_ca_file))?;
    set_mode(&hub_ca, 0o644)?;
    write_json(&l.desired, &desired_state(), 0o644)?;
    let devices: Vec<&str> = DISKS.iter().map(|(d, _)| *d).collect();
    let cfg = json!({
        "node": a.node,
        "agent_id": a.agent_id,
        "state_dir": l.state,
        "proxmox": {
            "url": a.pve_url,
            "token_id": a.pve_token_id,
            "token_secret_file": pve_secret,
            "tls": {"pin_sha256": a.pve_pin}
        },
        "hub": {
            "url": a.hub_url,
            "token_file": hub_token,
            "ca_file": hub_ca,
            "test_min_poll_interval_seconds": a.interval_seconds
        },
        "privhelper": {
            "socket_dir": l.sockets,
            "audit_log": l.audit_log,
            "timeout_seconds": 10
        },
        "sensors": {"hwmon_root": a.hwmon_root},
        // every cycle: the smart helper idles out between cycles and is activated again
        "smart": {"devices": devices, "interval_seconds": 1},
        "cloudflared": {"metrics_url": a.cloudflared_url, "timeout_seconds": 2},
        "reconcile": {"desired_file": l.desired, "shutdown_timeout_seconds": 5},
        "authz": {"signers_file": l.signers},
        "gate": {"backup_storage": "nas-backup"},
        // no schedule: the devstack runs the one restore test it shows
        "restore_tests": {
            "enabled": false,
            "scratch_vmids": super::restore::SCRATCH_VMIDS,
            "storage": super::restore::STORAGE,
            "boot_check_seconds": 60,
            "stable_seconds": 2
        },
        "control": {"socket": l.control_socket}
    });
    write_json(&l.agent_config, &cfg, 0o600)?;
    if let Some((uid, gid)) = a.agent_owner {
        for p in [&pve_secret, &hub_token, &l.agent_config] {
            std::os::unix::fs::chown(p, Some(uid), Some(gid)).map_err(io(p))?;
        }
    }
    Ok(())
}

/// `signers.json` trusting `key` alone (both thresholds 1), owned by root, mode 0644: as
/// an operator writes `/etc/felhom/signers.json`. Needs root.
pub fn write_signers(l: &Layout, key: &crate::signing::TestKey) -> Result<(), SceneError> {
    crate::signing::SignersFile::new(&[key])
        .threshold(1, 1)
        .max_validity_seconds(3600)
        .write(&l.signers)?;
    Ok(())
}

/// The spec for `felhom-agent privileged create-keyctl`.
pub fn write_keyctl_spec(l: &Layout) -> Result<(), SceneError> {
    let spec = json!({
        "vmid": KEYCTL_VMID,
        "ostemplate": "local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst",
        "hostname": "devstack150",
        "memory_mib": 1024,
        "swap_mib": 512,
        "cores": 2,
        "rootfs": {"storage": "local-lvm", "size_gib": 8},
        "net": {"bridge": "vmbr0", "ip": "dhcp", "gw": null},
        "nesting": true,
        "ssh_public_keys": [DEMO_KEY],
        "start": false,
        "onboot": true
    });
    write_json(&l.keyctl_spec, &spec, 0o644)
}

/// A block device of this machine that is certainly not attached through USB (its sysfs
/// path has no `usb…` component), preferring a partition: the helper must refuse to
/// mount it, which is the refusal path the devstack shows. `None` when there is none.
pub fn non_usb_block_device() -> Option<String> {
    use std::os::unix::fs::FileTypeExt;
    let mut candidates: Vec<(bool, String)> = Vec::new();
    for e in std::fs::read_dir("/sys/class/block").ok()?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        // A name the protocol accepts as /dev/<kernel name> (not dm-0), so the refusal
        // shown is the helper's USB check, not a validation error.
        if !felhom_protocol::is_kernel_name(&name) {
            continue;
        }
        let Ok(real) = std::fs::canonicalize(e.path()) else {
            continue;
        };
        if real
            .components()
            .any(|c| c.as_os_str().to_string_lossy().starts_with("usb"))
        {
            continue;
        }
        let dev = Path::new("/dev").join(&name);
        if !std::fs::metadata(&dev).is_ok_and(|m| m.file_type().is_block_device()) {
            continue;
        }
        candidates.push((real.join("partition").is_file(), name));
    }
    candidates.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    candidates
        .into_iter()
        .next()
        .map(|(_, n)| format!("/dev/{n}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn desired_state_names_the_guests_that_must_be_skipped() {
        let d = desired_state();
        let vmids: Vec<u64> = d["guests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["vmid"].as_u64().unwrap())
            .collect();
        for v in [104, 105, 106] {
            assert!(vmids.contains(&v), "{v}");
        }
    }

    #[test]
    fn a_group_writable_directory_breaks_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let euid = nix::unistd::geteuid().as_raw();
        let sub = dir.path().join("run");
        std::fs::create_dir(&sub).unwrap();
        std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        // /tmp is sticky; the rest of the chain is root's
        check_trusted_chain(&sub, euid).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o775)).unwrap();
        let e = check_trusted_chain(&sub, euid).unwrap_err().to_string();
        assert!(e.contains("writable by group or others"), "{e}");
        // sticky is fine
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
        check_trusted_chain(&sub, euid).unwrap();
        // another uid's directory is not
        if euid == 0 {
            std::os::unix::fs::chown(&sub, Some(4242), None).unwrap();
            let e = check_trusted_chain(&sub, euid).unwrap_err().to_string();
            assert!(e.contains("owned by uid 4242"), "{e}");
        }
    }
}
