//! The signed-operations service: receives envelopes, decides, records, and runs what
//! verified through the guests' lanes (and one host lane).
//!
//! Owns:
//! - **Receipt** ([`OpsService::receive`]): verification against the host's current trust
//!   (felhom-authz: signatures over PAE, distinct keys, then the payload), the replay store
//!   (same `op_id` and payload again: its current decision again; another payload: `replayed`;
//!   a `not_after` at or below the pruned floor: `expired`), and the decision: `refused`, or
//!   accepted as `held` (record and `held` result in one transaction).
//! - **Scheduling**: while the mutation gate is open and the journal is not in safe mode,
//!   each held operation goes to its lane in the order accepted: the guest's lane of the
//!   reconcile queue (so it never overlaps reconcile or another operation on that guest),
//!   or the host lane (one at a time, in order). Blocked or in safe mode, operations wait
//!   held.
//! - **In the lane**: verified again against the current trust and clock; refused
//!   `conflicts_with_desired` when it would change a guest the active desired state
//!   manages; preconditions ([`super::exec::precheck`]); the window once more; then the
//!   intent is committed (`running`) and the first request may go out. From there it
//!   completes or resumes ([`super::exec`]), also after a kill -9.
//! - **Re-verification** of every held operation when the trust changes (SIGHUP) and at
//!   start; the expiry sweep of held operations; pruning of the replay store.
//! - The decisions' outbox (read by [`super::channel`]) and what the report shows
//!   ([`OpsFeed`]).
//!
//! Every state change of an operation is one transaction together with the result that
//! reports it, under one lock, so two paths (the sweep and a lane) can never both decide.
//!
//! Must never: run an operation whose envelope does not verify against the current trust
//! when it leaves its queue, run one twice, send a request before its intent is committed,
//! or lose a decision.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use felhom_authz::{
    Context, PayloadType, Reason, Refusal, Trust, parse_op, payload_sha256, verify_envelope,
    verify_op,
};
use serde_json::{Map, Value};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::exec::{self, ExecEnv, Final, OpSpec, Progress};
use super::wire::{DecisionState, HeldOp, OpResult, ResultKind};
use super::{AgentId, OpsFeed, TrustState};
use crate::proxmox::GuestPermit;
use crate::reconcile::journal::{Journal, JournalError, OpRecord, now_ms};
use crate::reconcile::{EngineHandle, Gate};
use crate::timestamp::Timestamp;

/// Pending results the report carries at most.
pub const REPORT_RESULTS: usize = 100;
/// How often held operations are checked for expiry.
const SWEEP: Duration = Duration::from_secs(2);
/// Accepted results kept for `ops show` after the hub has them.
const KEEP_RESULTS: usize = 1000;
/// Unsent results searched for an answer a delivery handed out again already has.
const UNSENT_SCAN: usize = 10_000;

/// Why an envelope could not even be recorded (the journal refused the write): it is not
/// answered and the hub delivers it again.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("journal worker stopped: {0}")]
    Blocking(String),
    /// A local request (`ops undo`, `ops release`) that cannot be queued, and why.
    #[error("{0}")]
    Local(String),
}

/// What the host's own operator asks for through the control socket (`felhom-agent ops
/// undo` / `ops release`, root or the agent's user). Each runs as an operation of its own
/// in the guest's lane, with the same journal and results as a signed one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalRequest {
    Undo { op_id: String },
    Release { op_id: String },
}

/// What [`OpsService::receive`] decided, for the log and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    pub op_id: Option<String>,
    pub state: DecisionState,
    pub reason: Option<String>,
    pub seq: u64,
}

/// Everything the service runs on.
pub struct OpsDeps {
    pub journal: Arc<Journal>,
    pub agent_id: AgentId,
    pub node: String,
    pub trust: watch::Receiver<TrustState>,
    pub gate: watch::Receiver<Gate>,
    pub engine: Arc<EngineHandle>,
    pub env: ExecEnv,
    /// The restore tests' scratch vmids: guest operations on them are `invalid_params`.
    pub scratch_vmids: Option<std::ops::RangeInclusive<u32>>,
}

impl std::fmt::Debug for OpsDeps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpsDeps")
            .field("agent_id", &self.agent_id)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

struct Inner {
    journal: Arc<Journal>,
    agent_id: AgentId,
    node: String,
    trust: watch::Receiver<TrustState>,
    gate: watch::Receiver<Gate>,
    engine: Arc<EngineHandle>,
    env: Mutex<ExecEnv>,
    scratch_vmids: Option<std::ops::RangeInclusive<u32>>,
    /// Serializes receipts and every state change of a record.
    decide: Mutex<()>,
    /// Operations handed to a lane and not finished there yet.
    submitted: Mutex<HashSet<String>>,
    /// Unfinished operations and when to try again (attempts, when).
    retry: Mutex<HashMap<String, (u32, Instant)>>,
    host_tx: mpsc::UnboundedSender<String>,
    kick: Notify,
    /// Woken when a result is added (the sender posts it).
    results: Arc<Notify>,
    feed: Mutex<(Vec<HeldOp>, Vec<OpResult>)>,
    changes: watch::Sender<u64>,
    /// The lowest `seq` the hub has not accepted yet (`u64::MAX` when none is pending).
    unsent: watch::Sender<u64>,
}

/// The running service.
pub struct OpsService {
    inner: Arc<Inner>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for OpsService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpsService").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn ts_ms(ms: Option<i64>) -> Option<Timestamp> {
    ms.and_then(|m| Timestamp::from_unix(m.div_euclid(1000)))
}

