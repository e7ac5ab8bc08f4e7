//! HTTPS serving for [`super::HubSim`]: a fresh CA and a loopback leaf certificate per run,
//! HTTP/1.1 over tokio-rustls, one task per connection.
//!
//! Interim: the test bed's shared TLS/HTTP plumbing (`felhom_testbed::tls` / `::http`,
//! being written for `felhom-pvesim`) is not on this branch yet; this file is the only
//! server code in the hub simulator and is meant to be replaced by it, keeping
//! [`super::HubSim::handle`] as the request handler.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::{HubSim, MAX_REPORT_BYTES, Reply};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("refusing to listen on {0}: loopback addresses only")]
    NotLoopback(SocketAddr),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("certificate setup: {0}")]
    Cert(String),
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A running HTTPS listener.
#[derive(Debug)]
pub struct Listening {
    pub addr: SocketAddr,
    /// PEM of the CA that signed the server certificate.
    pub ca_file: PathBuf,
    pub task: tokio::task::JoinHandle<()>,
}

/// Binds `addr` (loopback only), writes the CA to `dir/hubsim-ca.pem`, and serves `sim`.
pub async fn serve(
    sim: Arc<HubSim>,
    addr: SocketAddr,
    dir: &Path,
) -> Result<Listening, ServerError> {
    if !addr.ip().is_loopback() {
        return Err(ServerError::NotLoopback(addr));
    }
    let (config, ca_pem) = tls_config(addr)?;
    let ca_file = dir.join("hubsim-ca.pem");
    std::fs::write(&ca_file, ca_pem).map_err(|source| ServerError::Write {
        path: ca_file.clone(),
        source,
    })?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })?;
    let addr = listener
        .local_addr()
        .map_err(|source| ServerError::Bind { addr, source })?;
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _peer)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            let sim = sim.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = service_fn(move |req| handle(sim.clone(), req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    Ok(Listening {
        addr,
        ca_file,
        task,
    })
}

/// The connection is closed without an answer when the handler says [`Reply::Drop`].
#[derive(Debug)]
struct DropConnection;

impl std::fmt::Display for DropConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection dropped on purpose")
    }
}

impl std::error::Error for DropConnection {}

async fn handle(
    sim: Arc<HubSim>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, DropConnection> {
    let method = req.method().as_str().to_owned();
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    let auth = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = match Limited::new(req.into_body(), MAX_REPORT_BYTES)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return Ok(respond(
                413,
                br#"{"message":"body too large or broken"}"#.to_vec(),
            ));
        }
    };
    match sim.handle(&method, &path, auth.as_deref(), &body) {
        Reply::Respond {
            status,
            body,
            delay,
        } => {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            Ok(respond(status, body))
        }
        Reply::Drop => Err(DropConnection),
        Reply::Hang => {
            std::future::pending::<()>().await;
            Err(DropConnection)
        }
    }
}

fn respond(status: u16, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn tls_config(addr: SocketAddr) -> Result<(rustls::ServerConfig, String), ServerError> {
    let cert = |e: rcgen::Error| ServerError::Cert(e.to_string());
    let ca_key = rcgen::KeyPair::generate().map_err(cert)?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(cert)?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "felhom-hubsim CA");
    let ca_cert = ca_params.self_signed(&ca_key).map_err(cert)?;
    let issuer = rcgen::Issuer::from_params(&ca_params, &ca_key);

    let leaf_key = rcgen::KeyPair::generate().map_err(cert)?;
    let mut names = vec!["localhost".to_string()];
    names.push(addr.ip().to_string());
    let leaf_params = rcgen::CertificateParams::new(names).map_err(cert)?;
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).map_err(cert)?;

    let key = rustls::pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der())
        .map_err(|e| ServerError::Cert(e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ServerError::Cert(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der().clone(), ca_cert.der().clone()], key)
        .map_err(|e| ServerError::Cert(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok((config, ca_cert.pem()))
}
