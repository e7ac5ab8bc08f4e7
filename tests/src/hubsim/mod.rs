//! `felhom-hubsim`: the hub, as far as the agent can tell.
//!
//! Owns the hub's side of the report exchange (`POST /api/agent/v1/report` with a Bearer
//! token, answered by a control envelope), the reports it received, the envelope it
//! answers, and fault injection (error statuses, slow answers, answers that never come,
//! garbage bodies, dropped connections); and the signed-operations channel ([`ops`]: the
//! long poll, results, the desired-state document, a compromised hub's misbehaviour).
//! Tests in other processes drive it under `/_sim/` (see `docs/testbed.md`).
//!
//! The request handling ([`HubSim::handle`]) is separate from the TLS/HTTP serving so it
//! is plain data in, [`Reply`] out. The one thing that waits, the long poll, is
//! [`Reply::WaitOps`]: the server awaits [`HubSim::wait_for_ops`] and calls back into
//! [`HubSim::ops_after_wait`].
//!
//! Must never: listen beyond loopback, accept a report, a poll or a result with a wrong
//! token, or busy-poll while a long poll waits.

pub mod cloudflared;
pub mod control;
pub mod ops;
pub mod server;

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::watch;

use ops::{
    DESIRED_PATH, DesiredBody, EnqueueBody, MAX_WAIT_SECONDS, Misbehave, OPS_PATH, OpsState,
    RESULT_PATH, Via, WireResult,
};

/// Path of the report endpoint.
pub const REPORT_PATH: &str = "/api/agent/v1/report";
/// Largest report body accepted.
pub const MAX_REPORT_BYTES: usize = 16 * 1024 * 1024;

/// What the server does with a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// Answer with this status and JSON (or raw) body, after `delay`.
    Respond {
        status: u16,
        body: Vec<u8>,
        delay: Duration,
    },
    /// Close the connection without answering.
    Drop,
    /// Never answer (until the client gives up or the simulator stops).
    Hang,
    /// A long poll with nothing pending: wait until the ops generation is no longer
    /// `generation` or `wait` passed ([`HubSim::wait_for_ops`]), then answer with
    /// [`HubSim::ops_after_wait`].
    WaitOps { generation: u64, wait: Duration },
}

impl Reply {
    fn json(status: u16, v: &Value) -> Reply {
        Reply::Respond {
            status,
            body: serde_json::to_vec(v).unwrap_or_default(),
            delay: Duration::ZERO,
        }
    }
}

/// A fault applied to report requests, in registration order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    #[serde(default)]
    pub id: u64,
    pub kind: FaultKind,
    /// HTTP status for `status` (default 500).
    #[serde(default)]
    pub status: Option<u16>,
    /// Delay for `slow` (milliseconds).
    #[serde(default)]
    pub delay_ms: Option<u64>,
    /// How many requests it applies to; absent = until cleared.
    #[serde(default)]
    pub times: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// Answer `status` (default 500) with a JSON error body.
    Status,
    /// Answer normally after `delay_ms`.
    Slow,
    /// Never answer.
    Hang,
    /// 200 with a body that is not an envelope.
    Garbage,
    /// Close the connection without an answer.
    DropConnection,
}

/// One report request as received.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Received {
    pub seq: u64,
    pub received_at: String,
    /// `accepted` (200 with the envelope), or the fault that answered it.
    pub outcome: String,
    /// The parsed body (`null` if it was not JSON).
    pub report: Value,
}

#[derive(Debug)]
struct State {
    token: String,
    envelope: Value,
    faults: VecDeque<Fault>,
    next_fault_id: u64,
    received: Vec<Received>,
    next_seq: u64,
    rejected: u64,
    ops: OpsState,
}

/// The simulator's state and request handling.
#[derive(Debug)]
pub struct HubSim {
    admin_token: String,
    state: Mutex<State>,
    /// The ops generation (a delivery became pending), for waiting long polls. Updated
    /// while the state lock is held, so it never lags the state.
    ops_watch: watch::Sender<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChannelBody {
    enabled: bool,
}

/// `PUT /_sim/ops/result_fault`: result POSTs answered `status` (no result stored) while
/// it is set; `null` accepts them again.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResultFaultBody {
    status: Option<u16>,
}

#[derive(Debug, Deserialize)]
struct TokenBody {
    token: String,
}

impl HubSim {
    /// `token` is what agents must send; `admin_token` guards `/_sim/`.
    pub fn new(token: String, admin_token: String, envelope: Value) -> HubSim {
        HubSim {
            admin_token,
            state: Mutex::new(State {
                token,
                envelope,
                faults: VecDeque::new(),
                next_fault_id: 1,
                received: Vec::new(),
                next_seq: 1,
                rejected: 0,
                ops: OpsState::default(),
            }),
            ops_watch: watch::Sender::new(0),
        }
    }

    /// Publishes the ops generation to waiting long polls; called with the lock held.
    fn publish(&self, st: &State) {
        let g = st.ops.generation;
        self.ops_watch.send_if_modified(|cur| {
            let changed = *cur != g;
            *cur = g;
            changed
        });
    }

    /// Waits until the ops generation differs from `generation`, or `wait` passed. Event
    /// driven (a watch channel), never polling.
    pub async fn wait_for_ops(&self, generation: u64, wait: Duration) {
        let mut rx = self.ops_watch.subscribe();
        let _ = tokio::time::timeout(wait, rx.wait_for(|g| *g != generation)).await;
    }

