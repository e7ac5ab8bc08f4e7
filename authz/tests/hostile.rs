//! Hostile envelopes: each one is refused with its exact reason, and the good ones beside
//! them are accepted, so every refusal is caused by the one thing the test changed.

mod common;

use common::*;
use felhom_authz::{
    Action, GuestOp, HostOp, Kind, MAX_ENVELOPE_BYTES, Reason, Trust, encode_base64,
    verify_desired, verify_op,
};
use serde_json::{Value, json};

fn refused(env: &[u8], trust: &Trust) -> Reason {
    match verify_op(env, trust, &ctx()) {
        Ok(op) => panic!("accepted: {op:?}"),
        Err(r) => r.reason,
    }
}

fn with(mut p: Value, path: &[&str], v: Value) -> Value {
    let mut cur = &mut p;
    for k in &path[..path.len() - 1] {
        cur = cur.get_mut(*k).unwrap();
    }
    cur[path[path.len() - 1]] = v;
    p
}

fn alice_signed(p: &Value) -> Vec<u8> {
    op_env(p, &[("alice", &key(1))])
}

#[test]
fn the_baseline_is_accepted() {
    let op = verify_op(&alice_signed(&stop_payload()), &trust(1, 2), &ctx()).unwrap();
    assert_eq!(op.kind, Kind::Stop);
    assert_eq!(op.signers, ["alice"]);
    assert_eq!(op.op_id.as_str(), OP_ID);
    match op.action {
        Action::Guest {
            target,
            expect,
            op: GuestOp::Stop(p),
        } => {
            assert_eq!(target.vmid.get(), 101);
            assert_eq!(expect, None);
            assert_eq!(p.timeout_seconds.unwrap().get(), 30);
        }
        other => panic!("{other:?}"),
    }
    let body = stop_payload().to_string();
    assert_eq!(
        op.payload_sha256,
        felhom_authz::payload_sha256(body.as_bytes())
    );
}

#[test]
fn extra_unknown_duplicate_and_bad_signatures_beside_enough_good_ones_do_not_fail() {
    let body = stop_payload().to_string();
    let b = body.as_bytes();
    let env = json!({"payloadType": OP, "payload": encode_base64(b), "signatures": [
        {"keyid": "mallory", "sig": sig(&key(9), OP, b)},
        {"keyid": "alice", "sig": sig(&key(1), OP, b)},
        {"keyid": "alice", "sig": sig(&key(1), OP, b)},
        {"keyid": "bob", "sig": "not base64!"},
        {"keyid": "bob", "sig": sig(&key(2), OP, b"other body")},
        {"keyid": "carol", "sig": sig(&key(2), OP, b)},
    ]});
    let op = verify_op(env.to_string().as_bytes(), &trust(2, 2), &ctx()).unwrap();
    assert_eq!(op.signers, ["alice", "bob"]);
}

#[test]
fn a_wrong_keyid_hint_falls_back_to_every_trusted_key() {
    let env = op_env(&stop_payload(), &[("bob", &key(1)), ("", &key(2))]);
    let op = verify_op(&env, &trust(2, 2), &ctx()).unwrap();
    assert_eq!(op.signers, ["alice", "bob"]);
}

#[test]
fn url_safe_unpadded_base64_is_accepted() {
    let body = stop_payload().to_string();
    let std_env = String::from_utf8(alice_signed(&stop_payload())).unwrap();
    let v: Value = serde_json::from_str(&std_env).unwrap();
    let to_url = |s: &str| s.replace('+', "-").replace('/', "_").replace('=', "");
    let url = json!({"payloadType": OP, "payload": to_url(v["payload"].as_str().unwrap()),
        "signatures": [{"keyid": "alice", "sig": to_url(v["signatures"][0]["sig"].as_str().unwrap())}]});
    let op = verify_op(url.to_string().as_bytes(), &trust(1, 1), &ctx()).unwrap();
    // The replay identity is the payload's, not the encoding's.
    assert_eq!(
        op.payload_sha256,
        felhom_authz::payload_sha256(body.as_bytes())
    );
}

