//! Peer credentials: only root and the agent's uid are served. Another uid cannot even
//! connect to the 0660 socket; when it can (socket opened wide, or a uid that is in the
//! agent's group), the helper's SO_PEERCRED check refuses it and audits pid, uid, gid
//! and command name. Uses throw-away users (needs root; skips loudly otherwise).

use std::process::Command;

use felhom_protocol::{Class, Request, Response};
use felhom_testbed::privhelper::{Bed, BedOptions, Client, FakeBins, ThrowawayUser, is_root};

fn fakes() -> FakeBins {
    FakeBins {
        smartctl: env!("CARGO_BIN_EXE_felhom-fake-smartctl").into(),
        pct: env!("CARGO_BIN_EXE_felhom-fake-pct").into(),
    }
}

/// The client half, run in a child process as another user: connects, handshakes,
/// pings, and reports what happened on stdout. Does nothing in a normal test run.
#[test]
fn peer_probe_child() {
    let Some(sock) = std::env::var_os("FELHOM_PEER_PROBE") else {
        return;
    };
    let outcome = match Client::connect(std::path::Path::new(&sock)) {
        Err(e) => format!("connect-error {:?}", e.kind()),
        Ok(mut c) => match c.call(&Request::Hello {
            version: felhom_protocol::PROTOCOL_VERSION,
        }) {
            Ok(Response::Hello { .. }) => match c.call(&Request::Ping) {
                Ok(Response::Pong { .. }) => "served".to_string(),
                other => format!("after-hello {other:?}"),
            },
            Ok(Response::Error { kind, .. }) => format!("refused {kind}"),
            other => format!("other {other:?}"),
        },
    };
    println!("PROBE-RESULT: {outcome}");
}

