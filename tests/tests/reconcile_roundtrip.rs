//! Zero drift through the simulator: the managed fields' values from real PVE configs
//! (`tests/fixtures/pve`), written through the real client to `felhom-pvesim` and read
//! back, plan to nothing; and the planner's own write of those values, read back, plans to
//! nothing as well. LXC takes every managed field, QEMU the ones it has. This is the
//! end-to-end version of the in-crate model test (`reconcile::testmodel`).

mod proxmox_client_support;

use felhom_agent::proxmox::{Client, ConfigChange, ConfigValue, GuestKind, SetConfigOutcome};
use felhom_agent::reconcile::desired::DesiredState;
use felhom_agent::reconcile::exec::config_change;
use felhom_agent::reconcile::plan::{ActualGuest, Op, Plan, plan};
use felhom_agent::reconcile::pve::Pve;
use felhom_agent::reconcile::{Queue, QueueConfig};
use felhom_protocol::Vmid;
use proxmox_client_support::Sim;
use serde_json::{Map, Value, json};

const FIXTURES: [&str; 2] = [
    "pve7-lxc-config.json",
    "synthesized/pve8-lxc-config-typical.json",
];

const LXC_KEYS: [&str; 8] = [
    "memory",
    "swap",
    "cores",
    "cpulimit",
    "onboot",
    "description",
    "tags",
    "hostname",
];
const QEMU_KEYS: [&str; 6] = [
    "memory",
    "cores",
    "cpulimit",
    "onboot",
    "description",
    "tags",
];

fn fixture(name: &str) -> Map<String, Value> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/pve")
        .join(name);
    let v: Value = serde_json::from_slice(&std::fs::read(&path).expect("fixture")).expect("json");
    v["data"].as_object().expect("config object").clone()
}

/// The managed fields of a fixture config for `kind`, in the form PVE returned them, as
/// the desired state's `config` (nesting from `features`).
fn managed(cfg: &Map<String, Value>, kind: GuestKind) -> Map<String, Value> {
    let keys: &[&str] = match kind {
        GuestKind::Lxc => &LXC_KEYS,
        GuestKind::Qemu => &QEMU_KEYS,
    };
    let mut out: Map<String, Value> = keys
        .iter()
        .filter_map(|k| cfg.get(*k).map(|v| (k.to_string(), v.clone())))
        .collect();
    if kind == GuestKind::Lxc
        && let Some(f) = cfg.get("features").and_then(Value::as_str)
    {
        out.insert(
            "nesting".into(),
            json!(f.split(',').any(|i| i == "nesting=1")),
        );
    }
    out
}

/// `features` without its nesting item (what the guest has before nesting is written).
fn without_nesting(features: &str) -> String {
    features
        .split(',')
        .filter(|i| !i.starts_with("nesting="))
        .collect::<Vec<_>>()
        .join(",")
}

fn desired(vmid: u64, config: &Map<String, Value>) -> DesiredState {
    let doc = json!({"generation": 1, "guests": [{"vmid": vmid, "config": config}]});
    DesiredState::from_json(&serde_json::to_vec(&doc).expect("json")).expect("valid desired state")
}

async fn write(client: &Client, q: &Queue, kind: GuestKind, vmid: Vmid, change: ConfigChange) {
    let c = client.clone();
    let outcome = q
        .submit(vmid, "roundtrip", move |permit| {
            Box::pin(async move { c.set_config(permit, kind, &change).await })
        })
        .expect("queued")
        .await
        .expect("ran")
        .expect("PVE took the write");
    if let SetConfigOutcome::Task(upid) = outcome {
        client
            .wait_task(
                &upid,
                felhom_agent::proxmox::WaitOptions::with_timeout(std::time::Duration::from_secs(
                    30,
                )),
            )
            .await
            .expect("config task");
    }
}

async fn read(client: &Client, kind: GuestKind, vmid: Vmid) -> ActualGuest {
    Pve::guest(client, kind, vmid).await.expect("read back")
}

fn assert_no_drift(p: &Plan, what: &str, actual: &ActualGuest) {
    assert!(
        p.actions.is_empty() && p.problems.is_empty() && p.skipped.is_empty(),
        "{what}: drift after the round trip: {p:#?}\nread back: {:#?}",
        actual.config
    );
}