#[test]
fn window_edges_with_skew() {
    let t = trust(1, 1);
    // Exactly the maximum validity (3600 s) is fine; one second more is too long.
    let p = with(
        with(stop_payload(), &["not_before"], json!(NOW - 100)),
        &["not_after"],
        json!(NOW + 3500),
    );
    assert!(verify_op(&alice_signed(&p), &t, &ctx()).is_ok());
    let p = with(p, &["not_after"], json!(NOW + 3501));
    assert_eq!(refused(&alice_signed(&p), &t), Reason::WindowTooLong);
    // not_before - skew <= now: now = not_before - 60 is valid, - 61 is not yet.
    let p = with(
        with(stop_payload(), &["not_before"], json!(NOW + 60)),
        &["not_after"],
        json!(NOW + 600),
    );
    assert!(verify_op(&alice_signed(&p), &t, &ctx()).is_ok());
    let p = with(
        with(stop_payload(), &["not_before"], json!(NOW + 61)),
        &["not_after"],
        json!(NOW + 600),
    );
    assert_eq!(refused(&alice_signed(&p), &t), Reason::NotYetValid);
    // now < not_after + skew: not_after = now - 59 is valid, now - 60 expired.
    let p = with(
        with(stop_payload(), &["not_before"], json!(NOW - 600)),
        &["not_after"],
        json!(NOW - 59),
    );
    assert!(verify_op(&alice_signed(&p), &t, &ctx()).is_ok());
    let p = with(p, &["not_after"], json!(NOW - 60));
    assert_eq!(refused(&alice_signed(&p), &t), Reason::Expired);
}

