//! The hub's side of signed operations (issue 12): the delivery queue the long poll hands
//! out, the results the agent sends back, the desired-state document it serves, and the
//! ways a compromised hub misbehaves (replay, altered byte, stripped or duplicated
//! signature, reordered queue, older desired generation).
//!
//! Owns: [`OpsState`] (plain data behind the simulator's lock) and the parsing of results
//! ([`WireResult`], the agent's `OpResult` field for field).
//! Must never: look inside an envelope to decide anything (the hub is an untrusted relay;
//! only the misbehaviours touch an envelope, on purpose), re-serialize an envelope it hands
//! out unchanged (it is kept as raw JSON text and served byte for byte), or block: the long
//! poll's waiting is the async server's, woken by [`OpsState::generation`].

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value, json};

/// Path of the long poll (`?wait=N`).
pub const OPS_PATH: &str = "/api/agent/v1/ops";
/// Path results are POSTed to.
pub const RESULT_PATH: &str = "/api/agent/v1/ops/result";
/// Path of the signed desired state.
pub const DESIRED_PATH: &str = "/api/agent/v1/desired";
/// `wait` when the query does not say.
pub const DEFAULT_WAIT_SECONDS: u64 = 25;
/// The longest `wait` honoured.
pub const MAX_WAIT_SECONDS: u64 = 60;

/// What a result is about (the agent's `ResultKind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WireKind {
    Op,
    Desired,
}

/// A decision (the agent's `DecisionState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WireState {
    Held,
    Applied,
    Failed,
    RolledBack,
    Refused,
}

/// One result as `POST /api/agent/v1/ops/result` carries it: exactly the agent's
/// `OpResult` fields (`agent/src/ops/wire.rs`), unknown fields refused. Timestamps are
/// checked to be RFC 3339.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WireResult {
    pub seq: u64,
    pub kind: WireKind,
    pub op_id: Option<String>,
    pub generation: Option<u64>,
    pub payload_sha256: Option<String>,
    pub delivery_id: Option<String>,
    pub state: WireState,
    pub reason: Option<String>,
    pub message: Option<String>,
    pub signers: Vec<String>,
    pub upids: Vec<String>,
    pub result: Map<String, Value>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
}

impl WireResult {
    /// Parses one result, with a message for a 400 when it is malformed.
    pub fn parse(v: &Value) -> Result<WireResult, String> {
        if !v.is_object() {
            return Err("a result is one JSON object".into());
        }
        let r: WireResult =
            serde_json::from_value(v.clone()).map_err(|e| format!("not a result: {e}"))?;
        for (name, t) in [
            ("started_at", &r.started_at),
            ("finished_at", &r.finished_at),
        ] {
            if let Some(t) = t
                && time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
                    .is_err()
            {
                return Err(format!("{name} is not an RFC 3339 time: {t:?}"));
            }
        }
        Ok(r)
    }
}

/// How a result reached the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Via {
    Post,
    Report,
}

/// A stored result, in arrival order.
#[derive(Debug, Clone, Serialize)]
pub struct StoredResult {
    /// 1-based arrival index (`?since=` counts these).
    pub index: u64,
    pub via: Via,
    pub received_at: String,
    pub result: WireResult,
}

/// A result whose `seq` was already stored with different content.
#[derive(Debug, Clone, Serialize)]
pub struct Conflict {
    pub seq: u64,
    pub via: Via,
    pub received_at: String,
    /// What is stored under that seq (the first one wins).
    pub stored: WireResult,
    /// What came now.
    pub offered: WireResult,
}

/// One delivery ever made.
#[derive(Debug, Clone)]
struct DeliveryRecord {
    delivery_id: String,
    envelope: Box<RawValue>,
    /// `enqueue`, or the misbehaviour that made it.
    source: String,
    /// How many long-poll answers carried it.
    handed_out: u64,
    /// When it was made, and when an answer first carried it (RFC 3339, ms precision).
    enqueued_at: String,
    first_handed_out_at: Option<String>,
    /// Whether a result naming it was accepted.
    resulted: bool,
}

/// A desired-state document the hub holds.
#[derive(Debug, Clone)]
pub struct DesiredDoc {
    pub generation: u64,
    /// The whole body of `GET /api/agent/v1/desired`, exactly as set.
    pub body: Vec<u8>,
}

/// `POST /_sim/ops` and `PUT /_sim/desired` bodies: a JSON value or raw text.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnqueueBody {
    #[serde(default)]
    pub envelope: Option<Box<RawValue>>,
    #[serde(default)]
    pub envelope_text: Option<String>,
    #[serde(default)]
    pub delivery_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DesiredBody {
    #[serde(default)]
    pub envelope: Option<Box<RawValue>>,
    #[serde(default)]
    pub envelope_text: Option<String>,
    pub generation: u64,
}

