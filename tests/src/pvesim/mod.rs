//! `felhom-pvesim`: a Proxmox VE node in one process, faithful on the endpoints the agent
//! uses (see `docs/testbed.md` for the contract and the list of what is not modelled).
//!
//! Background: the agent must be tested against PVE's real behaviour (reason phrases,
//! string vmids on old versions, asynchronous tasks, privilege checks, round-trip quirks)
//! without a real node. Design: one state struct behind a mutex, synchronous handlers
//! that follow the Perl sources' order of checks, tasks finished by timers on the
//! runtime, and a separate control API under `/_sim/` for tests in other processes.
//!
//! This module owns the request pipeline: authentication, the request log, faults,
//! latency, dispatch and PVE's response form. Must never: block the runtime while
//! waiting (latency is a coarse async sleep plus a precise tail on the blocking pool,
//! [`crate::http::sleep_until_precise`]; the 401 delay an async sleep), or let an admin
//! token reach the PVE API or a PVE token reach `/_sim/`.

pub mod acl;
pub mod api;
pub mod apischema;
pub mod control;
pub mod error;
pub mod guest;
pub mod json;
pub mod schema;
pub mod state;
pub mod storage;
pub mod tasks;
pub mod version;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{Value, json};

use crate::http::{self, Handler, Reply, ReplyFuture, Request};
use acl::{Token, TokenPrivs, TokenTable};
use api::{Caller, RequestCtx};
use control::{ControlState, FaultKind};
use error::ApiError;
use state::{Settings, SimState};
use version::PveVersion;

/// Why a simulator could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error(transparent)]
    Acl(#[from] acl::AclError),
    /// PVE's API schema, which every request is checked against, could not be loaded.
    #[error(transparent)]
    Schema(&'static apischema::SchemaError),
}

/// Start options of a simulator.
#[derive(Debug, Clone)]
pub struct Options {
    pub node: String,
    pub guests: usize,
    pub task_seconds: f64,
    pub version: PveVersion,
    pub auth_delay: Duration,
    pub latency_ms: u64,
    pub seed: u64,
    /// The full-privilege token's id (`root@pam!felhom`).
    pub token_id: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            node: "pve1".into(),
            guests: 12,
            task_seconds: 0.2,
            version: PveVersion::V9_1,
            auth_delay: Duration::ZERO,
            latency_ms: 0,
            seed: 1,
            token_id: "root@pam!felhom".into(),
        }
    }
}

/// The shared simulator.
#[derive(Debug)]
pub struct Sim {
    state: Mutex<SimState>,
    control: Mutex<ControlState>,
    tokens: TokenTable,
    admin_token: String,
    version: PveVersion,
    auth_delay: Duration,
}

