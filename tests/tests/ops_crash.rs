//! Crash safety of signed operations over real processes: while a stream of signed
//! operations (start, stop with a short timeout, reboot, snapshot, backup, and some that
//! must be refused) flows from `felhom-hubsim` to `felhom-agent run`, the agent is killed
//! with SIGKILL at seeded-random moments and restarted, at least 30 times, then left to
//! finish. Afterwards:
//! - every operation has exactly one final decision at the hub (a delivery made again
//!   may repeat it under a new `seq`, never change it), the one expected, and no `held`
//!   result follows a final one;
//! - the hub recorded no `seq` twice with different content;
//! - `felhom-pvesim`'s request log shows each applied operation's mutating request exactly
//!   once (one `status/start` per start, one snapshot per name, one vzdump per backup, …)
//!   and nothing else;
//! - `felhom-agent ops list --json` shows every operation final.
//!
//! Operations on one guest run one at a time in the order the hub enqueued them (the
//! guest's lane), so each guest gets a cycle whose every step is valid after the one
//! before (start, snapshot, reboot, backup, stop, then a reboot of the stopped guest that
//! must be refused), and its requests can be counted per guest.
//!
//! The kill moments come from a seeded RNG; the seed is printed (set
//! `FELHOM_OPS_CRASH_SEED=N` to replay one). Needs root (see `ops_support`).

mod hub_support;
mod ops_support;
mod proxmox_client_support;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use felhom_testbed::harness::LoggedRequest;
use felhom_testbed::signing::Payload;
use ops_support::*;
use serde_json::{Value, json};

/// Kill -9 rounds while operations flow.
const ROUNDS: usize = 30;
/// Cycles of the per-guest sequence.
const CYCLES: usize = 2;
/// How long a pvesim task runs: long enough that kills land while tasks run.
const TASK_SECONDS: f64 = 0.4;

/// What the hub must end up with for an operation.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expect {
    Applied,
    /// Refused, with this reason (in the lane, or at receipt with a verified op_id).
    Refused(&'static str),
}

#[derive(Debug, Clone)]
struct Planned {
    payload: Payload,
    /// Signed by mallory (untrusted): refused at receipt, no op_id in the result.
    forged: bool,
    op_id: String,
    vmid: u32,
    kind: &'static str,
    snapshot: Option<String>,
    expect: Expect,
}

fn plain(g: &Value) -> bool {
    let disk = g["config"]["rootfs"]
        .as_str()
        .or_else(|| g["config"]["scsi0"].as_str())
        .unwrap_or("");
    g["template"] != json!(true)
        && g["lock"].is_null()
        && g["ha_managed"] != json!(true)
        && !disk.starts_with("local:")
}

/// The mutating requests of the log, each as (vmid, what), `what` being `start`,
/// `shutdown`, `stop`, `reboot`, `snapshot <name>`, `vzdump`, or the method and path.
fn classify(r: &LoggedRequest) -> (u32, String) {
    let parts: Vec<&str> = r.path.split('/').collect();
    // /api2/json/nodes/<node>/<lxc|qemu>/<vmid>/…  or  /api2/json/nodes/<node>/vzdump
    if parts.get(5) == Some(&"vzdump") {
        let vmid = r
            .params
            .get("vmid")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        return (vmid, "vzdump".into());
    }
    let vmid = parts.get(6).and_then(|v| v.parse().ok()).unwrap_or(0);
    let rest = parts.get(7..).map(|p| p.join("/")).unwrap_or_default();
    let what = match (r.method.as_str(), rest.as_str()) {
        ("POST", "status/start") => "start".into(),
        ("POST", "status/shutdown") => "shutdown".into(),
        ("POST", "status/stop") => "stop".into(),
        ("POST", "status/reboot") => "reboot".into(),
        ("POST", "snapshot") => format!(
            "snapshot {}",
            r.params.get("snapname").cloned().unwrap_or_default()
        ),
        _ => format!("{} {}", r.method, r.path),
    };
    (vmid, what)
}

