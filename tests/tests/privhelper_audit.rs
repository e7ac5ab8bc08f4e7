//! The audit log on real helpers: `audit verify` passes on a real log and fails, naming
//! the record, for each kind of tampering; rotation keeps the chain; a torn tail found at
//! open is recorded; 50 concurrent clients across the three instances leave a valid chain.

use std::path::Path;
use std::process::Command;

use felhom_protocol::{Class, DiskDevice, MountName, PctCreateSpec, Request, Response};
use felhom_testbed::privhelper::{
    Bed, BedOptions, Client, FakeBins, ThrowawayUser, is_root, privhelper_bin, read_jsonl,
};
use sha2::Digest;

fn fakes() -> FakeBins {
    FakeBins {
        smartctl: env!("CARGO_BIN_EXE_felhom-fake-smartctl").into(),
        pct: env!("CARGO_BIN_EXE_felhom-fake-pct").into(),
    }
}

macro_rules! need_root {
    () => {
        if !is_root() {
            eprintln!("SKIP: this test needs root (it starts the root helper)");
            return;
        }
    };
}

fn smart(c: &mut Client, dev: &str) -> Response {
    c.call(&Request::SmartRead {
        device: DiskDevice::new(dev).unwrap(),
    })
    .unwrap()
}

fn verify(log: &Path) -> (bool, String) {
    let out = Command::new(privhelper_bin())
        .args(["audit", "verify", "--log"])
        .arg(log)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    match out.status.code() {
        Some(0) => (true, text),
        Some(1) => (false, text),
        other => panic!("verify exited {other:?}: {text}"),
    }
}

/// Copies the log and its head to a fresh directory, applies `tamper` to the log lines.
/// The copy is taken under the writers' lock, shared, as `audit verify` reads them: a
/// helper may still be syncing the last record it answered for, and the head names a
/// record only once that is done.
fn tampered(
    src: &Path,
    tamper: impl FnOnce(&mut Vec<String>),
) -> (tempfile::TempDir, std::path::PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let log = d.path().join("audit.jsonl");
    let mut lock = src.as_os_str().to_owned();
    lock.push(".lock");
    let lock = std::fs::File::open(&lock).unwrap();
    lock.lock_shared().unwrap();
    let text = std::fs::read_to_string(src).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    tamper(&mut lines);
    let mut out = lines.join("\n");
    if !out.is_empty() && !out.ends_with("\u{1}") {
        out.push('\n');
    }
    std::fs::write(&log, out.trim_end_matches('\u{1}')).unwrap();
    let mut head = src.as_os_str().to_owned();
    head.push(".head");
    std::fs::copy(&head, d.path().join("audit.jsonl.head")).unwrap();
    drop(lock);
    (d, log)
}

