//! `felhom-agent selftest`: a read-only health report, or (`--task --vmid N`, both flags
//! required) a reversible exercise on one guest.
//!
//! Read-only report, `--json`:
//! ```json
//! {
//!   "ok": true,
//!   "proxmox": {"url": "https://127.0.0.1:8006", "node": "pve1", "token_id": "felhom@pve!agent",
//!               "version": "8.0.3", "release": "8.0"},
//!   "node": {"status": "online", "uptime": 86400, "cpu": 0.02, "loadavg": [0.1, 0.05, 0.01],
//!            "memory_total": 67108864000, "memory_used": 8000000000,
//!            "pveversion": "pve-manager/8.0.3/bbf3993334bfa916"},
//!   "guests": [{"vmid": 101, "type": "lxc", "name": "web01", "status": "running",
//!               "template": false, "lock": null}],
//!   "storages": [{"storage": "local", "type": "dir", "content": ["backup", "iso"],
//!                 "enabled": true, "active": true, "shared": false,
//!                 "total": 100861726720, "used": 14635798528, "avail": 81059332096}],
//!   "problems": []
//! }
//! ```
//! `problems` lists what was found wrong (node not online, an enabled storage that is not
//! active); `ok` is true when it is empty. Exit 0 healthy; 1 problems found; 2 config error
//! (token rejected, missing privilege — the message names it —, certificate mismatch);
//! 3 Proxmox unreachable. A failure before the report prints
//! `{"ok": false, "exit": N, "error": "…"}`.
//!
//! Task exercise (`--task --vmid N`), `--json`:
//! ```json
//! {
//!   "ok": true, "vmid": 101, "type": "lxc", "snapshot": "felhom-selftest-1718000000",
//!   "steps": [
//!     {"step": "snapshot", "ok": true, "upid": "UPID:…", "exitstatus": "OK", "warnings": null, "detail": null},
//!     {"step": "verify-created", "ok": true, "upid": null, "exitstatus": null, "warnings": null, "detail": null},
//!     {"step": "rollback", "ok": true, …}, {"step": "delete", "ok": true, …},
//!     {"step": "verify-removed", "ok": true, …}
//!   ],
//!   "cleanup": null,
//!   "error": null
//! }
//! ```
//! The exercise is one operation in the guest's reconcile queue lane: on the daemon's
//! queue (over the control socket) while `felhom-agent run` is up, else on a local queue
//! with the `state_dir` lock held (run it as the `state_dir` owner). Output and exit codes
//! are the same either way.
//!
//! A refused guest (template, locked, HA-managed) exits 1 before any change. When a step
//! fails, the snapshot (if it exists) is deleted, `cleanup` says how that went
//! (`{"ok": true, "detail": "…"}`), `error` names the failed step, and the exit is 1 (3 if
//! Proxmox became unreachable, 2 for a missing privilege).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use felhom_protocol::Vmid;
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::control::{self, ControlError, Request};
use crate::proxmox::{
    Client, GuestKind, ProxmoxError, RunState, SnapshotName, TaskDone, Upid, WaitOptions,
};
use crate::reconcile::{GuestPermit, Queue};

use super::mutations::LocalQueue;
use super::{Cli, CliError, Exit, SelftestArgs};

/// Per-step wait for the task exercise.
const STEP_TIMEOUT: Duration = Duration::from_secs(300);

pub fn run(cli: &Cli, args: &SelftestArgs) -> Result<(), CliError> {
    if args.hub {
        return run_hub(cli);
    }
    let config = super::load_config(cli)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Problem(format!("cannot start the async runtime: {e}")))?;
    match (args.task, args.vmid) {
        (true, Some(vmid)) => rt.block_on(task_exercise(cli, &config, vmid)),
        (false, None) => rt.block_on(health(cli, &config)),
        // clap's `requires` makes these unreachable from the command line.
        _ => Err(CliError::Usage("--task and --vmid go together".to_string())),
    }
}

/// `selftest --hub`: collect once, send one report, print the envelope (see `run_cmd`).
fn run_hub(cli: &Cli) -> Result<(), CliError> {
    super::run_cmd::selftest_hub(cli)
}

// ---- read-only health report ---------------------------------------------------------------

#[derive(Serialize)]
struct Health {
    ok: bool,
    proxmox: ApiInfo,
    node: NodeInfo,
    guests: Vec<GuestInfo>,
    storages: Vec<StorageInfo>,
    problems: Vec<String>,
}

