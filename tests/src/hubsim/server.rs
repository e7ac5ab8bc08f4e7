//! HTTPS serving for [`super::HubSim`] on the test bed's shared plumbing: a fresh CA and
//! loopback certificate from [`crate::tls::TestPki`], requests served by
//! [`crate::http::serve`]. Hanging and slow answers are the handler's future taking its
//! time; a dropped connection is [`crate::http::Reply::Drop`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

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
            let reply = HubSim::handle(&self, request.method.as_str(), &path, auth, &request.body);
            let reply = match reply {
                Reply::WaitOps { generation, wait } => long_poll(&self, generation, wait).await,
                other => other,
            };
            match reply {
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
                // long_poll never answers with another wait.
                Reply::WaitOps { .. } => {
                    http::Reply::Respond(http::simple_response(500, None, Bytes::new()))
                }
            }
        })
    }
}

/// Waits for a delivery to become pending (woken by the simulator's watch channel, no
/// polling) until `wait` passed, then answers with what is pending then.
async fn long_poll(sim: &HubSim, mut generation: u64, wait: Duration) -> Reply {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        sim.wait_for_ops(generation, left).await;
        let passed = tokio::time::Instant::now() >= deadline;
        match sim.ops_after_wait(passed) {
            Ok(reply) => return reply,
            // Woken, but what became pending was resulted meanwhile: wait on.
            Err(g) => generation = g,
        }
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

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use serde_json::{Value, json};

    use super::*;
    use crate::harness::build_client;
    use crate::hubsim::ops::OPS_PATH;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn long_poll_over_https_wakes_on_enqueue_and_times_out_empty() {
        let dir = tempfile::tempdir().unwrap();
        let sim = Arc::new(HubSim::new("tok".into(), "adm".into(), json!({})));
        let l = serve(sim.clone(), "127.0.0.1:0".parse().unwrap(), dir.path())
            .await
            .unwrap();
        let ca = std::fs::read_to_string(&l.ca_file).unwrap();
        let client = build_client(&ca).unwrap();
        let base = format!("https://{}", l.addr);

        // Nothing pending, wait=1: an empty answer once the second passed.
        let t = Instant::now();
        let r = client
            .get(format!("{base}{OPS_PATH}?wait=1"))
            .bearer_auth("tok")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.json::<Value>().await.unwrap(), json!({"ops": []}));
        let took = t.elapsed();
        assert!(took >= Duration::from_millis(900), "{took:?}");
        assert!(took < Duration::from_secs(10), "{took:?}");

        // A poll that may wait 60 s, and an enqueue from another task once it waits.
        let poll = {
            let (client, base) = (client.clone(), base.clone());
            tokio::spawn(async move {
                let r = client
                    .get(format!("{base}{OPS_PATH}?wait=60"))
                    .bearer_auth("tok")
                    .send()
                    .await
                    .unwrap();
                (r.status(), r.json::<Value>().await.unwrap(), Instant::now())
            })
        };
        // The poll waits on the watch channel: its receiver is the event to wait for.
        let waiting = Instant::now();
        while sim.ops_watch.receiver_count() == 0 {
            assert!(
                waiting.elapsed() < Duration::from_secs(30),
                "poll never waited"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!poll.is_finished());
        let enqueued = Instant::now();
        let r = client
            .post(format!("{base}/_sim/ops"))
            .bearer_auth("adm")
            .json(&json!({"envelope": {"payloadType": "t", "payload": "", "signatures": []}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let (status, body, answered) = poll.await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(body["ops"][0]["delivery_id"], "d-1");
        assert_eq!(body["ops"].as_array().unwrap().len(), 1);
        let latency = answered.duration_since(enqueued);
        assert!(latency < Duration::from_secs(10), "{latency:?}");
        // A wrong token never waits.
        let r = client
            .get(format!("{base}{OPS_PATH}?wait=60"))
            .bearer_auth("nope")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
        l.task.abort();
    }

    /// The control client, the factory's envelopes and the agent's own wire types over the
    /// real server: envelopes arrive byte exact, a result drops its delivery, a replay
    /// comes again, the desired document is served as set, and the switch gives 404.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn signed_envelopes_round_trip_through_the_control_client() {
        use crate::hubsim::control::{ControlCallError, OpsControl};
        use crate::hubsim::ops::{DESIRED_PATH, RESULT_PATH};
        use crate::signing::Fixture;
        use felhom_agent::ops::wire::{OpResult, OpsAnswer};

        let dir = tempfile::tempdir().unwrap();
        let sim = Arc::new(HubSim::new("tok".into(), "adm".into(), json!({})));
        let l = serve(sim, "127.0.0.1:0".parse().unwrap(), dir.path())
            .await
            .unwrap();
        let client = build_client(&std::fs::read_to_string(&l.ca_file).unwrap()).unwrap();
        let base = format!("https://{}", l.addr);
        let ctl = OpsControl::new(client.clone(), &base, "adm");
        let fx = Fixture::new("0123456789abcdef0123456789abcdef", "pve1", 101);
        let env = fx.stop().sign(&[&fx.alice]).text();
        let d1 = ctl.enqueue_text(&env).await.unwrap();
        assert_eq!(ctl.summary().await.unwrap()["pending"], 1);

        let get = |path: String| {
            client
                .get(format!("{base}{path}"))
                .bearer_auth("tok")
                .send()
        };
        let text = get(format!("{OPS_PATH}?wait=0"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let answer: OpsAnswer = serde_json::from_str(&text).unwrap();
        assert_eq!(answer.ops.len(), 1);
        assert_eq!(answer.ops[0].envelope.get(), env);
        assert_eq!(answer.ops[0].delivery_id().as_deref(), Some(d1.as_str()));

        let result: OpResult = serde_json::from_value(json!({
            "seq": 1, "kind": "op", "op_id": null, "generation": null,
            "payload_sha256": fx.stop().sha256_hex(), "delivery_id": d1, "state": "refused",
            "reason": "bad_signature", "message": "test", "signers": [], "upids": [],
            "result": {}, "started_at": null, "finished_at": null
        }))
        .unwrap();
        let r = client
            .post(format!("{base}{RESULT_PATH}"))
            .bearer_auth("tok")
            .json(&result)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let list = ctl
            .wait_results(Duration::from_secs(10), |l| l.len() == 1)
            .await
            .unwrap();
        assert_eq!(list[0]["result"]["delivery_id"], d1.as_str());
        let text = get(format!("{OPS_PATH}?wait=0"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(text, r#"{"ops":[]}"#);

        let replay = ctl
            .misbehave(json!({"action": "replay", "delivery_id": d1}))
            .await
            .unwrap();
        let text = get(format!("{OPS_PATH}?wait=0"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let answer: OpsAnswer = serde_json::from_str(&text).unwrap();
        assert_eq!(answer.ops[0].envelope.get(), env);
        assert_eq!(
            answer.ops[0].delivery_id(),
            replay["delivery_id"].as_str().map(String::from)
        );
        assert!(matches!(
            ctl.misbehave(json!({"action": "replay", "delivery_id": "none"}))
                .await,
            Err(ControlCallError::Status { status: 404, .. })
        ));

        let desired = format!("{}\n", fx.desired(5).sign(&[&fx.bob]).text());
        ctl.set_desired_text(&desired, 5).await.unwrap();
        let r = get(DESIRED_PATH.to_string()).await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), desired);
        ctl.clear_desired().await.unwrap();
        assert_eq!(get(DESIRED_PATH.to_string()).await.unwrap().status(), 404);

        ctl.set_channel(false).await.unwrap();
        assert_eq!(
            get(format!("{OPS_PATH}?wait=0")).await.unwrap().status(),
            404
        );
        ctl.clear().await.unwrap();
        assert_eq!(ctl.deliveries().await.unwrap()["deliveries"], json!([]));
        l.task.abort();
    }
}
