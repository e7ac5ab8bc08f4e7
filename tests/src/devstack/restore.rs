//! The restore test the devstack shows once (after the signed operations, or after the
//! first report when they are skipped): a guest the simulated node has a backup of is
//! tested with `felhom-agent restore-test run --vmid N --json`, run as the agent's uid
//! (the daemon runs it in the scratch vmid's lane), and told as it goes:
//! 1. the guest, its newest backup and the scratch range (starting);
//! 2. the scratch guest as the node holds it while it runs: every `netN` detached;
//! 3. the result, with its restore and boot seconds;
//! 4. the scratch guest gone from the node.
//!
//! The agent's config has `restore_tests.enabled: false`: its schedule runs none, so this
//! is the only restore test of a run.
//!
//! Owns: choosing the guest, running the one CLI call and watching the scratch guest.
//! Must never: change a component's state other than through that CLI call.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc::UnboundedSender;

use super::procs;
use super::watch::{Event, SimApi};

/// The scratch range the agent's config gives (`restore_tests.scratch_vmids`).
pub const SCRATCH_VMIDS: &str = "9900-9909";
/// The target storage of the scratch guests (`restore_tests.storage`): holds guest images.
pub const STORAGE: &str = "local-lvm";
/// How long the one CLI call may take.
const CALL_DEADLINE: Duration = Duration::from_secs(120);

/// What the demonstration needs.
#[derive(Debug)]
pub struct Demo {
    pub pve: SimApi,
    /// `felhom-agent`.
    pub agent_bin: PathBuf,
    pub agent_config: PathBuf,
    /// As root: the agent's uid and gid.
    pub as_uid: Option<(u32, u32)>,
    /// `logs/calls.log`.
    pub calls_log: PathBuf,
}

fn say(tx: &UnboundedSender<Event>, text: String) {
    let _ = tx.send(Event::Line {
        who: "restore",
        text,
    });
}

fn scratch_range() -> (u64, u64) {
    let (a, b) = SCRATCH_VMIDS.split_once('-').unwrap_or(("0", "0"));
    (a.parse().unwrap_or(0), b.parse().unwrap_or(0))
}

/// `(vmid, type, newest backup volid)` of the lowest-numbered guest that is not a template
/// and has a backup on one of the node's storages.
fn pick(state: &Value) -> Option<(u64, String, String)> {
    let mut newest: std::collections::BTreeMap<u64, (u64, String)> = Default::default();
    for s in state["storages"].as_array()? {
        for v in s["volumes"].as_array().into_iter().flatten() {
            if v["content"] != "backup" {
                continue;
            }
            let (Some(vmid), Some(volid)) = (v["vmid"].as_u64(), v["volid"].as_str()) else {
                continue;
            };
            let ctime = v["ctime"].as_u64().unwrap_or(0);
            let e = newest.entry(vmid).or_insert((ctime, volid.to_string()));
            if ctime > e.0 {
                *e = (ctime, volid.to_string());
            }
        }
    }
    let guests = state["guests"].as_array()?;
    newest.into_iter().find_map(|(vmid, (_, volid))| {
        let g = guests.iter().find(|g| g["vmid"].as_u64() == Some(vmid))?;
        let kind = g["type"].as_str()?.to_string();
        (g["template"] != Value::Bool(true)).then_some((vmid, kind, volid))
    })
}

/// The `netN` keys of a guest's config and whether each carries `link_down=1`.
fn nets(config: &Value) -> Vec<(String, bool)> {
    let mut out: Vec<(String, bool)> = config
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, _)| {
            k.strip_prefix("net")
                .is_some_and(|n| n.parse::<u32>().is_ok())
        })
        .map(|(k, v)| {
            let down = v
                .as_str()
                .is_some_and(|s| s.split(',').any(|p| p.trim() == "link_down=1"));
            (k.clone(), down)
        })
        .collect();
    out.sort();
    out
}