#[derive(Serialize)]
struct ApiInfo {
    url: String,
    node: String,
    token_id: String,
    version: String,
    release: String,
}

#[derive(Serialize)]
struct NodeInfo {
    status: String,
    uptime: Option<u64>,
    cpu: Option<f64>,
    loadavg: Vec<f64>,
    memory_total: Option<u64>,
    memory_used: Option<u64>,
    pveversion: Option<String>,
}

#[derive(Serialize)]
struct GuestInfo {
    vmid: Vmid,
    #[serde(rename = "type")]
    kind: GuestKind,
    name: Option<String>,
    status: RunState,
    template: bool,
    lock: Option<String>,
}

#[derive(Serialize)]
struct StorageInfo {
    storage: String,
    #[serde(rename = "type")]
    storage_type: String,
    content: Vec<String>,
    enabled: bool,
    active: bool,
    shared: bool,
    total: Option<u64>,
    used: Option<u64>,
    avail: Option<u64>,
}

async fn health(cli: &Cli, config: &Config) -> Result<(), CliError> {
    let client = Client::from_config(config)?;
    let version = client.version().await?;
    let nodes = client.nodes().await?;
    let Some(listed) = nodes.iter().find(|n| n.node == config.node) else {
        let names: Vec<&str> = nodes.iter().map(|n| n.node.as_str()).collect();
        return Err(CliError::Usage(format!(
            "node {:?} (config `node`) is not in this cluster; PVE knows: {}",
            config.node,
            names.join(", ")
        )));
    };
    let status = client.node_status().await?;
    let mut guests = Vec::new();
    for kind in [GuestKind::Lxc, GuestKind::Qemu] {
        for g in client.guests(kind).await? {
            guests.push(GuestInfo {
                vmid: g.vmid,
                kind,
                name: g.name,
                status: g.status,
                template: g.template,
                lock: g.lock,
            });
        }
    }
    guests.sort_by_key(|g| g.vmid.get());
    let storages: Vec<StorageInfo> = client
        .storages()
        .await?
        .into_iter()
        .map(|s| {
            let mut content: Vec<String> = s.contents().map(str::to_string).collect();
            content.sort();
            StorageInfo {
                content,
                enabled: s.enabled.unwrap_or(true),
                active: s.active.unwrap_or(false),
                shared: s.shared.unwrap_or(false),
                total: s.total,
                used: s.used,
                avail: s.avail,
                storage: s.storage,
                storage_type: s.storage_type,
            }
        })
        .collect();

    let mut problems = Vec::new();
    if listed.status != "online" {
        problems.push(format!(
            "node {} is {} in the cluster view",
            config.node, listed.status
        ));
    }
    for s in &storages {
        if s.enabled && !s.active {
            problems.push(format!("storage {} is enabled but not active", s.storage));
        }
    }

    let report = Health {
        ok: problems.is_empty(),
        proxmox: ApiInfo {
            url: config.proxmox.url.clone(),
            node: config.node.clone(),
            token_id: config.proxmox.token_id.clone(),
            version: version.version,
            release: version.release,
        },
        node: NodeInfo {
            status: listed.status.clone(),
            uptime: status.uptime,
            cpu: status.cpu,
            loadavg: status.loadavg,
            memory_total: status.memory.total,
            memory_used: status.memory.used,
            pveversion: status.pveversion,
        },
        guests,
        storages,
        problems,
    };
    if cli.json {
        super::print_json(&report);
    } else {
        print!("{}", render_health(&report));
    }
    if report.ok {
        Ok(())
    } else {
        Err(CliError::Reported {
            exit: Exit::Problem,
            summary: format!("{} problem(s) found", report.problems.len()),
        })
    }
}

