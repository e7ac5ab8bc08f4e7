//! `felhom-devstack`, the README's first command, run for real: two cycles end with exit 0
//! having shown reports received, reconcile actions planned, applied and skipped,
//! privileged calls audited (and their records reaching the hub), helper activation and
//! re-activation after idle exit, signed operations through the hub (as root: a signed
//! stop held then applied, a signed snapshot applied, a forged operation refused, in that
//! order), and no process left behind. Also: without root (a throw-away user; needs root
//! to create it) the signed operations are skipped with the reason, Ctrl-C (SIGINT) ends
//! it cleanly, and a component that dies makes it stop everything and exit 1 naming the
//! component.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use felhom_testbed::build;
use felhom_testbed::privhelper::{ThrowawayUser, is_root};
use serde_json::Value;

fn devstack_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_felhom-devstack"))
}

/// Every binary the devstack starts, built once before any test runs one (the runs
/// themselves then never build, and the non-root one could not).
fn bins_ready() {
    static READY: OnceLock<()> = OnceLock::new();
    READY.get_or_init(|| {
        for b in [
            build::AGENT,
            build::PRIVHELPER,
            build::PVESIM,
            build::HUBSIM,
            build::FAKE_SMARTCTL,
            build::FAKE_PCT,
        ] {
            build::bin_for_tests(b);
        }
    });
}

/// A finished run: its exit status and everything it printed.
struct Run {
    status: ExitStatus,
    out: String,
    run_dir: PathBuf,
}

/// Runs `cmd` (the devstack) to its end, at most `timeout` (then SIGKILL and a panic).
/// `signal_when` gets the output so far; when it returns a signal, that is sent once.
fn run(
    mut cmd: Command,
    run_dir: &Path,
    timeout: Duration,
    signal_when: impl Fn(&str) -> Option<nix::sys::signal::Signal>,
) -> Run {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start felhom-devstack");
    let out = Arc::new(Mutex::new(String::new()));
    let mut readers = Vec::new();
    for pipe in [
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let o = out.clone();
        readers.push(std::thread::spawn(move || {
            for l in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut o = o.lock().unwrap();
                o.push_str(&l);
                o.push('\n');
            }
        }));
    }
    let deadline = Instant::now() + timeout;
    let mut signalled = false;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if !signalled && let Some(sig) = signal_when(&out.lock().unwrap()) {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig).unwrap();
            signalled = true;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "felhom-devstack did not finish within {timeout:?}:\n{}",
                out.lock().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    for r in readers {
        r.join().unwrap();
    }
    let out = out.lock().unwrap().clone();
    Run {
        status,
        out,
        run_dir: run_dir.to_path_buf(),
    }
}

fn never(_: &str) -> Option<nix::sys::signal::Signal> {
    None
}

impl Run {
    fn has(&self, s: &str) -> bool {
        self.out.contains(s)
    }

    /// Each pattern matches a line after the one the previous pattern matched; returns
    /// each match's captures.
    #[track_caller]
    fn expect_in_order(&self, patterns: &[&str]) -> Vec<Vec<String>> {
        let lines: Vec<&str> = self.out.lines().collect();
        let mut from = 0;
        let mut found = Vec::new();
        for p in patterns {
            let re = regex_lite::Regex::new(p).unwrap();
            let Some((i, caps)) = lines[from..]
                .iter()
                .enumerate()
                .find_map(|(i, l)| re.captures(l).map(|c| (from + i, c)))
            else {
                panic!(
                    "no line matching {p:?} after line {from} (patterns in order: {patterns:?}):\n{}",
                    self.out
                );
            };
            found.push(
                caps.iter()
                    .map(|m| m.map_or(String::new(), |m| m.as_str().to_owned()))
                    .collect(),
            );
            from = i + 1;
        }
        found
    }

    #[track_caller]
    fn expect(&self, wanted: &[&str]) {
        for w in wanted {
            assert!(self.has(w), "{w:?} not in the output:\n{}", self.out);
        }
    }

    /// Every pid the output names.
    fn pids(&self) -> BTreeSet<i32> {
        let re = regex_lite::Regex::new(r"pids? ([0-9][0-9 ]*)").unwrap();
        re.captures_iter(&self.out)
            .flat_map(|c| {
                c[1].split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect::<Vec<i32>>()
            })
            .collect()
    }

