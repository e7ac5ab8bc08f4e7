//! The devstack's narrative: one short line (or block) per event, with the time since the
//! start and who it is about, printed to stdout and kept in `devstack.log`. Also the
//! pure functions that turn what flows (a hub report, an audit record, a journal entry,
//! a plan) into those lines; they take JSON as the components publish it and never fail
//! on a shape they do not expect (a missing field shows as `?`).
//!
//! Must never: print a secret (nothing here sees one: reports, audit records and journal
//! entries carry none), or a whole document (that is what the log files are for).

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

use serde_json::Value;

/// Width of the "who" column.
const WHO: usize = 9;

/// Prints narrative lines to stdout and appends them to the narrative file.
#[derive(Debug)]
pub struct Printer {
    start: Instant,
    file: Option<File>,
}

impl Printer {
    pub fn new(start: Instant) -> Printer {
        Printer { start, file: None }
    }

    /// Counts from now (after the build, so the run's own times start at zero).
    pub fn restart(&mut self) {
        self.start = Instant::now();
    }

    /// Also write every line to `path` from now on (truncates it).
    pub fn tee(&mut self, path: &Path) {
        self.file = File::create(path).ok();
    }

    /// Seconds since the start, e.g. ` 12.34s`.
    pub fn stamp(&self) -> String {
        format!("{:6.2}s", self.start.elapsed().as_secs_f64())
    }

    fn emit(&mut self, text: &str) {
        // A closed stdout (`| head`) must not stop the run half-way: the file keeps it all.
        let _ = writeln!(std::io::stdout().lock(), "{text}");
        if let Some(f) = self.file.as_mut() {
            let _ = writeln!(f, "{text}");
        }
    }

    /// `[  1.23s] who       text`
    pub fn line(&mut self, who: &str, text: &str) {
        let l = format!("[{}] {who:<WHO$} {text}", self.stamp());
        self.emit(&l);
    }

    /// The first line like [`Printer::line`], the rest indented under the text.
    pub fn block(&mut self, who: &str, lines: &[String]) {
        let Some((first, rest)) = lines.split_first() else {
            return;
        };
        self.line(who, first);
        let pad = " ".repeat(self.stamp().len() + 3 + WHO + 1);
        for l in rest {
            let l = format!("{pad}  {l}");
            self.emit(&l);
        }
    }

    /// A line without time or column (the closing summary).
    pub fn plain(&mut self, text: &str) {
        self.emit(text);
    }
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("?")
}

fn arr(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or(&[])
}

/// A skip reason, shortened to its first clause (`locked (backup); retried next cycle` →
/// `locked (backup)`, `HA-managed (its power belongs …)` → `HA-managed`).
pub fn short_reason(reason: &Value) -> String {
    let text = match reason {
        Value::String(t) => t.clone(),
        // plan JSON: `{"reason": "ha_managed"}`, `{"reason": "locked", "detail": "backup"}`
        Value::Object(_) => {
            let name = s(reason, "reason").replace('_', "-");
            match reason.get("detail").and_then(Value::as_str) {
                Some(d) => format!("{name} ({d})"),
                None => name,
            }
        }
        other => other.to_string(),
    };
    let first = text.split(';').next().unwrap_or(&text).trim().to_string();
    if first.starts_with("HA-managed") {
        return "HA-managed".into();
    }
    first.replace("ha-managed", "HA-managed")
}

/// `104 HA-managed, 105 locked (backup), 106 template`
pub fn skipped_list(skipped: &Value) -> String {
    let items: Vec<String> = arr(skipped)
        .iter()
        .map(|x| format!("{} {}", x["vmid"], short_reason(&x["reason"])))
        .collect();
    if items.is_empty() {
        "none".into()
    } else {
        items.join(", ")
    }
}

/// `start lxc 102`, `set-config qemu 112 (cores, description)` from an action as the plan
/// and the journal serialize it (`{vmid, kind, op: {op, fields?}}`) or as the report's
/// reconcile section has it (`{vmid, action}`).
pub fn action_label(a: &Value) -> String {
    if let Some(action) = a.get("action").and_then(Value::as_str) {
        return format!("{action} {}", a["vmid"]);
    }
    let op = &a["op"];
    let name = op
        .get("op")
        .and_then(Value::as_str)
        .or_else(|| op.as_str())
        .unwrap_or("?")
        .replace('_', "-");
    let fields: Vec<&str> = arr(&op["fields"])
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let mut out = format!("{name} {} {}", s(a, "kind"), a["vmid"]);
    if !fields.is_empty() {
        out.push_str(&format!(" ({})", fields.join(", ")));
    }
    out
}

