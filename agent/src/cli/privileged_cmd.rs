//! `felhom-agent privileged …`: thin wrapper over [`crate::privileged`]; parses the
//! operator's arguments into validated values, makes one call, prints the answer.
//! `create-keyctl` creates a guest, so it runs in that guest's queue lane: on the daemon's
//! queue while it runs (over the control socket), else on a local one with the
//! `state_dir` lock held (see [`super::mutations`]).

use felhom_protocol::{BlockDevicePath, Class, DiskDevice, MountName};

use super::mutations::{LocalQueue, create_on_queue, created_from};
use super::{Cli, CliError, PrivilegedCmd};
use crate::control::{self, ControlError, Request};
use crate::privileged::{self, Client, PrivilegedError};

fn helper_err(e: PrivilegedError) -> CliError {
    if e.is_unreachable() {
        CliError::Unreachable(e.to_string())
    } else {
        CliError::Problem(e.to_string())
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
    let cfg = super::load_config(cli)?;
    let client = Client::new(&cfg.privhelper);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Problem(format!("tokio runtime: {e}")))?;
    rt.block_on(async {
        match call {
            Call::Ping(only) => {
                let mut failed = None;
                for (class, r) in privileged::ping_classes(&client, only).await {
                    match r {
                        Ok(p) => println!(
                            "{class}: ok (protocol {}, {:.1} ms)",
                            p.version,
                            p.round_trip.as_secs_f64() * 1000.0
                        ),
                        Err(e) => {
                            println!("{class}: {e}");
                            failed.get_or_insert(e);
                        }
                    }
                }
                failed.map_or(Ok(()), |e| Err(helper_err(e)))
            }
            Call::Smart(dev) => {
                let out = client.smart_read(&dev).await.map_err(helper_err)?;
                println!("{}", String::from_utf8_lossy(&out.stdout).trim_end());
                if out.is_standby() {
                    eprintln!("{dev}: in standby, not woken (smartctl exit status 2)");
                    Ok(())
                } else if out.exit_status & 0b111 != 0 {
                    Err(CliError::Problem(format!(
                        "smartctl exit status {} for {dev}",
                        out.exit_status
                    )))
                } else {
                    if out.exit_status != 0 {
                        eprintln!(
                            "{dev}: smartctl exit status {} (disk reports problems)",
                            out.exit_status
                        );
                    }
                    Ok(())
                }
            }
            Call::Mount(dev, name) => {
                let m = client.usb_mount(&dev, &name).await.map_err(helper_err)?;
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
                Ok(())
            }
            Call::Unmount(name) => {
                let u = client.usb_unmount(&name).await.map_err(helper_err)?;
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
                        let local = LocalQueue::take(&cfg, &command)?;
                        let created = create_on_queue(&client, local.queue(), spec).await;
                        local.close().await;
                        created?
                    }
                    Err(e) => return Err(e.into()),
                };
                print!("{}", c.output);
                println!("container {} created with keyctl=1", c.vmid);
                Ok(())
            }
        }
    })
}
