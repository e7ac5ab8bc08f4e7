//! [`Client`]: one reqwest client (connection reuse) over rustls, the request/response
//! envelope, error mapping, and the typed reads.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use felhom_protocol::Vmid;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::header::{AUTHORIZATION, HeaderValue};
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::config::{Config, ProxmoxConfig, TlsVerify};
use crate::error_chain::error_chain;
use crate::tls::{Failure, Peer, TlsProblem, Unreachable};

use super::error::{PermissionDenied, ProxmoxError};
use super::tls;
use super::types::{
    BackupItem, GuestConfig, GuestKind, GuestListItem, GuestStatus, NodeListItem, NodeStatus,
    SnapshotItem, StorageItem, TaskListFilter, TaskListItem, TaskStatus, Version,
};
use super::upid::Upid;

/// Largest response body we accept (a task list of thousands of entries is ~1 MiB).
const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;
/// Default per-request timeout (connect + answer).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Characters left as they are in a path segment; everything else is percent-encoded (a
/// UPID's `:`, `@` and `!` included).
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

pub(crate) fn seg(s: &str) -> String {
    utf8_percent_encode(s, SEGMENT).to_string()
}

/// The typed PVE client for one node. Cheap to clone: clones share one connection pool.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    /// `https://host:8006/api2/json`
    base: String,
    node: String,
    token_id: String,
    /// `PVEAPIToken=<id>=<secret>`, marked sensitive.
    auth: HeaderValue,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.inner.base)
            .field("node", &self.inner.node)
            .field("token_id", &self.inner.token_id)
            .finish_non_exhaustive()
    }
}

/// The body of a PVE error answer: `{"data":null, "message"?: "...\n", "errors"?: {...}}`.
#[derive(Deserialize, Default)]
struct ErrorBody {
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    errors: Option<BTreeMap<String, Value>>,
}

#[derive(Deserialize)]
struct Envelope<T> {
    data: T,
}

impl Client {
    /// Builds the client for `node` with the default request timeout. Makes no request.
    /// Logs a warning when TLS verification is off.
    pub fn new(cfg: &ProxmoxConfig, node: &str) -> Result<Client, ProxmoxError> {
        Client::with_timeout(cfg, node, DEFAULT_REQUEST_TIMEOUT)
    }

    /// [`Client::new`] for the node named in the whole config.
    pub fn from_config(cfg: &Config) -> Result<Client, ProxmoxError> {
        Client::new(&cfg.proxmox, &cfg.node)
    }

    /// [`Client::new`] with a per-request timeout.
    pub fn with_timeout(
        cfg: &ProxmoxConfig,
        node: &str,
        request_timeout: Duration,
    ) -> Result<Client, ProxmoxError> {
        if !crate::config::valid_node_name(node) {
            return Err(ProxmoxError::Setup(format!("{node:?} is not a node name")));
        }
        let url = reqwest::Url::parse(&cfg.url)
            .map_err(|e| ProxmoxError::Setup(format!("proxmox.url {:?}: {e}", cfg.url)))?;
        if url.scheme() != "https" {
            return Err(ProxmoxError::Setup(format!(
                "proxmox.url {:?} is not https",
                cfg.url
            )));
        }
        let base = format!("{}/api2/json", cfg.url.trim_end_matches('/'));
        let tls_config = tls::client_config(&cfg.tls)?;
        if cfg.tls == TlsVerify::Insecure {
            tracing::warn!(
                url = %cfg.url,
                "proxmox.tls.insecure is set: the Proxmox certificate is NOT verified; set proxmox.tls.pin_sha256 or proxmox.tls.ca_file"
            );
        }
        let mut auth = HeaderValue::from_str(&format!(
            "PVEAPIToken={}={}",
            cfg.token_id,
            cfg.token_secret.expose()
        ))
        .map_err(|_| {
            ProxmoxError::Setup(
                "proxmox.token_id or the token secret holds characters not allowed in an HTTP header"
                    .to_string(),
            )
        })?;
        auth.set_sensitive(true);
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls_config)
            // An HTTP(S)_PROXY in the environment must never see the token.
            .no_proxy()
            .http1_only()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(request_timeout)
            .pool_idle_timeout(Duration::from_secs(50))
            .user_agent(concat!("felhom-agent/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ProxmoxError::Setup(format!("HTTP client: {e}")))?;
        Ok(Client {
            inner: Arc::new(Inner {
                http,
                base,
                node: node.to_string(),
                token_id: cfg.token_id.clone(),
                auth,
            }),
        })
    }

    /// The node this client acts on.
    pub fn node(&self) -> &str {
        &self.inner.node
    }

    /// The API token id (not secret).
    pub fn token_id(&self) -> &str {
        &self.inner.token_id
    }

    pub(crate) fn node_path(&self) -> String {
        format!("/nodes/{}", seg(&self.inner.node))
    }

    pub(crate) fn guest_path(&self, kind: GuestKind, vmid: Vmid) -> String {
        format!("{}/{}/{}", self.node_path(), kind.as_str(), vmid)
    }

    /// One request; `form` goes in the body (POST/PUT), `query` in the URL.
    pub(crate) async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        form: Option<&[(String, String)]>,
    ) -> Result<T, ProxmoxError> {
        let endpoint = format!("{method} {path}");
        let url = format!("{}{}", self.inner.base, path);
        let mut req = self
            .inner
            .http
            .request(method, &url)
            .header(AUTHORIZATION, self.inner.auth.clone());
        if !query.is_empty() {
            req = req.query(query);
        }
        if let Some(form) = form {
            req = req.form(form);
        }
        let resp = req.send().await.map_err(|e| send_error(&endpoint, &e))?;
        let status = resp.status();
        let reason = resp
            .extensions()
            .get::<hyper::ext::ReasonPhrase>()
            .map(|r| String::from_utf8_lossy(r.as_bytes()).into_owned());
        let body = read_body(resp, &endpoint).await?;
        tracing::debug!(%endpoint, status = status.as_u16(), "proxmox call");
        if status.is_success() {
            let env: Envelope<T> =
                serde_json::from_slice(&body).map_err(|e| ProxmoxError::Decode {
                    endpoint: endpoint.clone(),
                    detail: e.to_string(),
                })?;
            return Ok(env.data);
        }
        Err(error_from_answer(&endpoint, status, reason, &body))
    }

