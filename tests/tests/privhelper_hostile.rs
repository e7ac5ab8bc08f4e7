//! Hostile clients: every framing fault, every out-of-class operation and every
//! validated field with bad values gets a typed error, is audited as denied, executes
//! nothing, and the helper keeps serving.
//!
//! Requests with invalid values cannot be built from `felhom-protocol` types (that is the
//! point), so this test encodes shadow types with plain fields, byte-compatible with
//! `Request`.

use felhom_protocol::{
    Class, DiskDevice, ErrorKind, MAX_REQUEST_FRAME, MountName, PROTOCOL_VERSION, PctCreateSpec,
    Request, Response, encode_request,
};
use felhom_testbed::privhelper::{Bed, BedOptions, Client, FakeBins, is_root};
use serde::Serialize;

fn fakes() -> FakeBins {
    FakeBins {
        smartctl: env!("CARGO_BIN_EXE_felhom-fake-smartctl").into(),
        pct: env!("CARGO_BIN_EXE_felhom-fake-pct").into(),
    }
}

#[derive(Serialize, Clone)]
struct Rootfs {
    storage: String,
    size_gib: u64,
}
#[derive(Serialize, Clone)]
struct Net {
    bridge: String,
    ip: String,
    gw: Option<String>,
}
#[derive(Serialize, Clone)]
struct Spec {
    vmid: u64,
    ostemplate: String,
    hostname: String,
    memory_mib: u64,
    swap_mib: u64,
    cores: u64,
    rootfs: Rootfs,
    net: Net,
    nesting: bool,
    ssh_public_keys: Vec<String>,
    start: bool,
    onboot: bool,
}
/// Same variant order and shapes as `felhom_protocol::Request`.
#[derive(Serialize, Clone)]
#[allow(dead_code)]
enum Shadow {
    Hello { version: u32 },
    Ping,
    PctCreateKeyctl(Spec),
    UsbMount { device: String, name: String },
    UsbUnmount { name: String },
    SmartRead { device: String },
}

fn frame(s: &Shadow) -> Vec<u8> {
    let cfg = bincode::config::standard().with_big_endian();
    let payload = bincode::serde::encode_to_vec(s, cfg).unwrap();
    let mut out = (payload.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&payload);
    out
}

const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl user@host";

fn good_spec() -> Spec {
    Spec {
        vmid: 120,
        ostemplate: "local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst".into(),
        hostname: "web1".into(),
        memory_mib: 1024,
        swap_mib: 512,
        cores: 2,
        rootfs: Rootfs {
            storage: "local-lvm".into(),
            size_gib: 8,
        },
        net: Net {
            bridge: "vmbr0".into(),
            ip: "dhcp".into(),
            gw: None,
        },
        nesting: true,
        ssh_public_keys: vec![KEY.into()],
        start: false,
        onboot: true,
    }
}

/// Strings no string field accepts.
fn hostile_strings() -> Vec<String> {
    vec![
        "..".into(),
        "../../etc/shadow".into(),
        "x; reboot".into(),
        "$(reboot)".into(),
        "`id`".into(),
        "a|b".into(),
        "a&&b".into(),
        "a\nb".into(),
        "a\0b".into(),
        "árvíztűrő".into(),
        "x".repeat(5000),
        String::new(),
    ]
}

