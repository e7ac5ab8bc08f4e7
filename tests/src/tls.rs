//! Test PKI for the simulators: a throw-away CA and one server certificate it signs,
//! generated in memory at start, the way a Proxmox VE node has `pve-root-ca.pem`
//! signing `pve-ssl.pem`.
//!
//! Owns: key and certificate generation, the rustls server configuration, the
//! certificate pin in the form `pvenode cert info` prints, and a rustls client
//! configuration that trusts the CA (for tests and the harness).
//! Must never: read or write keys on disk except the CA *certificate* a caller asks for,
//! or trust anything but the CA it generated.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// Errors while making the test PKI or the TLS configurations.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("generating the {what}: {source}")]
    Generate {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    #[error("subject alternative name {name:?} is neither an IP address nor a DNS name")]
    BadName { name: String },
    #[error("building the rustls {side} configuration: {source}")]
    Rustls {
        side: &'static str,
        #[source]
        source: rustls::Error,
    },
    #[error("the CA certificate is not usable as a trust anchor: {source}")]
    Anchor {
        #[source]
        source: rustls::Error,
    },
    #[error("parsing PEM certificate: {detail}")]
    Pem { detail: String },
    #[error("writing the CA certificate to {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// How a server certificate deviates from a good one, for tests of refusals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flaw {
    /// Valid until yesterday.
    Expired,
    /// Valid only from tomorrow on.
    NotYetValid,
    /// Extended key usage `clientAuth` only (not for TLS servers).
    ClientOnly,
}

/// A CA and one leaf certificate it signed, with the leaf's key.
pub struct TestPki {
    ca_pem: String,
    ca_der: CertificateDer<'static>,
    leaf_der: CertificateDer<'static>,
    leaf_pem: String,
    leaf_key_der: Vec<u8>,
}

impl std::fmt::Debug for TestPki {
    // The leaf key stays out of Debug output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestPki")
            .field("leaf_pin_sha256", &self.leaf_pin_sha256())
            .finish_non_exhaustive()
    }
}

impl TestPki {
    /// Generates a CA named `ca_name` and a server certificate for `names` (IP addresses
    /// and DNS names), valid from yesterday for ten years.
    pub fn generate(ca_name: &str, leaf_name: &str, names: &[&str]) -> Result<Self, TlsError> {
        Self::generate_flawed(ca_name, leaf_name, names, None)
    }

    /// [`TestPki::generate`] with a server certificate that has `flaw`.
    pub fn generate_flawed(
        ca_name: &str,
        leaf_name: &str,
        names: &[&str],
        flaw: Option<Flaw>,
    ) -> Result<Self, TlsError> {
        let now = time::OffsetDateTime::now_utc();
        let gen_err = |what| move |source| TlsError::Generate { what, source };

        let ca_key = KeyPair::generate().map_err(gen_err("CA key"))?;
        let mut ca_params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, ca_name);
        dn.push(DnType::OrganizationName, "PVE Cluster Manager CA");
        ca_params.distinguished_name = dn;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        ca_params.not_before = now - time::Duration::days(1);
        ca_params.not_after = now + time::Duration::days(3650);
        let ca_cert = ca_params
            .self_signed(&ca_key)
            .map_err(gen_err("CA certificate"))?;
        let issuer = Issuer::new(ca_params, ca_key);

        let leaf_key = KeyPair::generate().map_err(gen_err("server key"))?;
        let mut leaf_params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, leaf_name);
        dn.push(DnType::OrganizationName, "PVE Cluster Node");
        leaf_params.distinguished_name = dn;
        for name in names {
            leaf_params.subject_alt_names.push(san(name)?);
        }
        leaf_params.is_ca = IsCa::ExplicitNoCa;
        leaf_params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        leaf_params.not_before = now - time::Duration::days(1);
        leaf_params.not_after = now + time::Duration::days(3650);
        match flaw {
            None => {}
            Some(Flaw::Expired) => {
                leaf_params.not_before = now - time::Duration::days(30);
                leaf_params.not_after = now - time::Duration::days(1);
            }
            Some(Flaw::NotYetValid) => leaf_params.not_before = now + time::Duration::days(1),
            Some(Flaw::ClientOnly) => {
                leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            }
        }
        let leaf_cert = leaf_params
            .signed_by(&leaf_key, &issuer)
            .map_err(gen_err("server certificate"))?;

        Ok(TestPki {
            ca_pem: ca_cert.pem(),
            ca_der: ca_cert.der().clone(),
            leaf_der: leaf_cert.der().clone(),
            leaf_pem: leaf_cert.pem(),
            leaf_key_der: leaf_key.serialize_der(),
        })
    }

    /// The CA certificate in PEM form (what `pve-root-ca.pem` holds).
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The server certificate in PEM form (what `pve-ssl.pem` holds).
    pub fn leaf_pem(&self) -> &str {
        &self.leaf_pem
    }

    /// The server certificate's DER bytes.
    pub fn leaf_der(&self) -> &[u8] {
        self.leaf_der.as_ref()
    }

    /// SHA-256 of the server certificate's DER, upper-case hex pairs joined by `:`.
    pub fn leaf_pin_sha256(&self) -> String {
        pin_sha256(self.leaf_der.as_ref())
    }

    /// Writes the CA certificate as `name` into `dir` and returns the path.
    pub fn write_ca_pem(&self, dir: &Path, name: &str) -> Result<PathBuf, TlsError> {
        let path = dir.join(name);
        std::fs::write(&path, self.ca_pem.as_bytes()).map_err(|source| TlsError::Write {
            path: path.clone(),
            source,
        })?;
        Ok(path)
    }

    /// A rustls server configuration presenting the leaf certificate and the CA
    /// (chain), HTTP/1.1 only, with the ring provider.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        server_config_for(
            vec![self.leaf_der.clone(), self.ca_der.clone()],
            self.leaf_key_der.clone(),
        )
    }

    /// A rustls client configuration that trusts only this CA.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        client_config_trusting(&self.ca_pem)
    }
}

