//! A compromised hub, end to end over real processes: `felhom-hubsim` relays genuine
//! signed operations and desired states, and misbehaves as a hub in an attacker's hands
//! would: it alters a byte of a payload, strips a signature below the threshold,
//! duplicates a signature to fake a second signer, reorders its queue so the tampered
//! copies arrive before the genuine ones, replays deliveries (before and after a kill -9),
//! and rolls the desired state back (serving an older generation, an older document under
//! a newer generation number, another document of the applied generation, and newer ones
//! with an altered byte or an untrusted signature).
//!
//! What must hold: nothing unsigned or altered runs (`felhom-pvesim`'s request log shows
//! only the genuine operations' requests, each exactly once, and reconcile's toward the
//! genuine desired states); every tampered delivery gets a `refused` result with its
//! reason; a replay is answered with the operation's current decision and runs nothing;
//! the applied desired generation never goes back (`status --json` and the reports'
//! `reconcile.applied_generation` stay at the highest, the guest keeps its values), also
//! after a restart.
//!
//! Needs root (see `ops_support`).

mod hub_support;
mod ops_support;
mod proxmox_client_support;

use std::time::{Duration, Instant};

use felhom_authz::DESIRED_PAYLOAD_TYPE;
use felhom_testbed::harness::AgentProcess;
use felhom_testbed::signing::{Envelope, Payload};
use ops_support::*;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(90);

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

/// The desired state of `generation` for guest `vmid`: power and two config values that
/// differ per generation.
fn desired_guests(generation: u64, vmid: u32) -> Value {
    let (power, memory) = match generation {
        1 => ("running", 512),
        2 => ("stopped", 768),
        _ => ("running", 1024),
    };
    json!([{"vmid": vmid, "power": power,
            "config": {"memory": memory, "description": format!("generation {generation}")}}])
}

/// The guest's power and memory as pvesim has them.
async fn guest_values(stack: &Stack, vmid: u32) -> (String, String, String) {
    let g = stack.pve.guest(vmid).await.expect("GET /_sim/guests");
    let text = |v: &Value| match v {
        Value::String(s) => s.trim_end().to_string(),
        other => other.to_string(),
    };
    (
        text(&g["status"]),
        text(&g["config"]["memory"]),
        text(&g["config"]["description"]),
    )
}

