//! Test-only model of how PVE stores a config write and returns it on the next GET
//! (API notes §7), used to check that normalization and planning converge. The end-to-end
//! check of the same property runs against `felhom-pvesim`.

use serde_json::{Map, Value};

use super::normalize::{GuestKind, Param};

/// Applies PUT parameters the way PVE would and returns what a GET shows afterwards.
pub(crate) fn pve_write(kind: GuestKind, config: &mut Map<String, Value>, params: &[Param]) {
    for p in params {
        match p {
            Param::Delete(k) => {
                config.remove(k);
            }
            Param::Set(k, v) => {
                let stored = match k.as_str() {
                    "description" => {
                        let mut lines: Vec<&str> = v.split('\n').collect();
                        while lines.last().is_some_and(|l| l.is_empty()) {
                            lines.pop();
                        }
                        if lines.is_empty() {
                            config.remove(k);
                            continue;
                        }
                        Value::String(lines.iter().map(|l| format!("{l}\n")).collect())
                    }
                    "tags" => {
                        let mut t: Vec<String> = v
                            .split(|c: char| c == ';' || c == ',' || c.is_whitespace())
                            .filter(|t| !t.is_empty())
                            .map(|t| t.to_ascii_lowercase())
                            .collect();
                        t.sort();
                        t.dedup();
                        Value::String(t.join(";"))
                    }
                    "onboot" => {
                        let on = matches!(v.as_str(), "1" | "true" | "yes" | "on");
                        Value::from(u64::from(on))
                    }
                    "memory" if kind == GuestKind::Qemu => Value::String(v.clone()),
                    "memory" | "swap" | "cores" => match v.parse::<u64>() {
                        Ok(n) => Value::from(n),
                        Err(_) => Value::String(v.clone()),
                    },
                    _ => Value::String(v.clone()),
                };
                config.insert(k.clone(), stored);
            }
        }
    }
    // Every write changes the digest.
    let n = config
        .get("digest")
        .and_then(Value::as_str)
        .and_then(|d| d.parse::<u64>().ok())
        .unwrap_or(0);
    config.insert("digest".into(), Value::String((n + 1).to_string()));
}
