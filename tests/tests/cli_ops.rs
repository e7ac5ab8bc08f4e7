//! `felhom-agent ops verify`, the agent's identity and its trust in operator keys, over
//! the real binaries: envelopes are made by the real `felhom-sign` (keygen, op), checked
//! by the real `felhom-agent` against a real signers file whose owner and mode are set as
//! on a host; and the daemon's identity and SIGHUP re-read of the signers file, through
//! its reports and its log.
//!
//! Needs root (the signers file must be owned by root while the agent runs as another
//! uid: the state dir is given to uid 65534, as `felhom-agent` owns it on a host).

mod hub_support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use felhom_testbed::build::{AGENT, SIGN, bin_for_tests};
use hub_support::*;
use serde_json::{Value, json};

const AGENT_ID: &str = "00112233445566778899aabbccddeeff";
const OTHER_AGENT_ID: &str = "ffeeddccbbaa99887766554433221100";
/// The uid the agent is judged as (owner of its state dir).
const AGENT_UID: u32 = 65534;

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

struct Host {
    dir: tempfile::TempDir,
    config: PathBuf,
    state_dir: PathBuf,
    signers: PathBuf,
    keys: PathBuf,
}

impl Host {
    /// A host whose config names `agent_id` (or none), Proxmox on a dead port (never
    /// contacted), the hub disabled, its state dir owned by [`AGENT_UID`].
    fn new(agent_id: Option<&str>) -> Host {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = dir.path().join("state");
        std::fs::create_dir(&state_dir).unwrap();
        std::os::unix::fs::chown(&state_dir, Some(AGENT_UID), Some(AGENT_UID)).unwrap();
        let keys = dir.path().join("keys");
        std::fs::create_dir(&keys).unwrap();
        let signers = dir.path().join("signers.json");
        let mut cfg = json!({
            "node": "pve1",
            "state_dir": state_dir,
            "proxmox": {
                "url": format!("https://127.0.0.1:{}", dead_port()),
                "token_id": "root@pam!felhom",
                "token_secret": "pve-secret",
                "tls": {"insecure": true}
            },
            "authz": {"signers_file": signers},
            "gate": {"backup_storage": "nas-backup"},
            "control": {"socket": dir.path().join("agent.sock")}
        });
        if let Some(id) = agent_id {
            cfg["agent_id"] = json!(id);
        }
        let config = dir.path().join("agent.json");
        std::fs::write(&config, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
        Host {
            dir,
            config,
            state_dir,
            signers,
            keys,
        }
    }

    /// `felhom-sign keygen NAME` in the keys directory; returns its signers.json line.
    fn keygen(&self, name: &str) -> Value {
        let out = sign(&self.keys, &["keygen", name]);
        serde_json::from_str(&out).unwrap()
    }

    /// Writes signers.json (owned by root) with these key lines and thresholds 1/1.
    fn write_signers(&self, lines: &[Value], mode: u32) {
        let doc = json!({"keys": lines, "threshold": {"reversible": 1, "irreversible": 1}});
        self.write_signers_raw(&doc.to_string(), mode);
    }

    fn write_signers_raw(&self, body: &str, mode: u32) {
        let _ = std::fs::remove_file(&self.signers);
        std::fs::write(&self.signers, body).unwrap();
        std::fs::set_permissions(&self.signers, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// Signs a stop of lxc 101 with `key` for `agent_id` and writes it to a file.
    fn stop(&self, key: &str, agent_id: &str, extra: &[&str]) -> PathBuf {
        let key_file = self.keys.join(format!("{key}.pem"));
        let mut args = vec![
            "op",
            "--key",
            key_file.to_str().unwrap(),
            "--agent-id",
            agent_id,
            "--node",
            "pve1",
            "--op",
            "stop",
            "--vmid",
            "101",
            "--reason",
            "maintenance",
        ];
        args.extend_from_slice(extra);
        let env = sign(&self.keys, &args);
        let path = self
            .dir
            .path()
            .join(format!("env-{}.json", fastrand::u32(..)));
        std::fs::write(&path, env).unwrap();
        path
    }

    /// `felhom-agent ARGS --config …`: (exit code, stdout, stderr).
    fn agent(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(bin_for_tests(AGENT))
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .env_clear()
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn verify(&self, env: &Path) -> (i32, String, String) {
        self.agent(&["ops", "verify", env.to_str().unwrap()])
    }

    fn verify_json(&self, env: &Path) -> (i32, Value) {
        let (code, out, err) = self.agent(&["ops", "verify", "--json", env.to_str().unwrap()]);
        let v = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}\n{err}"));
        (code, v)
    }
}

/// `felhom-sign ARGS` in `dir`; panics unless it succeeds; returns stdout.
fn sign(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(bin_for_tests(SIGN))
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "felhom-sign {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

macro_rules! require_root {
    () => {
        if !is_root() {
            eprintln!(
                "skipped: needs root (a root-owned signers file, a state dir given to another uid)"
            );
            return;
        }
    };
}

#[test]
fn ops_verify_accepts_a_valid_stop_and_refuses_hostile_ones() {
    require_root!();
    let host = Host::new(Some(AGENT_ID));
    let alice = host.keygen("alice");
    host.keygen("mallory");
    host.write_signers(&[alice], 0o644);

    // A valid stop: exit 0, what it asks for and who signed it.
    let good = host.stop("alice", AGENT_ID, &[]);
    let (code, out, err) = host.verify(&good);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("valid: application/vnd.felhom.op+json"),
        "{out}"
    );
    assert!(out.contains("op: stop lxc 101"), "{out}");
    assert!(out.contains("signers: alice"), "{out}");
    let (code, v) = host.verify_json(&good);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["valid"], true);
    assert_eq!(v["op"]["kind"], "stop");
    assert_eq!(v["op"]["target"], json!({"type": "lxc", "vmid": 101}));
    assert_eq!(v["op"]["reason"], "maintenance");
    assert_eq!(v["signers"], json!(["alice"]));
    assert_eq!(v["op"]["op_id"].as_str().unwrap().len(), 32);

    // Each refusal: exit 1 with its reason code, in text and in JSON.
    let before = now() - 7200;
    let cases: Vec<(&str, PathBuf)> = vec![
        ("wrong_agent", host.stop("alice", OTHER_AGENT_ID, &[])),
        (
            "expired",
            host.stop(
                "alice",
                AGENT_ID,
                &["--not-before", &before.to_string(), "--valid", "1h"],
            ),
        ),
        ("bad_signature", host.stop("mallory", AGENT_ID, &[])),
        (
            "window_too_long",
            host.stop("alice", AGENT_ID, &["--valid", "2d"]),
        ),
    ];
    for (reason, env) in &cases {
        let (code, out, err) = host.verify(env);
        assert_eq!(code, 1, "{reason}: {out}\n{err}");
        assert!(
            out.starts_with(&format!("refused: {reason}: ")),
            "{reason}: {out}"
        );
        let (code, v) = host.verify_json(env);
        assert_eq!(code, 1, "{reason}: {v}");
        assert_eq!(v["valid"], false);
        assert_eq!(v["reason"], *reason, "{v}");
        assert!(!v["message"].as_str().unwrap().is_empty());
    }

    // One character of the payload changed, the signature kept: it no longer covers it.
    let mut env: Value = serde_json::from_slice(&std::fs::read(&good).unwrap()).unwrap();
    let mut payload: Vec<u8> = env["payload"].as_str().unwrap().bytes().collect();
    payload[10] = if payload[10] == b'A' { b'B' } else { b'A' };
    env["payload"] = json!(String::from_utf8(payload).unwrap());
    let path = host.dir.path().join("tampered.json");
    std::fs::write(&path, env.to_string()).unwrap();
    let (code, v) = host.verify_json(&path);
    assert_eq!(
        (code, v["reason"].as_str()),
        (1, Some("bad_signature")),
        "{v}"
    );
}

#[test]
fn ops_verify_without_usable_trust_is_a_configuration_error() {
    require_root!();
    let host = Host::new(Some(AGENT_ID));
    let alice = host.keygen("alice");
    let env = host.stop("alice", AGENT_ID, &[]);

    // No signers file: operations are off; nothing can be verified (exit 2).
    let (code, out, err) = host.verify(&env);
    assert_eq!(code, 2, "{out}\n{err}");
    assert!(err.contains("disabled (no "), "{err}");
    let (code, out, err) = host.agent(&["status"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("ops: disabled: no "), "{out}");
    assert!(
        out.contains(&format!("agent_id: {AGENT_ID} (config)")),
        "{out}"
    );

    // Writable by the group: off, and config check, status and ops verify say why.
    host.write_signers(std::slice::from_ref(&alice), 0o664);
    let (code, out, err) = host.verify(&env);
    assert_eq!(code, 2, "{out}\n{err}");
    assert!(
        err.contains("writable by its group or by others (mode 0664)"),
        "{err}"
    );
    let (code, out, err) = host.agent(&["config", "check"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("ops: disabled: "), "{out}");
    assert!(out.contains("writable by its group or by others"), "{out}");
    let (code, out, _) = host.agent(&["status", "--json"]);
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ops"]["enabled"], false, "{v}");
    assert_eq!(v["ops"]["state"], "untrusted_file", "{v}");
    assert_eq!(v["agent_id"], AGENT_ID);

    // Owned by the agent's own uid: it could rewrite its trust.
    host.write_signers(std::slice::from_ref(&alice), 0o644);
    std::os::unix::fs::chown(&host.signers, Some(AGENT_UID), None).unwrap();
    let (code, _, err) = host.verify(&env);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!("owned by uid {AGENT_UID}, not by root")),
        "{err}"
    );

    // Malformed (a duplicate name): a configuration error for config check too.
    let dup = json!({"keys": [alice.clone(), alice.clone()],
        "threshold": {"reversible": 1, "irreversible": 1}});
    host.write_signers_raw(&dup.to_string(), 0o644);
    let (code, _, err) = host.verify(&env);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("listed twice"), "{err}");
    let (code, out, err) = host.agent(&["config", "check"]);
    assert_eq!(code, 2, "{out}\n{err}");
    assert!(err.contains("listed twice"), "{err}");
    let (code, out, _) = host.agent(&["config", "check", "--json"]);
    assert_eq!(code, 2);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["exit"], 2);

