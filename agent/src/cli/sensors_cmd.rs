//! `felhom-agent sensors`: prints hwmon temperatures (thin wrapper over
//! [`crate::sensors::read_hwmon`]).

use super::{Cli, CliError};

pub fn run(cli: &Cli) -> Result<(), CliError> {
    let cfg = super::load_host_config(cli)?;
    let readings = crate::sensors::read_hwmon(&cfg.sensors.hwmon_root)
        .map_err(|e| CliError::Problem(e.to_string()))?;
    if cli.json {
        let v: Vec<serde_json::Value> = readings
            .iter()
            .map(|r| serde_json::json!({"chip": r.chip, "label": r.label, "temperature_c": r.temperature_c}))
            .collect();
        println!("{}", serde_json::Value::Array(v));
    } else if readings.is_empty() {
        println!(
            "no temperature sensors under {}",
            cfg.sensors.hwmon_root.display()
        );
    } else {
        for r in &readings {
            println!("{:<24} {:<24} {:>7.1} °C", r.chip, r.label, r.temperature_c);
        }
    }
    Ok(())
}