    /// The reports the hub accepted, as the devstack kept them.
    fn accepted_reports(&self) -> Vec<Value> {
        std::fs::read_to_string(self.run_dir.join("hub-reports.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|r| r["outcome"] == "accepted")
            .map(|r| r["report"].clone())
            .collect()
    }

    /// Nothing of the run is alive: no pid it named, no process whose command line names
    /// its run directory (every helper, fake tool and agent is given a path in it), no
    /// socket file left.
    #[track_caller]
    fn assert_nothing_left(&self) {
        let pids = self.pids();
        assert!(pids.len() >= 8, "too few pids in the output: {pids:?}");
        for pid in &pids {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok();
            assert!(
                stat.is_none(),
                "pid {pid} is still there: {stat:?}\n{}",
                self.out
            );
        }
        let dir = self.run_dir.to_string_lossy().into_owned();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            if let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) {
                let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                assert!(
                    !cmdline.contains(&dir),
                    "left behind: {} {cmdline}",
                    e.path().display()
                );
            }
        }
        for sock in [
            "privhelper-pct.sock",
            "privhelper-usb.sock",
            "privhelper-smart.sock",
            "agent.sock",
        ] {
            assert!(
                !self.run_dir.join("run").join(sock).exists(),
                "socket {sock} left behind"
            );
        }
    }
}

/// A temporary directory the agent (uid 65534 when the devstack runs as root) can pass.
fn open_tempdir() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    tmp
}

fn devstack_cmd(run_dir: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(devstack_bin());
    c.arg("--run-dir").arg(run_dir).args(extra);
    c
}

