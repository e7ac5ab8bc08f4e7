//! Shared by the `reconcile_*` tests: an agent installation against `felhom-pvesim` (config,
//! state dir, desired-state file, control socket), `felhom-agent run` as a real process
//! (killed with SIGKILL or stopped with SIGTERM), the CLI as a real process, and reading
//! the simulator's request log as guest mutations.
#![allow(dead_code)] // each test file uses a different subset

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use felhom_testbed::harness::LoggedRequest;
use serde_json::{Value, json};

use crate::proxmox_client_support::{Run, Sim, agent_bin};

/// A temporary agent installation for one simulator.
pub struct Home {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub state_dir: PathBuf,
    pub desired: PathBuf,
    pub socket: PathBuf,
}

pub fn write_private(path: &Path, body: &[u8]) {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .expect("write a private file");
    f.write_all(body).expect("write");
}

/// Merges `extra` into `base` (objects recursively; anything else replaces).
fn merge(base: &mut Value, extra: &Value) {
    match (base, extra) {
        (Value::Object(b), Value::Object(e)) => {
            for (k, v) in e {
                merge(b.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (b, e) => *b = e.clone(),
    }
}

impl Home {
    /// Hub disabled, Proxmox = `sim` (pinned), desired state from `desired.json` (written
    /// later), every path inside a temp dir. `extra` is merged into the config.
    pub fn new(sim: &Sim, extra: Value) -> Home {
        let dir = tempfile::tempdir().expect("tempdir");
        let state_dir = dir.path().join("state");
        std::fs::create_dir(&state_dir).expect("state dir");
        let secret = dir.path().join("pve-token");
        write_private(&secret, sim.token_secret().as_bytes());
        let hwmon = dir.path().join("hwmon");
        std::fs::create_dir(&hwmon).expect("hwmon dir");
        let desired = dir.path().join("desired.json");
        let socket = dir.path().join("agent.sock");
        let mut cfg = json!({
            "node": sim.node(),
            "state_dir": state_dir,
            "proxmox": {
                "url": sim.url(),
                "token_id": sim.token_id(),
                "token_secret_file": secret,
                "tls": { "pin_sha256": sim.pin_sha256() }
            },
            "privhelper": {
                "socket_dir": dir.path().join("run"),
                "audit_log": dir.path().join("audit.jsonl"),
                "timeout_seconds": 5
            },
            "sensors": { "hwmon_root": hwmon },
            "smart": { "devices": [] },
            "cloudflared": { "metrics_url": "http://127.0.0.1:9" },
            "reconcile": { "desired_file": desired, "shutdown_timeout_seconds": 10 },
            "control": { "socket": socket }
        });
        merge(&mut cfg, &extra);
        let config = dir.path().join("agent.json");
        std::fs::write(&config, serde_json::to_vec_pretty(&cfg).expect("json")).expect("config");
        Home {
            dir,
            config,
            state_dir,
            desired,
            socket,
        }
    }

    /// Replaces the desired-state file atomically (a new inode: the daemon sees it).
    pub fn write_desired(&self, v: &Value) {
        let tmp = self.dir.path().join("desired.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(v).expect("json")).expect("write");
        std::fs::rename(&tmp, &self.desired).expect("rename");
    }

    /// `felhom-agent ARGS… --config <home>` to completion.
    pub fn cli(&self, args: &[&str]) -> Run {
        let mut cmd = Command::new(agent_bin());
        cmd.args(args).arg("--config").arg(&self.config).env_clear();
        if let Some(path) = std::env::var_os("PATH") {
            cmd.env("PATH", path);
        }
        let out = cmd.output().expect("run felhom-agent");
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// `felhom-agent ARGS… --json`, exit 0 expected, stdout parsed.
    pub fn cli_json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        let r = self.cli(&a);
        assert_eq!(
            r.code, 0,
            "felhom-agent {args:?}: {}\n{}",
            r.stdout, r.stderr
        );
        r.json()
    }

    /// `felhom-agent run`, logging (appending) to `log`.
    pub fn start_daemon(&self, log: &Path) -> Daemon {
        let err = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("daemon log");
        let child = Command::new(agent_bin())
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .env_clear()
            .env("FELHOM_AGENT_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("start felhom-agent run");
        Daemon {
            child,
            log: log.to_path_buf(),
        }
    }

    pub fn log_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The daemon's status over the control socket (`daemon: running`), polled until
    /// `pred` holds; panics with the log after `timeout`.
    pub fn wait_status(
        &self,
        daemon: &mut Daemon,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        let mut last = Value::Null;
        while Instant::now() < deadline {
            if let Some(s) = daemon.child.try_wait().expect("try_wait") {
                panic!("the daemon exited ({s}):\n{}", daemon.log_text());
            }
            let r = self.cli(&["status", "--json"]);
            if r.code == 0 {
                let v = r.json();
                if v["daemon"] == "running" && pred(&v) {
                    return v;
                }
                last = v;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "timed out; last status: {last:#}\ndaemon log:\n{}",
            daemon.log_text()
        );
    }
}

/// A running `felhom-agent run`.
pub use felhom_testbed::harness::AgentProcess as Daemon;

/// A guest mutation seen in the simulator's request log.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Mutation {
    pub vmid: u32,
    /// `start`, `stop` (graceful shutdown), `hard_stop`, `set_config`, or
    /// `METHOD path` for anything else that is not a GET.
    pub op: String,
    pub status: Option<u16>,
    pub seq: u64,
}

/// Every request of the log that is not a read, as guest mutations.
pub fn mutations(log: &[LoggedRequest]) -> Vec<Mutation> {
    log.iter()
        .filter(|r| r.method != "GET" && r.path.starts_with("/api2/"))
        .map(|r| {
            let parts: Vec<&str> = r.path.split('/').collect();
            // /api2/json/nodes/<node>/<lxc|qemu>/<vmid>/…
            let vmid = parts
                .get(6)
                .and_then(|v| v.parse::<u32>().ok())
                .unwrap_or(0);
            let kind = parts.get(5).copied().unwrap_or("");
            let rest = parts.get(7..).map(|p| p.join("/")).unwrap_or_default();
            let op = match (r.method.as_str(), kind, rest.as_str()) {
                ("POST", "lxc" | "qemu", "status/start") => "start".to_string(),
                ("POST", "lxc" | "qemu", "status/shutdown") => "stop".to_string(),
                ("POST", "lxc" | "qemu", "status/stop") => "hard_stop".to_string(),
                ("PUT", "lxc" | "qemu", "config") | ("POST", "qemu", "config") => {
                    "set_config".to_string()
                }
                _ => format!("{} {}", r.method, r.path),
            };
            Mutation {
                vmid,
                op,
                status: r.status,
                seq: r.seq,
            }
        })
        .collect()
}

/// (vmid, op) of the actions a `plan --json` document lists, sorted.
pub fn planned(plan: &Value) -> Vec<(u32, String)> {
    let mut v: Vec<(u32, String)> = plan["actions"]
        .as_array()
        .expect("plan actions")
        .iter()
        .map(|a| {
            (
                a["vmid"].as_u64().expect("vmid") as u32,
                a["op"]["op"].as_str().expect("op").to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

/// The simulator's guests that reconcile may change: not HA-managed, not locked, not a
/// template. (vmid, type, unprivileged).
pub async fn plain_guests(sim: &Sim) -> Vec<(u32, String, bool)> {
    sim.state_json().await["guests"]
        .as_array()
        .expect("guests")
        .iter()
        .filter(|g| {
            g["ha_managed"] != json!(true) && g["lock"].is_null() && g["template"] != json!(true)
        })
        .map(|g| {
            (
                g["vmid"].as_u64().expect("vmid") as u32,
                g["type"].as_str().expect("type").to_string(),
                g["config"]["unprivileged"] == json!(1) || g["config"]["unprivileged"] == "1",
            )
        })
        .collect()
}

/// The last sequence number in the simulator's request log.
pub async fn last_seq(sim: &Sim) -> u64 {
    sim.pve
        .requests(0)
        .await
        .expect("GET /_sim/requests")
        .last()
        .map_or(0, |r| r.seq)
}

/// The log entries after `since`.
pub async fn log_since(sim: &Sim, since: u64) -> Vec<LoggedRequest> {
    sim.pve.requests(since).await.expect("GET /_sim/requests")
}