/// The plan (`felhom-agent plan --json`) as a short block.
pub fn plan_lines(plan: &Value) -> Vec<String> {
    let actions = arr(&plan["actions"]);
    let mut out = vec![format!(
        "desired generation {}: {} action{} planned",
        plan["generation"],
        actions.len(),
        if actions.len() == 1 { "" } else { "s" }
    )];
    for chunk in actions.chunks(3) {
        out.push(
            chunk
                .iter()
                .map(action_label)
                .collect::<Vec<_>>()
                .join(" · "),
        );
    }
    out.push(format!("skipped: {}", skipped_list(&plan["skipped"])));
    for p in arr(&plan["problems"]) {
        out.push(format!("problem {}: {}", p["vmid"], s(p, "message")));
    }
    out
}

/// One disk: `sda passed`, `sdb passed, 304 reallocated`, `sdc FAILED`, `sdd standby`.
fn disk_label(d: &Value) -> String {
    let health = s(d, "health");
    let mut out = format!(
        "{} {}",
        s(d, "device"),
        if health == "failed" {
            "FAILED".to_string()
        } else {
            health.to_string()
        }
    );
    if let Some(n) = d["reallocated_sectors"].as_u64().filter(|n| *n > 0) {
        out.push_str(&format!(", {n} reallocated"));
    }
    if let Some(n) = d["media_errors"].as_u64().filter(|n| *n > 0) {
        out.push_str(&format!(", {n} media errors"));
    }
    out
}

/// A hub report as a short block: what the hub now knows.
pub fn report_lines(seq: u64, outcome: &str, r: &Value) -> Vec<String> {
    if outcome != "accepted" {
        return vec![format!("report #{seq}: {outcome}")];
    }
    let guests = arr(&r["guests"]);
    let running = guests.iter().filter(|g| g["status"] == "running").count();
    let host = &r["host"];
    let mut out = vec![format!(
        "report #{seq} accepted from {} (agent {}): {} guests, {running} running",
        s(r, "node"),
        s(r, "agent_version"),
        guests.len()
    )];
    if host.is_null() {
        out.push("host: null (the agent could not reach Proxmox)".into());
    } else {
        let disks: Vec<String> = arr(&host["disks"]).iter().map(disk_label).collect();
        out.push(format!(
            "disks: {}",
            if disks.is_empty() {
                "none".into()
            } else {
                disks.join(" · ")
            }
        ));
        let sensors = arr(&host["sensors"]);
        let hottest = sensors
            .iter()
            .filter_map(|x| x["temperature_c"].as_f64())
            .fold(f64::NAN, f64::max);
        out.push(format!(
            "sensors: {} readings{} · cloudflared {}{} · backups: {}",
            sensors.len(),
            if hottest.is_nan() {
                String::new()
            } else {
                format!(" (hottest {hottest:.1} °C)")
            },
            s(&r["cloudflared"], "state"),
            r["cloudflared"]["ready_connections"]
                .as_u64()
                .map(|n| format!(" ({n} connections)"))
                .unwrap_or_default(),
            arr(&r["backups"]).len()
        ));
    }
    let audit = arr(&r["audit"]);
    let seqs: Vec<u64> = audit.iter().filter_map(|a| a["seq"].as_u64()).collect();
    out.push(format!(
        "audit: {} record{}{}",
        audit.len(),
        if audit.len() == 1 { "" } else { "s" },
        match (seqs.first(), seqs.last()) {
            (Some(a), Some(b)) => format!(" (seq {a}..={b})"),
            _ => String::new(),
        }
    ));
    let rec = &r["reconcile"];
    if rec.is_null() {
        out.push("reconcile: null (the engine is not running in this agent)".into());
    } else {
        let generation = |v: &Value| v.as_u64().map_or("—".to_string(), |g| g.to_string());
        out.push(format!(
            "reconcile: desired generation {}, applied {} · queued {} · running {} · failing {} · skipped {}",
            generation(&rec["desired_generation"]),
            generation(&rec["applied_generation"]),
            arr(&rec["queued"]).len(),
            arr(&rec["running"]).len(),
            arr(&rec["failing"]).len(),
            skipped_list(&rec["skipped"])
        ));
        for f in arr(&rec["failing"]) {
            out.push(format!(
                "failing: {} ({} attempts): {}",
                action_label(f),
                f["attempts"],
                s(f, "last_error")
            ));
        }
    }
    let errors = arr(&r["errors"]);
    if !errors.is_empty() {
        let e: Vec<String> = errors
            .iter()
            .map(|e| {
                let subject = e["subject"]
                    .as_str()
                    .map(str::to_owned)
                    .or_else(|| e["subject"].as_u64().map(|n| n.to_string()));
                match subject {
                    Some(x) => format!("{} {x} ({})", s(e, "component"), s(e, "kind")),
                    None => format!("{} ({})", s(e, "component"), s(e, "kind")),
                }
            })
            .collect();
        out.push(format!("errors: {}", e.join(", ")));
    }
    out
}