/// `POST /_sim/ops/misbehave`.
#[derive(Debug, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case", deny_unknown_fields)]
pub enum Misbehave {
    Replay {
        delivery_id: String,
    },
    AlterByte {
        delivery_id: String,
        #[serde(default)]
        offset: Option<usize>,
    },
    StripSignature {
        delivery_id: String,
    },
    DuplicateSignature {
        delivery_id: String,
    },
    Reorder,
    RollbackDesired {
        generation: u64,
    },
}

/// A control call's failure: the HTTP status and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlError {
    pub status: u16,
    pub message: String,
}

fn err(status: u16, message: impl Into<String>) -> ControlError {
    ControlError {
        status,
        message: message.into(),
    }
}

/// The ops side of the simulator's state.
#[derive(Debug)]
pub struct OpsState {
    /// `false`: the ops endpoints answer 404 (a hub without the channel).
    pub channel_enabled: bool,
    /// Set: result POSTs are answered with this status and not stored
    /// (`PUT /_sim/ops/result_fault`).
    pub result_fault: Option<u16>,
    /// Delivery ids waiting for a result, in queue order (indexes into `deliveries`).
    pending: VecDeque<usize>,
    deliveries: Vec<DeliveryRecord>,
    next_delivery: u64,
    results: Vec<StoredResult>,
    by_seq: BTreeMap<u64, usize>,
    conflicts: Vec<Conflict>,
    /// Results in reports that were not valid results: the message.
    malformed_in_reports: Vec<String>,
    /// Long-poll requests with the agent token (whatever the answer, 404 included).
    pub polls: u64,
    /// Bumped whenever a delivery becomes pending; a waiting long poll watches it.
    pub generation: u64,
    desired: Option<DesiredDoc>,
    desired_history: Vec<DesiredDoc>,
}

impl Default for OpsState {
    fn default() -> Self {
        OpsState {
            channel_enabled: true,
            result_fault: None,
            pending: VecDeque::new(),
            deliveries: Vec::new(),
            next_delivery: 1,
            results: Vec::new(),
            by_seq: BTreeMap::new(),
            conflicts: Vec::new(),
            malformed_in_reports: Vec::new(),
            polls: 0,
            generation: 0,
            desired: None,
            desired_history: Vec::new(),
        }
    }
}

/// The long poll's answer body for these deliveries: raw envelopes, byte for byte.
#[derive(Serialize)]
struct AnswerItem<'a> {
    delivery_id: &'a str,
    envelope: &'a RawValue,
}

#[derive(Serialize)]
struct Answer<'a> {
    ops: Vec<AnswerItem<'a>>,
}

/// Raw text as a JSON value: itself when it parses as JSON, else a JSON string of it (a
/// garbled delivery the agent must refuse).
fn raw_from_text(text: String) -> Box<RawValue> {
    match RawValue::from_string(text.clone()) {
        Ok(raw) => raw,
        // A JSON string is always valid JSON.
        Err(_) => RawValue::from_string(Value::String(text).to_string()).unwrap_or_default(),
    }
}

impl OpsState {
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// The long poll's answer with every pending delivery (possibly none), counting each
    /// as handed out.
    pub fn answer(&mut self) -> Vec<u8> {
        for &i in &self.pending {
            let d = &mut self.deliveries[i];
            d.handed_out += 1;
            if d.first_handed_out_at.is_none() {
                d.first_handed_out_at = Some(super::now_rfc3339());
            }
        }
        let items: Vec<AnswerItem<'_>> = self
            .pending
            .iter()
            .map(|&i| AnswerItem {
                delivery_id: &self.deliveries[i].delivery_id,
                envelope: &self.deliveries[i].envelope,
            })
            .collect();
        // Serialized directly (not through a `Value`), so each raw envelope stays byte exact.
        serde_json::to_vec(&Answer { ops: items }).unwrap_or_default()
    }

    fn push(&mut self, envelope: Box<RawValue>, id: Option<String>, source: &str) -> String {
        let delivery_id = id.unwrap_or_else(|| {
            let id = format!("d-{}", self.next_delivery);
            self.next_delivery += 1;
            id
        });
        self.deliveries.push(DeliveryRecord {
            delivery_id: delivery_id.clone(),
            envelope,
            source: source.into(),
            handed_out: 0,
            enqueued_at: super::now_rfc3339(),
            first_handed_out_at: None,
            resulted: false,
        });
        self.pending.push_back(self.deliveries.len() - 1);
        self.generation += 1;
        delivery_id
    }

    /// `POST /_sim/ops`.
    pub fn enqueue(&mut self, body: EnqueueBody) -> Result<String, ControlError> {
        let envelope = match (body.envelope, body.envelope_text) {
            (Some(v), None) => v,
            (None, Some(t)) => raw_from_text(t),
            _ => {
                return Err(err(
                    400,
                    "give exactly one of envelope (JSON) or envelope_text (raw text)",
                ));
            }
        };
        Ok(self.push(envelope, body.delivery_id, "enqueue"))
    }

