//! Client side of the root fence: asks the per-class `felhom-privhelper` instances (Unix
//! sockets in `privhelper.socket_dir`: `privhelper-pct.sock`, `privhelper-usb.sock`,
//! `privhelper-smart.sock`) for the closed set of operations in `felhom-protocol`.
//!
//! Design: one connection per call (the helper exits when idle and systemd starts it
//! again, so a long-lived connection would buy nothing): connect, `Hello`, the request,
//! its response; the whole exchange is bounded by `privhelper.timeout`. Every helper
//! answer is a typed [`PrivilegedError`] or a typed result.
//!
//! Must never: execute anything itself (a test greps this crate for process spawning),
//! interpret smartctl's JSON (the hub side's SMART collector does), or retry a mutation.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use felhom_protocol::SmartOutput;
use felhom_protocol::{
    BlockDevicePath, Class, DiskDevice, ErrorKind, FsUuid, Fstype, MAX_RESPONSE_FRAME, MountName,
    PROTOCOL_VERSION, PctCreateSpec, Request, Response, Vmid, decode_response, encode_request,
    frame_len,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::config::PrivhelperConfig;

/// Largest create spec file read from disk.
const MAX_SPEC_BYTES: u64 = 1024 * 1024;

/// What can go wrong talking to a helper instance.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegedError {
    #[error("the {class} helper is not reachable at {path}: {source}")]
    Connect {
        class: Class,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the {class} helper did not answer within {after:?}")]
    Timeout { class: Class, after: Duration },
    #[error("talking to the {class} helper: {source}")]
    Io {
        class: Class,
        source: std::io::Error,
    },
    #[error("the {class} helper sent something unexpected: {detail}")]
    Protocol { class: Class, detail: String },
    #[error("the {class} helper speaks another protocol version: {message}")]
    VersionMismatch { class: Class, message: String },
    #[error("the {class} helper refused or failed ({kind}): {message}")]
    Helper {
        class: Class,
        kind: ErrorKind,
        message: String,
    },
}

impl PrivilegedError {
    /// The helper could not be reached at all (as opposed to answering with an error).
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            PrivilegedError::Connect { .. } | PrivilegedError::Timeout { .. }
        )
    }

    /// The helper's error kind, when it answered with one.
    pub fn helper_kind(&self) -> Option<ErrorKind> {
        match self {
            PrivilegedError::Helper { kind, .. } => Some(*kind),
            PrivilegedError::VersionMismatch { .. } => Some(ErrorKind::VersionMismatch),
            _ => None,
        }
    }
}

