//! Requests, responses, operation classes and the frame format.
//!
//! Frame: a 4-byte big-endian payload length, then the payload: one bincode (2.0.x,
//! `standard()` config with a byte limit) encoding of a [`Request`] or [`Response`]. A
//! length of 0 or above the side's maximum is refused before any byte of payload is read.
//!
//! Frozen across versions: variant 0 of [`Request`] is `Hello { version }` and variant 0 of
//! [`Response`] is `Error`, so a client and a helper of different versions can always
//! tell each other that they disagree.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::values::*;

/// Bump on any change to the encoding of [`Request`] or [`Response`].
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest request payload the helper reads (the largest legitimate one, a spec with 16
/// SSH keys, is well below this).
pub const MAX_REQUEST_FRAME: usize = 256 * 1024;
/// Largest response payload the client reads.
pub const MAX_RESPONSE_FRAME: usize = 2 * 1024 * 1024;
/// The helper keeps at most this many bytes of smartctl's stdout.
pub const SMART_OUTPUT_CAP: usize = 1024 * 1024;
/// Maximum number of SSH keys in one create request.
pub const MAX_SSH_KEYS: usize = 16;

/// The three operation classes. One helper instance serves exactly one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Class {
    Pct,
    Usb,
    Smart,
}

impl Class {
    pub const ALL: [Class; 3] = [Class::Pct, Class::Usb, Class::Smart];

    pub fn as_str(self) -> &'static str {
        match self {
            Class::Pct => "pct",
            Class::Usb => "usb",
            Class::Smart => "smart",
        }
    }

    /// `privhelper-<class>.sock`.
    pub fn socket_name(self) -> String {
        format!("privhelper-{}.sock", self.as_str())
    }
}

impl FromStr for Class {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, ValueError> {
        Class::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| ValueError::invalid("class", format!("{s:?} is not pct, usb or smart")))
    }
}

impl fmt::Display for Class {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The closed set of privileged operations. Nothing else crosses the fence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Operation {
    PctCreateKeyctl,
    UsbMount,
    UsbUnmount,
    SmartRead,
}

impl Operation {
    pub const ALL: [Operation; 4] = [
        Operation::PctCreateKeyctl,
        Operation::UsbMount,
        Operation::UsbUnmount,
        Operation::SmartRead,
    ];

