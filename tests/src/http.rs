//! A small HTTPS/1.1 server for the simulators, on hyper + tokio-rustls directly.
//!
//! Owns: accepting loopback TCP connections, the TLS handshake, reading each request
//! (body capped), and writing what the handler decides: a response with any status and
//! reason phrase (through `hyper::ext::ReasonPhrase`), or aborting the connection
//! without a response ([`Reply::Drop`]).
//! Must never: interpret requests (that is the handler's job), block the runtime, or
//! keep a connection alive after the handler asked to drop it.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_rustls::TlsAcceptor;

/// The response type the server writes.
pub type HttpResponse = hyper::Response<Full<Bytes>>;

/// Errors of the server plumbing.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("refusing to listen on {addr}: only loopback addresses are allowed")]
    NotLoopback { addr: SocketAddr },
    #[error("reading the bound address: {source}")]
    LocalAddr {
        #[source]
        source: std::io::Error,
    },
}

/// One request as the handler sees it: the body is fully read.
#[derive(Debug)]
pub struct Request {
    pub method: Method,
    /// The raw (still percent-encoded) path.
    pub path: String,
    /// The raw query string, if any.
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub peer: SocketAddr,
    /// When the request's head arrived (before its body was read): simulated latency is
    /// measured from here.
    pub received: Instant,
}

/// What the handler wants done with a request.
#[derive(Debug)]
pub enum Reply {
    /// Write this response.
    Respond(HttpResponse),
    /// Abort the connection without writing anything.
    Drop,
}

/// The boxed future a handler returns.
pub type ReplyFuture = Pin<Box<dyn Future<Output = Reply> + Send>>;

/// The request handler of a server.
pub trait Handler: Send + Sync + 'static {
    fn handle(self: Arc<Self>, request: Request) -> ReplyFuture;
}

/// Server limits.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Larger request bodies get `413 Request Entity Too Large`.
    pub max_body_bytes: usize,
    /// Time allowed for the TLS handshake.
    pub handshake_timeout: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        // pve-http-server limits POST bodies to 64 KiB; we allow more for tests.
        ServeOptions {
            max_body_bytes: 1024 * 1024,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// Binds `addr`, refusing anything but loopback.
pub async fn bind_loopback(addr: SocketAddr) -> Result<TcpListener, HttpError> {
    if !addr.ip().is_loopback() {
        return Err(HttpError::NotLoopback { addr });
    }
    TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind { addr, source })
}

/// Serves HTTPS on `listener` until the returned future is dropped or the runtime ends.
/// Each connection runs in its own task.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    handler: Arc<H>,
    options: ServeOptions,
) {
    let acceptor = TlsAcceptor::from(tls);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(pair) => pair,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                eprintln!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let handler = handler.clone();
        let options = options.clone();
        tokio::spawn(async move {
            let tls_stream =
                match tokio::time::timeout(options.handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    // Failed handshakes (e.g. a client refusing our certificate) are normal in
                    // tests; nothing to answer.
                    Ok(Err(_)) | Err(_) => return,
                };
            serve_connection(tls_stream, peer, handler, options).await;
        });
    }
}

async fn serve_connection<H: Handler, S>(
    stream: S,
    peer: SocketAddr,
    handler: Arc<H>,
    options: ServeOptions,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let abort = Arc::new(Notify::new());
    let service_abort = abort.clone();
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let handler = handler.clone();
        let abort = service_abort.clone();
        let max = options.max_body_bytes;
        async move {
            let received = Instant::now();
            let (parts, body) = req.into_parts();
            let body = match Limited::new(body, max).collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(e) => {
                    if e.downcast_ref::<http_body_util::LengthLimitError>()
                        .is_some()
                    {
                        return Ok::<_, Infallible>(simple_response(
                            413,
                            Some("Request Entity Too Large"),
                            Bytes::new(),
                        ));
                    }
                    // The client went away mid-body: nothing sensible to answer.
                    abort.notify_one();
                    return Ok(std::future::pending::<HttpResponse>().await);
                }
            };
            let request = Request {
                method: parts.method,
                path: parts.uri.path().to_owned(),
                query: parts.uri.query().map(str::to_owned),
                headers: parts.headers,
                body,
                peer,
                received,
            };
            match handler.handle(request).await {
                Reply::Respond(resp) => Ok(resp),
                Reply::Drop => {
                    abort.notify_one();
                    Ok(std::future::pending::<HttpResponse>().await)
                }
            }
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        _ = conn => {}
        // Dropping the connection future closes the socket without a response.
        _ = abort.notified() => {}
    }
}

