//! The agent's `privileged::Client` against real helpers: typed results and errors,
//! the exact `pct create` command line, the SSH keys file, version mismatch.

use std::path::PathBuf;
use std::time::Duration;

use felhom_agent::config::PrivhelperConfig;
use felhom_agent::privileged::{self, Client, PrivilegedError};
use felhom_protocol::{Class, DiskDevice, ErrorKind, MountName, PctCreateSpec, Request, Response};
use felhom_testbed::privhelper::{Bed, BedOptions, FakeBins, is_root};

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

fn client(bed: &Bed) -> Client {
    Client::new(&PrivhelperConfig {
        socket_dir: bed.run_dir.clone(),
        audit_log: bed.audit_log.clone(),
        timeout: Duration::from_secs(20),
    })
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

const ED25519: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl user@host";

fn spec_json(extra_keys: bool) -> String {
    let keys = if extra_keys {
        format!("[\"{ED25519}\"]")
    } else {
        "[]".into()
    };
    format!(
        r#"{{"vmid": 120, "ostemplate": "local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst", "hostname": "web1", "memory_mib": 1024, "swap_mib": 512, "cores": 2, "rootfs": {{"storage": "local-lvm", "size_gib": 8}}, "net": {{"bridge": "vmbr0", "ip": "dhcp", "gw": null}}, "nesting": true, "ssh_public_keys": {keys}, "start": false, "onboot": true}}"#
    )
}

#[test]
fn create_keyctl_runs_exactly_the_documented_pct_command() {
    need_root!();
    let bed = Bed::new(fakes(), BedOptions::default());
    let _h = bed.activate(Class::Pct);
    let c = client(&bed);
    let dir = tempfile::tempdir().unwrap();
    let spec_path = dir.path().join("spec.json");
    std::fs::write(&spec_path, spec_json(true)).unwrap();
    let spec = privileged::load_spec(&spec_path).unwrap();
    let created = rt().block_on(c.create_keyctl(&spec)).unwrap();
    assert_eq!(created.vmid.get(), 120);
    assert!(
        created.output.contains("extracting archive"),
        "{}",
        created.output
    );

    // Static address with gateway, no nesting, no keys, start + no onboot.
    let spec2 = PctCreateSpec::from_json(
        &spec_json(false)
            .replace(
                "\"ip\": \"dhcp\", \"gw\": null",
                "\"ip\": \"192.0.2.20/24\", \"gw\": \"192.0.2.1\"",
            )
            .replace("\"nesting\": true", "\"nesting\": false")
            .replace(
                "\"start\": false, \"onboot\": true",
                "\"start\": true, \"onboot\": false",
            )
            .replace("\"vmid\": 120", "\"vmid\": 121"),
    )
    .unwrap();
    rt().block_on(c.create_keyctl(&spec2)).unwrap();

    let calls = bed.pct_calls();
    assert_eq!(calls.len(), 2);
    let argv: Vec<String> = serde_json::from_value(calls[0]["argv"].clone()).unwrap();
    let keyfile = calls[0]["ssh_keys_file"]["path"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        argv.join(" "),
        format!(
            "create 120 local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst --hostname web1 --memory 1024 --swap 512 --cores 2 --rootfs local-lvm:8 --net0 name=eth0,bridge=vmbr0,ip=dhcp --unprivileged 1 --features keyctl=1,nesting=1 --ssh-public-keys {keyfile} --start 0 --onboot 1"
        )
    );
    assert_eq!(calls[0]["ssh_keys_file"]["mode"], "600");
    assert_eq!(calls[0]["ssh_keys_file"]["content"], format!("{ED25519}\n"));
    assert!(
        !PathBuf::from(&keyfile).exists(),
        "the keys file is removed after pct ran"
    );
    let argv2: Vec<String> = serde_json::from_value(calls[1]["argv"].clone()).unwrap();
    assert_eq!(
        argv2.join(" "),
        "create 121 local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst --hostname web1 --memory 1024 --swap 512 --cores 2 --rootfs local-lvm:8 --net0 name=eth0,bridge=vmbr0,ip=192.0.2.20/24,gw=192.0.2.1 --unprivileged 1 --features keyctl=1 --start 1 --onboot 0"
    );
    for call in &calls {
        assert_eq!(
            call["env"],
            serde_json::json!({"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"})
        );
        // pct keeps nearly all capabilities, but not e.g. CAP_SYS_MODULE (16) or CAP_SYS_BOOT (22).
        let bnd = u64::from_str_radix(call["status"]["CapBnd"].as_str().unwrap(), 16).unwrap();
        assert_eq!(bnd & (1 << 16), 0, "CAP_SYS_MODULE dropped");
        assert_eq!(bnd & (1 << 22), 0, "CAP_SYS_BOOT dropped");
        assert_ne!(bnd & (1 << 21), 0, "CAP_SYS_ADMIN kept");
        assert_ne!(bnd & (1 << 0), 0, "CAP_CHOWN kept");
    }
    // The audit log names the keys by fingerprint only.
    let recs = bed.audit_records();
    let intent = recs.iter().find(|r| r["kind"] == "intent").unwrap();
    assert_eq!(intent["op"], "pct_create_keyctl");
    assert_eq!(intent["args"]["net0"], "name=eth0,bridge=vmbr0,ip=dhcp");
    assert!(
        intent["args"]["ssh_public_keys"][0]
            .as_str()
            .unwrap()
            .starts_with("sha256:")
    );
    assert!(
        !std::fs::read_to_string(&bed.audit_log)
            .unwrap()
            .contains("AAAAC3Nza")
    );
}

#[test]
fn pct_failure_and_unreachable_helpers_are_typed() {
    need_root!();
    let bed = Bed::new(fakes(), BedOptions::default());
    bed.set_pct_settings(serde_json::json!({"exit": 2, "stderr": "unable to create CT 120 - CT 120 already exists on node 'pve1'"}));
    let _h = bed.activate(Class::Pct);
    let c = client(&bed);
    let spec = PctCreateSpec::from_json(&spec_json(false)).unwrap();
    let e = rt().block_on(c.create_keyctl(&spec)).unwrap_err();
    assert_eq!(e.helper_kind(), Some(ErrorKind::ToolFailed), "{e}");
    assert!(e.to_string().contains("already exists"), "{e}");
    let recs = bed.audit_records();
    let outcome = recs.iter().find(|r| r["kind"] == "outcome").unwrap();
    assert_eq!(outcome["result"], "failed");
    assert!(
        outcome["reason"]
            .as_str()
            .unwrap()
            .contains("already exists")
    );
    // No usb helper is running: a typed, "unreachable" error.
    let e = rt()
        .block_on(c.usb_unmount(&MountName::new("x").unwrap()))
        .unwrap_err();
    assert!(
        matches!(
            e,
            PrivilegedError::Connect {
                class: Class::Usb,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.is_unreachable());
}

#[test]
fn ping_smart_and_class_routing() {
    need_root!();
    let bed = Bed::new(fakes(), BedOptions::default());
    let _s = bed.activate(Class::Smart);
    let c = client(&bed);
    let pings = rt().block_on(privileged::ping_classes(&c, None));
    assert_eq!(pings.len(), 3);
    assert!(pings[0].1.as_ref().unwrap_err().is_unreachable());
    assert!(pings[1].1.as_ref().unwrap_err().is_unreachable());
    let p = pings[2].1.as_ref().unwrap();
    assert_eq!(
        (p.class, p.version),
        (Class::Smart, felhom_protocol::PROTOCOL_VERSION)
    );
    let out = rt()
        .block_on(c.smart_read(&DiskDevice::new("nvme0").unwrap()))
        .unwrap();
    assert_eq!(out.exit_status, 0);
    assert!(String::from_utf8_lossy(&out.stdout).contains("Samsung SSD 970 EVO Plus"));
    let out = rt()
        .block_on(c.smart_read(&DiskDevice::new("sdd").unwrap()))
        .unwrap();
    assert!(out.is_standby());
}

#[test]
fn version_mismatch_is_clear_on_both_sides() {
    need_root!();
    let bed = Bed::new(fakes(), BedOptions::default());
    let _s = bed.activate(Class::Smart);
    let mut raw = felhom_testbed::privhelper::Client::connect(&bed.socket(Class::Smart)).unwrap();
    let r = raw.call(&Request::Hello { version: 999 }).unwrap();
    match r {
        Response::Error {
            kind: ErrorKind::VersionMismatch,
            message,
        } => {
            assert!(
                message.contains("999")
                    && message.contains(&felhom_protocol::PROTOCOL_VERSION.to_string()),
                "{message}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(raw.closed_by_peer());
    let recs = bed.audit_records();
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0]["kind"], "refused");
    assert_eq!(recs[0]["category"], "version");
    // The helper keeps serving.
    let c = client(&bed);
    assert!(rt().block_on(c.ping(Class::Smart)).is_ok());
}

/// Typed errors without a real helper: a socket that accepts and never answers, one that
/// answers garbage, and a socket served by another class's helper.
#[test]
fn timeouts_protocol_faults_and_misrouted_sockets_are_typed() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let client = |timeout: Duration| {
        Client::new(&PrivhelperConfig {
            socket_dir: dir.path().to_path_buf(),
            audit_log: dir.path().join("audit.jsonl"),
            timeout,
        })
    };
    // Each connection is answered with `answer` and then held open until the test ends,
    // so the client sees the answer, or (with none) a silent peer, never an early EOF.
    let serve = |class: Class, answer: Vec<u8>| {
        let l =
            std::os::unix::net::UnixListener::bind(dir.path().join(class.socket_name())).unwrap();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for s in l.incoming() {
                let Ok(mut s) = s else { break };
                let mut b = [0u8; 6];
                let _ = s.read(&mut b);
                let _ = s.write_all(&answer);
                held.push(s);
            }
        });
    };
    // Never answers: a short timeout, as that is what is tested.
    serve(Class::Smart, Vec::new());
    let e = rt()
        .block_on(client(Duration::from_millis(300)).smart_read(&DiskDevice::new("sda").unwrap()))
        .unwrap_err();
    assert!(
        matches!(
            e,
            PrivilegedError::Timeout {
                class: Class::Smart,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.is_unreachable());
    // The peers below answer: a timeout far beyond a loaded machine's delays, so what
    // they answer is what is judged.
    let c = client(Duration::from_secs(30));
    // Answers garbage.
    serve(Class::Pct, vec![0, 0, 0, 3, 0xff, 0xff, 0xff]);
    let e = rt().block_on(c.ping(Class::Pct)).unwrap_err();
    assert!(
        matches!(
            e,
            PrivilegedError::Protocol {
                class: Class::Pct,
                ..
            }
        ),
        "{e}"
    );
    // The usb socket is served by a smart helper.
    let hello = felhom_protocol::encode_response(&Response::Hello {
        version: felhom_protocol::PROTOCOL_VERSION,
        class: Class::Smart,
    })
    .unwrap();
    serve(Class::Usb, hello);
    let e = rt()
        .block_on(c.usb_unmount(&MountName::new("x").unwrap()))
        .unwrap_err();
    assert!(e.to_string().contains("served by the smart helper"), "{e}");
}

/// A Hello pipelined with the next frame is answered in the same write as that frame's
/// reply (the client wakes once); a Hello sent alone is answered at once; the order of
/// answers never changes.
#[test]
fn a_pipelined_hello_is_answered_with_the_next_reply() {
    use felhom_protocol::{PROTOCOL_VERSION, encode_request, encode_response};
    use felhom_testbed::privhelper::Client as RawClient;
    use std::io::Read;
    need_root!();
    let bed = Bed::new(fakes(), BedOptions::default());
    let _s = bed.listen(Class::Smart);
    let hello = encode_request(&Request::Hello {
        version: PROTOCOL_VERSION,
    })
    .unwrap();
    let ping = encode_request(&Request::Ping).unwrap();
    let hello_answer = encode_response(&Response::Hello {
        version: PROTOCOL_VERSION,
        class: Class::Smart,
    })
    .unwrap();

    // Pipelined with a SmartRead (whose reply takes a fdatasync and a tool run): the
    // Hello's answer does not come ahead on its own but in the same write as the Smart
    // reply, and the Ping after it is answered after it.
    let smart = encode_request(&Request::SmartRead {
        device: DiskDevice::new("sda").unwrap(),
    })
    .unwrap();
    let mut c = RawClient::connect(&bed.socket(Class::Smart)).unwrap();
    c.send_raw(&[hello.clone(), smart, ping.clone()].concat())
        .unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let n = c.stream.read(&mut buf).unwrap();
    assert!(
        n > hello_answer.len() && buf.starts_with(&hello_answer),
        "the first read held {:?}: the Hello's answer came alone or not first",
        &buf[..n.min(32)]
    );
    let mut rest = (&buf[hello_answer.len()..n]).chain(&c.stream);
    let mut next = || {
        let mut header = [0u8; 4];
        rest.read_exact(&mut header).unwrap();
        let mut payload = vec![0u8; u32::from_be_bytes(header) as usize];
        rest.read_exact(&mut payload).unwrap();
        felhom_protocol::decode_response(&payload).unwrap()
    };
    assert!(matches!(next(), Response::Smart(ref o) if o.exit_status == 0));
    assert_eq!(
        next(),
        Response::Pong {
            class: Class::Smart
        }
    );

    // Alone: answered without waiting for anything else.
    let mut c = RawClient::connect(&bed.socket(Class::Smart)).unwrap();
    c.stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    c.send_raw(&hello).unwrap();
    let n = c.stream.read(&mut buf).unwrap();
    assert_eq!(&buf[..n], &hello_answer[..]);

    // Pipelined with a frame that is refused: the Hello's answer still comes first.
    let mut c = RawClient::connect(&bed.socket(Class::Smart)).unwrap();
    let usb = encode_request(&Request::UsbUnmount {
        name: MountName::new("backup").unwrap(),
    })
    .unwrap();
    c.send_raw(&[hello, usb].concat()).unwrap();
    assert!(matches!(
        c.read_response().unwrap(),
        Some(Response::Hello { .. })
    ));
    assert!(matches!(
        c.read_response().unwrap(),
        Some(Response::Error {
            kind: ErrorKind::WrongClass,
            ..
        })
    ));
    assert_eq!(c.read_response().unwrap(), None);
}
