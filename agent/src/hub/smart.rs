//! SMART: turns `smartctl --json -a -n standby DEV` output (read through the `smart`
//! helper) into a [`DiskReport`], and finds the disks to read when the config names none.
//!
//! The parser is a pure function of the output bytes and the exit status, tested against
//! every real capture in `tests/fixtures/hosttools` (SATA, NVMe, USB-bridged SATA, failing
//! disks, and smartctl's own error shapes). What it reads:
//! - health: `smart_status.passed`; a disk that is asleep (`-n standby` makes smartctl stop
//!   with "Device is in STANDBY mode, exit(2)" before touching it) is [`DiskHealth::Standby`];
//! - temperature: `temperature.current`, else the NVMe log's `temperature`, else ATA
//!   attribute 194's first number;
//! - power-on hours: `power_on_time.hours`, else the NVMe log, else ATA attribute 9;
//! - reallocated sectors: ATA attribute 5 raw value (NVMe has none);
//! - media errors: NVMe `media_errors`, else ATA attribute 187 (Reported_Uncorrect), else
//!   198 (Offline_Uncorrectable).
//!
//! smartctl's exit status is a bit mask (bit 0 command line, bit 1 open failed or device
//! asleep, bit 2 a SMART command failed, bit 3 disk failing, bits 4–7 attribute and log
//! findings). Bits 3–7 are findings about the disk, not failures to read it.
//!
//! Must never: ask for a read that could wake a disk (the helper always passes
//! `-n standby`), or run anything itself.

use std::fs;
use std::io;
use std::path::Path;

use serde_json::Value;

use super::report::{DiskHealth, DiskReport, Timestamp};

/// Why a disk's SMART data could not be turned into a report entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SmartError {
    /// stdout was not smartctl JSON.
    #[error("{device}: smartctl output is not JSON ({reason}){}", if *.truncated { " (output was truncated)" } else { "" })]
    NotJson {
        device: String,
        reason: String,
        truncated: bool,
    },
    /// smartctl could not open or identify the device.
    #[error("{device}: smartctl exit status {exit_status}: {message}")]
    Smartctl {
        device: String,
        exit_status: i32,
        message: String,
    },
    /// smartctl ran but gave no overall health assessment.
    #[error("{device}: smartctl reported no SMART health status (exit status {exit_status})")]
    NoHealth { device: String, exit_status: i32 },
    /// Listing the disks in sysfs failed.
    #[error("listing disks in {path}: {reason}")]
    Discover { path: String, reason: String },
}

/// One parsed disk: the report entry (always present; `unknown` when unreadable) and the
/// reason it is unknown, if it is.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedDisk {
    pub disk: DiskReport,
    pub error: Option<SmartError>,
}