    pub(crate) async fn get<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<T, ProxmoxError> {
        self.call(Method::GET, path, query, None).await
    }

    // ---- reads --------------------------------------------------------------------------

    /// `GET /version`.
    pub async fn version(&self) -> Result<Version, ProxmoxError> {
        self.get("/version", &[]).await
    }

    /// `GET /nodes`.
    pub async fn nodes(&self) -> Result<Vec<NodeListItem>, ProxmoxError> {
        self.get("/nodes", &[]).await
    }

    /// `GET /nodes/{node}/status`.
    pub async fn node_status(&self) -> Result<NodeStatus, ProxmoxError> {
        self.get(&format!("{}/status", self.node_path()), &[]).await
    }

    /// `GET /nodes/{node}/lxc` or `/qemu`.
    pub async fn guests(&self, kind: GuestKind) -> Result<Vec<GuestListItem>, ProxmoxError> {
        self.get(&format!("{}/{}", self.node_path(), kind.as_str()), &[])
            .await
    }

    /// `GET .../{lxc|qemu}/{vmid}/config`: pending values merged in (PVE's default).
    pub async fn guest_config(
        &self,
        kind: GuestKind,
        vmid: Vmid,
    ) -> Result<GuestConfig, ProxmoxError> {
        self.get(&format!("{}/config", self.guest_path(kind, vmid)), &[])
            .await
    }

    /// `GET .../config?current=1`: only what is applied now.
    pub async fn guest_config_current(
        &self,
        kind: GuestKind,
        vmid: Vmid,
    ) -> Result<GuestConfig, ProxmoxError> {
        self.get(
            &format!("{}/config", self.guest_path(kind, vmid)),
            &[("current", "1".to_string())],
        )
        .await
    }

    /// `GET .../{lxc|qemu}/{vmid}/status/current` (with `ha.managed`, `lock`, `template`).
    pub async fn guest_status(
        &self,
        kind: GuestKind,
        vmid: Vmid,
    ) -> Result<GuestStatus, ProxmoxError> {
        self.get(
            &format!("{}/status/current", self.guest_path(kind, vmid)),
            &[],
        )
        .await
    }

    /// `GET .../{lxc|qemu}/{vmid}/snapshot`; the last item is `current`.
    pub async fn snapshots(
        &self,
        kind: GuestKind,
        vmid: Vmid,
    ) -> Result<Vec<SnapshotItem>, ProxmoxError> {
        self.get(&format!("{}/snapshot", self.guest_path(kind, vmid)), &[])
            .await
    }

