//! Test-bed harness for `felhom-privhelper`: a throw-away environment (config, audit
//! directory, fstab, mount root, fake sysfs, fake tools) in a temporary directory, helpers
//! started the way systemd starts them (`systemd-socket-activate`), a small synchronous
//! protocol client, and throw-away users for the peer-credential tests.
//!
//! Everything here runs real processes over real Unix sockets; nothing is mocked.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use felhom_protocol::{
    Class, MAX_RESPONSE_FRAME, PROTOCOL_VERSION, Request, Response, decode_response,
    encode_request, frame_len,
};
use serde_json::{Value, json};

/// The directory holding the workspace's binaries for the running test or bench.
pub fn target_dir() -> PathBuf {
    crate::build::profile_dir().expect("current_exe")
}

/// `felhom-privhelper`, built for this profile. Under `cargo test --workspace` it is
/// built already and used as is. When it is missing or older than its sources (e.g.
/// `cargo test -p felhom-testbed`, or the benchmark in release), the first call runs
/// `cargo build -p felhom-privhelper` for it ([`crate::build`]). Set
/// `FELHOM_TESTBED_NO_BUILD=1` to never build and use what is there.
pub fn privhelper_bin() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| crate::build::bin_for_tests(crate::build::PRIVHELPER))
        .clone()
}

/// `tests/fixtures/hosttools`.
pub fn hosttools_fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/hosttools")
}

/// True when running as root (the helper tests need it; they skip loudly otherwise).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .map(|r| r.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// Paths of the test bed's fake tools (`env!("CARGO_BIN_EXE_…")` in the caller).
#[derive(Debug, Clone)]
pub struct FakeBins {
    pub smartctl: PathBuf,
    pub pct: PathBuf,
}

/// Options for a [`Bed`].
#[derive(Debug, Clone)]
pub struct BedOptions {
    pub agent_uid: u32,
    pub agent_gid: u32,
    pub idle_exit_seconds: u64,
    pub audit_max_bytes: Option<u64>,
    /// Record every fake-tool call (off for benchmarks).
    pub record_calls: bool,
}

impl Default for BedOptions {
    fn default() -> Self {
        BedOptions {
            agent_uid: 64_999,
            agent_gid: 64_999,
            idle_exit_seconds: 30,
            audit_max_bytes: None,
            record_calls: true,
        }
    }
}

/// A complete environment for the three helper classes.
#[derive(Debug)]
pub struct Bed {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub audit_log: PathBuf,
    /// The agent's acknowledged audit cursor the helper reads at rotation (`audit_ack`;
    /// absent until a test writes it: nothing acknowledged).
    pub audit_ack: PathBuf,
    pub fstab: PathBuf,
    pub mount_root: PathBuf,
    pub sysfs_root: PathBuf,
    pub run_dir: PathBuf,
    pub smart_calls: PathBuf,
    pub pct_calls: PathBuf,
    pub opts: BedOptions,
    pub fakes: FakeBins,
}

/// A sample fstab with the kinds of lines a PVE host has (comments, tabs, trailing blanks).
pub const SAMPLE_FSTAB: &str = "# /etc/fstab: static file system information.\n#\n# <file system> <mount point> <type> <options> <dump> <pass>\n/dev/pve/root / ext4 errors=remount-ro 0 1\nUUID=9F2A-1C3B /boot/efi vfat defaults 0 1\n/dev/pve/swap none swap sw 0 0\n\tproc /proc proc defaults 0 0   \n";