/// Each case: a name, the envelope, the trust, the exact reason.
#[test]
fn hostile_envelopes_each_get_their_exact_reason() {
    let t11 = trust(1, 1);
    let t12 = trust(1, 2);
    let t22 = trust(2, 2);
    let a = key(1);
    let m = key(9);
    let body = stop_payload().to_string();
    let good = alice_signed(&stop_payload());
    let good_v: Value = serde_json::from_slice(&good).unwrap();
    let sig_a = good_v["signatures"][0]["sig"].as_str().unwrap().to_string();
    let payload_b64 = good_v["payload"].as_str().unwrap().to_string();

    // A non-canonical S: S + ℓ (the group order) still satisfies the cofactorless
    // equation in a lax verifier, but S ≥ ℓ is refused by verify_strict.
    let mut non_canonical = felhom_authz::decode_base64(&sig_a).unwrap();
    add_group_order(&mut non_canonical[32..]);
    // A small-order R with S = 0 paired with a weak key forges for any message; the key
    // is refused by the trust, and with a strong key the signature is simply bad.
    let mut small_order = vec![0u8; 64];
    small_order[0] = 1;

    let sig_env = |sigs: Value| -> Vec<u8> {
        json!({"payloadType": OP, "payload": payload_b64, "signatures": sigs})
            .to_string()
            .into_bytes()
    };
    let one_name_twice = trust_with(
        &[("alice", key(1)), ("alice-laptop", key(1)), ("bob", key(2))],
        2,
        2,
    );

    let mut padded = stop_payload();
    padded["reason"] = json!("x".repeat(10));
    let mut big = String::from_utf8(alice_signed(&padded)).unwrap();
    big.insert_str(1, &" ".repeat(MAX_ENVELOPE_BYTES));

    let cases: Vec<(&str, Vec<u8>, &Trust, Reason)> = vec![
        ("larger than 64 KiB", big.into_bytes(), &t11, Reason::TooLarge),
        ("not JSON", b"{\"payloadType\":".to_vec(), &t11, Reason::BadEnvelope),
        ("payload not base64", sig_env(json!([{"keyid":"alice","sig":sig_a}])).pipe_replace(&payload_b64, "!!notbase64!!"), &t11, Reason::BadEnvelope),
        ("unknown envelope field", json!({"payloadType": OP, "payload": payload_b64, "signatures": [{"keyid":"alice","sig":sig_a}], "cert": "x"}).to_string().into_bytes(), &t11, Reason::BadEnvelope),
        ("17 signatures", sig_env(Value::Array(vec![json!({"keyid":"alice","sig":sig_a}); 17])), &t11, Reason::BadEnvelope),
        ("signed by an untrusted key", op_env(&stop_payload(), &[("alice", &m)]), &t11, Reason::BadSignature),
        ("a valid signature over a different payload", sig_env(json!([{"keyid":"alice","sig": sig(&a, OP, b"{\"v\":1}")}])), &t11, Reason::BadSignature),
        ("signature over the same body under another payloadType", sig_env(json!([{"keyid":"alice","sig": sig(&a, DESIRED, body.as_bytes())}])), &t11, Reason::BadSignature),
        ("non-canonical S", sig_env(json!([{"keyid":"alice","sig": encode_base64(&non_canonical)}])), &t11, Reason::BadSignature),
        ("small-order R, zero S", sig_env(json!([{"keyid":"alice","sig": encode_base64(&small_order)}])), &t11, Reason::BadSignature),
        ("garbage body signed by an untrusted key: verified before parsed", envelope_bytes(OP, b"\xff{not json", &[("alice", &m)]), &t11, Reason::BadSignature),
        ("v 2 signed by an untrusted key", op_env(&with(stop_payload(), &["v"], json!(2)), &[("alice", &m)]), &t11, Reason::BadSignature),
        ("wrong type signed by an untrusted key", envelope_bytes(DESIRED, body.as_bytes(), &[("alice", &m)]), &t11, Reason::BadSignature),
        ("signature not base64", sig_env(json!([{"keyid":"alice","sig":"@@@@"}])), &t11, Reason::BadSignature),
        ("signature 63 bytes", sig_env(json!([{"keyid":"alice","sig": encode_base64(&[7u8; 63])}])), &t11, Reason::BadSignature),
        ("one key's signature duplicated to reach 2", sig_env(json!([{"keyid":"alice","sig":sig_a},{"keyid":"bob","sig":sig_a}])), &t22, Reason::BelowThreshold),
        ("one key under two names", sig_env(json!([{"keyid":"alice","sig":sig_a},{"keyid":"alice-laptop","sig":sig_a}])), &one_name_twice, Reason::BelowThreshold),
        ("a trusted and an untrusted key for 2", op_env(&stop_payload(), &[("alice", &a), ("mallory", &m)]), &t22, Reason::BelowThreshold),
        ("no signatures", sig_env(json!([])), &t11, Reason::BelowThreshold),
        ("grant irreversible with the reversible threshold", alice_signed(&with(stop_payload(), &["grant"], json!("irreversible"))), &t12, Reason::BelowThreshold),
        ("desired state sent as an operation", envelope_bytes(DESIRED, body.as_bytes(), &[("alice", &a)]), &t11, Reason::WrongType),
        ("plain application/json", envelope_bytes("application/json", body.as_bytes(), &[("alice", &a)]), &t11, Reason::WrongType),
        ("body not JSON", envelope_bytes(OP, b"stop 101", &[("alice", &a)]), &t11, Reason::BadPayload),
        ("body not UTF-8", envelope_bytes(OP, b"{\"v\":1,\"reason\":\"\xff\"}", &[("alice", &a)]), &t11, Reason::BadPayload),
        ("unknown top-level field", alice_signed(&with(stop_payload(), &["priority"], json!(1))), &t11, Reason::BadPayload),
        ("duplicate agent_id field", envelope_bytes(OP, body.replacen("\"agent_id\"", &format!("\"agent_id\":\"{OTHER_AGENT}\",\"agent_id\""), 1).as_bytes(), &[("alice", &a)]), &t11, Reason::BadPayload),
        ("upper-case op_id", alice_signed(&with(stop_payload(), &["op_id"], json!(OP_ID.to_uppercase()))), &t11, Reason::BadPayload),
        ("short op_id", alice_signed(&with(stop_payload(), &["op_id"], json!("0011"))), &t11, Reason::BadPayload),
        ("reason of 201 characters", alice_signed(&with(stop_payload(), &["reason"], json!("é".repeat(201)))), &t11, Reason::BadPayload),
        ("target missing", { let mut p = stop_payload(); p.as_object_mut().unwrap().remove("target"); alice_signed(&p) }, &t11, Reason::BadPayload),
        ("expect missing", { let mut p = stop_payload(); p.as_object_mut().unwrap().remove("expect"); alice_signed(&p) }, &t11, Reason::BadPayload),
        ("unknown grant", alice_signed(&with(stop_payload(), &["grant"], json!("all"))), &t11, Reason::BadPayload),
        ("not_after before not_before", alice_signed(&with(stop_payload(), &["not_after"], json!(NOW - 700))), &t11, Reason::BadPayload),
        ("negative not_before", alice_signed(&with(stop_payload(), &["not_before"], json!(-1))), &t11, Reason::BadPayload),
        ("v 2", alice_signed(&with(stop_payload(), &["v"], json!(2))), &t11, Reason::UnsupportedVersion),
        ("v 2 with fields v1 does not know", alice_signed(&with(with(stop_payload(), &["v"], json!(2)), &["audience"], json!("x"))), &t11, Reason::UnsupportedVersion),
        ("another agent_id", alice_signed(&with(stop_payload(), &["agent_id"], json!(OTHER_AGENT))), &t11, Reason::WrongAgent),
        ("another node", alice_signed(&with(stop_payload(), &["node"], json!("pve"))), &t11, Reason::WrongNode),
        ("not yet valid", alice_signed(&with(with(stop_payload(), &["not_before"], json!(NOW + 100)), &["not_after"], json!(NOW + 200))), &t11, Reason::NotYetValid),
        ("expired", alice_signed(&with(with(stop_payload(), &["not_before"], json!(NOW - 1000)), &["not_after"], json!(NOW - 100))), &t11, Reason::Expired),
        ("a window one second too long", alice_signed(&with(with(stop_payload(), &["not_before"], json!(NOW - 10)), &["not_after"], json!(NOW + 3591))), &t11, Reason::WindowTooLong),
        ("unknown op", alice_signed(&with(stop_payload(), &["op"], json!("format_disks"))), &t11, Reason::UnknownOp),
        ("destroy granted reversible", alice_signed(&with(with(stop_payload(), &["op"], json!("destroy")), &["params"], json!({"purge": true}))), &t11, Reason::GrantMismatch),
        ("set_config clearing protection granted reversible", alice_signed(&with(with(stop_payload(), &["op"], json!("set_config")), &["params"], json!({"config": {"protection": 0}}))), &t11, Reason::GrantMismatch),
        ("an unknown field in params", alice_signed(&with(stop_payload(), &["params", "force"], json!(true))), &t11, Reason::InvalidParams),
        ("a float vmid", alice_signed(&with(stop_payload(), &["target", "vmid"], json!(101.0))), &t11, Reason::InvalidParams),
        ("a string vmid", alice_signed(&with(stop_payload(), &["target", "vmid"], json!("101"))), &t11, Reason::InvalidParams),
        ("vmid below 100", alice_signed(&with(stop_payload(), &["target", "vmid"], json!(99))), &t11, Reason::InvalidParams),
        ("an unknown field in target", alice_signed(&with(stop_payload(), &["target", "node"], json!("pve2"))), &t11, Reason::InvalidParams),
        ("an unknown field in expect", alice_signed(&with(stop_payload(), &["expect"], json!({"config_digest": "a".repeat(40), "pending": true}))), &t11, Reason::InvalidParams),
        ("a digest of 39 hex", alice_signed(&with(stop_payload(), &["expect"], json!({"config_digest": "a".repeat(39)}))), &t11, Reason::InvalidParams),
        ("a guest op without a target", alice_signed(&with(stop_payload(), &["target"], Value::Null)), &t11, Reason::InvalidParams),
        ("target type docker", alice_signed(&with(stop_payload(), &["target", "type"], json!("docker"))), &t11, Reason::InvalidParams),
        ("a scratch vmid", alice_signed(&with(stop_payload(), &["target", "vmid"], json!(900_000_001))), &t11, Reason::InvalidParams),
        ("timeout 0", alice_signed(&with(stop_payload(), &["params", "timeout_seconds"], json!(0))), &t11, Reason::InvalidParams),
        ("params null", alice_signed(&with(stop_payload(), &["params"], Value::Null)), &t11, Reason::InvalidParams),
        ("start with params", alice_signed(&with(with(stop_payload(), &["op"], json!("start")), &["params"], json!({"timeout_seconds": 3}))), &t11, Reason::InvalidParams),
        ("snapshot named current", alice_signed(&with(with(stop_payload(), &["op"], json!("snapshot")), &["params"], json!({"name": "current"}))), &t11, Reason::InvalidParams),
        ("backup storage with a slash", alice_signed(&with(with(stop_payload(), &["op"], json!("backup")), &["params"], json!({"storage": "../etc", "mode": "snapshot"}))), &t11, Reason::InvalidParams),
        ("usb_mount with a target", alice_signed(&with(with(stop_payload(), &["op"], json!("usb_mount")), &["params"], json!({"device": "/dev/sdb1", "name": "backup"}))), &t11, Reason::InvalidParams),
        ("usb_mount of a path outside /dev", alice_signed(&with(with(with(stop_payload(), &["op"], json!("usb_mount")), &["target"], Value::Null), &["params"], json!({"device": "/dev/../etc/shadow", "name": "backup"}))), &t11, Reason::InvalidParams),
        ("create_container for another vmid", alice_signed(&with(with(stop_payload(), &["op"], json!("create_container")), &["params"], spec(120))), &t11, Reason::InvalidParams),
        ("create_container on qemu", alice_signed(&with(with(with(stop_payload(), &["op"], json!("create_container")), &["params"], spec(101)), &["target", "type"], json!("qemu"))), &t11, Reason::InvalidParams),
        ("create_container with privileged", alice_signed(&with(with(stop_payload(), &["op"], json!("create_container")), &["params"], with(spec(101), &["privileged"], json!(true)))), &t11, Reason::InvalidParams),
    ];
    assert!(cases.len() >= 25, "{}", cases.len());
    let mut seen = std::collections::HashSet::new();
    for (name, env, trust, want) in &cases {
        let got = match verify_op(env, trust, &ctx()) {
            Ok(op) => panic!("{name}: accepted {op:?}"),
            Err(r) => r,
        };
        assert_eq!(got.reason, *want, "{name}: {got}");
        seen.insert(*want);
    }
    // Every reason this crate can give.
    for r in Reason::ALL {
        assert!(seen.contains(&r), "no hostile case for {r}");
    }
}

