//! felhom-sign as a real process: keys, signing, co-signing, inspecting, and the results
//! verified with felhom-authz against a Trust built from keygen's printed lines.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use felhom_authz::{Action, AgentId, Context, GuestOp, Reason, Trust, verify_desired, verify_op};
use serde_json::Value;

const AGENT: &str = "0123456789abcdef0123456789abcdef";

fn sign(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_felhom-sign"))
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap()
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let out = sign(dir, args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn ctx() -> Context {
    Context {
        agent_id: AgentId::new(AGENT).unwrap(),
        node: "pve1".into(),
        now: now(),
        scratch_vmids: None,
    }
}

fn trust(lines: &[&str], rev: u32, irr: u32) -> Trust {
    let doc = format!(
        r#"{{"keys":[{}],"threshold":{{"reversible":{rev},"irreversible":{irr}}}}}"#,
        lines.iter().map(|l| l.trim()).collect::<Vec<_>>().join(",")
    );
    Trust::from_json(doc.as_bytes()).unwrap()
}

#[test]
fn keygen_op_cosign_inspect_and_verify() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let alice = ok(d, &["keygen", "alice"]);
    let bob = ok(d, &["keygen", "bob", "--out", "keys-bob.pem"]);
    let line: Value = serde_json::from_str(&alice).unwrap();
    assert_eq!(line["name"], "alice");
    let mode = std::fs::metadata(d.join("alice.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let pem = std::fs::read_to_string(d.join("alice.pem")).unwrap();
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{pem}");
    assert!(!pem.contains(line["ed25519"].as_str().unwrap()));

    // keygen never overwrites a key.
    let again = sign(d, &["keygen", "alice"]);
    assert!(!again.status.success());
    assert_eq!(std::fs::read_to_string(d.join("alice.pem")).unwrap(), pem);

    let env = ok(
        d,
        &[
            "op",
            "--key",
            "alice.pem",
            "--agent-id",
            AGENT,
            "--node",
            "pve1",
            "--op",
            "stop",
            "--vmid",
            "101",
            "--valid",
            "10m",
            "--param",
            "timeout_seconds=30",
            "--reason",
            "kernel update",
        ],
    );
    std::fs::write(d.join("stop.json"), &env).unwrap();
    let t2 = trust(&[&alice, &bob], 2, 2);
    assert_eq!(
        verify_op(env.trim().as_bytes(), &t2, &ctx())
            .unwrap_err()
            .reason,
        Reason::BelowThreshold
    );
    let op = verify_op(env.trim().as_bytes(), &trust(&[&alice, &bob], 1, 2), &ctx()).unwrap();
    assert_eq!(op.signers, ["alice"]);
    assert_eq!(op.reason, "kernel update");
    assert!(op.not_after - op.not_before == 600);
    match op.action {
        Action::Guest {
            target,
            op: GuestOp::Stop(p),
            ..
        } => {
            assert_eq!(target.vmid.get(), 101);
            assert_eq!(p.timeout_seconds.unwrap().get(), 30);
        }
        other => panic!("{other:?}"),
    }

    let both = ok(
        d,
        &[
            "cosign",
            "--key",
            "keys-bob.pem",
            "--keyid",
            "bob",
            "stop.json",
        ],
    );
    let op = verify_op(both.trim().as_bytes(), &t2, &ctx()).unwrap();
    assert_eq!(op.signers, ["alice", "bob"]);
    std::fs::write(d.join("both.json"), &both).unwrap();
    // A second signature by the same key would not count: refused.
    let dup = sign(d, &["cosign", "--key", "alice.pem", "both.json"]);
    assert!(!dup.status.success());
    assert!(String::from_utf8_lossy(&dup.stderr).contains("already signed"));

    std::fs::write(
        d.join("signers.json"),
        format!(
            r#"{{"keys":[{},{}],"threshold":{{"reversible":2,"irreversible":2}}}}"#,
            alice.trim(),
            bob.trim()
        ),
    )
    .unwrap();
    let shown = ok(d, &["inspect", "--signers", "signers.json", "both.json"]);
    assert!(
        shown.contains("payloadType: application/vnd.felhom.op+json"),
        "{shown}"
    );
    assert!(shown.contains("\"op\": \"stop\""), "{shown}");
    assert!(shown.contains("verified by: alice, bob"), "{shown}");
    let one = sign(d, &["inspect", "--signers", "signers.json", "stop.json"]);
    assert!(!one.status.success());
    assert!(String::from_utf8_lossy(&one.stderr).contains("below_threshold"));
}

#[test]
fn bad_params_are_refused_before_anything_is_printed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(d, &["keygen", "alice"]);
    let base = [
        "op",
        "--key",
        "alice.pem",
        "--agent-id",
        AGENT,
        "--node",
        "pve1",
    ];
    for (extra, want) in [
        (
            &["--op", "stop", "--vmid", "101", "--param", "force=true"][..],
            "invalid_params",
        ),
        (&["--op", "stop"][..], "invalid_params"),
        (&["--op", "format_disks", "--vmid", "101"][..], "unknown_op"),
        // issue 13: the grant must reach the operation's class
        (&["--op", "destroy", "--vmid", "101"][..], "grant_mismatch"),
        (
            &[
                "--op",
                "set_config",
                "--vmid",
                "101",
                "--param",
                r#"config={"protection":0}"#,
            ][..],
            "grant_mismatch",
        ),
        (
            &[
                "--op",
                "restore",
                "--vmid",
                "101",
                "--param",
                "archive=local:backup/vzdump-qemu-101-2025_01_31-02_00_05.vma.zst",
                "--param",
                "storage=local-lvm",
            ][..],
            "invalid_params",
        ),
        (
            &["--op", "stop", "--vmid", "101", "--valid", "8d"][..],
            "window_too_long",
        ),
        (
            &[
                "--op",
                "snapshot",
                "--vmid",
                "101",
                "--param",
                "name=current",
            ][..],
            "invalid_params",
        ),
    ] {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        let out = sign(d, &args);
        assert!(!out.status.success(), "{extra:?}");
        assert!(out.stdout.is_empty(), "{extra:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{extra:?}: {err}");
    }
    let out = sign(
        d,
        &[
            "op",
            "--key",
            "alice.pem",
            "--agent-id",
            "PVE",
            "--node",
            "pve1",
            "--op",
            "start",
            "--vmid",
            "101",
        ],
    );
    assert!(!out.status.success());
}

#[test]
fn usb_and_desired_state() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let alice = ok(d, &["keygen", "alice"]);
    let t = trust(&[&alice], 1, 1);
    let env = ok(
        d,
        &[
            "op",
            "--key",
            "alice.pem",
            "--agent-id",
            AGENT,
            "--node",
            "pve1",
            "--op",
            "usb_mount",
            "--param",
            "device=/dev/sdb1",
            "--param",
            "name=backup",
        ],
    );
    let op = verify_op(env.trim().as_bytes(), &t, &ctx()).unwrap();
    assert!(matches!(op.action, Action::Host(_)));

    std::fs::write(
        d.join("desired.json"),
        r#"{"generation": 3, "guests": [{"vmid": 101, "power": "running"}]}"#,
    )
    .unwrap();
    let env = ok(
        d,
        &[
            "desired",
            "--key",
            "alice.pem",
            "--agent-id",
            AGENT,
            "--node",
            "pve1",
            "--generation",
            "4",
            "desired.json",
        ],
    );
    let doc = verify_desired(env.trim().as_bytes(), &t, &ctx()).unwrap();
    assert_eq!(doc.generation, 4);
    assert_eq!(doc.guests.len(), 1);
    assert_eq!(doc.signers, ["alice"]);
}

#[test]
fn gated_kinds_sign_and_irreversible_ones_need_the_cosignature() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let alice = ok(d, &["keygen", "alice"]);
    let bob = ok(d, &["keygen", "bob"]);
    let t = trust(&[&alice, &bob], 1, 2);
    let base = [
        "op",
        "--key",
        "alice.pem",
        "--agent-id",
        AGENT,
        "--node",
        "pve1",
        "--vmid",
        "101",
    ];
    let op = |extra: &[&str]| -> String {
        let args: Vec<&str> = base.iter().chain(extra).copied().collect();
        ok(d, &args)
    };
    let env = op(&[
        "--op",
        "set_config",
        "--param",
        r#"config={"memory":2048,"onboot":true}"#,
    ]);
    let o = verify_op(env.trim().as_bytes(), &t, &ctx()).unwrap();
    assert!(matches!(
        o.action,
        Action::Guest {
            op: GuestOp::SetConfig(_),
            ..
        }
    ));
    let env = op(&[
        "--op",
        "rollback",
        "--param",
        "snapshot=daily",
        "--param",
        "start=true",
    ]);
    let o = verify_op(env.trim().as_bytes(), &t, &ctx()).unwrap();
    assert!(matches!(
        o.action,
        Action::Guest {
            op: GuestOp::Rollback { start: true, .. },
            ..
        }
    ));
    // destroy granted irreversible: alice alone is below the threshold of 2, with bob's
    // cosignature it verifies
    let env = op(&[
        "--op",
        "destroy",
        "--param",
        "purge=true",
        "--grant",
        "irreversible",
    ]);
    let r = verify_op(env.trim().as_bytes(), &t, &ctx()).unwrap_err();
    assert_eq!(r.reason, Reason::BelowThreshold);
    std::fs::write(d.join("destroy.json"), &env).unwrap();
    let both = ok(d, &["cosign", "--key", "bob.pem", "destroy.json"]);
    let o = verify_op(both.trim().as_bytes(), &t, &ctx()).unwrap();
    assert!(matches!(
        o.action,
        Action::Guest {
            op: GuestOp::Destroy { purge: true },
            ..
        }
    ));
    assert_eq!(o.signers, ["alice", "bob"]);
}