#[test]
fn verify_passes_on_a_real_log_and_names_each_kind_of_tampering() {
    need_root!();
    let bed = Bed::new(fakes(), BedOptions::default());
    let _s = bed.activate(Class::Smart);
    let mut c = Client::hello(&bed.socket(Class::Smart)).unwrap();
    for d in ["sda", "sdb", "nvme0", "sdd"] {
        assert!(matches!(smart(&mut c, d), Response::Smart(_)));
    }
    let recs = bed.audit_records();
    assert_eq!(recs.len(), 8);
    let seqs: Vec<u64> = recs.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=8).collect::<Vec<_>>());
    assert_eq!(recs[0]["prev"], "0".repeat(64));
    let lines: Vec<String> = std::fs::read_to_string(&bed.audit_log)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    for w in lines.windows(2) {
        let h = hex::encode(sha2::Sha256::digest(w[0].as_bytes()));
        let next: serde_json::Value = serde_json::from_str(&w[1]).unwrap();
        assert_eq!(
            next["prev"], h,
            "prev is the SHA-256 of the previous line's bytes"
        );
    }
    for r in &recs {
        assert!(r["time"].as_str().unwrap().ends_with('Z'));
        assert_eq!(r["class"], "smart");
    }
    let (ok, text) = verify(&bed.audit_log);
    assert!(ok, "{text}");
    assert!(text.contains("8 records"), "{text}");

    // edited: a field of seq 3 changed
    let (_d, log) = tampered(&bed.audit_log, |l| {
        l[2] = l[2].replace("\"device\":\"sdb\"", "\"device\":\"sdz\"")
    });
    let (ok, text) = verify(&log);
    assert!(
        !ok && text.contains("seq 3") && text.contains("altered"),
        "{text}"
    );
    // removed: seq 4 deleted
    let (_d, log) = tampered(&bed.audit_log, |l| {
        l.remove(3);
    });
    let (ok, text) = verify(&log);
    assert!(
        !ok && text.contains("4..=4") && text.contains("missing"),
        "{text}"
    );
    // reordered: seq 5 and 6 swapped
    let (_d, log) = tampered(&bed.audit_log, |l| l.swap(4, 5));
    let (ok, text) = verify(&log);
    assert!(
        !ok && text.contains("seq 6") && text.contains("out of"),
        "{text}"
    );
    // truncated at a record boundary: the last two records cut off
    let (_d, log) = tampered(&bed.audit_log, |l| l.truncate(6));
    let (ok, text) = verify(&log);
    assert!(
        !ok && text.contains("truncated") && text.contains("7..=8"),
        "{text}"
    );
    // torn: the last record cut in the middle (no newline)
    let (_d, log) = tampered(&bed.audit_log, |l| {
        let last = l.pop().unwrap();
        l.push(format!("{}\u{1}", &last[..last.len() / 2]));
    });
    let (ok, text) = verify(&log);
    assert!(
        !ok && text.contains("torn") && text.contains("seq 8"),
        "{text}"
    );
    // the last record edited (only the head can tell)
    let (_d, log) = tampered(&bed.audit_log, |l| l[7] = l[7].replace("\"ok\"", "\"ko\""));
    let (ok, text) = verify(&log);
    assert!(
        !ok && text.contains("seq 8") && text.contains("head"),
        "{text}"
    );
}

#[test]
fn a_torn_tail_found_at_open_is_recorded_and_rotation_keeps_the_chain() {
    need_root!();
    let bed = Bed::new(
        fakes(),
        BedOptions {
            audit_max_bytes: Some(4096),
            ..Default::default()
        },
    );
    let _s = bed.activate(Class::Smart);
    let mut c = Client::hello(&bed.socket(Class::Smart)).unwrap();
    assert!(matches!(smart(&mut c, "sda"), Response::Smart(_)));
    // A write that was interrupted half-way.
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&bed.audit_log)
        .unwrap();
    std::io::Write::write_all(&mut f, b"{\"seq\":3,\"prev\":\"0123").unwrap();
    drop(f);
    assert!(!verify(&bed.audit_log).0);
    assert!(matches!(smart(&mut c, "sdb"), Response::Smart(_)));
    let recs = bed.audit_records();
    let torn = recs
        .iter()
        .find(|r| r["kind"] == "torn")
        .expect("a torn record");
    assert_eq!(torn["seq"], 3);
    assert_eq!(torn["torn"]["bytes"], 21);
    assert_eq!(torn["torn"]["text"], "{\"seq\":3,\"prev\":\"0123");
    assert_eq!(torn["class"], "smart", "the instance that found it");
    // Every record has the same keys, null where they do not apply.
    for r in &recs {
        for k in ["seq", "prev", "time", "kind", "class", "peer", "op", "args"] {
            assert!(r.get(k).is_some(), "{k} missing in {r}");
        }
    }
    let (ok, text) = verify(&bed.audit_log);
    assert!(ok, "{text}");

    // Enough records to rotate several times (4096-byte files, keep 4); the hub has
    // accepted everything, so the oldest files may go.
    std::fs::write(&bed.audit_ack, r#"{"seq": 1000000}"#).unwrap();
    for _ in 0..40 {
        assert!(matches!(smart(&mut c, "sda"), Response::Smart(_)));
    }
    let rotated = |n: u32| {
        let mut p = bed.audit_log.as_os_str().to_owned();
        p.push(format!(".{n}"));
        std::path::PathBuf::from(p)
    };
    assert!(rotated(1).exists() && rotated(4).exists() && !rotated(5).exists());
    let last_old = std::fs::read_to_string(rotated(1))
        .unwrap()
        .lines()
        .last()
        .unwrap()
        .to_string();
    let active = read_jsonl(&bed.audit_log);
    assert_eq!(
        active[0]["prev"],
        hex::encode(sha2::Sha256::digest(last_old.as_bytes()))
    );
    let prev_seq: u64 = serde_json::from_str::<serde_json::Value>(&last_old).unwrap()["seq"]
        .as_u64()
        .unwrap();
    assert_eq!(
        active[0]["seq"].as_u64().unwrap(),
        prev_seq + 1,
        "seq continues across rotation"
    );
    let (ok, text) = verify(&bed.audit_log);
    assert!(ok, "{text}");
    assert!(
        text.contains("rotated away"),
        "the oldest files were dropped: {text}"
    );
    // Mode and group of the files the hub reporter reads.
    use std::os::unix::fs::MetadataExt;
    for p in [bed.audit_log.clone(), rotated(1)] {
        let md = std::fs::metadata(&p).unwrap();
        assert_eq!(md.mode() & 0o7777, 0o640, "{}", p.display());
        assert_eq!(md.gid(), bed.opts.agent_gid, "{}", p.display());
    }
}

