//! `felhom-agent privileged …`: thin wrapper over [`crate::privileged`]; parses the
//! operator's arguments into validated values, makes one call, prints the answer (a few
//! lines, or with `--json` one document). `create-keyctl` creates a guest, so it runs in
//! that guest's queue lane: on the daemon's queue while it runs (over the control socket),
//! else on a local one with the `state_dir` lock held (see [`super::mutations`]).
//!
//! Exit codes: 0 done; 1 the helper refused or failed, or `smart` found the disk failing
//! or could not read it; 2 a bad argument (checked before the config is even loaded);
//! 3 the helper is not reachable.

use felhom_protocol::{BlockDevicePath, Class, DiskDevice, MountName};
use serde_json::{Value, json};

use super::mutations::{CreateError, LocalQueue, create_on_queue, created_from};
use super::{Cli, CliError, Exit, PrivilegedCmd};
use crate::control::{self, ControlError, Request};
use crate::hub::report::{DiskHealth, Timestamp};
use crate::hub::smart::parse_smartctl;
use crate::privileged::{self, Client, PrivilegedError, SmartOutput};

fn exit_of(e: &PrivilegedError) -> Exit {
    if e.is_unreachable() {
        Exit::Unreachable
    } else {
        Exit::Problem
    }
}

/// A helper error as the command's result: with `--json`, a document that also carries
/// the class and the helper's error kind.
fn helper_err(cli: &Cli, class: Class, e: PrivilegedError) -> CliError {
    let exit = exit_of(&e);
    if !cli.json {
        return match exit {
            Exit::Unreachable => CliError::Unreachable(e.to_string()),
            _ => CliError::Problem(e.to_string()),
        };
    }
    super::print_json(&json!({
        "ok": false,
        "exit": exit as u8,
        "class": class.as_str(),
        "unreachable": e.is_unreachable(),
        "kind": e.helper_kind().map(|k| k.as_str()),
        "error": e.to_string(),
    }));
    CliError::Reported {
        exit,
        summary: e.to_string(),
    }
}

fn usage<E: std::fmt::Display>(e: E) -> CliError {
    CliError::Usage(e.to_string())
}

pub fn run(cli: &Cli, cmd: &PrivilegedCmd) -> Result<(), CliError> {
    // Validate the arguments before anything else, so a typo never needs the config.
    enum Call {
        Ping(Option<Class>),
        Smart(DiskDevice),
        Mount(BlockDevicePath, MountName),
        Unmount(MountName),
        Create(felhom_protocol::PctCreateSpec),
    }
    let call = match cmd {
        PrivilegedCmd::Ping { class } => Call::Ping(
            class
                .as_deref()
                .map(str::parse)
                .transpose()
                .map_err(usage)?,
        ),
        PrivilegedCmd::Smart { device } => {
            Call::Smart(DiskDevice::new(device.as_str()).map_err(usage)?)
        }
        PrivilegedCmd::UsbMount { device, name } => Call::Mount(
            BlockDevicePath::parse_user(device).map_err(usage)?,
            MountName::new(name.as_str()).map_err(usage)?,
        ),
        PrivilegedCmd::UsbUnmount { name } => {
            Call::Unmount(MountName::new(name.as_str()).map_err(usage)?)
        }
        PrivilegedCmd::CreateKeyctl { spec } => {
            Call::Create(privileged::load_spec(spec).map_err(usage)?)
        }
    };
    let cfg = super::load_host_config(cli)?;
    let client = Client::new(&cfg.privhelper);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Problem(format!("tokio runtime: {e}")))?;
    rt.block_on(async {
        match call {
            Call::Ping(only) => ping(cli, &client, only).await,
            Call::Smart(dev) => match client.smart_read(&dev).await {
                Ok(out) => smart(cli, &dev, &out),
                Err(e) => Err(helper_err(cli, Class::Smart, e)),
            },
            Call::Mount(dev, name) => {
                let m = client
                    .usb_mount(&dev, &name)
                    .await
                    .map_err(|e| helper_err(cli, Class::Usb, e))?;
                if cli.json {
                    super::print_json(&json!({
                        "ok": true,
                        "device": dev.as_str(),
                        "name": m.name.as_str(),
                        "mount_point": m.mount_point,
                        "uuid": m.uuid.as_str(),
                        "fstype": m.fstype.as_str(),
                        "already_mounted": m.already_mounted,
                        "fstab_changed": m.fstab_changed,
                    }));
                } else {
                    println!(
                        "{} ({} {}) mounted at {}{}; fstab {}",
                        dev,
                        m.fstype,
                        m.uuid,
                        m.mount_point,
                        if m.already_mounted { " (already)" } else { "" },
                        if m.fstab_changed {
                            "updated"
                        } else {
                            "unchanged"
                        }
                    );
                }
                Ok(())
            }
            Call::Unmount(name) => {
                let u = client
                    .usb_unmount(&name)
                    .await
                    .map_err(|e| helper_err(cli, Class::Usb, e))?;
                if cli.json {
                    super::print_json(&json!({
                        "ok": true,
                        "name": u.name.as_str(),
                        "was_mounted": u.was_mounted,
                        "fstab_changed": u.fstab_changed,
                    }));
                } else {
                    println!(
                        "{name}: {}; fstab {}",
                        if u.was_mounted {
                            "unmounted"
                        } else {
                            "was not mounted"
                        },
                        if u.fstab_changed {
                            "entry removed"
                        } else {
                            "unchanged"
                        }
                    );
                }
                Ok(())
            }
            Call::Create(spec) => {
                let req = Request::CreateKeyctl { spec: spec.clone() };
                let c = match control::request(&cfg.control.socket, &req).await {
                    Ok(body) => created_from(&body)?,
                    Err(ControlError::NotRunning { .. }) => {
                        let command = match cmd {
                            PrivilegedCmd::CreateKeyctl { spec } => {
                                format!("privileged create-keyctl {}", spec.display())
                            }
                            _ => "privileged create-keyctl".to_string(),
                        };
                        let local = LocalQueue::take(&cfg.state_dir, &command)?;
                        let created = create_on_queue(&client, local.queue(), spec).await;
                        local.close().await;
                        match created {
                            Ok(c) => c,
                            Err(CreateError::Helper(e)) => {
                                return Err(helper_err(cli, Class::Pct, e));
                            }
                            Err(e) => return Err(e.into()),
                        }
                    }
                    Err(e) => return Err(e.into()),
                };
                if cli.json {
                    super::print_json(&json!({
                        "ok": true,
                        "vmid": c.vmid.get(),
                        "output": c.output,
                    }));
                } else {
                    print!("{}", c.output);
                    println!("container {} created with keyctl=1", c.vmid);
                }
                Ok(())
            }
        }
    })
}