#[test]
fn the_kinds_of_issue_12_are_reversible_and_three_gated_kinds_are_not() {
    use felhom_authz::Grant::{Irreversible, Reversible};
    let classes: Vec<(&str, felhom_authz::Grant, bool)> = Kind::ALL
        .iter()
        .map(|k| (k.as_str(), k.class(), k.is_gated()))
        .collect();
    assert_eq!(
        classes,
        [
            ("start", Reversible, false),
            ("stop", Reversible, false),
            ("reboot", Reversible, false),
            ("snapshot", Reversible, false),
            ("backup", Reversible, false),
            ("create_container", Reversible, false),
            ("usb_mount", Reversible, false),
            ("usb_unmount", Reversible, false),
            ("set_config", Reversible, true),
            ("rollback", Reversible, true),
            ("restore", Reversible, true),
            ("delete_snapshot", Irreversible, true),
            ("destroy", Irreversible, true),
            ("undo", Reversible, true),
            ("release_undo", Irreversible, true),
        ]
    );
    for k in Kind::ALL {
        assert_eq!(Kind::parse(k.as_str()), Some(k));
    }
}

fn spec(vmid: u32) -> Value {
    json!({"vmid": vmid, "ostemplate": "local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst",
           "hostname": "web1", "memory_mib": 1024, "swap_mib": 512, "cores": 2,
           "rootfs": {"storage": "local-lvm", "size_gib": 8},
           "net": {"bridge": "vmbr0", "ip": "dhcp", "gw": null},
           "nesting": true, "ssh_public_keys": [], "start": false, "onboot": true})
}