/// Parses one `smartctl --json` run. `exit_status` is the process exit status the helper
/// saw; `truncated` says the helper cut stdout at its size cap.
pub fn parse_smartctl(
    device: &str,
    stdout: &[u8],
    exit_status: i32,
    truncated: bool,
    read_at: Timestamp,
) -> ParsedDisk {
    let mut disk = DiskReport::unread(device, read_at);
    let json: Value = match serde_json::from_slice(stdout) {
        Ok(v @ Value::Object(_)) => v,
        Ok(_) => {
            return ParsedDisk {
                disk,
                error: Some(SmartError::NotJson {
                    device: device.to_owned(),
                    reason: "not a JSON object".into(),
                    truncated,
                }),
            };
        }
        Err(e) => {
            return ParsedDisk {
                disk,
                error: Some(SmartError::NotJson {
                    device: device.to_owned(),
                    reason: e.to_string(),
                    truncated,
                }),
            };
        }
    };
    // The process status is authoritative; smartctl repeats it in the JSON.
    let status = if exit_status != 0 {
        exit_status
    } else {
        json.pointer("/smartctl/exit_status")
            .and_then(Value::as_i64)
            .and_then(|v| i32::try_from(v).ok())
            .unwrap_or(0)
    };
    let messages = messages(&json);

    disk.model = str_at(&json, &["/model_name", "/scsi_model_name", "/product"]);
    disk.serial = str_at(&json, &["/serial_number"]);

    if messages.iter().any(|m| is_standby_message(&m.text)) {
        disk.health = DiskHealth::Standby;
        return ParsedDisk { disk, error: None };
    }
    if status & 0b11 != 0 {
        let message = messages
            .iter()
            .find(|m| m.severity == "error")
            .or_else(|| messages.first())
            .map(|m| m.text.clone())
            .unwrap_or_else(|| describe_status(status));
        return ParsedDisk {
            disk,
            error: Some(SmartError::Smartctl {
                device: device.to_owned(),
                exit_status: status,
                message,
            }),
        };
    }

    let nvme_log = json.get("nvme_smart_health_information_log");
    disk.temperature_c = json
        .pointer("/temperature/current")
        .and_then(Value::as_i64)
        .or_else(|| {
            nvme_log
                .and_then(|l| l.get("temperature"))
                .and_then(Value::as_i64)
        })
        .or_else(|| {
            attribute(&json, 194)
                .and_then(raw_leading_number)
                .map(|v| v as i64)
        });
    disk.power_on_hours = json
        .pointer("/power_on_time/hours")
        .and_then(Value::as_u64)
        .or_else(|| {
            nvme_log
                .and_then(|l| l.get("power_on_hours"))
                .and_then(Value::as_u64)
        })
        .or_else(|| attribute(&json, 9).and_then(raw_leading_number));
    disk.reallocated_sectors = attribute(&json, 5).and_then(raw_count);
    disk.media_errors = nvme_log
        .and_then(|l| l.get("media_errors"))
        .and_then(Value::as_u64)
        .or_else(|| attribute(&json, 187).and_then(raw_count))
        .or_else(|| attribute(&json, 198).and_then(raw_count));

    match json
        .pointer("/smart_status/passed")
        .and_then(Value::as_bool)
    {
        Some(true) => disk.health = DiskHealth::Passed,
        Some(false) => disk.health = DiskHealth::Failed,
        None if status & 0b1000 != 0 => disk.health = DiskHealth::Failed,
        None => {
            return ParsedDisk {
                disk,
                error: Some(SmartError::NoHealth {
                    device: device.to_owned(),
                    exit_status: status,
                }),
            };
        }
    }
    ParsedDisk { disk, error: None }
}

/// smartctl's "-n standby" stop message: `Device is in STANDBY mode, exit(2)`, also
/// `SLEEP`, `STANDBY_Y`, `STANDBY (OS)` and SCSI's `STANDBY BY TIMER` (smartmontools
/// `ataprint.cpp`, `scsiprint.cpp`, `smartctl.cpp`).
fn is_standby_message(text: &str) -> bool {
    let t = text.trim();
    let t = t.rsplit_once(": Device is in ").map_or(t, |(_, rest)| rest);
    let t = t.strip_prefix("Device is in ").unwrap_or(t);
    t.contains(" mode, exit(") && (t.starts_with("STANDBY") || t.starts_with("SLEEP"))
}

struct Message {
    text: String,
    severity: String,
}

