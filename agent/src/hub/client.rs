//! The hub client: one `POST <hub.url>/api/agent/v1/report` with `Authorization: Bearer
//! <token>`, answered by a [`ControlEnvelope`].
//!
//! TLS is rustls (ring provider, [`crate::tls`]) and verifies the hub against the system
//! roots, only against `hub.ca_file`, or only the certificate pinned by
//! `hub.tls.pin_sha256` (the same pin verifier as Proxmox's). A failed handshake is a
//! [`HubClientError::Tls`] that says what is wrong and how to fix it. No proxy from the
//! environment is used. Answers are read up to [`MAX_ANSWER_BYTES`].
//!
//! Must never: put the token into an error, a log line or `Debug` output (errors are built
//! from reqwest errors with the URL stripped, and any echo of the token in the hub's
//! answer is redacted), or follow a redirect (a redirect could carry the token elsewhere).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};

use super::envelope::{ControlEnvelope, EnvelopeError};
use super::report::HostReport;
use crate::config::{HubTls, Secret};
use crate::error_chain::error_chain;
use crate::tls::{Failure, Peer, TlsFailure, Trust, Unreachable};

/// Path of the report endpoint below the hub's base URL.
pub const REPORT_PATH: &str = "/api/agent/v1/report";
/// Largest answer body read from the hub.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// Default deadline of one report (connect + send + answer).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest `message` kept from an error answer.
const MAX_MESSAGE_CHARS: usize = 512;

/// Why a report did not get an envelope back.
#[derive(Debug, thiserror::Error)]
pub enum HubClientError {
    /// The client could not be built from its settings.
    #[error("hub client setup: {0}")]
    Setup(String),
    /// The request did not complete (connect, timeout, broken connection).
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The TLS handshake failed: the hub's certificate or TLS setup does not match
    /// `hub.ca_file` / `hub.tls.pin_sha256`. Retrying does not help; the message names the
    /// fix.
    #[error("hub TLS: {0}")]
    Tls(TlsFailure),
    /// The hub answered with a non-success status.
    #[error(transparent)]
    Http(#[from] HttpError),
    /// The hub answered 2xx but the body is not an envelope; the report may or may not
    /// have been stored, so the audit cursor does not move.
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
}

/// The request did not complete.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("hub unreachable ({kind}): {message}")]
pub struct TransportError {
    pub kind: TransportKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    Connect,
    Timeout,
    /// The connection broke while sending or receiving.
    Broken,
    Other,
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TransportKind::Connect => "connect",
            TransportKind::Timeout => "timeout",
            TransportKind::Broken => "connection broken",
            TransportKind::Other => "request",
        })
    }
}

/// The hub answered with a non-success status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("hub answered {status}: {message}")]
pub struct HttpError {
    pub status: u16,
    pub message: String,
}

/// Where and how to reach the hub.
#[derive(Clone)]
pub struct HubEndpoint {
    /// Base URL, `https://…` (the report path is appended).
    pub url: String,
    pub token: Secret,
    /// How the hub's certificate is verified.
    pub tls: HubTls,
    /// Deadline of one report.
    pub timeout: Duration,
}

impl fmt::Debug for HubEndpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubEndpoint")
            .field("url", &self.url)
            .field("token", &self.token)
            .field("tls", &self.tls)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Sends reports to one hub.
pub struct HubClient {
    http: reqwest::Client,
    report_url: String,
    auth: HeaderValue,
    token: Secret,
}

impl fmt::Debug for HubClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubClient")
            .field("report_url", &self.report_url)
            .field("token", &self.token)
            .finish_non_exhaustive()
    }
}