/// The result reporting `rec`'s current decision (`held` while it is open).
pub fn result_of(rec: &OpRecord, seq: u64) -> OpResult {
    let state = match rec.state.as_str() {
        "held" | "running" => DecisionState::Held,
        s => DecisionState::parse(s).unwrap_or(DecisionState::Failed),
    };
    OpResult {
        seq,
        kind: ResultKind::Op,
        op_id: Some(rec.op_id.clone()),
        generation: None,
        payload_sha256: Some(rec.payload_sha256.clone()),
        delivery_id: rec.delivery_id.clone(),
        state,
        reason: if state == DecisionState::Refused {
            rec.reason.clone()
        } else {
            None
        },
        message: rec.message.clone(),
        signers: rec.signers.clone(),
        upids: rec.upids.clone(),
        result: rec.result.clone(),
        started_at: ts_ms(rec.intent_ms),
        finished_at: if state.is_final() {
            ts_ms(rec.finished_ms)
        } else {
            None
        },
    }
}

fn body(r: &OpResult) -> String {
    serde_json::to_string(r).unwrap_or_default()
}

/// The payload's SHA-256 when the envelope's payload decodes (for refusals).
fn envelope_sha(raw: &[u8]) -> Option<String> {
    if raw.len() > felhom_authz::MAX_ENVELOPE_BYTES {
        return None;
    }
    let env = felhom_authz::Envelope::parse(raw).ok()?;
    env.body().ok().map(|b| hex::encode(payload_sha256(&b)))
}

/// `local:<user>` when the record is a local request (`ops undo` / `ops release`).
fn local_signer(rec: &OpRecord) -> Option<&str> {
    rec.signers
        .first()
        .filter(|s| rec.envelope.is_empty() && s.starts_with("local:"))
        .map(String::as_str)
}

/// The `op_id` of a verified body, when it has a well-formed one.
fn probe_op_id(body: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Probe {
        op_id: String,
    }
    let p: Probe = serde_json::from_slice(body).ok()?;
    felhom_authz::OpId::new(p.op_id)
        .ok()
        .map(|id| id.as_str().to_string())
}

impl OpsService {
    /// Starts the scheduler, the host lane and the sweep. Held and running operations in
    /// the journal are verified again (held) and resumed (running) once the gate is open.
    pub fn start(deps: OpsDeps) -> Arc<OpsService> {
        let (host_tx, host_rx) = mpsc::unbounded_channel();
        let (changes, _) = watch::channel(0);
        let inner = Arc::new(Inner {
            journal: deps.journal,
            agent_id: deps.agent_id,
            node: deps.node,
            trust: deps.trust,
            gate: deps.gate,
            engine: deps.engine,
            env: Mutex::new(deps.env),
            scratch_vmids: deps.scratch_vmids,
            decide: Mutex::new(()),
            submitted: Mutex::new(HashSet::new()),
            retry: Mutex::new(HashMap::new()),
            host_tx,
            kick: Notify::new(),
            results: Arc::new(Notify::new()),
            feed: Mutex::new((Vec::new(), Vec::new())),
            changes,
            unsent: watch::channel(0).0,
        });
        let tasks = vec![
            tokio::spawn(host_lane(inner.clone(), host_rx)),
            tokio::spawn(scheduler(inner.clone())),
        ];
        Arc::new(OpsService {
            inner,
            tasks: Mutex::new(tasks),
        })
    }

    /// Receives one envelope (blocking: call from a blocking thread).
    pub fn receive(&self, raw: &[u8], delivery_id: Option<String>) -> Result<Receipt, OpsError> {
        let r = self.inner.receive(raw, delivery_id);
        self.inner.refresh();
        self.inner.results.notify_one();
        self.inner.kick.notify_one();
        r
    }

