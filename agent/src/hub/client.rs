//! The hub client: every request the agent makes to the hub, each with `Authorization:
//! Bearer <token>` (`docs/hub-contract.md`).
//!
//! Owns: the HTTP exchanges and their answers' size caps and shapes:
//! - `POST <hub.url>/api/agent/v1/report`, answered by a [`ControlEnvelope`] (read up to
//!   [`MAX_ANSWER_BYTES`]);
//! - the signed-operations channel ([`crate::ops::wire`]): the long poll
//!   `GET …/api/agent/v1/ops?wait=N` ([`HubClient::fetch_ops`], its deadline `wait` +
//!   [`LONG_POLL_GRACE`], its answer read up to [`MAX_OPS_ANSWER_BYTES`]; each delivery's
//!   envelope stays the raw JSON text the hub sent), `GET …/api/agent/v1/desired`
//!   ([`HubClient::fetch_desired`], the body's bytes, at most [`MAX_DESIRED_READ_BYTES`])
//!   and `POST …/api/agent/v1/ops/result` ([`HubClient::post_result`]).
//!
//! TLS is rustls (ring provider, [`crate::tls`]) and verifies the hub against the system
//! roots, only against `hub.ca_file`, or only the certificate pinned by
//! `hub.tls.pin_sha256` (the same pin verifier as Proxmox's). A failed handshake is a
//! [`HubClientError::Tls`] that says what is wrong and how to fix it. No proxy from the
//! environment is used.
//!
//! Must never: put the token into an error, a log line or `Debug` output (errors are built
//! from reqwest errors with the URL stripped, and any echo of the token in the hub's
//! answer is redacted); follow a redirect (a redirect could carry the token elsewhere);
//! parse, verify or trust an envelope (the hub is an untrusted relay: that is
//! `felhom_authz`'s job, on the exact bytes this module hands over); or cut an answer short
//! and parse the rest (an oversized long-poll answer is an error).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};

use super::envelope::{ControlEnvelope, EnvelopeError};
use super::report::HostReport;
use crate::config::{HubTls, Secret};
use crate::error_chain::error_chain;
use crate::ops::wire::{DESIRED_PATH, OPS_PATH, OpResult, OpsAnswer, RESULT_PATH};
use crate::tls::{Failure, Peer, TlsFailure, Trust, Unreachable};

/// Path of the report endpoint below the hub's base URL.
pub const REPORT_PATH: &str = "/api/agent/v1/report";
/// Largest answer body read from the hub.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// Largest long-poll answer read from the hub; a larger one is
/// [`AnswerError::TooLarge`], never a truncated parse. Room for 60 envelopes of the
/// largest size an agent accepts.
pub const MAX_OPS_ANSWER_BYTES: usize = 4 * 1024 * 1024;
/// How much of a desired-state body is read: one byte more than an envelope may have, so
/// the verification that follows can refuse an oversized one `too_large`.
pub const MAX_DESIRED_READ_BYTES: usize = felhom_authz::MAX_ENVELOPE_BYTES + 1;
/// How long a long poll may take beyond the `wait` the hub may hold it.
pub const LONG_POLL_GRACE: Duration = Duration::from_secs(15);
/// Default deadline of one request (connect + send + answer) other than the long poll.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest `message` kept from an error answer.
const MAX_MESSAGE_CHARS: usize = 512;

/// Why a request to the hub did not get a usable answer.
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
    /// The hub answered the long poll 2xx with a body that is not `{"ops": [...]}` or is
    /// larger than [`MAX_OPS_ANSWER_BYTES`].
    #[error(transparent)]
    Answer(#[from] AnswerError),
}

/// A 2xx answer of the signed-operations channel that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnswerError {
    /// The body is larger than the cap; it was not parsed.
    #[error("the hub's answer to {request} is larger than {limit} bytes")]
    TooLarge { request: String, limit: usize },
    /// The body is not the expected JSON shape.
    #[error("the hub's answer to {request} is not {expected}: {detail}")]
    Malformed {
        request: String,
        expected: &'static str,
        detail: String,
    },
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
    /// Deadline of one request (a report, a desired-state fetch, a result); the long
    /// poll has its own, `wait` + [`LONG_POLL_GRACE`].
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

/// Talks to one hub: reports, and the signed-operations channel.
pub struct HubClient {
    http: reqwest::Client,
    /// The hub's URL without a trailing `/`; every path is appended to it.
    base_url: String,
    report_url: String,
    ops_url: String,
    desired_url: String,
    result_url: String,
    auth: HeaderValue,
    token: Secret,
}

