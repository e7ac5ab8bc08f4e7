//! The operator's commands end to end: `felhom-agent privileged ping | smart | usb-mount |
//! usb-unmount | create-keyctl` and `felhom-agent sensors`, each run as a real process
//! against real helper instances (started by `systemd-socket-activate` with the test
//! bed's fake tools) and a sample hwmon tree, checking what they print (human and
//! `--json`) and their exit codes: 0 ok, 1 a problem (failing disk, refused or failed
//! operation), 2 a bad argument or config, 3 the helper not reachable.
//!
//! `create-keyctl` is driven without a running daemon (the direct path to the helper).
//! Everything with helpers needs root (it starts the root helper); those tests say so and
//! skip otherwise. The sensors test needs nothing.

mod proxmox_client_support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use felhom_protocol::Class;
use felhom_testbed::privhelper::{Bed, BedOptions, FakeBins, LoopDisk, is_root, mounted_at};
use proxmox_client_support::{Run, run_agent};
use serde_json::{Value, json};

macro_rules! need_root {
    () => {
        if !is_root() {
            eprintln!("SKIP: this test needs root (it starts the root helper)");
            return;
        }
    };
}

fn fakes() -> FakeBins {
    FakeBins {
        smartctl: env!("CARGO_BIN_EXE_felhom-fake-smartctl").into(),
        pct: env!("CARGO_BIN_EXE_felhom-fake-pct").into(),
    }
}

/// The secret the config needs to load (the privileged commands never use Proxmox).
const ENV: &[(&str, &str)] = &[];

