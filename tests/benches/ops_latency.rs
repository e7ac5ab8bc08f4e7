//! Hub-to-Proxmox latency of a signed `start` (issue 12: "an operation queued at the hub
//! reaches Proxmox within about a second, not a poll interval").
//!
//! Real processes on loopback: `felhom-pvesim`, `felhom-hubsim` (answering no poll
//! interval, so the agent reports on its default 300 s) and `felhom-agent run` as uid
//! 65534 with a root-owned `signers.json` (needs root; prints SKIP otherwise). Twenty
//! times: a stopped guest is picked, a `start` signed by a trusted key is enqueued at the
//! hub, and the time from the hub's enqueue (`enqueued_at` of the delivery) to the
//! simulated node's receipt of `POST …/status/start` for that guest (`received_unix_us`
//! in its request log) is taken; both are wall-clock stamps of the same machine. One
//! operation before them is not counted (the agent's start). Operations follow each
//! other with a pause of 200 ms after the previous one's final result, as an operator's
//! do, not back to back.
//!
//! `cargo bench -p felhom-testbed --bench ops_latency` (release build)
//!
//! Prints median, p90 and max with the split at the hub's first hand-out (long poll
//! answered), and exits 1 when the median is above 1 s.

use std::process::ExitCode;
use std::time::Duration;

use felhom_testbed::build;
use felhom_testbed::harness::PveSim;
use felhom_testbed::opsbed::{self, AgentHost, HubProc};
use felhom_testbed::signing::{Payload, SignersFile, TestKey, random_agent_id};
use serde_json::{Value, json};

const OPS: usize = 20;
const TARGET: Duration = Duration::from_secs(1);

/// One measured operation.
struct Sample {
    vmid: u64,
    /// enqueue → the long poll's answer carried it.
    to_handout: Duration,
    /// enqueue → `POST …/status/start` at the node.
    total: Duration,
}

fn rfc3339_us(s: &str) -> Option<i128> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    Some(t.unix_timestamp_nanos() / 1000)
}