/// Random hex secret from the system CSPRNG, UUID-shaped like PVE's token secrets.
pub fn random_secret() -> String {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 16];
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        // No system randomness: fall back to a time-seeded generator (tests only).
        let mut rng = fastrand::Rng::new();
        rng.fill(&mut b);
    }
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock is a simulator bug; keep serving the state as is.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Sim {
    /// Builds the node: loads PVE's API schema (fetching it on first use, see
    /// [`apischema`]), seeds guests, registers the full token (`secret`) and `extra`.
    pub fn new(
        opts: &Options,
        secret: String,
        admin_token: String,
        extra: Vec<Token>,
        fingerprint: String,
    ) -> Result<Sim, SimError> {
        apischema::global().map_err(SimError::Schema)?;
        let mut tokens = TokenTable::default();
        tokens.insert(Token::new(opts.token_id.clone(), secret, TokenPrivs::Full))?;
        for t in extra {
            tokens.insert(t)?;
        }
        let mut st = SimState::new(
            &opts.node,
            opts.version,
            Settings {
                task_seconds: opts.task_seconds,
                latency_ms: opts.latency_ms,
                restore_bytes_per_second: state::DEFAULT_RESTORE_BPS,
                backup_bytes_per_second: state::DEFAULT_RESTORE_BPS,
            },
            opts.seed,
            fingerprint,
        );
        st.seed(opts.guests);
        Ok(Sim {
            state: Mutex::new(st),
            control: Mutex::new(ControlState::default()),
            tokens,
            admin_token,
            version: opts.version,
            auth_delay: opts.auth_delay,
        })
    }

    fn spawn_timers(self: &Arc<Self>, timers: Vec<(String, Duration)>) {
        for (upid, d) in timers {
            let sim = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(d).await;
                let timers = {
                    let mut st = lock(&sim.state);
                    st.finish_task(&upid);
                    std::mem::take(&mut st.timers)
                };
                sim.spawn_timers(timers);
            });
        }
    }

    /// Authenticates a PVE request: `Ok(token)` or the 401 detail text.
    fn authenticate(&self, req: &Request) -> Result<&Token, String> {
        let header = req
            .headers
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let Some(value) = find_api_token(header) else {
            return Err("No ticket".into());
        };
        let value = percent_encoding::percent_decode_str(value)
            .decode_utf8_lossy()
            .into_owned();
        if value.is_empty() {
            return Err("No ticket".into());
        }
        let Some((id, secret)) = value.rsplit_once('=') else {
            return Err("no tokenid specified".into());
        };
        let Some((user, name)) = acl::split_token_id(id) else {
            return Err(format!(
                "'{id}' is not a valid token ID - not able to split into user and token parts"
            ));
        };
        if !self.tokens.user_exists(user) {
            return Err(format!("no such user ('{user}')"));
        }
        let Some(token) = self.tokens.get(id) else {
            return Err(format!("no such token '{name}' for user '{user}'"));
        };
        if !token.secret_matches(secret) {
            return Err("invalid token value!".into());
        }
        Ok(token)
    }

    async fn handle_pve(self: Arc<Self>, req: Request, started: Instant) -> Reply {
        let fmt_and_rel = req
            .path
            .strip_prefix("/api2/")
            .map(|r| match r.split_once('/') {
                Some((f, rest)) => (f.to_owned(), format!("/{rest}")),
                None => (r.to_owned(), "/".to_owned()),
            });
        let Some((format, rel)) = fmt_and_rel else {
            return Reply::Respond(plain(404, "Not Found", ""));
        };
        let params = parse_params(&req);
        let seq = lock(&self.control).log_request(
            req.method.as_str(),
            &req.path,
            params.clone(),
            req.received,
        );
        let rel_decoded = percent_encoding::percent_decode_str(&rel)
            .decode_utf8_lossy()
            .into_owned();
        let latency = lock(&self.state).settings.latency_ms;
        let faults = lock(&self.control).match_faults(req.method.as_str(), &rel_decoded);
        let total_latency = latency + faults.latency_ms;
        if total_latency > 0 {
            // From the request's arrival, so parsing and TLS do not add to it.
            http::sleep_until_precise(req.received + Duration::from_millis(total_latency)).await;
        }
        let mut task_fail = None;
        let mut malformed = false;
        let edit = faults.edit;
        if let Some((id, kind, message)) = faults.action {
            match kind {
                FaultKind::DropConnection => return Reply::Drop,
                FaultKind::Http500 => {
                    let e = ApiError::die(message.unwrap_or_else(|| "simulated failure".into()));
                    lock(&self.control).set_status(seq, 500);
                    return Reply::Respond(self.error_response(&e));
                }
                FaultKind::MalformedBody => malformed = true,
                FaultKind::TaskFail => {
                    task_fail = Some((
                        id,
                        message.unwrap_or_else(|| "simulated task failure".into()),
                    ));
                }
                FaultKind::Latency | FaultKind::Edit => {}
            }
        }
        let token = match self.authenticate(&req) {
            Ok(t) => t,
            Err(detail) => {
                let elapsed = started.elapsed();
                if self.auth_delay > elapsed {
                    tokio::time::sleep(self.auth_delay - elapsed).await;
                }
                lock(&self.control).set_status(seq, 401);
                let mut resp =
                    http::simple_response(401, Some(&error::first_line(&detail)), Bytes::new());
                pve_headers(&mut resp, false);
                return Reply::Respond(resp);
            }
        };
        lock(&self.control).set_token(seq, &token.id);
        if !req.body.is_empty()
            && req.method != hyper::Method::PUT
            && req.method != hyper::Method::POST
        {
            let msg = format!("Unexpected content for method '{}'", req.method);
            lock(&self.control).set_status(seq, 501);
            let mut resp = http::simple_response(501, Some(&msg), Bytes::from(msg.clone()));
            http::set_header(&mut resp, "connection", "close");
            return Reply::Respond(resp);
        }
        if format != "json" {
            let msg = format!("no formatter for uri {rel}, {format}");
            lock(&self.control).set_status(seq, 501);
            let mut resp = http::simple_response(501, Some(&msg), Bytes::from(msg.clone()));
            http::set_header(&mut resp, "connection", "close");
            return Reply::Respond(resp);
        }
        let caller = Caller {
            token_id: token.id.clone(),
            privs: token.privs.clone(),
        };
        let mut ctx = RequestCtx {
            task_fail: task_fail.as_ref().map(|t| t.1.clone()),
            task_fail_used: false,
        };
        let (result, timers) = {
            let mut st = lock(&self.state);
            st.settle();
            // An `edit` fault: the change lands under the same lock, right before this
            // request is served.
            let edited = match edit {
                Some(e) => control::patch_guest(&mut st, e.vmid, e.patch).map(|_| ()),
                None => Ok(()),
            };
            let r = match edited {
                Ok(()) => api::dispatch(
                    &mut st,
                    &caller,
                    req.method.as_str(),
                    &rel,
                    params,
                    &mut ctx,
                ),
                Err(msg) => Err(ApiError::die(format!("simulated edit failed: {msg}"))),
            };
            (r, std::mem::take(&mut st.timers))
        };
        self.spawn_timers(timers);
        if ctx.task_fail_used
            && let Some((id, _)) = task_fail
        {
            lock(&self.control).consume(id);
        }
        let resp = match result {
            Ok(answer) => {
                lock(&self.control).set_status(seq, 200);
                let mut body = json!({"data": answer.data});
                // pve-http-server adds `total` only when it is true in Perl (not 0).
                if let Some(t) = answer.total
                    && t > 0
                {
                    body["total"] = json!(t);
                }
                let mut text = json::to_string_shuffled(&body, &mut fastrand::Rng::new());
                if malformed {
                    let cut = (text.len() / 2).max(1);
                    let mut cut_at = cut.min(text.len().saturating_sub(1));
                    while !text.is_char_boundary(cut_at) {
                        cut_at -= 1;
                    }
                    text.truncate(cut_at);
                }
                let mut resp = http::simple_response(200, None, Bytes::from(text));
                pve_headers(&mut resp, true);
                resp
            }
            Err(e) => {
                lock(&self.control).set_status(seq, e.status);
                self.error_response(&e)
            }
        };
        Reply::Respond(resp)
    }

    fn error_response(&self, e: &ApiError) -> http::HttpResponse {
        let body = e.body(self.version.error_body_has_message());
        let text = json::to_string_shuffled(&body, &mut fastrand::Rng::new());
        let mut resp = http::simple_response(e.status, Some(&e.reason()), Bytes::from(text));
        pve_headers(&mut resp, true);
        http::set_header(&mut resp, "connection", "close");
        resp
    }

    fn handle_control(self: Arc<Self>, req: Request) -> Reply {
        let auth = req
            .headers
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        let ok = auth.len() == self.admin_token.len()
            && auth
                .bytes()
                .zip(self.admin_token.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if !ok {
            return Reply::Respond(control_json(401, json!({"error": "admin token required"})));
        }
        let segs: Vec<&str> = req.path.split('/').filter(|s| !s.is_empty()).collect();
        let query = parse_query(req.query.as_deref().unwrap_or(""));
        let body: Result<Value, String> = if req.body.is_empty() {
            Ok(Value::Null)
        } else {
            serde_json::from_slice(&req.body).map_err(|e| format!("body is not JSON: {e}"))
        };
        let bad = |msg: String| Reply::Respond(control_json(400, json!({"error": msg})));
        let method = req.method.as_str();
        match (method, segs.as_slice()) {
            ("GET", ["_sim", "requests"]) => {
                let since = query.get("since").and_then(|s| s.parse().ok()).unwrap_or(0);
                Reply::Respond(control_json(200, lock(&self.control).requests_json(since)))
            }
            ("DELETE", ["_sim", "requests"]) => {
                lock(&self.control).clear_log();
                Reply::Respond(control_json(200, json!({})))
            }
            ("GET", ["_sim", "faults"]) => {
                Reply::Respond(control_json(200, lock(&self.control).faults_json()))
            }
            ("POST", ["_sim", "faults"]) => {
                let spec: control::FaultSpec =
                    match body.and_then(|b| serde_json::from_value(b).map_err(|e| e.to_string())) {
                        Ok(s) => s,
                        Err(e) => return bad(e),
                    };
                match lock(&self.control).add_fault(spec) {
                    Ok(id) => Reply::Respond(control_json(200, json!({"id": id}))),
                    Err(e) => bad(e),
                }
            }
            ("DELETE", ["_sim", "faults"]) => {
                lock(&self.control).clear_faults();
                Reply::Respond(control_json(200, json!({})))
            }
            ("DELETE", ["_sim", "faults", id]) => {
                match id.parse().map(|id| lock(&self.control).remove_fault(id)) {
                    Ok(true) => Reply::Respond(control_json(200, json!({}))),
                    _ => Reply::Respond(control_json(404, json!({"error": "no such fault"}))),
                }
            }
            ("GET", ["_sim", "task-faults"]) => {
                Reply::Respond(control_json(200, lock(&self.state).task_faults.json()))
            }
            ("POST", ["_sim", "task-faults"]) => {
                let spec: tasks::TaskFaultSpec =
                    match body.and_then(|b| serde_json::from_value(b).map_err(|e| e.to_string())) {
                        Ok(s) => s,
                        Err(e) => return bad(e),
                    };
                match lock(&self.state).task_faults.add(spec) {
                    Ok(id) => Reply::Respond(control_json(200, json!({"id": id}))),
                    Err(e) => bad(e),
                }
            }
            ("DELETE", ["_sim", "task-faults"]) => {
                lock(&self.state).task_faults.clear();
                Reply::Respond(control_json(200, json!({})))
            }
            ("DELETE", ["_sim", "task-faults", id]) => {
                match id
                    .parse()
                    .map(|id| lock(&self.state).task_faults.remove(id))
                {
                    Ok(true) => Reply::Respond(control_json(200, json!({}))),
                    _ => Reply::Respond(control_json(404, json!({"error": "no such task fault"}))),
                }
            }
            ("GET", ["_sim", "state"]) => {
                let mut st = lock(&self.state);
                st.settle();
                Reply::Respond(control_json(200, control::state_json(&st)))
            }
            ("GET", ["_sim", "guests", vmid]) => {
                let mut st = lock(&self.state);
                st.settle();
                match vmid.parse::<u32>().ok().and_then(|v| st.guests.get(&v)) {
                    Some(g) => Reply::Respond(control_json(200, control::guest_state_json(g))),
                    None => Reply::Respond(control_json(404, json!({"error": "no such guest"}))),
                }
            }
            ("PUT", ["_sim", "guests", vmid]) => {
                let Ok(vmid) = vmid.parse::<u32>() else {
                    return bad(format!("bad vmid {vmid:?}"));
                };
                let patch: control::GuestPatch =
                    match body.and_then(|b| serde_json::from_value(b).map_err(|e| e.to_string())) {
                        Ok(p) => p,
                        Err(e) => return bad(e),
                    };
                match control::patch_guest(&mut lock(&self.state), vmid, patch) {
                    Ok(v) => Reply::Respond(control_json(200, v)),
                    Err(e) => bad(e),
                }
            }
            ("DELETE", ["_sim", "guests", vmid]) => {
                let removed = vmid.parse::<u32>().ok().is_some_and(|v| {
                    let mut st = lock(&self.state);
                    st.guests.remove(&v).is_some() | st.other_nodes.remove(&v).is_some()
                });
                match removed {
                    true => Reply::Respond(control_json(200, json!({}))),
                    false => Reply::Respond(control_json(404, json!({"error": "no such guest"}))),
                }
            }
            ("GET", ["_sim", "settings"]) => {
                let st = lock(&self.state);
                Reply::Respond(control_json(200, settings_json(&st.settings)))
            }
            ("PUT", ["_sim", "volumes", rest @ ..]) if !rest.is_empty() => {
                let volid = percent_encoding::percent_decode_str(&rest.join("/"))
                    .decode_utf8_lossy()
                    .into_owned();
                let patch: control::VolumePatch =
                    match body.and_then(|b| serde_json::from_value(b).map_err(|e| e.to_string())) {
                        Ok(p) => p,
                        Err(e) => return bad(e),
                    };
                match control::patch_volume(&mut lock(&self.state), &volid, patch) {
                    Ok(v) => Reply::Respond(control_json(200, v)),
                    Err(e) => Reply::Respond(control_json(404, json!({"error": e}))),
                }
            }
            ("PUT", ["_sim", "storages", sid]) => {
                let patch: control::StoragePatch =
                    match body.and_then(|b| serde_json::from_value(b).map_err(|e| e.to_string())) {
                        Ok(p) => p,
                        Err(e) => return bad(e),
                    };
                match control::patch_storage(&mut lock(&self.state), sid, patch) {
                    Ok(v) => Reply::Respond(control_json(200, v)),
                    Err(e) => bad(e),
                }
            }
            ("PUT", ["_sim", "settings"]) => {
                let patch: control::SettingsPatch =
                    match body.and_then(|b| serde_json::from_value(b).map_err(|e| e.to_string())) {
                        Ok(p) => p,
                        Err(e) => return bad(e),
                    };
                let mut st = lock(&self.state);
                if let Some(t) = patch.task_seconds {
                    if !(0.0..=3600.0).contains(&t) {
                        return bad("task_seconds must be within 0..=3600".into());
                    }
                    st.settings.task_seconds = t;
                }
                if let Some(l) = patch.latency_ms {
                    st.settings.latency_ms = l.min(60_000);
                }
                if let Some(b) = patch.restore_bytes_per_second {
                    if !(b.is_finite() && b >= 1.0) {
                        return bad("restore_bytes_per_second must be at least 1".into());
                    }
                    st.settings.restore_bytes_per_second = b;
                }
                if let Some(b) = patch.backup_bytes_per_second {
                    if !(b.is_finite() && b >= 1.0) {
                        return bad("backup_bytes_per_second must be at least 1".into());
                    }
                    st.settings.backup_bytes_per_second = b;
                }
                Reply::Respond(control_json(200, settings_json(&st.settings)))
            }
            _ => Reply::Respond(control_json(
                404,
                json!({"error": format!("no control endpoint {method} {}", req.path)}),
            )),
        }
    }
}