    /// Stores one result (by POST or from a report). `Ok(true)` when it was new.
    pub fn record_result(&mut self, r: WireResult, via: Via) -> bool {
        let now = super::now_rfc3339();
        if let Some(d) = &r.delivery_id {
            self.drop_delivery(d);
        }
        if let Some(&i) = self.by_seq.get(&r.seq) {
            if self.results[i].result != r {
                self.conflicts.push(Conflict {
                    seq: r.seq,
                    via,
                    received_at: now,
                    stored: self.results[i].result.clone(),
                    offered: r,
                });
            }
            return false;
        }
        let index = self.results.len() as u64 + 1;
        self.by_seq.insert(r.seq, self.results.len());
        self.results.push(StoredResult {
            index,
            via,
            received_at: now,
            result: r,
        });
        true
    }

    fn drop_delivery(&mut self, delivery_id: &str) {
        for rec in self
            .deliveries
            .iter_mut()
            .filter(|d| d.delivery_id == delivery_id)
        {
            rec.resulted = true;
        }
        let deliveries = &self.deliveries;
        self.pending
            .retain(|&i| deliveries[i].delivery_id != delivery_id);
    }

    /// A report's `ops.pending_results`, when the report was accepted.
    pub fn results_from_report(&mut self, report: &Value) {
        let Some(list) = report
            .get("ops")
            .and_then(|o| o.get("pending_results"))
            .and_then(Value::as_array)
        else {
            return;
        };
        for v in list {
            match WireResult::parse(v) {
                Ok(r) => {
                    self.record_result(r, Via::Report);
                }
                Err(m) => self.malformed_in_reports.push(m),
            }
        }
    }

    /// The control envelope answered to a report: `has_signed_ops` true while deliveries
    /// are pending, `desired_generation` the served document's.
    pub fn decorate(&self, envelope: &Value) -> Value {
        let mut env = envelope.clone();
        if let Some(obj) = env.as_object_mut() {
            let configured = obj
                .get("has_signed_ops")
                .and_then(Value::as_bool)
                .unwrap_or(false);
            if self.has_pending() || configured {
                obj.insert("has_signed_ops".into(), Value::Bool(true));
            }
            if let Some(d) = &self.desired {
                obj.insert("desired_generation".into(), json!(d.generation));
            }
        }
        env
    }

    pub fn desired(&self) -> Option<&DesiredDoc> {
        self.desired.as_ref()
    }

    /// `PUT /_sim/desired`.
    pub fn set_desired(&mut self, body: DesiredBody) -> Result<(), ControlError> {
        let bytes = match (body.envelope, body.envelope_text) {
            (Some(v), None) => v.get().as_bytes().to_vec(),
            (None, Some(t)) => t.into_bytes(),
            _ => {
                return Err(err(
                    400,
                    "give exactly one of envelope (JSON) or envelope_text (raw text)",
                ));
            }
        };
        let doc = DesiredDoc {
            generation: body.generation,
            body: bytes,
        };
        self.desired_history.push(doc.clone());
        self.desired = Some(doc);
        Ok(())
    }

    pub fn clear_desired(&mut self) {
        self.desired = None;
    }

    /// `DELETE /_sim/ops`: forgets deliveries, results and conflicts (ids keep counting).
    pub fn clear(&mut self) {
        self.pending.clear();
        self.deliveries.clear();
        self.results.clear();
        self.by_seq.clear();
        self.conflicts.clear();
        self.malformed_in_reports.clear();
    }

    fn find(&self, delivery_id: &str) -> Result<&DeliveryRecord, ControlError> {
        self.deliveries
            .iter()
            .rev()
            .find(|d| d.delivery_id == delivery_id)
            .ok_or_else(|| err(404, format!("no delivery {delivery_id:?}")))
    }

    /// The envelope of an earlier delivery as a JSON object, for the misbehaviours that
    /// edit it.
    fn envelope_object(&self, delivery_id: &str) -> Result<Map<String, Value>, ControlError> {
        let rec = self.find(delivery_id)?;
        match serde_json::from_str::<Value>(rec.envelope.get()) {
            Ok(Value::Object(m)) => Ok(m),
            _ => Err(err(
                400,
                format!("delivery {delivery_id:?} is not a JSON object"),
            )),
        }
    }

    fn push_value(&mut self, env: Map<String, Value>, source: &str) -> String {
        let text = Value::Object(env).to_string();
        self.push(raw_from_text(text), None, source)
    }