impl Demo {
    /// The one CLI call, as the agent's uid; `(exit code, stdout, stderr)`. It waits on a
    /// blocking thread, so the narrative goes on meanwhile.
    async fn call(&self, args: &[&str]) -> Result<(Option<i32>, String, String), String> {
        use std::os::unix::process::CommandExt;
        let mut cmd = std::process::Command::new(&self.agent_bin);
        cmd.arg("--config")
            .arg(&self.agent_config)
            .args(args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        if let Some((uid, gid)) = self.as_uid {
            cmd.uid(uid).gid(gid);
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("starting felhom-agent: {e}"))?;
        let pid = child.id() as i32;
        procs::register(pid);
        let waited = tokio::time::timeout(
            CALL_DEADLINE,
            tokio::task::spawn_blocking(move || child.wait_with_output()),
        )
        .await;
        let out = match waited {
            Ok(Ok(Ok(out))) => out,
            Ok(Ok(Err(e))) => {
                procs::unregister(pid);
                return Err(format!("waiting for felhom-agent: {e}"));
            }
            Ok(Err(e)) => {
                procs::unregister(pid);
                return Err(format!("waiting for felhom-agent: {e}"));
            }
            Err(_) => {
                // its own process group, which the devstack started: end it
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                return Err(format!(
                    "felhom-agent {} did not end within {} s",
                    args.join(" "),
                    CALL_DEADLINE.as_secs()
                ));
            }
        };
        procs::unregister(pid);
        let run = (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        if let Ok(mut f) = procs::log_file(&self.calls_log) {
            use std::io::Write;
            let _ = writeln!(
                f,
                "$ felhom-agent --config {} {}\n{}{}[exit {:?}]\n",
                self.agent_config.display(),
                args.join(" "),
                run.1,
                run.2,
                run.0
            );
        }
        Ok(run)
    }

    async fn show(&self, tx: &UnboundedSender<Event>) -> Result<(), String> {
        let state = self
            .pve
            .get("/_sim/state")
            .await
            .ok_or("cannot read the simulated node's state")?;
        let (vmid, kind, volid) =
            pick(&state).ok_or("the simulated node has no backup of a guest")?;
        say(
            tx,
            format!(
                "restore test of {kind} {vmid} starting: its newest backup {volid} into a scratch guest ({SCRATCH_VMIDS}, storage {STORAGE}); felhom-agent restore-test run --vmid {vmid}"
            ),
        );
        let vmid_s = vmid.to_string();
        let args = ["restore-test", "run", "--vmid", vmid_s.as_str(), "--json"];
        let call = self.call(&args);
        tokio::pin!(call);
        // watch the scratch range while the test runs: the scratch guest as the node has it
        let (lo, hi) = scratch_range();
        let mut seen: Option<(u64, Vec<(String, bool)>)> = None;
        let (code, stdout, stderr) = loop {
            tokio::select! {
                r = &mut call => break r?,
                _ = tokio::time::sleep(Duration::from_millis(100)), if seen.is_none() => {
                    let Some(st) = self.pve.get("/_sim/state").await else { continue };
                    let running = st["guests"].as_array().into_iter().flatten().find(|g| {
                        g["vmid"].as_u64().is_some_and(|v| (lo..=hi).contains(&v))
                            && g["status"] == "running"
                    });
                    if let Some(g) = running {
                        let scratch = g["vmid"].as_u64().unwrap_or(0);
                        let n = nets(&g["config"]);
                        let text = if n.is_empty() {
                            "no network interface".to_string()
                        } else {
                            n.iter()
                                .map(|(k, d)| format!("{k} {}", if *d { "link_down=1" } else { "LINK UP" }))
                                .collect::<Vec<_>>()
                                .join(", ")
                        };
                        say(tx, format!("scratch guest {scratch} running, network detached: {text}"));
                        seen = Some((scratch, n));
                    }
                }
            }
        };
        let r: Value = serde_json::from_str(&stdout).map_err(|_| {
            format!(
                "felhom-agent restore-test run exited {code:?} without a JSON result: {}",
                stderr.trim()
            )
        })?;
        if let Some((scratch, n)) = &seen
            && n.iter().any(|(_, down)| !down)
        {
            return Err(format!(
                "scratch guest {scratch} ran with a network interface attached"
            ));
        }
        let result = r["result"].as_str().unwrap_or("?");
        let secs = |k: &str| {
            r[k].as_f64()
                .map(|s| format!("{s:.1} s"))
                .unwrap_or_else(|| "-".into())
        };
        say(
            tx,
            format!(
                "restore test of {kind} {vmid} {result}: restore {}, boot {}, archive {}{}",
                secs("restore_seconds"),
                secs("boot_seconds"),
                r["archive"].as_str().unwrap_or("?"),
                r["reason"]
                    .as_str()
                    .map(|x| format!(" ({x})"))
                    .unwrap_or_default()
            ),
        );
        if result != "passed" || code != Some(0) {
            return Err(format!(
                "restore test of {vmid} {result} (exit {code:?}): {}",
                r["reason"].as_str().unwrap_or("")
            ));
        }
        if seen.is_none() {
            return Err("the scratch guest was never seen running on the node".into());
        }
        let scratch = r["scratch_vmid"]
            .as_u64()
            .ok_or("the restore test names no scratch vmid")?;
        let state = self
            .pve
            .get("/_sim/state")
            .await
            .ok_or("cannot read the simulated node's state")?;
        let left = state["guests"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|g| g["vmid"].as_u64() == Some(scratch));
        if left {
            return Err(format!("scratch guest {scratch} was left on the node"));
        }
        say(
            tx,
            format!("scratch guest {scratch} destroyed: the node no longer has it"),
        );
        Ok(())
    }

    /// Runs the restore test, then sends [`Event::RestoreDone`].
    pub async fn run(self, tx: UnboundedSender<Event>) {
        let error = self.show(&tx).await.err();
        let _ = tx.send(Event::RestoreDone { error });
    }
}