impl Handler for Sim {
    fn handle(self: Arc<Self>, request: Request) -> ReplyFuture {
        Box::pin(async move {
            let started = Instant::now();
            if request.path == "/_sim" || request.path.starts_with("/_sim/") {
                return self.handle_control(request);
            }
            self.handle_pve(request, started).await
        })
    }
}

/// `(^|\s)PVEAPIToken(=| )([^;]*)` on the Authorization header.
/// The `GET`/`PUT /_sim/settings` answer.
fn settings_json(s: &Settings) -> Value {
    json!({"task_seconds": s.task_seconds, "latency_ms": s.latency_ms,
           "restore_bytes_per_second": s.restore_bytes_per_second,
           "backup_bytes_per_second": s.backup_bytes_per_second})
}

fn find_api_token(header: &str) -> Option<&str> {
    let mut search = 0;
    while let Some(pos) = header[search..].find("PVEAPIToken") {
        let start = search + pos;
        let before_ok = start == 0 || header[..start].ends_with(char::is_whitespace);
        let after = &header[start + "PVEAPIToken".len()..];
        if before_ok && (after.starts_with('=') || after.starts_with(' ')) {
            let v = &after[1..];
            return Some(v.split(';').next().unwrap_or(""));
        }
        search = start + 1;
    }
    None
}