impl HubClient {
    pub fn new(endpoint: &HubEndpoint) -> Result<Self, HubClientError> {
        let setup = |m: String| HubClientError::Setup(m);
        let url = reqwest::Url::parse(&endpoint.url)
            .map_err(|e| setup(format!("hub URL {:?}: {e}", endpoint.url)))?;
        if url.scheme() != "https" {
            return Err(setup(format!("hub URL {:?} must be https", endpoint.url)));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(setup(
                "hub URL must not carry credentials; the token goes in hub.token".into(),
            ));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(setup(format!(
                "hub URL {:?} must not have a query or fragment",
                endpoint.url
            )));
        }
        if endpoint.token.is_empty() {
            return Err(setup("hub token is empty".into()));
        }
        let mut auth = HeaderValue::from_str(&format!("Bearer {}", endpoint.token.expose()))
            .map_err(|_| setup("hub token contains characters not allowed in a header".into()))?;
        auth.set_sensitive(true);
        let trust = match &endpoint.tls {
            HubTls::SystemRoots => Trust::SystemRoots,
            HubTls::CaFile(path) => Trust::CaFile(path.clone()),
            HubTls::PinSha256(pin) => Trust::PinSha256(*pin),
        };
        let tls = crate::tls::client_config(Peer::Hub, &trust).map_err(|e| setup(e.to_string()))?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(CONNECT_TIMEOUT.min(endpoint.timeout))
            .timeout(endpoint.timeout)
            .pool_max_idle_per_host(1)
            .user_agent(concat!("felhom-agent/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| setup(format!("building the HTTP client: {}", e.without_url())))?;
        let base = url.as_str().trim_end_matches('/');
        Ok(HubClient {
            http,
            report_url: format!("{base}{REPORT_PATH}"),
            auth,
            token: endpoint.token.clone(),
        })
    }

    /// The full report URL (no secret in it).
    pub fn report_url(&self) -> &str {
        &self.report_url
    }

    /// POSTs one report and decodes the hub's envelope.
    pub async fn post_report(
        &self,
        report: &HostReport,
    ) -> Result<ControlEnvelope, HubClientError> {
        let body = serde_json::to_vec(report)
            .map_err(|e| HubClientError::Setup(format!("encoding the report: {e}")))?;
        self.post_body(body).await
    }

    /// POSTs an already encoded report body.
    pub async fn post_body(&self, body: Vec<u8>) -> Result<ControlEnvelope, HubClientError> {
        let response = self
            .http
            .post(&self.report_url)
            .header(AUTHORIZATION, self.auth.clone())
            .header(CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| self.transport(e))?;
        let status = response.status();
        let answer = read_capped(response, MAX_ANSWER_BYTES)
            .await
            .map_err(|e| self.transport(e))?;
        if !status.is_success() {
            return Err(HttpError {
                status: status.as_u16(),
                message: self.error_message(status, &answer),
            }
            .into());
        }
        Ok(ControlEnvelope::decode(&answer)?)
    }

    fn transport(&self, e: reqwest::Error) -> HubClientError {
        let explained = crate::tls::explain(Peer::Hub, &e);
        let kind = match &explained {
            Some(Failure::Tls(failure)) => return HubClientError::Tls(failure.clone()),
            Some(Failure::Unreachable(u)) => match u.cause {
                Unreachable::TimedOut => TransportKind::Timeout,
                Unreachable::Refused | Unreachable::Unresolved => TransportKind::Connect,
                Unreachable::Closed if e.is_connect() => TransportKind::Connect,
                Unreachable::Closed => TransportKind::Broken,
            },
            None if e.is_timeout() => TransportKind::Timeout,
            None if e.is_connect() => TransportKind::Connect,
            None if e.is_body() || e.is_request() || e.is_decode() => TransportKind::Broken,
            None => TransportKind::Other,
        };
        let mut message = error_chain(&e.without_url());
        if !message.contains(&self.report_url) {
            message = format!("{message} (POST {})", self.report_url);
        }
        if let Some(Failure::Unreachable(u)) = &explained {
            message = format!("{u}: {message}");
        }
        TransportError {
            kind,
            message: self.redact(message),
        }
        .into()
    }

    /// A short, single-line message from an error answer: a JSON `message`/`error` field
    /// if there is one, else the start of the body, else the status's reason.
    fn error_message(&self, status: reqwest::StatusCode, body: &[u8]) -> String {
        let from_json = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| {
                ["message", "error"]
                    .iter()
                    .find_map(|k| v.get(*k).and_then(|m| m.as_str()).map(str::to_owned))
            });
        let text = from_json
            .or_else(|| {
                let s = String::from_utf8_lossy(body);
                let s = s.trim();
                (!s.is_empty()).then(|| s.to_owned())
            })
            .unwrap_or_else(|| status.canonical_reason().unwrap_or("no reason").to_owned());
        let one_line: String = text
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .chars()
            .take(MAX_MESSAGE_CHARS)
            .collect();
        self.redact(one_line)
    }

    fn redact(&self, s: String) -> String {
        let token = self.token.expose();
        if token.is_empty() || !s.contains(token) {
            s
        } else {
            s.replace(token, "<redacted>")
        }
    }
}

/// Reads at most `cap` bytes of the body; the rest is dropped with the connection.
async fn read_capped(
    mut response: reqwest::Response,
    cap: usize,
) -> Result<Vec<u8>, reqwest::Error> {
    let mut out = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = cap.saturating_sub(out.len());
        out.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if out.len() >= cap {
            break;
        }
    }
    Ok(out)
}

