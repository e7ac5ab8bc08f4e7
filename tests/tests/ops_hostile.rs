//! Signed operations under a hostile hub, end to end over real processes (issue 12):
//! every hostile envelope `felhom-hubsim` relays is answered with a `refused` result
//! carrying its reason code and never reaches `felhom-pvesim`; trust withdrawn while an
//! operation is held stops it; the replay store survives restarts and a clock set back;
//! a desired-state generation never goes back; and the same envelope delivered again
//! (held, applied, after a restart, after a kill -9 between recording and sending) runs at
//! most once and is answered with its current decision.
//!
//! Needs root (see `ops_support`).

mod hub_support;
mod ops_support;
mod proxmox_client_support;

use std::collections::HashSet;
use std::time::Duration;

use felhom_testbed::harness::LoggedRequest;
use felhom_testbed::signing::{Channel, Fixture, Hostile, Payload, SignersFile, now_unix};
use ops_support::*;
use serde_json::{Value, json};

const T: Duration = Duration::from_secs(120);

/// The envelope's decoded payload's SHA-256, as the agent reports it (`None` when the
/// envelope is too large or its payload cannot be decoded).
fn decodable_sha(text: &str) -> Option<String> {
    if text.len() > felhom_authz::MAX_ENVELOPE_BYTES {
        return None;
    }
    let env = felhom_authz::Envelope::parse(text.as_bytes()).ok()?;
    env.body()
        .ok()
        .map(|b| hex::encode(felhom_authz::payload_sha256(&b)))
}

