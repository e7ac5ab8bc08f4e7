//! Envelope verification cost (issue 12). Prints figures and ratios against a baseline
//! measured in the same run:
//! - baseline: two raw `ed25519_dalek::VerifyingKey::verify_strict` calls over the PAE
//!   bytes of the envelope (keys, signatures and PAE prepared once, outside the timing);
//! - `verify_envelope`: the whole envelope from its JSON bytes (size cap, JSON, base64,
//!   PAE, both signatures under the hinted keys, the distinct-key count, SHA-256);
//! - `verify_op`: the same plus the payload parsed and checked against the agent's context.
//!
//! The envelope has 2 signatures with correct `keyid` hints, 2 trusted keys (threshold 2)
//! and a ~400-byte `snapshot` payload. Target: each ≤ 1.3× the baseline (the median of
//! the per-sample ratios); the bench exits 1 when a ratio is above it.
//!
//! The three are measured interleaved, sample by sample, so that load on the machine falls
//! on all of them alike. Run: `cargo bench -p felhom-authz --bench verify`.

use std::hint::black_box;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use felhom_authz::{
    AgentId, Context, OP_PAYLOAD_TYPE, PayloadType, Trust, encode_base64, pae, verify_envelope,
    verify_op,
};
use serde_json::json;

const TARGET: f64 = 1.3;
const SAMPLES: usize = 61;
const ITERS_PER_SAMPLE: u32 = 40;
const AGENT: &str = "0123456789abcdef0123456789abcdef";
const NOW: u64 = 1_800_000_000;

fn key(n: u8) -> SigningKey {
    SigningKey::from_bytes(&[n; 32])
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    v[v.len() / 2]
}

/// Time of one call, as the mean over `ITERS_PER_SAMPLE` calls.
fn sample(mut f: impl FnMut()) -> Duration {
    let t = Instant::now();
    for _ in 0..ITERS_PER_SAMPLE {
        f();
    }
    t.elapsed() / ITERS_PER_SAMPLE
}

fn main() -> ExitCode {
    let (alice, bob) = (key(1), key(2));
    let keys = json!({"keys": [
            {"name": "alice", "ed25519": encode_base64(alice.verifying_key().as_bytes())},
            {"name": "bob", "ed25519": encode_base64(bob.verifying_key().as_bytes())}],
        "threshold": {"reversible": 2, "irreversible": 2},
        "max_validity_seconds": 86400, "clock_skew_seconds": 120});
    let trust = Trust::from_json(keys.to_string().as_bytes()).expect("bench trust");
    let ctx = Context {
        agent_id: AgentId::new(AGENT).expect("bench agent id"),
        node: "pve1".into(),
        now: NOW,
        scratch_vmids: Some(900_000_000..=900_000_999),
    };
    let payload = json!({"v": 1, "op_id": "00112233445566778899aabbccddeeff",
        "agent_id": AGENT, "node": "pve1", "not_before": NOW - 300, "not_after": NOW + 3300,
        "op": "snapshot", "target": {"type": "lxc", "vmid": 101},
        "params": {"name": "before-upgrade-2026-12",
                   "description": "Before the distribution upgrade of the web front end"},
        "expect": null, "grant": "reversible",
        "reason": "OPS-1234: rollback point for the web front end upgrade"})
    .to_string();
    let body = payload.as_bytes();
    let message = pae(OP_PAYLOAD_TYPE, body);
    let (sig_a, sig_b) = (alice.sign(&message), bob.sign(&message));
    let envelope = json!({"payloadType": OP_PAYLOAD_TYPE, "payload": encode_base64(body),
        "signatures": [{"keyid": "alice", "sig": encode_base64(&sig_a.to_bytes())},
                       {"keyid": "bob", "sig": encode_base64(&sig_b.to_bytes())}]})
    .to_string()
    .into_bytes();
    let (vk_a, vk_b): (VerifyingKey, VerifyingKey) = (alice.verifying_key(), bob.verifying_key());
    let (sig_a, sig_b): (Signature, Signature) = (sig_a, sig_b);

    // Correctness before timing: both paths accept, with both signers counted.
    let v = verify_envelope(&envelope, PayloadType::Op, &trust).expect("bench envelope");
    assert_eq!(v.signers(), ["alice", "bob"]);
    verify_op(&envelope, &trust, &ctx).expect("bench op");

    let raw = || {
        black_box(vk_a.verify_strict(black_box(&message), black_box(&sig_a))).expect("raw a");
        black_box(vk_b.verify_strict(black_box(&message), black_box(&sig_b))).expect("raw b");
    };
    let env = || {
        black_box(verify_envelope(
            black_box(&envelope),
            PayloadType::Op,
            &trust,
        ))
        .expect("envelope");
    };
    let op = || {
        black_box(verify_op(black_box(&envelope), &trust, &ctx)).expect("op");
    };
    // Warm-up: caches, branch predictors, the CPU's clock.
    for _ in 0..3 {
        sample(raw);
        sample(env);
        sample(op);
    }
    let (mut t_raw, mut t_env, mut t_op) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..SAMPLES {
        t_raw.push(sample(raw));
        t_env.push(sample(env));
        t_op.push(sample(op));
    }
    // Each ratio is the median of the per-sample ratios (a sample against the baseline
    // sample taken just before it), so a load change during the run cancels out.
    let r_env = median_ratio(&t_env, &t_raw);
    let r_op = median_ratio(&t_op, &t_raw);
    let (m_raw, m_env, m_op) = (median(t_raw), median(t_env), median(t_op));
    println!(
        "envelope: {} bytes, payload {} bytes, 2 signatures (correct keyid hints), 2 trusted keys",
        envelope.len(),
        body.len()
    );
    println!(
        "medians over {SAMPLES} samples of {ITERS_PER_SAMPLE} calls (per call; ratio: median of the per-sample ratios):"
    );
    println!("  2 x verify_strict (baseline) {:>9.1} µs", micros(m_raw));
    println!(
        "  verify_envelope              {:>9.1} µs  ratio {r_env:.3}",
        micros(m_env)
    );
    println!(
        "  verify_op                    {:>9.1} µs  ratio {r_op:.3}",
        micros(m_op)
    );
    let mut ok = true;
    for (name, r) in [("verify_envelope", r_env), ("verify_op", r_op)] {
        if r > TARGET {
            println!("FAIL {name}: {r:.3}x the baseline, target <= {TARGET}x");
            ok = false;
        } else {
            println!("ok   {name}: {r:.3}x the baseline (target <= {TARGET}x)");
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn median_ratio(a: &[Duration], base: &[Duration]) -> f64 {
    let mut r: Vec<f64> = a
        .iter()
        .zip(base)
        .map(|(x, b)| x.as_secs_f64() / b.as_secs_f64())
        .collect();
    r.sort_unstable_by(f64::total_cmp);
    r[r.len() / 2]
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}