    /// [`Self::receive`] off the async workers.
    pub async fn receive_async(
        self: &Arc<Self>,
        raw: Vec<u8>,
        delivery_id: Option<String>,
    ) -> Result<Receipt, OpsError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.receive(&raw, delivery_id))
            .await
            .map_err(|e| OpsError::Blocking(e.to_string()))?
    }

    /// Answers a delivery while signed operations are off: `refused`, `ops_disabled`.
    pub fn refuse_disabled(
        &self,
        raw: &[u8],
        delivery_id: Option<String>,
    ) -> Result<u64, OpsError> {
        let seq = self.inner.refuse(
            raw,
            None,
            delivery_id,
            "ops_disabled",
            "signed operations are off on this host (no signers file)".into(),
        )?;
        self.inner.refresh();
        self.inner.results.notify_one();
        Ok(seq)
    }

    /// Adds a result that changes no operation (a desired-state decision).
    pub fn add_result(&self, make: impl Fn(u64) -> OpResult) -> Result<u64, OpsError> {
        let seq = self.inner.journal.result_add(|seq| body(&make(seq)))?;
        self.inner.refresh();
        self.inner.results.notify_one();
        Ok(seq)
    }

    /// Swaps the clients and the shutdown timeout (SIGHUP).
    pub fn reload(&self, env: ExecEnv) {
        *lock(&self.inner.env) = env;
    }

    /// Woken when a result is waiting to be sent.
    pub fn results_notify(&self) -> Arc<Notify> {
        self.inner.results.clone()
    }

    pub fn journal(&self) -> &Arc<Journal> {
        &self.inner.journal
    }

    /// Waits (at most `limit`) until the hub accepted every result up to `seq`: the long
    /// poll asks again only then, so it is not handed the same deliveries before their
    /// answers arrived.
    pub async fn wait_sent(&self, seq: u64, limit: Duration) {
        let mut rx = self.inner.unsent.subscribe();
        let _ = tokio::time::timeout(limit, rx.wait_for(|lowest| *lowest > seq)).await;
    }

    /// A counter that moves when held operations or pending results change.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.inner.changes.subscribe()
    }

    /// The newest `limit` operations, newest first.
    pub fn list(&self, limit: usize) -> Result<Vec<OpRecord>, OpsError> {
        Ok(self.inner.journal.ops_recent(limit)?)
    }

    /// One operation and the results sent about it, oldest first.
    pub fn show(&self, op_id: &str) -> Result<Option<(OpRecord, Vec<Value>)>, OpsError> {
        show(&self.inner.journal, op_id)
    }

    /// Queues a local undo or release (`by`: who asked, e.g. `local:root`) and returns the
    /// new operation's `op_id`; its decision follows like a signed operation's
    /// ([`OpsService::show`]).
    pub async fn submit_local(&self, req: LocalRequest, by: &str) -> Result<String, OpsError> {
        let inner = self.inner.clone();
        let by = if by.starts_with("local:") {
            by.to_string()
        } else {
            format!("local:{by}")
        };
        let op_id = tokio::task::spawn_blocking(move || inner.accept_local(req, &by))
            .await
            .map_err(|e| OpsError::Blocking(e.to_string()))??;
        self.inner.refresh();
        self.inner.results.notify_one();
        self.inner.kick.notify_one();
        Ok(op_id)
    }

    /// The undo points the gate made and still keeps, oldest first.
    pub fn undo_points(&self) -> Result<Vec<crate::reconcile::journal::UndoPoint>, OpsError> {
        Ok(self.inner.journal.undo_points_kept()?)
    }

    /// The hub accepted these results (by POST): not sent again, gone from the report.
    pub async fn delivered_now(&self, seqs: &[u64]) {
        let inner = self.inner.clone();
        let seqs = seqs.to_vec();
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) = inner.journal.results_accepted(&seqs) {
                tracing::warn!(error = %e, "could not record the results the hub accepted");
            }
            inner.refresh();
        })
        .await;
    }

    /// Stops the service's tasks (the lanes' operations are the queue's to drain).
    pub fn stop(&self) {
        for t in lock(&self.tasks).drain(..) {
            t.abort();
        }
    }
}

/// One record for `ops list` / `ops show`: everything but the envelope text, plus the
/// operation's decision as the hub sees it.
fn record_json(rec: &OpRecord) -> Value {
    let mut v = serde_json::to_value(rec).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.remove("envelope");
        o.insert(
            "received_at".into(),
            serde_json::to_value(ts_ms(Some(rec.received_ms))).unwrap_or_default(),
        );
    }
    v
}

/// `ops list`: the newest `limit` operations, newest first, and the replay floor.
pub fn list_json(journal: &Journal, limit: usize) -> Result<Value, OpsError> {
    let ops: Vec<Value> = journal.ops_recent(limit)?.iter().map(record_json).collect();
    Ok(serde_json::json!({
        "ops": ops,
        "replay_floor": journal.replay_floor()?,
        "pending_results": journal.results_pending(REPORT_RESULTS)?.len(),
    }))
}

/// `ops show OP_ID`: the record (with its envelope) and its results, oldest first.
pub fn show_json(journal: &Journal, op_id: &str) -> Result<Option<Value>, OpsError> {
    Ok(show(journal, op_id)?.map(|(rec, results)| {
        let mut v = record_json(&rec);
        v["envelope"] = serde_json::from_str::<Value>(&rec.envelope)
            .unwrap_or_else(|_| Value::String(rec.envelope.clone()));
        v["results"] = Value::Array(results);
        v
    }))
}

/// One operation and its results from a journal (the daemon's or a local one).
pub fn show(journal: &Journal, op_id: &str) -> Result<Option<(OpRecord, Vec<Value>)>, OpsError> {
    let Some(rec) = journal.op_get(op_id)? else {
        return Ok(None);
    };
    let mut results: Vec<Value> = journal
        .results_recent(KEEP_RESULTS)?
        .into_iter()
        .filter_map(|r| serde_json::from_str::<Value>(&r.body).ok())
        .filter(|v| v["op_id"].as_str() == Some(op_id))
        .collect();
    results.reverse();
    Ok(Some((rec, results)))
}

impl OpsFeed for OpsService {
    fn snapshot(&self) -> (Vec<HeldOp>, Vec<OpResult>) {
        lock(&self.inner.feed).clone()
    }

    fn delivered(&self, seqs: &[u64]) {
        let inner = self.inner.clone();
        let seqs = seqs.to_vec();
        let work = move || {
            if let Err(e) = inner.journal.results_accepted(&seqs) {
                tracing::warn!(error = %e, "could not record the results the hub accepted");
            }
            inner.refresh();
        };
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn_blocking(work);
            }
            Err(_) => work(),
        }
    }
}

impl Inner {
    fn ctx(&self) -> Context {
        Context {
            agent_id: self.agent_id.clone(),
            node: self.node.clone(),
            now: unix_now(),
            scratch_vmids: self.scratch_vmids.clone(),
        }
    }

    fn trust(&self) -> Option<Arc<Trust>> {
        match &*self.trust.borrow() {
            TrustState::Enabled { trust, .. } => Some(trust.clone()),
            _ => None,
        }
    }

    fn skew(&self) -> u64 {
        self.trust()
            .map(|t| t.clock_skew_seconds())
            .unwrap_or(felhom_authz::trust::DEFAULT_CLOCK_SKEW_SECONDS)
    }