/// An agent config whose `privhelper.socket_dir` is `socket_dir` and whose
/// `sensors.hwmon_root` is `hwmon_root`.
fn agent_config(dir: &Path, socket_dir: &Path, hwmon_root: &Path) -> PathBuf {
    std::fs::create_dir_all(dir.join("state")).unwrap();
    // No proxmox or hub section: these commands need neither (nor their secrets).
    let cfg = json!({
        "node": "pve1",
        "state_dir": dir.join("state"),
        "privhelper": {"socket_dir": socket_dir, "timeout_seconds": 20},
        "sensors": {"hwmon_root": hwmon_root},
    });
    let p = dir.join("agent.json");
    std::fs::write(&p, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
    p
}

/// `felhom-agent --config CFG [--json] args…`.
fn agent(cfg: &Path, json: bool, args: &[&str]) -> Run {
    let mut all = vec!["--config", cfg.to_str().unwrap()];
    if json {
        all.push("--json");
    }
    all.extend_from_slice(args);
    run_agent(&all, ENV)
}

fn expect(run: &Run, code: i32) {
    assert_eq!(
        run.code, code,
        "exit code\nstdout:\n{}\nstderr:\n{}",
        run.stdout, run.stderr
    );
}

/// A helper environment with all three classes activated, and the agent's config.
struct Setup {
    bed: Bed,
    helpers: Vec<felhom_testbed::privhelper::Activated>,
    dir: tempfile::TempDir,
    cfg: PathBuf,
}

fn setup(classes: &[Class]) -> Setup {
    let bed = Bed::new(fakes(), BedOptions::default());
    let helpers = classes.iter().map(|c| bed.activate(*c)).collect();
    let dir = tempfile::tempdir().unwrap();
    let cfg = agent_config(dir.path(), &bed.run_dir, &dir.path().join("no-hwmon"));
    Setup {
        bed,
        helpers,
        dir,
        cfg,
    }
}

#[test]
fn ping_every_class_one_class_and_a_missing_helper() {
    need_root!();
    let s = setup(&[Class::Pct, Class::Usb, Class::Smart]);

    let run = agent(&s.cfg, false, &["privileged", "ping"]);
    expect(&run, 0);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", run.stdout);
    for (line, class) in lines.iter().zip(["pct", "usb", "smart"]) {
        assert!(
            line.starts_with(&format!("{class}: ok (protocol 1, ")) && line.ends_with(" ms)"),
            "{line}"
        );
    }

    let run = agent(&s.cfg, true, &["privileged", "ping", "--class", "smart"]);
    expect(&run, 0);
    let v = run.json();
    assert_eq!(v["ok"], true);
    assert_eq!(v["exit"], 0);
    assert_eq!(v["classes"].as_array().unwrap().len(), 1);
    assert_eq!(v["classes"][0]["class"], "smart");
    assert_eq!(v["classes"][0]["protocol"], 1);
    assert!(v["classes"][0]["round_trip_ms"].as_f64().unwrap() > 0.0);

    // As the agent's own (unprivileged) uid, through the socket's group: served.
    let uid = s.bed.opts.agent_uid;
    let gid = s.bed.opts.agent_gid;
    let open_dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(open_dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let cfg = agent_config(
        open_dir.path(),
        &s.bed.run_dir,
        &open_dir.path().join("no-hwmon"),
    );
    std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = std::process::Command::new("setpriv")
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={gid}"))
        .arg("--clear-groups")
        .arg("--")
        .arg(proxmox_client_support::agent_bin())
        .args([
            "--config",
            cfg.to_str().unwrap(),
            "--json",
            "privileged",
            "ping",
        ])
        .env_clear()
        .env("FELHOM_AGENT_PROXMOX_TOKEN_SECRET", "unused-here")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], true, "{v}");
    // The helper recorded nothing for pings, and served uid {uid} (no refusal).
    assert!(
        !s.bed.audit_records().iter().any(|r| r["kind"] == "refused"),
        "{:?}",
        s.bed.audit_records()
    );

    // A class name that does not exist: usage, before the config is read.
    let run = agent(
        Path::new("/nonexistent.json"),
        true,
        &["privileged", "ping", "--class", "mount"],
    );
    expect(&run, 2);
    assert_eq!(run.json()["exit"], 2);

    // The usb helper gone (its socket with it): that class is unreachable, exit 3, the
    // others still answer.
    let mut s = s;
    let usb = s.helpers.remove(1);
    drop(usb);
    std::fs::remove_file(s.bed.socket(Class::Usb)).unwrap();
    let run = agent(&s.cfg, false, &["privileged", "ping"]);
    expect(&run, 3);
    assert!(run.stdout.contains("pct: ok"), "{}", run.stdout);
    assert!(run.stdout.contains("smart: ok"), "{}", run.stdout);
    assert!(
        run.stdout.contains("usb: the usb helper is not reachable"),
        "{}",
        run.stdout
    );
    let run = agent(&s.cfg, true, &["privileged", "ping"]);
    expect(&run, 3);
    let v = run.json();
    assert_eq!(v["ok"], false);
    assert_eq!(v["exit"], 3);
    let usb = &v["classes"][1];
    assert_eq!(usb["class"], "usb");
    assert_eq!(usb["ok"], false);
    assert_eq!(usb["unreachable"], true);
    assert_eq!(v["classes"][2]["ok"], true);
}

