//! The signed operations the devstack shows while the stack runs (as root): a throw-away
//! operator key is the only one `signers.json` trusts; three envelopes go through the hub
//! (`felhom-hubsim`'s `/_sim/ops`) one after the other, and each decision the agent sends
//! back is told as the hub receives it:
//! 1. a `stop` of a guest the desired state does not manage, signed by that key: held,
//!    then applied, with the task's UPID (the node's requests appear beside it);
//! 2. a `snapshot` of another such guest, signed by that key: applied;
//! 3. a forged `stop` signed by a key the host does not trust: refused with its reason,
//!    and the node's request log shows that nothing reached the guest.
//!
//! Owns: choosing the guests, making and enqueueing the envelopes, and reading the hub's
//! results. Must never: print a private key (only key names are told), or change a
//! component's state other than by enqueueing at the hub.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::sync::mpsc::UnboundedSender;

use super::watch::{Event, SimApi};
use crate::hubsim::control::OpsControl;
use crate::signing::{Envelope, Payload, TestKey};

/// How long one operation may take from enqueue to its final decision.
const OP_DEADLINE: Duration = Duration::from_secs(90);

/// What the demonstration needs.
#[derive(Debug)]
pub struct Demo {
    pub ops: OpsControl,
    pub pve: SimApi,
    /// The operator key `signers.json` trusts.
    pub key: TestKey,
    pub agent_id: String,
    pub node: String,
    /// Guests the desired state names (a signed `stop` of one would be refused
    /// `conflicts_with_desired`).
    pub managed: Vec<u64>,
}

fn say(tx: &UnboundedSender<Event>, text: String) {
    let _ = tx.send(Event::Line { who: "ops", text });
}

/// A guest the operations may use: not a template, not locked, not HA-managed, not
/// managed by the desired state, its disk on a storage with snapshots.
fn usable(g: &Value, managed: &[u64]) -> bool {
    let disk = g["config"]["rootfs"]
        .as_str()
        .or_else(|| g["config"]["scsi0"].as_str())
        .unwrap_or("");
    g["template"] != json!(true)
        && g["lock"].is_null()
        && g["ha_managed"] != json!(true)
        && g["vmid"].as_u64().is_some_and(|v| !managed.contains(&v))
        && !disk.starts_with("local:")
}

/// `(type, vmid)` of three distinct running guests the operations may use, LXC first.
fn pick(state: &Value, managed: &[u64]) -> Option<[(String, u64); 3]> {
    let mut running: Vec<(String, u64)> = state["guests"]
        .as_array()?
        .iter()
        .filter(|g| g["status"] == "running" && usable(g, managed))
        .filter_map(|g| Some((g["type"].as_str()?.to_string(), g["vmid"].as_u64()?)))
        .collect();
    running.sort_by_key(|(t, v)| (t != "lxc", *v));
    match running.as_slice() {
        [a, b, c, ..] => Some([a.clone(), b.clone(), c.clone()]),
        _ => None,
    }
}

impl Demo {
    fn payload(&self, kind: &str, guest: &(String, u64)) -> Payload {
        Payload::guest_op(&self.agent_id, &self.node, kind, &guest.0, guest.1 as u32).valid_for(900)
    }