/// The outcome record is written before the reply and synced (and named by the head)
/// while the reply is on its way, under the writers' lock; a reply bigger than the socket
/// buffer is finished after the lock is released, so a client that does not read holds
/// up no other writer or reader.
#[test]
fn a_reply_bigger_than_the_socket_buffer_does_not_hold_the_log() {
    need_root!();
    let bed = Bed::new(fakes(), BedOptions::default());
    // smartctl output of 1.5 MB (the helper keeps 1 MiB of it).
    let big = bed.dir.join("smartctl-big.json");
    let pad = "x".repeat(1_500_000);
    std::fs::write(
        &big,
        serde_json::json!({"smartctl": {"exit_status": 0}, "pad": pad}).to_string(),
    )
    .unwrap();
    let settings_path = bed.dir.join("tools/felhom-fake-smartctl.json");
    let mut settings: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&settings_path).unwrap()).unwrap();
    settings["devices"]["sdz"] = serde_json::json!({"fixture": big});
    std::fs::write(&settings_path, settings.to_string()).unwrap();
    let _s = bed.activate(Class::Smart);
    let mut c = Client::hello(&bed.socket(Class::Smart)).unwrap();
    let req = felhom_protocol::encode_request(&Request::SmartRead {
        device: DiskDevice::new("sdz").unwrap(),
    })
    .unwrap();
    c.send_raw(&req).unwrap();
    // Not reading: wait until the outcome is in the log.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !bed.audit_records().iter().any(|r| r["kind"] == "outcome") {
        assert!(std::time::Instant::now() < deadline, "no outcome record");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // The reply is stuck in the socket; the log is not: verify takes the lock, and the
    // head already names the outcome (no "behind" note).
    let t = std::time::Instant::now();
    let (ok, text) = verify(&bed.audit_log);
    assert!(ok, "{text}");
    assert!(
        t.elapsed() < std::time::Duration::from_secs(5),
        "verify waited for the client: {:?}",
        t.elapsed()
    );
    assert!(
        text.contains("2 records") && !text.contains("behind"),
        "{text}"
    );
    // The whole reply still arrives.
    let Some(Response::Smart(out)) = c.read_response().unwrap() else {
        panic!("no SMART reply")
    };
    assert_eq!(out.stdout.len(), 1024 * 1024);
    assert!(out.truncated);
    let outcome = bed
        .audit_records()
        .into_iter()
        .find(|r| r["kind"] == "outcome")
        .unwrap();
    assert_eq!(outcome["result"], "ok");
    assert_eq!(outcome["detail"]["truncated"], true);
}