    /// The one class that may run this operation.
    pub fn class(self) -> Class {
        match self {
            Operation::PctCreateKeyctl => Class::Pct,
            Operation::UsbMount | Operation::UsbUnmount => Class::Usb,
            Operation::SmartRead => Class::Smart,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Operation::PctCreateKeyctl => "pct_create_keyctl",
            Operation::UsbMount => "usb_mount",
            Operation::UsbUnmount => "usb_unmount",
            Operation::SmartRead => "smart_read",
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Root disk of the new container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RootfsSpec {
    pub storage: StorageId,
    pub size_gib: DiskSizeGib,
}

/// The raw shape of [`NetSpec`] before the cross-field check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct NetSpecRaw {
    bridge: BridgeName,
    ip: NetIp,
    #[serde(default)]
    gw: Option<Gateway>,
}

/// `net0` of the new container: bridge plus `dhcp` or a static address with an optional
/// gateway of the same family (a gateway with `dhcp` is refused).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "NetSpecRaw", into = "NetSpecRaw")]
pub struct NetSpec {
    bridge: BridgeName,
    ip: NetIp,
    gw: Option<Gateway>,
}

impl NetSpec {
    pub fn new(bridge: BridgeName, ip: NetIp, gw: Option<Gateway>) -> Result<Self, ValueError> {
        match (&ip, gw) {
            (NetIp::Dhcp, Some(_)) => {
                return Err(ValueError::invalid("gw", "must be null with ip=dhcp"));
            }
            (NetIp::Cidr { addr, .. }, Some(g)) if addr.is_ipv4() != g.addr().is_ipv4() => {
                return Err(ValueError::invalid(
                    "gw",
                    "must be of the same family as ip",
                ));
            }
            _ => {}
        }
        Ok(NetSpec { bridge, ip, gw })
    }
    pub fn bridge(&self) -> &BridgeName {
        &self.bridge
    }
    pub fn ip(&self) -> &NetIp {
        &self.ip
    }
    pub fn gw(&self) -> Option<Gateway> {
        self.gw
    }
    /// The value of `pct create --net0`: `name=eth0,bridge=B,ip=IP[,gw=GW]` for `dhcp`
    /// and IPv4, `name=eth0,bridge=B,ip6=IP[,gw6=GW]` for IPv6 (PVE's net0 format takes
    /// IPv6 only under `ip6`/`gw6`; an IPv6 address in `ip=` fails its format check).
    pub fn net0(&self) -> String {
        let v6 = matches!(self.ip, NetIp::Cidr { addr, .. } if addr.is_ipv6());
        let (ip, gw) = if v6 { ("ip6", "gw6") } else { ("ip", "gw") };
        let mut s = format!("name=eth0,bridge={},{ip}={}", self.bridge, self.ip);
        if let Some(g) = self.gw {
            s.push_str(&format!(",{gw}={g}"));
        }
        s
    }
}

impl TryFrom<NetSpecRaw> for NetSpec {
    type Error = ValueError;
    fn try_from(r: NetSpecRaw) -> Result<Self, ValueError> {
        NetSpec::new(r.bridge, r.ip, r.gw)
    }
}

impl From<NetSpec> for NetSpecRaw {
    fn from(n: NetSpec) -> Self {
        NetSpecRaw {
            bridge: n.bridge,
            ip: n.ip,
            gw: n.gw,
        }
    }
}

/// At most [`MAX_SSH_KEYS`] keys.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "Vec<SshPublicKey>", into = "Vec<SshPublicKey>")]
pub struct SshKeys(Vec<SshPublicKey>);

impl SshKeys {
    pub fn new(keys: Vec<SshPublicKey>) -> Result<Self, ValueError> {
        if keys.len() > MAX_SSH_KEYS {
            return Err(ValueError::invalid(
                "ssh_public_keys",
                format!("{} keys; at most {MAX_SSH_KEYS}", keys.len()),
            ));
        }
        Ok(SshKeys(keys))
    }
    pub fn keys(&self) -> &[SshPublicKey] {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl TryFrom<Vec<SshPublicKey>> for SshKeys {
    type Error = ValueError;
    fn try_from(v: Vec<SshPublicKey>) -> Result<Self, ValueError> {
        SshKeys::new(v)
    }
}

impl From<SshKeys> for Vec<SshPublicKey> {
    fn from(k: SshKeys) -> Self {
        k.0
    }
}

/// What `felhom-agent privileged create-keyctl SPEC.json` reads and `PctCreateKeyctl`
/// carries. Every field is a validated type, so a spec that exists is valid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PctCreateSpec {
    pub vmid: Vmid,
    pub ostemplate: VolumeId,
    pub hostname: Hostname,
    pub memory_mib: MemoryMib,
    pub swap_mib: SwapMib,
    pub cores: Cores,
    pub rootfs: RootfsSpec,
    pub net: NetSpec,
    #[serde(default)]
    pub nesting: bool,
    #[serde(default)]
    pub ssh_public_keys: SshKeys,
    #[serde(default)]
    pub start: bool,
    #[serde(default)]
    pub onboot: bool,
}

impl PctCreateSpec {
    /// Parses the operator's JSON spec (unknown keys are refused).
    pub fn from_json(s: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(s)
    }
}

/// A client's request. Variant 0 is frozen (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Must be the first frame of every connection.
    Hello {
        version: u32,
    },
    /// Liveness; executes nothing.
    Ping,
    PctCreateKeyctl(PctCreateSpec),
    UsbMount {
        device: BlockDevicePath,
        name: MountName,
    },
    UsbUnmount {
        name: MountName,
    },
    SmartRead {
        device: DiskDevice,
    },
}

impl Request {
    /// The operation this request asks for; `None` for the control frames.
    pub fn operation(&self) -> Option<Operation> {
        match self {
            Request::Hello { .. } | Request::Ping => None,
            Request::PctCreateKeyctl(_) => Some(Operation::PctCreateKeyctl),
            Request::UsbMount { .. } => Some(Operation::UsbMount),
            Request::UsbUnmount { .. } => Some(Operation::UsbUnmount),
            Request::SmartRead { .. } => Some(Operation::SmartRead),
        }
    }
}

/// smartctl's result: stdout (capped at [`SMART_OUTPUT_CAP`]) and its exit status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SmartOutput {
    /// One byte string on the wire (length, then the bytes), so encoding and decoding
    /// copy it whole instead of visiting every byte.
    #[serde(with = "serde_bytes")]
    pub stdout: Vec<u8>,
    /// smartctl's exit status (a bit mask); -1 if it was killed by a signal.
    pub exit_status: i32,
    /// stdout was longer than the cap and was cut.
    pub truncated: bool,
}

impl SmartOutput {
    /// True when smartctl skipped the disk because it was in standby (`-n standby`):
    /// exit status 2 and smartctl's "Device is in STANDBY mode" message.
    pub fn is_standby(&self) -> bool {
        self.exit_status == 2
            && self
                .stdout
                .windows(b"is in STANDBY mode".len())
                .any(|w| w == b"is in STANDBY mode")
    }
}

/// Why the helper refused or failed a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The frame could not be read or decoded (size, truncation, garbage).
    Framing,
    /// The Hello carried another protocol version.
    VersionMismatch,
    /// The first frame was not Hello.
    HandshakeRequired,
    /// The peer is neither root nor the agent's uid.
    PeerRefused,
    /// The operation belongs to another class than this instance's.
    WrongClass,
    /// A value failed validation.
    Invalid,
    /// The device is not a USB-attached partition (or not a block device).
    NotUsb,
    /// The filesystem is not one of the allowed types.
    UnsupportedFilesystem,
    /// The mount name is taken by another filesystem or mount.
    NameInUse,
    /// The mount point is busy.
    Busy,
    /// No managed mount of that name.
    NotFound,
    /// The tool ran and failed.
    ToolFailed,
    /// The tool did not finish in time.
    Timeout,
    /// The audit log could not be written; nothing was executed.
    Audit,
    /// Anything else on the helper side (I/O, configuration).
    Internal,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Framing => "framing",
            ErrorKind::VersionMismatch => "version_mismatch",
            ErrorKind::HandshakeRequired => "handshake_required",
            ErrorKind::PeerRefused => "peer_refused",
            ErrorKind::WrongClass => "wrong_class",
            ErrorKind::Invalid => "invalid",
            ErrorKind::NotUsb => "not_usb",
            ErrorKind::UnsupportedFilesystem => "unsupported_filesystem",
            ErrorKind::NameInUse => "name_in_use",
            ErrorKind::Busy => "busy",
            ErrorKind::NotFound => "not_found",
            ErrorKind::ToolFailed => "tool_failed",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Audit => "audit",
            ErrorKind::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The helper's answer. Variant 0 is frozen (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Error {
        kind: ErrorKind,
        message: String,
    },
    Hello {
        version: u32,
        class: Class,
    },
    Pong {
        class: Class,
    },
    PctCreated {
        vmid: Vmid,
        output: String,
    },
    UsbMounted {
        name: MountName,
        mount_point: String,
        uuid: FsUuid,
        fstype: Fstype,
        /// It was already mounted there (nothing was mounted now).
        already_mounted: bool,
        /// The fstab was rewritten (false: the entry was already exactly right).
        fstab_changed: bool,
    },
    UsbUnmounted {
        name: MountName,
        was_mounted: bool,
        fstab_changed: bool,
    },
    Smart(SmartOutput),
}

