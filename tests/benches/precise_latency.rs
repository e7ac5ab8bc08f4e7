//! How precisely the test bed's simulated delays end: `http::sleep_until_precise` (which
//! `felhom-pvesim --latency-ms`, `latency` faults and hubsim's `slow` use) against a plain
//! tokio sleep, and the time `--latency-ms N` really adds to a request.
//!
//! These are figures of an idle machine: on a loaded one every wake-up waits for a CPU,
//! for several milliseconds at times, so no test asserts them (the tests assert only
//! what load cannot break: a delay never ends early, and delays do not wait on each
//! other). Run this after changing how delays are slept:
//!
//! `cargo bench -p felhom-testbed --bench precise_latency` (release build)
//!
//! Prints, against the targets below, and exits 1 when one is missed:
//! 1. the median overshoot past the deadline of `sleep_until_precise` and, interleaved
//!    with it under the same conditions, of `tokio::time::sleep_until` (which rounds up
//!    to its 1 ms tick); target: precise below 0.4 ms;
//! 2. the median time `--latency-ms 2` and `--latency-ms 7` add to a request, measured by
//!    the simulator itself (`held_us` in its request log: arrival to answer ready)
//!    against a twin without latency, requests interleaved so that whatever else runs on
//!    the machine hits both alike; target: N − 0.2 ms < added < N + 0.4 ms.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use felhom_testbed::harness::PveSim;
use felhom_testbed::http::sleep_until_precise;

/// Median of `v` (sorted in place).
fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Part 1; true when the target is met.
async fn sleep_overshoot() -> bool {
    let mut precise = Vec::new();
    let mut coarse = Vec::new();
    for us in [300u64, 1200, 2000, 2500, 5000]
        .into_iter()
        .cycle()
        .take(200)
    {
        let deadline = Instant::now() + Duration::from_micros(us);
        sleep_until_precise(deadline).await;
        precise.push(Instant::now() - deadline);
        let deadline = Instant::now() + Duration::from_micros(us);
        tokio::time::sleep_until(deadline.into()).await;
        coarse.push(Instant::now().saturating_duration_since(deadline));
    }
    let (p, c) = (median(&mut precise), median(&mut coarse));
    let ok = p < Duration::from_micros(400);
    println!("sleep overshoot past the deadline, median of 200 (0.3 to 5 ms):");
    println!(
        "  sleep_until_precise:      {:.3} ms  (target < 0.4 ms){}",
        ms(p),
        if ok { "" } else { "  MISSED" }
    );
    println!("  tokio::time::sleep_until: {:.3} ms", ms(c));
    ok
}

/// Part 2; true when every target is met.
async fn simulator_latency() -> bool {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_felhom-pvesim"));
    let plain = PveSim::spawn(&bin, &["--guests", "2"]).expect("start felhom-pvesim");
    let mut all_ok = true;
    println!("time --latency-ms adds to a request (simulator's own measure), median of 150:");
    for latency_ms in [2u64, 7] {
        let slow = PveSim::spawn(
            &bin,
            &["--guests", "2", "--latency-ms", &latency_ms.to_string()],
        )
        .expect("start felhom-pvesim");
        for _ in 0..150 {
            for sim in [&plain, &slow] {
                let r = sim
                    .client()
                    .get(sim.api_url("/version"))
                    .header("Authorization", sim.auth_header())
                    .send()
                    .await
                    .expect("GET /version");
                assert_eq!(r.status().as_u16(), 200);
            }
        }
        let held = |log: Vec<felhom_testbed::harness::LoggedRequest>| {
            let mut v: Vec<Duration> = log
                .iter()
                .rev()
                .take(150)
                .map(|r| Duration::from_micros(r.held_us.expect("held_us")))
                .collect();
            median(&mut v)
        };
        let h_plain = held(plain.requests(0).await.expect("request log"));
        let h_slow = held(slow.requests(0).await.expect("request log"));
        let added = ms(h_slow) - ms(h_plain);
        let want = latency_ms as f64;
        let ok = added > want - 0.2 && added < want + 0.4;
        all_ok &= ok;
        println!(
            "  --latency-ms {latency_ms}: {added:.3} ms  (target {:.1} to {:.1} ms){}",
            want - 0.2,
            want + 0.4,
            if ok { "" } else { "  MISSED" }
        );
    }
    all_ok
}

fn main() {
    // the simulators' runtime shape
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let ok = runtime.block_on(async { sleep_overshoot().await & simulator_latency().await });
    if !ok {
        eprintln!("precise_latency: a target was missed (is the machine idle?)");
        std::process::exit(1);
    }
}