    /// The `seq` of a result not yet accepted by the hub that already answers
    /// `delivery_id` as `same` says. A hub hands a delivery out again until a result
    /// naming it reaches it; while its result endpoint fails, every long poll would
    /// otherwise add one more row to the outbox, without bound.
    fn unsent_answer(
        &self,
        delivery_id: Option<&str>,
        same: impl Fn(&OpResult) -> bool,
    ) -> Result<Option<u64>, OpsError> {
        let Some(d) = delivery_id else {
            return Ok(None);
        };
        Ok(self
            .journal
            .results_pending(UNSENT_SCAN)?
            .iter()
            .filter_map(|row| serde_json::from_str::<OpResult>(&row.body).ok())
            .find(|r| r.delivery_id.as_deref() == Some(d) && same(r))
            .map(|r| r.seq))
    }

    /// A refusal that records no operation.
    fn refuse(
        &self,
        raw: &[u8],
        op_id: Option<String>,
        delivery_id: Option<String>,
        reason: &str,
        message: String,
    ) -> Result<u64, OpsError> {
        let sha = envelope_sha(raw);
        if let Some(seq) = self.unsent_answer(delivery_id.as_deref(), |r| {
            r.state == DecisionState::Refused
                && r.reason.as_deref() == Some(reason)
                && r.op_id == op_id
                && r.payload_sha256 == sha
        })? {
            return Ok(seq);
        }
        tracing::warn!(op_id = op_id.as_deref().unwrap_or("-"), delivery_id = delivery_id.as_deref().unwrap_or("-"),
            reason, %message, "signed operation refused");
        let now = Timestamp::now();
        Ok(self.journal.result_add(|seq| {
            body(&OpResult {
                seq,
                kind: ResultKind::Op,
                op_id: op_id.clone(),
                generation: None,
                payload_sha256: sha.clone(),
                delivery_id: delivery_id.clone(),
                state: DecisionState::Refused,
                reason: Some(reason.to_string()),
                message: Some(message.clone()),
                signers: Vec::new(),
                upids: Vec::new(),
                result: Map::new(),
                started_at: None,
                finished_at: Some(now),
            })
        })?)
    }

    fn receive(&self, raw: &[u8], delivery_id: Option<String>) -> Result<Receipt, OpsError> {
        let _d = lock(&self.decide);
        let refused = |op_id: Option<String>, r: &Refusal| -> Result<Receipt, OpsError> {
            let seq = self.refuse(
                raw,
                op_id.clone(),
                delivery_id.clone(),
                r.reason.as_str(),
                r.message.clone(),
            )?;
            Ok(Receipt {
                op_id,
                state: DecisionState::Refused,
                reason: Some(r.reason.as_str().to_string()),
                seq,
            })
        };
        let Some(trust) = self.trust() else {
            let seq = self.refuse(
                raw,
                None,
                delivery_id.clone(),
                "ops_disabled",
                "signed operations are off on this host".into(),
            )?;
            return Ok(Receipt {
                op_id: None,
                state: DecisionState::Refused,
                reason: Some("ops_disabled".into()),
                seq,
            });
        };
        let verified = match verify_envelope(raw, PayloadType::Op, &trust) {
            Ok(v) => v,
            Err(r) => return refused(None, &r),
        };
        let sha = hex::encode(verified.payload_sha256());
        let ctx = self.ctx();
        let payload = match parse_op(&verified, &trust, &ctx) {
            Ok(p) => p,
            Err(r) => {
                let op_id = probe_op_id(verified.body());
                // A delivery again after its window: its decision again, not `expired`.
                if matches!(r.reason, Reason::Expired | Reason::NotYetValid)
                    && let Some(id) = &op_id
                    && let Some(rec) = self.journal.op_get(id)?
                    && rec.payload_sha256 == sha
                {
                    return self.answer_again(rec, delivery_id);
                }
                return refused(op_id, &r);
            }
        };
        let op_id = payload.op_id.as_str().to_string();
        if let Some(rec) = self.journal.op_get(&op_id)? {
            if rec.payload_sha256 == sha {
                return self.answer_again(rec, delivery_id);
            }
            let seq = self.refuse(
                raw,
                Some(op_id.clone()),
                delivery_id,
                "replayed",
                "this op_id was already used for a different payload".into(),
            )?;
            return Ok(Receipt {
                op_id: Some(op_id),
                state: DecisionState::Refused,
                reason: Some("replayed".into()),
                seq,
            });
        }
        let floor = self.journal.replay_floor()?;
        if payload.not_after <= floor {
            return refused(
                Some(op_id),
                &Refusal::new(
                    Reason::Expired,
                    format!(
                        "valid until {}, at or before {floor}, the newest window the replay store has forgotten (was the clock set back?)",
                        payload.not_after
                    ),
                ),
            );
        }
        let spec = OpSpec::from_payload(&payload);
        let rec = OpRecord {
            op_id: op_id.clone(),
            payload_sha256: sha,
            not_after: payload.not_after,
            kind: payload.kind.as_str().to_string(),
            vmid: spec.guest().map(|g| g.vmid.get()),
            envelope: String::from_utf8_lossy(raw).into_owned(),
            delivery_id,
            signers: payload.signers.clone(),
            received_ms: now_ms(),
            state: "held".into(),
            reason: None,
            message: None,
            upids: Vec::new(),
            result: Map::new(),
            intent_ms: None,
            finished_ms: None,
            spec: serde_json::to_value(&spec).unwrap_or(Value::Null),
            gate: Value::Null,
        };
        let seq = self
            .journal
            .op_accept(&rec, |seq| body(&result_of(&rec, seq)))?;
        tracing::info!(op_id = %op_id, op = %rec.kind, vmid = ?rec.vmid, signers = ?rec.signers,
            reason = %payload.reason, "signed operation accepted");
        Ok(Receipt {
            op_id: Some(op_id),
            state: DecisionState::Held,
            reason: None,
            seq: seq.unwrap_or(0),
        })
    }

