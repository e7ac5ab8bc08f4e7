//! The hub side of signed operations: fetching envelopes, sending decisions.
//!
//! Owns three loops of the daemon:
//! - **the long poll**: while operations are on, one `GET /api/agent/v1/ops?wait=25` is
//!   always outstanding; each delivery goes to [`OpsService::receive`]. Errors back off as
//!   the report loop does. A 404 means the hub has no channel: then, and while operations
//!   are off, the agent fetches once per control envelope that says `has_signed_ops`
//!   (answering each delivery `ops_disabled` when off), and goes back to long polling as
//!   soon as such a fetch succeeds with operations on. An answer with nothing but
//!   deliveries already answered (a hub that never drops them, or whose ids are unusable)
//!   is followed by the error backoff, not by the next poll at once.
//! - **the results sender**: every decision not yet accepted is POSTed to
//!   `/api/agent/v1/ops/result` in `seq` order, retried with backoff until the hub accepts
//!   it (the report carries the same ones meanwhile).
//! - **desired state from the hub** (`reconcile.desired_source: hub`): when a control
//!   envelope's `desired_generation` is above the applied one, `GET /api/agent/v1/desired`
//!   and hand it to [`HubDesired::offer`]; each decision is sent as a result.
//!
//! Must never: trust anything it fetched (verification is the service's), treat a
//! `delivery_id` as anything but bookkeeping, or busy-loop against a failing hub.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::desired::HubDesired;
use super::service::{OpsService, unix_now};
use super::wire::{LONG_POLL_WAIT_SECONDS, OpResult};
use super::{AgentId, TrustState};
use crate::config::Config;
use crate::hub::client::{HubClient, HubClientError};
use crate::hub::envelope::{DEFAULT_POLL_INTERVAL, SavedEnvelope};
use crate::hub::heartbeat::backoff;
use crate::hub::service::reporter_for;

/// The running loops.
#[derive(Debug)]
pub struct Channel {
    client: watch::Sender<Option<Arc<HubClient>>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// What the loops need.
pub struct ChannelDeps {
    pub ops: Arc<OpsService>,
    pub envelopes: watch::Receiver<Option<SavedEnvelope>>,
    pub trust: watch::Receiver<TrustState>,
    /// Set when `reconcile.desired_source` is `hub`.
    pub desired: Option<Arc<HubDesired>>,
    pub agent_id: AgentId,
    pub node: String,
    pub shutdown: watch::Receiver<bool>,
}

impl std::fmt::Debug for ChannelDeps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelDeps").finish_non_exhaustive()
    }
}

fn client_for(cfg: &Config) -> Option<Arc<HubClient>> {
    match reporter_for(cfg) {
        Ok(c) => c.map(Arc::new),
        Err(e) => {
            tracing::error!(error = %e, "signed operations: no hub client");
            None
        }
    }
}

impl Channel {
    pub fn start(cfg: &Config, deps: ChannelDeps) -> Channel {
        let (client, client_rx) = watch::channel(client_for(cfg));
        let tasks = vec![
            tokio::spawn(poll_loop(
                deps.ops.clone(),
                client_rx.clone(),
                deps.envelopes.clone(),
                deps.trust.clone(),
                deps.shutdown.clone(),
            )),
            tokio::spawn(results_loop(
                deps.ops.clone(),
                client_rx.clone(),
                deps.shutdown.clone(),
            )),
        ];
        let mut tasks = tasks;
        if let Some(d) = deps.desired {
            tasks.push(tokio::spawn(desired_loop(
                deps.ops,
                d,
                client_rx,
                deps.envelopes,
                deps.trust,
                deps.agent_id,
                deps.node,
                deps.shutdown,
            )));
        }
        Channel {
            client,
            tasks: Mutex::new(tasks),
        }
    }

    /// A reloaded configuration's hub client (SIGHUP): the loops restart their request.
    pub fn reload(&self, cfg: &Config) {
        self.client.send_replace(client_for(cfg));
    }

    pub fn stop(&self) {
        for t in self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            t.abort();
        }
    }
}

/// Sleeps `d`, cut short by shutdown (true) or a change of `client` (false).
async fn pause(
    d: Duration,
    client: &mut watch::Receiver<Option<Arc<HubClient>>>,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = client.changed() => false,
        _ = shutdown.wait_for(|s| *s) => true,
    }
}

/// Delivery ids remembered to notice a hub handing out again what it has answers for.
const SEEN_DELIVERIES: usize = 4096;

/// The delivery ids this process answered lately (bounded, oldest forgotten first).
#[derive(Debug, Default)]
struct Seen {
    order: VecDeque<String>,
    set: HashSet<String>,
}

impl Seen {
    /// Remembers `id`; true when it was not remembered yet.
    fn insert(&mut self, id: &str) -> bool {
        if self.set.contains(id) {
            return false;
        }
        if self.order.len() >= SEEN_DELIVERIES
            && let Some(old) = self.order.pop_front()
        {
            self.set.remove(&old);
        }
        self.order.push_back(id.to_string());
        self.set.insert(id.to_string());
        true
    }
}

