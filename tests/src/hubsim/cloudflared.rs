//! A stand-in for cloudflared's metrics listener (`GET /ready`), plain HTTP on loopback,
//! answering the way cloudflared does: 200 with `{"status":200,"readyConnections":N,
//! "connectorId":"…"}` when connected, 503 with `readyConnections: 0` when not. Other
//! modes give the probe's `unknown` cases (a 404 from something else on the port, an
//! answer that never comes).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// What `/ready` answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadyMode {
    Ready {
        connections: u32,
    },
    NotReady,
    Status(u16),
    /// 200 with a body that is not cloudflared's.
    Garbage,
    Hang,
}

pub const CONNECTOR_ID: &str = "5f2a9a4e-3b1c-4a8e-9d6e-2f7b1c0a8e11";

/// A running stand-in; change its answer with [`FakeCloudflared::set`].
#[derive(Debug)]
pub struct FakeCloudflared {
    pub addr: SocketAddr,
    mode: Arc<Mutex<ReadyMode>>,
    task: tokio::task::JoinHandle<()>,
}

impl FakeCloudflared {
    pub async fn start(mode: ReadyMode) -> std::io::Result<FakeCloudflared> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let mode = Arc::new(Mutex::new(mode));
        let m = mode.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let m = m.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| answer(m.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        Ok(FakeCloudflared { addr, mode, task })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set(&self, mode: ReadyMode) {
        *self.mode.lock().unwrap_or_else(|p| p.into_inner()) = mode;
    }
}

impl Drop for FakeCloudflared {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(
    mode: Arc<Mutex<ReadyMode>>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let mode = mode.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let (status, body) = if req.uri().path() != "/ready" {
        (404, "404 page not found\n".to_string())
    } else {
        match mode {
            ReadyMode::Ready { connections } => (
                200,
                format!(
                    r#"{{"status":200,"readyConnections":{connections},"connectorId":"{CONNECTOR_ID}"}}"#
                ),
            ),
            ReadyMode::NotReady => (
                503,
                format!(r#"{{"status":503,"readyConnections":0,"connectorId":"{CONNECTOR_ID}"}}"#),
            ),
            ReadyMode::Status(s) => (s, "404 page not found\n".into()),
            ReadyMode::Garbage => (200, "OK\n".into()),
            ReadyMode::Hang => {
                std::future::pending::<()>().await;
                (500, String::new())
            }
        }
    };
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    Ok(r)
}