/// One line (or JSON item) per class; the first failure decides the exit code.
async fn ping(cli: &Cli, client: &Client, only: Option<Class>) -> Result<(), CliError> {
    let mut failed: Option<PrivilegedError> = None;
    let mut items = Vec::new();
    for (class, r) in privileged::ping_classes(client, only).await {
        match r {
            Ok(p) => {
                let ms = p.round_trip.as_secs_f64() * 1000.0;
                if !cli.json {
                    println!("{class}: ok (protocol {}, {ms:.1} ms)", p.version);
                }
                items.push(json!({"class": class.as_str(), "ok": true,
                                  "protocol": p.version, "round_trip_ms": ms}));
            }
            Err(e) => {
                if !cli.json {
                    println!("{class}: {e}");
                }
                items.push(json!({"class": class.as_str(), "ok": false,
                                  "unreachable": e.is_unreachable(),
                                  "kind": e.helper_kind().map(|k| k.as_str()),
                                  "error": e.to_string()}));
                failed.get_or_insert(e);
            }
        }
    }
    let exit = failed.as_ref().map(exit_of);
    if cli.json {
        super::print_json(&json!({
            "ok": failed.is_none(),
            "exit": exit.unwrap_or(Exit::Ok) as u8,
            "classes": items,
        }));
    }
    match (failed, exit) {
        (Some(e), Some(exit)) if cli.json => Err(CliError::Reported {
            exit,
            summary: e.to_string(),
        }),
        (Some(e), Some(Exit::Unreachable)) => Err(CliError::Unreachable(e.to_string())),
        (Some(e), _) => Err(CliError::Problem(e.to_string())),
        (None, _) => Ok(()),
    }
}

/// smartctl's answer read the way the hub reporter reads it: exit 1 when the disk says
/// it is failing or could not be read; a disk in standby is not woken and is no problem.
fn smart(cli: &Cli, dev: &DiskDevice, out: &SmartOutput) -> Result<(), CliError> {
    let parsed = parse_smartctl(
        dev.as_str(),
        &out.stdout,
        out.exit_status,
        out.truncated,
        Timestamp::now(),
    );
    let d = &parsed.disk;
    let problem = match (d.health, &parsed.error) {
        (DiskHealth::Failed, _) => Some(format!("{dev}: the disk reports it is FAILING")),
        (DiskHealth::Standby, _) => None,
        (_, Some(e)) => Some(e.to_string()),
        (DiskHealth::Unknown, None) => Some(format!("{dev}: no SMART health in the answer")),
        (DiskHealth::Passed, None) => None,
    };
    let health = serde_json::to_value(d.health).unwrap_or(Value::Null);
    if cli.json {
        let smartctl: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        super::print_json(&json!({
            "ok": problem.is_none(),
            "exit": if problem.is_some() { Exit::Problem } else { Exit::Ok } as u8,
            "device": dev.as_str(),
            "health": health,
            "model": d.model,
            "serial": d.serial,
            "temperature_c": d.temperature_c,
            "power_on_hours": d.power_on_hours,
            "reallocated_sectors": d.reallocated_sectors,
            "media_errors": d.media_errors,
            "standby": out.is_standby(),
            "exit_status": out.exit_status,
            "truncated": out.truncated,
            "problem": problem,
            "smartctl": smartctl,
        }));
    } else {
        let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        println!(
            "{dev}: {}",
            health.as_str().unwrap_or("unknown").to_uppercase()
        );
        println!("  model          {}", opt(d.model.clone()));
        println!("  serial         {}", opt(d.serial.clone()));
        println!(
            "  temperature    {}",
            opt(d.temperature_c.map(|t| format!("{t} °C")))
        );
        println!(
            "  power-on hours {}",
            opt(d.power_on_hours.map(|h| h.to_string()))
        );
        println!(
            "  reallocated    {}",
            opt(d.reallocated_sectors.map(|v| v.to_string()))
        );
        println!(
            "  media errors   {}",
            opt(d.media_errors.map(|v| v.to_string()))
        );
        println!("  smartctl exit  {}", out.exit_status);
        if out.is_standby() {
            println!("  in standby: not woken, nothing read");
        }
    }
    match problem {
        None => Ok(()),
        Some(p) if cli.json => Err(CliError::Reported {
            exit: Exit::Problem,
            summary: p,
        }),
        Some(p) => Err(CliError::Problem(p)),
    }
}