fn set_mode(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

impl Bed {
    pub fn new(fakes: FakeBins, opts: BedOptions) -> Bed {
        let base = std::env::temp_dir();
        let dir = base.join(format!(
            "felhom-bed-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos()
        ));
        std::fs::create_dir(&dir).expect("bed dir");
        set_mode(&dir, 0o755);
        let log_dir = dir.join("log");
        std::fs::create_dir(&log_dir).expect("log dir");
        // As tmpfiles.d makes /var/log/felhom: root:<agent group>, setgid so new files
        // (rotation) keep the group.
        std::os::unix::fs::chown(&log_dir, Some(0), Some(opts.agent_gid)).expect("chown log dir");
        set_mode(&log_dir, 0o2750);
        let run_dir = dir.join("run");
        std::fs::create_dir(&run_dir).expect("run dir");
        set_mode(&run_dir, 0o755);
        let tools = dir.join("tools");
        std::fs::create_dir(&tools).expect("tools dir");
        set_mode(&tools, 0o755);
        let etc = dir.join("etc");
        std::fs::create_dir(&etc).expect("etc dir");
        set_mode(&etc, 0o755);
        let fstab = etc.join("fstab");
        std::fs::write(&fstab, SAMPLE_FSTAB).expect("fstab");
        set_mode(&fstab, 0o644);
        let sysfs_root = dir.join("sys");
        std::fs::create_dir_all(sysfs_root.join("devices")).expect("sysfs");
        std::fs::create_dir_all(sysfs_root.join("class/block")).expect("sysfs");
        let mount_root = dir.join("mnt/felhom");
        std::fs::create_dir_all(dir.join("mnt")).expect("mnt");
        let smart = tools.join("felhom-fake-smartctl");
        let pct = tools.join("felhom-fake-pct");
        std::fs::copy(&fakes.smartctl, &smart).expect("copy fake smartctl");
        std::fs::copy(&fakes.pct, &pct).expect("copy fake pct");
        set_mode(&smart, 0o755);
        set_mode(&pct, 0o755);
        let smart_calls = dir.join("smartctl-calls.jsonl");
        let pct_calls = dir.join("pct-calls.jsonl");
        let fx = hosttools_fixtures();
        let record = |p: &Path| {
            if opts.record_calls {
                json!(p)
            } else {
                Value::Null
            }
        };
        let smart_settings = json!({
            "record": record(&smart_calls),
            "devices": {
                "sda": {"fixture": fx.join("smartctl-sata-healthy.json")},
                "sdb": {"fixture": fx.join("smartctl-sata-passed-reallocated-sectors.json")},
                "sdc": {"fixture": fx.join("smartctl-usb-jmicron-sata-failing.json")},
                "sdd": {"standby": true},
                "nvme0": {"fixture": fx.join("smartctl-nvme-healthy.json")},
                "nvme0n1": {"fixture": fx.join("smartctl-nvme-healthy.json")},
                "nvme1": {"fixture": fx.join("smartctl-nvme-failing-critical-warning.json")}
            }
        });
        std::fs::write(
            tools.join("felhom-fake-smartctl.json"),
            smart_settings.to_string(),
        )
        .expect("settings");
        std::fs::write(
            tools.join("felhom-fake-pct.json"),
            json!({"record": record(&pct_calls)}).to_string(),
        )
        .expect("settings");
        let audit_log = log_dir.join("privhelper-audit.jsonl");
        let audit_ack = dir.join("audit-cursor.json");
        let mut cfg = json!({
            "agent_uid": opts.agent_uid,
            "agent_gid": opts.agent_gid,
            "audit_log": audit_log,
            "audit_ack": audit_ack,
            "mount_root": mount_root,
            "fstab": fstab,
            "sysfs_root": sysfs_root,
            "tools": {"pct": pct, "smartctl": smart, "blkid": "/usr/sbin/blkid"},
            "idle_exit_seconds": opts.idle_exit_seconds,
            "tool_timeout_seconds": 20,
        });
        if let Some(m) = opts.audit_max_bytes {
            cfg["audit_max_bytes"] = json!(m);
        }
        let config = etc.join("privhelper.json");
        std::fs::write(&config, cfg.to_string()).expect("config");
        set_mode(&config, 0o644);
        Bed {
            dir,
            config,
            audit_log,
            audit_ack,
            fstab,
            mount_root,
            sysfs_root,
            run_dir,
            smart_calls,
            pct_calls,
            opts,
            fakes,
        }
    }

    /// Rewrites one key of the helper's config.
    pub fn set_config(&self, key: &str, value: Value) {
        let mut v: Value =
            serde_json::from_str(&std::fs::read_to_string(&self.config).expect("config"))
                .expect("json");
        v[key] = value;
        std::fs::write(&self.config, v.to_string()).expect("config");
    }

    /// Rewrites the fake pct's settings (e.g. `{"exit": 2}`).
    pub fn set_pct_settings(&self, mut v: Value) {
        if self.opts.record_calls {
            v["record"] = json!(self.pct_calls);
        }
        std::fs::write(self.dir.join("tools/felhom-fake-pct.json"), v.to_string())
            .expect("settings");
    }

    pub fn socket(&self, class: Class) -> PathBuf {
        self.run_dir.join(class.socket_name())
    }

    /// Starts `felhom-privhelper serve --class C` behind `systemd-socket-activate` on the
    /// class's socket (0660 root:<agent gid>, as the .socket unit makes it).
    pub fn activate(&self, class: Class) -> Activated {
        let sock = self.socket(class);
        let _ = std::fs::remove_file(&sock);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("helper-{class}.log")))
            .expect("helper log");
        let child = Command::new("systemd-socket-activate")
            .arg("-l")
            .arg(&sock)
            .arg(privhelper_bin())
            .args(["serve", "--class", class.as_str(), "--config"])
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("systemd-socket-activate (package systemd) must be installed");
        // Wait until the socket is listening (bind and listen are two steps; connecting
        // ourselves would use up the one activation).
        let deadline = Instant::now() + Duration::from_secs(10);
        while !is_listening(&sock) {
            assert!(
                Instant::now() < deadline,
                "socket {} never listened",
                sock.display()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        std::os::unix::fs::chown(&sock, Some(0), Some(self.opts.agent_gid)).expect("chown socket");
        set_mode(&sock, 0o660);
        Activated {
            child,
            socket: sock,
        }
    }

    /// Starts the helper directly on `--listen` (development mode).
    pub fn listen(&self, class: Class) -> Activated {
        let sock = self.socket(class);
        let _ = std::fs::remove_file(&sock);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("helper-{class}.log")))
            .expect("helper log");
        let child = Command::new(privhelper_bin())
            .args(["serve", "--class", class.as_str(), "--config"])
            .arg(&self.config)
            .arg("--listen")
            .arg(&sock)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("felhom-privhelper");
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&sock).is_err() {
            assert!(
                Instant::now() < deadline,
                "helper never listened on {}",
                sock.display()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Activated {
            child,
            socket: sock,
        }
    }

    /// What the helper for `class` wrote on stderr.
    pub fn helper_log(&self, class: Class) -> String {
        std::fs::read_to_string(self.dir.join(format!("helper-{class}.log"))).unwrap_or_default()
    }

    /// Every audit record (active file only).
    pub fn audit_records(&self) -> Vec<Value> {
        read_jsonl(&self.audit_log)
    }

    /// Every audit record in every file, oldest rotated file first.
    pub fn all_audit_records(&self) -> Vec<Value> {
        let mut n = 1;
        let rotated = |n: u32| {
            let mut p = self.audit_log.as_os_str().to_owned();
            p.push(format!(".{n}"));
            PathBuf::from(p)
        };
        while rotated(n).exists() {
            n += 1;
        }
        let mut out = Vec::new();
        for k in (1..n).rev() {
            out.extend(read_jsonl(&rotated(k)));
        }
        out.extend(read_jsonl(&self.audit_log));
        out
    }

    /// How many refusals the `refused` records stand for (each carries a `count`).
    pub fn refusals_on_record(records: &[Value]) -> u64 {
        records
            .iter()
            .filter(|r| r["kind"] == "refused")
            .map(|r| r["count"].as_u64().unwrap_or(1))
            .sum()
    }

    pub fn smart_calls(&self) -> Vec<Value> {
        read_jsonl(&self.smart_calls)
    }

    pub fn pct_calls(&self) -> Vec<Value> {
        read_jsonl(&self.pct_calls)
    }

    /// `felhom-privhelper audit verify --log <audit log>`.
    pub fn verify(&self) -> Output {
        Command::new(privhelper_bin())
            .args(["audit", "verify", "--log"])
            .arg(&self.audit_log)
            .output()
            .expect("felhom-privhelper audit verify")
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        if std::env::var_os("FELHOM_KEEP_BED").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

pub fn read_jsonl(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect()
}

/// Whether a Unix socket bound at `path` is listening (`__SO_ACCEPTCON` in /proc/net/unix).
pub fn is_listening(path: &Path) -> bool {
    let p = path.to_string_lossy();
    std::fs::read_to_string("/proc/net/unix")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() >= 8
                && f[7] == p
                && u32::from_str_radix(f[3], 16).is_ok_and(|flags| flags & 0x0001_0000 != 0)
        })
}