/// A rustls client config over the ring provider trusting `roots`, HTTP/1.1 only.
pub(crate) fn rustls_config(roots: rustls::RootCertStore) -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(url: &str) -> HubEndpoint {
        HubEndpoint {
            url: url.into(),
            token: Secret::new("tok-SECRET-123"),
            tls: HubTls::SystemRoots,
            timeout: Duration::from_secs(2),
        }
    }

    #[test]
    fn setup_rejects_what_could_leak_or_downgrade() {
        for url in [
            "http://hub.example:8443",
            "https://user:pw@hub.example",
            "https://hub.example/?token=x",
            "not a url",
        ] {
            let err = HubClient::new(&endpoint(url)).unwrap_err();
            assert!(matches!(err, HubClientError::Setup(_)), "{url}: {err}");
            assert!(!err.to_string().contains("tok-SECRET-123"));
        }
        let mut e = endpoint("https://hub.example");
        e.token = Secret::new("");
        assert!(HubClient::new(&e).is_err());
        e.token = Secret::new("bad\ntoken");
        let err = HubClient::new(&e).unwrap_err();
        assert!(!err.to_string().contains("bad\ntoken"));
    }

    #[test]
    fn a_missing_or_empty_ca_file_is_a_setup_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut e = endpoint("https://hub.example");
        e.tls = HubTls::CaFile(dir.path().join("missing.pem"));
        assert!(
            matches!(HubClient::new(&e), Err(HubClientError::Setup(m)) if m.contains("missing.pem") && m.contains("hub.ca_file") && m.contains("hub.tls.pin_sha256")),
        );
        std::fs::write(dir.path().join("empty.pem"), "no pem here").unwrap();
        e.tls = HubTls::CaFile(dir.path().join("empty.pem"));
        assert!(
            matches!(HubClient::new(&e), Err(HubClientError::Setup(m)) if m.contains("holds no certificate"))
        );
    }

    #[test]
    fn debug_output_never_shows_the_token() {
        let e = endpoint("https://hub.example/base/");
        assert!(!format!("{e:?}").contains("tok-SECRET-123"));
        // system roots may be absent in a minimal container; use a generated CA then
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, test_ca_pem()).unwrap();
        let mut e = e;
        e.tls = HubTls::CaFile(ca);
        let c = HubClient::new(&e).unwrap();
        assert_eq!(
            c.report_url(),
            "https://hub.example/base/api/agent/v1/report"
        );
        assert!(!format!("{c:?}").contains("tok-SECRET-123"));
    }

    #[test]
    fn error_messages_are_short_single_line_and_redacted() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, test_ca_pem()).unwrap();
        let mut e = endpoint("https://hub.example");
        e.tls = HubTls::CaFile(ca);
        let c = HubClient::new(&e).unwrap();
        let m = c.error_message(
            reqwest::StatusCode::UNAUTHORIZED,
            br#"{"message":"bad token tok-SECRET-123\n try again"}"#,
        );
        assert_eq!(m, "bad token <redacted> try again");
        let long = "x".repeat(5000);
        assert_eq!(
            c.error_message(reqwest::StatusCode::BAD_GATEWAY, long.as_bytes())
                .len(),
            512
        );
        assert_eq!(
            c.error_message(reqwest::StatusCode::BAD_GATEWAY, b""),
            "Bad Gateway"
        );
    }

    /// A throw-away self-signed CA certificate, generated per test.
    fn test_ca_pem() -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).unwrap().pem()
    }
}