/// A helper instance's answer to `ping`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PingInfo {
    pub class: Class,
    pub version: u32,
    pub round_trip: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsbMounted {
    pub name: MountName,
    pub mount_point: String,
    pub uuid: FsUuid,
    pub fstype: Fstype,
    pub already_mounted: bool,
    pub fstab_changed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsbUnmounted {
    pub name: MountName,
    pub was_mounted: bool,
    pub fstab_changed: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PctCreated {
    pub vmid: Vmid,
    /// What `pct create` printed.
    pub output: String,
}

/// The agent's handle on the three helper instances.
#[derive(Debug, Clone)]
pub struct Client {
    socket_dir: PathBuf,
    timeout: Duration,
}

impl Client {
    pub fn new(cfg: &PrivhelperConfig) -> Client {
        Client {
            socket_dir: cfg.socket_dir.clone(),
            timeout: cfg.timeout,
        }
    }

    /// `<socket_dir>/privhelper-<class>.sock`.
    pub fn socket_path(&self, class: Class) -> PathBuf {
        self.socket_dir.join(class.socket_name())
    }

    /// Handshake plus `Ping`; executes nothing on the helper side.
    pub async fn ping(&self, class: Class) -> Result<PingInfo, PrivilegedError> {
        let started = Instant::now();
        let (version, resp) = self.exchange(class, Request::Ping).await?;
        match resp {
            Response::Pong { class: c } if c == class => Ok(PingInfo {
                class,
                version,
                round_trip: started.elapsed(),
            }),
            other => Err(unexpected(class, &other)),
        }
    }

    /// `smartctl --json=c -a -n standby /dev/<dev>` on the helper; stdout and exit status
    /// as smartctl gave them (see [`SmartOutput::is_standby`]).
    pub async fn smart_read(&self, dev: &DiskDevice) -> Result<SmartOutput, PrivilegedError> {
        let req = Request::SmartRead {
            device: dev.clone(),
        };
        match self.exchange(Class::Smart, req).await?.1 {
            Response::Smart(out) => Ok(out),
            other => Err(unexpected(Class::Smart, &other)),
        }
    }

    pub async fn usb_mount(
        &self,
        device: &BlockDevicePath,
        name: &MountName,
    ) -> Result<UsbMounted, PrivilegedError> {
        let req = Request::UsbMount {
            device: device.clone(),
            name: name.clone(),
        };
        match self.exchange(Class::Usb, req).await?.1 {
            Response::UsbMounted {
                name,
                mount_point,
                uuid,
                fstype,
                already_mounted,
                fstab_changed,
            } => Ok(UsbMounted {
                name,
                mount_point,
                uuid,
                fstype,
                already_mounted,
                fstab_changed,
            }),
            other => Err(unexpected(Class::Usb, &other)),
        }
    }

    pub async fn usb_unmount(&self, name: &MountName) -> Result<UsbUnmounted, PrivilegedError> {
        let req = Request::UsbUnmount { name: name.clone() };
        match self.exchange(Class::Usb, req).await?.1 {
            Response::UsbUnmounted {
                name,
                was_mounted,
                fstab_changed,
            } => Ok(UsbUnmounted {
                name,
                was_mounted,
                fstab_changed,
            }),
            other => Err(unexpected(Class::Usb, &other)),
        }
    }

    /// `pct create … --features keyctl=1[,nesting=1]` from a validated spec.
    pub async fn create_keyctl(&self, spec: &PctCreateSpec) -> Result<PctCreated, PrivilegedError> {
        let req = Request::PctCreateKeyctl(spec.clone());
        match self.exchange(Class::Pct, req).await?.1 {
            Response::PctCreated { vmid, output } => Ok(PctCreated { vmid, output }),
            other => Err(unexpected(Class::Pct, &other)),
        }
    }

    /// Connect, Hello, one request, its response — all within the timeout.
    async fn exchange(
        &self,
        class: Class,
        req: Request,
    ) -> Result<(u32, Response), PrivilegedError> {
        let path = self.socket_path(class);
        match tokio::time::timeout(self.timeout, exchange_on(class, &path, req)).await {
            Ok(r) => r,
            Err(_) => Err(PrivilegedError::Timeout {
                class,
                after: self.timeout,
            }),
        }
    }
}

fn unexpected(class: Class, resp: &Response) -> PrivilegedError {
    match resp {
        Response::Error { kind, message } => PrivilegedError::Helper {
            class,
            kind: *kind,
            message: message.clone(),
        },
        other => PrivilegedError::Protocol {
            class,
            detail: format!("answer {}", response_name(other)),
        },
    }
}

fn response_name(r: &Response) -> &'static str {
    match r {
        Response::Error { .. } => "Error",
        Response::Hello { .. } => "Hello",
        Response::Pong { .. } => "Pong",
        Response::PctCreated { .. } => "PctCreated",
        Response::UsbMounted { .. } => "UsbMounted",
        Response::UsbUnmounted { .. } => "UsbUnmounted",
        Response::Smart(_) => "Smart",
    }
}

async fn exchange_on(
    class: Class,
    path: &Path,
    req: Request,
) -> Result<(u32, Response), PrivilegedError> {
    let mut stream =
        UnixStream::connect(path)
            .await
            .map_err(|source| PrivilegedError::Connect {
                class,
                path: path.to_path_buf(),
                source,
            })?;
    // Hello and the request go out together (one round trip). The helper reads the
    // request only after it accepted the Hello; on a mismatch it answers and closes with
    // the request unread. A socket served by another class's helper refuses the request
    // (operations belong to exactly one class), so nothing runs by mistake.
    let proto = |e: felhom_protocol::FrameError| PrivilegedError::Protocol {
        class,
        detail: e.to_string(),
    };
    let mut bytes = encode_request(&Request::Hello {
        version: PROTOCOL_VERSION,
    })
    .map_err(proto)?;
    bytes.extend(encode_request(&req).map_err(proto)?);
    let written = stream.write_all(&bytes).await;
    let hello = match read_response(class, &mut stream).await {
        Ok(r) => r,
        // A refusal may have closed the connection before our write went through; if
        // there is no answer either, report the write's error.
        Err(e) => {
            return Err(written
                .err()
                .map_or(e, |w| PrivilegedError::Io { class, source: w }));
        }
    };
    let version = match hello {
        Response::Hello { version, class: c } if c == class => version,
        Response::Hello { class: c, .. } => {
            return Err(PrivilegedError::Protocol {
                class,
                detail: format!("the socket for {class} is served by the {c} helper"),
            });
        }
        Response::Error {
            kind: ErrorKind::VersionMismatch,
            message,
        } => return Err(PrivilegedError::VersionMismatch { class, message }),
        other => return Err(unexpected(class, &other)),
    };
    if let Err(source) = written {
        return Err(PrivilegedError::Io { class, source });
    }
    let resp = read_response(class, &mut stream).await?;
    Ok((version, resp))
}

async fn read_response(class: Class, stream: &mut UnixStream) -> Result<Response, PrivilegedError> {
    let io = |source| PrivilegedError::Io { class, source };
    let mut header = [0u8; 4];
    stream.read_exact(&mut header).await.map_err(io)?;
    let len = frame_len(header, MAX_RESPONSE_FRAME).map_err(|e| PrivilegedError::Protocol {
        class,
        detail: e.to_string(),
    })?;
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).await.map_err(io)?;
    decode_response(&payload).map_err(|e| PrivilegedError::Protocol {
        class,
        detail: e.to_string(),
    })
}

