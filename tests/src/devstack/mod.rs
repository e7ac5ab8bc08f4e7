//! `felhom-devstack`: the whole product on loopback, in one command, narrated live.
//!
//! It starts `felhom-pvesim` (a node with a few dozen guests), `felhom-hubsim` and a
//! cloudflared `/ready` stand-in; binds the three `felhom-privhelper` sockets and starts a
//! helper per class on the first connection the way systemd does ([`activate`]), with
//! fake `pct`/`smartctl` answering from the host-tool fixtures and a sample hwmon tree for
//! sensors ([`scene`]); makes one privileged call per class through
//! `felhom-agent privileged …` so the audit log has records; and runs `felhom-agent run`
//! with a desired state that differs from the simulated node and a short test poll
//! interval. While it runs it tells what flows ([`watch`], [`narrate`]): reports the hub
//! received, reconcile actions planned, applying and applied (and the guests skipped),
//! the requests that reached the node, helper activations and idle exits, audit records,
//! and (as root) signed operations through the hub: a stop and a snapshot signed by a
//! throw-away operator key the host trusts, and a forged one refused ([`signed`]); then
//! one restore test, `felhom-agent restore-test run` ([`restore`]).
//!
//! It ends after `--cycles N` reports accepted by the hub (and not before one that shows
//! the desired state applied, so the last report shows the guests as the agent left
//! them, however slow the machine, nor before the restore test ended), on Ctrl-C or SIGTERM, or when
//! a component fails (exit 1, naming it and its log). Every child is stopped in order
//! (agent, helpers, simulators: SIGTERM, then SIGKILL after a grace) and reaped; the
//! devstack is a child subreaper and sweeps anything orphaned ([`procs`]). At the end it
//! verifies the audit chain and prints where the logs and state are.
//!
//! No root needed: as an ordinary user the helpers run as that user too (they trust files
//! owned by root or by their own uid, `docs/privhelper.md`) and serve it as the agent's
//! uid; the usb class then shows its refusal path (a disk that is not USB-attached, checked
//! against the real /sys). As root, `--usb-loop` mounts a loop-device image marked as a
//! USB partition in a fake sysfs instead. As root the agent runs as uid 65534 (as the
//! `felhom-agent` user on a host), so it can trust a root-owned `signers.json`; as an
//! ordinary user nobody can make such a file, and the narrative says that the signed
//! operations are skipped and why. Nothing listens beyond loopback.
//!
//! Must never: touch anything outside its run directory (the loop device in `--usb-loop`
//! mode and the `usb-` link in /dev/disk/by-id that udev would give it excepted, both
//! removed at the end), or leave a process behind.

pub mod activate;
pub mod narrate;
pub mod procs;
pub mod restore;
pub mod scene;
pub mod signed;
pub mod watch;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use felhom_protocol::Class;
use serde_json::Value;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use crate::build::{self, Bin};
use crate::hubsim::cloudflared::{FakeCloudflared, ReadyMode};
use activate::{Activator, HelperCommand, HelperEvent};
use narrate::Printer;
use procs::Proc;
use scene::Layout;
use watch::{Event, SimApi};

