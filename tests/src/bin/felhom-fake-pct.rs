//! `felhom-fake-pct`: stands in for Proxmox's `pct` in tests and the local stack.
//!
//! Settings in `<path of this executable>.json` (the helper clears the environment):
//! `{"record": "/tmp/…/calls.jsonl", "exit": 0, "stderr": "…"}` (all optional).
//! Each call appends one JSON line to `record`: argv, environment, uid/gid, capability
//! sets, and — because the helper deletes it right after — the content and mode of the
//! file given to `--ssh-public-keys`. It prints what `pct create` prints on success and
//! exits with `exit` (0 by default). Only `create` is understood, as by the helper.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
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

fn status() -> Value {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let mut m = serde_json::Map::new();
    for l in status.lines() {
        for k in [
            "Uid",
            "Gid",
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

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let s = settings();
    let keys = args
        .iter()
        .position(|a| a == "--ssh-public-keys")
        .and_then(|i| args.get(i + 1))
        .map(|p| {
            let meta = std::fs::metadata(p).ok();
            json!({
                "path": p,
                "content": std::fs::read_to_string(p).ok(),
                "mode": meta.map(|m| format!("{:o}", m.permissions().mode() & 0o7777)),
            })
        });
    if let Some(path) = s.get("record").and_then(Value::as_str) {
        let env: serde_json::Map<String, Value> =
            std::env::vars().map(|(k, v)| (k, Value::from(v))).collect();
        let line = json!({"tool": "pct", "argv": args, "env": env, "status": status(), "ssh_keys_file": keys});
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{line}");
        }
    }
    let exit = s
        .get("exit")
        .and_then(Value::as_i64)
        .unwrap_or(0)
        .clamp(0, 255) as u8;
    if args.first().map(String::as_str) != Some("create") || args.len() < 3 {
        eprintln!("ERROR: unknown command 'pct {}'", args.join(" "));
        return ExitCode::from(255);
    }
    if exit != 0 {
        let msg = s
            .get("stderr")
            .and_then(Value::as_str)
            .unwrap_or("unable to create CT - fake failure");
        eprintln!("{msg}");
        return ExitCode::from(exit);
    }
    let template = args[2].rsplit('/').next().unwrap_or("template");
    println!("extracting archive '/var/lib/vz/template/cache/{template}'");
    println!("Total bytes read: 524288000 (500MiB, 290MiB/s)");
    println!("Detected container architecture: amd64");
    println!("Creating SSH host key 'ssh_host_ed25519_key' - this may take some time ...");
    println!(
        "done: SHA256:felhomfakefingerprint root@{}",
        args.iter()
            .position(|a| a == "--hostname")
            .and_then(|i| args.get(i + 1))
            .map(String::as_str)
            .unwrap_or("ct")
    );
    ExitCode::SUCCESS
}