/// Why a create spec file was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: larger than 1 MiB")]
    TooLarge { path: PathBuf },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// Reads and validates a `create-keyctl` spec (unknown keys refused). The later
/// per-guest queue takes the validated spec from here.
pub fn load_spec(path: &Path) -> Result<PctCreateSpec, SpecError> {
    let md = std::fs::metadata(path).map_err(|source| SpecError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    if md.len() > MAX_SPEC_BYTES {
        return Err(SpecError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    let text = std::fs::read_to_string(path).map_err(|source| SpecError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    PctCreateSpec::from_json(&text).map_err(|e| SpecError::Invalid {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Pings one class or all three, in pct, usb, smart order.
pub async fn ping_classes(
    client: &Client,
    only: Option<Class>,
) -> Vec<(Class, Result<PingInfo, PrivilegedError>)> {
    let classes: Vec<Class> = match only {
        Some(c) => vec![c],
        None => Class::ALL.to_vec(),
    };
    let mut out = Vec::new();
    for c in classes {
        out.push((c, client.ping(c).await));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: &str = r#"{"vmid": 120, "ostemplate": "local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst", "hostname": "web1", "memory_mib": 1024, "swap_mib": 512, "cores": 2, "rootfs": {"storage": "local-lvm", "size_gib": 8}, "net": {"bridge": "vmbr0", "ip": "dhcp", "gw": null}, "nesting": true, "ssh_public_keys": [], "start": false, "onboot": true}"#;

    #[test]
    fn load_spec_validates_and_names_the_problem() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("spec.json");
        std::fs::write(&p, SPEC).unwrap();
        let spec = load_spec(&p).unwrap();
        assert_eq!(spec.vmid.get(), 120);
        assert!(spec.nesting);
        std::fs::write(&p, SPEC.replace("\"web1\"", "\"web1;reboot\"")).unwrap();
        let e = load_spec(&p).unwrap_err().to_string();
        assert!(e.contains("hostname"), "{e}");
        std::fs::write(
            &p,
            SPEC.replace(
                "\"vmid\": 120",
                "\"vmid\": 120, \"features\": \"mount=nfs\"",
            ),
        )
        .unwrap();
        let e = load_spec(&p).unwrap_err().to_string();
        assert!(e.contains("unknown field"), "{e}");
        assert!(matches!(
            load_spec(&d.path().join("missing.json")),
            Err(SpecError::Read { .. })
        ));
    }

    #[test]
    fn socket_paths_per_class() {
        let c = Client::new(&PrivhelperConfig::default());
        assert_eq!(
            c.socket_path(Class::Pct),
            Path::new("/run/felhom-privhelper/privhelper-pct.sock")
        );
        assert_eq!(
            c.socket_path(Class::Usb),
            Path::new("/run/felhom-privhelper/privhelper-usb.sock")
        );
        assert_eq!(
            c.socket_path(Class::Smart),
            Path::new("/run/felhom-privhelper/privhelper-smart.sock")
        );
    }
}