fn probe_as(user: &ThrowawayUser, groups: &[u32], sock: &std::path::Path) -> String {
    let exe = std::env::current_exe().unwrap();
    let out = user
        .command(&exe, groups)
        .args([
            "--exact",
            "peer_probe_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("FELHOM_PEER_PROBE", sock)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .find_map(|l| l.split_once("PROBE-RESULT: ").map(|(_, r)| r.trim()))
        .unwrap_or_else(|| {
            panic!(
                "probe printed nothing: {stdout} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
        .to_string()
}

#[test]
fn only_root_and_the_agent_uid_are_served() {
    if !is_root() {
        eprintln!(
            "SKIP: this test needs root (it creates throw-away users and starts the root helper)"
        );
        return;
    }
    if Command::new("setpriv").arg("--version").output().is_err() {
        eprintln!("SKIP: setpriv (util-linux) is missing");
        return;
    }
    let agent = ThrowawayUser::create("ag", None);
    let other = ThrowawayUser::create("ot", None);
    let member = ThrowawayUser::create("gm", Some(&agent.name));
    let bed = Bed::new(
        fakes(),
        BedOptions {
            agent_uid: agent.uid,
            agent_gid: agent.gid,
            ..Default::default()
        },
    );
    let _h = bed.activate(Class::Smart);
    let sock = bed.socket(Class::Smart);

    // The agent's uid is served; root too.
    assert_eq!(probe_as(&agent, &[], &sock), "served");
    let mut c = Client::hello(&sock).unwrap();
    assert!(matches!(
        c.call(&Request::Ping).unwrap(),
        Response::Pong { .. }
    ));

    // Another uid: the socket's mode (0660 root:<agent group>) stops it at connect(2).
    assert_eq!(
        probe_as(&other, &[], &sock),
        "connect-error PermissionDenied"
    );

    // A uid in the agent's group gets through the socket mode, but not the uid check.
    assert_eq!(
        probe_as(&member, &[agent.gid], &sock),
        "refused peer_refused"
    );

    // With the socket opened to everyone, the uid check alone still refuses `other`.
    std::fs::set_permissions(&sock, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    assert_eq!(probe_as(&other, &[], &sock), "refused peer_refused");

    let recs = bed.audit_records();
    let refused: Vec<_> = recs.iter().filter(|r| r["kind"] == "refused").collect();
    assert_eq!(refused.len(), 2, "{recs:?}");
    for (r, who) in refused.iter().zip([&member, &other]) {
        assert_eq!(r["category"], "peer");
        assert_eq!(r["result"], "denied");
        assert_eq!(r["peer"]["uid"], who.uid);
        assert!(r["peer"]["pid"].as_i64().unwrap() > 1);
        assert!(r["peer"]["gid"].is_u64());
        let comm = r["peer"]["comm"].as_str().expect("comm from /proc");
        assert!(comm.starts_with("privhelper_peer"), "{comm}");
    }
    assert_eq!(
        refused[0]["peer"]["gid"], member.gid,
        "primary gid; it connected through the supplementary agent group"
    );
    assert!(bed.verify().status.success());
}

/// The trickling half of the next test, run as another user: opens `FELHOM_TRICKLE_N`
/// connections, says so, then sends one byte on each every 20 ms (a frame header
/// announcing a large frame, then its payload, never finished) until its stdin closes.
#[test]
fn trickle_child() {
    let Some(sock) = std::env::var_os("FELHOM_TRICKLE") else {
        return;
    };
    let n: usize = std::env::var("FELHOM_TRICKLE_N").unwrap().parse().unwrap();
    // Non-blocking: a connection nobody reads (still in the backlog) fills its buffer
    // after a few hundred one-byte writes, and must not stall the trickle on the others.
    let mut conns: Vec<std::os::unix::net::UnixStream> = (0..n)
        .map(|_| {
            let c = std::os::unix::net::UnixStream::connect(&sock).unwrap();
            c.set_nonblocking(true).unwrap();
            c
        })
        .collect();
    // Straight to stdout (not `println!`, which the test harness may hold back).
    let mut out = std::io::stdout();
    std::io::Write::write_all(&mut out, format!("OPEN {}\n", conns.len()).as_bytes()).unwrap();
    std::io::Write::flush(&mut out).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = stop.clone();
    std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut std::io::stdin(), &mut rest);
        s.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    let frame: Vec<u8> = [&60_000u32.to_be_bytes()[..], &[0u8; 60_000][..]].concat();
    let mut at = 0;
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        for c in &mut conns {
            let _ = std::io::Write::write(c, &frame[at..at + 1]);
        }
        at = (at + 1) % frame.len();
        // Well inside the old 200 ms per-read drain timeout, even on a loaded machine.
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    drop(conns);
}

fn start_trickle(
    user: &ThrowawayUser,
    groups: &[u32],
    sock: &std::path::Path,
    n: usize,
) -> std::process::Child {
    let exe = std::env::current_exe().unwrap();
    let mut child = user
        .command(&exe, groups)
        .args([
            "--exact",
            "trickle_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("FELHOM_TRICKLE", sock)
        .env("FELHOM_TRICKLE_N", n.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let opened = loop {
        let mut l = String::new();
        if std::io::BufRead::read_line(&mut out, &mut l).unwrap_or(0) == 0 {
            break None;
        }
        // (The harness's "test … ... " may precede it on the same line.)
        if let Some((_, k)) = l.split_once("OPEN ") {
            break Some(k.trim().to_string());
        }
    };
    if opened != Some(n.to_string()) {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the trickling client did not open its {n} connections: {opened:?}");
    }
    // Keep reading its output, so its harness can report without a broken pipe.
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    child
}

/// Slow peers cannot pin the helper's threads: 40 connections trickling one byte every
/// 20 ms, from a uid that is refused and then from the agent's own uid, while a call
/// from another served uid is answered. Refused connections are closed at once, a uid
/// gets 8 connections (the rest are closed at once and counted in the refusal record),
/// and a frame must arrive whole within its deadline, however its bytes are spaced.
/// (Before: the refused peer's drain and the frame reads each waited per `read`, so 40
/// trickling connections held all 32 threads and the call waited in the backlog.)
#[test]
fn trickling_peers_do_not_hold_up_a_call() {
    if !is_root() {
        eprintln!("SKIP: this test needs root (it creates throw-away users)");
        return;
    }
    if Command::new("setpriv").arg("--version").output().is_err() {
        eprintln!("SKIP: setpriv (util-linux) is missing");
        return;
    }
    let agent = ThrowawayUser::create("ag", None);
    let member = ThrowawayUser::create("gm", Some(&agent.name));
    let bed = Bed::new(
        fakes(),
        BedOptions {
            agent_uid: agent.uid,
            agent_gid: agent.gid,
            ..Default::default()
        },
    );
    let _h = bed.activate(Class::Smart);
    let sock = bed.socket(Class::Smart);

    // A refused uid (in the agent's group, so it can connect): the agent is served while
    // all 40 of its connections are still open and trickling.
    let mut refused = start_trickle(&member, &[agent.gid], &sock, 40);
    assert_eq!(probe_as(&agent, &[], &sock), "served");
    assert!(refused.try_wait().unwrap().is_none(), "still trickling");

    // The agent's own uid trickling: root is served meanwhile.
    let mut own = start_trickle(&agent, &[], &sock, 40);
    let mut c = Client::hello(&sock).unwrap();
    assert!(matches!(
        c.call(&Request::SmartRead {
            device: felhom_protocol::DiskDevice::new("sda").unwrap()
        })
        .unwrap(),
        Response::Smart(_)
    ));
    assert!(own.try_wait().unwrap().is_none(), "still trickling");
    assert!(refused.try_wait().unwrap().is_none(), "still trickling");
    for child in [&mut refused, &mut own] {
        drop(child.stdin.take());
        child.wait().unwrap();
    }

    // On record: the refused uid's 40 refusals and the 32 connections of the agent's uid
    // beyond its 8, coalesced (wait for the last window to be written).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let count = |recs: &[serde_json::Value], uid: u32, cat: &str| -> u64 {
        recs.iter()
            .filter(|r| r["kind"] == "refused" && r["peer"]["uid"] == uid)
            .map(|r| r["categories"][cat].as_u64().unwrap_or(0))
            .sum()
    };
    loop {
        let recs = bed.audit_records();
        let (peer, limit) = (
            count(&recs, member.uid, "peer"),
            count(&recs, agent.uid, "limit"),
        );
        if peer == 40 && limit >= 32 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "refusals on record: peer {peer} of 40, limit {limit} of 32: {recs:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