/// The arguments of an audited operation, briefly.
fn audit_args(op: &str, args: &Value) -> String {
    match op {
        "smart_read" => s(args, "device").to_string(),
        "pct_create_keyctl" => format!("CT {} {}", args["vmid"], s(args, "hostname")),
        "usb_mount" => format!("{} as {}", s(args, "device"), s(args, "name")),
        "usb_unmount" => s(args, "name").to_string(),
        _ => String::new(),
    }
}

/// One audit record; `None` for intents (the outcome that follows names them).
pub fn audit_line(r: &Value) -> Option<String> {
    let seq = &r["seq"];
    let class = s(r, "class");
    let who = peer_label(&r["peer"]);
    match s(r, "kind") {
        "intent" => None,
        "outcome" => {
            let op = s(r, "op");
            let result = s(r, "result");
            let detail = match result {
                "ok" => {
                    let d = &r["detail"];
                    match d["exit_status"].as_i64() {
                        Some(x) => format!("ok (exit status {x})"),
                        None => "ok".to_string(),
                    }
                }
                other => format!(
                    "{} {}: {}",
                    other.to_uppercase(),
                    s(r, "error"),
                    s(r, "reason")
                ),
            };
            Some(format!(
                "#{}+#{seq} {class}: {op} {} → {detail} · {:.0} ms · {who}",
                r["intent_seq"],
                audit_args(op, &r["args"]),
                r["duration_ms"].as_f64().unwrap_or(0.0)
            ))
        }
        "refused" => Some(format!(
            "#{seq} {class}: REFUSED ({}) {}: {} · {who}",
            s(r, "category"),
            s(r, "error"),
            s(r, "reason")
        )),
        other => Some(format!("#{seq} {class}: {other} record")),
    }
}

/// Audit records as lines: like [`audit_line`], except that a run of outcomes of one
/// operation by the same process with the same result (the agent's SMART reads of every
/// disk in a cycle) becomes one line.
pub fn audit_lines(records: &[Value]) -> Vec<String> {
    let key = |r: &Value| {
        (r["kind"] == "outcome").then(|| {
            (
                s(r, "class").to_string(),
                s(r, "op").to_string(),
                s(r, "result").to_string(),
                r["peer"]["pid"].as_i64(),
            )
        })
    };
    let outcomes: Vec<&Value> = records.iter().filter(|r| r["kind"] != "intent").collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < outcomes.len() {
        let k = key(outcomes[i]);
        let mut j = i + 1;
        while k.is_some() && j < outcomes.len() && key(outcomes[j]) == k {
            j += 1;
        }
        let run = &outcomes[i..j];
        if run.len() == 1 {
            out.extend(audit_line(run[0]));
        } else {
            let first = run[0];
            let op = s(first, "op");
            let items: Vec<String> = run
                .iter()
                .map(|r| {
                    let args = audit_args(op, &r["args"]);
                    match r["detail"]["exit_status"].as_i64() {
                        Some(x) => format!("{args} (exit {x})"),
                        None => args,
                    }
                })
                .collect();
            let last = run[run.len() - 1];
            out.push(format!(
                "#{}..#{} {}: {op} ×{} → {}: {} · {}",
                first["intent_seq"],
                last["seq"],
                s(first, "class"),
                run.len(),
                s(first, "result"),
                items.join(", "),
                peer_label(&first["peer"])
            ));
        }
        i = j;
    }
    out
}

