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