    /// A known operation delivered again: its current decision, under this delivery id
    /// (nothing new when an unsent result already gives that decision for this delivery).
    fn answer_again(
        &self,
        rec: OpRecord,
        delivery_id: Option<String>,
    ) -> Result<Receipt, OpsError> {
        let now = result_of(&rec, 0);
        if let Some(seq) = self.unsent_answer(delivery_id.as_deref(), |r| {
            r.op_id == now.op_id
                && r.payload_sha256 == now.payload_sha256
                && r.state == now.state
                && r.reason == now.reason
        })? {
            return Ok(Receipt {
                op_id: Some(rec.op_id),
                state: now.state,
                reason: now.reason,
                seq,
            });
        }
        let (rec, seq) = self.journal.op_update(
            &rec.op_id,
            |r| {
                if delivery_id.is_some() {
                    r.delivery_id = delivery_id.clone();
                }
            },
            Some(&mut |seq, r: &OpRecord| body(&result_of(r, seq))),
        )?;
        let res = result_of(&rec, 0);
        tracing::info!(op_id = %rec.op_id, state = res.state.as_str(), "operation delivered again: answered with its current decision");
        Ok(Receipt {
            op_id: Some(rec.op_id),
            state: res.state,
            reason: res.reason,
            seq: seq.unwrap_or(0),
        })
    }

    /// Moves `op_id` from one of `from` to a final state (or `running`), with its result,
    /// under the decision lock. `None` when it was not in one of `from` any more.
    fn transition(
        &self,
        op_id: &str,
        from: &[&str],
        change: impl FnOnce(&mut OpRecord),
        with_result: bool,
    ) -> Result<Option<OpRecord>, OpsError> {
        let _d = lock(&self.decide);
        let Some(rec) = self.journal.op_get(op_id)? else {
            return Ok(None);
        };
        if !from.contains(&rec.state.as_str()) {
            return Ok(None);
        }
        let mut make = |seq, r: &OpRecord| body(&result_of(r, seq));
        let (rec, _) = self.journal.op_update(
            op_id,
            change,
            if with_result { Some(&mut make) } else { None },
        )?;
        Ok(Some(rec))
    }

    fn finalize(&self, op_id: &str, from: &[&str], f: Final) -> Result<(), OpsError> {
        let finished = now_ms();
        let (gate, f) = match f {
            Final::Stepped { gate, end } => (Some(gate), *end),
            f => (None, f),
        };
        let (state, reason, message, result) = match f {
            Final::Applied(r) => ("applied", None, None, r),
            Final::Failed(m) => ("failed", None, Some(m), Map::new()),
            Final::Ended {
                state,
                message,
                result,
            } => (state, None, message, result),
            Final::Refused { reason, message } => (
                "refused",
                Some(reason.to_string()),
                Some(message),
                Map::new(),
            ),
            Final::Stepped { end, .. } => (
                "failed",
                None,
                Some(format!("a gated end wrapped twice: {end:?}")),
                Map::new(),
            ),
        };
        let done = self.transition(
            op_id,
            from,
            |r| {
                r.state = state.into();
                r.reason = reason;
                r.message = message;
                r.result = result;
                r.finished_ms = Some(finished);
                if let Some(g) = gate {
                    r.gate = g;
                }
            },
            true,
        )?;
        if let Some(rec) = done {
            tracing::info!(op_id, state, reason = rec.reason.as_deref().unwrap_or("-"),
                message = rec.message.as_deref().unwrap_or(""), upids = ?rec.upids, "signed operation decided");
        }
        self.refresh();
        self.results.notify_one();
        Ok(())
    }

    fn refuse_held(&self, op_id: &str, reason: &'static str, message: String) {
        if let Err(e) = self.finalize(op_id, &["held"], Final::Refused { reason, message }) {
            tracing::error!(op_id, error = %e, "could not record a refusal");
        }
    }