fn messages(json: &Value) -> Vec<Message> {
    json.pointer("/smartctl/messages")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|m| {
                    Some(Message {
                        text: m.get("string")?.as_str()?.to_owned(),
                        severity: m
                            .get("severity")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_owned(),
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

fn describe_status(status: i32) -> String {
    if status & 0b1 != 0 {
        "smartctl rejected its command line".into()
    } else {
        "device open failed or device is in a low-power mode".into()
    }
}

fn str_at(json: &Value, pointers: &[&str]) -> Option<String> {
    pointers.iter().find_map(|p| {
        json.pointer(p)
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    })
}

fn attribute(json: &Value, id: u64) -> Option<&Value> {
    json.pointer("/ata_smart_attributes/table")?
        .as_array()?
        .iter()
        .find(|a| a.get("id").and_then(Value::as_u64) == Some(id))
}

/// A counting attribute's raw value. Some firmware packs extra bytes into the raw value;
/// then the string form's first number is the count.
fn raw_count(attr: &Value) -> Option<u64> {
    let raw = attr.get("raw")?;
    match (
        raw.get("value").and_then(Value::as_u64),
        raw.get("string").and_then(Value::as_str),
    ) {
        (Some(v), Some(s)) if s.trim() == v.to_string() => Some(v),
        (_, Some(s)) => leading_number(s),
        (v, None) => v,
    }
}

/// The first number of the raw string (`"33 (Min/Max 24/36)"` → 33, `"1234h+05m"` → 1234).
fn raw_leading_number(attr: &Value) -> Option<u64> {
    let raw = attr.get("raw")?;
    raw.get("string")
        .and_then(Value::as_str)
        .and_then(leading_number)
        .or_else(|| raw.get("value").and_then(Value::as_u64))
}

fn leading_number(s: &str) -> Option<u64> {
    let digits: String = s
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// Disk names in `<block_dir>` (normally `/sys/block`) that SMART applies to: `sd*` and
/// NVMe namespaces `nvme<N>n<M>` (not the hidden multipath paths `nvme<N>c<C>n<M>`).
/// Sorted.
pub fn discover_disks(block_dir: &Path) -> Result<Vec<String>, SmartError> {
    let to_err = |e: io::Error| SmartError::Discover {
        path: block_dir.display().to_string(),
        reason: e.to_string(),
    };
    let mut out = Vec::new();
    for entry in fs::read_dir(block_dir).map_err(to_err)? {
        let entry = entry.map_err(to_err)?;
        if let Some(name) = entry.file_name().to_str()
            && is_smart_disk(name)
        {
            out.push(name.to_owned());
        }
    }
    out.sort();
    Ok(out)
}

fn is_smart_disk(name: &str) -> bool {
    if let Some(rest) = name.strip_prefix("sd") {
        return !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_lowercase());
    }
    if let Some(rest) = name.strip_prefix("nvme")
        && let Some((ctrl, ns)) = rest.split_once('n')
    {
        let num = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        return num(ctrl) && num(ns);
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn fixture(name: &str) -> Vec<u8> {
        let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/hosttools")
            .join(name);
        fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    fn at() -> Timestamp {
        Timestamp::from_unix(1_700_000_000).unwrap()
    }

    /// Runs the parser the way the collector does: exit status from the JSON, as the
    /// helper would have seen it from the process.
    fn parse_fixture(device: &str, name: &str) -> ParsedDisk {
        let bytes = fixture(name);
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        let status = v
            .pointer("/smartctl/exit_status")
            .unwrap()
            .as_i64()
            .unwrap() as i32;
        parse_smartctl(device, &bytes, status, false, at())
    }

    #[test]
    fn every_smartctl_fixture_is_covered_here() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/hosttools");
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.contains("smartctl") && n.ends_with(".json"))
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "probe-smartctl-no-such-device.json",
                "probe-smartctl-open-permission-denied.json",
                "probe-smartctl-unknown-device-type.json",
                "smartctl-nvme-failing-critical-warning.json",
                "smartctl-nvme-healthy.json",
                "smartctl-sata-healthy.json",
                "smartctl-sata-passed-reallocated-sectors.json",
                "smartctl-usb-jmicron-sata-failing.json",
            ],
            "a new smartctl fixture needs its own test below"
        );
    }

    #[test]
    fn sata_healthy() {
        let p = parse_fixture("sdb", "smartctl-sata-healthy.json");
        assert_eq!(p.error, None);
        let d = p.disk;
        assert_eq!(d.device, "sdb");
        assert_eq!(d.health, DiskHealth::Passed);
        assert_eq!(d.model.as_deref(), Some("WDC WD20EFRX-68EUZN0"));
        assert_eq!(d.serial.as_deref(), Some("REDACTED"));
        assert_eq!(d.temperature_c, Some(34));
        assert_eq!(d.power_on_hours, Some(47657));
        assert_eq!(d.reallocated_sectors, Some(0));
        // no attribute 187 on this WD drive; 198 Offline_Uncorrectable is 0
        assert_eq!(d.media_errors, Some(0));
        assert_eq!(d.read_at, at());
    }

    #[test]
    fn sata_passed_but_reallocating() {
        let p = parse_fixture("sda", "smartctl-sata-passed-reallocated-sectors.json");
        assert_eq!(p.error, None);
        let d = p.disk;
        assert_eq!(d.health, DiskHealth::Passed);
        assert_eq!(d.model.as_deref(), Some("ST3500418AS"));
        assert_eq!(d.reallocated_sectors, Some(304));
        // temperature.current, not attribute 194's packed raw value 81604378657
        assert_eq!(d.temperature_c, Some(33));
        assert_eq!(d.power_on_hours, Some(44668));
        assert_eq!(d.media_errors, Some(0)); // 187 Reported_Uncorrect
    }

    #[test]
    fn nvme_healthy() {
        let p = parse_fixture("nvme0n1", "smartctl-nvme-healthy.json");
        assert_eq!(p.error, None);
        let d = p.disk;
        assert_eq!(d.health, DiskHealth::Passed);
        assert_eq!(d.model.as_deref(), Some("Samsung SSD 970 EVO Plus 250GB"));
        assert_eq!(d.temperature_c, Some(35));
        assert_eq!(d.power_on_hours, Some(3149));
        assert_eq!(d.reallocated_sectors, None);
        assert_eq!(d.media_errors, Some(0));
    }

    #[test]
    fn nvme_critical_warning_is_failed() {
        let p = parse_fixture("nvme0n1", "smartctl-nvme-failing-critical-warning.json");
        assert_eq!(p.error, None);
        let d = p.disk;
        assert_eq!(d.health, DiskHealth::Failed);
        assert_eq!(d.model.as_deref(), Some("SAMSUNG MZWLL3T2HAJQ-00005"));
        assert_eq!(d.temperature_c, Some(40));
        assert_eq!(d.power_on_hours, Some(18376));
        assert_eq!(d.media_errors, Some(0));
    }

    #[test]
    fn usb_jmicron_failing() {
        let p = parse_fixture("sdc", "smartctl-usb-jmicron-sata-failing.json");
        assert_eq!(p.error, None);
        let d = p.disk;
        assert_eq!(d.health, DiskHealth::Failed);
        assert_eq!(d.model.as_deref(), Some("Hitachi HDS721050DLE630"));
        assert_eq!(d.serial.as_deref(), Some("MSK423Y20S3HBC"));
        assert_eq!(d.temperature_c, Some(25));
        assert_eq!(d.power_on_hours, Some(65592));
        assert_eq!(d.reallocated_sectors, Some(1975));
    }

    #[test]
    fn smartctl_error_shapes_are_unknown_with_the_message() {
        for (name, status, text) in [
            (
                "probe-smartctl-no-such-device.json",
                2,
                "Smartctl open device: /dev/sdz failed: No such device",
            ),
            (
                "probe-smartctl-open-permission-denied.json",
                2,
                "Smartctl open device: /dev/loop0 [SAT] failed: Permission denied",
            ),
            (
                "probe-smartctl-unknown-device-type.json",
                1,
                "/dev/loop0: Unable to detect device type",
            ),
        ] {
            let p = parse_fixture("sdz", name);
            assert_eq!(p.disk.health, DiskHealth::Unknown, "{name}");
            assert_eq!(p.disk.temperature_c, None);
            assert_eq!(
                p.error,
                Some(SmartError::Smartctl {
                    device: "sdz".into(),
                    exit_status: status,
                    message: text.into()
                }),
                "{name}"
            );
        }
    }

    /// What smartctl ≥ 7.0 prints with `-n standby` for a sleeping ATA disk: `jinf()` in
    /// smartmontools `src/ataprint.cpp` (severity "information"), `power_mode` set, exit 2.
    /// Synthesized from that source; no real capture exists in the fixtures.
    const STANDBY: &str = r#"{
      "json_format_version": [1, 0],
      "smartctl": {
        "version": [7, 3],
        "argv": ["smartctl", "--json=c", "-a", "-n", "standby", "/dev/sdb"],
        "messages": [{"string": "Device is in STANDBY mode, exit(2)", "severity": "information"}],
        "exit_status": 2
      },
      "device": {"name": "/dev/sdb", "info_name": "/dev/sdb [SAT]", "type": "sat", "protocol": "ATA"},
      "power_mode": {"ata_value": 0, "name": "STANDBY"}
    }"#;

    #[test]
    fn a_sleeping_disk_is_standby_not_an_error() {
        let p = parse_smartctl("sdb", STANDBY.as_bytes(), 2, false, at());
        assert_eq!(p.error, None);
        assert_eq!(p.disk.health, DiskHealth::Standby);
        assert_eq!(p.disk.temperature_c, None);
        for text in [
            "Device is in SLEEP mode, exit(2)",
            "Device is in STANDBY_Y mode, exit(2)",
            "/dev/sdb [SAT]: Device is in STANDBY (OS) mode, exit(2)",
            "Device is in STANDBY BY TIMER mode, exit(2)",
        ] {
            let json = STANDBY.replace("Device is in STANDBY mode, exit(2)", text);
            let p = parse_smartctl("sdb", json.as_bytes(), 2, false, at());
            assert_eq!(p.disk.health, DiskHealth::Standby, "{text}");
        }
        // an open failure with the same exit status is not standby
        let json = STANDBY.replace(
            "Device is in STANDBY mode, exit(2)",
            "Smartctl open device: /dev/sdb failed: No such device",
        );
        let p = parse_smartctl("sdb", json.as_bytes(), 2, false, at());
        assert_eq!(p.disk.health, DiskHealth::Unknown);
        assert!(p.error.is_some());
    }

    #[test]
    fn garbage_and_truncation_are_typed_errors() {
        let p = parse_smartctl("sda", b"smartctl: not json", 0, false, at());
        assert_eq!(p.disk.health, DiskHealth::Unknown);
        assert!(matches!(
            p.error,
            Some(SmartError::NotJson {
                truncated: false,
                ..
            })
        ));
        let full = fixture("smartctl-sata-healthy.json");
        let p = parse_smartctl("sda", &full[..full.len() / 2], 0, true, at());
        assert!(matches!(
            p.error,
            Some(SmartError::NotJson {
                truncated: true,
                ..
            })
        ));
        assert!(p.error.unwrap().to_string().contains("truncated"));
        let p = parse_smartctl("sda", b"[1,2]", 0, false, at());
        assert!(matches!(p.error, Some(SmartError::NotJson { .. })));
        // valid JSON without a health verdict
        let p = parse_smartctl("sda", br#"{"smartctl":{"exit_status":4}}"#, 4, false, at());
        assert_eq!(p.disk.health, DiskHealth::Unknown);
        assert!(matches!(
            p.error,
            Some(SmartError::NoHealth { exit_status: 4, .. })
        ));
        // wrong types inside are ignored field by field, not fatal
        let p = parse_smartctl(
            "sda",
            br#"{"smart_status":{"passed":true},"temperature":{"current":"hot"},"model_name":7}"#,
            0,
            false,
            at(),
        );
        assert_eq!(p.disk.health, DiskHealth::Passed);
        assert_eq!(p.disk.temperature_c, None);
        assert_eq!(p.disk.model, None);
    }

    #[test]
    fn discovery_lists_whole_disks_only() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "sda",
            "sdb",
            "sdaa",
            "sda1",
            "nvme0n1",
            "nvme1n2",
            "nvme0c0n1",
            "nvme0n1p1",
            "loop0",
            "dm-0",
            "zd0",
            "md0",
            "sr0",
        ] {
            fs::create_dir(dir.path().join(name)).unwrap();
        }
        assert_eq!(
            discover_disks(dir.path()).unwrap(),
            ["nvme0n1", "nvme1n2", "sda", "sdaa", "sdb"]
        );
        assert!(matches!(
            discover_disks(&dir.path().join("missing")),
            Err(SmartError::Discover { .. })
        ));
    }
}