/// The `op_id` a refusal must name: none when the signatures did not verify (nothing of
/// the payload may be trusted then), else the payload's when it is well formed. A
/// `below_threshold` of an `irreversible` grant comes after the payload verified at the
/// `reversible` threshold (these envelopes all carry a trusted signature), so it names it.
fn expected_op_id(text: &str, reason: &str) -> Option<String> {
    let env: Value = serde_json::from_str(text).ok()?;
    let body = felhom_authz::decode_base64(env["payload"].as_str()?)?;
    let p: Value = serde_json::from_slice(&body).ok()?;
    let verified_first = reason == "below_threshold"
        && p["grant"] == "irreversible"
        && env["signatures"].as_array().is_some_and(|s| !s.is_empty());
    if matches!(
        reason,
        "too_large" | "bad_envelope" | "wrong_type" | "bad_signature" | "below_threshold"
    ) && !verified_first
    {
        return None;
    }
    let id = p["op_id"].as_str()?;
    (id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
    .then(|| id.to_string())
}

/// Waits until one line of the agent's log contains every needle.
async fn wait_log_line(agent: &felhom_testbed::harness::AgentProcess, needles: &[&str]) {
    let deadline = std::time::Instant::now() + T;
    loop {
        let log = agent.log_text();
        if log.lines().any(|l| needles.iter().all(|n| l.contains(n))) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for a line with {needles:?}:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the hub handed `delivery_id` out at least `n` times.
async fn wait_handed_out(stack: &Stack, delivery_id: &str, n: u64) {
    let deadline = std::time::Instant::now() + T;
    loop {
        let l = stack.ops.deliveries().await.expect("hubsim deliveries");
        let handed = l["deliveries"]
            .as_array()
            .and_then(|a| a.iter().find(|x| x["delivery_id"] == delivery_id))
            .and_then(|x| x["handed_out"].as_u64())
            .unwrap_or(0);
        if handed >= n {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{delivery_id} not handed out {n} times: {l}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn describe(m: &[LoggedRequest]) -> Vec<String> {
    m.iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect()
}

/// Mutating requests about one guest.
fn about(m: &[LoggedRequest], vmid: u32) -> Vec<String> {
    let part = format!("/{vmid}/");
    let end = format!("/{vmid}");
    describe(m)
        .into_iter()
        .filter(|p| p.contains(&part) || p.ends_with(&end))
        .collect()
}

/// One refusal expected at receipt: the case's name, its delivery, the reason, the
/// `op_id` and `payload_sha256` the result must carry.
struct Expect {
    name: String,
    delivery: String,
    reason: String,
    op_id: Option<String>,
    sha: Option<String>,
}

/// Checks the one result each expected delivery got; returns the failures.
async fn check_refusals(stack: &Stack, expects: &[Expect]) -> Vec<String> {
    let ids: HashSet<String> = expects.iter().map(|e| e.delivery.clone()).collect();
    let list = stack
        .ops
        .wait_results(T, |list| {
            let got: HashSet<&str> = list
                .iter()
                .filter_map(|r| r["result"]["delivery_id"].as_str())
                .collect();
            ids.iter().all(|d| got.contains(d.as_str()))
        })
        .await
        .expect("a result for every hostile delivery");
    let mut failures = Vec::new();
    for e in expects {
        let mine: Vec<&Value> = list
            .iter()
            .map(|r| &r["result"])
            .filter(|r| r["delivery_id"].as_str() == Some(e.delivery.as_str()))
            .collect();
        let r = mine[0];
        eprintln!(
            "{}: {} {} op_id={} payload_sha256={}",
            e.name,
            r["state"],
            r["reason"],
            if r["op_id"].is_null() { "null" } else { "set" },
            if r["payload_sha256"].is_null() {
                "null"
            } else {
                "set"
            },
        );
        let mut bad = |what: &str| failures.push(format!("{}: {what}: {r}", e.name));
        if mine.len() != 1 {
            bad(&format!("{} results, not one", mine.len()));
        }
        if r["state"] != "refused" {
            bad("not refused");
        }
        if r["reason"].as_str() != Some(e.reason.as_str()) {
            bad(&format!("reason is not {}", e.reason));
        }
        if r["kind"] != "op" {
            bad("kind is not op");
        }
        if r["op_id"].as_str() != e.op_id.as_deref() {
            bad(&format!("op_id is not {:?}", e.op_id));
        }
        if r["payload_sha256"].as_str() != e.sha.as_deref() {
            bad(&format!("payload_sha256 is not {:?}", e.sha));
        }
        if r["signers"] != json!([]) || r["upids"] != json!([]) {
            bad("a refusal names signers or tasks");
        }
    }
    failures
}

fn expect_case(name: &str, delivery: String, text: &str, reason: &str) -> Expect {
    Expect {
        name: name.into(),
        delivery,
        reason: reason.into(),
        op_id: expected_op_id(text, reason),
        sha: decodable_sha(text),
    }
}

/// Every operation in the factory's hostile catalogue, garbled deliveries, and the
/// refusals that need the agent's state (replayed, precondition_failed,
/// conflicts_with_desired): each refused with its reason, and only the two valid
/// snapshots run on purpose reach Proxmox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_operations_are_refused_with_their_reason_and_never_reach_proxmox() {
    needs_root!();
    let stack = Stack::new(json!({}));
    let vmid = stack.pve.plain_guest("lxc", "running").await as u32;
    let managed = stack.pve.plain_guest("qemu", "running").await as u32;
    stack.write_desired(
        &json!({"generation": 1, "guests": [{"vmid": managed, "power": "running"}]}),
    );
    stack.patch_config(&json!({"reconcile": {"desired_file": stack.desired}}));
    let agent = stack.start_agent();
    let node = stack.pve.node().to_string();
    let fx = Fixture::new(AGENT_ID, &node, vmid);

    let mut expects = Vec::new();
    for h in Hostile::ALL {
        let case = h.build(&fx);
        if case.channel != Channel::Op || case.signers.is_some() {
            continue; // desired-state cases and trust variants: other tests
        }
        let d = stack.deliver_text(&case.envelope).await;
        expects.push(expect_case(case.name, d, &case.envelope, case.reason));
    }
    // Garbled deliveries: text that is not JSON (the hub hands it out as a JSON string),
    // a whole valid envelope as a JSON string, an envelope without signatures, a number.
    let valid_text = stack.signed(&stack.guest_op("stop", "lxc", vmid)).text();
    let no_sigs = {
        let mut v: Value = serde_json::from_str(&valid_text).unwrap();
        v.as_object_mut().unwrap().remove("signatures");
        v.to_string()
    };
    for (name, text) in [
        ("not_json", "stop 101 now {".to_string()),
        (
            "envelope_as_json_string",
            Value::String(valid_text.clone()).to_string(),
        ),
        ("missing_signatures", no_sigs),
        ("json_number", "42".to_string()),
    ] {
        let d = stack.deliver_text(&text).await;
        expects.push(Expect {
            name: name.into(),
            delivery: d,
            reason: "bad_envelope".into(),
            op_id: None,
            sha: None,
        });
    }
    let mut failures = check_refusals(&stack, &expects).await;
    let kinds: HashSet<&str> = expects.iter().map(|e| e.reason.as_str()).collect();
    eprintln!(
        "{} hostile deliveries refused at receipt, reasons {kinds:?}",
        expects.len()
    );

    // A valid snapshot (run on purpose), then a different payload under its op_id.
    let snap = stack
        .guest_op("snapshot", "lxc", vmid)
        .params(json!({"name": "hostile1", "description": "on purpose"}));
    let snap_id = op_id_of(&snap);
    stack.deliver(&stack.signed(&snap)).await;
    let done = stack.final_result(&snap_id, T).await;
    assert_eq!(done["state"], "applied", "{done}\n{}", agent.log_text());
    let other = snap.clone().reason("the same op_id, another payload");
    let text = stack.signed(&other).text();
    let d = stack.deliver_text(&text).await;
    let mut state_cases = vec![Expect {
        name: "replayed".into(),
        delivery: d,
        reason: "replayed".into(),
        op_id: Some(snap_id.clone()),
        sha: Some(other.sha256_hex()),
    }];
    failures.extend(check_refusals(&stack, &state_cases).await);

    // Accepted (held), then refused in the guest's lane (the engine has read the
    // desired file by now: it says so).
    wait_log_count(&agent, "desired state loaded", 1, T).await;
    let missing = 987_654u32;
    let digest = "0".repeat(40);
    let lane_cases: Vec<(&str, Payload, &str)> = vec![
        (
            "guest_does_not_exist",
            stack
                .guest_op("stop", "lxc", missing)
                .params(json!({"timeout_seconds": 5})),
            "precondition_failed",
        ),
        (
            "wrong_expect_digest",
            stack
                .guest_op("snapshot", "lxc", vmid)
                .params(json!({"name": "never", "description": "x"}))
                .expect_digest(&digest),
            "precondition_failed",
        ),
        (
            "wrong_target_type",
            stack
                .guest_op("stop", "qemu", vmid)
                .params(json!({"timeout_seconds": 5})),
            "precondition_failed",
        ),
        (
            "stop_of_a_guest_the_desired_file_manages",
            stack
                .guest_op("stop", "qemu", managed)
                .params(json!({"timeout_seconds": 5})),
            "conflicts_with_desired",
        ),
    ];
    for (name, p, reason) in &lane_cases {
        let id = op_id_of(p);
        let d = stack.deliver(&stack.signed(p)).await;
        let r = stack.final_result(&id, T).await;
        let all = stack.results_for(&id).await;
        let states: Vec<&str> = all.iter().filter_map(|r| r["state"].as_str()).collect();
        if r["state"] != "refused" || r["reason"] != *reason {
            failures.push(format!("{name}: not refused {reason}: {r}"));
        }
        if states != ["held", "refused"] {
            failures.push(format!("{name}: states {states:?}"));
        }
        if !all.iter().all(|x| {
            x["delivery_id"].as_str() == Some(d.as_str())
                && x["payload_sha256"].as_str() == Some(p.sha256_hex().as_str())
        }) {
            failures.push(format!("{name}: delivery or payload_sha256 wrong: {all:?}"));
        }
        state_cases.push(Expect {
            name: name.to_string(),
            delivery: d,
            reason: reason.to_string(),
            op_id: Some(id),
            sha: Some(p.sha256_hex()),
        });
    }
    // ... while a snapshot of the managed guest is fine (run on purpose).
    let snap2 = stack
        .guest_op("snapshot", "qemu", managed)
        .params(json!({"name": "managed1", "description": "allowed"}));
    stack.deliver(&stack.signed(&snap2)).await;
    let r = stack.final_result(&op_id_of(&snap2), T).await;
    if r["state"] != "applied" {
        failures.push(format!("snapshot_of_a_managed_guest: not applied: {r}"));
    }

    assert!(
        failures.is_empty(),
        "{} failures:\n{}\n\nagent log:\n{}",
        failures.len(),
        failures.join("\n"),
        agent.log_text()
    );
    assert!(
        expects.len() + state_cases.len() >= 25,
        "only {} kinds",
        expects.len() + state_cases.len()
    );
    // Nothing but the two snapshots reached Proxmox; both guests keep running.
    let m = stack.mutations().await;
    let paths = describe(&m);
    assert_eq!(paths.len(), 2, "{paths:?}");
    assert_eq!(about(&m, vmid).len(), 1, "{paths:?}");
    assert!(
        about(&m, vmid)[0].ends_with(&format!("/lxc/{vmid}/snapshot")),
        "{paths:?}"
    );
    assert_eq!(about(&m, managed).len(), 1, "{paths:?}");
    assert!(
        about(&m, managed)[0].ends_with(&format!("/qemu/{managed}/snapshot")),
        "{paths:?}"
    );
    for v in [vmid, managed] {
        let g = stack.pve.guest(v).await.unwrap();
        assert_eq!(g["status"], "running", "{g}");
    }
    drop(agent);
}

/// No signers file: every delivery, valid or not, is answered `ops_disabled` (the agent
/// fetches because the control envelope says `has_signed_ops`), and nothing runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_signers_file_every_delivery_is_answered_ops_disabled() {
    needs_root!();
    let stack = Stack::new(json!({}));
    std::fs::remove_file(&stack.signers).expect("remove signers.json");
    stack
        .hub
        .set_envelope(json!({"poll_interval_seconds": 1}))
        .await;
    let vmid = stack.pve.plain_guest("lxc", "running").await as u32;
    let agent = stack.start_agent();
    let valid = stack
        .guest_op("stop", "lxc", vmid)
        .params(json!({"timeout_seconds": 5}));
    let valid_text = stack.signed(&valid).text();
    let forged = valid.clone().sign(&[&stack.keys.mallory]).text();
    let mut expects = Vec::new();
    for (name, text) in [
        ("valid_stop", valid_text.as_str()),
        ("forged_stop", forged.as_str()),
        ("garbage", "<html>"),
    ] {
        let d = stack.deliver_text(text).await;
        expects.push(Expect {
            name: name.into(),
            delivery: d,
            reason: "ops_disabled".into(),
            op_id: None,
            sha: decodable_sha(text),
        });
    }
    assert_eq!(expects[0].sha.as_deref(), Some(valid.sha256_hex().as_str()));
    let failures = check_refusals(&stack, &expects).await;
    assert!(
        failures.is_empty(),
        "{}\n{}",
        failures.join("\n"),
        agent.log_text()
    );
    assert_eq!(describe(&stack.mutations().await), Vec::<String>::new());
    let g = stack.pve.guest(vmid).await.unwrap();
    assert_eq!(g["status"], "running", "{g}");
    drop(agent);
}

/// Trust changes on SIGHUP: one key under two names still counts once (a grant of
/// `irreversible` signed by it under both names is `below_threshold`), and an operation
/// signed only by a key removed while it was held is refused `bad_signature` and never
/// runs once the hub unblocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_changes_on_sighup_count_keys_once_and_stop_what_a_removed_key_signed() {
    needs_root!();
    let stack = Stack::new(json!({}));
    stack
        .hub
        .set_envelope(json!({"poll_interval_seconds": 1}))
        .await;
    let vmid = stack.pve.plain_guest("lxc", "running").await as u32;
    let agent = stack.start_agent();
    wait_log_count(&agent, "felhom-agent running", 1, T).await;
    let fx = Fixture::new(AGENT_ID, stack.pve.node(), vmid);

    // One key under two names.
    let case = Hostile::OneKeyUnderTwoNames.build(&fx);
    stack.write_signers(case.signers.as_ref().expect("the two-names variant"));
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    wait_log_count(&agent, "trust changed", 1, T).await;
    let d = stack.deliver_text(&case.envelope).await;
    let expects = vec![expect_case(case.name, d, &case.envelope, case.reason)];
    let failures = check_refusals(&stack, &expects).await;
    assert!(
        failures.is_empty(),
        "{}\n{}",
        failures.join("\n"),
        agent.log_text()
    );

    // Held while blocked, then bob is removed.
    stack.write_signers(&stack.keys.signers());
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    wait_log_count(&agent, "trust changed", 2, T).await;
    let before = stack.accepted_reports().await;
    stack
        .hub
        .set_envelope(json!({"poll_interval_seconds": 1, "blocked": true}))
        .await;
    // the third report after the change went out after the agent read the first answer
    stack.wait_accepted_reports(before, 3, T).await;
    let by_bob = stack
        .guest_op("stop", "lxc", vmid)
        .params(json!({"timeout_seconds": 5}));
    let bob_id = op_id_of(&by_bob);
    let d = stack.deliver(&by_bob.sign(&[&stack.keys.bob])).await;
    let held = stack.result_for_delivery(&d, T).await;
    assert_eq!(held["state"], "held", "{held}");
    assert_eq!(held["signers"], json!(["bob"]), "{held}");
    // the report shows it waiting for the hub's block
    let id = bob_id.clone();
    stack
        .hub
        .wait_reports(T, |r| {
            r.iter().any(|x| {
                x["report"]["ops"]["held"].as_array().is_some_and(|h| {
                    h.iter()
                        .any(|o| o["op_id"] == id.as_str() && o["waiting_for"] == "blocked")
                })
            })
        })
        .await;
    stack.write_signers(&SignersFile::new(&[&stack.keys.alice]).threshold(1, 1));
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    wait_log_count(&agent, "trust changed", 3, T).await;
    let r = stack.final_result(&bob_id, T).await;
    assert_eq!(r["state"], "refused", "{r}\n{}", agent.log_text());
    assert_eq!(r["reason"], "bad_signature", "{r}");
    assert_eq!(r["op_id"], bob_id.as_str(), "{r}");
    assert_eq!(r["delivery_id"], d.as_str(), "{r}");
    // Unblocked: it stays refused and never runs; the hub hears of it twice only.
    let before = stack.accepted_reports().await;
    stack
        .hub
        .set_envelope(json!({"poll_interval_seconds": 1, "blocked": false}))
        .await;
    stack.wait_accepted_reports(before, 3, T).await;
    let states: Vec<Value> = stack
        .results_for(&bob_id)
        .await
        .iter()
        .map(|r| r["state"].clone())
        .collect();
    assert_eq!(states, [json!("held"), json!("refused")]);
    assert_eq!(describe(&stack.mutations().await), Vec::<String>::new());
    let g = stack.pve.guest(vmid).await.unwrap();
    assert_eq!(g["status"], "running", "{g}");
    drop(agent);
}

/// The replay store over restarts: a different payload under a used `op_id` is
/// `replayed`, also after a restart; the same envelope again is answered `applied`
/// (after a restart too); once its record was pruned, the same envelope delivered to an
/// agent whose clock was set back (so it looks valid again) is `expired`, never run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_used_op_id_stays_used_across_restarts_and_a_clock_set_back() {
    needs_root!();
    let stack = Stack::new(json!({}));
    stack.write_signers(&stack.keys.signers().clock_skew_seconds(1));
    let vmid = stack.pve.plain_guest("lxc", "running").await as u32;
    let t0 = now_unix();
    let window = 90;
    let snap = stack
        .guest_op("snapshot", "lxc", vmid)
        .params(json!({"name": "once", "description": "replay store"}))
        .window(t0 - 2, t0 + window);
    let snap_id = op_id_of(&snap);
    let other = |reason: &str| stack.signed(&snap.clone().reason(reason));

    let agent = stack.start_agent();
    let d1 = stack.deliver(&stack.signed(&snap)).await;
    let done = stack.final_result(&snap_id, T).await;
    assert_eq!(done["state"], "applied", "{done}\n{}", agent.log_text());
    let d = stack.deliver(&other("another payload")).await;
    let r = stack.result_for_delivery(&d, T).await;
    assert_eq!(
        (&r["state"], &r["reason"]),
        (&json!("refused"), &json!("replayed")),
        "{r}"
    );
    assert_eq!(r["op_id"], snap_id.as_str(), "{r}");

    // After a restart (SIGTERM).
    assert_eq!(agent.term(T), Some(0));
    let agent = stack.start_agent();
    assert!(
        now_unix() + 10 < t0 + window,
        "the machine is too slow for this test's {window} s window"
    );
    let d = stack.deliver(&other("after a restart")).await;
    let r = stack.result_for_delivery(&d, T).await;
    assert_eq!(
        (&r["state"], &r["reason"]),
        (&json!("refused"), &json!("replayed")),
        "after a restart: {r}"
    );
    let again = stack.replay(&d1).await;
    let r = stack.result_for_delivery(&again, T).await;
    assert_eq!(
        r["state"], "applied",
        "the same envelope after a restart: {r}"
    );
    assert_eq!(r["op_id"], snap_id.as_str(), "{r}");

    // Wait out the window (the point of this wait), restart: the first sweep prunes it.
    while now_unix() <= t0 + window + 1 {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(agent.term(T), Some(0));
    let agent = stack.start_agent();
    wait_log_count(&agent, "replay store pruned", 1, T).await;
    assert_eq!(agent.term(T), Some(0));
    let (code, out, err) = stack.cli(&["ops", "list", "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["replay_floor"], t0 + window, "{v}");

    // The clock set back to inside the window: the envelope verifies again, but its
    // not_after is at the pruned floor.
    let back = now_unix() - (t0 + 10);
    let agent = stack.start_agent_with(&[], Some(&format!("-{back}")));
    let d = stack.replay(&d1).await;
    let r = stack.result_for_delivery(&d, T).await;
    assert_eq!(
        (&r["state"], &r["reason"]),
        (&json!("refused"), &json!("expired")),
        "{r}\n{}",
        agent.log_text()
    );
    assert_eq!(r["op_id"], snap_id.as_str(), "{r}");
    assert_eq!(r["payload_sha256"], snap.sha256_hex(), "{r}");
    assert!(
        agent.log_text().contains("was the clock set back"),
        "{}",
        agent.log_text()
    );
    let m = stack.mutations().await;
    assert_eq!(describe(&m).len(), 1, "{:?}", describe(&m));
    assert!(describe(&m)[0].ends_with(&format!("/lxc/{vmid}/snapshot")));
    drop(agent);
}

/// The same envelope delivered again while held, after it was applied, after a restart,
/// and after a kill -9 between recording its decisions and sending them: it runs once,
/// every redelivery is answered with its current decision, every result reaches the hub
/// and `seq`s are unique and increasing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redeliveries_run_at_most_once_and_are_answered_with_the_current_decision() {
    needs_root!();
    let stack = Stack::new(json!({}));
    stack
        .hub
        .set_envelope(json!({"poll_interval_seconds": 1, "blocked": true}))
        .await;
    let vmid = stack.pve.plain_guest("lxc", "running").await as u32;
    let agent = stack.start_agent();
    let stop = stack
        .guest_op("stop", "lxc", vmid)
        .params(json!({"timeout_seconds": 5}));
    let stop_id = op_id_of(&stop);
    let d1 = stack.deliver(&stack.signed(&stop)).await;
    let r = stack.result_for_delivery(&d1, T).await;
    assert_eq!(r["state"], "held", "{r}");

    // (a) while held
    let d2 = stack.replay(&d1).await;
    let r = stack.result_for_delivery(&d2, T).await;
    assert_eq!(r["state"], "held", "redelivered while held: {r}");
    assert_eq!(r["op_id"], stop_id.as_str());
    assert_eq!(describe(&stack.mutations().await), Vec::<String>::new());

    // (b) after it was applied
    stack
        .hub
        .set_envelope(json!({"poll_interval_seconds": 1, "blocked": false}))
        .await;
    let done = stack.final_result(&stop_id, T).await;
    assert_eq!(done["state"], "applied", "{done}\n{}", agent.log_text());
    let d3 = stack.replay(&d1).await;
    let r = stack.result_for_delivery(&d3, T).await;
    assert_eq!(
        r["state"], "applied",
        "redelivered after it was applied: {r}"
    );
    assert_eq!(r["upids"], done["upids"], "{r}");

    // (c) after a restart
    assert_eq!(agent.term(T), Some(0));
    let agent = stack.start_agent();
    let d4 = stack.replay(&d1).await;
    let r = stack.result_for_delivery(&d4, T).await;
    assert_eq!(r["state"], "applied", "redelivered after a restart: {r}");

    // (d) decisions recorded but not delivered (the hub refuses results and reports),
    // kill -9, restart, the hub accepts again.
    let start_vmid = stack.pve.plain_guest("qemu", "stopped").await as u32;
    let start = stack.guest_op("start", "qemu", start_vmid);
    let start_id = op_id_of(&start);
    stack
        .ops
        .result_fault(Some(503))
        .await
        .expect("result fault");
    stack
        .hub
        .add_fault(json!({"kind": "status", "status": 503}))
        .await;
    let d5 = stack.deliver(&stack.signed(&start)).await;
    let log = wait_log_count(&agent, "signed operation decided", 1, T).await;
    assert!(log.contains(&start_id), "{log}");
    let m = stack.mutations().await;
    assert_eq!(about(&m, start_vmid).len(), 1, "{:?}", describe(&m));
    // the hub hands it out again meanwhile (it holds no result for d5); still nothing
    // delivered
    wait_handed_out(&stack, &d5, 2).await;
    assert_eq!(stack.results_for(&start_id).await, Vec::<Value>::new());
    agent.kill9();
    let agent = stack.start_agent();
    wait_log_count(&agent, "felhom-agent running", 1, T).await;
    let d6 = stack.replay(&d5).await;
    stack
        .ops
        .result_fault(None)
        .await
        .expect("clear result fault");
    stack.hub.clear_faults().await;
    let r = stack.result_for_delivery(&d6, T).await;
    assert_eq!(r["state"], "applied", "redelivered after a kill -9: {r}");
    let id = start_id.clone();
    stack
        .ops
        .wait_results(T, |list| {
            let states: Vec<&str> = list
                .iter()
                .map(|r| &r["result"])
                .filter(|r| r["op_id"].as_str() == Some(id.as_str()))
                .filter_map(|r| r["state"].as_str())
                .collect();
            states.contains(&"held") && states.contains(&"applied")
        })
        .await
        .expect("the held and applied results recorded before the kill -9 arrive");
    let all = stack.results_for(&start_id).await;
    assert_eq!(all[0]["state"], "held", "{all:?}");
    assert_eq!(all[0]["delivery_id"], d5.as_str(), "{all:?}");
    assert!(
        all.iter().skip(1).all(|r| r["state"] == "applied"),
        "{all:?}"
    );

    // Exactly once at Proxmox, each.
    let m = stack.mutations().await;
    let paths = describe(&m);
    assert_eq!(about(&m, vmid).len(), 1, "{paths:?}");
    assert!(
        about(&m, vmid)[0].ends_with("/status/shutdown"),
        "{paths:?}"
    );
    assert_eq!(about(&m, start_vmid).len(), 1, "{paths:?}");
    assert!(
        about(&m, start_vmid)[0].ends_with("/status/start"),
        "{paths:?}"
    );
    assert_eq!(paths.len(), 2, "{paths:?}");
    // Every result once, seqs unique and increasing in arrival order.
    let answer = stack.ops.results(0).await.unwrap();
    assert_eq!(answer["conflicts"], json!([]), "{answer}");
    let seqs: Vec<u64> = answer["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["result"]["seq"].as_u64().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    // every delivery got its answer
    for d in [&d1, &d2, &d3, &d4, &d5, &d6] {
        assert!(
            answer["results"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["result"]["delivery_id"] == d.as_str()),
            "no result for {d}: {answer}"
        );
    }
    drop(agent);
}

/// The signed desired state from the hub: a generation below the applied one (the hub
/// serves an old document under a new announcement) and an equal generation with another
/// payload are refused `rollback`, hostile documents get their reasons, and reconcile
/// never moves the guest back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_desired_generation_never_goes_back() {
    needs_root!();
    let stack = Stack::new(json!({"reconcile": {"desired_source": "hub"}}));
    stack
        .hub
        .set_envelope(json!({"poll_interval_seconds": 1}))
        .await;
    let vmid = stack.pve.plain_guest("lxc", "stopped").await as u32;
    let node = stack.pve.node().to_string();
    let doc = |g: u64, power: &str, desc: &str| {
        let guests = json!([{"vmid": vmid, "power": power, "config": {"description": desc}}]);
        Payload::desired(AGENT_ID, &node, g, guests)
    };
    let desired_result = |sha: String, state: &'static str| {
        move |r: &Value| {
            r["kind"] == "desired" && r["payload_sha256"] == sha.as_str() && r["state"] == state
        }
    };
    let gen1 = doc(1, "stopped", "one");
    let gen1_text = stack.signed(&gen1).text();
    stack.ops.set_desired_text(&gen1_text, 1).await.unwrap();
    let agent = stack.start_agent();
    let r = stack
        .wait_result(T, desired_result(gen1.sha256_hex(), "applied"))
        .await;
    assert_eq!(r["generation"], 1, "{r}");
    let gen2 = doc(2, "running", "two");
    stack
        .ops
        .set_desired_text(&stack.signed(&gen2).text(), 2)
        .await
        .unwrap();
    let r = stack
        .wait_result(T, desired_result(gen2.sha256_hex(), "applied"))
        .await;
    assert_eq!(
        (&r["generation"], &r["signers"]),
        (&json!(2), &json!(["alice"])),
        "{r}"
    );
    let deadline = std::time::Instant::now() + T;
    while stack.pve.guest(vmid).await.unwrap()["status"] != "running" {
        assert!(std::time::Instant::now() < deadline, "{}", agent.log_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The hub announces generation 3 but serves the old generation 1.
    stack.ops.set_desired_text(&gen1_text, 3).await.unwrap();
    let r = stack
        .wait_result(T, desired_result(gen1.sha256_hex(), "refused"))
        .await;
    assert_eq!(
        (&r["reason"], &r["generation"]),
        (&json!("rollback"), &json!(1)),
        "{r}"
    );
    assert_eq!(
        (&r["op_id"], &r["delivery_id"]),
        (&Value::Null, &Value::Null),
        "{r}"
    );
    // Generation 2 again with another payload.
    let gen2b = doc(2, "stopped", "two, altered");
    stack
        .ops
        .set_desired_text(&stack.signed(&gen2b).text(), 4)
        .await
        .unwrap();
    let r = stack
        .wait_result(T, desired_result(gen2b.sha256_hex(), "refused"))
        .await;
    assert_eq!(
        (&r["reason"], &r["generation"]),
        (&json!("rollback"), &json!(2)),
        "{r}"
    );
    // Hostile documents from the factory.
    let fx = Fixture::new(AGENT_ID, &node, vmid);
    let mut failures = Vec::new();
    for h in Hostile::ALL {
        let case = h.build(&fx);
        if case.channel != Channel::Desired {
            continue;
        }
        // Two cases share a payload: only results after this document was served count.
        let since = stack.ops.result_list(0).await.unwrap().len() as u64;
        stack
            .ops
            .set_desired_text(&case.envelope, 1_000_000)
            .await
            .unwrap();
        let sha = decodable_sha(&case.envelope);
        let reason = case.reason;
        let got = stack
            .ops
            .wait_results(T, |list| {
                list.iter().any(|x| {
                    let r = &x["result"];
                    x["index"].as_u64() > Some(since)
                        && r["kind"] == "desired"
                        && r["state"] == "refused"
                        && r["payload_sha256"].as_str() == sha.as_deref()
                        && r["reason"] == reason
                })
            })
            .await;
        if let Err(e) = got {
            failures.push(format!("{}: no refusal {reason}: {e}", case.name));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The hub rolls its document back to generation 1 under its own number: the agent
    // has nothing to fetch, and its applied generation stays 2.
    stack
        .ops
        .misbehave(json!({"action": "rollback_desired", "generation": 1}))
        .await
        .unwrap();
    let before = stack.accepted_reports().await;
    stack.wait_accepted_reports(before, 3, T).await;
    let g = stack.pve.guest(vmid).await.unwrap();
    assert_eq!(g["status"], "running", "{g}\n{}", agent.log_text());
    let m = stack.mutations().await;
    let mine = about(&m, vmid);
    assert!(
        !mine
            .iter()
            .any(|p| p.ends_with("/status/shutdown") || p.ends_with("/status/stop")),
        "reconcile moved the guest back: {mine:?}"
    );
    assert_eq!(
        mine.iter().filter(|p| p.ends_with("/status/start")).count(),
        1,
        "{mine:?}"
    );
    drop(agent);
}

/// Held operations are decided without running: one whose window ends while it is held is
/// refused `expired` (and a redelivery gets that decision), and switching signed
/// operations off (the signers file made group- and world-writable, SIGHUP) refuses the
/// others `ops_disabled`; unblocked and with the trust restored, neither runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_operations_expire_or_stop_when_operations_are_switched_off() {
    needs_root!();
    let stack = Stack::new(json!({}));
    stack.write_signers(&stack.keys.signers().clock_skew_seconds(1));
    stack
        .hub
        .set_envelope(json!({"poll_interval_seconds": 1, "blocked": true}))
        .await;
    let vmid = stack.pve.plain_guest("lxc", "running").await as u32;
    let agent = stack.start_agent();
    // up and holding (blocked) before the short window starts counting
    stack.wait_accepted_reports(0, 1, T).await;
    let now = now_unix();
    let short = stack
        .guest_op("stop", "lxc", vmid)
        .params(json!({"timeout_seconds": 5}))
        .window(now - 2, now + 8);
    let short_id = op_id_of(&short);
    let long = stack.guest_op("reboot", "lxc", vmid);
    let long_id = op_id_of(&long);
    let d_short = stack.deliver(&stack.signed(&short)).await;
    let d_long = stack.deliver(&stack.signed(&long)).await;
    for d in [&d_short, &d_long] {
        let r = stack.result_for_delivery(d, T).await;
        assert_eq!(r["state"], "held", "{r}\n{}", agent.log_text());
    }
    let r = stack.final_result(&short_id, T).await;
    assert_eq!(
        (&r["state"], &r["reason"]),
        (&json!("refused"), &json!("expired")),
        "{r}"
    );
    assert_eq!(r["delivery_id"], d_short.as_str(), "{r}");
    // delivered again after its window: its decision again, not a new refusal
    let again = stack.replay(&d_short).await;
    let r = stack.result_for_delivery(&again, T).await;
    assert_eq!(
        (&r["state"], &r["reason"], &r["op_id"]),
        (&json!("refused"), &json!("expired"), &json!(short_id)),
        "{r}"
    );
    // Operations off: the signers file is writable by others.
    stack
        .keys
        .signers()
        .clock_skew_seconds(1)
        .write_owned(&stack.signers, 0o666, 0, 0)
        .expect("unsafe signers.json");
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    let r = stack.final_result(&long_id, T).await;
    assert_eq!(
        (&r["state"], &r["reason"]),
        (&json!("refused"), &json!("ops_disabled")),
        "{r}\n{}",
        agent.log_text()
    );
    // Trust restored, the hub unblocks: nothing that was refused runs.
    stack.write_signers(&stack.keys.signers().clock_skew_seconds(1));
    agent.signal(nix::sys::signal::Signal::SIGHUP);
    let before = stack.accepted_reports().await;
    stack
        .hub
        .set_envelope(json!({"poll_interval_seconds": 1, "blocked": false}))
        .await;
    stack.wait_accepted_reports(before, 3, T).await;
    let again = stack.replay(&d_long).await;
    let r = stack.result_for_delivery(&again, T).await;
    assert_eq!(
        (&r["state"], &r["reason"]),
        (&json!("refused"), &json!("ops_disabled")),
        "redelivered once operations are on again: {r}"
    );
    assert_eq!(describe(&stack.mutations().await), Vec::<String>::new());
    let g = stack.pve.guest(vmid).await.unwrap();
    assert_eq!(g["status"], "running", "{g}");
    drop(agent);
}

/// A hub that keeps handing deliveries out while it refuses every result (an outage of
/// its result endpoint, or a hostile hub) gets each delivery answered once: the agent's
/// outbox of unsent results does not grow by one row per long poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_handed_out_again_while_results_fail_are_answered_once() {
    needs_root!();
    let stack = Stack::new(json!({}));
    let vmid = stack.pve.plain_guest("lxc", "running").await as u32;
    stack
        .hub
        .set_envelope(json!({"poll_interval_seconds": 1}))
        .await;
    let agent = stack.start_agent();
    // the gate opens with the first envelope; then results and reports fail
    stack.wait_accepted_reports(0, 2, T).await;
    stack
        .ops
        .result_fault(Some(503))
        .await
        .expect("result fault");
    stack
        .hub
        .add_fault(json!({"kind": "status", "status": 503}))
        .await;
    let snap = stack
        .guest_op("snapshot", "lxc", vmid)
        .params(json!({"name": "outbox", "description": "x"}));
    let snap_id = op_id_of(&snap);
    let d_garbage = stack.deliver_text("garbage").await;
    let d_snap = stack.deliver(&stack.signed(&snap)).await;
    wait_log_line(&agent, &["signed operation decided", &snap_id]).await;
    // The hub hands both out again and again (no result of theirs reached it).
    wait_handed_out(&stack, &d_garbage, 3).await;
    wait_handed_out(&stack, &d_snap, 3).await;
    let (code, out, err) = stack.cli(&["ops", "list", "--json"]);
    assert_eq!(code, 0, "{out}{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    // the garbage's refusal, the snapshot's held and applied: nothing more
    assert_eq!(v["pending_results"], 3, "{v}\n{}", agent.log_text());
    stack.ops.result_fault(None).await.unwrap();
    stack.hub.clear_faults().await;
    let r = stack.final_result(&snap_id, T).await;
    assert_eq!(r["state"], "applied", "{r}");
    let r = stack.result_for_delivery(&d_garbage, T).await;
    assert_eq!(r["reason"], "bad_envelope", "{r}");
    let m = stack.mutations().await;
    assert_eq!(describe(&m).len(), 1, "{:?}", describe(&m));
    drop(agent);
}

/// A delivery the hub can never drop (its `delivery_id` is unusable, so no answer can name
/// it) is answered again only after a backoff, not in a busy loop of polls and refusals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_the_hub_never_drops_does_not_make_the_agent_busy_loop() {
    needs_root!();
    let stack = Stack::new(json!({}));
    let agent = stack.start_agent();
    wait_log_count(&agent, "felhom-agent running", 1, T).await;
    let too_long = "x".repeat(65);
    stack
        .ops
        .enqueue(json!({"envelope_text": "garbage", "delivery_id": too_long}))
        .await
        .expect("enqueue");
    let answers = |list: &[Value]| {
        list.iter()
            .filter(|r| {
                r["result"]["reason"] == "bad_envelope" && r["result"]["delivery_id"].is_null()
            })
            .count()
    };
    // Answered (refused, no delivery id to name), handed out again, answered again ...
    let list = stack
        .ops
        .wait_results(T, |l| answers(l) >= 2)
        .await
        .expect("answered twice");
    // ... but not hundreds of times a second: the next poll waits out a backoff
    // (2.5 s at least), so when the second answer is seen there are not more than three.
    assert!(
        answers(&list) <= 3,
        "{} answers: a busy loop",
        answers(&list)
    );
    let polls = stack.ops.summary().await.unwrap()["polls"]
        .as_u64()
        .unwrap();
    assert!(polls <= 6, "{polls} long polls: a busy loop");
    drop(agent);
}