/// The requests an applied operation must have sent (a stop: its graceful shutdown).
fn expected_requests(p: &Planned) -> Vec<(u32, String)> {
    if p.expect != Expect::Applied {
        return Vec::new();
    }
    let what = match p.kind {
        "start" => "start".to_string(),
        "stop" => "shutdown".to_string(),
        "reboot" => "reboot".to_string(),
        "snapshot" => format!("snapshot {}", p.snapshot.clone().unwrap_or_default()),
        "backup" => "vzdump".to_string(),
        other => panic!("no request known for {other}"),
    };
    vec![(p.vmid, what)]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_signed_operations_flow_runs_each_once_and_reports_every_result() {
    needs_root!();
    let seed = std::env::var("FELHOM_OPS_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("ops_crash: seed {seed} (FELHOM_OPS_CRASH_SEED={seed} replays it)");
    let mut rng = fastrand::Rng::with_seed(seed);
    let t0 = Instant::now();

    let stack = Stack::new(json!({}));
    stack
        .pve
        .settings(Some(TASK_SECONDS), None)
        .await
        .expect("PUT /_sim/settings");
    let state = stack.pve.state_json().await;
    let guests = state["guests"].as_array().expect("guests").clone();
    let pick = |kind: &str| -> Vec<(u32, String)> {
        let mut v: Vec<(u32, String)> = guests
            .iter()
            .filter(|g| g["type"] == kind && plain(g))
            .map(|g| (g["vmid"].as_u64().expect("vmid") as u32, kind.to_string()))
            .collect();
        v.sort();
        v.truncate(3);
        v
    };
    let mut chosen = pick("lxc");
    chosen.extend(pick("qemu"));
    assert!(chosen.len() >= 5, "plain guests: {chosen:?}");
    for (vmid, _) in &chosen {
        stack
            .pve
            .put_guest(u64::from(*vmid), json!({"status": "stopped"}))
            .await;
    }
    let storage = state["storages"]
        .as_array()
        .expect("storages")
        .iter()
        .filter(|s| {
            s["type"] != "pbs"
                && s["content"]
                    .as_str()
                    .is_some_and(|c| c.split(',').any(|c| c == "backup"))
        })
        .map(|s| s["storage"].as_str().expect("storage id").to_string())
        .max_by_key(|s| s == "nas-backup")
        .expect("a backup storage in pvesim");
    // A guest of ours with a snapshot pvesim seeded: a snapshot of that name is refused.
    let seeded_snapshot = {
        let mut found = None;
        for (vmid, kind) in &chosen {
            let names = stack.pve.snapshot_names(u64::from(*vmid)).await;
            if let Some(n) = names.first() {
                found = Some((*vmid, kind.clone(), n.clone()));
                break;
            }
        }
        found.expect("one of the chosen guests has a seeded snapshot")
    };
    let missing_vmid = (150..190)
        .find(|v| !guests.iter().any(|g| g["vmid"] == json!(v)))
        .expect("a free vmid");

    // Per guest: CYCLES times start, snapshot, reboot, backup, stop, reboot (refused: the
    // guest is stopped). Each guest's list is in lane order.
    let mut per_guest: Vec<Vec<Planned>> = Vec::new();
    let mk =
        |payload: Payload, vmid: u32, kind: &'static str, snap: Option<String>, expect| Planned {
            op_id: op_id_of(&payload),
            payload,
            forged: false,
            vmid,
            kind,
            snapshot: snap,
            expect,
        };
    for (gi, (vmid, ty)) in chosen.iter().enumerate() {
        let (vmid, ty) = (*vmid, ty.as_str());
        let mut list = Vec::new();
        for c in 0..CYCLES {
            let snap = format!("crash{seed:x}g{gi}c{c}");
            list.push(mk(
                stack.guest_op("start", ty, vmid),
                vmid,
                "start",
                None,
                Expect::Applied,
            ));
            list.push(mk(
                stack
                    .guest_op("snapshot", ty, vmid)
                    .params(json!({"name": snap, "description": "crash test"})),
                vmid,
                "snapshot",
                Some(snap.clone()),
                Expect::Applied,
            ));
            list.push(mk(
                stack.guest_op("reboot", ty, vmid),
                vmid,
                "reboot",
                None,
                Expect::Applied,
            ));
            list.push(mk(
                stack.guest_op("backup", ty, vmid).params(
                    json!({"storage": storage, "mode": "snapshot", "compress": "zstd",
                           "notes": format!("crash {c}")}),
                ),
                vmid,
                "backup",
                None,
                Expect::Applied,
            ));
            list.push(mk(
                stack
                    .guest_op("stop", ty, vmid)
                    .params(json!({"timeout_seconds": 5})),
                vmid,
                "stop",
                None,
                Expect::Applied,
            ));
            list.push(mk(
                stack.guest_op("reboot", ty, vmid),
                vmid,
                "reboot",
                None,
                Expect::Refused("precondition_failed"),
            ));
        }
        per_guest.push(list);
    }
    // Operations that are refused whatever the moment: a taken snapshot name, a guest that
    // does not exist, the wrong guest type, a config digest that is not the guest's, an
    // irreversible grant signed by one key, and a forgery (mallory).
    let (sv, sty, sname) = seeded_snapshot;
    let other_ty = |t: &str| if t == "lxc" { "qemu" } else { "lxc" };
    let (v0, t0y) = (chosen[0].0, chosen[0].1.clone());
    let (v1, t1y) = (chosen[1].0, chosen[1].1.clone());
    let mut extras = vec![
        mk(
            stack
                .guest_op("snapshot", &sty, sv)
                .params(json!({"name": sname})),
            sv,
            "snapshot",
            None,
            Expect::Refused("precondition_failed"),
        ),
        mk(
            stack.guest_op("start", "lxc", missing_vmid),
            missing_vmid,
            "start",
            None,
            Expect::Refused("precondition_failed"),
        ),
        mk(
            stack.guest_op("start", other_ty(&t0y), v0),
            v0,
            "start",
            None,
            Expect::Refused("precondition_failed"),
        ),
        mk(
            stack
                .guest_op("backup", &t1y, v1)
                .params(json!({"storage": storage, "mode": "snapshot"}))
                .expect_digest(&"0".repeat(40)),
            v1,
            "backup",
            None,
            Expect::Refused("precondition_failed"),
        ),
        mk(
            stack.guest_op("start", &t1y, v1).grant("irreversible"),
            v1,
            "start",
            None,
            Expect::Refused("below_threshold"),
        ),
    ];
    for (vmid, ty) in chosen.iter().take(3) {
        let mut f = mk(
            stack.guest_op("stop", ty, *vmid),
            *vmid,
            "stop",
            None,
            Expect::Refused("bad_signature"),
        );
        f.forged = true;
        extras.push(f);
    }
    // The stream: the guests' lists interleaved round-robin (each keeps its order), the
    // extras at seeded positions.
    let mut stream: Vec<Planned> = Vec::new();
    let longest = per_guest.iter().map(Vec::len).max().unwrap_or(0);
    for i in 0..longest {
        for list in &per_guest {
            if let Some(p) = list.get(i) {
                stream.push(p.clone());
            }
        }
    }
    for e in extras {
        let at = rng.usize(0..=stream.len());
        stream.insert(at, e);
    }
    let planned = stream.clone();
    // Every round enqueues some (so every incarnation has something to answer).
    let per_round =
        |round: usize| stream.len() / ROUNDS + usize::from(round < stream.len() % ROUNDS);
    assert!(stream.len() >= ROUNDS, "{} operations", stream.len());
    eprintln!(
        "{} operations on guests {chosen:?}, backups to {storage}, {} enqueued per round",
        planned.len(),
        per_round(0)
    );

    // delivery id -> planned index
    let mut deliveries: HashMap<String, usize> = HashMap::new();
    let mut next = 0usize;
    let mut kills = 0;
    let mut during_task = 0;
    for round in 0..ROUNDS {
        let agent = stack.start_agent();
        let base = stack.ops.result_list(0).await.expect("results").len();
        for _ in 0..per_round(round) {
            let Some(p) = planned.get(next) else { break };
            let env = if p.forged {
                p.payload.sign(&[&stack.keys.mallory])
            } else {
                stack.signed(&p.payload)
            };
            deliveries.insert(stack.deliver(&env).await, next);
            next += 1;
        }
        // Kill only once this incarnation made progress (a new result at the hub), then at
        // a seeded-random moment.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let n = stack.ops.result_list(0).await.expect("results").len();
            if n > base {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "round {round} (seed {seed}): no progress\n{}",
                agent.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.u64(0..1500))).await;
        agent.kill9();
        kills += 1;
        let running = stack.pve.state_json().await["tasks"]
            .as_array()
            .map(|t| t.iter().filter(|t| t["status"] == "running").count())
            .unwrap_or(0);
        if running > 0 {
            during_task += 1;
        }
    }
    assert_eq!(next, planned.len(), "every operation was enqueued");
    eprintln!(
        "{kills} kills ({during_task} while a pvesim task ran) in {:?}",
        t0.elapsed()
    );

    // The last incarnation runs until every operation has its final result.
    let agent = stack.start_agent();
    let deadline = Instant::now() + Duration::from_secs(240);
    let finals_known = |list: &[Value]| -> bool {
        planned.iter().enumerate().all(|(i, p)| {
            list.iter().any(|r| {
                let r = &r["result"];
                let state = r["state"].as_str().unwrap_or("held");
                if p.forged {
                    r["delivery_id"]
                        .as_str()
                        .and_then(|d| deliveries.get(d))
                        .is_some_and(|j| *j == i)
                        && state != "held"
                } else {
                    r["op_id"].as_str() == Some(p.op_id.as_str()) && state != "held"
                }
            })
        })
    };
    loop {
        let list = stack.ops.result_list(0).await.expect("results");
        let pending = stack.ops.summary().await.expect("hub state")["pending"]
            .as_u64()
            .unwrap_or(u64::MAX);
        if finals_known(&list) && pending == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "seed {seed}: not every operation ended; {pending} deliveries pending\n{}",
            agent.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = agent.log_text();

    // The hub never saw a seq twice with different content, nor a malformed result.
    let all = stack.ops.results(0).await.expect("results");
    assert_eq!(all["conflicts"], json!([]), "seed {seed}: {all:#}");
    assert_eq!(all["malformed_in_reports"], json!([]), "seed {seed}");
    let mut by_seq: BTreeMap<u64, Value> = BTreeMap::new();
    for r in all["results"].as_array().expect("results") {
        let res = r["result"].clone();
        let seq = res["seq"].as_u64().expect("seq");
        if let Some(old) = by_seq.insert(seq, res.clone()) {
            assert_eq!(old, res, "seed {seed}: seq {seq} with two contents");
        }
    }

    // Each operation: one final decision, the expected one, no `held` after it.
    // A recorded operation answers with its record, whole; a refusal at receipt records
    // nothing (each delivery of it is refused anew, at its own time).
    let decision = |p: &Planned, r: &Value| {
        if p.forged || p.expect == Expect::Refused("below_threshold") {
            json!([r["state"], r["reason"], r["payload_sha256"]])
        } else {
            json!([
                r["state"],
                r["reason"],
                r["upids"],
                r["result"],
                r["signers"],
                r["started_at"],
                r["finished_at"],
                r["payload_sha256"]
            ])
        }
    };
    let mut applied_backups: Vec<(u32, String)> = Vec::new();
    for (i, p) in planned.iter().enumerate() {
        let mine: Vec<&Value> = by_seq
            .values()
            .filter(|r| {
                if p.forged {
                    r["delivery_id"]
                        .as_str()
                        .and_then(|d| deliveries.get(d))
                        .is_some_and(|j| *j == i)
                } else {
                    r["op_id"].as_str() == Some(p.op_id.as_str())
                }
            })
            .collect();
        let what = format!(
            "seed {seed}: {} {} on {}: {mine:#?}",
            p.kind, p.op_id, p.vmid
        );
        let first_final = mine
            .iter()
            .position(|r| r["state"] != "held")
            .unwrap_or_else(|| panic!("no final result: {what}"));
        assert!(
            mine[first_final..].iter().all(|r| r["state"] != "held"),
            "held after final: {what}"
        );
        let finals: Vec<Value> = mine[first_final..].iter().map(|r| decision(p, r)).collect();
        assert!(
            finals.iter().all(|d| *d == finals[0]),
            "two different final decisions: {what}"
        );
        let f = mine[first_final];
        match &p.expect {
            Expect::Applied => {
                assert_eq!(f["state"], "applied", "{what}");
                assert_eq!(f["signers"], json!(["alice"]), "{what}");
                assert_eq!(f["payload_sha256"], p.payload.sha256_hex(), "{what}");
                if p.kind == "backup" {
                    let volid = f["result"]["volid"]
                        .as_str()
                        .unwrap_or_else(|| panic!("an applied backup names its archive: {what}"));
                    applied_backups.push((p.vmid, volid.to_string()));
                }
            }
            Expect::Refused(reason) => {
                assert_eq!(f["state"], "refused", "{what}");
                assert_eq!(f["reason"], *reason, "{what}");
                assert!(f["upids"].as_array().is_none_or(Vec::is_empty), "{what}");
                if p.forged {
                    assert!(f["op_id"].is_null(), "{what}");
                }
            }
        }
    }

    // pvesim: each applied operation's request exactly once, answered 200, nothing else.
    let mutations = stack.mutations().await;
    let mut sent: Vec<(u32, String)> = mutations.iter().map(classify).collect();
    sent.sort();
    let mut expected: Vec<(u32, String)> = planned.iter().flat_map(expected_requests).collect();
    expected.sort();
    assert_eq!(
        sent, expected,
        "seed {seed}: requests sent vs operations applied\n{mutations:#?}"
    );
    assert!(
        mutations.iter().all(|m| m.status == Some(200)),
        "seed {seed}: {mutations:#?}"
    );

    // The node ends as the operations left it: every snapshot there, one archive per
    // backup, each guest stopped (its last applied operation was a stop).
    for p in planned.iter().filter(|p| p.kind == "snapshot") {
        if let Some(name) = &p.snapshot {
            let names = stack.pve.snapshot_names(u64::from(p.vmid)).await;
            assert!(
                names.contains(name),
                "seed {seed}: {name} on {}: {names:?}",
                p.vmid
            );
        }
    }
    let mut volids: Vec<&String> = applied_backups.iter().map(|(_, v)| v).collect();
    volids.sort();
    volids.dedup();
    assert_eq!(volids.len(), applied_backups.len(), "{applied_backups:?}");
    let content: Vec<String> = stack.pve.state_json().await["storages"]
        .as_array()
        .expect("storages")
        .iter()
        .filter(|s| s["storage"] == storage.as_str())
        .flat_map(|s| s["volumes"].as_array().cloned().unwrap_or_default())
        .filter_map(|v| v["volid"].as_str().map(str::to_string))
        .collect();
    for (vmid, volid) in &applied_backups {
        assert!(
            content.contains(volid),
            "seed {seed}: {volid} of {vmid} not in {storage}"
        );
    }
    for (vmid, _) in &chosen {
        let g = stack.pve.guest(*vmid).await.expect("guest");
        assert_eq!(g["status"], "stopped", "seed {seed}: {g}");
        assert!(g["lock"].is_null(), "seed {seed}: {g}");
    }

    // `ops list --json`: every recorded operation final, and exactly the verified ones.
    let (code, out, err) = stack.cli(&["ops", "list", "--json", "--limit", "1000"]);
    assert_eq!(code, 0, "{out}{err}");
    let v: Value = serde_json::from_str(&out).expect("ops list JSON");
    let listed = v["ops"].as_array().expect("ops");
    let open: Vec<&Value> = listed
        .iter()
        .filter(|o| o["state"] == "held" || o["state"] == "running")
        .collect();
    assert!(open.is_empty(), "seed {seed}: open operations: {open:#?}");
    let mut listed_ids: Vec<&str> = listed.iter().filter_map(|o| o["op_id"].as_str()).collect();
    listed_ids.sort();
    let mut recorded: Vec<&str> = planned
        .iter()
        .filter(|p| !p.forged && p.expect != Expect::Refused("below_threshold"))
        .map(|p| p.op_id.as_str())
        .collect();
    recorded.sort();
    assert_eq!(listed_ids, recorded, "seed {seed}");
    for o in listed {
        let p = planned
            .iter()
            .find(|p| o["op_id"].as_str() == Some(p.op_id.as_str()))
            .expect("planned");
        let want = match p.expect {
            Expect::Applied => "applied",
            Expect::Refused(_) => "refused",
        };
        assert_eq!(o["state"], want, "seed {seed}: {o}");
    }
    assert!(
        !log.contains("panicked"),
        "seed {seed}: the agent panicked:\n{log}"
    );
    drop(agent);
    assert!(kills >= 30, "{kills} kills");
    eprintln!(
        "ops_crash: {} operations, {kills} kills, each applied once, in {:?}",
        planned.len(),
        t0.elapsed()
    );
}