/// A helper process we started; killed (by its pid) when dropped.
#[derive(Debug)]
pub struct Activated {
    pub child: Child,
    pub socket: PathBuf,
}

impl Activated {
    /// Waits up to `within` for the helper to exit by itself (idle exit).
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Activated {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A synchronous protocol client (the agent's real client is async; this one lets
/// tests send arbitrary bytes too).
#[derive(Debug)]
pub struct Client {
    pub stream: UnixStream,
}

impl Client {
    pub fn connect(path: &Path) -> std::io::Result<Client> {
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        Ok(Client { stream })
    }

    /// Connects and completes the handshake.
    pub fn hello(path: &Path) -> std::io::Result<Client> {
        let mut c = Client::connect(path)?;
        match c.call(&Request::Hello {
            version: PROTOCOL_VERSION,
        })? {
            Response::Hello { .. } => Ok(c),
            other => Err(std::io::Error::other(format!(
                "handshake refused: {other:?}"
            ))),
        }
    }

    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Reads one response frame; `Ok(None)` if the helper closed the connection.
    pub fn read_response(&mut self) -> std::io::Result<Option<Response>> {
        let mut header = [0u8; 4];
        match self.stream.read_exact(&mut header) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(None),
            Err(e) => return Err(e),
        }
        let len = frame_len(header, MAX_RESPONSE_FRAME).map_err(std::io::Error::other)?;
        let mut payload = vec![0u8; len];
        self.stream.read_exact(&mut payload)?;
        decode_response(&payload)
            .map(Some)
            .map_err(std::io::Error::other)
    }

    pub fn call(&mut self, req: &Request) -> std::io::Result<Response> {
        let bytes = encode_request(req).map_err(std::io::Error::other)?;
        // Like the agent's client: a refusal may be waiting even if our write failed.
        let written = self.send_raw(&bytes);
        match self.read_response() {
            Ok(Some(r)) => Ok(r),
            Ok(None) => Err(written.err().unwrap_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "helper closed the connection",
                )
            })),
            Err(e) => Err(written.err().unwrap_or(e)),
        }
    }

    /// True once the helper has closed this connection.
    pub fn closed_by_peer(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.stream.read(&mut b), Ok(0) | Err(_))
    }
}

