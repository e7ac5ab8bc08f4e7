//! Temperatures from hwmon in sysfs (`sensors.hwmon_root`, default `/sys/class/hwmon`),
//! read by the agent itself: they need no privilege, so no helper is involved.
//!
//! Chips are named the way lm-sensors names them (`coretemp-isa-0000`, `nvme-pci-0500`,
//! `acpitz-acpi-0`, `<name>-i2c-<bus>-<addr>`) by following the hwmon device's
//! `subsystem` link (walking up from class devices such as `nvme0` to their bus device);
//! a chip whose device path says nothing known is `<name>-virtual-0`. Labels come from
//! `tempN_label`, falling back to `tempN`.
//!
//! Must never: need privilege, write to sysfs, or fail the whole read because one sensor
//! is unreadable (real hardware returns EIO/ENODATA for absent probes; those are skipped).

use std::path::{Path, PathBuf};

/// One temperature.
#[derive(Debug, Clone, PartialEq)]
pub struct SensorReading {
    pub chip: String,
    pub label: String,
    pub temperature_c: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum SensorsError {
    #[error("cannot list hwmon devices in {path}: {source}")]
    ReadRoot {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn read_trim(p: &Path) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim_end_matches(['\n', ' ']).to_string())
}

/// `hwmon12` → 12, for numeric ordering.
fn index_of(name: &str, prefix: &str) -> Option<u64> {
    name.strip_prefix(prefix)?.parse().ok()
}

fn subsystem_of(dev: &Path) -> Option<String> {
    std::fs::read_link(dev.join("subsystem"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
}

/// The lm-sensors style chip name for hwmon device directory `hw` with driver `name`.
fn chip_name(hw: &Path, name: &str) -> String {
    let Ok(mut dev) = std::fs::canonicalize(hw.join("device")) else {
        return format!("{name}-virtual-0");
    };
    for _ in 0..4 {
        let base = dev
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        match subsystem_of(&dev).as_deref() {
            Some("pci") => {
                // DDDD:BB:SS.F → (domain << 16) + (bus << 8) + (slot << 3) + func
                let parts: Vec<&str> = base.split([':', '.']).collect();
                if let [d, b, s, f] = parts.as_slice()
                    && let (Ok(d), Ok(b), Ok(s), Ok(f)) = (
                        u32::from_str_radix(d, 16),
                        u32::from_str_radix(b, 16),
                        u32::from_str_radix(s, 16),
                        u32::from_str_radix(f, 16),
                    )
                {
                    return format!("{name}-pci-{:04x}", (d << 16) + (b << 8) + (s << 3) + f);
                }
                return format!("{name}-pci-0000");
            }
            Some("platform") | Some("isa") | Some("of_platform") => {
                let addr = base
                    .rsplit_once('.')
                    .and_then(|(_, n)| n.parse::<u32>().ok())
                    .unwrap_or(0);
                return format!("{name}-isa-{addr:04x}");
            }
            Some("i2c") => {
                if let Some((bus, addr)) = base.split_once('-')
                    && let (Ok(bus), Ok(addr)) = (bus.parse::<u32>(), u32::from_str_radix(addr, 16))
                {
                    return format!("{name}-i2c-{bus}-{addr:02x}");
                }
                return format!("{name}-i2c-0-00");
            }
            Some("acpi") => return format!("{name}-acpi-0"),
            Some("hid") => return format!("{name}-hid-0"),
            Some("scsi") => return format!("{name}-scsi-0"),
            _ => {}
        }
        // A class device (nvme0, …): its bus device is the parent.
        match dev.parent() {
            Some(p) => dev = p.to_path_buf(),
            None => break,
        }
    }
    format!("{name}-virtual-0")
}

/// Reads every `tempN_input` under `root` (the `class/hwmon` directory).
pub fn read_hwmon(root: &Path) -> Result<Vec<SensorReading>, SensorsError> {
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        // A kernel without hwmon has no /sys/class/hwmon at all: no sensors.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(SensorsError::ReadRoot {
                path: root.to_path_buf(),
                source,
            });
        }
    };
    let mut devices: Vec<(u64, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            index_of(&n, "hwmon").map(|i| (i, e.path()))
        })
        .collect();
    devices.sort();
    let mut out = Vec::new();
    for (_, hw) in devices {
        let Some(name) = read_trim(&hw.join("name")).or_else(|| read_trim(&hw.join("device/name")))
        else {
            continue;
        };
        let chip = chip_name(&hw, &name);
        let Ok(files) = std::fs::read_dir(&hw) else {
            continue;
        };
        let mut temps: Vec<u64> = files
            .filter_map(Result::ok)
            .filter_map(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                n.strip_prefix("temp")?.strip_suffix("_input")?.parse().ok()
            })
            .collect();
        temps.sort();
        for n in temps {
            let Some(raw) = read_trim(&hw.join(format!("temp{n}_input"))) else {
                continue;
            };
            let Ok(milli) = raw.parse::<i64>() else {
                continue;
            };
            let label = read_trim(&hw.join(format!("temp{n}_label")))
                .filter(|l| !l.is_empty())
                .unwrap_or_else(|| format!("temp{n}"));
            out.push(SensorReading {
                chip: chip.clone(),
                label,
                temperature_c: milli as f64 / 1000.0,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_root_means_no_sensors() {
        assert!(
            read_hwmon(Path::new("/nonexistent/hwmon"))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn labels_fall_back_and_bad_inputs_are_skipped() {
        let d = tempfile::tempdir().unwrap();
        let hw = d.path().join("hwmon0");
        std::fs::create_dir(&hw).unwrap();
        std::fs::write(hw.join("name"), "acpitz\n").unwrap();
        std::fs::write(hw.join("temp1_input"), "27800\n").unwrap();
        std::fs::write(hw.join("temp2_input"), "garbage\n").unwrap();
        std::fs::write(hw.join("temp3_input"), "-1000\n").unwrap();
        std::fs::write(hw.join("temp3_label"), "Board\n").unwrap();
        let r = read_hwmon(d.path()).unwrap();
        assert_eq!(
            r,
            vec![
                SensorReading {
                    chip: "acpitz-virtual-0".into(),
                    label: "temp1".into(),
                    temperature_c: 27.8
                },
                SensorReading {
                    chip: "acpitz-virtual-0".into(),
                    label: "Board".into(),
                    temperature_c: -1.0
                },
            ]
        );
    }
}