/// Hands each delivery to the service; then waits (briefly) until their answers reached
/// the hub, which drops a delivery only then. True when the answer brought a delivery not
/// answered before: a hub that hands out only deliveries it already has answers for (it
/// never drops them, or their ids are unusable so no answer can name them) would
/// otherwise be asked again at once, in a busy loop.
async fn deliver(
    ops: &Arc<OpsService>,
    answer: super::wire::OpsAnswer,
    enabled: bool,
    seen: &mut Seen,
) -> bool {
    let mut last_seq = 0;
    let mut fresh = false;
    for d in answer.ops {
        let delivery_id = d.delivery_id();
        fresh |= delivery_id.as_deref().is_some_and(|id| seen.insert(id));
        let raw = d.envelope.get().as_bytes().to_vec();
        let r = if enabled {
            ops.receive_async(raw, delivery_id.clone())
                .await
                .map(|r| r.seq)
        } else {
            let o = ops.clone();
            tokio::task::spawn_blocking(move || o.refuse_disabled(&raw, delivery_id))
                .await
                .unwrap_or_else(|e| Err(super::service::OpsError::Blocking(e.to_string())))
        };
        match r {
            Ok(seq) => last_seq = last_seq.max(seq),
            Err(e) => {
                tracing::error!(error = %e, "a delivery could not be recorded; the hub will deliver it again")
            }
        }
    }
    if last_seq > 0 {
        ops.wait_sent(last_seq, Duration::from_secs(5)).await;
    }
    fresh
}