fn span(from_us: i128, to_us: i128) -> Duration {
    Duration::from_micros(u64::try_from(to_us - from_us).unwrap_or(0))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Nearest-rank percentile of sorted `v`.
fn pct(v: &[Duration], p: usize) -> Duration {
    let rank = (p * v.len()).div_ceil(100).max(1);
    v[rank - 1]
}

/// Guests a `start` may run on: not a template, not locked, not HA-managed.
fn plain_guests(state: &Value) -> Vec<(String, u64)> {
    state["guests"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|g| {
            g["template"] != json!(true) && g["lock"].is_null() && g["ha_managed"] != json!(true)
        })
        .filter_map(|g| Some((g["type"].as_str()?.to_string(), g["vmid"].as_u64()?)))
        .collect()
}

struct Bed {
    pve: PveSim,
    hub: HubProc,
    key: TestKey,
    agent_id: String,
}

impl Bed {
    /// Enqueues a signed start of `vmid`, waits for its final result (applied) and
    /// measures it from the hub's and the node's logs.
    async fn start_one(&self, guest_type: &str, vmid: u64) -> Result<Sample, String> {
        let g = self
            .pve
            .guest(vmid as u32)
            .await
            .map_err(|e| e.to_string())?;
        if g["status"] != "stopped" {
            self.pve
                .set_guest(vmid as u32, json!({"status": "stopped"}))
                .await
                .map_err(|e| e.to_string())?;
        }
        let since = self
            .pve
            .requests(0)
            .await
            .map_err(|e| e.to_string())?
            .last()
            .map_or(0, |r| r.seq);
        let payload = Payload::guest_op(
            &self.agent_id,
            self.pve.node(),
            "start",
            guest_type,
            vmid as u32,
        )
        .valid_for(600)
        .reason("ops_latency bench");
        let op_id: String = payload
            .get("op_id")
            .and_then(|t| serde_json::from_str(t).ok())
            .ok_or("payload without op_id")?;
        let envelope = payload.sign(&[&self.key]);
        let delivery = self
            .hub
            .ops
            .enqueue_text(&envelope.text())
            .await
            .map_err(|e| e.to_string())?;
        let id = op_id.clone();
        let results = self
            .hub
            .ops
            .wait_results(Duration::from_secs(120), move |list| {
                list.iter().any(|r| {
                    r["result"]["op_id"].as_str() == Some(id.as_str())
                        && r["result"]["state"] != "held"
                })
            })
            .await
            .map_err(|e| e.to_string())?;
        let fin = results
            .iter()
            .map(|r| &r["result"])
            .find(|r| r["op_id"].as_str() == Some(op_id.as_str()) && r["state"] != "held")
            .cloned()
            .unwrap_or_default();
        if fin["state"] != "applied" {
            return Err(format!("start of {vmid} was not applied: {fin}"));
        }
        let deliveries = self.hub.ops.deliveries().await.map_err(|e| e.to_string())?;
        let d = deliveries["deliveries"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|d| d["delivery_id"].as_str() == Some(delivery.as_str()))
            .ok_or_else(|| format!("hubsim does not list delivery {delivery}"))?;
        let enqueued = d["enqueued_at"]
            .as_str()
            .and_then(rfc3339_us)
            .ok_or_else(|| format!("delivery without enqueued_at: {d}"))?;
        let handed = d["first_handed_out_at"]
            .as_str()
            .and_then(rfc3339_us)
            .ok_or_else(|| format!("delivery never handed out: {d}"))?;
        let suffix = format!("/{guest_type}/{vmid}/status/start");
        let requests = self.pve.requests(since).await.map_err(|e| e.to_string())?;
        let post = requests
            .iter()
            .find(|r| r.method == "POST" && r.path.ends_with(&suffix))
            .ok_or_else(|| format!("no POST …{suffix} reached the node"))?;
        let received = i128::from(
            post.received_unix_us
                .ok_or("the node's request log has no received_unix_us")?,
        );
        Ok(Sample {
            vmid,
            to_handout: span(enqueued, handed),
            total: span(enqueued, received),
        })
    }
}

async fn bench() -> Result<bool, String> {
    let pvesim = build::bin_for_tests(build::PVESIM);
    let hubsim = build::bin_for_tests(build::HUBSIM);
    let agent = build::bin_for_tests(build::AGENT);
    let pve = PveSim::spawn(&pvesim, &["--guests", "40"]).map_err(|e| e.to_string())?;
    // no --poll-interval: the control envelope names none, the agent keeps its 300 s
    let hub = HubProc::spawn(&hubsim, &[]).map_err(|e| e.to_string())?;
    let key = TestKey::generate("bench-operator").map_err(|e| e.to_string())?;
    let agent_id = random_agent_id();
    let host = AgentHost::new(
        &pve,
        &hub,
        &agent_id,
        &SignersFile::new(&[&key]),
        &json!({}),
    )
    .map_err(|e| e.to_string())?;
    let agent = host.start(&agent).map_err(|e| e.to_string())?;
    let bed = Bed {
        pve,
        hub,
        key,
        agent_id,
    };
    let state = bed.pve.state().await.map_err(|e| e.to_string())?;
    let guests = plain_guests(&state);
    if guests.is_empty() {
        return Err("no plain guest in the simulator".into());
    }
    let fail = |e: String| {
        format!(
            "{e}\nagent log {}:\n{}",
            agent.log.display(),
            agent.log_text()
        )
    };
    // the agent's start (first report, first long poll): not counted
    let (t, v) = &guests[0];
    let warm = bed.start_one(t, *v).await.map_err(fail)?;
    println!(
        "warm-up start of {} (the agent had just started): {:.1} ms",
        warm.vmid,
        ms(warm.total)
    );
    let mut samples = Vec::new();
    for (t, v) in guests.iter().cycle().skip(1).take(OPS) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        samples.push(bed.start_one(t, *v).await.map_err(fail)?);
    }
    drop(agent);
    let mut total: Vec<Duration> = samples.iter().map(|s| s.total).collect();
    let mut handout: Vec<Duration> = samples.iter().map(|s| s.to_handout).collect();
    let mut rest: Vec<Duration> = samples
        .iter()
        .map(|s| s.total.saturating_sub(s.to_handout))
        .collect();
    for v in [&mut total, &mut handout, &mut rest] {
        v.sort();
    }
    let median = pct(&total, 50);
    let ok = median <= TARGET;
    println!(
        "signed start, hub enqueue → POST …/status/start at the node, {OPS} operations, report interval 300 s (default):"
    );
    for (what, v) in [
        ("enqueue → node (total)", &total),
        ("  enqueue → long poll answered", &handout),
        ("  answered → node (verify, record, request)", &rest),
    ] {
        println!(
            "  {what:<44} median {:8.1} ms  p90 {:8.1} ms  max {:8.1} ms",
            ms(pct(v, 50)),
            ms(pct(v, 90)),
            ms(v[v.len() - 1])
        );
    }
    println!(
        "  median / target: {:.3} (target: median ≤ {} ms){}",
        median.as_secs_f64() / TARGET.as_secs_f64(),
        TARGET.as_millis(),
        if ok { "" } else { "  MISSED" }
    );
    Ok(ok)
}

fn main() -> ExitCode {
    if let Err(why) = opsbed::needs_root() {
        println!("SKIP ops_latency: {why}");
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ops_latency: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(bench()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("ops_latency: {e}");
            ExitCode::from(1)
        }
    }
}
