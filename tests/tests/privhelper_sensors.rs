//! Sensors stay on the unprivileged side of the fence: the agent reads hwmon itself.
//! The test bed writes a sysfs-shaped hwmon tree for each `sensors -j` fixture and
//! `sensors::read_hwmon` must read back exactly the fixture's chips, labels and values.

use felhom_agent::sensors::{SensorReading, read_hwmon};
use felhom_testbed::hwmon::write_sample_tree;
use felhom_testbed::privhelper::hosttools_fixtures;

fn key(r: &SensorReading) -> (String, String, i64) {
    (
        r.chip.clone(),
        r.label.clone(),
        (r.temperature_c * 1000.0).round() as i64,
    )
}

#[test]
fn readings_equal_the_fixture_values() {
    for fixture in [
        "sensors-intel-coretemp-nvme-acpitz.json",
        "sensors-nct6798-superio-coretemp-nvme.json",
    ] {
        let text = std::fs::read_to_string(hosttools_fixtures().join(fixture)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let tree = write_sample_tree(dir.path(), &text).unwrap();
        let got = read_hwmon(&tree.hwmon_root).unwrap();
        let mut got_keys: Vec<_> = got.iter().map(key).collect();
        let mut want: Vec<_> = tree
            .expected
            .iter()
            .map(|e| {
                (
                    e.chip.clone(),
                    e.label.clone(),
                    (e.temperature_c * 1000.0).round() as i64,
                )
            })
            .collect();
        got_keys.sort();
        want.sort();
        assert_eq!(got_keys, want, "{fixture}");
        // Independently of the tree writer: every temperature in the fixture, by name.
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let mut from_fixture = Vec::new();
        for (chip, feats) in v.as_object().unwrap() {
            for (label, vals) in feats.as_object().unwrap() {
                let Some(vals) = vals.as_object() else {
                    continue;
                };
                for (k, x) in vals {
                    if k.starts_with("temp") && k.ends_with("_input") {
                        from_fixture.push((
                            chip.clone(),
                            label.clone(),
                            (x.as_f64().unwrap() * 1000.0).round() as i64,
                        ));
                    }
                }
            }
        }
        from_fixture.sort();
        assert_eq!(got_keys, from_fixture, "{fixture}");
        for r in &got {
            let exact = v[&r.chip][&r.label]
                .as_object()
                .unwrap()
                .iter()
                .find(|(k, _)| k.ends_with("_input"))
                .unwrap()
                .1
                .as_f64()
                .unwrap();
            assert_eq!(r.temperature_c, exact, "{} {}", r.chip, r.label);
        }
    }
}

#[test]
fn chip_names_follow_lm_sensors() {
    let text = std::fs::read_to_string(
        hosttools_fixtures().join("sensors-intel-coretemp-nvme-acpitz.json"),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tree = write_sample_tree(dir.path(), &text).unwrap();
    let mut chips: Vec<String> = read_hwmon(&tree.hwmon_root)
        .unwrap()
        .into_iter()
        .map(|r| r.chip)
        .collect();
    chips.dedup();
    chips.sort();
    assert_eq!(
        chips,
        [
            "acpitz-acpi-0",
            "coretemp-isa-0000",
            "nvme-pci-0200",
            "nvme-pci-0500"
        ]
    );
    // "temp1" has no label file: the label falls back to the sensor's name.
    let acpi: Vec<_> = read_hwmon(&tree.hwmon_root)
        .unwrap()
        .into_iter()
        .filter(|r| r.chip == "acpitz-acpi-0")
        .collect();
    assert_eq!(
        acpi,
        [SensorReading {
            chip: "acpitz-acpi-0".into(),
            label: "temp1".into(),
            temperature_c: 27.8
        }]
    );
}