#[test]
fn smart_healthy_failing_standby_unknown_and_bad_devices() {
    need_root!();
    let s = setup(&[Class::Smart]);

    // A healthy SATA disk: a summary, exit 0.
    let run = agent(&s.cfg, false, &["privileged", "smart", "sda"]);
    expect(&run, 0);
    assert!(run.stdout.starts_with("sda: PASSED\n"), "{}", run.stdout);
    assert!(
        run.stdout.contains("model          WDC WD20EFRX-68EUZN0"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("°C"), "{}", run.stdout);
    let run = agent(&s.cfg, true, &["privileged", "smart", "sda"]);
    expect(&run, 0);
    let v = run.json();
    assert_eq!(v["ok"], true);
    assert_eq!(v["health"], "passed");
    assert_eq!(v["model"], "WDC WD20EFRX-68EUZN0");
    assert_eq!(v["exit_status"], 0);
    assert_eq!(v["standby"], false);
    assert!(v["temperature_c"].is_i64());
    // smartctl's own JSON comes along whole.
    assert_eq!(v["smartctl"]["model_name"], "WDC WD20EFRX-68EUZN0");

    // Failing disks (USB bridge SATA, NVMe critical warning): exit 1.
    for (dev, model) in [
        ("sdc", "Hitachi HDS721050DLE630"),
        ("nvme1", "SAMSUNG MZWLL3T2HAJQ-00005"),
    ] {
        let run = agent(&s.cfg, false, &["privileged", "smart", dev]);
        expect(&run, 1);
        assert!(
            run.stdout.starts_with(&format!("{dev}: FAILED\n")),
            "{}",
            run.stdout
        );
        assert!(run.stderr.contains("FAILING"), "{}", run.stderr);
        let run = agent(&s.cfg, true, &["privileged", "smart", dev]);
        expect(&run, 1);
        let v = run.json();
        assert_eq!(
            (v["ok"].clone(), v["exit"].clone()),
            (json!(false), json!(1))
        );
        assert_eq!(v["health"], "failed");
        assert_eq!(v["model"], model);
        assert!(v["problem"].as_str().unwrap().contains("FAILING"));
    }

    // A sleeping disk is not woken: no problem.
    let run = agent(&s.cfg, false, &["privileged", "smart", "sdd"]);
    expect(&run, 0);
    assert!(run.stdout.starts_with("sdd: STANDBY\n"), "{}", run.stdout);
    assert!(run.stdout.contains("not woken"), "{}", run.stdout);
    let v = agent(&s.cfg, true, &["privileged", "smart", "sdd"]).json();
    assert_eq!(
        (
            v["health"].clone(),
            v["standby"].clone(),
            v["exit_status"].clone()
        ),
        (json!("standby"), json!(true), json!(2))
    );

    // No such disk: smartctl cannot open it, exit 1.
    let run = agent(&s.cfg, true, &["privileged", "smart", "sdz"]);
    expect(&run, 1);
    let v = run.json();
    assert_eq!(v["health"], "unknown");
    assert_eq!(v["exit_status"], 2);
    assert!(v["problem"].is_string());

    // Not a disk name: usage, the helper is never asked.
    let calls_before = s.bed.smart_calls().len();
    for bad in ["sda;reboot", "../sda", "dm-0", "sda1"] {
        let run = agent(&s.cfg, false, &["privileged", "smart", bad]);
        expect(&run, 2);
        let run = agent(&s.cfg, true, &["privileged", "smart", bad]);
        expect(&run, 2);
        assert_eq!(run.json()["exit"], 2);
    }
    assert_eq!(s.bed.smart_calls().len(), calls_before);
    // Every read above is on the helper's record.
    let reads = s
        .bed
        .audit_records()
        .iter()
        .filter(|r| r["kind"] == "outcome" && r["op"] == "smart_read")
        .count();
    assert_eq!(reads, calls_before);
}

#[test]
fn usb_mount_and_unmount_refusals_and_an_unreachable_helper() {
    need_root!();
    let s = setup(&[Class::Usb]);
    let disk = LoopDisk::new(&s.bed.dir, "usb", 32, &["mkfs.ext4", "-q", "-F"]);
    s.bed.mark_usb_partition(&disk);
    let dev = disk.dev.to_str().unwrap();
    let mp = s.bed.mount_root.join("backup");

    let run = agent(&s.cfg, false, &["privileged", "usb-mount", dev, "backup"]);
    expect(&run, 0);
    assert_eq!(
        run.stdout,
        format!(
            "{dev} (ext4 {}) mounted at {}; fstab updated\n",
            disk.uuid(),
            mp.display()
        )
    );
    assert_eq!(
        mounted_at(&mp),
        Some(format!("{}:{}", disk.rdev.0, disk.rdev.1))
    );
    // Again: already mounted, nothing changes.
    let run = agent(&s.cfg, true, &["privileged", "usb-mount", dev, "backup"]);
    expect(&run, 0);
    assert_eq!(
        run.json(),
        json!({"ok": true, "device": dev, "name": "backup", "mount_point": mp,
               "uuid": disk.uuid(), "fstype": "ext4", "already_mounted": true,
               "fstab_changed": false})
    );

    // The same device as an internal SATA disk: refused by the helper, exit 1.
    s.bed.mark_sata_partition(&disk);
    let run = agent(&s.cfg, false, &["privileged", "usb-mount", dev, "other"]);
    expect(&run, 1);
    assert!(run.stderr.contains("not_usb"), "{}", run.stderr);
    let run = agent(&s.cfg, true, &["privileged", "usb-mount", dev, "other"]);
    expect(&run, 1);
    let v = run.json();
    assert_eq!(
        (
            v["ok"].clone(),
            v["exit"].clone(),
            v["class"].clone(),
            v["kind"].clone()
        ),
        (json!(false), json!(1), json!("usb"), json!("not_usb"))
    );
    assert!(!s.bed.mount_root.join("other").exists());

    // A kernel name is taken as /dev/<name>; one that does not exist is the helper's
    // refusal (exit 1), not a usage error.
    let run = agent(&s.cfg, true, &["privileged", "usb-mount", "sdq9", "other"]);
    expect(&run, 1);
    assert_eq!(run.json()["kind"], "not_usb");

    // Bad arguments: exit 2, nothing asked.
    for args in [
        ["usb-mount", dev, "Bad Name"],
        ["usb-mount", "/etc/passwd", "backup"],
        ["usb-mount", "sdb1;reboot", "backup"],
        ["usb-mount", "/dev/../etc/passwd", "backup"],
    ] {
        let mut a = vec!["privileged"];
        a.extend(args);
        expect(&agent(&s.cfg, false, &a), 2);
    }
    expect(
        &agent(&s.cfg, true, &["privileged", "usb-unmount", "-rf"]),
        2,
    );

    let run = agent(&s.cfg, false, &["privileged", "usb-unmount", "backup"]);
    expect(&run, 0);
    assert_eq!(run.stdout, "backup: unmounted; fstab entry removed\n");
    assert_eq!(mounted_at(&mp), None);
    assert_eq!(
        std::fs::read_to_string(&s.bed.fstab).unwrap(),
        felhom_testbed::privhelper::SAMPLE_FSTAB
    );
    let run = agent(&s.cfg, true, &["privileged", "usb-unmount", "backup"]);
    expect(&run, 0);
    assert_eq!(
        run.json(),
        json!({"ok": true, "name": "backup", "was_mounted": false, "fstab_changed": false})
    );

    // No helper behind the socket directory: exit 3.
    let mut s = s;
    s.helpers.clear();
    let run = agent(&s.cfg, true, &["privileged", "usb-unmount", "backup"]);
    expect(&run, 3);
    let v = run.json();
    assert_eq!(
        (v["exit"].clone(), v["unreachable"].clone()),
        (json!(3), json!(true))
    );
    drop(disk);
}

const SPEC: &str = r#"{"vmid": 130, "ostemplate": "local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst", "hostname": "web1", "memory_mib": 1024, "swap_mib": 512, "cores": 2, "rootfs": {"storage": "local-lvm", "size_gib": 8}, "net": {"bridge": "vmbr0", "ip": "dhcp", "gw": null}, "nesting": true, "ssh_public_keys": [], "start": false, "onboot": true}"#;

#[test]
fn create_keyctl_without_a_daemon_a_failing_pct_and_bad_specs() {
    need_root!();
    let s = setup(&[Class::Pct]);
    let spec = s.dir.path().join("spec.json");
    std::fs::write(&spec, SPEC).unwrap();
    let spec_s = spec.to_str().unwrap();

    let run = agent(&s.cfg, false, &["privileged", "create-keyctl", spec_s]);
    expect(&run, 0);
    assert!(run.stdout.contains("extracting archive"), "{}", run.stdout);
    assert!(
        run.stdout
            .ends_with("container 130 created with keyctl=1\n"),
        "{}",
        run.stdout
    );
    let calls = s.bed.pct_calls();
    assert_eq!(calls.len(), 1);
    let argv: Vec<String> = serde_json::from_value(calls[0]["argv"].clone()).unwrap();
    assert_eq!(argv[..2], ["create".to_string(), "130".to_string()]);
    assert!(argv.join(" ").contains("--features keyctl=1,nesting=1"));

    let run = agent(&s.cfg, true, &["privileged", "create-keyctl", spec_s]);
    expect(&run, 0);
    let v = run.json();
    assert_eq!(v["ok"], true);
    assert_eq!(v["vmid"], 130);
    assert!(v["output"].as_str().unwrap().contains("extracting archive"));

    // pct fails: the helper says tool_failed, exit 1.
    s.bed
        .set_pct_settings(json!({"exit": 255, "stderr": "CT 130 already exists on node 'pve1'"}));
    let run = agent(&s.cfg, false, &["privileged", "create-keyctl", spec_s]);
    expect(&run, 1);
    assert!(run.stderr.contains("tool_failed"), "{}", run.stderr);
    assert!(run.stderr.contains("already exists"), "{}", run.stderr);
    let v = agent(&s.cfg, true, &["privileged", "create-keyctl", spec_s]).json();
    assert_eq!(
        (v["exit"].clone(), v["kind"].clone()),
        (json!(1), json!("tool_failed"))
    );

    // Bad or missing spec files: exit 2, pct never runs.
    let before = s.bed.pct_calls().len();
    let bad = s.dir.path().join("bad.json");
    for content in [
        SPEC.replace("\"hostname\": \"web1\"", "\"hostname\": \"web1;reboot\""),
        SPEC.replace("\"vmid\": 130", "\"vmid\": 7"),
        SPEC.replace("}", ""),
        SPEC.replace("\"onboot\": true", "\"onboot\": true, \"privileged\": true"),
    ] {
        std::fs::write(&bad, content).unwrap();
        let run = agent(
            &s.cfg,
            true,
            &["privileged", "create-keyctl", bad.to_str().unwrap()],
        );
        expect(&run, 2);
        assert_eq!(run.json()["exit"], 2);
    }
    let missing = s.dir.path().join("missing.json");
    expect(
        &agent(
            &s.cfg,
            false,
            &["privileged", "create-keyctl", missing.to_str().unwrap()],
        ),
        2,
    );
    assert_eq!(s.bed.pct_calls().len(), before);
}

#[test]
fn sensors_from_a_sample_hwmon_tree() {
    // No helper and no root needed: the agent reads hwmon itself.
    let dir = tempfile::tempdir().unwrap();
    let fixture = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/hosttools/sensors-nct6798-superio-coretemp-nvme.json"),
    )
    .unwrap();
    let tree = felhom_testbed::hwmon::write_sample_tree(&dir.path().join("sys"), &fixture).unwrap();
    let cfg = agent_config(dir.path(), &dir.path().join("run"), &tree.hwmon_root);

    let run = agent(&cfg, true, &["sensors"]);
    expect(&run, 0);
    let got: Vec<(String, String, f64)> = run
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["chip"].as_str().unwrap().to_owned(),
                r["label"].as_str().unwrap().to_owned(),
                r["temperature_c"].as_f64().unwrap(),
            )
        })
        .collect();
    let mut want: Vec<(String, String, f64)> = tree
        .expected
        .iter()
        .map(|e| (e.chip.clone(), e.label.clone(), e.temperature_c))
        .collect();
    let mut got_sorted = got.clone();
    got_sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
    want.sort_by(|a, b| a.partial_cmp(b).unwrap());
    assert_eq!(got_sorted, want);
    assert!(
        got.iter().any(|g| g.0.starts_with("nct6798-isa-")),
        "{got:?}"
    );

    // Human: one line per reading, chip, label and °C.
    let run = agent(&cfg, false, &["sensors"]);
    expect(&run, 0);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), want.len(), "{}", run.stdout);
    for (chip, label, t) in &got {
        let line = lines
            .iter()
            .find(|l| l.starts_with(chip.as_str()) && l.contains(label.as_str()))
            .unwrap_or_else(|| panic!("no line for {chip} {label}:\n{}", run.stdout));
        assert!(line.ends_with(&format!("{t:.1} °C")), "{line}");
    }

    // No hwmon at all (a VM): no sensors is not an error.
    let cfg = agent_config(
        dir.path(),
        &dir.path().join("run"),
        &dir.path().join("nothing"),
    );
    let run = agent(&cfg, false, &["sensors"]);
    expect(&run, 0);
    assert!(
        run.stdout.starts_with("no temperature sensors under "),
        "{}",
        run.stdout
    );
    assert_eq!(agent(&cfg, true, &["sensors"]).json(), json!([]));

    // A config that does not load: exit 2, and with --json the error document.
    let run = agent(&dir.path().join("missing.json"), true, &["sensors"]);
    expect(&run, 2);
    let v: Value = run.json();
    assert_eq!(
        (v["ok"].clone(), v["exit"].clone()),
        (json!(false), json!(2))
    );
}