#[test]
fn every_kind_parses_its_params() {
    let t = trust(1, 1);
    let ok = |p: Value| verify_op(&alice_signed(&p), &t, &ctx()).unwrap();
    let guest = |op: &str, params: Value| {
        with(
            with(stop_payload(), &["op"], json!(op)),
            &["params"],
            params,
        )
    };
    let host = |op: &str, params: Value| with(guest(op, params), &["target"], Value::Null);
    assert!(matches!(
        ok(guest("start", json!({}))).action,
        Action::Guest {
            op: GuestOp::Start,
            ..
        }
    ));
    assert!(matches!(
        ok(guest("reboot", json!({}))).action,
        Action::Guest {
            op: GuestOp::Reboot,
            ..
        }
    ));
    assert!(
        matches!(ok(guest("stop", json!({}))).action, Action::Guest { op: GuestOp::Stop(p), .. } if p.timeout_seconds.is_none())
    );
    match ok(guest(
        "snapshot",
        json!({"name": "pre-upgrade", "description": "before\nthe upgrade"}),
    ))
    .action
    {
        Action::Guest {
            op: GuestOp::Snapshot(p),
            ..
        } => assert_eq!(p.name.as_str(), "pre-upgrade"),
        other => panic!("{other:?}"),
    }
    match ok(guest("backup", json!({"storage": "backup-nfs", "mode": "snapshot", "compress": "zstd", "notes": "{{guestname}}"}))).action {
        Action::Guest { op: GuestOp::Backup(p), .. } => assert_eq!(p.storage.as_str(), "backup-nfs"),
        other => panic!("{other:?}"),
    }
    match ok(guest("create_container", spec(101))).action {
        Action::Guest {
            op: GuestOp::CreateContainer(s),
            ..
        } => assert_eq!(s.vmid.get(), 101),
        other => panic!("{other:?}"),
    }
    match ok(with(
        host(
            "usb_mount",
            json!({"device": "/dev/disk/by-id/usb-X-0:0-part1", "name": "backup"}),
        ),
        &["expect"],
        Value::Null,
    ))
    .action
    {
        Action::Host(HostOp::UsbMount { device, name }) => {
            assert_eq!(device.as_str(), "/dev/disk/by-id/usb-X-0:0-part1");
            assert_eq!(name.as_str(), "backup");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        ok(host("usb_unmount", json!({"name": "backup"}))).action,
        Action::Host(HostOp::UsbUnmount { .. })
    ));
    // A compare-and-set digest and a reason of exactly 200 scalar values (400 bytes).
    let p = with(
        with(
            stop_payload(),
            &["expect"],
            json!({"config_digest": "0123456789abcdef0123456789abcdef01234567"}),
        ),
        &["reason"],
        json!("é".repeat(200)),
    );
    match ok(p).action {
        Action::Guest {
            expect: Some(e), ..
        } => assert_eq!(e.config_digest.as_str().len(), 40),
        other => panic!("{other:?}"),
    }
    // An irreversible grant is fine for a reversible kind when the irreversible threshold is met.
    let p = with(stop_payload(), &["grant"], json!("irreversible"));
    let op = verify_op(
        &op_env(&p, &[("alice", &key(1)), ("bob", &key(2))]),
        &trust(1, 2),
        &ctx(),
    )
    .unwrap();
    assert_eq!(op.grant, felhom_authz::Grant::Irreversible);
}