/// Every field of every operation with bad values; (field, request).
fn hostile_requests() -> Vec<(String, Class, Shadow)> {
    let mut v: Vec<(String, Class, Shadow)> = Vec::new();
    let mut spec = |field: &str, f: &dyn Fn(&mut Spec)| {
        let mut s = good_spec();
        f(&mut s);
        v.push((field.to_string(), Class::Pct, Shadow::PctCreateKeyctl(s)));
    };
    for n in [0u64, 99, 1_000_000_000, u64::MAX] {
        spec("vmid", &|s| s.vmid = n);
    }
    for n in [0u64, 15, 1 << 40] {
        spec("memory_mib", &|s| s.memory_mib = n);
    }
    spec("swap_mib", &|s| s.swap_mib = 1 << 40);
    for n in [0u64, 8193] {
        spec("cores", &|s| s.cores = n);
    }
    for n in [0u64, 1 << 20] {
        spec("size_gib", &|s| s.rootfs.size_gib = n);
    }
    for h in hostile_strings() {
        spec("ostemplate", &|s| s.ostemplate = h.clone());
        spec("ostemplate", &|s| {
            s.ostemplate = format!("local:vztmpl/{h}.tar.gz")
        });
        spec("hostname", &|s| s.hostname = h.clone());
        spec("storage", &|s| s.rootfs.storage = h.clone());
        spec("bridge", &|s| s.net.bridge = h.clone());
        spec("ip", &|s| s.net.ip = h.clone());
        spec("ssh_public_keys", &|s| s.ssh_public_keys = vec![h.clone()]);
    }
    spec("ostemplate", &|s| {
        s.ostemplate = "local:iso/debian.iso".into()
    });
    spec("hostname", &|s| s.hostname = "-web".into());
    spec("bridge", &|s| s.net.bridge = "vmbr0123456789ab".into());
    spec("ip", &|s| s.net.ip = "192.0.2.1/33".into());
    spec("ip", &|s| s.net.ip = "192.0.2.1/24,gw=192.0.2.254".into());
    spec("gw", &|s| s.net.gw = Some("192.0.2.1".into()));
    spec("gw", &|s| {
        s.net.ip = "192.0.2.5/24".into();
        s.net.gw = Some("192.0.2.1,firewall=0".into());
    });
    spec("ssh_public_keys", &|s| {
        s.ssh_public_keys = vec![format!("{KEY}\n{KEY}")]
    });
    spec("ssh_public_keys", &|s| {
        s.ssh_public_keys = vec!["ssh-dss AAAAB3NzaC1kc3MAAACBAP user@host".into()]
    });
    spec("ssh_public_keys", &|s| {
        s.ssh_public_keys = vec![KEY.to_string(); 17]
    });
    for h in hostile_strings() {
        v.push((
            "device".into(),
            Class::Usb,
            Shadow::UsbMount {
                device: h.clone(),
                name: "backup".into(),
            },
        ));
        v.push((
            "device".into(),
            Class::Usb,
            Shadow::UsbMount {
                device: format!("/dev/{h}"),
                name: "backup".into(),
            },
        ));
        v.push((
            "name".into(),
            Class::Usb,
            Shadow::UsbMount {
                device: "/dev/sdb1".into(),
                name: h.clone(),
            },
        ));
        v.push((
            "name".into(),
            Class::Usb,
            Shadow::UsbUnmount { name: h.clone() },
        ));
        v.push((
            "device".into(),
            Class::Smart,
            Shadow::SmartRead { device: h.clone() },
        ));
    }
    for d in ["/etc/passwd", "/dev/../etc/shadow", "/dev//sda1"] {
        v.push((
            "device".into(),
            Class::Usb,
            Shadow::UsbMount {
                device: d.into(),
                name: "backup".into(),
            },
        ));
    }
    for n in ["Backup", "-backup", "a/b", &"x".repeat(33)] {
        v.push((
            "name".into(),
            Class::Usb,
            Shadow::UsbUnmount { name: n.into() },
        ));
    }
    // Wrong kind of device for SMART: partitions, loop, dm, paths.
    for d in [
        "sda1",
        "nvme0n1p1",
        "loop0",
        "dm-0",
        "/dev/sda",
        "sd",
        "SDA",
    ] {
        v.push((
            "device".into(),
            Class::Smart,
            Shadow::SmartRead { device: d.into() },
        ));
    }
    v
}

fn expect_refused(c: &mut Client, kind: ErrorKind, what: &str) {
    match c.read_response().unwrap() {
        Some(Response::Error { kind: k, message }) => {
            assert_eq!(k, kind, "{what}: {message}");
            assert!(!message.is_empty());
        }
        other => panic!("{what}: expected a {kind} error, got {other:?}"),
    }
    assert!(c.closed_by_peer(), "{what}: the connection is ended");
}

