//! A sample hwmon tree in a temporary directory, mirroring the chips of a `sensors -j`
//! fixture (tests/fixtures/hosttools/sensors-*.json), laid out the way the kernel lays
//! out sysfs: `<dir>/class/hwmon/hwmonN` → `<dir>/devices/…/hwmonN` with `name`,
//! `tempN_input` (millidegrees), `tempN_label`, and a `device` link whose `subsystem`
//! says which bus the chip is on (pci, platform, acpi, i2c). The agent's
//! `sensors::read_hwmon` reads it like /sys/class/hwmon; the local stack uses it too.

use std::path::{Path, PathBuf};

use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum HwmonTreeError {
    #[error("fixture is not a sensors -j JSON object: {0}")]
    Fixture(String),
    #[error("chip name {0:?} is not <name>-<bus>-<addr>")]
    ChipName(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// One temperature the tree holds, as `sensors -j` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Expected {
    pub chip: String,
    pub label: String,
    pub temperature_c: f64,
}

#[derive(Debug)]
pub struct SampleTree {
    /// Pass this as `sensors.hwmon_root` (the `class/hwmon` directory).
    pub hwmon_root: PathBuf,
    /// Every temperature in the fixture, in fixture order.
    pub expected: Vec<Expected>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> HwmonTreeError + '_ {
    move |source| HwmonTreeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn mkdir(p: &Path) -> Result<(), HwmonTreeError> {
    std::fs::create_dir_all(p).map_err(io(p))
}

fn write(p: &Path, s: &str) -> Result<(), HwmonTreeError> {
    std::fs::write(p, s).map_err(io(p))
}

fn link(target: &Path, at: &Path) -> Result<(), HwmonTreeError> {
    let _ = std::fs::remove_file(at);
    std::os::unix::fs::symlink(target, at).map_err(io(at))
}

/// Creates `<dev>/subsystem` → `<root>/<bus_or_class>`.
fn subsystem(root: &Path, dev: &Path, what: &str) -> Result<(), HwmonTreeError> {
    let target = root.join(what);
    mkdir(&target)?;
    mkdir(dev)?;
    link(&target, &dev.join("subsystem"))
}

/// Writes the tree for `fixture_json` (the text of a `sensors -j` fixture) under `dir`.
pub fn write_sample_tree(dir: &Path, fixture_json: &str) -> Result<SampleTree, HwmonTreeError> {
    let v: Value =
        serde_json::from_str(fixture_json).map_err(|e| HwmonTreeError::Fixture(e.to_string()))?;
    let chips = v
        .as_object()
        .ok_or_else(|| HwmonTreeError::Fixture("top level is not an object".into()))?;
    let root = dir.to_path_buf();
    let class_hwmon = root.join("class/hwmon");
    mkdir(&class_hwmon)?;
    let mut expected = Vec::new();
    let mut nvme_count = 0;
    for (i, (chip, features)) in chips.iter().enumerate() {
        let parts: Vec<&str> = chip.split('-').collect();
        let (name, bus) = match parts.as_slice() {
            [n, b, ..] => (*n, *b),
            _ => return Err(HwmonTreeError::ChipName(chip.clone())),
        };
        let hw = format!("hwmon{i}");
        let hwmon_dir = match (bus, parts.as_slice()) {
            ("pci", [_, _, addr]) => {
                let a = u32::from_str_radix(addr, 16)
                    .map_err(|_| HwmonTreeError::ChipName(chip.clone()))?;
                let pci = root.join(format!(
                    "devices/pci0000:00/0000:{:02x}:{:02x}.{}",
                    (a >> 8) & 0xff,
                    (a >> 3) & 0x1f,
                    a & 7
                ));
                subsystem(&root, &pci, "bus/pci")?;
                let dev = if name == "nvme" {
                    // NVMe hwmon hangs off the nvme class device below the PCI function.
                    let d = pci.join(format!("nvme/nvme{nvme_count}"));
                    nvme_count += 1;
                    subsystem(&root, &d, "class/nvme")?;
                    d
                } else {
                    pci
                };
                let h = dev.join("hwmon").join(&hw);
                mkdir(&h)?;
                link(&dev, &h.join("device"))?;
                h
            }
            ("isa", [_, _, addr]) => {
                let a = u32::from_str_radix(addr, 16)
                    .map_err(|_| HwmonTreeError::ChipName(chip.clone()))?;
                let dev = root.join(format!("devices/platform/{name}.{a}"));
                subsystem(&root, &dev, "bus/platform")?;
                let h = dev.join("hwmon").join(&hw);
                mkdir(&h)?;
                link(&dev, &h.join("device"))?;
                h
            }
            ("acpi", [_, _, addr]) => {
                let dev = root.join(format!("devices/LNXSYSTM:00/LNXTHERM:{addr:0>2}"));
                subsystem(&root, &dev, "bus/acpi")?;
                let h = dev.join("hwmon").join(&hw);
                mkdir(&h)?;
                link(&dev, &h.join("device"))?;
                h
            }
            ("i2c", [_, _, busnr, addr]) => {
                let a = u32::from_str_radix(addr, 16)
                    .map_err(|_| HwmonTreeError::ChipName(chip.clone()))?;
                let dev = root.join(format!("devices/i2c-{busnr}/{busnr}-{a:04x}"));
                subsystem(&root, &dev, "bus/i2c")?;
                let h = dev.join("hwmon").join(&hw);
                mkdir(&h)?;
                link(&dev, &h.join("device"))?;
                h
            }
            ("virtual", _) => {
                let h = root.join("devices/virtual/hwmon").join(&hw);
                mkdir(&h)?;
                h
            }
            _ => return Err(HwmonTreeError::ChipName(chip.clone())),
        };
        write(&hwmon_dir.join("name"), &format!("{name}\n"))?;
        link(&hwmon_dir, &class_hwmon.join(&hw))?;
        let Some(features) = features.as_object() else {
            continue;
        };
        for (label, values) in features {
            let Some(values) = values.as_object() else {
                continue;
            };
            for (key, val) in values {
                let Some(n) = key
                    .strip_prefix("temp")
                    .and_then(|r| r.strip_suffix("_input"))
                else {
                    continue;
                };
                let Some(t) = val.as_f64() else { continue };
                let milli = (t * 1000.0).round() as i64;
                write(&hwmon_dir.join(key), &format!("{milli}\n"))?;
                if *label != format!("temp{n}") {
                    write(
                        &hwmon_dir.join(format!("temp{n}_label")),
                        &format!("{label}\n"),
                    )?;
                }
                for (k2, v2) in values {
                    if k2 != key
                        && let Some(x) = v2.as_f64()
                        && k2.starts_with(&format!("temp{n}_"))
                    {
                        write(
                            &hwmon_dir.join(k2),
                            &format!("{}\n", (x * 1000.0).round() as i64),
                        )?;
                    }
                }
                expected.push(Expected {
                    chip: chip.clone(),
                    label: label.clone(),
                    temperature_c: milli as f64 / 1000.0,
                });
            }
        }
    }
    Ok(SampleTree {
        hwmon_root: class_hwmon,
        expected,
    })
}