fn render_health(r: &Health) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Proxmox VE {} (release {}) at {} — API reachable, token {}",
        r.proxmox.version, r.proxmox.release, r.proxmox.url, r.proxmox.token_id
    );
    let _ = writeln!(
        out,
        "node {}: {}, uptime {}s, load {:?}, memory {}/{} bytes",
        r.proxmox.node,
        r.node.status,
        r.node.uptime.unwrap_or(0),
        r.node.loadavg,
        r.node.memory_used.unwrap_or(0),
        r.node.memory_total.unwrap_or(0)
    );
    let _ = writeln!(out, "guests ({}):", r.guests.len());
    for g in &r.guests {
        let _ = writeln!(
            out,
            "  {:>6} {:4} {:8} {}{}{}",
            g.vmid,
            g.kind,
            g.status.as_str(),
            g.name.as_deref().unwrap_or("-"),
            if g.template { " [template]" } else { "" },
            g.lock
                .as_deref()
                .map(|l| format!(" [locked: {l}]"))
                .unwrap_or_default()
        );
    }
    let _ = writeln!(out, "storages ({}):", r.storages.len());
    for s in &r.storages {
        let _ = writeln!(
            out,
            "  {:16} {:8} {:8} {} avail {} of {} bytes",
            s.storage,
            s.storage_type,
            if !s.enabled {
                "disabled"
            } else if s.active {
                "active"
            } else {
                "INACTIVE"
            },
            s.content.join(","),
            s.avail.unwrap_or(0),
            s.total.unwrap_or(0)
        );
    }
    if r.problems.is_empty() {
        let _ = writeln!(out, "healthy");
    } else {
        for p in &r.problems {
            let _ = writeln!(out, "problem: {p}");
        }
    }
    out
}

// ---- task exercise -------------------------------------------------------------------------

#[derive(Serialize, Deserialize)]
struct Step {
    step: String,
    ok: bool,
    upid: Option<Upid>,
    exitstatus: Option<String>,
    warnings: Option<u32>,
    detail: Option<String>,
}