/// A system user that exists for one test (`useradd`, removed with `userdel` on drop).
#[derive(Debug)]
pub struct ThrowawayUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl ThrowawayUser {
    /// Creates a user with its own group, optionally also in `extra_group`.
    pub fn create(tag: &str, extra_group: Option<&str>) -> ThrowawayUser {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let name = format!("fh{tag}{}x{n}", std::process::id() % 100_000);
        let mut cmd = Command::new("useradd");
        cmd.args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            "--user-group",
        ]);
        if let Some(g) = extra_group {
            cmd.args(["-G", g]);
        }
        let st = cmd.arg(&name).status().expect("useradd (package passwd)");
        assert!(st.success(), "useradd {name} failed");
        let id = |flag: &str| -> u32 {
            let out = Command::new("id")
                .arg(flag)
                .arg(&name)
                .output()
                .expect("id");
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse()
                .expect("numeric id")
        };
        ThrowawayUser {
            uid: id("-u"),
            gid: id("-g"),
            name,
        }
    }

    /// Runs `program args…` as this user (real and effective ids, with the given
    /// supplementary groups only) through util-linux `setpriv`.
    pub fn command(&self, program: &Path, groups: &[u32]) -> Command {
        let mut c = Command::new("setpriv");
        c.arg(format!("--reuid={}", self.uid))
            .arg(format!("--regid={}", self.gid));
        if groups.is_empty() {
            c.arg("--clear-groups");
        } else {
            let g: Vec<String> = groups.iter().map(u32::to_string).collect();
            c.arg(format!("--groups={}", g.join(",")));
        }
        c.arg("--").arg(program);
        c
    }
}

