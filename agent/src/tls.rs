//! TLS towards the agent's two HTTPS peers, Proxmox VE and the hub.
//!
//! Background: a failed handshake surfaces from reqwest as a chain of errors (reqwest →
//! hyper-util → io → rustls → webpki) whose innermost text, e.g.
//! `invalid peer certificate: Other(OtherError(CaUsedAsEndEntity))`, tells an operator
//! neither what is wrong nor what to change.
//!
//! Design:
//! - [`client_config`] builds the rustls client configuration (ring provider) for one
//!   [`Trust`]: a SHA-256 pin of the leaf, a CA file, the system roots, or (Proxmox only)
//!   the explicit `insecure`. One pin verifier serves both peers.
//! - [`explain`] walks an error's source chain (looking inside `io::Error` and
//!   `rustls::OtherError`, which hide their payload from `source()`) and maps what it finds
//!   to a typed [`Failure`]: a [`TlsProblem`] or an [`Unreachable`] cause. Its `Display` says
//!   in operator terms what is wrong and how to fix it, naming the [`Peer`]'s config keys.
//! - A bad CA file is a [`TlsSetupError`], found before any connection.
//!
//! Must never: verify less than the [`Trust`] says (`Leaf::Any` comes only from
//! [`Trust::Insecure`]); put a secret into a message (certificate fingerprints and names
//! are public).

use std::error::Error as StdError;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    AlertDescription, CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use sha2::{Digest, Sha256};

use crate::config::format_fingerprint;

/// Which server the agent was talking to; decides the config keys a fix names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    Proxmox,
    Hub,
}

impl Peer {
    fn name(self) -> &'static str {
        match self {
            Peer::Proxmox => "Proxmox",
            Peer::Hub => "the hub",
        }
    }
    fn url_key(self) -> &'static str {
        match self {
            Peer::Proxmox => "proxmox.url",
            Peer::Hub => "hub.url",
        }
    }
    fn pin_key(self) -> &'static str {
        match self {
            Peer::Proxmox => "proxmox.tls.pin_sha256",
            Peer::Hub => "hub.tls.pin_sha256",
        }
    }
    fn ca_key(self) -> &'static str {
        match self {
            Peer::Proxmox => "proxmox.tls.ca_file",
            Peer::Hub => "hub.ca_file",
        }
    }
    /// Where the operator reads the certificate's SHA-256.
    fn pin_howto(self) -> &'static str {
        match self {
            Peer::Proxmox => "`pvenode cert info` on the node prints it",
            Peer::Hub => {
                "`openssl x509 -in <the hub's certificate> -noout -fingerprint -sha256` prints it"
            }
        }
    }
}

/// How the server's certificate is verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// Exactly the leaf certificate with this SHA-256 (of its DER); names are not checked.
    PinSha256([u8; 32]),
    /// Chains to a CA in this PEM file, for the host name of the URL.
    CaFile(PathBuf),
    /// Chains to the system's roots.
    SystemRoots,
    /// Not verified at all (Proxmox's explicit `insecure: true` only).
    Insecure,
}

/// A CA file or the system roots cannot be used; found before any connection.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("cannot read the CA file {} ({}): {source}; fix: point {} at a readable PEM file, or use {} instead", .path.display(), .peer.ca_key(), .peer.ca_key(), .peer.pin_key())]
    CaFileUnreadable {
        peer: Peer,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the CA file {} ({}) is not valid PEM: {detail}; fix: give the CA certificate in PEM form (`-----BEGIN CERTIFICATE-----`)", .path.display(), .peer.ca_key())]
    CaFileNotPem {
        peer: Peer,
        path: PathBuf,
        detail: String,
    },
    #[error("the CA file {} ({}) holds no certificate; fix: give the CA certificate in PEM form (`-----BEGIN CERTIFICATE-----`)", .path.display(), .peer.ca_key())]
    CaFileEmpty { peer: Peer, path: PathBuf },
    #[error("the CA file {} ({}) holds a certificate that cannot be a trust anchor: {detail}", .path.display(), .peer.ca_key())]
    CaFileUnusable {
        peer: Peer,
        path: PathBuf,
        detail: String,
    },
    #[error("no system root certificates found; fix: set {} or {}", .0.ca_key(), .0.pin_key())]
    NoSystemRoots(Peer),
    #[error("TLS setup: {0}")]
    Rustls(String),
}