fn desired_payload() -> Value {
    json!({"v": 1, "agent_id": AGENT, "node": NODE, "generation": 7,
           "guests": [{"vmid": 101, "power": "running"}]})
}

#[test]
fn desired_state_documents() {
    let t = trust(1, 2);
    let a = key(1);
    let env = |p: &Value| envelope_bytes(DESIRED, p.to_string().as_bytes(), &[("alice", &a)]);
    let d = verify_desired(&env(&desired_payload()), &t, &ctx()).unwrap();
    assert_eq!(d.generation, 7);
    assert_eq!(d.guests.len(), 1);
    assert_eq!(d.signers, ["alice"]);
    let reason = |e: Vec<u8>| verify_desired(&e, &t, &ctx()).unwrap_err().reason;
    assert_eq!(
        reason(env(&with(
            desired_payload(),
            &["agent_id"],
            json!(OTHER_AGENT)
        ))),
        Reason::WrongAgent
    );
    assert_eq!(
        reason(env(&with(desired_payload(), &["node"], json!("pve9")))),
        Reason::WrongNode
    );
    assert_eq!(
        reason(env(&with(desired_payload(), &["extra"], json!(1)))),
        Reason::BadPayload
    );
    assert_eq!(
        reason(env(&with(desired_payload(), &["generation"], json!(-1)))),
        Reason::BadPayload
    );
    assert_eq!(
        reason(env(&with(desired_payload(), &["v"], json!(3)))),
        Reason::UnsupportedVersion
    );
    // An operation envelope is not a desired state.
    assert_eq!(reason(alice_signed(&stop_payload())), Reason::WrongType);
    assert_eq!(
        reason(envelope_bytes(
            DESIRED,
            desired_payload().to_string().as_bytes(),
            &[("mallory", &key(9))]
        )),
        Reason::BadSignature
    );
}

/// Adds ℓ = 2^252 + 27742317777372353535851937790883648493 to a 32-byte little-endian S.
fn add_group_order(s: &mut [u8]) {
    const L: [u8; 32] = [
        0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9, 0xde,
        0x14, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
    ];
    let mut carry = 0u16;
    for i in 0..32 {
        let v = s[i] as u16 + L[i] as u16 + carry;
        s[i] = v as u8;
        carry = v >> 8;
    }
    assert_eq!(carry, 0, "S + ℓ must fit in 256 bits");
}

trait PipeReplace {
    fn pipe_replace(self, from: &str, to: &str) -> Vec<u8>;
}
impl PipeReplace for Vec<u8> {
    fn pipe_replace(self, from: &str, to: &str) -> Vec<u8> {
        String::from_utf8(self)
            .unwrap()
            .replace(from, to)
            .into_bytes()
    }
}