    // A key that is not 32 bytes.
    let short = json!({"keys": [{"name": "alice", "ed25519": "AAAA"}],
        "threshold": {"reversible": 1, "irreversible": 1}});
    host.write_signers_raw(&short.to_string(), 0o644);
    let (code, _, err) = host.agent(&["config", "check"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("an Ed25519 public key is 32"), "{err}");

    // Fixed: enabled, and config check and status name the signers.
    host.write_signers(&[alice], 0o644);
    let (code, out, err) = host.agent(&["config", "check"]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(out.contains("ops: enabled ("), "{out}");
    assert!(
        out.contains("alice; threshold reversible 1, irreversible 1"),
        "{out}"
    );
    assert_eq!(host.verify(&env).0, 0);
}

#[test]
fn the_agent_id_file_is_read_and_a_corrupt_one_refused() {
    require_root!();
    let host = Host::new(None);
    let alice = host.keygen("alice");
    host.write_signers(&[alice], 0o644);
    let env = host.stop("alice", AGENT_ID, &[]);

    // Before the first start there is no id: read-only commands never create one.
    let (code, _, err) = host.verify(&env);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no agent id yet"), "{err}");
    let (code, out, _) = host.agent(&["config", "check"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("agent_id: none: "), "{out}");
    assert!(!host.state_dir.join("agent-id").exists());

    // The id from the file.
    let id_file = host.state_dir.join("agent-id");
    std::fs::write(&id_file, format!("{AGENT_ID}\n")).unwrap();
    assert_eq!(host.verify(&env).0, 0);
    let (_, out, _) = host.agent(&["status"]);
    assert!(
        out.contains(&format!("agent_id: {AGENT_ID} (file)")),
        "{out}"
    );
    let other = host.stop("alice", OTHER_AGENT_ID, &[]);
    let (code, v) = host.verify_json(&other);
    assert_eq!((code, v["reason"].as_str()), (1, Some("wrong_agent")));

    // Corrupt: refused with a clear error, never replaced.
    std::fs::write(&id_file, "not-an-id\n").unwrap();
    let (code, _, err) = host.agent(&["config", "check"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("is corrupt") && err.contains("never replaced"),
        "{err}"
    );
    let (code, _, err) = host.verify(&env);
    assert_eq!(code, 2, "{err}");
    assert_eq!(std::fs::read_to_string(&id_file).unwrap(), "not-an-id\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_creates_its_id_once_reports_it_and_rereads_trust_on_sighup() {
    bin_for_tests(AGENT);
    let hub = HubSim::start();
    hub.set_envelope(json!({"poll_interval_seconds": 1})).await;
    let home = AgentHome::new(
        &hub,
        &format!("https://127.0.0.1:{}", dead_port()),
        json!({}),
    );
    let signers = home.dir.path().join("signers.json");
    home.set("authz", json!({"signers_file": signers}));
    home.set("gate", json!({"backup_storage": "nas-backup"}));
    let id_file = home.state_dir.join("agent-id");
    assert!(!id_file.exists());

    let mut agent = home.start();
    let reports = hub
        .wait_reports(Duration::from_secs(60), |r| !r.is_empty())
        .await;
    let id = std::fs::read_to_string(&id_file).unwrap();
    let id = id.trim_end();
    assert_eq!(id.len(), 32);
    assert_eq!(
        std::fs::metadata(&id_file).unwrap().permissions().mode() & 0o7777,
        0o644
    );
    assert_eq!(reports[0]["report"]["agent_id"], id);
    assert_valid_report(&reports[0]["report"]);
    assert_eq!(
        reports[0]["report"]["ops"],
        json!({"enabled": false, "signers": [], "held": [], "pending_results": [], "undo_points": []})
    );
    wait_log(
        &agent,
        "signed operations: disabled (no ",
        Duration::from_secs(30),
    )
    .await;

    // SIGHUP re-reads the signers file: now present, but writable by its group.
    std::fs::write(
        &signers,
        r#"{"keys": [], "threshold": {"reversible": 1, "irreversible": 1}}"#,
    )
    .unwrap();
    std::fs::set_permissions(&signers, std::fs::Permissions::from_mode(0o664)).unwrap();
    agent.signal(Sig::Hup);
    wait_log(
        &agent,
        "writable by its group or by others (mode 0664)",
        Duration::from_secs(30),
    )
    .await;
    // The mode is fixed but no SIGHUP sent yet: `status` asks the daemon, which shows its
    // id and the trust it loaded at the last SIGHUP, not what the file says now.
    std::fs::set_permissions(&signers, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, out, err) = agent_command(&home, &["status", "--json"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["daemon"], "running", "{v}");
    assert_eq!(v["agent_id"], id, "{v}");
    assert_eq!(v["agent_id_source"], "file", "{v}");
    assert_eq!(v["ops"]["state"], "untrusted_file", "{v}");
    assert!(
        v["ops"]["reason"].as_str().unwrap().contains("mode 0664"),
        "{v}"
    );

    // After the SIGHUP the next reason is the owner. This daemon runs as root (uid 0, the
    // file's owner, who could rewrite it); run by another user, the file is not root's.
    agent.signal(Sig::Hup);
    let reason = if is_root() {
        "the agent runs as uid 0"
    } else {
        "not by root"
    };
    wait_log(&agent, reason, Duration::from_secs(30)).await;
    agent.signal(Sig::Term);
    assert_eq!(
        agent
            .wait_exit(Duration::from_secs(30))
            .and_then(|s| s.code()),
        Some(0)
    );

    // A restart keeps the id: the file is read, not replaced.
    let before = hub.reports().await.len();
    let mut agent = home.start();
    let reports = hub
        .wait_reports(Duration::from_secs(60), |r| r.len() > before)
        .await;
    assert_eq!(reports.last().unwrap()["report"]["agent_id"], id);
    assert_eq!(
        std::fs::read_to_string(&id_file).unwrap(),
        format!("{id}\n")
    );
    agent.signal(Sig::Term);
    assert_eq!(
        agent
            .wait_exit(Duration::from_secs(30))
            .and_then(|s| s.code()),
        Some(0)
    );

    // A corrupt file stops the start (exit 2) and is left as it is.
    std::fs::write(&id_file, "0000\n").unwrap();
    let mut agent = home.start();
    assert_eq!(
        agent
            .wait_exit(Duration::from_secs(30))
            .and_then(|s| s.code()),
        Some(2)
    );
    assert!(
        agent.log_text().contains("is corrupt"),
        "{}",
        agent.log_text()
    );
    assert_eq!(std::fs::read_to_string(&id_file).unwrap(), "0000\n");
}

#[test]
fn signed_operations_on_without_an_undo_backup_storage_fail_config_check() {
    require_root!();
    let host = Host::new(None);
    let alice = host.keygen("alice");
    host.write_signers(&[alice], 0o644);
    let (code, out, err) = host.agent(&["config", "check"]);
    assert_eq!(code, 0, "{out}\n{err}");
    // The same host without gate.backup_storage: the gate has nowhere to put undo backups.
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&host.config).unwrap()).unwrap();
    cfg.as_object_mut().unwrap().remove("gate");
    std::fs::write(&host.config, serde_json::to_vec(&cfg).unwrap()).unwrap();
    let (code, _, err) = host.agent(&["config", "check"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("gate.backup_storage is not set") && err.contains("signed operations are on"),
        "{err}"
    );
    // Off (no signers file): not needed.
    std::fs::remove_file(&host.signers).unwrap();
    let (code, out, err) = host.agent(&["config", "check"]);
    assert_eq!(code, 0, "{out}\n{err}");
}