/// Puts the guest's `features` where the fixture's are, minus nesting, through the
/// simulator's control API (a token may not change any other flag).
async fn prepare_features(sim: &Sim, vmid: u64, cfg: &Map<String, Value>) {
    let f = cfg
        .get("features")
        .and_then(Value::as_str)
        .map(without_nesting);
    sim.put_guest(
        vmid,
        json!({"config": {"features": f.filter(|s| !s.is_empty())}}),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixture_values_round_trip_through_the_simulator_without_drift() {
    let sim = Sim::start(&["--guests", "12", "--task-seconds", "0.05"]);
    let client = Client::new(&sim.pinned(), &sim.start.node).expect("client");
    let q = Queue::start(QueueConfig::default());
    let lxc = sim.plain_guest("lxc", "stopped").await;
    let qemu = sim.plain_guest("qemu", "stopped").await;
    for name in FIXTURES {
        let cfg = fixture(name);
        for (vmid, kind) in [(lxc, GuestKind::Lxc), (qemu, GuestKind::Qemu)] {
            let v = Vmid::new(vmid).expect("vmid");
            let want = managed(&cfg, kind);
            assert!(want.len() >= 4, "{name}: {want:?}");
            let desired = desired(vmid, &want);

            // 1. The values exactly as PVE returned them, written raw.
            if kind == GuestKind::Lxc {
                prepare_features(&sim, vmid, &cfg).await;
            }
            let mut change = ConfigChange::new();
            for (k, val) in &want {
                let (key, value) = match (k.as_str(), val) {
                    ("nesting", _) => (
                        "features".to_string(),
                        ConfigValue::Str(cfg["features"].as_str().expect("features").into()),
                    ),
                    (_, Value::Number(n)) => {
                        (k.clone(), ConfigValue::Int(n.as_i64().expect("int")))
                    }
                    (_, Value::String(s)) => (k.clone(), ConfigValue::Str(s.clone())),
                    (_, other) => panic!("{name}: {k} = {other}"),
                };
                change = change.set(key, value);
            }
            write(&client, &q, kind, v, change).await;
            let actual = read(&client, kind, v).await;
            assert_no_drift(
                &plan(&desired, std::slice::from_ref(&actual)),
                &format!("{name} raw on {kind} {vmid}"),
                &actual,
            );

            // 2. From other values, the planner's own write (only what differs).
            let mut reset = ConfigChange::new()
                .set("memory", ConfigValue::Int(640))
                .set("cores", ConfigValue::Int(3))
                .set("onboot", ConfigValue::Int(0))
                .set(
                    "description",
                    ConfigValue::Str("something else\r\nentirely".into()),
                )
                .set("tags", ConfigValue::Str("Other".into()))
                .delete("cpulimit");
            if kind == GuestKind::Lxc {
                reset = reset
                    .set("swap", ConfigValue::Int(128))
                    .set("hostname", ConfigValue::Str("elsewhere".into()));
                prepare_features(&sim, vmid, &cfg).await;
            }
            write(&client, &q, kind, v, reset).await;
            let before = read(&client, kind, v).await;
            let p = plan(&desired, std::slice::from_ref(&before));
            let [action] = p.actions.as_slice() else {
                panic!("{name} on {kind} {vmid}: one set-config expected: {p:#?}");
            };
            let Op::SetConfig { params, fields, .. } = &action.op else {
                panic!("{action:?}");
            };
            assert!(fields.len() >= 3, "{name}: {fields:?}");
            // based on the digest of the read it was planned from, as the engine sends it
            let digest = action.basis.digest.as_deref().expect("PVE sends a digest");
            write(&client, &q, kind, v, config_change(params, digest)).await;
            let after = read(&client, kind, v).await;
            assert_no_drift(
                &plan(&desired, std::slice::from_ref(&after)),
                &format!("{name} planned write on {kind} {vmid}"),
                &after,
            );
            // and every other features flag of the guest is as it was
            if kind == GuestKind::Lxc
                && let Some(f) = cfg.get("features").and_then(Value::as_str)
            {
                let mut got: Vec<&str> = after.config["features"]
                    .as_str()
                    .expect("features")
                    .split(',')
                    .collect();
                let mut expect: Vec<&str> = f.split(',').collect();
                got.sort();
                expect.sort();
                assert_eq!(got, expect, "{name}");
            }
        }
    }
    q.shutdown(std::time::Duration::from_secs(5)).await;
}