/// Command-line options.
#[derive(Debug, Clone)]
pub struct Options {
    /// Stop after this many reports accepted by the hub, the last of them showing the
    /// desired state applied; run until Ctrl-C when `None`.
    pub cycles: Option<u64>,
    /// Guests of the simulated node (at least 12: the desired state names 101–112).
    pub guests: u32,
    /// The agent's report interval (the hub's `poll_interval_seconds` and the agent's
    /// `hub.test_min_poll_interval_seconds`).
    pub interval_seconds: u64,
    /// The helpers' `idle_exit_seconds`.
    pub idle_exit_seconds: u64,
    /// Where logs and state go; default `.devstack/run-<time>/` in the workspace.
    pub run_dir: Option<PathBuf>,
    /// As root: a loop-device image as the USB disk the usb helper mounts.
    pub usb_loop: bool,
    /// Build missing or stale binaries (`cargo build`) before starting.
    pub build: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            cycles: None,
            guests: 36,
            interval_seconds: 3,
            idle_exit_seconds: 1,
            run_dir: None,
            usb_loop: false,
            build: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DevstackError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Build(#[from] build::BuildError),
    #[error(transparent)]
    Scene(#[from] scene::SceneError),
    #[error(transparent)]
    Proc(#[from] procs::ProcError),
    #[error(transparent)]
    Activate(#[from] activate::ActivateError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A component did not start or stopped working; the message names its log.
    #[error("{0}")]
    Component(String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> DevstackError {
    let what = what.into();
    move |source| DevstackError::Io { what, source }
}

/// How long `felhom-agent run` gets to stop after SIGTERM: longer than its own drain
/// grace for running actions (30 s), so a normal stop is never cut short.
const AGENT_GRACE: Duration = Duration::from_secs(35);

/// The uid the agent runs as when the devstack runs as root (nobody: not root, so that it
/// can trust a root-owned `signers.json`, as the `felhom-agent` user does on a host).
const AGENT_UID_AS_ROOT: u32 = 65534;

/// How many accepted reports beyond `--cycles` the desired state may take to be applied
/// before the run counts as failed.
const APPLY_GRACE_REPORTS: u64 = 20;

const BINS: [Bin; 6] = [
    build::AGENT,
    build::PRIVHELPER,
    build::PVESIM,
    build::HUBSIM,
    build::FAKE_SMARTCTL,
    build::FAKE_PCT,
];

/// The last `n` lines of a log file (for error messages).
fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Runs the devstack; the exit code is the outcome (0 done or interrupted, 1 a component
/// failed, 2 usage).
pub fn main(opts: Options) -> ExitCode {
    procs::install_panic_hook();
    let start = Instant::now();
    let mut printer = Printer::new(start);
    match prepare(&opts, &mut printer) {
        Ok((bins, layout)) => {
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("felhom-devstack: cannot start the async runtime: {e}");
                    return ExitCode::from(1);
                }
            };
            let mut stack = Stack::new(bins, layout, printer, opts);
            let result = runtime.block_on(stack.run());
            if let Err(e) = &result {
                stack.say("devstack", &format!("FAILED: {e}"));
            }
            let clean = runtime.block_on(stack.shutdown(result.is_err()));
            let code = match &result {
                Ok(End::Cycles(n)) => {
                    stack
                        .printer
                        .plain(&format!("felhom-devstack: done after {n} accepted reports"));
                    0
                }
                Ok(End::Signal(s)) => {
                    stack
                        .printer
                        .plain(&format!("felhom-devstack: {s}: stopped"));
                    0
                }
                Err(e) => {
                    let first = e.to_string();
                    let first = first.lines().next().unwrap_or("");
                    stack
                        .printer
                        .plain(&format!("felhom-devstack: FAILED: {first}"));
                    1
                }
            };
            if code == 0 && !clean {
                stack.printer.plain(
                    "felhom-devstack: FAILED: the stack did not stop cleanly (see the lines above)",
                );
            }
            stack.summary();
            runtime.shutdown_timeout(Duration::from_secs(1));
            if code == 0 && !clean {
                ExitCode::from(1)
            } else {
                ExitCode::from(code)
            }
        }
        Err(e) => {
            eprintln!("felhom-devstack: {e}");
            ExitCode::from(match e {
                DevstackError::Usage(_) => 2,
                _ => 1,
            })
        }
    }
}

/// Checks the options, finds (or builds) the binaries, makes the run directory.
fn prepare(opts: &Options, printer: &mut Printer) -> Result<(PathBuf, Layout), DevstackError> {
    if opts.guests < 12 {
        return Err(DevstackError::Usage(
            "--guests must be at least 12 (the desired state names guests 101 to 112)".into(),
        ));
    }
    if opts.interval_seconds == 0 || opts.idle_exit_seconds == 0 {
        return Err(DevstackError::Usage(
            "--interval and --idle-exit must be at least 1 second".into(),
        ));
    }
    let euid = nix::unistd::geteuid().as_raw();
    if opts.usb_loop && euid != 0 {
        return Err(DevstackError::Usage(
            "--usb-loop needs root (mount(2), losetup); without it the usb helper shows its refusal path".into(),
        ));
    }
    let bins = build::profile_dir()?;
    if opts.build {
        let stale: Vec<&str> = BINS
            .iter()
            .filter(|b| build::is_stale(&bins, **b).unwrap_or(true))
            .map(|b| b.name)
            .collect();
        if !stale.is_empty() {
            printer.line(
                "build",
                &format!(
                    "building {} into {} (cargo build; the first time takes a few minutes)",
                    stale.join(", "),
                    bins.display()
                ),
            );
        }
        build::ensure(&bins, &BINS, false)?;
    } else {
        let missing: Vec<PathBuf> = BINS
            .iter()
            .map(|b| bins.join(b.name))
            .filter(|p| !p.exists())
            .collect();
        if !missing.is_empty() {
            return Err(build::BuildError::Missing {
                missing,
                no_build: true,
            }
            .into());
        }
    }
    printer.restart();
    let root = run_dir(opts, euid, printer)?;
    printer.tee(&Layout::new(&root).narrative);
    Ok((bins, Layout::new(&root)))
}

fn utc_stamp() -> String {
    let f = time::macros::format_description!("[year][month][day]-[hour][minute][second]");
    time::OffsetDateTime::now_utc()
        .format(&f)
        .unwrap_or_else(|_| std::process::id().to_string())
}

/// `--run-dir`, else `.devstack/run-<time>` in the workspace, else a temporary directory;
/// in each case one the helper will trust (see [`scene::check_trusted_chain`]).
fn run_dir(opts: &Options, euid: u32, printer: &mut Printer) -> Result<PathBuf, DevstackError> {
    let make = |p: &Path| -> Result<(), DevstackError> {
        if p.exists() && std::fs::read_dir(p).map_or(true, |mut d| d.next().is_some()) {
            return Err(DevstackError::Usage(format!(
                "run directory {} exists and is not empty",
                p.display()
            )));
        }
        std::fs::create_dir_all(p).map_err(io_err(format!("creating {}", p.display())))
    };
    // as root the agent runs as another uid, which must reach its files
    let check = |p: &Path| -> Result<(), DevstackError> {
        scene::check_trusted_chain(p, euid)?;
        if euid == 0 {
            scene::check_traversable(p, AGENT_UID_AS_ROOT)?;
        }
        Ok(())
    };
    if let Some(p) = &opts.run_dir {
        let p = std::path::absolute(p).map_err(io_err("resolving --run-dir"))?;
        make(&p)?;
        check(&p)?;
        return Ok(p);
    }
    let name = format!("run-{}", utc_stamp());
    let in_repo = build::workspace_root().join(".devstack").join(&name);
    let attempt = make(&in_repo).and_then(|()| check(&in_repo));
    match attempt {
        Ok(()) => Ok(in_repo),
        Err(e) => {
            let _ = std::fs::remove_dir(&in_repo);
            let tmp = std::env::temp_dir().join(format!("felhom-devstack-{name}"));
            printer.line(
                "devstack",
                &format!(
                    "not using {} ({e}); using {}",
                    in_repo.display(),
                    tmp.display()
                ),
            );
            make(&tmp)?;
            check(&tmp)?;
            Ok(tmp)
        }
    }
}

/// How a run ended (when it did not fail).
#[derive(Debug)]
enum End {
    Cycles(u64),
    Signal(&'static str),
}

/// What a simulator printed at start.
struct Started {
    proc: Proc,
    line: Value,
}

/// Starts a simulator and reads its one JSON start line (30 s at most); the rest of its
/// stdout goes to its log.
fn start_sim(name: &str, cmd: &mut Command, log: &Path) -> Result<Started, DevstackError> {
    let (mut proc, stdout) = Proc::spawn_piped(name, cmd, log)?;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let log_path = log.to_path_buf();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        if let Some(Ok(first)) = lines.next() {
            let _ = tx.send(first);
        }
        let mut f = procs::log_file(&log_path).ok();
        for l in lines.map_while(Result::ok) {
            if let Some(f) = f.as_mut() {
                use std::io::Write;
                let _ = writeln!(f, "{l}");
            }
        }
    });
    let line = match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(l) => l,
        Err(_) => {
            let st = proc.stop(Duration::from_secs(2)).ok().map(|e| e.status);
            return Err(DevstackError::Component(format!(
                "{name} printed no start line within 30 s (exit: {st:?}); {}:\n{}",
                log.display(),
                tail(log, 10)
            )));
        }
    };
    let v: Value = serde_json::from_str(&line).map_err(|e| {
        DevstackError::Component(format!("{name}: start line is not JSON ({e}): {line}"))
    })?;
    Ok(Started { proc, line: v })
}

fn str_of(v: &Value, key: &str) -> Result<String, DevstackError> {
    v[key]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| DevstackError::Component(format!("start line lacks {key:?}: {v}")))
}

fn sim_api(start: &Value) -> Result<SimApi, DevstackError> {
    let ca_file = str_of(start, "ca_file")?;
    let pem = std::fs::read_to_string(&ca_file).map_err(io_err(format!("reading {ca_file}")))?;
    let client = crate::harness::build_client(&pem)
        .map_err(|e| DevstackError::Component(format!("client for the simulator: {e}")))?;
    Ok(SimApi {
        client,
        url: str_of(start, "url")?,
        admin_token: str_of(start, "admin_token")?,
    })
}

/// The output of one `felhom-agent` command.
struct CliRun {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl CliRun {
    /// The command's last word: its error line on failure, else its last stdout line.
    fn last_word(&self) -> String {
        let text = if self.code == Some(0) {
            &self.stdout
        } else {
            &self.stderr
        };
        text.lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .trim()
            .trim_start_matches("felhom-agent: ")
            .to_string()
    }
}

/// Loop device over an image, marked as a USB partition in the fake sysfs.
#[derive(Debug)]
struct LoopDisk {
    dev: String,
    rdev: (u64, u64),
}

impl LoopDisk {
    fn create(l: &Layout) -> Result<LoopDisk, DevstackError> {
        use std::os::unix::fs::MetadataExt;
        let image = l.root.join("usb-stick.img");
        let f = std::fs::File::create(&image).map_err(io_err("creating the USB image"))?;
        f.set_len(32 * 1024 * 1024)
            .map_err(io_err("sizing the USB image"))?;
        drop(f);
        let run = |prog: &str, args: &[&std::ffi::OsStr]| -> Result<String, DevstackError> {
            let out = Command::new(prog)
                .args(args)
                .output()
                .map_err(io_err(format!(
                    "{prog} (--usb-loop needs e2fsprogs and mount)"
                )))?;
            if !out.status.success() {
                return Err(DevstackError::Component(format!(
                    "{prog} failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        };
        run(
            "mkfs.ext4",
            &[
                "-q".as_ref(),
                "-F".as_ref(),
                "-L".as_ref(),
                "DEVSTACK".as_ref(),
                image.as_os_str(),
            ],
        )?;
        let dev = run(
            "losetup",
            &["-f".as_ref(), "--show".as_ref(), image.as_os_str()],
        )?;
        let md = std::fs::metadata(&dev).map_err(io_err(format!("stat {dev}")))?;
        let rdev = (
            nix::sys::stat::major(md.rdev()),
            nix::sys::stat::minor(md.rdev()),
        );
        let disk = LoopDisk { dev, rdev };
        if let Err(e) = disk.mark_usb(&l.sysfs) {
            disk.detach();
            return Err(e);
        }
        Ok(disk)
    }

    fn kname(&self) -> &str {
        self.dev.rsplit('/').next().unwrap_or("loop")
    }

    /// The `usb-` udev link the usb helper keys the fstab line on (udev makes one for every
    /// partition of a USB disk; nothing makes one for a loop device).
    fn by_id(&self) -> PathBuf {
        PathBuf::from(format!(
            "/dev/disk/by-id/usb-Felhom_Devstack_{}-0:0-part1",
            self.kname()
        ))
    }

    /// `<sysfs>/class/block/<kname>` → a partition below a USB host controller, as a USB
    /// stick's partition looks in /sys; and its `usb-` udev link in /dev.
    fn mark_usb(&self, sysfs: &Path) -> Result<(), DevstackError> {
        let link = self.by_id();
        std::fs::create_dir_all("/dev/disk/by-id").map_err(io_err("creating /dev/disk/by-id"))?;
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(Path::new("../..").join(self.kname()), &link)
            .map_err(io_err(format!("creating {}", link.display())))?;
        let real = sysfs.join(format!(
            "devices/pci0000:00/0000:00:14.0/usb2/2-1/2-1:1.0/host6/target6:0:0/6:0:0:0/block/sdx/{}",
            self.kname()
        ));
        let e = |what: &str| io_err(format!("fake sysfs: {what}"));
        std::fs::create_dir_all(&real).map_err(e("device dir"))?;
        std::fs::create_dir_all(sysfs.join("class/block")).map_err(e("class/block"))?;
        std::fs::write(real.join("partition"), "1\n").map_err(e("partition"))?;
        std::fs::write(
            real.join("dev"),
            format!("{}:{}\n", self.rdev.0, self.rdev.1),
        )
        .map_err(e("dev"))?;
        std::os::unix::fs::symlink(&real, sysfs.join("class/block").join(self.kname()))
            .map_err(e("link"))
    }

    /// Unmounts whatever is still mounted from it, then detaches it.
    fn detach(&self) {
        let majmin = format!("{}:{}", self.rdev.0, self.rdev.1);
        if let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") {
            for l in info
                .lines()
                .filter(|l| l.split(' ').nth(2) == Some(&majmin))
            {
                if let Some(target) = l.split(' ').nth(4) {
                    let _ = Command::new("umount").arg(target).status();
                }
            }
        }
        let link = self.by_id();
        if std::fs::read_link(&link).is_ok_and(|t| t == Path::new("../..").join(self.kname())) {
            let _ = std::fs::remove_file(&link);
        }
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// SIGINT/SIGTERM, caught from the moment the first child is started: set-up checks it
/// between steps, the main loop is woken by it.
#[derive(Debug, Default)]
struct Interrupt {
    name: std::sync::Mutex<Option<&'static str>>,
    notify: tokio::sync::Notify,
}

impl Interrupt {
    fn end(&self) -> Option<End> {
        self.name
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(End::Signal)
    }

    /// Installs the handlers (from now on the signals no longer end the process) and
    /// records the first one that arrives.
    fn install(self: &Arc<Self>) -> Result<(), DevstackError> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut int = signal(SignalKind::interrupt()).map_err(io_err("SIGINT handler"))?;
        let mut term = signal(SignalKind::terminate()).map_err(io_err("SIGTERM handler"))?;
        let me = self.clone();
        tokio::spawn(async move {
            let name = tokio::select! {
                _ = int.recv() => "interrupted (SIGINT)",
                _ = term.recv() => "SIGTERM",
            };
            *me.name.lock().unwrap_or_else(|p| p.into_inner()) = Some(name);
            me.notify.notify_one();
        });
        Ok(())
    }
}

/// Everything started, so that shutdown can stop exactly that.
struct Stack {
    bins: PathBuf,
    layout: Layout,
    printer: Printer,
    opts: Options,
    euid: u32,
    pvesim: Option<Proc>,
    hubsim: Option<Proc>,
    agent: Option<Proc>,
    cloudflared: Option<FakeCloudflared>,
    activators: Vec<Activator>,
    helper_events: Option<UnboundedReceiver<HelperEvent>>,
    events: Option<UnboundedReceiver<Event>>,
    events_tx: Option<tokio::sync::mpsc::UnboundedSender<Event>>,
    watchers: Vec<tokio::task::JoinHandle<()>>,
    /// Each watcher's finished polling rounds.
    rounds: Vec<watch::Rounds>,
    loop_disk: Option<LoopDisk>,
    usb_mounted: bool,
    /// Every process started: (name, pid).
    started: Vec<(String, i32)>,
    activations: BTreeMap<&'static str, u32>,
    interrupt: Arc<Interrupt>,
    accepted: u64,
    /// An accepted report has shown the desired state applied.
    state_applied: bool,
    /// The signed operations to show, until they are started (after the first report).
    signed: Option<signed::Demo>,
    /// The signed operations were skipped (not root).
    signed_skipped: bool,
    /// Accepted reports when the signed operations had been shown.
    signed_done_at: Option<u64>,
    /// Why they did not end as they must.
    signed_error: Option<String>,
    /// The restore test to show, until it is started (after the signed operations).
    restore: Option<restore::Demo>,
    /// The restore test was shown.
    restore_done: bool,
    /// Why it did not end as it must.
    restore_error: Option<String>,
    applied: u64,
    failed_actions: u64,
    leftovers: Vec<String>,
}

impl Stack {
    fn new(bins: PathBuf, layout: Layout, printer: Printer, opts: Options) -> Stack {
        Stack {
            bins,
            layout,
            printer,
            opts,
            euid: nix::unistd::geteuid().as_raw(),
            pvesim: None,
            hubsim: None,
            agent: None,
            cloudflared: None,
            activators: Vec::new(),
            helper_events: None,
            events: None,
            events_tx: None,
            watchers: Vec::new(),
            rounds: Vec::new(),
            loop_disk: None,
            usb_mounted: false,
            started: Vec::new(),
            activations: BTreeMap::new(),
            interrupt: Arc::new(Interrupt::default()),
            accepted: 0,
            state_applied: false,
            signed: None,
            signed_skipped: false,
            signed_done_at: None,
            signed_error: None,
            restore: None,
            restore_done: false,
            restore_error: None,
            applied: 0,
            failed_actions: 0,
            leftovers: Vec::new(),
        }
    }

    fn bin(&self, b: Bin) -> PathBuf {
        self.bins.join(b.name)
    }

    /// A new watcher's round counter.
    fn rounds(&mut self) -> watch::Rounds {
        let r = watch::Rounds::default();
        self.rounds.push(r.clone());
        r
    }

    /// Waits until every watcher has gone through a whole polling round begun after now,
    /// so what happened before now has been told (an event, not a guessed time; the
    /// bound is only for a watcher that hangs).
    async fn catch_up(&mut self) {
        let want: Vec<u64> = self.rounds.iter().map(|r| r.count() + 2).collect();
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.rounds.iter().zip(&want).any(|(r, w)| r.count() < *w) {
            if Instant::now() >= deadline {
                self.say("devstack", "a watcher did not catch up in 30 s");
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn say(&mut self, who: &str, text: &str) {
        self.printer.line(who, text);
    }

    /// The uid and gid the agent runs as: as root not root (so that it can trust a
    /// root-owned `signers.json`), else the user's.
    fn agent_uid_gid(&self) -> (u32, u32) {
        if self.euid == 0 {
            (AGENT_UID_AS_ROOT, AGENT_UID_AS_ROOT)
        } else {
            (self.euid, nix::unistd::getegid().as_raw())
        }
    }

    /// `felhom-agent --config <agent.json> ARGS…` to completion; its output is kept in
    /// `logs/calls.log`.
    fn agent_cli(&mut self, args: &[&str]) -> Result<CliRun, DevstackError> {
        let mut cmd = Command::new(self.bin(build::AGENT));
        cmd.arg("--config")
            .arg(&self.layout.agent_config)
            .args(args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        {
            use std::os::unix::process::CommandExt;
            cmd.process_group(0);
            if self.euid == 0 {
                let (uid, gid) = self.agent_uid_gid();
                cmd.uid(uid).gid(gid);
            }
        }
        let child = cmd.spawn().map_err(io_err("starting felhom-agent"))?;
        let pid = child.id() as i32;
        procs::register(pid);
        self.started
            .push((format!("felhom-agent {}", args.join(" ")), pid));
        let out = child
            .wait_with_output()
            .map_err(io_err("waiting for felhom-agent"))?;
        procs::unregister(pid);
        // what happened during the call (a helper activated by it) comes before its result
        self.pump(Duration::ZERO);
        let run = CliRun {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        if let Ok(mut f) = procs::log_file(&self.layout.log("calls.log")) {
            use std::io::Write;
            let _ = writeln!(
                f,
                "$ felhom-agent --config {} {}\n{}{}[exit {:?}]\n",
                self.layout.agent_config.display(),
                args.join(" "),
                run.stdout,
                run.stderr,
                run.code
            );
        }
        Ok(run)
    }

    async fn run(&mut self) -> Result<End, DevstackError> {
        let l = self.layout.clone();
        self.say(
            "devstack",
            &format!("run directory {} (logs, state, sockets)", l.root.display()),
        );
        procs::become_subreaper()?;
        self.interrupt.install()?;
        let (agent_uid, agent_gid) = self.agent_uid_gid();
        l.create(agent_uid, agent_gid, self.euid == 0)?;
        let (tx, rx) = unbounded_channel::<Event>();
        self.events = Some(rx);
        self.events_tx = Some(tx.clone());

        // the simulators
        let pve = start_sim(
            "felhom-pvesim",
            Command::new(self.bin(build::PVESIM)).args([
                "--guests",
                &self.opts.guests.to_string(),
                // long enough that a guest's second action is seen waiting behind its first
                "--task-seconds",
                "0.3",
                "--node",
                "pve1",
            ]),
            &l.log("pvesim.log"),
        )?;
        let pve_line = pve.line.clone();
        self.started.push(("felhom-pvesim".into(), pve.proc.pid()));
        let pve_pid = pve.proc.pid();
        self.pvesim = Some(pve.proc);
        self.say(
            "pvesim",
            &format!(
                "up: {} PVE {}, node {}, {} guests (pid {pve_pid})",
                str_of(&pve_line, "url")?,
                pve_line["pve_version"].as_str().unwrap_or("?"),
                str_of(&pve_line, "node")?,
                self.opts.guests
            ),
        );
        let interval = self.opts.interval_seconds;
        let hub = start_sim(
            "felhom-hubsim",
            Command::new(self.bin(build::HUBSIM)).args(["--poll-interval", &interval.to_string()]),
            &l.log("hubsim.log"),
        )?;
        let hub_line = hub.line.clone();
        let hub_pid = hub.proc.pid();
        self.started.push(("felhom-hubsim".into(), hub_pid));
        self.hubsim = Some(hub.proc);
        self.say(
            "hubsim",
            &format!(
                "up: {}, answering poll_interval_seconds {interval} (pid {hub_pid})",
                str_of(&hub_line, "url")?
            ),
        );
        let cf = FakeCloudflared::start(ReadyMode::Ready { connections: 4 })
            .await
            .map_err(io_err("starting the cloudflared /ready stand-in"))?;
        let cf_url = cf.url();
        self.cloudflared = Some(cf);
        self.say(
            "cloudflared",
            &format!("/ready stand-in on {cf_url}: ready, 4 connections"),
        );
        let pve_api = sim_api(&pve_line)?;
        let hub_api = sim_api(&hub_line)?;
        let agent_id = crate::signing::random_agent_id();

        if let Some(e) = self.interrupt.end() {
            return Ok(e);
        }
        // files
        scene::write_fixtures(&l)?;
        scene::write_fake_tools(
            &l,
            &self.bin(build::FAKE_SMARTCTL),
            &self.bin(build::FAKE_PCT),
        )?;
        let (hwmon_root, temps) = scene::write_hwmon(&l)?;
        let usb_device = if self.opts.usb_loop {
            let d = LoopDisk::create(&l)?;
            let dev = d.dev.clone();
            self.loop_disk = Some(d);
            self.say(
                "usb",
                &format!("{dev}: a 32 MiB ext4 image, marked as a USB stick's partition in a fake sysfs ({})", l.rel(&l.sysfs)),
            );
            dev
        } else {
            scene::non_usb_block_device().unwrap_or_else(|| "/dev/sdz1".into())
        };
        let sysfs_root = if self.opts.usb_loop {
            l.sysfs.clone()
        } else {
            PathBuf::from("/sys")
        };
        scene::write_helper_config(
            &l,
            agent_uid,
            agent_gid,
            self.opts.idle_exit_seconds,
            &sysfs_root,
        )?;
        scene::write_agent_config(
            &l,
            &scene::AgentInputs {
                node: &str_of(&pve_line, "node")?,
                pve_url: &str_of(&pve_line, "url")?,
                pve_token_id: &str_of(&pve_line, "token_id")?,
                pve_token_secret: &str_of(&pve_line, "token_secret")?,
                pve_pin: &str_of(&pve_line, "pin_sha256")?,
                hub_url: &str_of(&hub_line, "url")?,
                hub_token: &str_of(&hub_line, "token")?,
                hub_ca_file: Path::new(&str_of(&hub_line, "ca_file")?),
                cloudflared_url: &cf_url,
                hwmon_root: &hwmon_root,
                interval_seconds: interval,
                agent_id: &agent_id,
                agent_owner: (self.euid == 0).then_some((agent_uid, agent_gid)),
            },
        )?;
        scene::write_keyctl_spec(&l)?;
        let disks: Vec<String> = scene::DISKS
            .iter()
            .map(|(d, fx)| {
                format!(
                    "{d}={}",
                    fx.trim_start_matches("smartctl-").trim_end_matches(".json")
                )
            })
            .collect();
        self.say(
            "devstack",
            &format!(
                "wrote {} (fake smartctl: {}), {}, hwmon tree with {temps} temperatures",
                l.rel(&l.helper_config),
                disks.join(" "),
                l.rel(&l.agent_config)
            ),
        );
        if self.euid == 0 {
            self.say(
                "devstack",
                &format!(
                    "running as root: the helpers run as root, the agent as uid {agent_uid} (as the felhom-agent user on a host), which the helpers serve as the agent"
                ),
            );
        } else {
            self.say(
                "devstack",
                &format!(
                    "running as uid {} without root: the helpers run as uid {} too, trust files of root or their own uid, and serve uid {} as the agent",
                    self.euid, self.euid, self.euid
                ),
            );
        }
        self.prepare_signed(
            &l,
            &hub_api,
            &pve_api,
            &agent_id,
            &str_of(&pve_line, "node")?,
        )?;
        self.restore = Some(restore::Demo {
            pve: pve_api.clone(),
            agent_bin: self.bin(build::AGENT),
            agent_config: l.agent_config.clone(),
            as_uid: (self.euid == 0).then_some((agent_uid, agent_gid)),
            calls_log: l.log("calls.log"),
        });

        if let Some(e) = self.interrupt.end() {
            return Ok(e);
        }
        // the helper sockets, activated on demand
        let (htx, hrx) = unbounded_channel::<HelperEvent>();
        self.helper_events = Some(hrx);
        let gid = (self.euid == 0).then_some(agent_gid);
        for class in Class::ALL {
            let (path, listener) = activate::bind(class, &l.sockets, 0o660, gid)?;
            self.activators.push(Activator::start(
                class,
                path,
                listener,
                HelperCommand {
                    bin: self.bin(build::PRIVHELPER),
                    config: l.helper_config.clone(),
                    log: l.log(&format!("helper-{class}.log")),
                },
                htx.clone(),
            ));
        }
        self.say(
            "sockets",
            &format!(
                "{} bound and listening in {}; a helper starts on the first connection (LISTEN_FDS=1) and exits after {} s idle",
                Class::ALL.map(|c| c.socket_name()).join(", "),
                l.rel(&l.sockets),
                self.opts.idle_exit_seconds
            ),
        );

        // watchers that do not need the agent daemon
        let rounds = self.rounds();
        self.watchers.push(tokio::spawn(watch::hub_reports(
            hub_api,
            l.reports.clone(),
            tx.clone(),
            rounds,
        )));
        let rounds = self.rounds();
        self.watchers.push(tokio::spawn(watch::pve_requests(
            pve_api,
            tx.clone(),
            rounds,
        )));
        let rounds = self.rounds();
        self.watchers.push(tokio::spawn(watch::audit_log(
            l.audit_log.clone(),
            tx.clone(),
            rounds,
        )));

        if let Some(e) = self.interrupt.end() {
            return Ok(e);
        }
        // what the agent would do
        let plan = self.agent_cli(&["plan", "--json"])?;
        if plan.code != Some(0) {
            return Err(DevstackError::Component(format!(
                "felhom-agent plan failed (exit {:?}): {}",
                plan.code,
                plan.last_word()
            )));
        }
        match serde_json::from_str::<Value>(&plan.stdout) {
            Ok(p) => self.printer.block("plan", &narrate::plan_lines(&p)),
            Err(e) => self.say("plan", &format!("not JSON ({e}); see logs/calls.log")),
        }

        // one privileged call per class, so the audit log has records
        let ping = self.agent_cli(&["privileged", "ping"])?;
        let pings: Vec<String> = ping
            .stdout
            .lines()
            .map(|l| match l.split_once(": ok") {
                Some((c, _)) => format!("{c} ok"),
                None => l.to_string(),
            })
            .collect();
        self.say("call", &format!("privileged ping → {}", pings.join(" · ")));
        if ping.code != Some(0) {
            return Err(DevstackError::Component(format!(
                "the helpers do not answer (felhom-agent privileged ping: {}); see logs/helper-*.log",
                ping.last_word()
            )));
        }
        self.pump(Duration::from_millis(300));
        let smart = self.agent_cli(&["privileged", "smart", "sdb"])?;
        let smart_text = match serde_json::from_str::<Value>(&smart.stdout) {
            Ok(v) => format!(
                "{} {}, SMART {}, exit status {}",
                v["model_name"].as_str().unwrap_or("?"),
                v["serial_number"].as_str().unwrap_or("?"),
                match v["smart_status"]["passed"].as_bool() {
                    Some(true) => "passed",
                    Some(false) => "FAILED",
                    None => "unknown",
                },
                v["smartctl"]["exit_status"]
            ),
            Err(_) => smart.last_word(),
        };
        self.say("call", &format!("privileged smart sdb → {smart_text}"));
        self.pump(Duration::from_millis(300));
        let spec = l.keyctl_spec.display().to_string();
        let create = self.agent_cli(&["privileged", "create-keyctl", &spec])?;
        self.say(
            "call",
            &format!(
                "privileged create-keyctl {} → {} (fake pct; see {})",
                l.rel(&l.keyctl_spec),
                create.last_word(),
                l.rel(&l.log("pct-calls.jsonl"))
            ),
        );
        self.pump(Duration::from_millis(300));
        let mount = self.agent_cli(&["privileged", "usb-mount", &usb_device, "backup"])?;
        let refused = mount.code != Some(0);
        self.usb_mounted = !refused;
        self.say(
            "call",
            &format!(
                "privileged usb-mount {usb_device} backup → {}{}",
                if refused { "refused: " } else { "" },
                mount.last_word()
            ),
        );
        if refused && !self.opts.usb_loop {
            self.say(
                "usb",
                "the refusal path: that disk is not attached through USB (checked against the real /sys); as root, --usb-loop mounts a loop-device image as a USB stand-in",
            );
        }
        self.pump(Duration::from_millis(300));

        if let Some(e) = self.interrupt.end() {
            return Ok(e);
        }
        // the daemon
        let mut cmd = Command::new(self.bin(build::AGENT));
        cmd.arg("run")
            .arg("--config")
            .arg(&l.agent_config)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("RUST_LOG", "info")
            .env("FELHOM_AGENT_LOG", "info");
        if self.euid == 0 {
            use std::os::unix::process::CommandExt;
            cmd.uid(agent_uid).gid(agent_gid);
        }
        let agent = Proc::spawn("felhom-agent run", &mut cmd, &l.log("agent.log"))?;
        let agent_pid = agent.pid();
        self.started.push(("felhom-agent run".into(), agent_pid));
        self.agent = Some(agent);
        self.say(
            "agent",
            &format!(
                "felhom-agent run (pid {agent_pid}, uid {agent_uid}): reports every {interval} s, desired state {}, SMART of {} disks every cycle",
                l.rel(&l.desired),
                scene::DISKS.len()
            ),
        );
        let rounds = self.rounds();
        self.watchers.push(tokio::spawn(watch::queue(
            l.control_socket.clone(),
            tx.clone(),
            rounds,
        )));
        let rounds = self.rounds();
        self.watchers.push(tokio::spawn(watch::journal(
            l.control_socket.clone(),
            tx.clone(),
            rounds,
        )));
        let rounds = self.rounds();
        self.watchers.push(tokio::spawn(watch::agent_log(
            l.log("agent.log"),
            tx.clone(),
            rounds,
        )));

        self.main_loop().await
    }

    /// As root: a throw-away operator key, `signers.json` trusting it alone, and the
    /// operations to show once the agent reports ([`signed`]). Otherwise: says why they are
    /// skipped.
    fn prepare_signed(
        &mut self,
        l: &Layout,
        hub_api: &SimApi,
        pve_api: &SimApi,
        agent_id: &str,
        node: &str,
    ) -> Result<(), DevstackError> {
        if self.euid != 0 {
            self.signed_skipped = true;
            self.say(
                "ops",
                "signed operations: skipped: the agent trusts only a signers.json owned by root and not by its own uid, and without root the devstack can make neither (run it as root to see a signed stop, a signed snapshot and a forged operation refused)",
            );
            return Ok(());
        }
        let key = crate::signing::TestKey::generate("devstack-operator")
            .map_err(|e| DevstackError::Component(e.to_string()))?;
        scene::write_signers(l, &key)?;
        self.say(
            "ops",
            &format!(
                "{} (root, 0644) trusts one key, devstack-operator, made for this run (its private half stays in this process); agent_id {agent_id}",
                l.rel(&l.signers)
            ),
        );
        let managed = scene::desired_state()["guests"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|g| g["vmid"].as_u64())
            .collect();
        self.signed = Some(signed::Demo {
            ops: crate::hubsim::control::OpsControl::new(
                hub_api.client.clone(),
                &hub_api.url,
                &hub_api.admin_token,
            ),
            pve: pve_api.clone(),
            key,
            agent_id: agent_id.to_owned(),
            node: node.to_owned(),
            managed,
        });
        Ok(())
    }

    /// Prints what arrived within `wait` (keeps the narrative in order during set-up).
    fn pump(&mut self, wait: Duration) {
        let until = Instant::now() + wait;
        loop {
            let mut any = false;
            while let Some(ev) = self.events.as_mut().and_then(|r| r.try_recv().ok()) {
                self.on_event(ev);
                any = true;
            }
            while let Some(ev) = self.helper_events.as_mut().and_then(|r| r.try_recv().ok()) {
                let _ = self.on_helper(ev);
                any = true;
            }
            if Instant::now() >= until {
                break;
            }
            if !any {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Line { who, text } => self.printer.line(who, &text),
            Event::Report {
                accepted,
                applied,
                lines,
                ..
            } => {
                if accepted {
                    self.accepted += 1;
                    self.state_applied |= applied;
                }
                self.printer.block("hub", &lines);
            }
            Event::Finished { ok } => {
                if ok {
                    self.applied += 1;
                } else {
                    self.failed_actions += 1;
                }
            }
            Event::SignedDone { error } => {
                self.signed_done_at = Some(self.accepted);
                self.signed_error = error;
            }
            Event::RestoreDone { error } => {
                self.restore_done = true;
                self.restore_error = error;
            }
        }
    }

    /// Prints a helper event; `Err` when the class is out of service.
    fn on_helper(&mut self, ev: HelperEvent) -> Result<(), DevstackError> {
        match ev {
            HelperEvent::Activated { class, pid, n } => {
                *self.activations.entry(class.as_str()).or_default() += 1;
                self.started
                    .push((format!("felhom-privhelper --class {class}"), pid));
                let text = if n == 1 {
                    format!("{class}: activated by a connection (pid {pid})")
                } else {
                    format!("{class}: activated again, #{n} (pid {pid})")
                };
                self.say("helper", &text);
                Ok(())
            }
            HelperEvent::Exited {
                class,
                pid,
                n: _,
                status,
                ran,
                stopped,
            } => {
                let text = if stopped {
                    format!("{class}: stopped (pid {pid}, {status})")
                } else if status.success() {
                    format!(
                        "{class}: exited after {} s idle (pid {pid}, ran {:.1} s); the socket stays bound here",
                        self.opts.idle_exit_seconds,
                        ran.as_secs_f64()
                    )
                } else {
                    format!("{class}: exited with {status} (pid {pid})")
                };
                self.say("helper", &text);
                Ok(())
            }
            HelperEvent::Failed { class, message } => Err(DevstackError::Component(format!(
                "the {class} helper failed: {message}\n{}",
                tail(&self.layout.log(&format!("helper-{class}.log")), 5)
            ))),
        }
    }

    async fn main_loop(&mut self) -> Result<End, DevstackError> {
        let interrupt = self.interrupt.clone();
        let (Some(mut events), Some(mut helper_events)) =
            (self.events.take(), self.helper_events.take())
        else {
            return Err(DevstackError::Component(
                "internal: no event channels".into(),
            ));
        };
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        let patience = Duration::from_secs(2 * self.opts.interval_seconds + 30);
        let mut last_progress = Instant::now();
        let result = loop {
            tokio::select! {
                Some(ev) = events.recv() => {
                    let before = self.accepted;
                    self.on_event(ev);
                    let failed = match (self.signed_error.take(), self.restore_error.take()) {
                        (Some(e), _) => Some(format!("signed operations: {e}")),
                        (None, Some(e)) => Some(format!("restore test: {e}")),
                        (None, None) => None,
                    };
                    if let Some(e) = failed {
                        // a component that died is the cause, not what it broke; a
                        // demo's read can fail the moment a killed component's socket
                        // closes, before its exit is seen, so look for a while
                        let mut dead = self.check_alive();
                        for _ in 0..30 {
                            if dead.is_some() {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            dead = self.check_alive();
                        }
                        if let Some(dead) = dead {
                            break Err(dead);
                        }
                        break Err(DevstackError::Component(format!(
                            "{e}; see {}:\n{}",
                            self.layout.log("agent.log").display(),
                            tail(&self.layout.log("agent.log"), 10)
                        )));
                    }
                    // the signed operations ended (or were skipped and the agent reports):
                    // show the restore test
                    if (self.signed_done_at.is_some() || (self.signed_skipped && self.accepted > 0))
                        && let (Some(demo), Some(tx)) = (self.restore.take(), self.events_tx.clone())
                    {
                        self.watchers.push(tokio::spawn(demo.run(tx)));
                    }
                    if self.accepted > before {
                        last_progress = Instant::now();
                        // the agent is up and reporting: show the signed operations
                        if let (Some(demo), Some(tx)) = (self.signed.take(), self.events_tx.clone()) {
                            self.watchers.push(tokio::spawn(demo.run(tx)));
                        }
                        if let Some(n) = self.opts.cycles
                            && self.accepted >= n
                        {
                            // a report's reconcile section predates its guests, so
                            // this report lists them as the agent left them; the
                            // second report after the signed operations ended was
                            // collected a report interval after the first one was
                            // sent, so it certainly shows their guests as they left them
                            let signed_settled = self.signed_skipped
                                || self.signed_done_at.is_some_and(|at| self.accepted >= at + 2);
                            if self.state_applied && signed_settled && self.restore_done {
                                break Ok(End::Cycles(self.accepted));
                            }
                            if self.accepted >= n + APPLY_GRACE_REPORTS {
                                break Err(DevstackError::Component(format!(
                                    "the desired state was not applied, or the signed operations or the restore test not shown, in {} accepted reports; see {}:\n{}",
                                    self.accepted,
                                    self.layout.log("agent.log").display(),
                                    tail(&self.layout.log("agent.log"), 10)
                                )));
                            }
                        }
                    }
                }
                Some(ev) = helper_events.recv() => {
                    if let Err(e) = self.on_helper(ev) {
                        break Err(e);
                    }
                }
                _ = interrupt.notify.notified() => {
                    if let Some(e) = interrupt.end() {
                        break Ok(e);
                    }
                }
                _ = tick.tick() => {
                    if let Some(e) = self.check_alive() {
                        break Err(e);
                    }
                    if last_progress.elapsed() > patience {
                        break Err(DevstackError::Component(format!(
                            "no report reached the hub for {} s; see {}:\n{}",
                            patience.as_secs(),
                            self.layout.log("agent.log").display(),
                            tail(&self.layout.log("agent.log"), 10)
                        )));
                    }
                }
            }
        };
        self.events = Some(events);
        self.helper_events = Some(helper_events);
        result
    }

    /// A component that stopped on its own is a failure.
    fn check_alive(&mut self) -> Option<DevstackError> {
        for p in [&mut self.agent, &mut self.pvesim, &mut self.hubsim]
            .into_iter()
            .flatten()
        {
            if let Some(st) = p.poll_exit() {
                return Some(DevstackError::Component(format!(
                    "{} (pid {}) exited unexpectedly ({st}); {}:\n{}",
                    p.name,
                    p.pid(),
                    p.log.display(),
                    tail(&p.log, 10)
                )));
            }
        }
        None
    }

    fn stop_proc(&mut self, which: fn(&mut Stack) -> &mut Option<Proc>, grace: Duration) -> bool {
        let Some(mut p) = which(self).take() else {
            return true;
        };
        let (name, pid) = (p.name.clone(), p.pid());
        match p.stop(grace) {
            Ok(e) => {
                let how = if e.already {
                    "had exited"
                } else if e.killed {
                    "did not stop within the grace period: killed"
                } else {
                    "stopped"
                };
                self.say(
                    "devstack",
                    &format!("{name} (pid {pid}) {how}: {}", e.status),
                );
                !e.killed
            }
            Err(e) => {
                self.say("devstack", &format!("{name} (pid {pid}): {e}"));
                false
            }
        }
    }

    /// Stops everything in order and reaps it; `false` when something had to be killed
    /// or was left over. After a failure the agent gets a short grace: its running
    /// actions may be waiting on a node that is gone.
    async fn shutdown(&mut self, failed: bool) -> bool {
        // let the watchers catch up while the agent still answers on its control socket
        self.catch_up().await;
        self.pump(Duration::ZERO);
        self.say("devstack", "stopping: agent, helpers, simulators");
        let grace = if failed {
            Duration::from_secs(5)
        } else {
            AGENT_GRACE
        };
        let mut clean = self.stop_proc(|s| &mut s.agent, grace);
        if self.usb_mounted {
            match self.agent_cli(&["privileged", "usb-unmount", "backup"]) {
                Ok(r) => {
                    let w = r.last_word();
                    self.say("call", &format!("privileged usb-unmount backup → {w}"));
                }
                Err(e) => self.say("call", &format!("privileged usb-unmount backup: {e}")),
            }
        }
        // the last audit records and reports, then no more watching
        self.catch_up().await;
        for w in self.watchers.drain(..) {
            w.abort();
            let _ = w.await;
        }
        self.events_tx = None;
        self.pump(Duration::ZERO);
        let mut activators = std::mem::take(&mut self.activators);
        for a in activators.iter_mut() {
            a.stop();
        }
        drop(activators);
        self.pump(Duration::ZERO);
        clean &= self.stop_proc(|s| &mut s.hubsim, Duration::from_secs(5));
        clean &= self.stop_proc(|s| &mut s.pvesim, Duration::from_secs(5));
        self.cloudflared = None;
        if let Some(d) = self.loop_disk.take() {
            d.detach();
            self.say("usb", &format!("{} detached", d.dev));
        }
        let orphans = procs::sweep(Duration::from_secs(2));
        if !orphans.is_empty() {
            self.say(
                "devstack",
                &format!("swept orphaned processes: {}", orphans.join(", ")),
            );
        }
        let _ = std::fs::remove_file(&self.layout.control_socket);
        self.leftovers = self
            .started
            .iter()
            .filter(|(_, pid)| procs::alive(*pid))
            .map(|(n, pid)| format!("{n} (pid {pid})"))
            .chain(
                procs::children_of(std::process::id() as i32)
                    .into_iter()
                    .map(|(p, c)| format!("{c} (pid {p})")),
            )
            .collect();
        if self.leftovers.is_empty() {
            self.say(
                "devstack",
                &format!(
                    "all {} processes started are gone (pids {})",
                    self.started.len(),
                    self.started
                        .iter()
                        .map(|(_, p)| p.to_string())
                        .collect::<Vec<_>>()
                        .join(" ")
                ),
            );
        } else {
            clean = false;
            self.say(
                "devstack",
                &format!("LEFT BEHIND: {}", self.leftovers.join(", ")),
            );
        }
        clean &= self.verify_audit();
        clean
    }

    /// `felhom-privhelper audit verify` on the run's audit log.
    fn verify_audit(&mut self) -> bool {
        if !self.layout.audit_log.exists() {
            self.say("audit", "no audit log was written");
            return true;
        }
        let out = Command::new(self.bin(build::PRIVHELPER))
            .args(["audit", "verify", "--log"])
            .arg(&self.layout.audit_log)
            .output();
        match out {
            Ok(o) => {
                let text = String::from_utf8_lossy(if o.status.success() {
                    &o.stdout
                } else {
                    &o.stderr
                })
                .lines()
                .last()
                .unwrap_or("")
                .to_string();
                self.say("audit", &format!("felhom-privhelper audit verify: {text}"));
                o.status.success()
            }
            Err(e) => {
                self.say("audit", &format!("felhom-privhelper audit verify: {e}"));
                false
            }
        }
    }

    /// Where everything is.
    fn summary(&mut self) {
        let l = self.layout.clone();
        let activations: Vec<String> = self
            .activations
            .iter()
            .map(|(c, n)| format!("{c} {n}×"))
            .collect();
        self.printer.plain(&format!(
            "  {} reports accepted · {} reconcile actions applied, {} failed · helper activations: {}",
            self.accepted,
            self.applied,
            self.failed_actions,
            if activations.is_empty() {
                "none".into()
            } else {
                activations.join(", ")
            }
        ));
        self.printer
            .plain(&format!("logs and state: {}", l.root.display()));
        let rows = [
            ("narrative", "devstack.log".to_string()),
            (
                "felhom-agent",
                format!(
                    "logs/agent.log · config etc/agent.json · desired etc/desired.json · state {}",
                    l.rel(&l.state)
                ),
            ),
            ("felhom-pvesim", "logs/pvesim.log".into()),
            (
                "felhom-hubsim",
                format!("logs/hubsim.log · reports received {}", l.rel(&l.reports)),
            ),
            (
                "helpers",
                "logs/helper-pct.log, logs/helper-usb.log, logs/helper-smart.log · config etc/privhelper.json".into(),
            ),
            ("audit log", l.rel(&l.audit_log).into_owned()),
            (
                "calls",
                "logs/calls.log (felhom-agent plan/privileged) · fake tools logs/smartctl-calls.jsonl, logs/pct-calls.jsonl".into(),
            ),
        ];
        for (what, where_) in rows {
            self.printer.plain(&format!("  {what:<14} {where_}"));
        }
    }
}