fn openssl() -> Option<()> {
    match Command::new("openssl").arg("version").output() {
        Ok(o) if o.status.success() => Some(()),
        _ => {
            eprintln!("SKIPPED: openssl is not installed; the openssl interop test did not run");
            None
        }
    }
}

/// The raw 32-byte public key of a PEM private key, as openssl computes it.
fn openssl_public(pem: &Path) -> Vec<u8> {
    let out = Command::new("openssl")
        .args(["pkey", "-in"])
        .arg(pem)
        .args(["-pubout", "-outform", "DER"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout[out.stdout.len() - 32..].to_vec()
}

#[test]
fn keys_interoperate_with_openssl() {
    if openssl().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A key openssl made signs envelopes that verify under the public key openssl derives.
    let st = Command::new("openssl")
        .args(["genpkey", "-algorithm", "ed25519", "-out"])
        .arg(d.join("carol.pem"))
        .status()
        .unwrap();
    assert!(st.success());
    let pubkey = felhom_authz::encode_base64(&openssl_public(&d.join("carol.pem")));
    let line = format!(r#"{{"name":"carol","ed25519":"{pubkey}"}}"#);
    let env = ok(
        d,
        &[
            "op",
            "--key",
            "carol.pem",
            "--agent-id",
            AGENT,
            "--node",
            "pve1",
            "--op",
            "reboot",
            "--vmid",
            "105",
            "--type",
            "qemu",
        ],
    );
    let op = verify_op(env.trim().as_bytes(), &trust(&[&line], 1, 1), &ctx()).unwrap();
    assert_eq!(op.signers, ["carol"]);

    // A key keygen made is read by openssl, in the same DER form openssl writes.
    let printed = ok(d, &["keygen", "dave"]);
    let printed: Value = serde_json::from_str(&printed).unwrap();
    assert_eq!(
        felhom_authz::encode_base64(&openssl_public(&d.join("dave.pem"))),
        printed["ed25519"].as_str().unwrap()
    );
    let der = |p: &Path| {
        let o = Command::new("openssl")
            .args(["pkey", "-outform", "DER", "-in"])
            .arg(p)
            .output()
            .unwrap();
        assert!(o.status.success());
        o.stdout
    };
    let (ours, theirs) = (der(&d.join("dave.pem")), der(&d.join("carol.pem")));
    assert_eq!(ours.len(), theirs.len());
    assert_eq!(ours[..16], theirs[..16], "same PKCS#8 header");
    // And openssl's own PEM text of our key is byte for byte what keygen wrote.
    let o = Command::new("openssl")
        .args(["pkey", "-in"])
        .arg(d.join("dave.pem"))
        .output()
        .unwrap();
    assert_eq!(o.stdout, std::fs::read(d.join("dave.pem")).unwrap());
}