    /// `GET /nodes/{node}/storage`.
    pub async fn storages(&self) -> Result<Vec<StorageItem>, ProxmoxError> {
        self.get(&format!("{}/storage", self.node_path()), &[])
            .await
    }

    /// `GET /nodes/{node}/storage/{storage}/content?content=backup[&vmid=N]`.
    pub async fn backups(
        &self,
        storage: &str,
        vmid: Option<Vmid>,
    ) -> Result<Vec<BackupItem>, ProxmoxError> {
        let mut q = vec![("content", "backup".to_string())];
        if let Some(v) = vmid {
            q.push(("vmid", v.to_string()));
        }
        self.get(
            &format!("{}/storage/{}/content", self.node_path(), seg(storage)),
            &q,
        )
        .await
    }

    /// `GET /nodes/{upid.node}/tasks/{upid}/status`.
    pub async fn task_status(&self, upid: &Upid) -> Result<TaskStatus, ProxmoxError> {
        self.get(
            &format!(
                "/nodes/{}/tasks/{}/status",
                seg(upid.node()),
                seg(upid.as_str())
            ),
            &[],
        )
        .await
    }

    /// `GET /nodes/{node}/tasks` with filters (crash recovery finds its tasks here).
    pub async fn tasks(&self, filter: &TaskListFilter) -> Result<Vec<TaskListItem>, ProxmoxError> {
        self.get(&format!("{}/tasks", self.node_path()), &filter.query())
            .await
    }
}

fn send_error(endpoint: &str, e: &reqwest::Error) -> ProxmoxError {
    let endpoint = endpoint.to_string();
    match crate::tls::explain(Peer::Proxmox, e) {
        Some(Failure::Tls(failure)) => match failure.problem {
            TlsProblem::PinMismatch { expected, seen } => ProxmoxError::PinMismatch {
                endpoint,
                expected,
                seen,
            },
            _ => ProxmoxError::Tls { endpoint, failure },
        },
        Some(Failure::Unreachable(u)) if u.cause == Unreachable::TimedOut => {
            ProxmoxError::Timeout { endpoint }
        }
        Some(Failure::Unreachable(u)) => ProxmoxError::Transport {
            endpoint,
            detail: format!("{u} ({})", error_chain(e)),
        },
        None if e.is_timeout() => ProxmoxError::Timeout { endpoint },
        None => ProxmoxError::Transport {
            endpoint,
            detail: error_chain(e),
        },
    }
}

async fn read_body(mut resp: reqwest::Response, endpoint: &str) -> Result<Vec<u8>, ProxmoxError> {
    let mut body = Vec::new();
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_BODY_BYTES {
                    return Err(ProxmoxError::Decode {
                        endpoint: endpoint.to_string(),
                        detail: format!("answer larger than {MAX_BODY_BYTES} bytes"),
                    });
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(body),
            Err(e) => return Err(send_error(endpoint, &e)),
        }
    }
}

/// Builds the error for a non-2xx answer. The message is the body's `message` (PVE ≥ 8.4),
/// else the HTTP reason phrase (older PVE puts it only there), else the canonical reason.
pub(crate) fn error_from_answer(
    endpoint: &str,
    status: StatusCode,
    reason: Option<String>,
    body: &[u8],
) -> ProxmoxError {
    let parsed: ErrorBody = serde_json::from_slice(body).unwrap_or_default();
    let canonical = status.canonical_reason().map(str::to_string);
    let reason = reason.filter(|r| !r.trim().is_empty());
    let message = parsed
        .message
        .as_deref()
        .map(str::trim_end)
        .filter(|m| !m.is_empty())
        .map(str::to_string)
        .or_else(|| reason.clone())
        .or(canonical)
        .unwrap_or_default();
    match status {
        StatusCode::UNAUTHORIZED => ProxmoxError::Unauthorized {
            endpoint: endpoint.to_string(),
            reason: message,
        },
        StatusCode::FORBIDDEN => ProxmoxError::PermissionDenied {
            endpoint: endpoint.to_string(),
            denied: Box::new(
                PermissionDenied::parse(&message).unwrap_or(PermissionDenied {
                    path: None,
                    privileges: Vec::new(),
                    reason: None,
                    raw: message,
                }),
            ),
        },
        _ => ProxmoxError::Api {
            endpoint: endpoint.to_string(),
            status: status.as_u16(),
            message,
            errors: parsed
                .errors
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| {
                    let text = match v {
                        Value::String(s) => s,
                        other => other.to_string(),
                    };
                    (k, text)
                })
                .collect(),
        },
    }
}