/// Builds a response with `status`, an optional custom reason phrase, and `body`.
/// A reason phrase with bytes HTTP does not allow is sanitized (each bad byte becomes
/// `?`) rather than dropped, so the client still sees the text.
pub fn simple_response(status: u16, reason: Option<&str>, body: Bytes) -> HttpResponse {
    let mut resp = hyper::Response::new(Full::new(body));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Some(reason) = reason
        && Some(reason) != resp.status().canonical_reason()
    {
        let clean: Vec<u8> = reason
            .bytes()
            .map(|b| {
                if b == b'\t' || (0x20..0x7f).contains(&b) || b >= 0x80 {
                    b
                } else {
                    b'?'
                }
            })
            .collect();
        if let Ok(phrase) = hyper::ext::ReasonPhrase::try_from(clean) {
            resp.extensions_mut().insert(phrase);
        }
    }
    resp
}

/// Adds a header to a response (names and values that are invalid are skipped).
pub fn set_header(resp: &mut HttpResponse, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        resp.headers_mut().insert(HeaderName::from_static(name), v);
    }
}

/// How much of a simulated delay is slept precisely off the runtime: more than tokio's
/// timer granularity (1 ms), so the coarse sleep before it never overshoots the deadline.
const PRECISE_TAIL: Duration = Duration::from_micros(1500);

/// Waits until `deadline` with sub-millisecond precision, without holding a runtime
/// worker: tokio's timer rounds every sleep up to its next 1 ms tick (a 2 ms latency cost
/// about 3 ms), so only the part up to [`PRECISE_TAIL`] before the deadline is a tokio
/// sleep; the rest is a `std::thread::sleep` (nanosleep) on the blocking pool. Other
/// requests go on meanwhile; a deadline already past returns at once.
pub async fn sleep_until_precise(deadline: Instant) {
    let now = Instant::now();
    if deadline <= now {
        return;
    }
    if deadline - now > PRECISE_TAIL {
        tokio::time::sleep_until((deadline - PRECISE_TAIL).into()).await;
    }
    if deadline <= Instant::now() {
        return;
    }
    let tail = tokio::task::spawn_blocking(move || {
        let left = deadline.saturating_duration_since(Instant::now());
        if !left.is_zero() {
            std::thread::sleep(left);
        }
    });
    if tail.await.is_err() {
        // The blocking pool is shutting down (the runtime is ending): wait coarsely.
        tokio::time::sleep_until(deadline.into()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The precise sleep never ends before its deadline, for delays below, around and
    /// above the coarse part; and many run at once without waiting on each other. How
    /// soon after the deadline it ends is an idle machine's figure (under load every
    /// wake-up waits for a CPU): the bench `precise_latency` measures it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn precise_sleep_never_ends_early_and_sleeps_run_side_by_side() {
        for us in [300u64, 1200, 2000, 2500, 5000]
            .into_iter()
            .cycle()
            .take(100)
        {
            let deadline = Instant::now() + Duration::from_micros(us);
            sleep_until_precise(deadline).await;
            let now = Instant::now();
            assert!(now >= deadline, "woke {:?} early", deadline - now);
        }
        // 64 sleeps of 500 ms, each from when its task first runs, take about 500 ms in
        // all; had they held the two runtime workers they would take 64 × 500 ms / 2 =
        // 16 s. The bound between is one no load on the machine reaches.
        let t = Instant::now();
        let all: Vec<_> = (0..64)
            .map(|_| {
                tokio::spawn(async {
                    sleep_until_precise(Instant::now() + Duration::from_millis(500)).await
                })
            })
            .collect();
        for h in all {
            h.await.unwrap();
        }
        assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    }
}
