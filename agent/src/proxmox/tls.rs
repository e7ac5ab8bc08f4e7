//! TLS for the Proxmox connection: `proxmox.tls` (exactly one of a SHA-256 pin of the leaf
//! certificate, a CA file, or the explicit `insecure: true`) mapped onto the shared
//! [`crate::tls`] configuration, whose pin verifier the hub client uses too.
//!
//! Must never: verify less than the config says; only [`TlsVerify::Insecure`] becomes
//! [`Trust::Insecure`].

use crate::config::TlsVerify;
use crate::tls::{Peer, Trust};

use super::error::ProxmoxError;

pub use crate::tls::{PinMismatch, fingerprint};

/// The rustls client config for the chosen verification.
pub(crate) fn client_config(verify: &TlsVerify) -> Result<rustls::ClientConfig, ProxmoxError> {
    let trust = match verify {
        TlsVerify::PinSha256(pin) => Trust::PinSha256(*pin),
        TlsVerify::CaFile(path) => Trust::CaFile(path.clone()),
        TlsVerify::Insecure => Trust::Insecure,
    };
    crate::tls::client_config(Peer::Proxmox, &trust).map_err(|e| ProxmoxError::Setup(e.to_string()))
}
