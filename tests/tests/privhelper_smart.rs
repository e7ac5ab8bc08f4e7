//! SMART through the smart helper: exact smartctl command line, cleared environment,
//! capabilities the tool inherits, standby, output fidelity, audit records.

use std::time::Duration;

use felhom_protocol::{Class, DiskDevice, Request, Response};
use felhom_testbed::privhelper::{Bed, BedOptions, Client, FakeBins, is_root};

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

#[test]
fn smart_read_runs_exactly_the_documented_command() {
    need_root!();
    let bed = Bed::new(fakes(), BedOptions::default());
    let _h = bed.activate(Class::Smart);
    let mut c = Client::hello(&bed.socket(Class::Smart)).unwrap();
    let fixture = std::fs::read(
        felhom_testbed::privhelper::hosttools_fixtures().join("smartctl-sata-healthy.json"),
    )
    .unwrap();
    let Response::Smart(out) = smart(&mut c, "sda") else {
        panic!()
    };
    assert_eq!(out.exit_status, 0);
    assert!(!out.truncated);
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let want: serde_json::Value = serde_json::from_slice(&fixture).unwrap();
    assert_eq!(
        got, want,
        "the helper passes smartctl's JSON through unchanged"
    );
    // Exit status bit masks come through as they are.
    let Response::Smart(out) = smart(&mut c, "sdc") else {
        panic!()
    };
    assert_eq!(out.exit_status, 216);
    let Response::Smart(out) = smart(&mut c, "nvme1") else {
        panic!()
    };
    assert_eq!(out.exit_status, 8);
    // A sleeping disk is not woken: smartctl's standby exit is reported as such.
    let Response::Smart(out) = smart(&mut c, "sdd") else {
        panic!()
    };
    assert_eq!(out.exit_status, 2);
    assert!(out.is_standby());
    // A missing disk: smartctl's own answer (exit 2), not a helper error.
    let Response::Smart(out) = smart(&mut c, "sdz") else {
        panic!()
    };
    assert_eq!(out.exit_status, 2);
    assert!(!out.is_standby());
    assert!(String::from_utf8_lossy(&out.stdout).contains("No such device"));

    let calls = bed.smart_calls();
    assert_eq!(calls.len(), 5);
    for (call, dev) in calls.iter().zip(["sda", "sdc", "nvme1", "sdd", "sdz"]) {
        assert_eq!(
            call["argv"],
            serde_json::json!(["--json=c", "-a", "-n", "standby", format!("/dev/{dev}")])
        );
        assert_eq!(
            call["env"],
            serde_json::json!({"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}),
            "cleared environment"
        );
        assert_eq!(call["cwd"], "/");
        // CAP_SYS_ADMIN (21) and CAP_SYS_RAWIO (17) only: 0x220000.
        let st = &call["status"];
        assert_eq!(st["CapBnd"], "0000000000220000", "{st}");
        assert_eq!(st["CapEff"], "0000000000220000", "{st}");
        assert_eq!(st["CapInh"], "0000000000000000");
        assert_eq!(st["CapAmb"], "0000000000000000");
    }
    let recs = bed.audit_records();
    let intents: Vec<_> = recs.iter().filter(|r| r["kind"] == "intent").collect();
    let outcomes: Vec<_> = recs.iter().filter(|r| r["kind"] == "outcome").collect();
    assert_eq!((intents.len(), outcomes.len()), (5, 5));
    assert_eq!(intents[0]["op"], "smart_read");
    assert_eq!(intents[0]["args"], serde_json::json!({"device": "sda"}));
    assert_eq!(intents[0]["peer"]["uid"], 0);
    assert_eq!(outcomes[0]["result"], "ok");
    assert_eq!(outcomes[1]["detail"]["exit_status"], 216);
    assert!(bed.verify().status.success());
}

#[test]
fn idle_exit_and_reactivation() {
    need_root!();
    let bed = Bed::new(
        fakes(),
        BedOptions {
            idle_exit_seconds: 1,
            ..Default::default()
        },
    );
    let mut h = bed.activate(Class::Smart);
    let mut c = Client::hello(&bed.socket(Class::Smart)).unwrap();
    assert!(matches!(
        c.call(&Request::Ping).unwrap(),
        Response::Pong {
            class: Class::Smart
        }
    ));
    drop(c);
    let st = h
        .wait_exit(Duration::from_secs(10))
        .expect("helper exits when idle");
    assert!(st.success(), "idle exit is a clean exit: {st:?}");
    // systemd would start it again on the next connection; the test bed does the same.
    let _h2 = bed.activate(Class::Smart);
    let mut c = Client::hello(&bed.socket(Class::Smart)).unwrap();
    assert!(matches!(
        c.call(&Request::Ping).unwrap(),
        Response::Pong { .. }
    ));
    // Ping and Hello are not audited.
    assert!(bed.audit_records().is_empty());
}