fn peer_label(peer: &Value) -> String {
    if peer.is_object() {
        format!(
            "{}[{}] uid {}",
            peer["comm"].as_str().unwrap_or("?"),
            peer["pid"],
            peer["uid"]
        )
    } else {
        String::new()
    }
}

/// A journal entry (`journal show` over the control socket): `(text, finished)`.
pub fn journal_line(e: &Value) -> (String, bool) {
    let label = action_label(&e["action"]);
    match e.get("outcome").filter(|o| !o.is_null()) {
        None => (format!("applying {label} (intent recorded)"), false),
        Some(o) => {
            let took = match (e["intent_ms"].as_i64(), e["outcome_ms"].as_i64()) {
                (Some(a), Some(b)) if b >= a => format!(" in {:.1} s", (b - a) as f64 / 1000.0),
                _ => String::new(),
            };
            // `{"result": "succeeded", "detail": …}`, `{"result": "failed", "error": …}`
            let text = match s(o, "result") {
                "succeeded" => format!("applied {label}{took}"),
                "failed" => format!("FAILED {label}{took}: {}", s(o, "error")),
                "already_applied" => format!("applied {label} (found done already)"),
                "superseded" => format!("superseded {label}: {}", s(o, "reason")),
                other => format!("{other} {label}{took}"),
            };
            (text, true)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_report_becomes_a_short_block() {
        let r = json!({
            "node": "pve1", "agent_version": "0.1.0",
            "guests": [{"status": "running"}, {"status": "stopped"}],
            "host": {
                "disks": [
                    {"device": "sda", "health": "passed", "reallocated_sectors": 0},
                    {"device": "sdb", "health": "passed", "reallocated_sectors": 304},
                    {"device": "sdc", "health": "failed"},
                    {"device": "sdd", "health": "standby"}
                ],
                "sensors": [{"temperature_c": 27.0}, {"temperature_c": 45.5}]
            },
            "cloudflared": {"state": "ready", "ready_connections": 4},
            "backups": [{}, {}, {}],
            "audit": [{"seq": 3}, {"seq": 4}],
            "reconcile": {
                "desired_generation": 1, "applied_generation": null,
                "queued": [{"vmid": 102, "action": "start"}], "running": [], "failing": [],
                "skipped": [{"vmid": 104, "reason": "HA-managed (its power belongs to the HA manager)"},
                            {"vmid": 105, "reason": "locked (backup); retried next cycle"}]
            },
            "errors": [{"component": "smart", "subject": "sdz", "kind": "other"}]
        });
        let text = report_lines(1, "accepted", &r).join("\n");
        for want in [
            "report #1 accepted from pve1 (agent 0.1.0): 2 guests, 1 running",
            "sdb passed, 304 reallocated",
            "sdc FAILED",
            "sdd standby",
            "2 readings (hottest 45.5 °C)",
            "cloudflared ready (4 connections)",
            "backups: 3",
            "audit: 2 records (seq 3..=4)",
            "queued 1",
            "skipped 104 HA-managed, 105 locked (backup)",
            "errors: smart sdz (other)",
        ] {
            assert!(text.contains(want), "{want:?} not in:\n{text}");
        }
        assert_eq!(
            report_lines(2, "status_503", &Value::Null),
            ["report #2: status_503"]
        );
        let null_rec = report_lines(3, "accepted", &json!({"reconcile": null})).join("\n");
        assert!(null_rec.contains("reconcile: null"), "{null_rec}");
    }

    #[test]
    fn audit_outcomes_and_refusals_are_one_line_intents_none() {
        let peer = json!({"pid": 7, "uid": 1000, "gid": 1000, "comm": "felhom-agent"});
        assert_eq!(audit_line(&json!({"kind": "intent", "seq": 1})), None);
        let ok = audit_line(&json!({
            "kind": "outcome", "seq": 2, "intent_seq": 1, "class": "smart", "peer": peer,
            "op": "smart_read", "args": {"device": "sda"}, "result": "ok",
            "detail": {"exit_status": 0}, "duration_ms": 3.2
        }))
        .unwrap();
        assert_eq!(
            ok,
            "#1+#2 smart: smart_read sda → ok (exit status 0) · 3 ms · felhom-agent[7] uid 1000"
        );
        let denied = audit_line(&json!({
            "kind": "outcome", "seq": 4, "intent_seq": 3, "class": "usb", "peer": peer,
            "op": "usb_mount", "args": {"device": "/dev/vda1", "name": "backup"},
            "result": "denied", "error": "not_usb", "reason": "vda1 is not attached through USB",
            "duration_ms": 1.0
        }))
        .unwrap();
        assert!(
            denied.contains(
                "usb_mount /dev/vda1 as backup → DENIED not_usb: vda1 is not attached through USB"
            ),
            "{denied}"
        );
        let refused = audit_line(&json!({"kind": "refused", "seq": 5, "class": "pct",
            "peer": peer, "category": "peer", "error": "peer_refused", "reason": "uid 1001"}))
        .unwrap();
        assert!(
            refused.contains("REFUSED (peer) peer_refused: uid 1001"),
            "{refused}"
        );
    }

    #[test]
    fn a_run_of_the_same_operation_by_one_process_is_one_line() {
        let peer = json!({"pid": 9, "uid": 0, "gid": 0, "comm": "felhom-agent"});
        let out = |seq: u64, dev: &str, exit: i64| {
            json!({"kind": "outcome", "seq": seq, "intent_seq": seq - 1, "class": "smart",
                "peer": peer, "op": "smart_read", "args": {"device": dev}, "result": "ok",
                "detail": {"exit_status": exit}, "duration_ms": 1.0})
        };
        let intent = |seq: u64| json!({"kind": "intent", "seq": seq});
        let records = [
            intent(1),
            out(2, "sda", 0),
            intent(3),
            out(4, "sdc", 216),
            intent(5),
            json!({"kind": "outcome", "seq": 6, "intent_seq": 5, "class": "usb", "peer": peer,
                "op": "usb_mount", "args": {"device": "/dev/x", "name": "b"}, "result": "denied",
                "error": "not_usb", "reason": "no", "duration_ms": 0.1}),
        ];
        let lines = audit_lines(&records);
        assert_eq!(
            lines[0],
            "#1..#4 smart: smart_read ×2 → ok: sda (exit 0), sdc (exit 216) · felhom-agent[9] uid 0"
        );
        assert!(
            lines[1].starts_with("#5+#6 usb: usb_mount /dev/x as b → DENIED"),
            "{}",
            lines[1]
        );
        assert_eq!(lines.len(), 2);
    }

    #[test]
    fn journal_entries_and_plan_actions_read_like_the_cli() {
        let action = json!({"vmid": 112, "kind": "qemu",
            "op": {"op": "set_config", "fields": ["cores", "description"]}});
        assert_eq!(
            action_label(&action),
            "set-config qemu 112 (cores, description)"
        );
        let open = json!({"action": {"vmid": 102, "kind": "lxc", "op": {"op": "start"}},
            "outcome": null, "intent_ms": 1000});
        assert_eq!(
            journal_line(&open),
            (
                "applying start lxc 102 (intent recorded)".to_string(),
                false
            )
        );
        let done = json!({"action": {"vmid": 102, "kind": "lxc", "op": {"op": "start"}},
            "outcome": {"result": "succeeded", "detail": null}, "intent_ms": 1000, "outcome_ms": 1400});
        assert_eq!(
            journal_line(&done),
            ("applied start lxc 102 in 0.4 s".to_string(), true)
        );
        let failed = json!({"action": {"vmid": 103, "kind": "qemu", "op": {"op": "stop"}},
            "outcome": {"result": "failed", "error": "boom"}, "intent_ms": 1, "outcome_ms": 2});
        assert!(journal_line(&failed).0.starts_with("FAILED stop qemu 103"));
        let plan = json!({"generation": 1, "actions": [action],
            "skipped": [{"vmid": 104, "reason": {"reason": "ha_managed"}},
                        {"vmid": 105, "reason": {"reason": "locked", "detail": "backup"}},
                        {"vmid": 106, "reason": {"reason": "template"}}],
            "problems": []});
        let lines = plan_lines(&plan);
        assert_eq!(lines[0], "desired generation 1: 1 action planned");
        assert_eq!(lines[1], "set-config qemu 112 (cores, description)");
        assert_eq!(
            lines[2],
            "skipped: 104 HA-managed, 105 locked (backup), 106 template"
        );
    }
}