    fn signatures(env: &mut Map<String, Value>) -> Result<&mut Vec<Value>, ControlError> {
        env.get_mut("signatures")
            .and_then(Value::as_array_mut)
            .ok_or_else(|| err(400, "the envelope has no signatures list"))
    }

    /// `POST /_sim/ops/misbehave`: the answer's JSON.
    pub fn misbehave(&mut self, m: Misbehave) -> Result<Value, ControlError> {
        match m {
            Misbehave::Replay { delivery_id } => {
                let envelope = self.find(&delivery_id)?.envelope.clone();
                let id = self.push(envelope, None, "replay");
                Ok(json!({ "delivery_id": id }))
            }
            Misbehave::AlterByte {
                delivery_id,
                offset,
            } => {
                let mut env = self.envelope_object(&delivery_id)?;
                let payload = env
                    .get("payload")
                    .and_then(Value::as_str)
                    .and_then(felhom_authz::decode_base64)
                    .ok_or_else(|| err(400, "the envelope's payload is not base64"))?;
                if payload.is_empty() {
                    return Err(err(400, "the payload is empty"));
                }
                let mut payload = payload;
                let at = offset.unwrap_or(payload.len() / 2);
                if at >= payload.len() {
                    return Err(err(
                        400,
                        format!(
                            "offset {at} is beyond the payload's {} bytes",
                            payload.len()
                        ),
                    ));
                }
                payload[at] ^= 0x01;
                env.insert(
                    "payload".into(),
                    Value::String(felhom_authz::encode_base64(&payload)),
                );
                let id = self.push_value(env, "alter_byte");
                Ok(json!({ "delivery_id": id, "offset": at }))
            }
            Misbehave::StripSignature { delivery_id } => {
                let mut env = self.envelope_object(&delivery_id)?;
                if Self::signatures(&mut env)?.pop().is_none() {
                    return Err(err(400, "the envelope has no signature to strip"));
                }
                let id = self.push_value(env, "strip_signature");
                Ok(json!({ "delivery_id": id }))
            }
            Misbehave::DuplicateSignature { delivery_id } => {
                let mut env = self.envelope_object(&delivery_id)?;
                let sigs = Self::signatures(&mut env)?;
                let Some(first) = sigs.first().cloned() else {
                    return Err(err(400, "the envelope has no signature to duplicate"));
                };
                sigs.push(first);
                let id = self.push_value(env, "duplicate_signature");
                Ok(json!({ "delivery_id": id }))
            }
            Misbehave::Reorder => {
                self.pending.make_contiguous().reverse();
                let order: Vec<&str> = self
                    .pending
                    .iter()
                    .map(|&i| self.deliveries[i].delivery_id.as_str())
                    .collect();
                Ok(json!({ "pending": order }))
            }
            Misbehave::RollbackDesired { generation } => {
                let doc = self
                    .desired_history
                    .iter()
                    .rev()
                    .find(|d| d.generation == generation)
                    .cloned()
                    .ok_or_else(|| {
                        err(
                            404,
                            format!("no desired document of generation {generation}"),
                        )
                    })?;
                self.desired = Some(doc);
                Ok(json!({ "generation": generation }))
            }
        }
    }

    /// `GET /_sim/ops`.
    pub fn listing(&self) -> Value {
        let pending: Vec<Value> = self
            .pending
            .iter()
            .map(|&i| {
                let d = &self.deliveries[i];
                json!({"delivery_id": d.delivery_id, "envelope": &d.envelope})
            })
            .collect();
        let deliveries: Vec<Value> = self
            .deliveries
            .iter()
            .map(|d| {
                json!({
                    "delivery_id": d.delivery_id,
                    "envelope": &d.envelope,
                    "source": d.source,
                    "handed_out": d.handed_out,
                    "enqueued_at": d.enqueued_at,
                    "first_handed_out_at": d.first_handed_out_at,
                    "resulted": d.resulted,
                })
            })
            .collect();
        json!({
            "channel_enabled": self.channel_enabled,
            "pending": pending,
            "deliveries": deliveries,
        })
    }

    /// `GET /_sim/ops/results?since=K`.
    pub fn results_since(&self, since: u64) -> Value {
        let list: Vec<&StoredResult> = self.results.iter().filter(|r| r.index > since).collect();
        json!({
            "results": list,
            "conflicts": self.conflicts,
            "malformed_in_reports": self.malformed_in_reports,
        })
    }

    /// The ops part of `GET /_sim/state`.
    pub fn summary(&self) -> Value {
        json!({
            "channel_enabled": self.channel_enabled,
            "result_fault": self.result_fault,
            "pending": self.pending.len(),
            "deliveries": self.deliveries.len(),
            "results": self.results.len(),
            "conflicts": self.conflicts,
            "malformed_in_reports": self.malformed_in_reports,
            "polls": self.polls,
            "desired_generation": self.desired.as_ref().map(|d| d.generation),
        })
    }
}
