//! `felhom-fake-smartctl`: stands in for smartctl in tests and the local stack.
//!
//! The helper runs tools with a cleared environment, so the fake finds its settings in a
//! file next to itself: `<path of this executable>.json`:
//! `{"record": "/tmp/…/calls.jsonl", "devices": {"sda": {"fixture": "/…/smartctl-sata-healthy.json"},
//!   "sdb": {"standby": true}}}` (`record` optional; a fixture's own
//! `smartctl.exit_status` is the exit status unless `"exit"` is given).
//! Each call appends one JSON line to `record`: argv, environment, uid/gid, and the
//! capability sets from /proc/self/status. It answers like smartctl 7.3: compact JSON
//! on stdout (`--json=c`), the bit-mask exit status; an unknown device gives smartctl's
//! "No such device" answer (exit 2); any argv other than
//! `--json=c -a -n standby /dev/<dev>` gives a command-line error (exit 1).

use std::io::Write;
use std::process::ExitCode;

use serde_json::{Value, json};

fn settings() -> Value {
    let Ok(exe) = std::env::current_exe() else {
        return json!({});
    };
    let mut p = exe.into_os_string();
    p.push(".json");
    std::fs::read_to_string(&p)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_else(|| json!({}))
}

fn status_caps() -> Value {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let mut m = serde_json::Map::new();
    for l in status.lines() {
        for k in [
            "CapInh",
            "CapPrm",
            "CapEff",
            "CapBnd",
            "CapAmb",
            "NoNewPrivs",
        ] {
            if let Some(v) = l.strip_prefix(&format!("{k}:")) {
                m.insert(k.to_string(), Value::from(v.trim()));
            }
        }
    }
    Value::Object(m)
}

fn record(settings: &Value, args: &[String]) {
    let Some(path) = settings.get("record").and_then(Value::as_str) else {
        return;
    };
    let env: serde_json::Map<String, Value> =
        std::env::vars().map(|(k, v)| (k, Value::from(v))).collect();
    let line = json!({
        "tool": "smartctl",
        "argv": args,
        "env": env,
        "uid": nix_ids().0,
        "gid": nix_ids().1,
        "status": status_caps(),
        "cwd": std::env::current_dir().map(|p| p.display().to_string()).unwrap_or_default(),
    });
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        let _ = writeln!(f, "{line}");
    }
}

fn nix_ids() -> (u32, u32) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(u32::MAX)
    };
    (field("Uid:"), field("Gid:"))
}

fn envelope(argv: &[String], messages: Value, exit: i64) -> Value {
    json!({
        "json_format_version": [1, 0],
        "smartctl": {
            "version": [7, 3],
            "svn_revision": "5338",
            "platform_info": "x86_64-linux-felhom-fake",
            "build_info": "(felhom-fake-smartctl)",
            "argv": std::iter::once("smartctl".to_string()).chain(argv.iter().cloned()).collect::<Vec<_>>(),
            "messages": messages,
            "exit_status": exit
        }
    })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let s = settings();
    record(&s, &args);
    let fixed = ["--json=c", "-a", "-n", "standby"];
    let dev = match args.as_slice() {
        [a, b, c, d, dev] if [a, b, c, d].iter().zip(fixed).all(|(x, y)| *x == y) => dev.clone(),
        _ => {
            let out = envelope(
                &args,
                json!([{"string": "=======> UNRECOGNIZED OPTION", "severity": "error"}]),
                1,
            );
            println!("{out}");
            return ExitCode::from(1);
        }
    };
    let name = dev.strip_prefix("/dev/").unwrap_or(&dev).to_string();
    let entry = s.get("devices").and_then(|d| d.get(&name)).cloned();
    let (out, exit) = match entry {
        Some(e) if e.get("standby").and_then(Value::as_bool) == Some(true) => {
            // smartctl 7.3 with -n standby on a sleeping disk (synthesized shape).
            let mut v = envelope(
                &args,
                json!([{"string": "Device is in STANDBY mode, exit(2)", "severity": "information"}]),
                2,
            );
            v["device"] = json!({"name": dev, "info_name": dev, "type": "sat", "protocol": "ATA"});
            (v, 2)
        }
        Some(e) => {
            let fixture = e.get("fixture").and_then(Value::as_str).unwrap_or_default();
            match std::fs::read_to_string(fixture)
                .ok()
                .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            {
                Some(v) => {
                    let exit = e
                        .get("exit")
                        .and_then(Value::as_i64)
                        .or_else(|| v.pointer("/smartctl/exit_status").and_then(Value::as_i64))
                        .unwrap_or(0);
                    (v, exit)
                }
                None => {
                    eprintln!("felhom-fake-smartctl: cannot read fixture {fixture:?}");
                    return ExitCode::from(2);
                }
            }
        }
        None => (
            envelope(
                &args,
                json!([{"string": format!("Smartctl open device: {dev} failed: No such device"), "severity": "error"}]),
                2,
            ),
            2,
        ),
    };
    println!("{out}");
    ExitCode::from(exit.clamp(0, 255) as u8)
}