    /// Records a local undo or release as an operation of its own: an empty envelope,
    /// signer `local:<user>`, held for its guest's lane like a signed one.
    fn accept_local(&self, req: LocalRequest, by: &str) -> Result<String, OpsError> {
        let (kind, undone) = match &req {
            LocalRequest::Undo { op_id } => ("undo", op_id.clone()),
            LocalRequest::Release { op_id } => ("release_undo", op_id.clone()),
        };
        let undone = felhom_authz::OpId::new(undone.clone())
            .map_err(|_| OpsError::Local(format!("{undone:?} is not an operation id")))?
            .as_str()
            .to_string();
        let Some(target) = self.journal.op_get(&undone)? else {
            return Err(OpsError::Local(format!(
                "no operation {undone} is known to this agent"
            )));
        };
        // The guest: from the operation's spec, else from its undo point.
        let from_spec = serde_json::from_value::<OpSpec>(target.spec.clone())
            .ok()
            .and_then(|s| s.gated())
            .map(|g| g.guest);
        let from_point = self.journal.undo_point_get(&undone)?.and_then(|p| {
            let vmid = felhom_protocol::Vmid::new(u64::from(p.vmid)).ok()?;
            let kind = match p.guest_kind.as_str() {
                "lxc" => crate::proxmox::GuestKind::Lxc,
                "qemu" => crate::proxmox::GuestKind::Qemu,
                _ => return None,
            };
            Some(super::exec::GuestRef {
                kind,
                vmid,
                expect_digest: None,
            })
        });
        let Some(target_guest) = from_spec.or(from_point) else {
            return Err(OpsError::Local(format!(
                "operation {undone} ({}) is not a gated operation and holds no undo point",
                target.kind
            )));
        };
        if kind == "release_undo" && !self.journal.undo_point_kept(&undone)? {
            return Err(OpsError::Local(format!(
                "operation {undone} holds no undo point to release"
            )));
        }
        let mut bytes = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
            .map_err(|_| OpsError::Local("no randomness for an operation id".into()))?;
        let op_id = hex::encode(bytes);
        let guest = super::exec::GuestRef {
            expect_digest: None,
            ..target_guest.clone()
        };
        let spec = match req {
            LocalRequest::Undo { .. } => OpSpec::Undo {
                guest,
                op_id: undone.clone(),
            },
            LocalRequest::Release { .. } => OpSpec::ReleaseUndo {
                guest,
                op_id: undone.clone(),
            },
        };
        let described =
            serde_json::json!({"local": kind, "op_id": op_id, "undone": undone, "by": by});
        let rec = OpRecord {
            op_id: op_id.clone(),
            payload_sha256: hex::encode(payload_sha256(described.to_string().as_bytes())),
            not_after: unix_now() + 3600,
            kind: kind.to_string(),
            vmid: Some(target_guest.vmid.get()),
            envelope: String::new(),
            delivery_id: None,
            signers: vec![by.to_string()],
            received_ms: now_ms(),
            state: "held".into(),
            reason: None,
            message: None,
            upids: Vec::new(),
            result: Map::new(),
            intent_ms: None,
            finished_ms: None,
            spec: serde_json::to_value(&spec).unwrap_or(Value::Null),
            gate: Value::Null,
        };
        let _d = lock(&self.decide);
        self.journal
            .op_accept(&rec, |seq| body(&result_of(&rec, seq)))?
            .ok_or_else(|| OpsError::Local("operation id taken; ask again".into()))?;
        tracing::info!(op_id = %op_id, op = kind, undone = %undone, %by, "local request accepted");
        Ok(op_id)
    }

    /// Verifies a held operation's envelope again against the current trust and clock.
    /// A local request (no envelope, signer `local:<user>`) was authorised by the control
    /// socket's peer check and is not verified against the trust.
    fn reverify(&self, rec: &OpRecord) -> Result<(), (&'static str, String)> {
        if local_signer(rec).is_some() {
            return Ok(());
        }
        let Some(trust) = self.trust() else {
            return Err((
                "ops_disabled",
                "signed operations were turned off while it was held".into(),
            ));
        };
        match verify_op(rec.envelope.as_bytes(), &trust, &self.ctx()) {
            Ok(p) if hex::encode(p.payload_sha256) == rec.payload_sha256 => Ok(()),
            Ok(_) => Err(("bad_payload", "the kept envelope changed".into())),
            Err(r) => Err((r.reason.as_str(), r.message)),
        }
    }

    /// Re-verifies every held operation (trust changed, start, sweep).
    fn reverify_held(&self) {
        let open = match self.journal.ops_open() {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(error = %e, "cannot read held operations");
                return;
            }
        };
        for rec in open.iter().filter(|r| r.state == "held") {
            if let Err((reason, message)) = self.reverify(rec) {
                self.refuse_held(&rec.op_id, reason, message);
            }
        }
    }

    /// The report's view, refreshed after every change.
    fn refresh(&self) {
        let gate = *self.gate.borrow();
        let safe = self.journal.safe_mode();
        let held = match self.journal.ops_open() {
            Ok(open) => open
                .into_iter()
                .map(|r| {
                    let running = r.state == "running";
                    HeldOp {
                        op_id: r.op_id,
                        op: r.kind,
                        vmid: r.vmid,
                        state: r.state,
                        waiting_for: (!running).then(|| {
                            if safe.is_some() {
                                "safe_mode"
                            } else if gate == Gate::Blocked {
                                "blocked"
                            } else if gate == Gate::AwaitingEnvelope {
                                "hub_envelope"
                            } else {
                                "lane"
                            }
                            .to_string()
                        }),
                        received_at: ts_ms(Some(r.received_ms)).unwrap_or_else(Timestamp::now),
                    }
                })
                .collect(),
            Err(_) => lock(&self.feed).0.clone(),
        };
        let pending = match self.journal.results_pending(REPORT_RESULTS) {
            Ok(rows) => rows
                .into_iter()
                .filter_map(|r| serde_json::from_str::<OpResult>(&r.body).ok())
                .collect(),
            Err(_) => lock(&self.feed).1.clone(),
        };
        self.unsent
            .send_replace(pending.first().map_or(u64::MAX, |r: &OpResult| r.seq));
        let mut f = lock(&self.feed);
        if f.0 != held || f.1 != pending {
            *f = (held, pending);
            drop(f);
            self.changes.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    fn env(&self) -> ExecEnv {
        lock(&self.env).clone()
    }

    fn retry_later(&self, op_id: &str) {
        let mut r = lock(&self.retry);
        let e = r.entry(op_id.to_string()).or_insert((0, Instant::now()));
        e.0 += 1;
        let delay = Duration::from_secs(5)
            .saturating_mul(1 << e.0.saturating_sub(1).min(4))
            .min(Duration::from_secs(60));
        e.1 = Instant::now() + delay;
    }
}

async fn blocking<T: Send + 'static>(
    inner: &Arc<Inner>,
    f: impl FnOnce(&Inner) -> T + Send + 'static,
) -> Option<T> {
    let i = inner.clone();
    tokio::task::spawn_blocking(move || f(&i)).await.ok()
}

