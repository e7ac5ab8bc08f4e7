//! A typed client of the hub simulator's signed-operations control API (`/_sim/ops…`,
//! `/_sim/desired`), for end-to-end tests in any crate of the workspace.
//!
//! Owns: the calls and their answers as JSON ([`OpsControl`]), and waiting for results
//! (by re-reading `/_sim/ops/results` until a predicate holds, with a deadline).
//! Must never: talk to anything but the simulator it was given, or hide a non-2xx answer
//! (it is a [`ControlCallError::Status`] with the simulator's message).

use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// Why a control call failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlCallError {
    #[error("hubsim {path}: {source}")]
    Http {
        path: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("hubsim {path}: status {status}: {body}")]
    Status {
        path: String,
        status: u16,
        body: String,
    },
    #[error("hubsim {path}: the answer is not JSON")]
    NotJson { path: String },
    #[error("timed out after {0:?} waiting for results; last answer: {1}")]
    Timeout(Duration, Value),
}

/// The ops control API of one simulator.
#[derive(Debug, Clone)]
pub struct OpsControl {
    client: reqwest::Client,
    url: String,
    admin_token: String,
}

impl OpsControl {
    /// `url` is the simulator's base URL (`https://127.0.0.1:PORT`); `client` must trust
    /// its CA ([`crate::harness::build_client`]).
    pub fn new(client: reqwest::Client, url: &str, admin_token: &str) -> OpsControl {
        OpsControl {
            client,
            url: url.trim_end_matches('/').into(),
            admin_token: admin_token.into(),
        }
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, ControlCallError> {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap_or(reqwest::Method::GET);
        let mut req = self
            .client
            .request(m, format!("{}{path}", self.url))
            .bearer_auth(&self.admin_token);
        if let Some(b) = body {
            req = req.body(b.to_string());
        }
        let http = |source| ControlCallError::Http {
            path: path.into(),
            source,
        };
        let resp = req.send().await.map_err(http)?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.map_err(http)?;
        if !(200..300).contains(&status) {
            return Err(ControlCallError::Status {
                path: path.into(),
                status,
                body: String::from_utf8_lossy(&bytes).into_owned(),
            });
        }
        serde_json::from_slice(&bytes).map_err(|_| ControlCallError::NotJson { path: path.into() })
    }

    /// Enqueues envelope text (served verbatim); returns the delivery id.
    pub async fn enqueue_text(&self, envelope_text: &str) -> Result<String, ControlCallError> {
        let v = self
            .call(
                "POST",
                "/_sim/ops",
                Some(json!({ "envelope_text": envelope_text })),
            )
            .await?;
        Ok(v["delivery_id"].as_str().unwrap_or_default().to_string())
    }

    /// Enqueues with a `POST /_sim/ops` body of the caller's making (e.g. a chosen
    /// `delivery_id`); returns the answer.
    pub async fn enqueue(&self, body: Value) -> Result<Value, ControlCallError> {
        self.call("POST", "/_sim/ops", Some(body)).await
    }

    /// `POST /_sim/ops/misbehave`.
    pub async fn misbehave(&self, action: Value) -> Result<Value, ControlCallError> {
        self.call("POST", "/_sim/ops/misbehave", Some(action)).await
    }

    /// `GET /_sim/ops`.
    pub async fn deliveries(&self) -> Result<Value, ControlCallError> {
        self.call("GET", "/_sim/ops", None).await
    }

    /// `DELETE /_sim/ops`.
    pub async fn clear(&self) -> Result<(), ControlCallError> {
        self.call("DELETE", "/_sim/ops", None).await.map(drop)
    }

    /// `GET /_sim/ops/results?since=K`: the whole answer (results, conflicts, malformed).
    pub async fn results(&self, since: u64) -> Result<Value, ControlCallError> {
        self.call("GET", &format!("/_sim/ops/results?since={since}"), None)
            .await
    }

    /// The stored results (each `{"index","via","received_at","result"}`) since `since`.
    pub async fn result_list(&self, since: u64) -> Result<Vec<Value>, ControlCallError> {
        Ok(self.results(since).await?["results"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// Re-reads the results until `pred` holds for the list (all of them, from the first),
    /// or `timeout` passed.
    pub async fn wait_results(
        &self,
        timeout: Duration,
        pred: impl Fn(&[Value]) -> bool,
    ) -> Result<Vec<Value>, ControlCallError> {
        let deadline = Instant::now() + timeout;
        loop {
            let list = self.result_list(0).await?;
            if pred(&list) {
                return Ok(list);
            }
            if Instant::now() >= deadline {
                return Err(ControlCallError::Timeout(timeout, Value::Array(list)));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `PUT /_sim/ops/channel`.
    pub async fn set_channel(&self, enabled: bool) -> Result<(), ControlCallError> {
        self.call(
            "PUT",
            "/_sim/ops/channel",
            Some(json!({ "enabled": enabled })),
        )
        .await
        .map(drop)
    }

    /// `PUT /_sim/ops/result_fault`: `Some(status)` answers result POSTs with it (nothing
    /// stored) until called with `None`.
    pub async fn result_fault(&self, status: Option<u16>) -> Result<(), ControlCallError> {
        self.call(
            "PUT",
            "/_sim/ops/result_fault",
            Some(json!({ "status": status })),
        )
        .await
        .map(drop)
    }

    /// `PUT /_sim/desired` with envelope text served byte for byte.
    pub async fn set_desired_text(
        &self,
        envelope_text: &str,
        generation: u64,
    ) -> Result<(), ControlCallError> {
        self.call(
            "PUT",
            "/_sim/desired",
            Some(json!({ "envelope_text": envelope_text, "generation": generation })),
        )
        .await
        .map(drop)
    }

    /// `DELETE /_sim/desired`.
    pub async fn clear_desired(&self) -> Result<(), ControlCallError> {
        self.call("DELETE", "/_sim/desired", None).await.map(drop)
    }

    /// `GET /_sim/state`'s `ops` part.
    pub async fn summary(&self) -> Result<Value, ControlCallError> {
        Ok(self.call("GET", "/_sim/state", None).await?["ops"].clone())
    }
}
