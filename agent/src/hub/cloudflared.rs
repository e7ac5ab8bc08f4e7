//! cloudflared readiness: `GET <cloudflared.metrics_url>/ready` with a short timeout.
//!
//! cloudflared (since 2024.12 on `127.0.0.1:20241` by default) answers `/ready` with
//! `{"status":200,"readyConnections":4,"connectorId":"<uuid>"}` and HTTP 200 when at least
//! one edge connection is up, and the same shape with HTTP 503 when none is. Mapping:
//! 200 → `ready`, 503 → `not_ready`, connection refused → `down`, anything else (404,
//! timeout, another error) → `unknown` with the reason.
//!
//! Must never: send anything but this GET, or follow a redirect.

use std::time::Duration;

use serde::Deserialize;

use super::report::{CloudflaredReport, CloudflaredState};
use crate::error_chain::error_chain;

/// Why the probe could not tell the state (the report says `unknown`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CloudflaredError {
    #[error("cloudflared metrics URL {url:?}: {reason}")]
    Setup { url: String, reason: String },
    #[error("cloudflared {url} answered HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("cloudflared {url} did not answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("cloudflared {url}: {reason}")]
    Request { url: String, reason: String },
}

/// One probe's outcome: the report entry, and why it is `unknown` if it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub report: CloudflaredReport,
    pub error: Option<CloudflaredError>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ReadyBody {
    ready_connections: Option<u32>,
    connector_id: Option<String>,
}

/// Probes one cloudflared metrics endpoint.
#[derive(Debug, Clone)]
pub struct CloudflaredProber {
    http: reqwest::Client,
    ready_url: String,
    timeout: Duration,
}

impl CloudflaredProber {
    pub fn new(metrics_url: &str, timeout: Duration) -> Result<Self, CloudflaredError> {
        let setup = |reason: String| CloudflaredError::Setup {
            url: metrics_url.to_owned(),
            reason,
        };
        let url = reqwest::Url::parse(metrics_url).map_err(|e| setup(e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(setup("must be http or https".into()));
        }
        // The endpoint is plain HTTP on loopback; an `https` one gets no trusted roots (so
        // it fails as `unknown`) rather than a silent skip of verification.
        let tls = super::client::rustls_config(rustls::RootCertStore::empty()).map_err(setup)?;
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .connect_timeout(timeout)
            .pool_max_idle_per_host(1)
            .build()
            .map_err(|e| setup(e.without_url().to_string()))?;
        Ok(CloudflaredProber {
            http,
            ready_url: format!("{}/ready", url.as_str().trim_end_matches('/')),
            timeout,
        })
    }

    pub fn ready_url(&self) -> &str {
        &self.ready_url
    }

    pub async fn probe(&self) -> Probe {
        let unknown = |error: CloudflaredError| Probe {
            report: CloudflaredReport {
                state: CloudflaredState::Unknown,
                ready_connections: None,
                connector_id: None,
            },
            error: Some(error),
        };
        let response = match self.http.get(&self.ready_url).send().await {
            Ok(r) => r,
            Err(e) if is_refused(&e) => {
                return Probe {
                    report: CloudflaredReport {
                        state: CloudflaredState::Down,
                        ready_connections: None,
                        connector_id: None,
                    },
                    error: None,
                };
            }
            Err(e) if e.is_timeout() => {
                return unknown(CloudflaredError::Timeout {
                    url: self.ready_url.clone(),
                    timeout: self.timeout,
                });
            }
            Err(e) => {
                return unknown(CloudflaredError::Request {
                    url: self.ready_url.clone(),
                    reason: error_chain(&e.without_url()),
                });
            }
        };
        let state = match response.status().as_u16() {
            200 => CloudflaredState::Ready,
            503 => CloudflaredState::NotReady,
            status => {
                return unknown(CloudflaredError::Status {
                    url: self.ready_url.clone(),
                    status,
                });
            }
        };
        // The status decides the state; the body only adds the numbers. A body cut short
        // by the timeout leaves them empty.
        let body = match response.bytes().await {
            Ok(b) if b.len() <= 64 * 1024 => serde_json::from_slice::<ReadyBody>(&b).ok(),
            _ => None,
        };
        Probe {
            report: CloudflaredReport {
                state,
                ready_connections: body.as_ref().and_then(|b| b.ready_connections),
                connector_id: body.and_then(|b| b.connector_id),
            },
            error: None,
        }
    }
}

fn is_refused(e: &reqwest::Error) -> bool {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = src {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::ConnectionRefused
        {
            return true;
        }
        src = err.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connection_refused_is_down() {
        // a port that was just free: nothing listens there
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let p = CloudflaredProber::new(&format!("http://127.0.0.1:{port}"), Duration::from_secs(2))
            .unwrap();
        assert_eq!(p.ready_url(), format!("http://127.0.0.1:{port}/ready"));
        let probe = p.probe().await;
        assert_eq!(probe.report.state, CloudflaredState::Down);
        assert_eq!(probe.error, None);
    }

    #[test]
    fn bad_urls_are_setup_errors() {
        for url in ["", "127.0.0.1:20241", "ftp://127.0.0.1"] {
            assert!(matches!(
                CloudflaredProber::new(url, Duration::from_secs(1)),
                Err(CloudflaredError::Setup { .. })
            ));
        }
    }
}