/// Hands every held (and unfinished running) operation to its lane, in acceptance order,
/// while the gate is open and the journal is not in safe mode.
async fn pump(inner: &Arc<Inner>) {
    if *inner.gate.borrow() != Gate::Open || inner.journal.safe_mode().is_some() {
        return;
    }
    let Some(Ok(open)) = blocking(inner, |i| i.journal.ops_open()).await else {
        return;
    };
    let now = Instant::now();
    for rec in open {
        if lock(&inner.submitted).contains(&rec.op_id) {
            continue;
        }
        if lock(&inner.retry)
            .get(&rec.op_id)
            .is_some_and(|(_, at)| *at > now)
        {
            continue;
        }
        let op_id = rec.op_id.clone();
        lock(&inner.submitted).insert(op_id.clone());
        let submitted = match rec
            .vmid
            .and_then(|v| felhom_protocol::Vmid::new(u64::from(v)).ok())
        {
            Some(vmid) => {
                let i = inner.clone();
                let id = op_id.clone();
                inner
                    .engine
                    .queue()
                    .submit(vmid, format!("signed-{}", rec.kind), move |permit| {
                        Box::pin(async move { run_one(&i, &id, Some(permit)).await })
                    })
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
            None => inner.host_tx.send(op_id.clone()).map_err(|e| e.to_string()),
        };
        if let Err(e) = submitted {
            tracing::warn!(op_id = %op_id, error = %e, "signed operation not queued; tried again");
            lock(&inner.submitted).remove(&op_id);
            inner.retry_later(&op_id);
        }
    }
}

async fn host_lane(inner: Arc<Inner>, mut rx: mpsc::UnboundedReceiver<String>) {
    while let Some(op_id) = rx.recv().await {
        run_one(&inner, &op_id, None).await;
    }
}

/// One operation in its lane: the checks, the intent, the requests, the decision.
async fn run_one(inner: &Arc<Inner>, op_id: &str, permit: Option<&GuestPermit>) {
    run_checked(inner, op_id, permit).await;
    lock(&inner.submitted).remove(op_id);
    inner.refresh();
    inner.engine.kick();
}

async fn run_checked(inner: &Arc<Inner>, op_id: &str, permit: Option<&GuestPermit>) {
    let id = op_id.to_string();
    let Some(Ok(Some(rec))) = blocking(inner, move |i| i.journal.op_get(&id)).await else {
        return;
    };
    let spec: OpSpec = match serde_json::from_value(rec.spec.clone()) {
        Ok(s) => s,
        Err(e) => {
            let msg = format!("the record's operation cannot be read: {e}");
            let id = op_id.to_string();
            let _ = blocking(inner, move |i| {
                i.finalize(&id, &["held", "running"], Final::Failed(msg))
            })
            .await;
            return;
        }
    };
    let env = inner.env();
    let resuming = match rec.state.as_str() {
        "held" => {
            if *inner.gate.borrow() != Gate::Open || inner.journal.safe_mode().is_some() {
                return; // stays held; pumped again when the gate opens
            }
            if let Err((reason, message)) = inner.reverify(&rec) {
                let id = op_id.to_string();
                let _ = blocking(inner, move |i| i.refuse_held(&id, reason, message)).await;
                return;
            }
            if spec.conflicts_with_desired()
                && let Some(g) = spec.guest()
                && inner.engine.manages(g.vmid)
            {
                let msg = format!(
                    "guest {} is managed by the active desired state, which is the authority there",
                    g.vmid
                );
                let id = op_id.to_string();
                let _ = blocking(inner, move |i| {
                    i.refuse_held(&id, "conflicts_with_desired", msg)
                })
                .await;
                return;
            }
            let seen = match exec::precheck_seen(&env, &spec).await {
                Ok((None, seen)) => seen,
                Ok((Some(f), _)) => {
                    let id = op_id.to_string();
                    let _ = blocking(inner, move |i| i.finalize(&id, &["held"], f)).await;
                    return;
                }
                Err(e) => {
                    tracing::warn!(op_id, error = %e, "signed operation: preconditions not readable; tried again");
                    inner.retry_later(op_id);
                    return;
                }
            };
            // The window, just before the first request.
            if unix_now() >= rec.not_after.saturating_add(inner.skew()) {
                let id = op_id.to_string();
                let msg = format!("valid until {}; expired while it waited", rec.not_after);
                let _ = blocking(inner, move |i| i.refuse_held(&id, "expired", msg)).await;
                return;
            }
            let id = op_id.to_string();
            let intent = now_ms();
            let committed = blocking(inner, move |i| {
                i.transition(
                    &id,
                    &["held"],
                    |r| {
                        r.state = "running".into();
                        r.intent_ms = Some(intent);
                    },
                    false,
                )
            })
            .await;
            match committed {
                Some(Ok(Some(_))) => {}
                Some(Ok(None)) => return, // decided meanwhile (expired, re-verified)
                Some(Err(e)) => {
                    tracing::error!(op_id, error = %e, "intent not committed; nothing sent");
                    return;
                }
                None => return,
            }
            inner.refresh();
            tracing::info!(op_id, op = %rec.kind, vmid = ?rec.vmid, "signed operation: intent recorded");
            Some(seen)
        }
        "running" => None,
        _ => return,
    };
    let seen = resuming;
    let resuming = seen.is_none();
    let id = op_id.to_string();
    let Some(Ok(Some(rec))) = blocking(inner, move |i| i.journal.op_get(&id)).await else {
        return;
    };
    let progress = Progress {
        op_id: op_id.to_string(),
        intent_ms: rec.intent_ms.unwrap_or(rec.received_ms),
        upids: rec.upids.clone(),
        resuming,
        gate: rec.gate.clone(),
        by: local_signer(&rec).map_or_else(|| format!("signed:{op_id}"), str::to_string),
        seen,
    };
    if resuming {
        tracing::info!(op_id, upids = ?rec.upids, "resuming an unfinished signed operation");
    }
    match exec::execute(&env, &spec, permit, &progress).await {
        Ok(f) => {
            lock(&inner.retry).remove(op_id);
            let id = op_id.to_string();
            if let Some(Err(e)) = blocking(inner, move |i| i.finalize(&id, &["running"], f)).await {
                tracing::error!(op_id, error = %e, "could not record the operation's end; resumed later");
                inner.retry_later(op_id);
            }
        }
        Err(e) => {
            tracing::warn!(op_id, error = %e, "signed operation unfinished; resumed later");
            inner.retry_later(op_id);
        }
    }
}

/// Pumps on every kick, gate or trust change and sweep tick; refuses held operations that
/// expired; prunes the replay store hourly.
async fn scheduler(inner: Arc<Inner>) {
    let mut gate = inner.gate.clone();
    let mut trust = inner.trust.clone();
    let mut last_prune: Option<std::time::Instant> = None;
    // At start: what was held is verified again against the trust of this start.
    let _ = blocking(&inner, |i| {
        i.reverify_held();
        i.refresh();
    })
    .await;
    inner.results.notify_one();
    let mut tick = tokio::time::interval(SWEEP);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = inner.kick.notified() => {}
            r = gate.changed() => {
                if r.is_err() { return; }
                let _ = blocking(&inner, |i| i.refresh()).await;
            }
            r = trust.changed() => {
                if r.is_err() { return; }
                tracing::info!("trust changed: verifying held operations again");
                let _ = blocking(&inner, |i| { i.reverify_held(); i.refresh(); }).await;
            }
            _ = tick.tick() => {
                let _ = blocking(&inner, sweep).await;
                if last_prune.is_none_or(|t| t.elapsed() > Duration::from_secs(3600)) {
                    last_prune = Some(std::time::Instant::now());
                    let _ = blocking(&inner, |i| {
                        match i.journal.ops_prune(unix_now(), i.skew(), KEEP_RESULTS) {
                            Ok(n) if n > 0 => tracing::info!(pruned = n, "replay store pruned"),
                            Ok(_) => {}
                            Err(e) => tracing::error!(error = %e, "replay store pruning failed"),
                        }
                    }).await;
                }
            }
        }
        pump(&inner).await;
    }
}