fn parse_query(q: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let dec = |s: &str| {
            percent_encoding::percent_decode_str(&s.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        };
        out.insert(dec(k), dec(v));
    }
    out
}

/// Query string and (for PUT/POST) a form or JSON body, merged; `_dc` dropped as PVE does.
fn parse_params(req: &Request) -> BTreeMap<String, String> {
    let mut p = parse_query(req.query.as_deref().unwrap_or(""));
    if !req.body.is_empty()
        && (req.method == hyper::Method::PUT || req.method == hyper::Method::POST)
    {
        let ct = req
            .headers
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if ct.starts_with("application/json") {
            if let Ok(Value::Object(m)) = serde_json::from_slice::<Value>(&req.body) {
                for (k, v) in m {
                    let s = match v {
                        Value::String(s) => s,
                        Value::Bool(b) => if b { "1" } else { "0" }.to_owned(),
                        Value::Null => continue,
                        other => other.to_string(),
                    };
                    p.insert(k, s);
                }
            }
        } else {
            for (k, v) in parse_query(&String::from_utf8_lossy(&req.body)) {
                p.insert(k, v);
            }
        }
    }
    p.remove("_dc");
    p
}

fn pve_headers(resp: &mut http::HttpResponse, json_body: bool) {
    http::set_header(resp, "server", "pve-api-daemon/3.0");
    http::set_header(resp, "cache-control", "max-age=0");
    http::set_header(resp, "pragma", "no-cache");
    if json_body {
        http::set_header(resp, "content-type", "application/json;charset=UTF-8");
    }
    if resp.status().as_u16() >= 400 {
        http::set_header(resp, "connection", "close");
    }
}

