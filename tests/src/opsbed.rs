//! A host as signed operations need it, for benchmarks (which cannot use the `tests/`
//! support modules): `felhom-hubsim` started and driven through [`OpsControl`], and an
//! agent installation in a temporary directory whose `felhom-agent run` runs as
//! [`AGENT_UID`] (the owner of its state dir, as `felhom-agent` on a host) with a
//! root-owned `signers.json`. The agent refuses a signers file it could rewrite itself, so
//! this needs root; [`needs_root`] says why when it is missing.
//!
//! Owns: the start of those processes and the agent's files. Must never: leave a process
//! behind (every child is killed and reaped on drop), or listen beyond loopback.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{AgentProcess, PveSim};
use crate::hubsim::control::OpsControl;
use crate::signing::SignersFile;

/// The uid the agent runs as (nobody; the owner of its state dir).
pub const AGENT_UID: u32 = 65534;

/// Why the bed could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum OpsbedError {
    #[error("starting {bin}: {source}")]
    Spawn {
        bin: String,
        #[source]
        source: std::io::Error,
    },
    #[error("felhom-hubsim printed no usable start line: {0}")]
    StartLine(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("hubsim client: {0}")]
    Client(#[from] crate::harness::HarnessError),
    #[error("signers.json: {0}")]
    Signers(#[from] crate::signing::SigningError),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> OpsbedError {
    let what = what.into();
    move |source| OpsbedError::Io { what, source }
}

/// `Err` with the reason unless this process is root.
pub fn needs_root() -> Result<(), String> {
    if nix::unistd::geteuid().is_root() {
        Ok(())
    } else {
        Err(format!(
            "needs root: the agent trusts only a signers.json owned by root and not by its own uid, so it must run as another uid ({AGENT_UID}) than the one that writes the file"
        ))
    }
}

/// A running `felhom-hubsim` (killed and reaped on drop).
#[derive(Debug)]
pub struct HubProc {
    child: Child,
    pub url: String,
    /// The agent's Bearer token.
    pub token: String,
    pub ca_file: PathBuf,
    pub ops: OpsControl,
}

impl HubProc {
    /// Starts `bin` with `args` and reads its start line (30 s at most).
    pub fn spawn(bin: &Path, args: &[&str]) -> Result<HubProc, OpsbedError> {
        let mut child = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|source| OpsbedError::Spawn {
                bin: bin.display().to_string(),
                source,
            })?;
        let stdout = child.stdout.take();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            let Some(out) = stdout else { return };
            let mut lines = BufReader::new(out).lines();
            if let Some(Ok(first)) = lines.next() {
                let _ = tx.send(first);
            }
            for _ in lines {}
        });
        let fail = |mut c: Child, why: String| {
            let _ = c.kill();
            let _ = c.wait();
            Err(OpsbedError::StartLine(why))
        };
        let Ok(line) = rx.recv_timeout(Duration::from_secs(30)) else {
            return fail(child, "nothing within 30 s".into());
        };
        let v: Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) => return fail(child, format!("{e}: {line}")),
        };
        let field = |k: &str| v[k].as_str().map(str::to_owned);
        let (Some(url), Some(token), Some(admin), Some(ca)) = (
            field("url"),
            field("token"),
            field("admin_token"),
            field("ca_file"),
        ) else {
            return fail(child, line);
        };
        let pem = match std::fs::read_to_string(&ca) {
            Ok(p) => p,
            Err(e) => return fail(child, format!("{ca}: {e}")),
        };
        let client = match crate::harness::build_client(&pem) {
            Ok(c) => c,
            Err(e) => return fail(child, e.to_string()),
        };
        Ok(HubProc {
            child,
            ops: OpsControl::new(client, &url, &admin),
            url,
            token,
            ca_file: PathBuf::from(ca),
        })
    }
}

impl Drop for HubProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An agent installation in a temporary directory (not started).
#[derive(Debug)]
pub struct AgentHost {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub signers: PathBuf,
}

fn give_to_agent(path: &Path) -> Result<(), OpsbedError> {
    std::os::unix::fs::chown(path, Some(AGENT_UID), Some(AGENT_UID))
        .map_err(io(format!("chown {} to the agent", path.display())))
}

