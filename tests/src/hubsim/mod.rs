//! `felhom-hubsim`: the hub, as far as the agent can tell.
//!
//! Owns the hub's side of the report exchange (`POST /api/agent/v1/report` with a Bearer
//! token, answered by a control envelope), the reports it received, the envelope it
//! answers, and fault injection (error statuses, slow answers, answers that never come,
//! garbage bodies, dropped connections). Tests in other processes drive it under `/_sim/`
//! (see `docs/testbed.md`).
//!
//! The request handling ([`HubSim::handle`]) is separate from the TLS/HTTP serving so it
//! is plain data in, [`Reply`] out.
//!
//! Must never: listen beyond loopback, or accept a report with a wrong token.

pub mod cloudflared;
pub mod server;

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

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
}

/// The simulator's state and request handling.
#[derive(Debug)]
pub struct HubSim {
    admin_token: String,
    state: Mutex<State>,
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
            }),
        }
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
        if path != REPORT_PATH {
            return Reply::json(
                404,
                &json!({"message": format!("no route {method} {path}")}),
            );
        }
        if method != "POST" {
            return Reply::json(405, &json!({"message": "POST only"}));
        }
        self.report(authorization, body)
    }

    fn report(&self, authorization: Option<&str>, body: &[u8]) -> Reply {
        let mut st = self.lock();
        let presented = authorization.and_then(|a| a.strip_prefix("Bearer "));
        if presented != Some(st.token.as_str()) {
            st.rejected += 1;
            return Reply::json(401, &json!({"message": "invalid or missing bearer token"}));
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
        let seq = st.next_seq;
        st.next_seq += 1;
        st.received.push(Received {
            seq,
            received_at: now_rfc3339(),
            outcome,
            report,
        });
        let envelope = serde_json::to_vec(&st.envelope).unwrap_or_default();
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
        let bad = |m: String| Reply::json(400, &json!({ "message": m }));
        let mut st = self.lock();
        match (method, path) {
            ("GET", "/_sim/reports") => {
                let since = query
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("since="))
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0);
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
                }),
            ),
            _ => Reply::json(
                404,
                &json!({"message": format!("no route {method} {path}")}),
            ),
        }
    }
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
}
