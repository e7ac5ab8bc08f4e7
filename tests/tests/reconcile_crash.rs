//! Crash safety of the real daemon: `felhom-agent run` against `felhom-pvesim` is killed
//! with SIGKILL at random moments while it applies desired states that need many actions
//! (start, stop via shutdown, set-config of memory, swap, cores, cpulimit, onboot,
//! description, tags, hostname, nesting) on LXC and QEMU guests, and restarted until it
//! converges. The simulator's request log must then show every planned action sent
//! exactly once, and nothing else: no duplicate for an action interrupted in flight, no
//! change to the HA-managed, locked or template guests the desired state also names.
//!
//! The kill moments come from a seeded RNG; the seed is printed (set
//! `FELHOM_CRASH_SEED=N` to replay one).

mod proxmox_client_support;
mod reconcile_support;

use std::time::{Duration, Instant};

use proxmox_client_support::Sim;
use reconcile_support::*;
use serde_json::{Value, json};

/// Desired states applied one after another; each is killed `KILLS` times.
const GENERATIONS: u64 = 9;
const KILLS: usize = 6;

fn desired(generation: u64, guests: &[(u32, String, bool)]) -> Value {
    let list: Vec<Value> = guests
        .iter()
        .enumerate()
        .map(|(i, (vmid, kind, unprivileged))| {
            let n = generation + i as u64;
            let mut config = json!({
                "memory": 512 + 256 * (n % 3),
                "cores": 1 + n % 2,
                "onboot": generation.is_multiple_of(2),
                "description": format!("crash test generation {generation}\nguest {vmid}"),
                "tags": format!("Gen{generation},crash;{kind}"),
                "cpulimit": if n.is_multiple_of(2) { "1.5" } else { "0" },
            });
            if kind == "lxc" {
                config["swap"] = json!(256 * (1 + n % 2));
                config["hostname"] = json!(format!("ct{vmid}-g{generation}"));
                if *unprivileged {
                    config["nesting"] = json!(n % 2 == 1);
                }
            }
            let power = if n.is_multiple_of(2) {
                "running"
            } else {
                "stopped"
            };
            json!({"vmid": vmid, "power": power, "config": config})
        })
        .collect();
    json!({"generation": generation, "guests": list})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_converges_and_every_action_is_sent_once() {
    let seed = std::env::var("FELHOM_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    eprintln!("reconcile_crash: seed {seed} (FELHOM_CRASH_SEED={seed} replays it)");
    let mut rng = fastrand::Rng::with_seed(seed);
    let t0 = Instant::now();

    let sim = Sim::start(&["--task-seconds", "0.1", "--guests", "12"]);
    let home = Home::new(&sim, json!({}));
    let mut guests = plain_guests(&sim).await;
    assert!(
        guests.iter().any(|g| g.1 == "lxc") && guests.iter().any(|g| g.1 == "qemu"),
        "{guests:?}"
    );
    guests.sort();
    // The guests reconcile must leave alone, named with changes too.
    let all: Vec<u32> = sim.state_json().await["guests"]
        .as_array()
        .expect("guests")
        .iter()
        .map(|g| g["vmid"].as_u64().expect("vmid") as u32)
        .collect();
    let untouchable: Vec<(u32, String, bool)> = sim.state_json().await["guests"]
        .as_array()
        .expect("guests")
        .iter()
        .filter(|g| {
            !guests
                .iter()
                .any(|p| u64::from(p.0) == g["vmid"].as_u64().unwrap_or(0))
        })
        .map(|g| {
            (
                g["vmid"].as_u64().expect("vmid") as u32,
                g["type"].as_str().expect("type").to_string(),
                false,
            )
        })
        .collect();
    assert!(
        untouchable.len() >= 3,
        "HA, locked and template guests: {all:?}"
    );

    let mut kills = 0;
    for generation in 1..=GENERATIONS {
        let mut named = guests.clone();
        named.extend(untouchable.iter().cloned());
        home.write_desired(&desired(generation, &named));
        let expected = planned(&home.cli_json(&["plan"]));
        assert!(
            expected.len() >= guests.len(),
            "generation {generation} needs work on every guest: {expected:?}"
        );
        let since = last_seq(&sim).await;
        let log = home.log_path(&format!("daemon-gen{generation}.log"));
        for _ in 0..KILLS {
            let daemon = home.start_daemon(&log);
            let after = Duration::from_millis(rng.u64(20..700));
            tokio::time::sleep(after).await;
            daemon.kill9();
            kills += 1;
        }
        // The last incarnation runs until the desired state is applied, then dies too.
        let mut daemon = home.start_daemon(&log);
        let status = home.wait_status(&mut daemon, Duration::from_secs(60), |v| {
            let r = &v["reconcile"];
            r["applied_generation"] == json!(generation)
                && r["queue"]["queued"] == 0
                && r["queue"]["running"] == 0
        });
        assert_eq!(status["reconcile"]["safe_mode"], Value::Null);
        daemon.kill9();

        // Converged: nothing left to do, no journal entry left open.
        let plan = home.cli_json(&["plan"]);
        assert_eq!(planned(&plan), vec![], "generation {generation}: {plan:#}");
        let journal = home.cli_json(&["journal", "show"]);
        assert_eq!(journal["safe_mode"], Value::Null);
        let open: Vec<&Value> = journal["entries"]
            .as_array()
            .expect("entries")
            .iter()
            .filter(|e| e["outcome"].is_null())
            .collect();
        assert!(open.is_empty(), "open entries: {open:#?}");

        // Every planned action reached Proxmox exactly once, and nothing else did.
        let sent = mutations(&log_since(&sim, since).await);
        let mut got: Vec<(u32, String)> = sent.iter().map(|m| (m.vmid, m.op.clone())).collect();
        got.sort();
        assert_eq!(
            got,
            expected,
            "generation {generation} (seed {seed}): sent vs planned\n{sent:#?}\ndaemon log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        assert!(
            sent.iter().all(|m| m.status == Some(200)),
            "generation {generation}: {sent:#?}"
        );
        eprintln!(
            "generation {generation}: {} actions, each sent once, after {KILLS} kills ({:?} so far)",
            expected.len(),
            t0.elapsed()
        );
    }
    assert!(kills >= 50, "{kills} kills");
    eprintln!("{kills} kills in {:?}", t0.elapsed());
}