fn write_mode(path: &Path, content: &[u8], mode: u32) -> Result<(), OpsbedError> {
    std::fs::write(path, content).map_err(io(format!("writing {}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io(format!("chmod {}", path.display())))
}

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

impl AgentHost {
    /// The agent's files for `pve` and `hub` with this `agent_id`, trusting `signers`
    /// (written root-owned, 0644). `extra` is merged into the config. No
    /// `hub.test_min_poll_interval_seconds`: the report interval is the agent's default.
    /// Needs root ([`needs_root`]).
    pub fn new(
        pve: &PveSim,
        hub: &HubProc,
        agent_id: &str,
        signers: &SignersFile,
        extra: &Value,
    ) -> Result<AgentHost, OpsbedError> {
        let dir = tempfile::Builder::new()
            .prefix("felhom-opsbed-")
            .tempdir()
            .map_err(io("temporary directory"))?;
        let d = dir.path();
        // the agent (another uid) must reach its files below it
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))
            .map_err(io("chmod the temporary directory"))?;
        let state = d.join("state");
        let run = d.join("run");
        let hwmon = d.join("hwmon");
        for sub in [&state, &run, &hwmon] {
            std::fs::create_dir(sub).map_err(io(format!("creating {}", sub.display())))?;
        }
        give_to_agent(&state)?;
        give_to_agent(&run)?;
        let pve_secret = d.join("pve-token");
        write_mode(&pve_secret, pve.token_secret().as_bytes(), 0o600)?;
        give_to_agent(&pve_secret)?;
        let hub_token = d.join("hub-token");
        write_mode(&hub_token, hub.token.as_bytes(), 0o600)?;
        give_to_agent(&hub_token)?;
        let hub_ca = d.join("hub-ca.pem");
        std::fs::copy(&hub.ca_file, &hub_ca).map_err(io("copying the hub CA"))?;
        std::fs::set_permissions(&hub_ca, std::fs::Permissions::from_mode(0o644))
            .map_err(io("chmod the hub CA"))?;
        let signers_path = d.join("signers.json");
        signers.write(&signers_path)?;
        // a port nothing listens on: cloudflared is simply unreachable
        let dead = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(io("a free loopback port"))?
            .port();
        let mut cfg = json!({
            "node": pve.node(),
            "agent_id": agent_id,
            "state_dir": state,
            "proxmox": {
                "url": pve.url(),
                "token_id": pve.token_id(),
                "token_secret_file": pve_secret,
                "tls": { "pin_sha256": pve.pin_sha256() }
            },
            "hub": { "url": hub.url, "token_file": hub_token, "ca_file": hub_ca },
            "authz": { "signers_file": signers_path },
            "gate": { "backup_storage": "nas-backup" },
            "privhelper": {
                "socket_dir": run.join("privhelper"),
                "audit_log": d.join("audit.jsonl"),
                "timeout_seconds": 5
            },
            "sensors": { "hwmon_root": hwmon },
            "smart": { "devices": [] },
            "cloudflared": { "metrics_url": format!("http://127.0.0.1:{dead}") },
            "reconcile": { "shutdown_timeout_seconds": 10 },
            "control": { "socket": run.join("agent.sock") }
        });
        merge(&mut cfg, extra);
        let config = d.join("agent.json");
        let text = serde_json::to_vec_pretty(&cfg).unwrap_or_default();
        write_mode(&config, &text, 0o644)?;
        Ok(AgentHost {
            dir,
            config,
            signers: signers_path,
        })
    }

    /// `felhom-agent run` (`agent_bin`) as [`AGENT_UID`], its log in the directory.
    pub fn start(&self, agent_bin: &Path) -> Result<AgentProcess, OpsbedError> {
        let log = self.dir.path().join("agent.log");
        let err = std::fs::File::create(&log).map_err(io("the agent's log"))?;
        let mut cmd = Command::new(agent_bin);
        cmd.arg("run")
            .arg("--config")
            .arg(&self.config)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("FELHOM_AGENT_LOG", "info")
            .uid(AGENT_UID)
            .gid(AGENT_UID)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err);
        let child = cmd.spawn().map_err(|source| OpsbedError::Spawn {
            bin: agent_bin.display().to_string(),
            source,
        })?;
        Ok(AgentProcess { child, log })
    }
}