/// The payload of the `rustls::Error::Other` a pin mismatch fails the handshake with.
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

/// Which leaf certificates [`LeafVerifier`] accepts.
#[derive(Debug)]
enum Leaf {
    /// Exactly the one whose SHA-256 is pinned. The host name is not checked: the pin is
    /// the identity. A self-signed CA certificate used as the server's is fine here.
    Pinned([u8; 32]),
    /// Any (`insecure: true` only).
    Any,
}

/// The verifier for a pin or for `insecure`; either way the handshake signatures are
/// still verified, so the server must hold the key of the certificate it sent.
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
pub fn root_store_from_pem(peer: Peer, path: &Path) -> Result<RootCertStore, TlsSetupError> {
    let bytes = std::fs::read(path).map_err(|source| TlsSetupError::CaFileUnreadable {
        peer,
        path: path.to_path_buf(),
        source,
    })?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&bytes) {
        let cert = cert.map_err(|e| TlsSetupError::CaFileNotPem {
            peer,
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
        roots.add(cert).map_err(|e| TlsSetupError::CaFileUnusable {
            peer,
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
    }
    if roots.is_empty() {
        return Err(TlsSetupError::CaFileEmpty {
            peer,
            path: path.to_path_buf(),
        });
    }
    Ok(roots)
}

/// The rustls client config (ring provider, HTTP/1.1) for `trust`.
pub fn client_config(peer: Peer, trust: &Trust) -> Result<rustls::ClientConfig, TlsSetupError> {
    let provider: Arc<CryptoProvider> = Arc::new(rustls::crypto::ring::default_provider());
    let algorithms = provider.signature_verification_algorithms;
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsSetupError::Rustls(format!("protocol versions: {e}")))?;
    let leaf = |leaf| Arc::new(LeafVerifier { leaf, algorithms });
    let mut config = match trust {
        Trust::PinSha256(pin) => builder
            .dangerous()
            .with_custom_certificate_verifier(leaf(Leaf::Pinned(*pin)))
            .with_no_client_auth(),
        Trust::CaFile(path) => builder
            .with_root_certificates(root_store_from_pem(peer, path)?)
            .with_no_client_auth(),
        Trust::SystemRoots => {
            let mut roots = RootCertStore::empty();
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            if roots.is_empty() {
                return Err(TlsSetupError::NoSystemRoots(peer));
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Trust::Insecure => builder
            .dangerous()
            .with_custom_certificate_verifier(leaf(Leaf::Any))
            .with_no_client_auth(),
    };
    // pveproxy and the hub speak HTTP/1.1.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// What went wrong in the TLS handshake, by cause.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsProblem {
    /// The server presented a CA certificate as its own (`openssl req -x509`'s default).
    CaUsedAsEndEntity,
    /// The certificate does not chain to a trusted CA (self-signed, or another CA).
    UnknownIssuer,
    /// Signed by a CA of the trusted CA's name but another key (a regenerated CA).
    BadSignature,
    Expired {
        not_after: Option<String>,
    },
    NotYetValid {
        not_before: Option<String>,
    },
    /// The URL's host is not among the certificate's names.
    NameMismatch {
        expected: String,
        presented: Vec<String>,
    },
    /// The certificate is not for TLS servers (extended key usage).
    NotForServers,
    PinMismatch {
        expected: String,
        seen: String,
    },
    /// No common protocol version or cipher, or the server broke the handshake off.
    Handshake {
        detail: String,
    },
    /// The port does not speak TLS (e.g. plain HTTP).
    NotTls {
        detail: String,
    },
    /// Any other rustls error, verbatim.
    Other {
        detail: String,
    },
}

/// Why a connection never carried a request, without TLS being the cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unreachable {
    /// Nothing listens at the address (RST to the SYN).
    Refused,
    /// No answer in time (connect or the whole request).
    TimedOut,
    /// The host name did not resolve.
    Unresolved,
    /// The connection was closed or reset by the other side.
    Closed,
}

/// A failed connection, explained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    Tls(TlsFailure),
    Unreachable(UnreachableFailure),
}

/// A TLS problem with one peer; `Display` is the cause and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", describe_tls(*.peer, .problem))]
pub struct TlsFailure {
    pub peer: Peer,
    pub problem: TlsProblem,
}

/// A network problem with one peer; `Display` is the cause and what to check.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", describe_unreachable(*.peer, *.cause))]
pub struct UnreachableFailure {
    pub peer: Peer,
    pub cause: Unreachable,
}

fn describe_tls(peer: Peer, problem: &TlsProblem) -> String {
    let who = peer.name();
    let pin = peer.pin_key();
    let ca = peer.ca_key();
    let url = peer.url_key();
    let howto = peer.pin_howto();
    match problem {
        TlsProblem::CaUsedAsEndEntity => format!(
            "{who} presented a CA certificate (basic constraints CA:TRUE) as its server certificate, as `openssl req -x509` makes by default; a CA certificate is not accepted as a server's own. Fix: issue a server (leaf) certificate signed by that CA and serve it, keeping the CA in {ca}; or pin {who}'s certificate with {pin} ({howto})"
        ),
        TlsProblem::UnknownIssuer => format!(
            "{who}'s certificate is not signed by a CA the agent trusts (a self-signed certificate, or one from another CA than {ca} or the system roots hold). Fix: set {ca} to the CA that signed it, or pin {who}'s certificate with {pin} ({howto})"
        ),
        TlsProblem::BadSignature => format!(
            "{who}'s certificate names a trusted CA as issuer but that CA's key did not sign it (the CA was regenerated, or {ca} holds another CA of the same name). Fix: set {ca} to the CA that really signed the certificate, or pin it with {pin} ({howto})"
        ),
        TlsProblem::Expired { not_after } => format!(
            "{who}'s certificate has expired{}. Fix: renew the certificate on {who}{}; check the clocks of both hosts",
            not_after
                .as_deref()
                .map(|t| format!(" (valid until {t})"))
                .unwrap_or_default(),
            if peer == Peer::Proxmox {
                " (`pvecm updatecerts --force` renews the node certificate)"
            } else {
                ""
            }
        ),
        TlsProblem::NotYetValid { not_before } => format!(
            "{who}'s certificate is not valid yet{}. Fix: check this host's clock (timedatectl), or reissue the certificate with a start date in the past",
            not_before
                .as_deref()
                .map(|t| format!(" (valid from {t})"))
                .unwrap_or_default()
        ),
        TlsProblem::NameMismatch {
            expected,
            presented,
        } => format!(
            "{who}'s certificate is not issued for {expected:?}, the host in {url}; it names {}. Fix: use one of those names in {url}, or reissue the certificate with {expected:?} as a subject alternative name ({}), or pin it with {pin} (a pin does not check names)",
            if presented.is_empty() {
                "no host at all".to_string()
            } else {
                presented.join(", ")
            },
            if expected.parse::<std::net::IpAddr>().is_ok() {
                "an IP address entry, `IP:` in openssl"
            } else {
                "a DNS entry, `DNS:` in openssl"
            }
        ),
        TlsProblem::NotForServers => format!(
            "{who}'s certificate is not meant for TLS servers (its extended key usage lacks serverAuth). Fix: reissue it with extendedKeyUsage = serverAuth, or pin it with {pin}"
        ),
        TlsProblem::PinMismatch { expected, seen } => format!(
            "{who} presented a certificate whose SHA-256 is {seen}, but {pin} is {expected}. Fix: if {who}'s certificate was renewed on purpose, compare {seen} with the certificate on {who} ({howto}) and put it in {pin}; otherwise something else answers at {url}"
        ),
        TlsProblem::Handshake { detail } => format!(
            "the TLS handshake with {who} failed ({detail}): no protocol version or cipher in common (the agent speaks TLS 1.2 and 1.3 with modern ciphers), or the server refused the connection. Fix: enable TLS 1.2 or 1.3 with ECDHE ciphers on {who}, and check its TLS log"
        ),
        TlsProblem::NotTls { detail } => format!(
            "{who} did not answer in TLS ({detail}): the port in {url} serves plain HTTP or another protocol. Fix: check the scheme and port of {url}"
        ),
        TlsProblem::Other { detail } => detail.clone(),
    }
}

fn describe_unreachable(peer: Peer, cause: Unreachable) -> String {
    let who = peer.name();
    let url = peer.url_key();
    match cause {
        Unreachable::Refused => format!(
            "connection refused: nothing listens at the address and port in {url}. Fix: check that {} runs and that {url} names its host and port; retrying happens by itself",
            if peer == Peer::Proxmox {
                "pveproxy"
            } else {
                "the hub"
            }
        ),
        Unreachable::TimedOut => format!(
            "{who} did not answer in time (a firewall dropping packets, a wrong address, or an overloaded server). Fix: check the network path to {url}; retrying happens by itself"
        ),
        Unreachable::Unresolved => format!(
            "the host name in {url} does not resolve. Fix: check the name and this host's DNS"
        ),
        Unreachable::Closed => format!(
            "{who} closed the connection (a restart, a proxy, or a TLS listener that refused the client without saying why). Fix: check {who}'s log; retrying happens by itself"
        ),
    }
}

/// Explains a failed request: the TLS problem or the network cause found in `err`'s
/// source chain. `None` when neither is recognisable (e.g. an HTTP-level error).
pub fn explain(peer: Peer, err: &(dyn StdError + 'static)) -> Option<Failure> {
    if let Some(problem) = find_tls_problem(err) {
        return Some(Failure::Tls(TlsFailure { peer, problem }));
    }
    find_unreachable(err).map(|cause| Failure::Unreachable(UnreachableFailure { peer, cause }))
}

/// Each error of the chain, descending into `io::Error` payloads and `rustls::OtherError`.
fn walk<'a>(err: &'a (dyn StdError + 'static), out: &mut Vec<&'a (dyn StdError + 'static)>) {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        out.push(e);
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
        {
            walk(inner, out);
        }
        cur = e.source();
    }
}

fn chain<'a>(err: &'a (dyn StdError + 'static)) -> Vec<&'a (dyn StdError + 'static)> {
    let mut out = Vec::new();
    walk(err, &mut out);
    out
}

fn find_tls_problem(err: &(dyn StdError + 'static)) -> Option<TlsProblem> {
    chain(err).into_iter().find_map(|e| {
        if let Some(p) = e.downcast_ref::<PinMismatch>() {
            return Some(TlsProblem::PinMismatch {
                expected: p.expected.clone(),
                seen: p.seen.clone(),
            });
        }
        e.downcast_ref::<rustls::Error>().map(classify)
    })
}

fn classify(e: &rustls::Error) -> TlsProblem {
    use rustls::Error as E;
    match e {
        E::InvalidCertificate(c) => classify_certificate(c, e),
        E::Other(other) => match other.0.downcast_ref::<PinMismatch>() {
            Some(p) => TlsProblem::PinMismatch {
                expected: p.expected.clone(),
                seen: p.seen.clone(),
            },
            None => TlsProblem::Other {
                detail: e.to_string(),
            },
        },
        E::AlertReceived(alert) => match alert {
            AlertDescription::HandshakeFailure
            | AlertDescription::ProtocolVersion
            | AlertDescription::InsufficientSecurity
            | AlertDescription::IllegalParameter => TlsProblem::Handshake {
                detail: format!("the server sent the alert {alert:?}"),
            },
            AlertDescription::CertificateRequired => TlsProblem::Other {
                detail: "the server asks for a client certificate, which the agent does not send"
                    .to_string(),
            },
            _ => TlsProblem::Handshake {
                detail: format!("the server sent the alert {alert:?}"),
            },
        },
        E::PeerIncompatible(p) => TlsProblem::Handshake {
            detail: format!("{p:?}"),
        },
        E::InvalidMessage(m) => TlsProblem::NotTls {
            detail: format!("{m:?}"),
        },
        other => TlsProblem::Other {
            detail: other.to_string(),
        },
    }
}

fn classify_certificate(c: &CertificateError, whole: &rustls::Error) -> TlsProblem {
    use CertificateError as C;
    match c {
        C::UnknownIssuer => TlsProblem::UnknownIssuer,
        C::BadSignature => TlsProblem::BadSignature,
        C::Expired => TlsProblem::Expired { not_after: None },
        C::ExpiredContext { not_after, .. } => TlsProblem::Expired {
            not_after: Some(utc(*not_after)),
        },
        C::NotValidYet => TlsProblem::NotYetValid { not_before: None },
        C::NotValidYetContext { not_before, .. } => TlsProblem::NotYetValid {
            not_before: Some(utc(*not_before)),
        },
        C::NotValidForName => TlsProblem::NameMismatch {
            expected: "the URL's host".to_string(),
            presented: Vec::new(),
        },
        C::NotValidForNameContext {
            expected,
            presented,
        } => TlsProblem::NameMismatch {
            expected: expected.to_str().into_owned(),
            presented: presented.iter().map(|n| plain_name(n)).collect(),
        },
        C::InvalidPurpose | C::InvalidPurposeContext { .. } => TlsProblem::NotForServers,
        C::Other(other) => match other.0.downcast_ref::<webpki::Error>() {
            Some(webpki::Error::CaUsedAsEndEntity) => TlsProblem::CaUsedAsEndEntity,
            _ => TlsProblem::Other {
                detail: whole.to_string(),
            },
        },
        _ => TlsProblem::Other {
            detail: whole.to_string(),
        },
    }
}

/// webpki lists a certificate's names in their `Debug` form (`DnsName("pve.example")`,
/// `IpAddress(10.0.0.1)`); the operator wants the name.
fn plain_name(debug: &str) -> String {
    let inner = debug
        .strip_prefix("DnsName(")
        .or_else(|| debug.strip_prefix("IpAddress("))
        .and_then(|rest| rest.strip_suffix(')'));
    match inner {
        Some(name) => name.trim_matches('"').to_string(),
        None => debug.to_string(),
    }
}

fn utc(t: UnixTime) -> String {
    time::OffsetDateTime::from_unix_timestamp(t.as_secs() as i64)
        .ok()
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{} s after the epoch", t.as_secs()))
}

fn find_unreachable(err: &(dyn StdError + 'static)) -> Option<Unreachable> {
    use std::io::ErrorKind as K;
    let all = chain(err);
    for e in &all {
        if let Some(r) = e.downcast_ref::<reqwest::Error>()
            && r.is_timeout()
        {
            return Some(Unreachable::TimedOut);
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            match io.kind() {
                K::ConnectionRefused => return Some(Unreachable::Refused),
                K::TimedOut => return Some(Unreachable::TimedOut),
                K::ConnectionReset | K::ConnectionAborted | K::UnexpectedEof | K::BrokenPipe => {
                    return Some(Unreachable::Closed);
                }
                _ => {}
            }
        }
    }
    // hyper-util reports a failed lookup only in text ("dns error").
    if all
        .iter()
        .any(|e| e.to_string().to_ascii_lowercase().contains("dns error"))
    {
        return Some(Unreachable::Unresolved);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_used_as_end_entity_names_both_fixes_for_each_peer() {
        for (peer, pin, ca) in [
            (Peer::Hub, "hub.tls.pin_sha256", "hub.ca_file"),
            (
                Peer::Proxmox,
                "proxmox.tls.pin_sha256",
                "proxmox.tls.ca_file",
            ),
        ] {
            let e = rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(
                Arc::new(webpki::Error::CaUsedAsEndEntity),
            )));
            let io = std::io::Error::other(e);
            let Some(Failure::Tls(f)) = explain(peer, &io) else {
                panic!("not a TLS failure")
            };
            assert_eq!(f.problem, TlsProblem::CaUsedAsEndEntity);
            let msg = f.to_string();
            assert!(msg.contains("CA certificate"), "{msg}");
            assert!(msg.contains("leaf"), "{msg}");
            assert!(msg.contains(pin) && msg.contains(ca), "{msg}");
            assert!(!msg.contains("OtherError"), "{msg}");
        }
    }

    #[test]
    fn certificate_names_are_shown_plain() {
        assert_eq!(plain_name("DnsName(\"pve.example\")"), "pve.example");
        assert_eq!(plain_name("IpAddress(10.0.0.1)"), "10.0.0.1");
        assert_eq!(plain_name("DirectoryName"), "DirectoryName");
    }

    #[test]
    fn refused_and_timed_out_are_told_apart_from_tls() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let Some(Failure::Unreachable(u)) = explain(Peer::Proxmox, &refused) else {
            panic!()
        };
        assert_eq!(u.cause, Unreachable::Refused);
        assert!(u.to_string().contains("pveproxy"), "{u}");
        let slow = std::io::Error::from(std::io::ErrorKind::TimedOut);
        assert!(matches!(
            explain(Peer::Hub, &slow),
            Some(Failure::Unreachable(UnreachableFailure {
                cause: Unreachable::TimedOut,
                ..
            }))
        ));
    }
}