    /// Enqueues `env` and tells every result naming its delivery until the final one,
    /// which it returns.
    async fn deliver(
        &self,
        tx: &UnboundedSender<Event>,
        label: &str,
        env: &Envelope,
    ) -> Result<Value, String> {
        let delivery = self
            .ops
            .enqueue_text(&env.text())
            .await
            .map_err(|e| format!("{label}: enqueueing at the hub: {e}"))?;
        say(
            tx,
            format!("{label}: enqueued at the hub (delivery {delivery})"),
        );
        let deadline = Instant::now() + OP_DEADLINE;
        let mut since = 0u64;
        loop {
            let list = self
                .ops
                .result_list(since)
                .await
                .map_err(|e| format!("{label}: reading the hub's results: {e}"))?;
            for entry in &list {
                since = since.max(entry["index"].as_u64().unwrap_or(0));
                let r = &entry["result"];
                if r["delivery_id"].as_str() != Some(delivery.as_str()) {
                    continue;
                }
                let state = r["state"].as_str().unwrap_or("?");
                let signers: Vec<&str> = r["signers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                let upids: Vec<&str> = r["upids"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                let text = match state {
                    "held" => format!("held (counted signers: {})", signers.join(", ")),
                    "applied" => format!("applied, {}", upids.join(" ")),
                    "refused" => format!(
                        "refused {}: {}",
                        r["reason"].as_str().unwrap_or("?"),
                        r["message"].as_str().unwrap_or("")
                    ),
                    other => format!("{other}: {}", r["message"].as_str().unwrap_or("")),
                };
                say(tx, format!("{label}: {text}"));
                if state != "held" {
                    return Ok(r.clone());
                }
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{label}: no final decision reached the hub within {} s",
                    OP_DEADLINE.as_secs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn show(&self, tx: &UnboundedSender<Event>) -> Result<(), String> {
        let state = self
            .pve
            .get("/_sim/state")
            .await
            .ok_or("cannot read the simulated node's state")?;
        let [stop, snap, forged] = pick(&state, &self.managed).ok_or(
            "the simulated node has fewer than three running guests outside the desired state",
        )?;

        // 1. a signed stop of an unmanaged guest
        let label = format!("signed stop {} {}", stop.0, stop.1);
        let env = self
            .payload("stop", &stop)
            .params(json!({"timeout_seconds": 5}))
            .reason("devstack: a signed stop")
            .sign(&[&self.key]);
        let r = self.deliver(tx, &label, &env).await?;
        if r["state"] != "applied" {
            return Err(format!("{label} was not applied: {r}"));
        }

        // 2. a signed snapshot
        let label = format!("signed snapshot {} {} \"devstack\"", snap.0, snap.1);
        let env = self
            .payload("snapshot", &snap)
            .params(json!({"name": "devstack", "description": "taken by felhom-devstack"}))
            .reason("devstack: a signed snapshot")
            .sign(&[&self.key]);
        let r = self.deliver(tx, &label, &env).await?;
        if r["state"] != "applied" {
            return Err(format!("{label} was not applied: {r}"));
        }

        // 3. forged: signed by a key this host does not trust
        let mallory = TestKey::generate("mallory").map_err(|e| e.to_string())?;
        let label = format!(
            "forged stop {} {} (signed by mallory, a key this host does not trust)",
            forged.0, forged.1
        );
        let env = self
            .payload("stop", &forged)
            .reason("devstack: forged")
            .sign(&[&mallory]);
        let r = self.deliver(tx, &label, &env).await?;
        if r["state"] != "refused" {
            return Err(format!("{label} was not refused: {r}"));
        }
        let guest_path = format!("/nodes/{}/{}/{}/", self.node, forged.0, forged.1);
        let touched = self
            .pve
            .get("/_sim/requests?since=0")
            .await
            .ok_or("cannot read the simulated node's request log")?["requests"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|q| q["method"] != "GET")
            .any(|q| q["path"].as_str().is_some_and(|p| p.contains(&guest_path)));
        if touched {
            return Err(format!("{label}: a request reached the guest"));
        }
        let g = self
            .pve
            .get(&format!("/_sim/guests/{}", forged.1))
            .await
            .ok_or("cannot read the forged operation's guest")?;
        if g["status"] != "running" {
            return Err(format!("{label}: the guest is {}", g["status"]));
        }
        say(
            tx,
            format!(
                "{} {}: the node received no request for it; the guest still runs",
                forged.0, forged.1
            ),
        );
        Ok(())
    }

    /// Runs the three operations, then sends [`Event::SignedDone`].
    pub async fn run(self, tx: UnboundedSender<Event>) {
        let error = self.show(&tx).await.err();
        let _ = tx.send(Event::SignedDone { error });
    }
}