#[test]
fn two_cycles_show_the_stack_reconciling_and_reporting_and_leave_nothing_behind() {
    bins_ready();
    let tmp = open_tempdir();
    let dir = tmp.path().join("run");
    let started = Instant::now();
    let r = run(
        devstack_cmd(&dir, &["--cycles", "2"]),
        &dir,
        Duration::from_secs(120),
        never,
    );
    let took = started.elapsed();
    assert!(r.status.success(), "exit {:?}:\n{}", r.status, r.out);
    eprintln!("felhom-devstack --cycles 2 took {took:?}");
    r.expect(&[
        // the components came up
        "pvesim    up: https://127.0.0.1:",
        "hubsim    up: https://127.0.0.1:",
        // planned, with the guests it must leave alone
        "desired generation 1: 8 actions planned",
        "skipped: 104 HA-managed, 105 locked (backup), 106 template",
        // a privileged call per class, audited
        "privileged ping → pct ok · usb ok · smart ok",
        "smart: smart_read sdb → ok",
        "pct: pct_create_keyctl CT 150 devstack150 → ok",
        "usb: usb_mount",
        "→ DENIED not_usb",
        // helpers activated on demand, idle exit, activated again
        "smart: activated by a connection",
        "smart: exited after 1 s idle",
        "smart: activated again, #2",
        // reconcile: what reached the node and what the journal says
        "← POST /nodes/pve1/lxc/102/status/start → 200",
        "← POST /nodes/pve1/qemu/103/status/shutdown",
        "reconcile applied start lxc 102",
        "reconcile applied stop qemu 103",
        "reconcile applied set-config qemu 112 (cores, description)",
        "reconcile applied start qemu 109",
        // the hub's view
        "report #1 accepted from pve1",
        "report #2 accepted from pve1",
        "sdc FAILED",
        "sdd standby",
        "cloudflared ready (4 connections)",
        "skipped 104 HA-managed, 105 locked (backup), 106 template",
        // the end
        "audit log OK",
        "logs and state: ",
    ]);
    // Two reports at least; more when the agent needed longer to apply the desired state
    // (the run ends with a report read after that).
    let done =
        regex_lite::Regex::new(r"felhom-devstack: done after ([0-9]+) accepted reports").unwrap();
    let n: u64 = done
        .captures(&r.out)
        .unwrap_or_else(|| panic!("no end line:\n{}", r.out))[1]
        .parse()
        .unwrap();
    assert!(n >= 2, "{}", r.out);
    // What the hub holds agrees with what was narrated.
    let reports = r.accepted_reports();
    assert!(reports.len() >= 2, "{}", r.out);
    let last = &reports[reports.len() - 1];
    assert_eq!(last["guests"].as_array().unwrap().len(), 36);
    assert_eq!(last["cloudflared"]["state"], "ready");
    let skipped: BTreeSet<u64> = last["reconcile"]["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["vmid"].as_u64().unwrap())
        .collect();
    assert_eq!(skipped, BTreeSet::from([104, 105, 106]));
    let audited: Vec<Value> = reports
        .iter()
        .flat_map(|r| r["audit"].as_array().unwrap().clone())
        .collect();
    let ops: BTreeSet<(String, String)> = audited
        .iter()
        .filter(|a| a["kind"] == "outcome")
        .map(|a| {
            (
                a["op"].as_str().unwrap().to_owned(),
                a["result"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for want in [
        ("smart_read", "ok"),
        ("pct_create_keyctl", "ok"),
        ("usb_mount", "denied"),
    ] {
        assert!(
            ops.contains(&(want.0.to_owned(), want.1.to_owned())),
            "{want:?} did not reach the hub: {ops:?}"
        );
    }
    let seqs: Vec<u64> = audited.iter().map(|a| a["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    // The guests really changed on the node: the hub's last report shows them.
    let guest = |vmid: u64| {
        last["guests"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["vmid"] == vmid)
            .unwrap()
            .clone()
    };
    assert_eq!(guest(102)["status"], "running");
    assert_eq!(guest(103)["status"], "stopped");
    assert_eq!(guest(109)["status"], "running");
    assert_eq!(guest(112)["spec"]["cores"], 2);
    assert_eq!(guest(104)["status"], "running", "HA-managed: left alone");
    if is_root() {
        // signed operations, each told as the hub received the agent's decision, in order
        let found = r.expect_in_order(&[
            r"ops +etc/signers\.json \(root, 0644\) trusts one key, devstack-operator",
            r"ops +signed stop (lxc|qemu) ([0-9]+): enqueued at the hub",
            r"ops +signed stop (lxc|qemu) [0-9]+: held \(counted signers: devstack-operator\)",
            r"ops +signed stop (lxc|qemu) [0-9]+: applied, UPID:pve1:",
            r"ops +signed snapshot (lxc|qemu) ([0-9]+) .devstack.: applied, UPID:pve1:",
            r"ops +forged stop (lxc|qemu) ([0-9]+) \(signed by mallory.*: refused bad_signature: ",
            r"ops +(lxc|qemu) [0-9]+: the node received no request for it; the guest still runs",
        ]);
        let stopped: u64 = found[1][2].parse().unwrap();
        let snapped: u64 = found[4][2].parse().unwrap();
        let forged: u64 = found[5][2].parse().unwrap();
        // the node saw the signed requests (narrated from its request log)
        r.expect(&[
            &format!("/{}/{stopped}/status/shutdown", &found[1][1]),
            &format!("/{}/{snapped}/snapshot ", &found[4][1]),
        ]);
        // the last report (received after the operations ended) shows their effect
        assert_eq!(guest(stopped)["status"], "stopped", "signed stop");
        assert_eq!(guest(forged)["status"], "running", "forged stop");
    } else {
        r.expect(&[
            "signed operations: skipped: the agent trusts only a signers.json owned by root",
        ]);
    }
    // one restore test, after the signed operations (or the first report without root):
    // started, its scratch guest running with every interface detached, passed, destroyed
    let signed_end = if is_root() {
        r"ops +(lxc|qemu) [0-9]+: the node received no request for it"
    } else {
        r"hub +report #1 accepted from pve1"
    };
    let found = r.expect_in_order(&[
        signed_end,
        r"restore +restore test of (lxc|qemu) ([0-9]+) starting: its newest backup \S+ into a scratch guest \(9900-9909, storage local-lvm\)",
        r"restore +scratch guest (99[0-9][0-9]) running, network detached: (net[0-9]+ link_down=1(, )?)+$",
        r"restore +restore test of (lxc|qemu) ([0-9]+) passed: restore [0-9.]+ s, boot [0-9.]+ s, archive \S+",
        r"restore +scratch guest (99[0-9][0-9]) destroyed: the node no longer has it",
    ]);
    assert_eq!(found[1][2], found[3][2], "the same guest tested");
    assert_eq!(found[2][1], found[4][1], "the same scratch guest");
    let (kind, scratch) = (&found[1][1], &found[2][1]);
    // the node received the scratch guest's start and destroy (narrated from its log)
    r.expect(&[
        &format!("← POST /nodes/pve1/{kind}/{scratch}/status/start"),
        &format!("← DELETE /nodes/pve1/{kind}/{scratch}"),
    ]);
    // the agent's own answer (logs/calls.log): passed
    let calls = std::fs::read_to_string(dir.join("logs/calls.log")).unwrap();
    let answer = calls
        .split("\n$ ")
        .find(|c| c.contains("restore-test run --vmid"))
        .and_then(|c| c.split_once('\n'))
        .map(|(_, out)| out)
        .unwrap_or_else(|| panic!("no restore-test run in calls.log:\n{calls}"));
    // its JSON answer, then the exit line
    let v: Value = serde_json::Deserializer::from_str(answer)
        .into_iter::<Value>()
        .next()
        .and_then(Result::ok)
        .unwrap_or_else(|| panic!("no JSON answer: {answer}"));
    assert_eq!(v["result"], "passed", "{v}");
    assert_eq!(v["scratch_vmid"].to_string(), *scratch);
    r.assert_nothing_left();
}

#[test]
fn without_root_the_helpers_run_as_the_user_and_ctrl_c_ends_it_cleanly() {
    if !is_root() {
        eprintln!("SKIP: this test needs root (it creates a throw-away user to run as)");
        return;
    }
    if Command::new("setpriv").arg("--version").output().is_err() {
        eprintln!("SKIP: setpriv (util-linux) is missing");
        return;
    }
    bins_ready();
    let user = ThrowawayUser::create("ds", None);
    let probe = user
        .command(Path::new("/usr/bin/test"), &[])
        .arg("-x")
        .arg(devstack_bin())
        .status()
        .unwrap();
    if !probe.success() {
        eprintln!(
            "SKIP: user {} cannot execute {} (a directory above it is private)",
            user.name,
            devstack_bin().display()
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let owned = tmp.path().join("home");
    std::fs::create_dir(&owned).unwrap();
    std::os::unix::fs::chown(&owned, Some(user.uid), Some(user.gid)).unwrap();
    let dir = owned.join("run");
    let mut cmd = user.command(&devstack_bin(), &[]);
    cmd.arg("--run-dir").arg(&dir).arg("--no-build");
    // Ctrl-C once two reports are in (no --cycles: it would run forever)
    let r = run(cmd, &dir, Duration::from_secs(120), |out| {
        out.contains("report #2 accepted")
            .then_some(nix::sys::signal::Signal::SIGINT)
    });
    assert!(r.status.success(), "exit {:?}:\n{}", r.status, r.out);
    let uid = user.uid;
    let as_user = [
        format!("running as uid {uid} without root"),
        format!("uid {uid}): reports every"),
        format!("] uid {uid}"),
    ];
    r.expect(&as_user.iter().map(String::as_str).collect::<Vec<_>>());
    r.expect(&[
        "privileged ping → pct ok · usb ok · smart ok",
        "→ DENIED not_usb",
        "signed operations: skipped: the agent trusts only a signers.json owned by root and not by its own uid",
        "reconcile applied start lxc 102",
        "smart: activated again, #2",
        "interrupted (SIGINT): stopped",
        "audit log OK",
    ]);
    // the helper trusted the user's own config and tools (it served), and its records
    // name the user as the peer
    let audit =
        std::fs::read_to_string(dir.join("audit/privhelper-audit.jsonl")).unwrap_or_default();
    let peers: BTreeSet<u64> = audit
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["peer"]["uid"].clone())
        .filter_map(|u| u.as_u64())
        .collect();
    assert_eq!(peers, BTreeSet::from([u64::from(user.uid)]), "{audit}");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(dir.join("etc/privhelper.json"))
            .unwrap()
            .uid(),
        user.uid
    );
    r.assert_nothing_left();
}

#[test]
fn a_component_that_dies_stops_the_stack_with_exit_1_naming_it() {
    bins_ready();
    let tmp = open_tempdir();
    let dir = tmp.path().join("run");
    let pvesim_pid = |out: &str| -> Option<i32> {
        let re = regex_lite::Regex::new(r"pvesim +up: .*\(pid ([0-9]+)\)").unwrap();
        re.captures(out).and_then(|c| c[1].parse().ok())
    };
    let killed = std::sync::atomic::AtomicBool::new(false);
    let r = run(
        devstack_cmd(&dir, &[]),
        &dir,
        Duration::from_secs(120),
        |out| {
            // once only: after the devstack reaped it, the pid may belong to anyone
            if out.contains("report #1 accepted")
                && let Some(pid) = pvesim_pid(out)
                && !killed.swap(true, std::sync::atomic::Ordering::SeqCst)
            {
                // the simulated node dies under the running stack
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            None
        },
    );
    assert_eq!(r.status.code(), Some(1), "{}", r.out);
    r.expect(&[
        "FAILED: felhom-pvesim (pid ",
        "exited unexpectedly (signal: 9 (SIGKILL))",
        "logs/pvesim.log",
        "stopping: agent, helpers, simulators",
    ]);
    r.assert_nothing_left();
}