impl Drop for ThrowawayUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.name).status();
        let _ = Command::new("groupdel")
            .arg(&self.name)
            .stderr(Stdio::null())
            .status();
    }
}

/// A loop device over an image file: the stand-in for a USB disk partition. Detached on
/// drop (after unmounting anything still mounted from it).
#[derive(Debug)]
pub struct LoopDisk {
    pub image: PathBuf,
    /// `/dev/loopN`.
    pub dev: PathBuf,
    pub kname: String,
    /// (major, minor) of the device node.
    pub rdev: (u64, u64),
}

impl LoopDisk {
    /// A `size_mib` image formatted with `mkfs` (e.g. `["mkfs.ext4", "-q", "-F"]`; the
    /// image path is appended), or left blank when `mkfs` is empty.
    pub fn new(dir: &Path, name: &str, size_mib: u64, mkfs: &[&str]) -> LoopDisk {
        let image = dir.join(format!("{name}.img"));
        let f = std::fs::File::create(&image).expect("image");
        f.set_len(size_mib * 1024 * 1024).expect("image size");
        drop(f);
        if let Some((prog, args)) = mkfs.split_first() {
            let st = Command::new(prog)
                .args(args)
                .arg(&image)
                .stdout(Stdio::null())
                .status()
                .expect("mkfs (package e2fsprogs / util-linux)");
            assert!(st.success(), "{prog} failed");
        }
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&image)
            .output()
            .expect("losetup (package mount)");
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        let kname = dev.file_name().unwrap().to_string_lossy().into_owned();
        use std::os::unix::fs::MetadataExt;
        let rdev = std::fs::metadata(&dev).expect("loop node").rdev();
        let rdev = (
            ((rdev >> 32) & 0xffff_f000) | ((rdev >> 8) & 0xfff),
            ((rdev >> 12) & 0xffff_ff00) | (rdev & 0xff),
        );
        LoopDisk {
            image,
            dev,
            kname,
            rdev,
        }
    }

    /// The udev name [`Bed::mark_usb_partition`] gives the device, as udev names a USB
    /// stick's partition: `/dev/disk/by-id/usb-Felhom_Test_<kname>-0:0-part1`.
    pub fn by_id(&self) -> PathBuf {
        PathBuf::from(format!(
            "/dev/disk/by-id/usb-Felhom_Test_{}-0:0-part1",
            self.kname
        ))
    }

    /// The managed fstab line the usb helper writes for this disk (with the file system
    /// options `data`, e.g. vfat's `uid=0,gid=G,umask=0027`).
    pub fn managed_line(
        &self,
        mount_point: &Path,
        fstype: &str,
        name: &str,
        data: Option<&str>,
    ) -> String {
        let data = data.map(|d| format!(",{d}")).unwrap_or_default();
        format!(
            "{} {} {fstype} nosuid,nodev,noexec,noatime,nofail{data},x-systemd.requires=/dev/disk/by-uuid/{},x-felhom.name={name} 0 0",
            self.by_id().display(),
            mount_point.display(),
            self.uuid()
        )
    }

    /// Removes the udev-style link [`Bed::mark_usb_partition`] made, if it is there.
    fn remove_by_id(&self) {
        let link = self.by_id();
        if std::fs::read_link(&link).is_ok_and(|t| t == Path::new("../..").join(&self.kname)) {
            let _ = std::fs::remove_file(&link);
        }
    }

    /// The filesystem UUID as blkid sees it.
    pub fn uuid(&self) -> String {
        let out = Command::new("blkid")
            .args(["-p", "-o", "value", "-s", "UUID"])
            .arg(&self.dev)
            .output()
            .expect("blkid");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for LoopDisk {
    fn drop(&mut self) {
        if let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") {
            let majmin = format!("{}:{}", self.rdev.0, self.rdev.1);
            let targets: Vec<String> = info
                .lines()
                .filter(|l| l.split(' ').nth(2) == Some(majmin.as_str()))
                .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
                .collect();
            for t in targets.iter().rev() {
                let _ = Command::new("umount").arg(t).status();
            }
        }
        self.remove_by_id();
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

impl Bed {
    /// The test seam for "USB-attached": makes `<sysfs>/class/block/<kname>` point into a
    /// USB host controller's subtree as a partition with the disk's major:minor, as a real
    /// USB stick's partition looks in /sys, and gives it the udev link a USB partition
    /// has, [`LoopDisk::by_id`] (in the real /dev; removed when the disk is dropped).
    pub fn mark_usb_partition(&self, disk: &LoopDisk) {
        let link = disk.by_id();
        std::fs::create_dir_all(link.parent().expect("by-id dir")).expect("/dev/disk/by-id");
        disk.remove_by_id();
        std::os::unix::fs::symlink(Path::new("../..").join(&disk.kname), &link)
            .expect("by-id link");
        let real = self.sysfs_root.join(format!(
            "devices/pci0000:00/0000:00:14.0/usb2/2-1/2-1:1.0/host6/target6:0:0/6:0:0:0/block/sdx/{}",
            disk.kname
        ));
        std::fs::create_dir_all(&real).expect("sysfs dir");
        std::fs::write(real.join("partition"), "1\n").expect("sysfs partition");
        std::fs::write(
            real.join("dev"),
            format!("{}:{}\n", disk.rdev.0, disk.rdev.1),
        )
        .expect("sysfs dev");
        let link = self.sysfs_root.join("class/block").join(&disk.kname);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&real, &link).expect("sysfs link");
    }

    /// Makes the same device look like an internal SATA disk (not USB; no `usb-` udev link).
    pub fn mark_sata_partition(&self, disk: &LoopDisk) {
        disk.remove_by_id();
        let real = self.sysfs_root.join(format!(
            "devices/pci0000:00/0000:00:17.0/ata1/host0/target0:0:0/0:0:0:0/block/sdy/{}",
            disk.kname
        ));
        std::fs::create_dir_all(&real).expect("sysfs dir");
        std::fs::write(real.join("partition"), "1\n").expect("sysfs partition");
        std::fs::write(
            real.join("dev"),
            format!("{}:{}\n", disk.rdev.0, disk.rdev.1),
        )
        .expect("sysfs dev");
        let link = self.sysfs_root.join("class/block").join(&disk.kname);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&real, &link).expect("sysfs link");
    }
}