fn plain(status: u16, reason: &str, body: &str) -> http::HttpResponse {
    let mut r = http::simple_response(status, Some(reason), Bytes::from(body.to_owned()));
    http::set_header(&mut r, "server", "pve-api-daemon/3.0");
    r
}

fn control_json(status: u16, v: Value) -> http::HttpResponse {
    let mut r = http::simple_response(status, None, Bytes::from(v.to_string()));
    http::set_header(&mut r, "content-type", "application/json");
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_token_header_forms() {
        assert_eq!(find_api_token("PVEAPIToken=a@pam!t=s"), Some("a@pam!t=s"));
        assert_eq!(find_api_token("PVEAPIToken a@pam!t=s"), Some("a@pam!t=s"));
        assert_eq!(find_api_token("x;PVEAPIToken=a@pam!t=s"), None);
        assert_eq!(
            find_api_token("Foo PVEAPIToken=a@pam!t=s;rest"),
            Some("a@pam!t=s")
        );
        assert_eq!(find_api_token("XPVEAPIToken=a"), None);
        assert_eq!(find_api_token("Bearer abc"), None);
    }

    #[test]
    fn secrets_are_uuid_shaped_and_differ() {
        let a = random_secret();
        assert_eq!(a.len(), 36);
        assert_ne!(a, random_secret());
    }
}