/// `status --json` of the running daemon, once `pred` holds.
fn wait_status(stack: &Stack, agent: &AgentProcess, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + T;
    let mut last = Value::Null;
    while Instant::now() < deadline {
        let (code, out, _) = stack.cli(&["status", "--json"]);
        if code == 0
            && let Ok(v) = serde_json::from_str::<Value>(&out)
        {
            if v["daemon"] == "running" && pred(&v) {
                return v;
            }
            last = v;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "timed out; last status: {last:#}\nagent log:\n{}",
        agent.log_text()
    );
}

fn applied_generation(v: &Value) -> Option<u64> {
    v["reconcile"]["applied_generation"].as_u64()
}

/// Accepted reports so far.
async fn report_count(stack: &Stack) -> usize {
    stack.hub.accepted().await.len()
}

/// Waits until the hub accepted `n` more reports than `since` (each one a full round of
/// the agent's report loop, which is what triggers a desired-state fetch); returns the
/// newest.
async fn wait_reports(stack: &Stack, since: usize, n: usize) -> Value {
    let deadline = Instant::now() + T;
    loop {
        let acc = stack.hub.accepted().await;
        if acc.len() >= since + n {
            return acc.last().cloned().unwrap_or_default();
        }
        assert!(Instant::now() < deadline, "no reports");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every result the hub holds naming `delivery_id`.
async fn results_of_delivery(stack: &Stack, delivery_id: &str) -> Vec<Value> {
    stack
        .ops
        .result_list(0)
        .await
        .expect("results")
        .into_iter()
        .map(|r| r["result"].clone())
        .filter(|r| r["delivery_id"].as_str() == Some(delivery_id))
        .collect()
}

/// Waits for a result naming `delivery_id`; returns the first.
async fn delivery_result(stack: &Stack, delivery_id: &str) -> Value {
    let id = delivery_id.to_string();
    stack
        .wait_result(T, move |r| r["delivery_id"].as_str() == Some(id.as_str()))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compromised_hub_can_neither_run_tampered_operations_nor_roll_the_desired_state_back() {
    needs_root!();
    let t0 = Instant::now();
    let stack = Stack::new(json!({"reconcile": {"desired_source": "hub"}}));
    stack
        .hub
        .set_envelope(json!({"poll_interval_seconds": 1}))
        .await;
    let node = stack.pve.node().to_string();
    let guests = stack.pve.state_json().await["guests"]
        .as_array()
        .expect("guests")
        .clone();
    let pick = |kind: &str| -> Vec<u32> {
        let mut v: Vec<u32> = guests
            .iter()
            .filter(|g| g["type"] == kind && plain(g))
            .map(|g| g["vmid"].as_u64().expect("vmid") as u32)
            .collect();
        v.sort();
        v
    };
    let lxc = pick("lxc");
    let qemu = pick("qemu");
    assert!(lxc.len() >= 2 && !qemu.is_empty(), "{lxc:?} {qemu:?}");
    // managed by the desired state / snapshot by op A / stopped by op B
    let (managed, snap_guest, stop_guest) = (lxc[0], lxc[1], qemu[0]);
    stack
        .pve
        .put_guest(u64::from(managed), json!({"status": "stopped"}))
        .await;
    stack
        .pve
        .put_guest(u64::from(snap_guest), json!({"status": "running"}))
        .await;
    stack
        .pve
        .put_guest(u64::from(stop_guest), json!({"status": "running"}))
        .await;
    let (alice, bob, mallory) = (&stack.keys.alice, &stack.keys.bob, &stack.keys.mallory);
    let desired = |generation: u64| {
        Payload::desired(
            AGENT_ID,
            &node,
            generation,
            desired_guests(generation, managed),
        )
    };
    let env_of = |generation: u64| desired(generation).sign(&[alice]);

    let agent = stack.start_agent();

    // ---- the genuine desired states, generations 1, 2, 3
    for generation in 1..=3u64 {
        stack
            .ops
            .set_desired_text(&env_of(generation).text(), generation)
            .await
            .expect("PUT /_sim/desired");
        wait_status(&stack, &agent, |v| {
            applied_generation(v) == Some(generation)
                && v["reconcile"]["queued"]
                    .as_array()
                    .is_some_and(Vec::is_empty)
                && v["reconcile"]["running"]
                    .as_array()
                    .is_some_and(Vec::is_empty)
        });
        let (power, memory, description) = guest_values(&stack, managed).await;
        let want = &desired_guests(generation, managed)[0];
        assert_eq!(
            power,
            want["power"].as_str().unwrap(),
            "generation {generation}"
        );
        assert_eq!(memory, want["config"]["memory"].to_string());
        assert_eq!(description, format!("generation {generation}"));
    }
    let gen3_at = stack.pve.requests(0).await.expect("log");
    let gen3_seq = gen3_at.last().map_or(0, |r| r.seq);
    let desired_results = stack
        .ops
        .result_list(0)
        .await
        .expect("results")
        .into_iter()
        .map(|r| r["result"].clone())
        .filter(|r| r["kind"] == "desired")
        .collect::<Vec<_>>();
    let applied: Vec<(u64, &str)> = desired_results
        .iter()
        .map(|r| {
            (
                r["generation"].as_u64().unwrap_or(0),
                r["state"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        applied,
        [(1, "applied"), (2, "applied"), (3, "applied")],
        "{desired_results:#?}"
    );

    // ---- rollback 1: the hub serves generation 2 again and says so. Not even fetched.
    let before = report_count(&stack).await;
    stack
        .ops
        .misbehave(json!({"action": "rollback_desired", "generation": 2}))
        .await
        .expect("rollback_desired 2");
    let report = wait_reports(&stack, before, 3).await;
    assert_eq!(report["reconcile"]["applied_generation"], 3, "{report:#}");

    // ---- rollback 2: generation 1's genuine document served as "generation 4".
    stack
        .ops
        .set_desired_text(&env_of(1).text(), 4)
        .await
        .expect("PUT /_sim/desired");
    let refused = stack
        .wait_result(T, |r| r["kind"] == "desired" && r["state"] == "refused")
        .await;
    assert_eq!(refused["reason"], "rollback", "{refused:#}");
    assert_eq!(refused["generation"], 1, "{refused:#}");
    assert_eq!(refused["payload_sha256"], desired(1).sha256_hex());

    // ---- rollback 3: another document of generation 3 (signed by alice: a draft the hub
    // kept), served as "generation 7": the same generation with another payload.
    let other3 = Payload::desired(AGENT_ID, &node, 3, desired_guests(2, managed));
    stack
        .ops
        .set_desired_text(&other3.sign(&[alice]).text(), 7)
        .await
        .expect("PUT /_sim/desired");
    let sha3 = other3.sha256_hex();
    let r3 = stack
        .wait_result(T, move |r| {
            r["kind"] == "desired" && r["payload_sha256"].as_str() == Some(sha3.as_str())
        })
        .await;
    assert_eq!(
        (
            r3["state"].as_str(),
            r3["reason"].as_str(),
            r3["generation"].as_u64()
        ),
        (Some("refused"), Some("rollback"), Some(3)),
        "{r3:#}"
    );

    // ---- a newer generation with one byte altered under alice's signature, and one
    // signed by an untrusted key: neither is adopted.
    let g5 = desired(5);
    let mut altered = g5.body();
    let mid = altered.len() / 2;
    altered[mid] ^= 0x01;
    let forged5 = Envelope::from_body(DESIRED_PAYLOAD_TYPE, &altered)
        .push_signature("alice", &alice.sign_pae(DESIRED_PAYLOAD_TYPE, &g5.body()));
    stack
        .ops
        .set_desired_text(&forged5.text(), 5)
        .await
        .expect("PUT /_sim/desired");
    let bad5 = stack
        .wait_result(T, |r| {
            r["kind"] == "desired" && r["state"] == "refused" && r["reason"] != "rollback"
        })
        .await;
    assert_eq!(bad5["reason"], "bad_signature", "{bad5:#}");
    assert!(bad5["generation"].is_null(), "{bad5:#}");
    let g6 = desired(6).sign(&[mallory]);
    stack
        .ops
        .set_desired_text(&g6.text(), 6)
        .await
        .expect("PUT /_sim/desired");
    let sha6 = desired(6).sha256_hex();
    let bad6 = stack
        .wait_result(T, move |r| {
            r["kind"] == "desired" && r["payload_sha256"].as_str() == Some(sha6.as_str())
        })
        .await;
    assert_eq!(
        (bad6["state"].as_str(), bad6["reason"].as_str()),
        (Some("refused"), Some("bad_signature")),
        "{bad6:#}"
    );
    let v = wait_status(&stack, &agent, |v| applied_generation(v).is_some());
    assert_eq!(applied_generation(&v), Some(3), "{v:#}");

    // ---- a kill -9; while the agent is down the hub queues genuine operations and
    // tampered copies, reorders them so the copies come first, and rolls the desired state
    // back to generation 1.
    agent.kill9();
    // A: a snapshot of `snap_guest` (alice). B: a stop of `stop_guest` granted irreversible
    // (alice and bob). X: a reboot granted irreversible with one signature (refused).
    // C: a stop of the guest the desired state manages (refused in its lane).
    let snap_name = "genuine-a";
    let a = stack
        .guest_op("snapshot", "lxc", snap_guest)
        .params(json!({"name": snap_name}));
    let b = stack
        .guest_op("stop", "qemu", stop_guest)
        .params(json!({"timeout_seconds": 5}))
        .grant("irreversible");
    let x = stack
        .guest_op("reboot", "lxc", snap_guest)
        .grant("irreversible");
    let c = stack
        .guest_op("stop", "lxc", managed)
        .params(json!({"timeout_seconds": 5}));
    let d_a = stack.deliver(&a.sign(&[alice])).await;
    let d_b = stack.deliver(&b.sign(&[alice, bob])).await;
    let d_x = stack.deliver(&x.sign(&[alice])).await;
    let d_c = stack.deliver(&c.sign(&[alice])).await;
    let edit = |action: &str, d: &str| json!({"action": action, "delivery_id": d});
    let mut tampered: Vec<(String, &str, &str)> = Vec::new(); // (delivery, what, reason)
    for (action, d, reason) in [
        ("alter_byte", &d_a, "bad_signature"),
        ("alter_byte", &d_b, "bad_signature"),
        ("strip_signature", &d_b, "below_threshold"),
        ("duplicate_signature", &d_x, "below_threshold"),
    ] {
        let v = stack
            .ops
            .misbehave(edit(action, d))
            .await
            .unwrap_or_else(|e| panic!("{action}: {e}"));
        tampered.push((
            v["delivery_id"].as_str().expect("delivery_id").to_string(),
            action,
            reason,
        ));
    }
    let order = stack
        .ops
        .misbehave(json!({"action": "reorder"}))
        .await
        .expect("reorder");
    let pending: Vec<String> = order["pending"]
        .as_array()
        .expect("pending")
        .iter()
        .map(|d| d.as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(pending.first(), Some(&tampered[3].0), "{order}");
    stack
        .ops
        .misbehave(json!({"action": "rollback_desired", "generation": 1}))
        .await
        .expect("rollback_desired 1");

    let agent = stack.start_agent();
    let id_a = op_id_of(&a);
    let id_b = op_id_of(&b);
    let id_x = op_id_of(&x);
    let id_c = op_id_of(&c);
    // The final decision of each genuine delivery (a refused copy that verified far
    // enough names the same op_id: `strip_signature` keeps alice's valid signature).
    let final_of = |op_id: &str, d: &str| {
        let (op_id, d) = (op_id.to_string(), d.to_string());
        stack.wait_result(T, move |r| {
            r["op_id"].as_str() == Some(op_id.as_str())
                && r["delivery_id"].as_str() == Some(d.as_str())
                && r["state"] != "held"
        })
    };
    let fa = final_of(&id_a, &d_a).await;
    let fb = final_of(&id_b, &d_b).await;
    let fc = final_of(&id_c, &d_c).await;
    assert_eq!(fa["state"], "applied", "{fa:#}\n{}", agent.log_text());
    assert_eq!(fb["state"], "applied", "{fb:#}");
    assert_eq!(fb["signers"], json!(["alice", "bob"]), "{fb:#}");
    assert_eq!(
        (fc["state"].as_str(), fc["reason"].as_str()),
        (Some("refused"), Some("conflicts_with_desired")),
        "{fc:#}"
    );
    let rx = delivery_result(&stack, &d_x).await;
    assert_eq!(
        (
            rx["state"].as_str(),
            rx["reason"].as_str(),
            rx["op_id"].as_str()
        ),
        (
            Some("refused"),
            Some("below_threshold"),
            Some(id_x.as_str())
        ),
        "{rx:#}"
    );
    // Every tampered copy: refused with its reason, and answered before the genuine
    // operation it copies was accepted (the copies came first and poisoned nothing).
    let held = |op_id: &str, d: &str| {
        let (op_id, d) = (op_id.to_string(), d.to_string());
        stack.wait_result(T, move |r| {
            r["op_id"].as_str() == Some(op_id.as_str())
                && r["delivery_id"].as_str() == Some(d.as_str())
                && r["state"] == "held"
        })
    };
    let held_a = held(&id_a, &d_a).await["seq"].as_u64().unwrap();
    let held_b = held(&id_b, &d_b).await["seq"].as_u64().unwrap();
    for (d, action, reason) in &tampered {
        let r = delivery_result(&stack, d).await;
        assert_eq!(
            (r["state"].as_str(), r["reason"].as_str()),
            (Some("refused"), Some(*reason)),
            "{action}: {r:#}"
        );
        assert!(r["upids"].as_array().is_none_or(Vec::is_empty), "{r:#}");
        // An altered payload verifies under no key: nothing of it is read, no op_id. A
        // copy that lost a signature still verifies under alice: its refusal names the
        // genuine operation's op_id and payload (the hub tells them apart by delivery).
        if *action == "alter_byte" {
            assert!(r["op_id"].is_null(), "{r:#}");
        } else {
            assert!(
                r["op_id"].as_str() == Some(id_b.as_str())
                    || r["op_id"].as_str() == Some(id_x.as_str()),
                "{r:#}"
            );
        }
        let seq = r["seq"].as_u64().unwrap();
        assert!(
            seq < held_a.min(held_b),
            "{action} answered after the genuine one"
        );
        let all = results_of_delivery(&stack, d).await;
        assert!(
            all.iter().all(|x| x["state"] == "refused"),
            "{action}: {all:#?}"
        );
    }
    // The restart reconciles toward the kept generation 3, not the hub's generation 1.
    let before = report_count(&stack).await;
    let report = wait_reports(&stack, before, 3).await;
    assert_eq!(report["reconcile"]["applied_generation"], 3, "{report:#}");
    let v = wait_status(&stack, &agent, |v| applied_generation(v).is_some());
    assert_eq!(applied_generation(&v), Some(3), "{v:#}");

    // ---- replays of genuine deliveries, before and after a kill -9: each answered with
    // the operation's decision, nothing runs again.
    let replay_a = stack
        .ops
        .misbehave(edit("replay", &d_a))
        .await
        .expect("replay")["delivery_id"]
        .as_str()
        .unwrap()
        .to_string();
    let dup_b = stack
        .ops
        .misbehave(edit("duplicate_signature", &d_b))
        .await
        .expect("duplicate_signature")["delivery_id"]
        .as_str()
        .unwrap()
        .to_string();
    for d in [&replay_a, &dup_b] {
        let r = delivery_result(&stack, d).await;
        assert_eq!(r["state"], "applied", "{d}: {r:#}");
    }
    agent.kill9();
    let replay_b = stack
        .ops
        .misbehave(edit("replay", &d_b))
        .await
        .expect("replay")["delivery_id"]
        .as_str()
        .unwrap()
        .to_string();
    let agent = stack.start_agent();
    let r = delivery_result(&stack, &replay_b).await;
    assert_eq!(r["state"], "applied", "{r:#}");
    assert_eq!(r["op_id"], id_b.as_str(), "{r:#}");
    assert_eq!(r["upids"], fb["upids"], "the same decision: {r:#}\n{fb:#}");
    let pending = stack.ops.summary().await.expect("hub state")["pending"].clone();
    let state = stack.ops.results(0).await.expect("results");
    assert_eq!(state["conflicts"], json!([]), "{state:#}");

    // ---- Proxmox saw only the genuine operations, each once, and reconcile's work up to
    // generation 3; nothing at all after generation 3 was applied but A and B.
    let log = stack.pve.requests(0).await.expect("log");
    let after: Vec<String> = log
        .iter()
        .filter(|r| r.seq > gen3_seq && r.method != "GET")
        .map(|r| format!("{} {} {:?}", r.method, r.path, r.params.get("snapname")))
        .collect();
    assert_eq!(
        after.len(),
        2,
        "only A's snapshot and B's shutdown: {after:#?}\n{}",
        agent.log_text()
    );
    assert!(
        after.iter().any(|m| m.starts_with("POST ")
            && m.contains(&format!("/lxc/{snap_guest}/snapshot"))
            && m.contains(snap_name)),
        "{after:#?}"
    );
    assert!(
        after
            .iter()
            .any(|m| m.contains(&format!("/qemu/{stop_guest}/status/shutdown"))),
        "{after:#?}"
    );
    assert!(
        log.iter()
            .filter(|r| r.method != "GET")
            .all(|r| r.status == Some(200)),
        "{log:#?}"
    );
    assert!(
        stack
            .pve
            .snapshot_names(u64::from(snap_guest))
            .await
            .contains(&snap_name.to_string())
    );
    assert_eq!(
        stack.pve.guest(stop_guest).await.unwrap()["status"],
        "stopped"
    );
    assert_eq!(
        stack.pve.guest(snap_guest).await.unwrap()["status"],
        "running",
        "X (reboot) never ran"
    );
    // The managed guest keeps generation 3's values.
    let (power, memory, description) = guest_values(&stack, managed).await;
    assert_eq!(
        (power.as_str(), memory.as_str(), description.as_str()),
        ("running", "1024", "generation 3"),
        "pending deliveries: {pending}"
    );
    // The desired-state decisions: generations 1, 2, 3 applied once each, and every other
    // document refused, however often the lying hub made the agent fetch it.
    let desired_results: Vec<Value> = stack
        .ops
        .result_list(0)
        .await
        .expect("results")
        .into_iter()
        .map(|r| r["result"].clone())
        .filter(|r| r["kind"] == "desired")
        .collect();
    let applied: Vec<u64> = desired_results
        .iter()
        .filter(|r| r["state"] == "applied")
        .filter_map(|r| r["generation"].as_u64())
        .collect();
    assert_eq!(applied, [1, 2, 3], "{desired_results:#?}");
    assert!(
        desired_results
            .iter()
            .all(|r| r["state"] == "applied" || r["state"] == "refused"),
        "{desired_results:#?}"
    );
    drop(agent);
    eprintln!(
        "ops_compromised_hub: {} desired-state results ({} refused), in {:?}",
        desired_results.len(),
        desired_results.len() - applied.len(),
        t0.elapsed()
    );
}
