//! HTTPS serving for [`super::HubSim`] on the test bed's shared plumbing: a fresh CA and
//! loopback certificate from [`crate::tls::TestPki`], requests served by
//! [`crate::http::serve`]. Hanging and slow answers are the handler's future taking its
//! time; a dropped connection is [`crate::http::Reply::Drop`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

use super::{HubSim, MAX_REPORT_BYTES, Reply};
use crate::http::{self, Handler, ReplyFuture, Request, ServeOptions};
use crate::tls::{TestPki, TlsError};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Http(#[from] http::HttpError),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// A running HTTPS listener.
#[derive(Debug)]
pub struct Listening {
    pub addr: SocketAddr,
    /// PEM of the CA that signed the server certificate.
    pub ca_file: PathBuf,
    pub task: tokio::task::JoinHandle<()>,
}

impl Handler for HubSim {
    fn handle(self: Arc<Self>, request: Request) -> ReplyFuture {
        Box::pin(async move {
            let path = match &request.query {
                Some(q) => format!("{}?{q}", request.path),
                None => request.path.clone(),
            };
            let received = request.received;
            let auth = request
                .headers
                .get(hyper::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            match HubSim::handle(&self, request.method.as_str(), &path, auth, &request.body) {
                Reply::Respond {
                    status,
                    body,
                    delay,
                } => {
                    if !delay.is_zero() {
                        http::sleep_until_precise(received + delay).await;
                    }
                    let mut resp = http::simple_response(status, None, Bytes::from(body));
                    http::set_header(&mut resp, "content-type", "application/json");
                    http::Reply::Respond(resp)
                }
                Reply::Drop => http::Reply::Drop,
                // Never answers; the connection ends when the client gives up.
                Reply::Hang => std::future::pending().await,
            }
        })
    }
}

/// Binds `addr` (loopback only), writes the CA to `dir/hubsim-ca.pem`, and serves `sim`.
pub async fn serve(
    sim: Arc<HubSim>,
    addr: SocketAddr,
    dir: &Path,
) -> Result<Listening, ServerError> {
    let listener = http::bind_loopback(addr).await?;
    let addr = listener
        .local_addr()
        .map_err(|source| http::HttpError::LocalAddr { source })?;
    let ip = addr.ip().to_string();
    let pki = TestPki::generate("felhom-hubsim CA", "felhom-hubsim", &["localhost", &ip])?;
    let ca_file = pki.write_ca_pem(dir, "hubsim-ca.pem")?;
    let tls = pki.server_config()?;
    let options = ServeOptions {
        max_body_bytes: MAX_REPORT_BYTES,
        ..ServeOptions::default()
    };
    let task = tokio::spawn(http::serve(listener, tls, sim, options));
    Ok(Listening {
        addr,
        ca_file,
        task,
    })
}