async fn poll_loop(
    ops: Arc<OpsService>,
    mut client: watch::Receiver<Option<Arc<HubClient>>>,
    mut envelopes: watch::Receiver<Option<SavedEnvelope>>,
    mut trust: watch::Receiver<TrustState>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut failures = 0u32;
    let mut seen = Seen::default();
    // False after a 404: the hub has no long-poll channel.
    let mut channel = true;
    loop {
        if *shutdown.borrow() {
            return;
        }
        let Some(c) = client.borrow_and_update().clone() else {
            tokio::select! {
                r = client.changed() => if r.is_err() { return },
                _ = shutdown.wait_for(|s| *s) => return,
            }
            continue;
        };
        let enabled = trust.borrow_and_update().is_enabled();
        if enabled && channel {
            let wait = Duration::from_secs(LONG_POLL_WAIT_SECONDS);
            let fetched = tokio::select! {
                r = c.fetch_ops(wait) => r,
                _ = client.changed() => continue,
                _ = trust.changed() => continue,
                _ = shutdown.wait_for(|s| *s) => return,
            };
            match fetched {
                Ok(Some(answer)) => {
                    let empty = answer.ops.is_empty();
                    if empty || deliver(&ops, answer, true, &mut seen).await {
                        failures = 0;
                    } else {
                        failures = failures.saturating_add(1);
                        let d = backoff(failures, DEFAULT_POLL_INTERVAL);
                        tracing::warn!(
                            consecutive = failures,
                            retry_in_ms = d.as_millis() as u64,
                            "signed operations: the hub handed out only deliveries it already has answers for"
                        );
                        if pause(d, &mut client, &mut shutdown).await {
                            return;
                        }
                    }
                }
                Ok(None) => {
                    tracing::info!(
                        "the hub has no signed-operations channel (404): fetching only when its envelope says has_signed_ops"
                    );
                    channel = false;
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let d = backoff(failures, DEFAULT_POLL_INTERVAL);
                    tracing::warn!(error = %e, consecutive_failures = failures,
                        retry_in_ms = d.as_millis() as u64, "signed operations: long poll failed");
                    if pause(d, &mut client, &mut shutdown).await {
                        return;
                    }
                }
            }
            continue;
        }
        // Off, or no channel: one fetch per envelope that says has_signed_ops.
        tokio::select! {
            r = envelopes.changed() => if r.is_err() { return },
            _ = client.changed() => continue,
            _ = trust.changed() => continue,
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let has = envelopes
            .borrow_and_update()
            .as_ref()
            .is_some_and(|s| s.envelope.has_signed_ops);
        if !has {
            continue;
        }
        match c.fetch_ops(Duration::ZERO).await {
            Ok(Some(answer)) => {
                if enabled {
                    channel = true;
                }
                deliver(&ops, answer, enabled, &mut seen).await;
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "signed operations: fetch failed"),
        }
    }
}

async fn results_loop(
    ops: Arc<OpsService>,
    mut client: watch::Receiver<Option<Arc<HubClient>>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let notify = ops.results_notify();
    let mut failures = 0u32;
    // Results the hub refused as malformed (a 4xx that retrying cannot fix): tried again
    // only after a while, so one cannot hold up the others. They stay in the report.
    let mut refused: std::collections::HashMap<u64, tokio::time::Instant> = Default::default();
    loop {
        if *shutdown.borrow() {
            return;
        }
        // Registered before reading, so a result added meanwhile wakes the wait below.
        let woken = notify.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        let j = ops.journal().clone();
        let pending = tokio::task::spawn_blocking(move || j.results_pending(50))
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        let now = tokio::time::Instant::now();
        refused.retain(|_, until| *until > now);
        let pending: Vec<_> = pending
            .into_iter()
            .filter(|r| !refused.contains_key(&r.seq))
            .collect();
        let c = client.borrow_and_update().clone();
        if pending.is_empty() || c.is_none() {
            let next = refused.values().min().copied();
            let retry = async {
                match next {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = &mut woken => {}
                _ = retry => {}
                _ = client.changed() => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
            continue;
        }
        let Some(c) = c else { continue };
        for row in pending {
            let result: OpResult = match serde_json::from_str(&row.body) {
                Ok(r) => r,
                Err(e) => {
                    // Written by this agent and checksummed: only a schema change gets here.
                    tracing::error!(seq = row.seq, error = %e, "a kept result cannot be read; dropped");
                    ops.delivered_now(&[row.seq]).await;
                    continue;
                }
            };
            let sent = tokio::select! {
                r = c.post_result(&result) => r,
                _ = shutdown.wait_for(|s| *s) => return,
            };
            match sent {
                Ok(()) => {
                    failures = 0;
                    ops.delivered_now(&[row.seq]).await;
                }
                Err(HubClientError::Http(h))
                    if (400..500).contains(&h.status)
                        && ![401, 403, 404, 408, 429].contains(&h.status) =>
                {
                    tracing::error!(seq = row.seq, status = h.status, message = %h.message,
                        "the hub refused an operation result; it stays pending and is tried again in 5 minutes");
                    refused.insert(
                        row.seq,
                        tokio::time::Instant::now() + Duration::from_secs(300),
                    );
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let d = backoff(failures, DEFAULT_POLL_INTERVAL);
                    tracing::warn!(error = %e, seq = row.seq, consecutive_failures = failures,
                        retry_in_ms = d.as_millis() as u64, "sending an operation result failed");
                    if pause(d, &mut client, &mut shutdown).await {
                        return;
                    }
                    break;
                }
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn desired_loop(
    ops: Arc<OpsService>,
    desired: Arc<HubDesired>,
    mut client: watch::Receiver<Option<Arc<HubClient>>>,
    mut envelopes: watch::Receiver<Option<SavedEnvelope>>,
    trust: watch::Receiver<TrustState>,
    agent_id: AgentId,
    node: String,
    mut shutdown: watch::Receiver<bool>,
) {
    // The payload hash and reason of the last refusal: a hub that keeps announcing a higher
    // generation while serving the same document gets that refusal once, not once per
    // report. Another envelope of the same payload refused for another reason is answered.
    let mut last_refused: Option<(Option<String>, Option<&'static str>)> = None;
    loop {
        let wanted = envelopes
            .borrow_and_update()
            .as_ref()
            .map(|s| s.envelope.desired_generation)
            .unwrap_or(0);
        let c = client.borrow_and_update().clone();
        let behind = wanted > 0 && desired.applied_generation().is_none_or(|a| wanted > a);
        if let (true, Some(c)) = (behind, c) {
            match c.fetch_desired().await {
                Ok(Some(raw)) => {
                    let trust_now = trust.borrow().clone();
                    let ctx = felhom_authz::Context {
                        agent_id: agent_id.clone(),
                        node: node.clone(),
                        now: unix_now(),
                        scratch_vmids: None,
                    };
                    let d = desired.clone();
                    let decision =
                        tokio::task::spawn_blocking(move || d.offer(&raw, trust_now.trust(), &ctx))
                            .await;
                    if let Ok(decision) = decision
                        && !decision.unchanged
                        && !(decision.state == super::wire::DecisionState::Refused
                            && last_refused.as_ref()
                                == Some(&(decision.payload_sha256.clone(), decision.reason)))
                    {
                        last_refused = (decision.state == super::wire::DecisionState::Refused)
                            .then(|| (decision.payload_sha256.clone(), decision.reason));
                        let o = ops.clone();
                        let _ = tokio::task::spawn_blocking(move || {
                            o.add_result(|seq| decision.to_result(seq))
                        })
                        .await;
                    }
                }
                Ok(None) => tracing::warn!(
                    generation = wanted,
                    "the hub announces a desired state but serves none (404)"
                ),
                Err(e) => tracing::warn!(error = %e, "fetching the desired state failed"),
            }
        }
        tokio::select! {
            r = envelopes.changed() => if r.is_err() { return },
            _ = client.changed() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seen_deliveries_are_remembered_up_to_the_bound() {
        let mut seen = Seen::default();
        assert!(seen.insert("d-1"));
        assert!(!seen.insert("d-1"), "answered already");
        for i in 2..=SEEN_DELIVERIES + 1 {
            assert!(seen.insert(&format!("d-{i}")));
        }
        assert_eq!(seen.order.len(), SEEN_DELIVERIES);
        assert_eq!(seen.set.len(), SEEN_DELIVERIES);
        // the oldest was forgotten, the newest is still known
        assert!(seen.insert("d-1"));
        assert!(!seen.insert(&format!("d-{}", SEEN_DELIVERIES + 1)));
    }
}