/// major:minor of what is mounted at `target` in this process's namespace.
pub fn mounted_at(target: &Path) -> Option<String> {
    let t = target.to_string_lossy();
    std::fs::read_to_string("/proc/self/mountinfo")
        .ok()?
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(&*t))
        .and_then(|l| l.split(' ').nth(2).map(str::to_string))
}

/// What is mounted at `target` in this process's namespace (the topmost mount): the
/// per-mount options (`rw,nosuid,nodev,noexec,noatime`), the file system type and the
/// source, from /proc/self/mountinfo.
pub fn mount_at(target: &Path) -> Option<MountInfo> {
    let t = target.to_string_lossy();
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let line = info
        .lines()
        .rev()
        .find(|l| l.split(' ').nth(4) == Some(&*t))?;
    let f: Vec<&str> = line.split(' ').collect();
    let sep = f.iter().position(|x| *x == "-")?;
    Some(MountInfo {
        dev: f[2].to_string(),
        options: f[5].split(',').map(str::to_string).collect(),
        fstype: f.get(sep + 1)?.to_string(),
        source: f.get(sep + 2)?.to_string(),
        super_options: f.get(sep + 3)?.split(',').map(str::to_string).collect(),
    })
}

/// One mount, as [`mount_at`] reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    /// major:minor.
    pub dev: String,
    /// The per-mount options.
    pub options: Vec<String>,
    pub fstype: String,
    pub source: String,
    pub super_options: Vec<String>,
}