/// Frame-level failures.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame length {len} is outside 1..={max}")]
    BadLength { len: usize, max: usize },
    #[error("frame payload does not decode: {0}")]
    Garbage(String),
    #[error("frame payload has {0} trailing bytes")]
    TrailingBytes(usize),
    #[error("{0}")]
    Invalid(String),
    #[error("message does not encode: {0}")]
    Encode(String),
}

fn config<const N: usize>() -> bincode::config::Configuration<
    bincode::config::BigEndian,
    bincode::config::Varint,
    bincode::config::Limit<N>,
> {
    bincode::config::standard()
        .with_big_endian()
        .with_limit::<N>()
}

/// Parses a frame header: the payload length, checked against `max`.
pub fn frame_len(header: [u8; 4], max: usize) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len == 0 || len > max {
        return Err(FrameError::BadLength { len, max });
    }
    Ok(len)
}

fn frame(
    payload: Result<Vec<u8>, bincode::error::EncodeError>,
    max: usize,
) -> Result<Vec<u8>, FrameError> {
    let payload = payload.map_err(|e| FrameError::Encode(e.to_string()))?;
    if payload.is_empty() || payload.len() > max {
        return Err(FrameError::BadLength {
            len: payload.len(),
            max,
        });
    }
    let mut out = Vec::with_capacity(4 + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Header + payload of a request.
pub fn encode_request(req: &Request) -> Result<Vec<u8>, FrameError> {
    frame(
        bincode::serde::encode_to_vec(req, config::<MAX_REQUEST_FRAME>()),
        MAX_REQUEST_FRAME,
    )
}

/// Header + payload of a response.
pub fn encode_response(resp: &Response) -> Result<Vec<u8>, FrameError> {
    frame(
        bincode::serde::encode_to_vec(resp, config::<MAX_RESPONSE_FRAME>()),
        MAX_RESPONSE_FRAME,
    )
}

fn decode_err(e: bincode::error::DecodeError) -> FrameError {
    match e {
        bincode::error::DecodeError::OtherString(s) if s.starts_with(VALUE_ERROR_PREFIX) => {
            FrameError::Invalid(s)
        }
        other => FrameError::Garbage(other.to_string()),
    }
}

/// Decodes a request payload (without header). Every value is validated while decoding;
/// a rejected value is [`FrameError::Invalid`], anything else malformed is `Garbage`.
pub fn decode_request(payload: &[u8]) -> Result<Request, FrameError> {
    let (req, used): (Request, usize) =
        bincode::serde::decode_from_slice(payload, config::<MAX_REQUEST_FRAME>())
            .map_err(decode_err)?;
    if used != payload.len() {
        return Err(FrameError::TrailingBytes(payload.len() - used));
    }
    Ok(req)
}

/// Decodes a response payload (without header).
pub fn decode_response(payload: &[u8]) -> Result<Response, FrameError> {
    let (resp, used): (Response, usize) =
        bincode::serde::decode_from_slice(payload, config::<MAX_RESPONSE_FRAME>())
            .map_err(decode_err)?;
    if used != payload.len() {
        return Err(FrameError::TrailingBytes(payload.len() - used));
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const SPEC: &str = r#"{"vmid": 120, "ostemplate": "local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst", "hostname": "web1", "memory_mib": 1024, "swap_mib": 512, "cores": 2, "rootfs": {"storage": "local-lvm", "size_gib": 8}, "net": {"bridge": "vmbr0", "ip": "dhcp", "gw": null}, "nesting": true, "ssh_public_keys": [], "start": false, "onboot": true}"#;

    #[test]
    fn every_operation_has_exactly_one_class() {
        // Exhaustive match: adding an operation fails to compile here until it is listed.
        for op in Operation::ALL {
            let listed = match op {
                Operation::PctCreateKeyctl
                | Operation::UsbMount
                | Operation::UsbUnmount
                | Operation::SmartRead => true,
            };
            assert!(listed);
        }
        assert_eq!(Operation::ALL.len(), 4);
        let per_class: Vec<usize> = Class::ALL
            .iter()
            .map(|c| Operation::ALL.iter().filter(|o| o.class() == *c).count())
            .collect();
        assert_eq!(per_class, vec![1, 2, 1]);
    }

    #[test]
    fn spec_json_round_trips_through_bincode() {
        let spec = PctCreateSpec::from_json(SPEC).unwrap();
        assert_eq!(spec.net.net0(), "name=eth0,bridge=vmbr0,ip=dhcp");
        let req = Request::PctCreateKeyctl(spec.clone());
        let framed = encode_request(&req).unwrap();
        let len = frame_len(framed[..4].try_into().unwrap(), MAX_REQUEST_FRAME).unwrap();
        assert_eq!(len, framed.len() - 4);
        assert_eq!(decode_request(&framed[4..]).unwrap(), req);
    }

    #[test]
    fn spec_refuses_unknown_keys_and_bad_net() {
        let extra = SPEC.replacen("\"vmid\"", "\"privileged\": true, \"vmid\"", 1);
        assert!(PctCreateSpec::from_json(&extra).is_err());
        let gw_dhcp = SPEC.replace("\"gw\": null", "\"gw\": \"192.0.2.1\"");
        assert!(PctCreateSpec::from_json(&gw_dhcp).is_err());
        let fam = SPEC.replace(
            "\"ip\": \"dhcp\", \"gw\": null",
            "\"ip\": \"192.0.2.5/24\", \"gw\": \"2001:db8::1\"",
        );
        assert!(PctCreateSpec::from_json(&fam).is_err());
        let ok = SPEC.replace(
            "\"ip\": \"dhcp\", \"gw\": null",
            "\"ip\": \"192.0.2.5/24\", \"gw\": \"192.0.2.1\"",
        );
        assert_eq!(
            PctCreateSpec::from_json(&ok).unwrap().net.net0(),
            "name=eth0,bridge=vmbr0,ip=192.0.2.5/24,gw=192.0.2.1"
        );
        let v6 = SPEC.replace(
            "\"ip\": \"dhcp\", \"gw\": null",
            "\"ip\": \"2001:db8::5/64\", \"gw\": \"2001:db8::1\"",
        );
        assert_eq!(
            PctCreateSpec::from_json(&v6).unwrap().net.net0(),
            "name=eth0,bridge=vmbr0,ip6=2001:db8::5/64,gw6=2001:db8::1"
        );
        let v6_no_gw = SPEC.replace("\"ip\": \"dhcp\"", "\"ip\": \"fd00::7/64\"");
        assert_eq!(
            PctCreateSpec::from_json(&v6_no_gw).unwrap().net.net0(),
            "name=eth0,bridge=vmbr0,ip6=fd00::7/64"
        );
    }

    #[test]
    fn decoding_revalidates_values() {
        // Encode a SmartRead whose device string is hostile, by hand-building the bytes of
        // an equivalent message with a plain String in that position.
        #[derive(Serialize)]
        enum Shadow {
            #[allow(dead_code)]
            Hello {
                version: u32,
            },
            #[allow(dead_code)]
            Ping,
            #[allow(dead_code)]
            PctCreateKeyctl(u8),
            #[allow(dead_code)]
            UsbMount {
                device: String,
                name: String,
            },
            #[allow(dead_code)]
            UsbUnmount {
                name: String,
            },
            SmartRead {
                device: String,
            },
        }
        let bytes = bincode::serde::encode_to_vec(
            Shadow::SmartRead {
                device: "sda; reboot".into(),
            },
            config::<MAX_REQUEST_FRAME>(),
        )
        .unwrap();
        match decode_request(&bytes) {
            Err(FrameError::Invalid(m)) => assert!(m.contains("device"), "{m}"),
            other => panic!("{other:?}"),
        }
        let ok = bincode::serde::encode_to_vec(
            Shadow::SmartRead {
                device: "sda".into(),
            },
            config::<MAX_REQUEST_FRAME>(),
        )
        .unwrap();
        assert!(matches!(decode_request(&ok), Ok(Request::SmartRead { .. })));
    }

    #[test]
    fn framing_errors() {
        assert!(frame_len([0, 0, 0, 0], MAX_REQUEST_FRAME).is_err());
        assert!(
            frame_len(
                ((MAX_REQUEST_FRAME + 1) as u32).to_be_bytes(),
                MAX_REQUEST_FRAME
            )
            .is_err()
        );
        assert!(matches!(
            decode_request(&[0xff, 0xff, 0xff]),
            Err(FrameError::Garbage(_))
        ));
        let mut ping = encode_request(&Request::Ping).unwrap()[4..].to_vec();
        ping.push(0);
        assert!(matches!(
            decode_request(&ping),
            Err(FrameError::TrailingBytes(1))
        ));
        // Hello stays variant 0 with a single u32: the first payload byte is 0.
        let hello = encode_request(&Request::Hello { version: 7 }).unwrap();
        assert_eq!(&hello[4..], &[0, 7]);
        let err = encode_response(&Response::Error {
            kind: ErrorKind::Framing,
            message: String::new(),
        })
        .unwrap();
        assert_eq!(err[4], 0);
    }

    #[test]
    fn smart_stdout_is_length_then_raw_bytes() {
        // The layout a plain Vec<u8> had (a length, then one byte per u8), so helpers and
        // agents of either build still understand each other.
        let stdout: Vec<u8> = (0..=255u8).chain(0..44).collect();
        let frame = encode_response(&Response::Smart(SmartOutput {
            stdout: stdout.clone(),
            exit_status: 4,
            truncated: true,
        }))
        .unwrap();
        let payload = &frame[4..];
        // variant index 6, then length 300 as a bincode varint (251 = u16 follows, BE).
        assert_eq!(&payload[..4], &[6, 251, 1, 44]);
        assert_eq!(&payload[4..304], &stdout[..]);
        let mut plain = vec![6u8];
        plain.extend(
            bincode::serde::encode_to_vec((&stdout, 4i32, true), config::<MAX_RESPONSE_FRAME>())
                .unwrap(),
        );
        assert_eq!(payload, &plain[..]);
        assert_eq!(
            decode_response(payload).unwrap(),
            Response::Smart(SmartOutput {
                stdout,
                exit_status: 4,
                truncated: true
            })
        );
    }

    #[test]
    fn standby_is_recognized() {
        let out = SmartOutput {
            stdout: br#"{"smartctl":{"messages":[{"string":"Device is in STANDBY mode, exit(2)","severity":"information"}],"exit_status":2}}"#.to_vec(),
            exit_status: 2,
            truncated: false,
        };
        assert!(out.is_standby());
        let other = SmartOutput {
            exit_status: 2,
            stdout: b"{}".to_vec(),
            truncated: false,
        };
        assert!(!other.is_standby());
    }
}