impl fmt::Debug for HubClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubClient")
            .field("base_url", &self.base_url)
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
            base_url: base.to_owned(),
            report_url: format!("{base}{REPORT_PATH}"),
            ops_url: format!("{base}{OPS_PATH}"),
            desired_url: format!("{base}{DESIRED_PATH}"),
            result_url: format!("{base}{RESULT_PATH}"),
            auth,
            token: endpoint.token.clone(),
        })
    }

    /// The hub's base URL without a trailing `/` (no secret in it), for logs.
    pub fn base_url(&self) -> &str {
        &self.base_url
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
        let request = Request::post(&self.report_url);
        let builder = self
            .http
            .post(&self.report_url)
            .header(CONTENT_TYPE, "application/json")
            .body(body);
        let response = self.send(builder, &request).await?;
        let status = response.status();
        let answer = self.read(response, MAX_ANSWER_BYTES, &request).await?;
        if !status.is_success() {
            return Err(self.http_error(status, &answer));
        }
        Ok(ControlEnvelope::decode(&answer)?)
    }

    /// The long poll: `GET <hub.url>/api/agent/v1/ops?wait=<whole seconds of wait>`. The hub
    /// may hold it up to `wait`, so its deadline is `wait` + [`LONG_POLL_GRACE`], whatever
    /// the client's usual one. `Ok(None)` when the hub answers 404 (it has no such
    /// channel). Each delivery's `envelope` is the exact JSON text the hub sent.
    pub async fn fetch_ops(&self, wait: Duration) -> Result<Option<OpsAnswer>, HubClientError> {
        let secs = wait.as_secs();
        let url = format!("{}?wait={secs}", self.ops_url);
        let request = Request::get(&url);
        let builder = self
            .http
            .get(&url)
            .timeout(Duration::from_secs(secs).saturating_add(LONG_POLL_GRACE));
        let response = self.send(builder, &request).await?;
        let status = response.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            let answer = self.read(response, MAX_ANSWER_BYTES, &request).await?;
            return Err(self.http_error(status, &answer));
        }
        let answer = self
            .read(response, MAX_OPS_ANSWER_BYTES + 1, &request)
            .await?;
        if answer.len() > MAX_OPS_ANSWER_BYTES {
            return Err(AnswerError::TooLarge {
                request: request.to_string(),
                limit: MAX_OPS_ANSWER_BYTES,
            }
            .into());
        }
        serde_json::from_slice::<OpsAnswer>(&answer)
            .map(Some)
            .map_err(|e| {
                AnswerError::Malformed {
                    request: request.to_string(),
                    expected: r#"{"ops": [{"delivery_id", "envelope"}, …]}"#,
                    detail: self.redact(e.to_string()),
                }
                .into()
            })
    }

    /// `GET <hub.url>/api/agent/v1/desired`: the body's bytes exactly as sent, at most
    /// [`MAX_DESIRED_READ_BYTES`] of them (one more than an envelope may have, so the
    /// verification can refuse it `too_large`); not parsed here. `Ok(None)` on 404 (the
    /// hub holds no desired state).
    pub async fn fetch_desired(&self) -> Result<Option<Vec<u8>>, HubClientError> {
        let request = Request::get(&self.desired_url);
        let builder = self.http.get(&self.desired_url);
        let response = self.send(builder, &request).await?;
        let status = response.status();
        if status == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            let answer = self.read(response, MAX_ANSWER_BYTES, &request).await?;
            return Err(self.http_error(status, &answer));
        }
        self.read(response, MAX_DESIRED_READ_BYTES, &request)
            .await
            .map(Some)
    }

    /// `POST <hub.url>/api/agent/v1/ops/result` with `result` as JSON; any 2xx means the
    /// hub accepted it (it treats a repeated `seq` as the same result, so sending again
    /// after an unclear exchange is safe).
    pub async fn post_result(&self, result: &OpResult) -> Result<(), HubClientError> {
        let body = serde_json::to_vec(result)
            .map_err(|e| HubClientError::Setup(format!("encoding the result: {e}")))?;
        let request = Request::post(&self.result_url);
        let builder = self
            .http
            .post(&self.result_url)
            .header(CONTENT_TYPE, "application/json")
            .body(body);
        let response = self.send(builder, &request).await?;
        let status = response.status();
        let answer = self.read(response, MAX_ANSWER_BYTES, &request).await?;
        if !status.is_success() {
            return Err(self.http_error(status, &answer));
        }
        Ok(())
    }

    /// Sends `builder` with the token; what went wrong names `request`.
    async fn send(
        &self,
        builder: reqwest::RequestBuilder,
        request: &Request<'_>,
    ) -> Result<reqwest::Response, HubClientError> {
        builder
            .header(AUTHORIZATION, self.auth.clone())
            .send()
            .await
            .map_err(|e| self.transport(e, request))
    }

    /// Reads at most `cap` bytes of `response`'s body.
    async fn read(
        &self,
        response: reqwest::Response,
        cap: usize,
        request: &Request<'_>,
    ) -> Result<Vec<u8>, HubClientError> {
        read_capped(response, cap)
            .await
            .map_err(|e| self.transport(e, request))
    }

    fn http_error(&self, status: reqwest::StatusCode, body: &[u8]) -> HubClientError {
        HttpError {
            status: status.as_u16(),
            message: self.error_message(status, body),
        }
        .into()
    }

    fn transport(&self, e: reqwest::Error, request: &Request<'_>) -> HubClientError {
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
        if !message.contains(request.url) {
            message = format!("{message} ({request})");
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

/// A request as errors name it: method and URL (never a header).
struct Request<'a> {
    method: &'static str,
    url: &'a str,
}

impl<'a> Request<'a> {
    fn get(url: &'a str) -> Self {
        Request { method: "GET", url }
    }
    fn post(url: &'a str) -> Self {
        Request {
            method: "POST",
            url,
        }
    }
}

impl fmt::Display for Request<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.method, self.url)
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
        assert_eq!(c.base_url(), "https://hub.example/base");
        assert_eq!(
            c.report_url(),
            "https://hub.example/base/api/agent/v1/report"
        );
        assert_eq!(c.ops_url, "https://hub.example/base/api/agent/v1/ops");
        assert_eq!(
            c.desired_url,
            "https://hub.example/base/api/agent/v1/desired"
        );
        assert_eq!(
            c.result_url,
            "https://hub.example/base/api/agent/v1/ops/result"
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