/// Held operations whose window ended are refused `expired`.
fn sweep(inner: &Inner) {
    let Ok(open) = inner.journal.ops_open() else {
        return;
    };
    let now = unix_now();
    let skew = inner.skew();
    for rec in open.iter().filter(|r| r.state == "held") {
        if now >= rec.not_after.saturating_add(skew) {
            inner.refuse_held(
                &rec.op_id,
                "expired",
                format!("valid until {}; expired while it was held", rec.not_after),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(state: &str) -> OpRecord {
        OpRecord {
            op_id: "a".repeat(32),
            payload_sha256: "b".repeat(64),
            not_after: 10,
            kind: "stop".into(),
            vmid: Some(101),
            envelope: "{}".into(),
            delivery_id: Some("d-7".into()),
            signers: vec!["alice".into()],
            received_ms: 1_000,
            state: state.into(),
            reason: Some("precondition_failed".into()),
            message: Some("why".into()),
            upids: vec!["UPID:x".into()],
            result: Map::new(),
            intent_ms: Some(2_000),
            finished_ms: Some(3_000),
            spec: Value::Null,
            gate: Value::Null,
        }
    }

    #[test]
    fn a_record_is_reported_held_until_final_and_a_reason_only_when_refused() {
        let held = result_of(&rec("held"), 1);
        assert_eq!(held.state, DecisionState::Held);
        assert_eq!((held.reason, held.finished_at), (None, None));
        // running is still `held` to the hub: the final decision follows
        assert_eq!(result_of(&rec("running"), 2).state, DecisionState::Held);
        let applied = result_of(&rec("applied"), 3);
        assert_eq!(applied.state, DecisionState::Applied);
        assert_eq!(applied.reason, None);
        assert!(applied.finished_at.is_some() && applied.started_at.is_some());
        let refused = result_of(&rec("refused"), 4);
        assert_eq!(refused.reason.as_deref(), Some("precondition_failed"));
        assert_eq!(refused.delivery_id.as_deref(), Some("d-7"));
        assert_eq!(refused.seq, 4);
    }

    #[test]
    fn only_a_well_formed_op_id_is_named_in_a_refusal() {
        let id = "0123456789abcdef0123456789abcdef";
        assert_eq!(
            probe_op_id(format!(r#"{{"op_id":"{id}","x":1}}"#).as_bytes()).as_deref(),
            Some(id)
        );
        for bad in [
            r#"{"op_id":"0123456789ABCDEF0123456789ABCDEF"}"#,
            r#"{"op_id":5}"#,
            r#"{"op":"stop"}"#,
            "not json",
        ] {
            assert_eq!(probe_op_id(bad.as_bytes()), None, "{bad}");
        }
    }

    #[test]
    fn a_refusal_names_the_payload_hash_when_the_payload_decodes() {
        let body = br#"{"v":1}"#;
        let env = format!(
            r#"{{"payloadType":"application/vnd.felhom.op+json","payload":"{}","signatures":[]}}"#,
            felhom_authz::encode_base64(body)
        );
        assert_eq!(
            envelope_sha(env.as_bytes()),
            Some(hex::encode(payload_sha256(body)))
        );
        assert_eq!(envelope_sha(b"garbage"), None);
        let huge = vec![b' '; felhom_authz::MAX_ENVELOPE_BYTES + 1];
        assert_eq!(envelope_sha(&huge), None);
    }
}