impl Step {
    fn task(step: &'static str, done: &TaskDone) -> Step {
        Step {
            step: step.to_string(),
            ok: true,
            upid: Some(done.upid.clone()),
            exitstatus: Some(done.exitstatus.clone()),
            warnings: done.warnings,
            detail: None,
        }
    }
    fn check(step: &'static str) -> Step {
        Step {
            step: step.to_string(),
            ok: true,
            upid: None,
            exitstatus: None,
            warnings: None,
            detail: None,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Cleanup {
    ok: bool,
    detail: String,
}

#[derive(Serialize, Deserialize)]
struct TaskReport {
    ok: bool,
    vmid: Vmid,
    #[serde(rename = "type")]
    kind: GuestKind,
    snapshot: String,
    steps: Vec<Step>,
    cleanup: Option<Cleanup>,
    error: Option<String>,
}

/// A failed step: what to tell the operator and which exit it maps to.
struct StepFailure {
    step: &'static str,
    error: CliError,
}

fn fail(step: &'static str, e: impl Into<CliError>) -> StepFailure {
    StepFailure {
        step,
        error: e.into(),
    }
}

async fn find_kind(client: &Client, vmid: Vmid) -> Result<GuestKind, CliError> {
    for kind in [GuestKind::Lxc, GuestKind::Qemu] {
        if client.guests(kind).await?.iter().any(|g| g.vmid == vmid) {
            return Ok(kind);
        }
    }
    Err(CliError::Usage(format!(
        "guest {vmid} is not on node {} (or the token may not see it: VM.Audit on /vms/{vmid})",
        client.node()
    )))
}

async fn snapshot_names(
    client: &Client,
    kind: GuestKind,
    vmid: Vmid,
) -> Result<Vec<String>, ProxmoxError> {
    let mut names: Vec<String> = client
        .snapshots(kind, vmid)
        .await?
        .into_iter()
        .filter(|s| !s.is_current())
        .map(|s| s.name)
        .collect();
    names.sort();
    Ok(names)
}

/// What one task selftest produced: the report, and how the command ends (`exit` 0 with
/// no summary when it passed). The daemon sends this back over the control socket.
#[derive(Serialize, Deserialize)]
pub(crate) struct TaskRun {
    report: TaskReport,
    exit: u8,
    summary: Option<String>,
}

/// `selftest --task --vmid N`: on the daemon's queue when it runs, else on a local queue
/// with the `state_dir` lock held. Same output and exit codes either way.
async fn task_exercise(cli: &Cli, config: &Config, vmid_raw: u64) -> Result<(), CliError> {
    let vmid = Vmid::new(vmid_raw).map_err(|e| CliError::Usage(format!("--vmid: {e}")))?;
    let req = Request::SelftestTask {
        vmid: u64::from(vmid.get()),
    };
    let run = match control::request(&config.control.socket, &req).await {
        Ok(body) => serde_json::from_value::<TaskRun>(body).map_err(|e| {
            CliError::Problem(format!(
                "the daemon's selftest answer is not understood: {e}"
            ))
        })?,
        Err(ControlError::NotRunning { .. }) => {
            let client = Client::from_config(config)?;
            let local =
                LocalQueue::take(&config.state_dir, &format!("selftest --task --vmid {vmid}"))?;
            let run = task_on_queue(&client, local.queue(), vmid).await;
            local.close().await;
            run?
        }
        Err(e) => return Err(e.into()),
    };
    if cli.json {
        super::print_json(&run.report);
    } else {
        print!("{}", render_task(&run.report));
    }
    match (Exit::from_code(run.exit), run.summary) {
        (Exit::Ok, _) => Ok(()),
        (exit, summary) => Err(CliError::Reported {
            exit,
            summary: summary.unwrap_or_else(|| "task selftest failed".to_string()),
        }),
    }
}

/// Runs the task selftest on guest `vmid` as one operation in its lane of `queue`: the
/// checks (guest exists, not a template, not locked, not HA-managed), the exercise and,
/// after a failed step, the cleanup. An error before any change (refusal, guest not
/// found, Proxmox unreachable) is `Err`; a run with a failed step is a [`TaskRun`] with a
/// non-zero `exit`.
pub(crate) async fn task_on_queue(
    client: &Client,
    queue: &Queue,
    vmid: Vmid,
) -> Result<TaskRun, CliError> {
    let client = client.clone();
    let handle = queue
        .submit(vmid, "selftest-task", move |permit| {
            Box::pin(async move { task_in_lane(&client, permit).await })
        })
        .map_err(|e| CliError::Problem(e.to_string()))?;
    handle.await.map_err(|e| CliError::Problem(e.to_string()))?
}

async fn task_in_lane(client: &Client, permit: &GuestPermit) -> Result<TaskRun, CliError> {
    let vmid = permit.vmid();
    let kind = find_kind(client, vmid).await?;
    let status = client.guest_status(kind, vmid).await?;
    let refusal = if status.template {
        Some("it is a template".to_string())
    } else if let Some(lock) = &status.lock {
        Some(format!("it is locked ({lock})"))
    } else if status.ha.managed {
        Some("it is HA-managed (the HA manager would fight the rollback)".to_string())
    } else {
        None
    };
    if let Some(why) = refusal {
        return Err(CliError::Problem(format!(
            "refusing the task selftest on guest {vmid}: {why}; choose another guest"
        )));
    }
    let was_running = status.is_running();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let name = SnapshotName::new(format!("felhom-selftest-{now}"))
        .map_err(|e| CliError::Problem(e.to_string()))?;

    let mut steps = Vec::new();
    let result = exercise(client, permit, kind, &name, was_running, &mut steps).await;
    let (cleanup, error) = match &result {
        Ok(()) => (None, None),
        Err(f) => {
            let cleanup = clean_up(client, permit, kind, &name).await;
            (
                Some(cleanup),
                Some(format!("step {} failed: {}", f.step, f.error)),
            )
        }
    };
    let report = TaskReport {
        ok: result.is_ok(),
        vmid,
        kind,
        snapshot: name.to_string(),
        steps,
        cleanup,
        error,
    };
    let (exit, summary) = match result {
        Ok(()) => (Exit::Ok, None),
        Err(f) => {
            let exit = match f.error.exit() {
                Exit::Unreachable => Exit::Unreachable,
                Exit::Usage => Exit::Usage,
                _ => Exit::Problem,
            };
            let mut summary = format!(
                "task selftest on guest {vmid}: step {} failed: {}",
                f.step, f.error
            );
            if let Some(c) = &report.cleanup {
                summary.push_str(&format!("; cleanup: {}", c.detail));
            }
            (exit, Some(summary))
        }
    };
    Ok(TaskRun {
        report,
        exit: exit as u8,
        summary,
    })
}

async fn exercise(
    client: &Client,
    permit: &GuestPermit,
    kind: GuestKind,
    name: &SnapshotName,
    was_running: bool,
    steps: &mut Vec<Step>,
) -> Result<(), StepFailure> {
    let vmid = permit.vmid();
    let wait = WaitOptions::with_timeout(STEP_TIMEOUT);

    let before = snapshot_names(client, kind, vmid)
        .await
        .map_err(|e| fail("list-before", e))?;
    if before.iter().any(|n| n == name.as_str()) {
        return Err(fail(
            "list-before",
            CliError::Problem(format!("a snapshot named {name} already exists")),
        ));
    }
    steps.push(Step::check("list-before"));

    let upid = client
        .snapshot_create(
            permit,
            kind,
            name,
            Some("felhom-agent selftest; removed at once"),
        )
        .await
        .map_err(|e| fail("snapshot", e))?;
    let done = client
        .wait_task(&upid, wait)
        .await
        .map_err(|e| fail("snapshot", e))?;
    steps.push(Step::task("snapshot", &done));

    let after_create = snapshot_names(client, kind, vmid)
        .await
        .map_err(|e| fail("verify-created", e))?;
    let mut expected = before.clone();
    expected.push(name.to_string());
    expected.sort();
    if after_create != expected {
        return Err(fail(
            "verify-created",
            CliError::Problem(format!(
                "snapshot list is {after_create:?}, expected {expected:?}"
            )),
        ));
    }
    steps.push(Step::check("verify-created"));

    // A rollback stops a running guest; `start` brings it back up at the end.
    let upid = client
        .snapshot_rollback(permit, kind, name, was_running)
        .await
        .map_err(|e| fail("rollback", e))?;
    let done = client
        .wait_task(&upid, wait)
        .await
        .map_err(|e| fail("rollback", e))?;
    steps.push(Step::task("rollback", &done));

    let upid = client
        .snapshot_delete(permit, kind, name, false)
        .await
        .map_err(|e| fail("delete", e))?;
    let done = client
        .wait_task(&upid, wait)
        .await
        .map_err(|e| fail("delete", e))?;
    steps.push(Step::task("delete", &done));

    let after = snapshot_names(client, kind, vmid)
        .await
        .map_err(|e| fail("verify-removed", e))?;
    if after != before {
        return Err(fail(
            "verify-removed",
            CliError::Problem(format!(
                "snapshot list is {after:?}, expected it back to {before:?}"
            )),
        ));
    }
    steps.push(Step::check("verify-removed"));
    Ok(())
}

/// After a failed step: delete the selftest snapshot if it exists (plain delete first,
/// then forced), and verify it is gone.
async fn clean_up(
    client: &Client,
    permit: &GuestPermit,
    kind: GuestKind,
    name: &SnapshotName,
) -> Cleanup {
    let vmid = permit.vmid();
    let wait = WaitOptions::with_timeout(STEP_TIMEOUT);
    let present = match snapshot_names(client, kind, vmid).await {
        Ok(names) => names.iter().any(|n| n == name.as_str()),
        Err(e) => {
            return Cleanup {
                ok: false,
                detail: format!("cannot list snapshots to clean up {name}: {e}"),
            };
        }
    };
    if !present {
        return Cleanup {
            ok: true,
            detail: format!("snapshot {name} does not exist; nothing to remove"),
        };
    }
    let mut last_error = String::new();
    for force in [false, true] {
        let attempt = async {
            let upid = client.snapshot_delete(permit, kind, name, force).await?;
            client.wait_task(&upid, wait).await
        };
        match attempt.await {
            Ok(_) => match snapshot_names(client, kind, vmid).await {
                Ok(names) if !names.iter().any(|n| n == name.as_str()) => {
                    return Cleanup {
                        ok: true,
                        detail: format!(
                            "snapshot {name} removed{}",
                            if force { " (forced)" } else { "" }
                        ),
                    };
                }
                Ok(_) => last_error = format!("snapshot {name} still listed after delete"),
                Err(e) => last_error = e.to_string(),
            },
            Err(e) => last_error = e.to_string(),
        }
    }
    Cleanup {
        ok: false,
        detail: format!(
            "could not remove snapshot {name}: {last_error}; remove it by hand: pct delsnapshot {vmid} {name} (qm for VMs)"
        ),
    }
}

fn render_task(r: &TaskReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "task selftest on {} {} with snapshot {}",
        r.kind, r.vmid, r.snapshot
    );
    for s in &r.steps {
        let _ = write!(out, "  ok  {}", s.step);
        if let Some(u) = &s.upid {
            let _ = write!(out, "  {u}");
        }
        if let Some(n) = s.warnings {
            let _ = write!(out, "  ({n} warning(s))");
        }
        let _ = writeln!(out);
    }
    if let Some(e) = &r.error {
        let _ = writeln!(out, "  FAILED: {e}");
    }
    if let Some(c) = &r.cleanup {
        let _ = writeln!(
            out,
            "  cleanup {}: {}",
            if c.ok { "ok" } else { "FAILED" },
            c.detail
        );
    }
    let _ = writeln!(out, "{}", if r.ok { "passed" } else { "failed" });
    out
}