/// A self-signed CA certificate used as the server's own certificate: what
/// `openssl req -x509 -newkey … -subj /CN=hub` makes by default (basic constraints
/// `CA:TRUE`), which a verifier refuses as an end entity unless it is pinned.
pub struct SelfSignedCaServer {
    pem: String,
    der: CertificateDer<'static>,
    key_der: Vec<u8>,
}

impl std::fmt::Debug for SelfSignedCaServer {
    // The key stays out of Debug output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SelfSignedCaServer")
            .field("pin_sha256", &self.pin_sha256())
            .finish_non_exhaustive()
    }
}

impl SelfSignedCaServer {
    /// Generates the certificate for `names` (IP addresses and DNS names).
    pub fn generate(common_name: &str, names: &[&str]) -> Result<Self, TlsError> {
        let now = time::OffsetDateTime::now_utc();
        let gen_err = |what| move |source| TlsError::Generate { what, source };
        let key = KeyPair::generate().map_err(gen_err("self-signed key"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        for name in names {
            params.subject_alt_names.push(san(name)?);
        }
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(3650);
        let cert = params
            .self_signed(&key)
            .map_err(gen_err("self-signed certificate"))?;
        Ok(SelfSignedCaServer {
            pem: cert.pem(),
            der: cert.der().clone(),
            key_der: key.serialize_der(),
        })
    }

    /// The certificate in PEM form (what an operator would give as the CA file).
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// SHA-256 of the certificate's DER in the `XX:XX:…` form.
    pub fn pin_sha256(&self) -> String {
        pin_sha256(self.der.as_ref())
    }

    /// Writes the certificate as `name` into `dir` and returns the path.
    pub fn write_pem(&self, dir: &Path, name: &str) -> Result<PathBuf, TlsError> {
        let path = dir.join(name);
        std::fs::write(&path, self.pem.as_bytes()).map_err(|source| TlsError::Write {
            path: path.clone(),
            source,
        })?;
        Ok(path)
    }

    /// A rustls server configuration presenting this certificate alone, HTTP/1.1.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        server_config_for(vec![self.der.clone()], self.key_der.clone())
    }
}

fn san(name: &str) -> Result<SanType, TlsError> {
    Ok(match name.parse::<std::net::IpAddr>() {
        Ok(ip) => SanType::IpAddress(ip),
        Err(_) => SanType::DnsName(name.try_into().map_err(|_| TlsError::BadName {
            name: name.to_owned(),
        })?),
    })
}

fn server_config_for(
    chain: Vec<CertificateDer<'static>>,
    key_der: Vec<u8>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der));
    let err = |source| TlsError::Rustls {
        side: "server",
        source,
    };
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(err)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(err)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// SHA-256 of `der`, upper-case hex pairs joined by `:` (the `pvenode cert info` form).
pub fn pin_sha256(der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    let mut out = String::with_capacity(95);
    for (i, b) in digest.as_ref().iter().enumerate() {
        if i > 0 {
            out.push(':');
        }
        out.push_str(&format!("{b:02X}"));
    }
    out
}

/// Parses the first `CERTIFICATE` block of a PEM text into DER.
pub fn pem_certificate_der(pem: &str) -> Result<CertificateDer<'static>, TlsError> {
    use rustls_pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::Pem {
        detail: e.to_string(),
    })
}

/// A rustls client configuration (ring provider) that trusts only the CA in `ca_pem`.
pub fn client_config_trusting(ca_pem: &str) -> Result<rustls::ClientConfig, TlsError> {
    let der = pem_certificate_der(ca_pem)?;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(der)
        .map_err(|source| TlsError::Anchor { source })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Rustls {
            side: "client",
            source,
        })?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_is_upper_colon_hex_of_the_leaf_sha256() {
        let pki = TestPki::generate("Test CA", "pve1", &["127.0.0.1", "localhost"]).unwrap();
        let pin = pki.leaf_pin_sha256();
        assert_eq!(pin.len(), 32 * 3 - 1);
        assert!(pin.split(':').all(|p| {
            p.len() == 2
                && p.chars()
                    .all(|c| c.is_ascii_digit() || ('A'..='F').contains(&c))
        }));
        let digest = ring::digest::digest(&ring::digest::SHA256, pki.leaf_der());
        assert_eq!(pin.replace(':', ""), hex::encode_upper(digest.as_ref()));
        assert_ne!(pki.ca_pem(), pki.leaf_pem());
    }

    #[test]
    fn configurations_build() {
        let pki = TestPki::generate("Test CA", "pve1", &["127.0.0.1", "localhost"]).unwrap();
        pki.server_config().unwrap();
        pki.client_config().unwrap();
        assert!(matches!(
            client_config_trusting("not pem"),
            Err(TlsError::Pem { .. })
        ));
    }
}
