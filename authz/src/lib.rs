//! # felhom-authz
//!
//! Background: operators act on a host through the hub, but the hub is a network service
//! and may be compromised. The agent therefore treats it as an untrusted relay: every
//! change it is asked to make must carry Ed25519 signatures of operator keys that the host
//! itself trusts (`/etc/felhom/signers.json`). See `docs/signed-ops.md`.
//!
//! Design: this crate owns the signed-operations contract and nothing else:
//! - [`envelope`]: DSSE v1 (`pae`, the envelope's JSON shape, base64 in both alphabets, the
//!   64 KiB size cap, `payload_sha256`);
//! - [`trust`]: `signers.json` parsed into a validated [`Trust`], and the file's owner/mode
//!   rule;
//! - [`verify`]: strict Ed25519 verification counting **distinct trusted public keys**,
//!   before a single byte of the body is parsed;
//! - [`payload`]: the operation and desired-state payloads, parsed only after verification,
//!   with every field checked (`deny_unknown_fields` at every level), and each operation's
//!   class (the grant it needs, which for issue 13's gated kinds may depend on the params);
//! - [`params`]: the gated kinds' params that need more than a struct (`set_config`'s
//!   config map, `restore`'s backup volume id);
//! - [`refusal`]: the typed refusal reasons, whose `as_str()` is the wire code.
//!
//! Must never: parse any part of a payload before its signatures are verified; treat a
//! `keyid` or a signature count as a security decision; do I/O (callers hand in bytes,
//! file metadata and the current time); hold or log private keys; spawn anything.
//!
//! Limitations: replay (`op_id` store), delivery, the journal and results are the agent's
//! job (issue 12, later session); this crate only says whether one envelope is valid now.

#![forbid(unsafe_code)]

pub mod envelope;
pub mod params;
pub mod payload;
pub mod refusal;
pub mod trust;
pub mod verify;

pub use envelope::{
    DESIRED_PAYLOAD_TYPE, Envelope, MAX_ENVELOPE_BYTES, OP_PAYLOAD_TYPE, PayloadType,
    SignatureEntry, decode_base64, encode_base64, pae, payload_sha256,
};
pub use params::{
    BackupFormat, BackupVolid, ConfigKey, ConfigValue, MAX_CONFIG_KEYS, ParamError, SetConfigParams,
};
pub use payload::{
    Action, AgentId, BackupCompress, BackupMode, BackupParams, ConfigDigest, Context,
    DesiredPayload, Expect, GuestOp, GuestType, HostOp, Kind, OpId, OpPayload, SnapshotName,
    SnapshotParams, StopParams, Target, parse_desired, parse_op,
};
pub use refusal::{Reason, Refusal};
pub use trust::{FileCheckError, Grant, Trust, TrustError, check_file_metadata, check_owner_mode};
pub use verify::{Verified, verify_desired, verify_envelope, verify_op};