    /// The long poll's answer after waiting: every pending delivery (or none), or 404 when
    /// the channel was switched off meanwhile. `Err(generation)` when nothing is pending
    /// yet (a wake-up whose delivery was resulted meanwhile): wait again from there.
    pub fn ops_after_wait(&self, deadline_passed: bool) -> Result<Reply, u64> {
        let mut st = self.lock();
        if !st.ops.channel_enabled {
            return Ok(no_channel());
        }
        if !st.ops.has_pending() && !deadline_passed {
            return Err(st.ops.generation);
        }
        Ok(Reply::Respond {
            status: 200,
            body: st.ops.answer(),
            delay: Duration::ZERO,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-written in a way
        // that matters to a simulator; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Handles one request. `authorization` is the header's value, if any.
    pub fn handle(
        &self,
        method: &str,
        path_and_query: &str,
        authorization: Option<&str>,
        body: &[u8],
    ) -> Reply {
        let (path, query) = path_and_query
            .split_once('?')
            .unwrap_or((path_and_query, ""));
        if path.starts_with("/_sim/") {
            if authorization.and_then(|a| a.strip_prefix("Bearer "))
                != Some(self.admin_token.as_str())
            {
                return Reply::json(401, &json!({"message": "admin token required"}));
            }
            return self.control(method, path, query, body);
        }
        let only = |m: &str| Reply::json(405, &json!({"message": format!("{m} only")}));
        match path {
            REPORT_PATH if method == "POST" => self.report(authorization, body),
            OPS_PATH if method == "GET" => self.ops_poll(authorization, query),
            RESULT_PATH if method == "POST" => self.post_result(authorization, body),
            DESIRED_PATH if method == "GET" => self.get_desired(authorization),
            REPORT_PATH | RESULT_PATH => only("POST"),
            OPS_PATH | DESIRED_PATH => only("GET"),
            _ => Reply::json(
                404,
                &json!({"message": format!("no route {method} {path}")}),
            ),
        }
    }

    /// Whether `authorization` carries the agent token; counts a wrong one as rejected.
    fn agent_authorized(st: &mut State, authorization: Option<&str>) -> bool {
        let presented = authorization.and_then(|a| a.strip_prefix("Bearer "));
        if presented != Some(st.token.as_str()) {
            st.rejected += 1;
            return false;
        }
        true
    }

    fn ops_poll(&self, authorization: Option<&str>, query: &str) -> Reply {
        let mut st = self.lock();
        if !Self::agent_authorized(&mut st, authorization) {
            return unauthorized();
        }
        st.ops.polls += 1;
        if !st.ops.channel_enabled {
            return no_channel();
        }
        let wait = match query.split('&').find_map(|kv| kv.strip_prefix("wait=")) {
            None => ops::DEFAULT_WAIT_SECONDS,
            Some(v) => match v.parse::<u64>() {
                Ok(n) => n.min(MAX_WAIT_SECONDS),
                Err(_) => {
                    return Reply::json(
                        400,
                        &json!({"message": format!("wait must be whole seconds, not {v:?}")}),
                    );
                }
            },
        };
        if st.ops.has_pending() || wait == 0 {
            return Reply::Respond {
                status: 200,
                body: st.ops.answer(),
                delay: Duration::ZERO,
            };
        }
        Reply::WaitOps {
            generation: st.ops.generation,
            wait: Duration::from_secs(wait),
        }
    }

    fn post_result(&self, authorization: Option<&str>, body: &[u8]) -> Reply {
        let mut st = self.lock();
        if !Self::agent_authorized(&mut st, authorization) {
            return unauthorized();
        }
        if !st.ops.channel_enabled {
            return no_channel();
        }
        if let Some(status) = st.ops.result_fault {
            return Reply::json(status, &json!({"message": "injected result failure"}));
        }
        let parsed = serde_json::from_slice::<Value>(body)
            .map_err(|e| format!("body is not JSON: {e}"))
            .and_then(|v| WireResult::parse(&v));
        match parsed {
            Ok(r) => {
                let seq = r.seq;
                let stored = st.ops.record_result(r, Via::Post);
                self.publish(&st);
                Reply::json(200, &json!({"seq": seq, "stored": stored}))
            }
            Err(m) => Reply::json(400, &json!({ "message": m })),
        }
    }

    fn get_desired(&self, authorization: Option<&str>) -> Reply {
        let mut st = self.lock();
        if !Self::agent_authorized(&mut st, authorization) {
            return unauthorized();
        }
        match st.ops.desired() {
            Some(d) => Reply::Respond {
                status: 200,
                body: d.body.clone(),
                delay: Duration::ZERO,
            },
            None => Reply::json(404, &json!({"message": "no desired state held"})),
        }
    }

    fn report(&self, authorization: Option<&str>, body: &[u8]) -> Reply {
        let mut st = self.lock();
        if !Self::agent_authorized(&mut st, authorization) {
            return unauthorized();
        }
        let fault = match st.faults.front_mut() {
            Some(f) => {
                let f_copy = f.clone();
                if let Some(t) = f.times.as_mut() {
                    *t -= 1;
                    if *t == 0 {
                        st.faults.pop_front();
                    }
                }
                Some(f_copy)
            }
            None => None,
        };
        let report: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        if fault.is_none() && !report.is_object() {
            return Reply::json(400, &json!({"message": "body is not a JSON object"}));
        }
        let outcome = match &fault {
            None => "accepted".to_string(),
            Some(f) if f.kind == FaultKind::Slow => "accepted".to_string(),
            Some(f) => match f.kind {
                FaultKind::Status => format!("status_{}", f.status.unwrap_or(500)),
                other => serde_json::to_value(other)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
            },
        };
        // Results the agent carried in an accepted report count as accepted by the hub.
        let accepted = fault.as_ref().is_none_or(|f| f.kind == FaultKind::Slow);
        if accepted {
            st.ops.results_from_report(&report);
            self.publish(&st);
        }
        let seq = st.next_seq;
        st.next_seq += 1;
        st.received.push(Received {
            seq,
            received_at: now_rfc3339(),
            outcome,
            report,
        });
        let envelope = serde_json::to_vec(&st.ops.decorate(&st.envelope)).unwrap_or_default();
        drop(st);
        match fault {
            None => Reply::Respond {
                status: 200,
                body: envelope,
                delay: Duration::ZERO,
            },
            Some(f) => match f.kind {
                FaultKind::Status => Reply::json(
                    f.status.unwrap_or(500),
                    &json!({"message": "injected failure"}),
                ),
                FaultKind::Slow => Reply::Respond {
                    status: 200,
                    body: envelope,
                    delay: Duration::from_millis(f.delay_ms.unwrap_or(1000)),
                },
                FaultKind::Hang => Reply::Hang,
                FaultKind::Garbage => Reply::Respond {
                    status: 200,
                    body: b"<html>502 proxy says hello</html>".to_vec(),
                    delay: Duration::ZERO,
                },
                FaultKind::DropConnection => Reply::Drop,
            },
        }
    }

    fn control(&self, method: &str, path: &str, query: &str, body: &[u8]) -> Reply {
        let mut st = self.lock();
        let reply = Self::control_locked(&mut st, method, path, query, body);
        self.publish(&st);
        reply
    }

    fn control_locked(st: &mut State, method: &str, path: &str, query: &str, body: &[u8]) -> Reply {
        let bad = |m: String| Reply::json(400, &json!({ "message": m }));
        let since = || {
            query
                .split('&')
                .find_map(|kv| kv.strip_prefix("since="))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let control_err =
            |e: ops::ControlError| Reply::json(e.status, &json!({ "message": e.message }));
        match (method, path) {
            ("PUT", "/_sim/ops/channel") => match serde_json::from_slice::<ChannelBody>(body) {
                Ok(c) => {
                    st.ops.channel_enabled = c.enabled;
                    Reply::json(200, &json!({}))
                }
                Err(e) => bad(format!("expected {{\"enabled\": bool}}: {e}")),
            },
            ("PUT", "/_sim/ops/result_fault") => {
                match serde_json::from_slice::<ResultFaultBody>(body) {
                    Ok(ResultFaultBody { status: Some(s) }) if !(400..600).contains(&s) => {
                        bad(format!("status must be an error status (400-599), not {s}"))
                    }
                    Ok(f) => {
                        st.ops.result_fault = f.status;
                        Reply::json(200, &json!({}))
                    }
                    Err(e) => bad(format!("expected {{\"status\": N or null}}: {e}")),
                }
            }
            ("POST", "/_sim/ops") => match serde_json::from_slice::<EnqueueBody>(body) {
                Ok(b) => match st.ops.enqueue(b) {
                    Ok(id) => Reply::json(200, &json!({ "delivery_id": id })),
                    Err(e) => control_err(e),
                },
                Err(e) => bad(format!("not an enqueue request: {e}")),
            },
            ("GET", "/_sim/ops") => Reply::json(200, &st.ops.listing()),
            ("DELETE", "/_sim/ops") => {
                st.ops.clear();
                Reply::json(200, &json!({}))
            }
            ("GET", "/_sim/ops/results") => Reply::json(200, &st.ops.results_since(since())),
            ("POST", "/_sim/ops/misbehave") => match serde_json::from_slice::<Misbehave>(body) {
                Ok(m) => match st.ops.misbehave(m) {
                    Ok(v) => Reply::json(200, &v),
                    Err(e) => control_err(e),
                },
                Err(e) => bad(format!("not a misbehaviour: {e}")),
            },
            ("PUT", "/_sim/desired") => match serde_json::from_slice::<DesiredBody>(body) {
                Ok(b) => match st.ops.set_desired(b) {
                    Ok(()) => Reply::json(200, &json!({})),
                    Err(e) => control_err(e),
                },
                Err(e) => bad(format!("not a desired document: {e}")),
            },
            ("GET", "/_sim/desired") => match st.ops.desired() {
                Some(d) => Reply::json(
                    200,
                    &json!({
                        "generation": d.generation,
                        "envelope_text": String::from_utf8_lossy(&d.body),
                    }),
                ),
                None => Reply::json(404, &json!({"message": "no desired state held"})),
            },
            ("DELETE", "/_sim/desired") => {
                st.ops.clear_desired();
                Reply::json(200, &json!({}))
            }
            ("GET", "/_sim/reports") => {
                let since = since();
                let list: Vec<&Received> = st.received.iter().filter(|r| r.seq > since).collect();
                Reply::json(200, &json!({ "reports": list }))
            }
            ("DELETE", "/_sim/reports") => {
                st.received.clear();
                Reply::json(200, &json!({}))
            }
            ("GET", "/_sim/envelope") => Reply::json(200, &st.envelope.clone()),
            ("PUT", "/_sim/envelope") => match serde_json::from_slice::<Value>(body) {
                Ok(v) => {
                    st.envelope = v;
                    Reply::json(200, &json!({}))
                }
                Err(e) => bad(format!("envelope is not JSON: {e}")),
            },
            ("POST", "/_sim/faults") => match serde_json::from_slice::<Fault>(body) {
                Ok(mut f) => {
                    if f.times == Some(0) {
                        return bad("times must be at least 1".into());
                    }
                    f.id = st.next_fault_id;
                    st.next_fault_id += 1;
                    let id = f.id;
                    st.faults.push_back(f);
                    Reply::json(200, &json!({ "id": id }))
                }
                Err(e) => bad(format!("not a fault: {e}")),
            },
            ("DELETE", "/_sim/faults") => {
                st.faults.clear();
                Reply::json(200, &json!({}))
            }
            ("PUT", "/_sim/token") => match serde_json::from_slice::<TokenBody>(body) {
                Ok(t) if !t.token.is_empty() => {
                    st.token = t.token;
                    Reply::json(200, &json!({}))
                }
                _ => bad("expected {\"token\": \"…\"}".into()),
            },
            ("GET", "/_sim/state") => Reply::json(
                200,
                &json!({
                    "reports_received": st.received.len(),
                    "rejected": st.rejected,
                    "envelope": st.envelope,
                    "faults": st.faults,
                    "ops": st.ops.summary(),
                }),
            ),
            _ => Reply::json(
                404,
                &json!({"message": format!("no route {method} {path}")}),
            ),
        }
    }
}

fn unauthorized() -> Reply {
    Reply::json(401, &json!({"message": "invalid or missing bearer token"}))
}

fn no_channel() -> Reply {
    Reply::json(
        404,
        &json!({"message": "this hub has no signed-operations channel"}),
    )
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sim() -> HubSim {
        HubSim::new(
            "tok".into(),
            "adm".into(),
            json!({"poll_interval_seconds": 60}),
        )
    }

    fn status(r: &Reply) -> u16 {
        match r {
            Reply::Respond { status, .. } => *status,
            _ => 0,
        }
    }

    #[test]
    fn bearer_is_checked_and_reports_are_stored() {
        let s = sim();
        assert_eq!(status(&s.handle("POST", REPORT_PATH, None, b"{}")), 401);
        assert_eq!(
            status(&s.handle("POST", REPORT_PATH, Some("Bearer nope"), b"{}")),
            401
        );
        let r = s.handle(
            "POST",
            REPORT_PATH,
            Some("Bearer tok"),
            br#"{"node":"pve1"}"#,
        );
        match r {
            Reply::Respond {
                status: 200, body, ..
            } => {
                assert_eq!(
                    serde_json::from_slice::<Value>(&body).unwrap()["poll_interval_seconds"],
                    60
                )
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            status(&s.handle("POST", REPORT_PATH, Some("Bearer tok"), b"nope")),
            400
        );
        let list = s.handle("GET", "/_sim/reports?since=0", Some("Bearer adm"), b"");
        let Reply::Respond { body, .. } = list else {
            panic!()
        };
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["reports"].as_array().unwrap().len(), 1);
        assert_eq!(v["reports"][0]["report"]["node"], "pve1");
        // the agent token does not open /_sim/
        assert_eq!(
            status(&s.handle("GET", "/_sim/state", Some("Bearer tok"), b"")),
            401
        );
    }

    #[test]
    fn faults_apply_in_order_and_run_out() {
        let s = sim();
        for f in [
            r#"{"kind":"status","status":503,"times":1}"#,
            r#"{"kind":"garbage","times":1}"#,
            r#"{"kind":"hang","times":1}"#,
            r#"{"kind":"drop_connection","times":1}"#,
            r#"{"kind":"slow","delay_ms":5,"times":1}"#,
        ] {
            assert_eq!(
                status(&s.handle("POST", "/_sim/faults", Some("Bearer adm"), f.as_bytes())),
                200
            );
        }
        let post = || s.handle("POST", REPORT_PATH, Some("Bearer tok"), b"{}");
        assert_eq!(status(&post()), 503);
        assert!(
            matches!(post(), Reply::Respond { status: 200, ref body, .. } if body.starts_with(b"<html>"))
        );
        assert_eq!(post(), Reply::Hang);
        assert_eq!(post(), Reply::Drop);
        assert!(
            matches!(post(), Reply::Respond { status: 200, delay, .. } if delay == Duration::from_millis(5))
        );
        assert!(matches!(post(), Reply::Respond { status: 200, delay, .. } if delay.is_zero()));
        let Reply::Respond { body, .. } = s.handle("GET", "/_sim/reports", Some("Bearer adm"), b"")
        else {
            panic!()
        };
        let v: Value = serde_json::from_slice(&body).unwrap();
        let outcomes: Vec<&str> = v["reports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["outcome"].as_str().unwrap())
            .collect();
        assert_eq!(
            outcomes,
            [
                "status_503",
                "garbage",
                "hang",
                "drop_connection",
                "accepted",
                "accepted"
            ]
        );
    }

    #[test]
    fn token_and_envelope_can_be_changed() {
        let s = sim();
        s.handle(
            "PUT",
            "/_sim/token",
            Some("Bearer adm"),
            br#"{"token":"new"}"#,
        );
        assert_eq!(
            status(&s.handle("POST", REPORT_PATH, Some("Bearer tok"), b"{}")),
            401
        );
        s.handle(
            "PUT",
            "/_sim/envelope",
            Some("Bearer adm"),
            br#"{"blocked":true,"x":1}"#,
        );
        let r = s.handle("POST", REPORT_PATH, Some("Bearer new"), b"{}");
        let Reply::Respond { body, .. } = r else {
            panic!()
        };
        assert_eq!(
            serde_json::from_slice::<Value>(&body).unwrap(),
            json!({"blocked":true,"x":1})
        );
    }

    // ---- signed operations ----

    fn body_of(r: &Reply) -> Value {
        match r {
            Reply::Respond { body, .. } => serde_json::from_slice(body).unwrap_or(Value::Null),
            other => panic!("not an answer: {other:?}"),
        }
    }

    fn adm(s: &HubSim, method: &str, path: &str, body: &str) -> (u16, Value) {
        let r = s.handle(method, path, Some("Bearer adm"), body.as_bytes());
        (status(&r), body_of(&r))
    }

    fn poll(s: &HubSim, query: &str) -> Reply {
        s.handle(
            "GET",
            &format!("{OPS_PATH}{query}"),
            Some("Bearer tok"),
            b"",
        )
    }

    fn result_json(seq: u64, delivery: Option<&str>, state: &str) -> Value {
        json!({
            "seq": seq, "kind": "op", "op_id": "0123456789abcdef0123456789abcdef",
            "generation": null, "payload_sha256": "ab".repeat(32),
            "delivery_id": delivery, "state": state, "reason": null, "message": null,
            "signers": ["alice"], "upids": [], "result": {},
            "started_at": "2026-01-02T03:04:05Z", "finished_at": null
        })
    }

    fn post_result(s: &HubSim, v: &Value) -> Reply {
        s.handle(
            "POST",
            RESULT_PATH,
            Some("Bearer tok"),
            v.to_string().as_bytes(),
        )
    }

    /// An envelope-shaped value with a base64 payload and two signatures.
    const ENV: &str = r#"{"payloadType":"application/vnd.felhom.op+json","payload":"eyJ2IjoxfQ==","signatures":[{"keyid":"a","sig":"AAAA"},{"keyid":"b","sig":"BBBB"}]}"#;

    fn enqueue(s: &HubSim, text: &str) -> String {
        let (st, v) = adm(
            s,
            "POST",
            "/_sim/ops",
            &json!({ "envelope_text": text }).to_string(),
        );
        assert_eq!(st, 200, "{v}");
        v["delivery_id"].as_str().unwrap().to_string()
    }

    #[test]
    fn long_poll_answers_every_pending_delivery_in_order_byte_exact() {
        let s = sim();
        // wrong token
        assert_eq!(
            status(&s.handle("GET", OPS_PATH, Some("Bearer nope"), b"")),
            401
        );
        // nothing pending: the server is told to wait, default 25 s, capped at 60 s
        assert!(matches!(
            poll(&s, ""),
            Reply::WaitOps { wait, .. } if wait == Duration::from_secs(25)
        ));
        assert!(matches!(
            poll(&s, "?wait=600"),
            Reply::WaitOps { wait, .. } if wait == Duration::from_secs(60)
        ));
        assert_eq!(status(&poll(&s, "?wait=x")), 400);
        assert_eq!(body_of(&poll(&s, "?wait=0")), json!({"ops": []}));
        // A byte-exact envelope with odd spacing survives as is.
        let spaced = "{ \"payloadType\" : \"t\",\n \"payload\":\"AA==\", \"signatures\":[] }";
        let d1 = enqueue(&s, spaced);
        let (st, v) = adm(
            &s,
            "POST",
            "/_sim/ops",
            &json!({"envelope": {"x": 1}, "delivery_id": "mine"}).to_string(),
        );
        assert_eq!((st, v), (200, json!({"delivery_id": "mine"})));
        let d3 = enqueue(&s, "not json at all");
        assert_eq!((d1.as_str(), d3.as_str()), ("d-1", "d-2"));
        let Reply::Respond {
            status: 200, body, ..
        } = poll(&s, "?wait=25")
        else {
            panic!("pending deliveries are answered at once")
        };
        let text = String::from_utf8(body).unwrap();
        assert!(text.contains(spaced), "{text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        let ids: Vec<&str> = v["ops"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["delivery_id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["d-1", "mine", "d-2"]);
        assert_eq!(v["ops"][1]["envelope"], json!({"x": 1}));
        // text that is not JSON travels as a JSON string (a garbled delivery)
        assert_eq!(v["ops"][2]["envelope"], json!("not json at all"));
        // The agent's own parser takes the answer, and sees the raw envelope unchanged.
        let parsed: felhom_agent::ops::wire::OpsAnswer = serde_json::from_str(&text).unwrap();
        assert_eq!(parsed.ops[0].envelope.get(), spaced);
        assert_eq!(parsed.ops[0].delivery_id().as_deref(), Some("d-1"));
        // still pending until resulted
        assert_eq!(body_of(&poll(&s, "")), v);
        // exactly one of envelope / envelope_text
        assert_eq!(
            adm(
                &s,
                "POST",
                "/_sim/ops",
                r#"{"envelope":{},"envelope_text":"{}"}"#
            )
            .0,
            400
        );
        assert_eq!(adm(&s, "POST", "/_sim/ops", "{}").0, 400);
    }

    #[test]
    fn results_are_validated_stored_by_seq_and_drop_their_delivery() {
        let s = sim();
        let d1 = enqueue(&s, ENV);
        let d2 = enqueue(&s, ENV);
        assert_eq!(
            status(&s.handle(
                "POST",
                RESULT_PATH,
                Some("Bearer bad"),
                result_json(1, Some(&d1), "held").to_string().as_bytes()
            )),
            401
        );
        // malformed: not JSON, unknown field, missing field, wrong state, wrong kind,
        // a seq that is not u64, a time that is not RFC 3339, an array
        let mut unknown = result_json(1, Some(&d1), "held");
        unknown["extra"] = json!(1);
        let mut missing = result_json(1, Some(&d1), "held");
        missing.as_object_mut().unwrap().remove("signers");
        let mut kind = result_json(1, Some(&d1), "held");
        kind["kind"] = json!("other");
        let mut seq = result_json(1, Some(&d1), "held");
        seq["seq"] = json!(-1);
        let mut t = result_json(1, Some(&d1), "held");
        t["finished_at"] = json!("yesterday");
        for bad in [
            unknown,
            missing,
            result_json(1, Some(&d1), "done"),
            kind,
            seq,
            t,
            json!([result_json(1, Some(&d1), "held")]),
        ] {
            let r = post_result(&s, &bad);
            assert_eq!(status(&r), 400, "{bad}");
            assert!(body_of(&r)["message"].as_str().unwrap().len() > 5);
        }
        assert_eq!(
            status(&s.handle("POST", RESULT_PATH, Some("Bearer tok"), b"{nope")),
            400
        );
        // nothing was dropped by the malformed ones
        assert_eq!(body_of(&poll(&s, ""))["ops"].as_array().unwrap().len(), 2);

        let held = result_json(1, Some(&d1), "held");
        assert_eq!(
            body_of(&post_result(&s, &held)),
            json!({"seq": 1, "stored": true})
        );
        // d-1 is gone, d-2 stays
        let v = body_of(&poll(&s, ""));
        assert_eq!(v["ops"].as_array().unwrap().len(), 1);
        assert_eq!(v["ops"][0]["delivery_id"], d2.as_str());
        // the same seq again, same content: the same result, not stored twice
        assert_eq!(
            body_of(&post_result(&s, &held)),
            json!({"seq": 1, "stored": false})
        );
        // the same seq with different content: a conflict, answered 200
        let other = result_json(1, Some(&d1), "applied");
        assert_eq!(status(&post_result(&s, &other)), 200);
        let (_, r) = adm(&s, "GET", "/_sim/ops/results", "");
        assert_eq!(r["results"].as_array().unwrap().len(), 1);
        assert_eq!(r["results"][0]["index"], 1);
        assert_eq!(r["results"][0]["via"], "post");
        assert_eq!(r["results"][0]["result"], held);
        assert_eq!(r["conflicts"][0]["seq"], 1);
        assert_eq!(r["conflicts"][0]["stored"]["state"], "held");
        assert_eq!(r["conflicts"][0]["offered"]["state"], "applied");
        let (_, st) = adm(&s, "GET", "/_sim/state", "");
        assert_eq!(st["ops"]["conflicts"].as_array().unwrap().len(), 1);
        assert_eq!(st["ops"]["results"], 1);

        // A result the agent's own types serialize is accepted as is.
        let agent: felhom_agent::ops::wire::OpResult =
            serde_json::from_value(result_json(2, Some(&d2), "refused")).unwrap();
        assert_eq!(
            status(&post_result(&s, &serde_json::to_value(&agent).unwrap())),
            200
        );
        assert_eq!(body_of(&poll(&s, "?wait=0")), json!({"ops": []}));
        let (_, r) = adm(&s, "GET", "/_sim/ops/results?since=1", "");
        assert_eq!(r["results"].as_array().unwrap().len(), 1);
        assert_eq!(r["results"][0]["index"], 2);
        // the listing marks both deliveries resulted
        let (_, l) = adm(&s, "GET", "/_sim/ops", "");
        assert_eq!(l["pending"], json!([]));
        assert!(
            l["deliveries"]
                .as_array()
                .unwrap()
                .iter()
                .all(|d| d["resulted"] == true
                    && d["handed_out"].as_u64().unwrap() >= 1
                    && d["enqueued_at"].is_string()
                    && d["first_handed_out_at"].is_string())
        );
        // clearing forgets results too
        assert_eq!(adm(&s, "DELETE", "/_sim/ops", "").0, 200);
        let (_, r) = adm(&s, "GET", "/_sim/ops/results", "");
        assert_eq!(r["results"], json!([]));
        assert_eq!(enqueue(&s, ENV), "d-3");
    }

    #[test]
    fn results_in_an_accepted_report_count_like_posted_ones() {
        let s = sim();
        let d1 = enqueue(&s, ENV);
        let d2 = enqueue(&s, ENV);
        // the control envelope says there are operations
        let report = |body: &Value| {
            body_of(&s.handle(
                "POST",
                REPORT_PATH,
                Some("Bearer tok"),
                body.to_string().as_bytes(),
            ))
        };
        assert_eq!(report(&json!({}))["has_signed_ops"], true);
        // a report the hub did not accept (injected 503) carries nothing
        adm(
            &s,
            "POST",
            "/_sim/faults",
            r#"{"kind":"status","status":503,"times":1}"#,
        );
        let with = json!({"ops": {"enabled": true, "signers": [], "held": [],
            "pending_results": [result_json(7, Some(&d1), "held"), {"seq": "x"}]}});
        let r = s.handle(
            "POST",
            REPORT_PATH,
            Some("Bearer tok"),
            with.to_string().as_bytes(),
        );
        assert_eq!(status(&r), 503);
        assert_eq!(body_of(&poll(&s, ""))["ops"].as_array().unwrap().len(), 2);
        // accepted: the valid one is stored and its delivery dropped, the bad one noted
        let env = report(&with);
        assert_eq!(env["has_signed_ops"], true, "d-2 still pending");
        let (_, r) = adm(&s, "GET", "/_sim/ops/results", "");
        assert_eq!(r["results"].as_array().unwrap().len(), 1);
        assert_eq!(r["results"][0]["via"], "report");
        assert_eq!(r["malformed_in_reports"].as_array().unwrap().len(), 1);
        // the same again (the agent re-sends until it sees the acceptance): not twice
        report(&with);
        let (_, r) = adm(&s, "GET", "/_sim/ops/results", "");
        assert_eq!(r["results"].as_array().unwrap().len(), 1);
        assert_eq!(r["conflicts"], json!([]));
        let v = body_of(&poll(&s, ""));
        assert_eq!(v["ops"][0]["delivery_id"], d2.as_str());
        post_result(&s, &result_json(8, Some(&d2), "refused"));
        // nothing pending: has_signed_ops false, unless the configured envelope says so
        assert_eq!(report(&json!({})).get("has_signed_ops"), None);
        adm(
            &s,
            "PUT",
            "/_sim/envelope",
            r#"{"has_signed_ops":true,"desired_generation":1}"#,
        );
        let env = report(&json!({}));
        assert_eq!(
            (
                env["has_signed_ops"].clone(),
                env["desired_generation"].clone()
            ),
            (json!(true), json!(1))
        );
    }

    #[test]
    fn desired_document_is_served_byte_exact_and_named_in_the_envelope() {
        let s = sim();
        let get = || s.handle("GET", DESIRED_PATH, Some("Bearer tok"), b"");
        assert_eq!(status(&get()), 404);
        assert_eq!(
            status(&s.handle("GET", DESIRED_PATH, Some("Bearer x"), b"")),
            401
        );
        let doc3 = "{\"payloadType\":\"d\", \"payload\":\"AA\",\"signatures\":[]}\n";
        let (st, _) = adm(
            &s,
            "PUT",
            "/_sim/desired",
            &json!({"envelope_text": doc3, "generation": 3}).to_string(),
        );
        assert_eq!(st, 200);
        assert!(
            matches!(get(), Reply::Respond { status: 200, ref body, .. } if body == doc3.as_bytes())
        );
        let report = || body_of(&s.handle("POST", REPORT_PATH, Some("Bearer tok"), b"{}"));
        assert_eq!(report()["desired_generation"], 3);
        assert_eq!(report()["poll_interval_seconds"], 60);
        adm(
            &s,
            "PUT",
            "/_sim/desired",
            &json!({"envelope": {"g": 4}, "generation": 4}).to_string(),
        );
        assert!(
            matches!(get(), Reply::Respond { status: 200, ref body, .. } if body == br#"{"g": 4}"# || body == br#"{"g":4}"#)
        );
        assert_eq!(report()["desired_generation"], 4);
        // a compromised hub serves the older document again, and says so
        let (st, v) = adm(
            &s,
            "POST",
            "/_sim/ops/misbehave",
            r#"{"action":"rollback_desired","generation":3}"#,
        );
        assert_eq!((st, v), (200, json!({"generation": 3})));
        assert!(
            matches!(get(), Reply::Respond { status: 200, ref body, .. } if body == doc3.as_bytes())
        );
        assert_eq!(report()["desired_generation"], 3);
        assert_eq!(
            adm(
                &s,
                "POST",
                "/_sim/ops/misbehave",
                r#"{"action":"rollback_desired","generation":9}"#
            )
            .0,
            404
        );
        assert_eq!(adm(&s, "GET", "/_sim/desired", "").1["generation"], 3);
        assert_eq!(
            adm(&s, "PUT", "/_sim/desired", r#"{"envelope_text":"x"}"#).0,
            400
        );
        adm(&s, "DELETE", "/_sim/desired", "");
        assert_eq!(status(&get()), 404);
        assert_eq!(report().get("desired_generation"), None);
    }

    #[test]
    fn switched_off_channel_answers_404() {
        let s = sim();
        enqueue(&s, ENV);
        assert_eq!(
            adm(&s, "PUT", "/_sim/ops/channel", r#"{"enabled":false}"#).0,
            200
        );
        assert_eq!(status(&poll(&s, "?wait=0")), 404);
        assert_eq!(
            status(&post_result(&s, &result_json(1, Some("d-1"), "held"))),
            404
        );
        assert_eq!(s.ops_after_wait(true), Ok(no_channel()));
        assert_eq!(
            adm(&s, "GET", "/_sim/state", "").1["ops"]["channel_enabled"],
            false
        );
        assert_eq!(adm(&s, "PUT", "/_sim/ops/channel", r#"{"on":1}"#).0, 400);
        adm(&s, "PUT", "/_sim/ops/channel", r#"{"enabled":true}"#);
        assert_eq!(status(&poll(&s, "")), 200);
        // the 404 and the 200 both count: a test can see whether an agent keeps polling
        assert_eq!(adm(&s, "GET", "/_sim/state", "").1["ops"]["polls"], 2);
    }

    #[test]
    fn result_fault_refuses_result_posts_until_cleared() {
        let s = sim();
        let d = enqueue(&s, ENV);
        assert_eq!(
            adm(&s, "PUT", "/_sim/ops/result_fault", r#"{"status":503}"#).0,
            200
        );
        assert_eq!(
            status(&post_result(&s, &result_json(1, Some(&d), "held"))),
            503
        );
        // nothing stored, the delivery still pending
        assert_eq!(
            adm(&s, "GET", "/_sim/ops/results", "").1["results"],
            json!([])
        );
        assert_eq!(status(&poll(&s, "?wait=0")), 200);
        assert_eq!(
            adm(&s, "GET", "/_sim/ops", "").1["pending"][0]["delivery_id"],
            d
        );
        assert_eq!(
            adm(&s, "PUT", "/_sim/ops/result_fault", r#"{"status":200}"#).0,
            400
        );
        assert_eq!(
            adm(&s, "PUT", "/_sim/ops/result_fault", r#"{"status":null}"#).0,
            200
        );
        assert_eq!(
            status(&post_result(&s, &result_json(1, Some(&d), "held"))),
            200
        );
        assert_eq!(adm(&s, "GET", "/_sim/ops", "").1["pending"], json!([]));
    }

    fn decoded_payload(env: &Value) -> Vec<u8> {
        felhom_authz::decode_base64(env["payload"].as_str().unwrap()).unwrap()
    }

    #[test]
    fn misbehaviours_make_the_promised_copies() {
        let s = sim();
        let d1 = enqueue(&s, ENV);
        let orig: Value = serde_json::from_str(ENV).unwrap();
        // resulted first: a replay still works
        post_result(&s, &result_json(1, Some(&d1), "applied"));
        let mis = |body: Value| adm(&s, "POST", "/_sim/ops/misbehave", &body.to_string());
        let (st, v) = mis(json!({"action": "replay", "delivery_id": d1}));
        assert_eq!((st, v["delivery_id"].as_str()), (200, Some("d-2")));
        let (_, v) = mis(json!({"action": "alter_byte", "delivery_id": d1}));
        assert_eq!(v, json!({"delivery_id": "d-3", "offset": 3}));
        let (_, v) = mis(json!({"action": "alter_byte", "delivery_id": d1, "offset": 0}));
        assert_eq!(v["delivery_id"], "d-4");
        assert_eq!(
            mis(json!({"action": "alter_byte", "delivery_id": d1, "offset": 8})).0,
            400
        );
        mis(json!({"action": "strip_signature", "delivery_id": d1}));
        mis(json!({"action": "duplicate_signature", "delivery_id": d1}));
        assert_eq!(
            mis(json!({"action": "replay", "delivery_id": "nope"})).0,
            404
        );
        assert_eq!(mis(json!({"action": "explode"})).0, 400);
        let Reply::Respond { body, .. } = poll(&s, "") else {
            panic!()
        };
        let text = String::from_utf8(body).unwrap();
        // the replay is byte for byte the original envelope
        assert!(
            text.contains(&format!(r#"{{"delivery_id":"d-2","envelope":{ENV}}}"#)),
            "{text}"
        );
        let v: Value = serde_json::from_str(&text).unwrap();
        let by_id = |id: &str| {
            v["ops"]
                .as_array()
                .unwrap()
                .iter()
                .find(|d| d["delivery_id"] == id)
                .unwrap()["envelope"]
                .clone()
        };
        let p = decoded_payload(&orig);
        let mut mid = p.clone();
        mid[3] ^= 1;
        assert_eq!(decoded_payload(&by_id("d-3")), mid);
        assert_eq!(by_id("d-3")["signatures"], orig["signatures"]);
        let mut first = p.clone();
        first[0] ^= 1;
        assert_eq!(decoded_payload(&by_id("d-4")), first);
        assert_eq!(
            by_id("d-5")["signatures"],
            json!([orig["signatures"][0].clone()])
        );
        assert_eq!(by_id("d-5")["payload"], orig["payload"]);
        assert_eq!(
            by_id("d-6")["signatures"],
            json!([
                orig["signatures"][0].clone(),
                orig["signatures"][1].clone(),
                orig["signatures"][0].clone()
            ])
        );
        // reorder reverses the pending queue
        let (_, v) = mis(json!({"action": "reorder"}));
        assert_eq!(v["pending"], json!(["d-6", "d-5", "d-4", "d-3", "d-2"]));
        let order: Vec<String> = body_of(&poll(&s, ""))["ops"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["delivery_id"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(order, ["d-6", "d-5", "d-4", "d-3", "d-2"]);
        let (_, l) = adm(&s, "GET", "/_sim/ops", "");
        let sources: Vec<&str> = l["deliveries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["source"].as_str().unwrap())
            .collect();
        assert_eq!(
            sources,
            [
                "enqueue",
                "replay",
                "alter_byte",
                "alter_byte",
                "strip_signature",
                "duplicate_signature"
            ]
        );
        // an envelope without signatures / payload cannot be edited that way
        let bare = enqueue(&s, "[1]");
        assert_eq!(
            mis(json!({"action": "strip_signature", "delivery_id": bare})).0,
            400
        );
        assert_eq!(
            mis(json!({"action": "alter_byte", "delivery_id": bare})).0,
            400
        );
    }

    #[test]
    fn an_enqueue_wakes_a_waiting_poll_through_the_watch() {
        let s = sim();
        let Reply::WaitOps { generation, .. } = poll(&s, "?wait=5") else {
            panic!()
        };
        let mut rx = s.ops_watch.subscribe();
        assert_eq!(*rx.borrow_and_update(), generation);
        // nothing new: a wake-up finds nothing and says where to wait from
        assert_eq!(s.ops_after_wait(false), Err(generation));
        enqueue(&s, ENV);
        assert!(rx.has_changed().unwrap());
        assert_ne!(*rx.borrow(), generation);
        assert_eq!(
            body_of(&s.ops_after_wait(false).unwrap())["ops"][0]["delivery_id"],
            "d-1"
        );
    }
}
