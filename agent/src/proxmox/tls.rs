//! TLS for the Proxmox connection: exactly one of a SHA-256 pin of the leaf certificate, a
//! CA file, or (explicit `insecure: true`) no verification. Builds the `rustls` client
//! config with the ring provider; reqwest gets it preconfigured.
//!
//! Must never: verify less than the config says. `Leaf::Any` (accept any certificate) is built
//! only from [`TlsVerify::Insecure`].

use std::error::Error as StdError;
use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};

use crate::config::{TlsVerify, format_fingerprint};

use super::error::ProxmoxError;

/// The payload of the `rustls::Error::Other` a pin mismatch fails the handshake with; the
/// client finds it in reqwest's error chain to build [`ProxmoxError::PinMismatch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinMismatch {
    pub expected: String,
    pub seen: String,
}

impl fmt::Display for PinMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "certificate pin mismatch: expected {}, seen {}",
            self.expected, self.seen
        )
    }
}

impl StdError for PinMismatch {}

/// SHA-256 of a certificate's DER.
pub fn fingerprint(cert: &[u8]) -> [u8; 32] {
    Sha256::digest(cert).into()
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Which leaf certificates [`LeafVerifier`] accepts.
#[derive(Debug)]
enum Leaf {
    /// Exactly the one whose SHA-256 is pinned. The host name is not checked: the pin is
    /// the identity.
    Pinned([u8; 32]),
    /// Any (`insecure: true` only).
    Any,
}

/// The verifier for a pin or for `insecure: true`; either way the handshake signatures
/// are still verified, so the server must hold the key of the certificate it sent.
#[derive(Debug)]
struct LeafVerifier {
    leaf: Leaf,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for LeafVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let pin = match &self.leaf {
            Leaf::Any => return Ok(ServerCertVerified::assertion()),
            Leaf::Pinned(pin) => pin,
        };
        let seen = fingerprint(end_entity.as_ref());
        if seen == *pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::Other(rustls::OtherError(Arc::new(
                PinMismatch {
                    expected: format_fingerprint(pin),
                    seen: format_fingerprint(&seen),
                },
            ))))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Loads every certificate of a PEM file into a root store.
pub(crate) fn root_store_from_pem(path: &std::path::Path) -> Result<RootCertStore, ProxmoxError> {
    let bytes = std::fs::read(path)
        .map_err(|e| ProxmoxError::Setup(format!("cannot read CA file {}: {e}", path.display())))?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&bytes) {
        let cert = cert.map_err(|e| {
            ProxmoxError::Setup(format!("CA file {} is not valid PEM: {e}", path.display()))
        })?;
        roots.add(cert).map_err(|e| {
            ProxmoxError::Setup(format!(
                "CA file {} holds an unusable certificate: {e}",
                path.display()
            ))
        })?;
    }
    if roots.is_empty() {
        return Err(ProxmoxError::Setup(format!(
            "CA file {} holds no certificate",
            path.display()
        )));
    }
    Ok(roots)
}

/// The rustls client config for the chosen verification.
pub(crate) fn client_config(verify: &TlsVerify) -> Result<rustls::ClientConfig, ProxmoxError> {
    let provider = provider();
    let algorithms = provider.signature_verification_algorithms;
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ProxmoxError::Setup(format!("TLS protocol versions: {e}")))?;
    let leaf = |leaf| Arc::new(LeafVerifier { leaf, algorithms });
    let mut config = match verify {
        TlsVerify::PinSha256(pin) => builder
            .dangerous()
            .with_custom_certificate_verifier(leaf(Leaf::Pinned(*pin)))
            .with_no_client_auth(),
        TlsVerify::CaFile(path) => builder
            .with_root_certificates(root_store_from_pem(path)?)
            .with_no_client_auth(),
        TlsVerify::Insecure => builder
            .dangerous()
            .with_custom_certificate_verifier(leaf(Leaf::Any))
            .with_no_client_auth(),
    };
    // pveproxy speaks HTTP/1.1.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Walks an error's source chain for a [`PinMismatch`], looking inside `io::Error`s and
/// `rustls::Error::Other`, which do not expose their payload as a `source`.
pub(crate) fn find_pin_mismatch(err: &(dyn StdError + 'static)) -> Option<PinMismatch> {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(found) = inspect(e) {
            return Some(found);
        }
        cur = e.source();
    }
    None
}

fn inspect(e: &(dyn StdError + 'static)) -> Option<PinMismatch> {
    if let Some(p) = e.downcast_ref::<PinMismatch>() {
        return Some(p.clone());
    }
    if let Some(rustls::Error::Other(other)) = e.downcast_ref::<rustls::Error>() {
        return find_pin_mismatch(other.0.as_ref());
    }
    if let Some(io) = e.downcast_ref::<std::io::Error>()
        && let Some(inner) = io.get_ref()
    {
        return find_pin_mismatch(inner);
    }
    None
}

/// True when the chain holds a rustls error (certificate or handshake problem).
pub(crate) fn find_tls_error(err: &(dyn StdError + 'static)) -> Option<String> {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(r) = e.downcast_ref::<rustls::Error>() {
            return Some(r.to_string());
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
            && let Some(found) = find_tls_error(inner)
        {
            return Some(found);
        }
        cur = e.source();
    }
    None
}