#[test]
fn hostile_inputs_are_refused_audited_and_survived() {
    if !is_root() {
        eprintln!("SKIP: this test needs root (it starts the root helper)");
        return;
    }
    let bed = Bed::new(fakes(), BedOptions::default());
    let _p = bed.activate(felhom_protocol::Class::Pct);
    let _u = bed.activate(felhom_protocol::Class::Usb);
    let _s = bed.activate(felhom_protocol::Class::Smart);
    let mut denied = 0usize;

    // ---- framing, on every instance
    for class in Class::ALL {
        let sock = bed.socket(class);
        let hello = encode_request(&Request::Hello {
            version: PROTOCOL_VERSION,
        })
        .unwrap();
        let cases: Vec<(&str, Vec<u8>, bool)> = vec![
            (
                "oversized length",
                ((MAX_REQUEST_FRAME + 1) as u32).to_be_bytes().to_vec(),
                false,
            ),
            ("4 GiB length", u32::MAX.to_be_bytes().to_vec(), false),
            ("zero length", 0u32.to_be_bytes().to_vec(), false),
            (
                "garbage payload",
                [
                    &8u32.to_be_bytes()[..],
                    &[0xde, 0xad, 0xbe, 0xef, 0xff, 0xff, 0xff, 0xff],
                ]
                .concat(),
                false,
            ),
            (
                "trailing bytes",
                {
                    let mut p = encode_request(&Request::Ping).unwrap();
                    p[3] += 1;
                    p.push(0);
                    p
                },
                true,
            ),
            (
                "non-UTF-8 string",
                [&6u32.to_be_bytes()[..], &[5, 4, 0xff, 0xfe, 0x80, 0x81]].concat(),
                true,
            ),
        ];
        for (what, bytes, after_hello) in cases {
            let mut c = Client::connect(&sock).unwrap();
            if after_hello {
                c.send_raw(&hello).unwrap();
                assert!(matches!(
                    c.read_response().unwrap(),
                    Some(Response::Hello { .. })
                ));
            }
            c.send_raw(&bytes).unwrap();
            expect_refused(&mut c, ErrorKind::Framing, what);
            denied += 1;
        }
        // Truncated header and truncated payload: the client gives up mid-frame.
        for (what, bytes) in [
            ("truncated header", vec![0u8, 0]),
            (
                "truncated payload",
                [&100u32.to_be_bytes()[..], &[1, 2, 3]].concat(),
            ),
        ] {
            let mut c = Client::connect(&sock).unwrap();
            c.send_raw(&bytes).unwrap();
            c.stream.shutdown(std::net::Shutdown::Write).unwrap();
            expect_refused(&mut c, ErrorKind::Framing, what);
            denied += 1;
        }
        // Wrong version; an operation before Hello.
        let mut c = Client::connect(&sock).unwrap();
        c.send_raw(
            &encode_request(&Request::Hello {
                version: PROTOCOL_VERSION + 1,
            })
            .unwrap(),
        )
        .unwrap();
        expect_refused(&mut c, ErrorKind::VersionMismatch, "wrong version");
        let mut c = Client::connect(&sock).unwrap();
        c.send_raw(&encode_request(&Request::Ping).unwrap())
            .unwrap();
        expect_refused(&mut c, ErrorKind::HandshakeRequired, "no hello");
        denied += 2;
    }

    // ---- class: every operation on every instance that does not own it
    let spec = PctCreateSpec::from_json(&serde_json::to_string(&serde_json::json!({
        "vmid": 120, "ostemplate": "local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst", "hostname": "web1",
        "memory_mib": 1024, "swap_mib": 512, "cores": 2, "rootfs": {"storage": "local-lvm", "size_gib": 8},
        "net": {"bridge": "vmbr0", "ip": "dhcp", "gw": null}, "nesting": false, "ssh_public_keys": [], "start": false, "onboot": true
    })).unwrap()).unwrap();
    let ops = vec![
        Request::PctCreateKeyctl(spec),
        Request::UsbMount {
            device: felhom_protocol::BlockDevicePath::new("/dev/sdb1").unwrap(),
            name: MountName::new("b").unwrap(),
        },
        Request::UsbUnmount {
            name: MountName::new("b").unwrap(),
        },
        Request::SmartRead {
            device: DiskDevice::new("sda").unwrap(),
        },
    ];
    assert_eq!(ops.len(), felhom_protocol::Operation::ALL.len());
    let mut class_refusals = 0;
    for class in Class::ALL {
        for op in &ops {
            let o = op.operation().unwrap();
            if o.class() == class {
                continue;
            }
            let mut c = Client::hello(&bed.socket(class)).unwrap();
            c.send_raw(&encode_request(op).unwrap()).unwrap();
            expect_refused(&mut c, ErrorKind::WrongClass, &format!("{o} on {class}"));
            class_refusals += 1;
        }
    }
    assert_eq!(class_refusals, 8);
    denied += class_refusals;

    // ---- every validated field
    let cases = hostile_requests();
    assert!(cases.len() > 100);
    for (field, class, shadow) in &cases {
        let mut c = Client::hello(&bed.socket(*class)).unwrap();
        c.send_raw(&frame(shadow)).unwrap();
        let resp = c.read_response().unwrap();
        match resp {
            Some(Response::Error {
                kind: ErrorKind::Invalid,
                message,
            }) => {
                assert!(
                    message.contains(field.as_str()) || (field == "gw" && message.contains("gw")),
                    "{field}: {message}"
                );
            }
            // A NUL or other control byte is still valid UTF-8; a non-UTF-8 byte is a framing error.
            other => panic!("{field} on {class}: expected Invalid, got {other:?}"),
        }
        assert!(c.closed_by_peer());
        denied += 1;
    }

    // Still serving, on every instance; nothing was executed.
    for class in Class::ALL {
        let mut c = Client::hello(&bed.socket(class)).unwrap();
        assert!(matches!(
            c.call(&Request::Ping).unwrap(),
            Response::Pong { .. }
        ));
    }
    assert!(bed.smart_calls().is_empty(), "no tool ran");
    assert!(bed.pct_calls().is_empty(), "no tool ran");
    // Every refusal is on record, coalesced per uid and second (the last ones are
    // written once their second has passed).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let recs = loop {
        let recs = bed.audit_records();
        if Bed::refusals_on_record(&recs) == denied as u64 {
            break recs;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} of {denied} refusals on record",
            Bed::refusals_on_record(&recs)
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(
        recs.iter()
            .all(|r| r["kind"] == "refused" && r["result"] == "denied")
    );
    for cat in ["framing", "version", "handshake", "class", "validation"] {
        assert!(
            recs.iter().any(|r| r["categories"][cat].as_u64() > Some(0)),
            "{cat}"
        );
    }
    assert!(
        recs.iter()
            .all(|r| r["peer"]["uid"] == 0 && r["peer"]["pid"].as_i64().unwrap() > 0)
    );
    let out = bed.verify();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