#[test]
fn fifty_concurrent_clients_across_instances_leave_a_valid_chain() {
    need_root!();
    let bed = Bed::new(fakes(), BedOptions::default());
    let _p = bed.activate(Class::Pct);
    let _u = bed.activate(Class::Usb);
    let _s = bed.activate(Class::Smart);
    let spec = PctCreateSpec::from_json(r#"{"vmid": 130, "ostemplate": "local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst", "hostname": "c", "memory_mib": 512, "swap_mib": 0, "cores": 1, "rootfs": {"storage": "local", "size_gib": 2}, "net": {"bridge": "vmbr0", "ip": "dhcp", "gw": null}}"#).unwrap();
    let threads: Vec<_> = (0..50)
        .map(|i| {
            let class = Class::ALL[i % 3];
            let sock = bed.socket(class);
            let spec = spec.clone();
            std::thread::spawn(move || {
                let mut c = Client::hello(&sock).unwrap();
                let req = match class {
                    Class::Pct => Request::PctCreateKeyctl(spec),
                    Class::Usb => Request::UsbUnmount {
                        name: MountName::new(format!("n{i}")).unwrap(),
                    },
                    Class::Smart => Request::SmartRead {
                        device: DiskDevice::new("sda").unwrap(),
                    },
                };
                let r = c.call(&req).unwrap();
                assert!(!matches!(r, Response::Error { .. }), "{r:?}");
                drop(c);
                // and one refusal each, on a fresh connection
                let mut c = Client::connect(&sock).unwrap();
                c.send_raw(&[0, 0, 0, 0]).unwrap();
                assert!(matches!(
                    c.read_response().unwrap(),
                    Some(Response::Error { .. })
                ));
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    // The refusals are coalesced per uid and second; each instance writes the ones it
    // counted at the latest when it goes idle.
    let recs = bed.audit_records();
    assert_eq!(recs.iter().filter(|r| r["kind"] == "intent").count(), 50);
    assert_eq!(recs.iter().filter(|r| r["kind"] == "outcome").count(), 50);
    let seqs: Vec<u64> = recs.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=recs.len() as u64).collect::<Vec<_>>());
    for class in Class::ALL {
        let n = recs
            .iter()
            .filter(|r| r["class"] == class.as_str() && r["kind"] == "outcome")
            .count();
        assert_eq!(n, (0..50).filter(|i| Class::ALL[i % 3] == class).count());
    }
    let (ok, text) = verify(&bed.audit_log);
    assert!(ok, "{text}");
}

/// A flood of refusals costs O(1) records per second (one per uid and second, carrying
/// the count and the categories), so it can no longer rotate the intent and outcome of a
/// real call out of the log; every refusal is still counted on record.
#[test]
fn a_refusal_flood_is_coalesced_and_cannot_rotate_a_call_away() {
    need_root!();
    let bed = Bed::new(
        fakes(),
        BedOptions {
            audit_max_bytes: Some(4096),
            ..Default::default()
        },
    );
    let _s = bed.activate(Class::Smart);
    let sock = bed.socket(Class::Smart);
    let mut c = Client::hello(&sock).unwrap();
    assert!(matches!(smart(&mut c, "sda"), Response::Smart(_)));
    drop(c);
    let started = std::time::Instant::now();
    const FLOOD: u64 = 1000;
    for i in 0..FLOOD {
        let mut c = Client::connect(&sock).unwrap();
        // Alternate two kinds of refusal: zero length (framing) and no Hello (handshake).
        if i % 2 == 0 {
            c.send_raw(&[0, 0, 0, 0]).unwrap();
        } else {
            c.send_raw(&felhom_protocol::encode_request(&Request::Ping).unwrap())
                .unwrap();
        }
        assert!(matches!(
            c.read_response().unwrap(),
            Some(Response::Error { .. })
        ));
    }
    // The last ones are written once their second has passed (the helper does not wait
    // for the next refusal to do it).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let recs = loop {
        let recs = bed.all_audit_records();
        if Bed::refusals_on_record(&recs) == FLOOD {
            break recs;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {FLOOD} refusals on record",
            Bed::refusals_on_record(&recs)
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let elapsed = started.elapsed().as_secs();
    let refused: Vec<_> = recs.iter().filter(|r| r["kind"] == "refused").collect();
    // At most one record per started second, plus the first one.
    assert!(
        refused.len() as u64 <= elapsed + 2,
        "{} refused records in {elapsed} s",
        refused.len()
    );
    let total = |cat: &str| -> u64 {
        refused
            .iter()
            .map(|r| r["categories"][cat].as_u64().unwrap_or(0))
            .sum()
    };
    assert_eq!(total("framing"), FLOOD / 2);
    assert_eq!(total("handshake"), FLOOD / 2);
    for r in &refused {
        assert_eq!(r["peer"]["uid"], 0);
        assert_eq!(r["result"], "denied");
    }
    // The call before the flood is still on record, intent and outcome.
    assert_eq!(recs[0]["kind"], "intent", "{:?}", recs[0]);
    assert_eq!(recs[0]["seq"], 1);
    assert_eq!(recs[1]["kind"], "outcome");
    let (ok, text) = verify(&bed.audit_log);
    assert!(ok, "{text}");
}

/// The reader half of the next test, run as a member of the agent's group: opens every
/// file in the audit directory it can, and the directory, takes an exclusive flock on
/// each, reports them, and holds them until its stdin closes.
#[test]
fn lock_holder_child() {
    let Some(dir) = std::env::var_os("FELHOM_LOCK_HOLDER") else {
        return;
    };
    let mut held = Vec::new();
    let mut names = Vec::new();
    let mut refused = Vec::new();
    let mut paths = vec![std::path::PathBuf::from(&dir)];
    for e in std::fs::read_dir(&dir).unwrap() {
        paths.push(e.unwrap().path());
    }
    for p in paths {
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        match std::fs::File::open(&p) {
            Ok(f) => {
                f.lock().unwrap();
                held.push(f);
                names.push(name);
            }
            Err(_) => refused.push(name),
        }
    }
    // Straight to stdout (not `println!`, which the test harness may hold back): the
    // parent reads this while we run.
    let mut out = std::io::stdout();
    std::io::Write::write_all(
        &mut out,
        format!(
            "HELD {}\nCANNOT-OPEN {}\n",
            names.join(" "),
            refused.join(" ")
        )
        .as_bytes(),
    )
    .unwrap();
    std::io::Write::flush(&mut out).unwrap();
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut std::io::stdin(), &mut rest);
    drop(held);
}

/// Readers (the agent's group can read the log) cannot stall the writers: whatever they
/// can open and flock, a helper call still completes.
#[test]
fn a_reader_holding_locks_on_all_it_can_open_does_not_stop_a_call() {
    need_root!();
    if Command::new("setpriv").arg("--version").output().is_err() {
        eprintln!("SKIP: setpriv (util-linux) is missing");
        return;
    }
    let agent = ThrowawayUser::create("ag", None);
    let reader = ThrowawayUser::create("rd", Some(&agent.name));
    let bed = Bed::new(
        fakes(),
        BedOptions {
            agent_uid: agent.uid,
            agent_gid: agent.gid,
            ..Default::default()
        },
    );
    let _s = bed.activate(Class::Smart);
    let sock = bed.socket(Class::Smart);
    let mut c = Client::hello(&sock).unwrap();
    assert!(matches!(smart(&mut c, "sda"), Response::Smart(_)));
    drop(c);
    let log_dir = bed.audit_log.parent().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut child = reader
        .command(&exe, &[agent.gid])
        .args([
            "--exact",
            "lock_holder_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("FELHOM_LOCK_HOLDER", log_dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = |prefix: &str| -> String {
        loop {
            let mut l = String::new();
            assert!(
                std::io::BufRead::read_line(&mut out, &mut l).unwrap() > 0,
                "the lock holder ended before reporting"
            );
            // (The harness's "test … ... " may precede it on the same line.)
            if let Some((_, rest)) = l.split_once(prefix) {
                return rest.trim().to_string();
            }
        }
    };
    let held = line("HELD ");
    let cannot = line("CANNOT-OPEN ");
    // Keep reading its output, so its harness can report without a broken pipe.
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    let log_name = bed
        .audit_log
        .file_name()
        .unwrap()
        .to_string_lossy()
        .to_string();
    assert!(
        held.split(' ').any(|n| n == log_name),
        "the reader can read the log (held: {held})"
    );
    assert!(
        cannot.split(' ').any(|n| n == format!("{log_name}.lock")),
        "the writers' lock is not the reader's to take (held: {held}; cannot open: {cannot})"
    );
    // With every lock the reader could take held, a call completes.
    let mut c = Client::hello(&sock).unwrap();
    assert!(matches!(smart(&mut c, "sdb"), Response::Smart(_)));
    assert!(
        child.try_wait().unwrap().is_none(),
        "the reader still holds its locks"
    );
    drop(child.stdin.take());
    child.wait().unwrap();
    let (ok, text) = verify(&bed.audit_log);
    assert!(ok, "{text}");
}
