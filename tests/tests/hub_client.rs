//! The hub client against `felhom-hubsim` over real TLS, and the cloudflared prober
//! against a stand-in of cloudflared's `/ready`: typed errors, and the token in none of
//! them.

mod hub_support;

use std::time::Duration;

use std::sync::Arc;

use felhom_agent::config::{HubTls, Secret};
use felhom_agent::hub::client::{HubClient, HubClientError, HubEndpoint, TransportKind};
use felhom_agent::hub::cloudflared::{CloudflaredError, CloudflaredProber};
use felhom_agent::hub::report::{CloudflaredState, HostReport};
use felhom_agent::tls::TlsProblem;
use felhom_testbed::hubsim::cloudflared::{CONNECTOR_ID, FakeCloudflared, ReadyMode};
use felhom_testbed::tls::{Flaw, SelfSignedCaServer, TestPki};
use hub_support::*;
use serde_json::json;

fn client(hub: &HubSim, token: &str, timeout: Duration) -> HubClient {
    HubClient::new(&HubEndpoint {
        url: hub.url.clone(),
        token: Secret::new(token),
        tls: HubTls::CaFile(hub.ca_file.clone()),
        timeout,
    })
    .unwrap()
}

/// Every way the error can be shown.
fn all_renderings(e: &HubClientError) -> String {
    format!("{e} | {e:?} | {e:#?}")
}

#[tokio::test]
async fn a_report_is_answered_by_the_envelope() {
    let hub = HubSim::start();
    hub.set_envelope(json!({"poll_interval_seconds": 120, "blocked": true, "desired_generation": 4, "extra": {"a": 1}}))
        .await;
    let c = client(&hub, &hub.token, Duration::from_secs(5));
    let env = c
        .post_report(&HostReport::new(&test_agent_id(), "pve1"))
        .await
        .unwrap();
    assert_eq!(env.poll_interval_seconds, Some(120));
    assert!(env.blocked);
    assert_eq!(env.desired_generation, 4);
    assert!(!env.has_signed_ops);
    let got = hub.accepted().await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["node"], "pve1");
}

#[tokio::test]
async fn errors_are_typed_and_never_show_the_token() {
    let hub = HubSim::start();
    // wrong token: 401 with the hub's message; neither token appears anywhere
    let wrong = "wrong-token-SECRET-abcdef";
    let e = client(&hub, wrong, Duration::from_secs(5))
        .post_report(&HostReport::new(&test_agent_id(), "pve1"))
        .await
        .unwrap_err();
    match &e {
        HubClientError::Http(h) => {
            assert_eq!(h.status, 401);
            assert!(h.message.contains("bearer token"), "{}", h.message);
        }
        other => panic!("{other:?}"),
    }
    assert!(!all_renderings(&e).contains(wrong));

    let c = client(&hub, &hub.token, Duration::from_secs(2));
    let cases = [
        (
            json!({"kind": "status", "status": 500, "times": 1}),
            "http 500",
        ),
        (
            json!({"kind": "status", "status": 503, "times": 1}),
            "http 503",
        ),
        (json!({"kind": "garbage", "times": 1}), "envelope"),
        (json!({"kind": "drop_connection", "times": 1}), "transport"),
        (json!({"kind": "hang", "times": 1}), "timeout"),
    ];
    for (fault, want) in cases {
        hub.add_fault(fault).await;
        let e = c
            .post_report(&HostReport::new(&test_agent_id(), "pve1"))
            .await
            .unwrap_err();
        match (&e, want) {
            (HubClientError::Http(h), "http 500") => assert_eq!(h.status, 500),
            (HubClientError::Http(h), "http 503") => assert_eq!(h.status, 503),
            (HubClientError::Envelope(_), "envelope") => {}
            (HubClientError::Transport(t), "transport") => {
                assert_ne!(t.kind, TransportKind::Timeout, "{t}")
            }
            (HubClientError::Transport(t), "timeout") => assert_eq!(t.kind, TransportKind::Timeout),
            (other, _) => panic!("{want}: got {other:?}"),
        }
        assert!(!all_renderings(&e).contains(&hub.token), "token in {e:?}");
    }
    // and after all that, it works
    c.post_report(&HostReport::new(&test_agent_id(), "pve1"))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_hub_with_a_certificate_we_do_not_trust_is_refused() {
    let hub = HubSim::start();
    let other = HubSim::start(); // its CA did not sign `hub`'s certificate
    let c = HubClient::new(&HubEndpoint {
        url: hub.url.clone(),
        token: Secret::new(hub.token.clone()),
        tls: HubTls::CaFile(other.ca_file.clone()),
        timeout: Duration::from_secs(5),
    })
    .unwrap();
    let e = c
        .post_report(&HostReport::new(&test_agent_id(), "pve1"))
        .await
        .unwrap_err();
    // Both simulators' CAs share a name: an issuer is found, its signature does not match.
    assert!(
        matches!(&e, HubClientError::Tls(f) if f.problem == TlsProblem::BadSignature),
        "{e:?}"
    );
    assert!(e.to_string().contains("hub.ca_file"), "{e}");
    assert!(!all_renderings(&e).contains(&hub.token));
    assert!(
        hub.reports().await.is_empty(),
        "nothing may reach an untrusted hub"
    );
}

#[tokio::test]
async fn an_unreachable_hub_is_a_connect_error() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    {
        let hub = HubSim::start(); // only for a CA file; stopped before the request
        std::fs::copy(&hub.ca_file, &ca).unwrap();
    }
    let c = HubClient::new(&HubEndpoint {
        url: format!("https://127.0.0.1:{}", dead_port()),
        token: Secret::new("tok-SECRET-xyz"),
        tls: HubTls::CaFile(ca),
        timeout: Duration::from_secs(2),
    })
    .unwrap();
    let e = c
        .post_report(&HostReport::new(&test_agent_id(), "pve1"))
        .await
        .unwrap_err();
    match &e {
        HubClientError::Transport(t) => assert_eq!(t.kind, TransportKind::Connect),
        other => panic!("{other:?}"),
    }
    let msg = e.to_string();
    assert!(
        msg.contains("connection refused") && msg.contains("hub.url"),
        "{msg}"
    );
    assert!(!msg.contains("TLS"), "{msg}");
    assert!(!all_renderings(&e).contains("tok-SECRET-xyz"));
}

/// The simulator's handler in this process, behind `tls` on loopback: for certificates
/// the simulator binary does not serve.
async fn hub_behind(tls: Arc<rustls::ServerConfig>) -> (String, String) {
    let token = "hub-token-for-tls-tests".to_string();
    let sim = Arc::new(felhom_testbed::hubsim::HubSim::new(
        token.clone(),
        "admin-token-for-tls-tests".into(),
        json!({"poll_interval_seconds": 77}),
    ));
    let listener = felhom_testbed::http::bind_loopback("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    tokio::spawn(felhom_testbed::http::serve(
        listener,
        tls,
        sim,
        felhom_testbed::http::ServeOptions::default(),
    ));
    (url, token)
}

fn hub_client(url: &str, token: &str, tls: HubTls) -> HubClient {
    HubClient::new(&HubEndpoint {
        url: url.to_owned(),
        token: Secret::new(token),
        tls,
        timeout: Duration::from_secs(10),
    })
    .unwrap()
}

fn pin_bytes(pin: &str) -> [u8; 32] {
    hex::decode(pin.replace(':', ""))
        .unwrap()
        .try_into()
        .unwrap()
}

/// The hub's TLS failure; panics on anything else.
fn tls_failure(e: &HubClientError) -> TlsProblem {
    match e {
        HubClientError::Tls(f) => f.problem.clone(),
        other => panic!("not a TLS failure: {other:?}"),
    }
}

#[tokio::test]
async fn a_hub_serving_its_self_signed_ca_certificate_is_explained_and_works_pinned() {
    // What `openssl req -x509` makes, served as the hub's certificate.
    let cert = SelfSignedCaServer::generate("hub", &["127.0.0.1", "localhost"]).unwrap();
    let (url, token) = hub_behind(cert.server_config().unwrap()).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = cert.write_pem(dir.path(), "hub.pem").unwrap();

    // Given as the CA file, it is refused, and the message says why and what to do.
    let e = hub_client(&url, &token, HubTls::CaFile(ca))
        .post_report(&HostReport::new(&test_agent_id(), "pve1"))
        .await
        .unwrap_err();
    assert_eq!(tls_failure(&e), TlsProblem::CaUsedAsEndEntity, "{e:?}");
    let msg = e.to_string();
    assert!(msg.contains("presented a CA certificate"), "{msg}");
    assert!(
        msg.contains("leaf") && msg.contains("signed by that CA"),
        "{msg}"
    );
    assert!(msg.contains("hub.tls.pin_sha256"), "{msg}");
    assert!(!msg.contains("OtherError"), "{msg}");
    assert!(!all_renderings(&e).contains(&token));

    // Pinned, the same hub is accepted.
    let env = hub_client(
        &url,
        &token,
        HubTls::PinSha256(pin_bytes(&cert.pin_sha256())),
    )
    .post_report(&HostReport::new(&test_agent_id(), "pve1"))
    .await
    .unwrap();
    assert_eq!(env.poll_interval_seconds, Some(77));

    // A wrong pin is refused, showing the pin the hub presented to compare.
    let wrong = [0x5au8; 32];
    let e = hub_client(&url, &token, HubTls::PinSha256(wrong))
        .post_report(&HostReport::new(&test_agent_id(), "pve1"))
        .await
        .unwrap_err();
    let TlsProblem::PinMismatch { expected, seen } = tls_failure(&e) else {
        panic!("{e:?}")
    };
    assert_eq!(seen, cert.pin_sha256());
    assert_eq!(expected, ["5A"; 32].join(":"));
    let msg = e.to_string();
    assert!(msg.contains(&seen) && msg.contains(&expected), "{msg}");
    assert!(
        msg.contains("hub.tls.pin_sha256") && msg.contains("openssl x509"),
        "{msg}"
    );
    assert!(!all_renderings(&e).contains(&token));
}

#[tokio::test]
async fn each_certificate_problem_of_the_hub_is_named_with_its_fix() {
    let dir = tempfile::tempdir().unwrap();
    let refused = |names: &'static [&'static str], flaw: Option<Flaw>| {
        let dir = dir.path().to_path_buf();
        async move {
            let pki = TestPki::generate_flawed("Hub CA", "hub", names, flaw).unwrap();
            let (url, token) = hub_behind(pki.server_config().unwrap()).await;
            let ca = pki
                .write_ca_pem(&dir, &format!("ca-{}.pem", fastrand::u32(..)))
                .unwrap();
            let e = hub_client(&url, &token, HubTls::CaFile(ca))
                .post_report(&HostReport::new(&test_agent_id(), "pve1"))
                .await
                .unwrap_err();
            assert!(!all_renderings(&e).contains(&token));
            (tls_failure(&e), e.to_string())
        }
    };
    let (p, msg) = refused(&["127.0.0.1"], Some(Flaw::Expired)).await;
    assert!(matches!(p, TlsProblem::Expired { .. }), "{p:?}");
    assert!(
        msg.contains("has expired") && msg.contains("renew"),
        "{msg}"
    );

    let (p, msg) = refused(&["127.0.0.1"], Some(Flaw::NotYetValid)).await;
    assert!(matches!(p, TlsProblem::NotYetValid { .. }), "{p:?}");
    assert!(
        msg.contains("not valid yet") && msg.contains("clock"),
        "{msg}"
    );

    let (p, msg) = refused(&["127.0.0.1"], Some(Flaw::ClientOnly)).await;
    assert_eq!(p, TlsProblem::NotForServers);
    assert!(msg.contains("serverAuth"), "{msg}");

    let (p, msg) = refused(&["hub.example"], None).await;
    assert_eq!(
        p,
        TlsProblem::NameMismatch {
            expected: "127.0.0.1".into(),
            presented: vec!["hub.example".into()]
        }
    );
    assert!(
        msg.contains("hub.url") && msg.contains("subject alternative name"),
        "{msg}"
    );

    // Signed by a CA the agent was not given.
    let pki = TestPki::generate("Hub CA", "hub", &["127.0.0.1"]).unwrap();
    let stranger = TestPki::generate("Stranger CA", "x", &["127.0.0.1"]).unwrap();
    let (url, token) = hub_behind(pki.server_config().unwrap()).await;
    let ca = stranger.write_ca_pem(dir.path(), "stranger.pem").unwrap();
    let e = hub_client(&url, &token, HubTls::CaFile(ca))
        .post_report(&HostReport::new(&test_agent_id(), "pve1"))
        .await
        .unwrap_err();
    assert_eq!(tls_failure(&e), TlsProblem::UnknownIssuer);
    let msg = e.to_string();
    assert!(msg.contains("not signed by a CA the agent trusts"), "{msg}");
    assert!(
        msg.contains("hub.ca_file") && msg.contains("hub.tls.pin_sha256"),
        "{msg}"
    );
}

#[tokio::test]
async fn a_hub_refusing_the_handshake_is_a_tls_failure_not_unreachable() {
    // A TCP peer that answers the ClientHello with a fatal handshake_failure alert.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut tcp, _)) = listener.accept().await {
            let mut buf = [0u8; 512];
            let _ = tcp.read(&mut buf).await;
            let _ = tcp
                .write_all(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28])
                .await;
            let _ = tcp.shutdown().await;
        }
    });
    let e = hub_client(
        &format!("https://127.0.0.1:{port}"),
        "tok",
        HubTls::PinSha256([1; 32]),
    )
    .post_report(&HostReport::new(&test_agent_id(), "pve1"))
    .await
    .unwrap_err();
    assert!(
        matches!(tls_failure(&e), TlsProblem::Handshake { .. }),
        "{e:?}"
    );
    assert!(e.to_string().contains("TLS 1.2 and 1.3"), "{e}");
}

#[tokio::test]
async fn cloudflared_states_follow_the_ready_endpoint() {
    let cf = FakeCloudflared::start(ReadyMode::Ready { connections: 4 })
        .await
        .unwrap();
    let p = CloudflaredProber::new(&cf.url(), Duration::from_millis(500)).unwrap();

    let probe = p.probe().await;
    assert_eq!(probe.report.state, CloudflaredState::Ready);
    assert_eq!(probe.report.ready_connections, Some(4));
    assert_eq!(probe.report.connector_id.as_deref(), Some(CONNECTOR_ID));
    assert_eq!(probe.error, None);

    cf.set(ReadyMode::NotReady);
    let probe = p.probe().await;
    assert_eq!(probe.report.state, CloudflaredState::NotReady);
    assert_eq!(probe.report.ready_connections, Some(0));
    assert_eq!(probe.error, None);

    cf.set(ReadyMode::Status(404));
    let probe = p.probe().await;
    assert_eq!(probe.report.state, CloudflaredState::Unknown);
    assert!(matches!(
        probe.error,
        Some(CloudflaredError::Status { status: 404, .. })
    ));

    cf.set(ReadyMode::Hang);
    let t0 = std::time::Instant::now();
    let probe = p.probe().await;
    assert_eq!(probe.report.state, CloudflaredState::Unknown);
    assert!(
        matches!(probe.error, Some(CloudflaredError::Timeout { .. })),
        "{:?}",
        probe.error
    );
    // The stand-in never answers: returning at all proves the deadline; the bound is
    // loose so a loaded machine cannot fail it.
    assert!(t0.elapsed() < Duration::from_secs(30));

    // 200 is ready even when the body is not cloudflared's; the numbers are then unknown
    cf.set(ReadyMode::Garbage);
    let probe = p.probe().await;
    assert_eq!(probe.report.state, CloudflaredState::Ready);
    assert_eq!(probe.report.ready_connections, None);

    // nothing listening: down
    drop(cf);
    let url = format!("http://127.0.0.1:{}", dead_port());
    let p = CloudflaredProber::new(&url, Duration::from_millis(500)).unwrap();
    assert_eq!(p.probe().await.report.state, CloudflaredState::Down);
}

// ---------------------------------------------------------------------------------------
// The signed-operations channel: long poll, desired state, results.

mod ops_channel {
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use bytes::Bytes;
    use felhom_agent::config::{HubTls, Secret};
    use felhom_agent::hub::client::{
        AnswerError, HubClient, HubClientError, HubEndpoint, LONG_POLL_GRACE,
        MAX_DESIRED_READ_BYTES, MAX_OPS_ANSWER_BYTES, TransportKind,
    };
    use felhom_agent::ops::wire::{DecisionState, OpResult, ResultKind};
    use felhom_agent::timestamp::Timestamp;
    use felhom_testbed::http::{self, Handler, Reply, ReplyFuture, Request};
    use felhom_testbed::tls::TestPki;
    use serde_json::json;
    use tokio::sync::watch;

    use super::all_renderings;

    /// What an endpoint answers when a test scripts it.
    #[derive(Debug, Clone)]
    enum Answer {
        Status(u16, Vec<u8>),
        /// Never answers (the connection stays open).
        Hang,
    }

    /// One request as the hub saw it.
    #[derive(Debug, Clone)]
    struct Seen {
        method: String,
        path: String,
        query: Option<String>,
        authorization: Option<String>,
        content_type: Option<String>,
        body: Bytes,
    }

    struct State {
        /// Replaces the long poll's normal behaviour when set.
        ops_override: Option<Answer>,
        /// The pending deliveries as the raw answer body; `None`: nothing pending.
        pending: Option<Vec<u8>>,
        desired: Answer,
        result: Answer,
        seen: Vec<Seen>,
    }

    /// A hub's signed-operations endpoints, in this process behind real TLS on loopback:
    /// it checks the bearer token (a wrong one is answered 401 with the presented header
    /// echoed, as a careless hub might), holds the long poll up to `wait` seconds and
    /// answers it at once when deliveries are pending, and records every request.
    struct OpsHub {
        token: String,
        state: Mutex<State>,
        /// Bumped when `pending` changes: wakes held long polls.
        pending_changed: watch::Sender<u64>,
        /// The number of requests received so far.
        arrived: watch::Sender<usize>,
    }

    impl Handler for OpsHub {
        fn handle(self: Arc<Self>, request: Request) -> ReplyFuture {
            Box::pin(async move { self.answer(request).await })
        }
    }

    fn reply(status: u16, body: Vec<u8>) -> Reply {
        let mut resp = http::simple_response(status, None, Bytes::from(body));
        http::set_header(&mut resp, "content-type", "application/json");
        Reply::Respond(resp)
    }

    async fn scripted(answer: Answer) -> Reply {
        match answer {
            Answer::Status(status, body) => reply(status, body),
            Answer::Hang => std::future::pending().await,
        }
    }

    impl OpsHub {
        async fn answer(&self, request: Request) -> Reply {
            let header = |name: &str| {
                request
                    .headers
                    .get(name)
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            };
            let authorization = header("authorization");
            self.state.lock().unwrap().seen.push(Seen {
                method: request.method.to_string(),
                path: request.path.clone(),
                query: request.query.clone(),
                authorization: authorization.clone(),
                content_type: header("content-type"),
                body: request.body.clone(),
            });
            self.arrived.send_modify(|n| *n += 1);
            if authorization.as_deref() != Some(&format!("Bearer {}", self.token)) {
                let msg = format!("bad bearer token: {}", authorization.unwrap_or_default());
                return reply(401, serde_json::to_vec(&json!({ "message": msg })).unwrap());
            }
            match (request.method.as_str(), request.path.as_str()) {
                ("GET", "/api/agent/v1/ops") => self.long_poll(request.query.as_deref()).await,
                ("GET", "/api/agent/v1/desired") => {
                    let a = self.state.lock().unwrap().desired.clone();
                    scripted(a).await
                }
                ("POST", "/api/agent/v1/ops/result") => {
                    let a = self.state.lock().unwrap().result.clone();
                    scripted(a).await
                }
                _ => reply(404, br#"{"message":"no such endpoint"}"#.to_vec()),
            }
        }

        async fn long_poll(&self, query: Option<&str>) -> Reply {
            let wait = query
                .and_then(|q| q.strip_prefix("wait="))
                .and_then(|w| w.parse::<u64>().ok());
            let Some(wait) = wait else {
                return reply(400, br#"{"message":"wait=<seconds> is required"}"#.to_vec());
            };
            let mut changed = self.pending_changed.subscribe();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(wait);
            loop {
                changed.borrow_and_update();
                let (over, pending) = {
                    let s = self.state.lock().unwrap();
                    (s.ops_override.clone(), s.pending.clone())
                };
                if let Some(a) = over {
                    return scripted(a).await;
                }
                if let Some(body) = pending {
                    return reply(200, body);
                }
                tokio::select! {
                    _ = tokio::time::sleep_until(deadline) => {
                        return reply(200, br#"{"ops": []}"#.to_vec());
                    }
                    _ = changed.changed() => {}
                }
            }
        }
    }

    /// A running [`OpsHub`] and what a client needs to reach it.
    struct Hub {
        sim: Arc<OpsHub>,
        url: String,
        _dir: tempfile::TempDir,
        ca_file: std::path::PathBuf,
    }

    const TOKEN: &str = "ops-hub-token-SECRET-4f1c";

    impl Hub {
        async fn start() -> Hub {
            let pki = TestPki::generate("Hub CA", "hub", &["127.0.0.1"]).unwrap();
            let dir = tempfile::tempdir().unwrap();
            let ca_file = pki.write_ca_pem(dir.path(), "ca.pem").unwrap();
            let sim = Arc::new(OpsHub {
                token: TOKEN.into(),
                state: Mutex::new(State {
                    ops_override: None,
                    pending: None,
                    desired: Answer::Status(404, br#"{"message":"no desired state"}"#.to_vec()),
                    result: Answer::Status(204, Vec::new()),
                    seen: Vec::new(),
                }),
                pending_changed: watch::channel(0).0,
                arrived: watch::channel(0).0,
            });
            let listener = http::bind_loopback("127.0.0.1:0".parse().unwrap())
                .await
                .unwrap();
            let url = format!("https://{}", listener.local_addr().unwrap());
            let options = http::ServeOptions {
                max_body_bytes: 8 * 1024 * 1024,
                ..Default::default()
            };
            tokio::spawn(http::serve(
                listener,
                pki.server_config().unwrap(),
                sim.clone(),
                options,
            ));
            Hub {
                sim,
                url,
                _dir: dir,
                ca_file,
            }
        }

        /// A client with `token` and the usual deadline `timeout`.
        fn client(&self, token: &str, timeout: Duration) -> HubClient {
            HubClient::new(&HubEndpoint {
                url: self.url.clone(),
                token: Secret::new(token),
                tls: HubTls::CaFile(self.ca_file.clone()),
                timeout,
            })
            .unwrap()
        }

        fn with<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
            f(&mut self.sim.state.lock().unwrap())
        }

        fn set_pending(&self, body: Option<&[u8]>) {
            self.with(|s| s.pending = body.map(<[u8]>::to_vec));
            self.sim.pending_changed.send_modify(|n| *n += 1);
        }

        fn seen(&self) -> Vec<Seen> {
            self.with(|s| s.seen.clone())
        }

        /// Waits until the hub has received `n` requests in all.
        async fn wait_arrived(&self, n: usize) {
            let mut rx = self.sim.arrived.subscribe();
            tokio::time::timeout(Duration::from_secs(60), rx.wait_for(|&got| got >= n))
                .await
                .expect("the request never reached the hub")
                .unwrap();
        }
    }

    /// Two envelopes written the way a hub in another language might: odd spacing, key
    /// order, escapes, a newline. Verification needs these exact bytes.
    const ENVELOPE_1: &str = r#"{ "signatures" :[ {"sig":"c2ln+/==","keyid":"alice"} ],
        "payloadType":"application/vnd.felhom.op+json",   "payload":"eyJ2IjoxfQ"}"#;
    const ENVELOPE_2: &str = r#"{"payload":"e30=","payloadType":"application\/vnd.felhom.op+json","signatures":[],"x":"\u00e9"}"#;

    fn two_deliveries() -> String {
        format!(
            "{{\"ops\": [\n  {{\"delivery_id\": \"d-1\", \"envelope\": {ENVELOPE_1}}},\n  {{\"envelope\":{ENVELOPE_2} , \"delivery_id\": 7}}\n]}}"
        )
    }

    #[tokio::test]
    async fn the_long_poll_hands_over_each_envelope_byte_for_byte() {
        let hub = Hub::start().await;
        hub.set_pending(Some(two_deliveries().as_bytes()));
        let c = hub.client(TOKEN, Duration::from_secs(5));
        let answer = c
            .fetch_ops(Duration::from_secs(25))
            .await
            .unwrap()
            .expect("the hub has the channel");
        assert_eq!(answer.ops.len(), 2);
        assert_eq!(answer.ops[0].envelope.get(), ENVELOPE_1);
        assert_eq!(answer.ops[0].delivery_id().as_deref(), Some("d-1"));
        assert_eq!(answer.ops[1].envelope.get(), ENVELOPE_2);
        // a delivery id that is not a string is kept as bookkeeping only: no id
        assert_eq!(answer.ops[1].delivery_id(), None);

        let seen = hub.seen();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].method, "GET");
        assert_eq!(seen[0].path, "/api/agent/v1/ops");
        assert_eq!(seen[0].query.as_deref(), Some("wait=25"));
        assert_eq!(
            seen[0].authorization.as_deref(),
            Some(format!("Bearer {TOKEN}").as_str())
        );
        assert!(seen[0].body.is_empty());
    }

    #[tokio::test]
    async fn a_long_poll_outlives_the_clients_usual_deadline() {
        let hub = Hub::start().await;
        // The usual deadline is 1 s; the hub holds the poll for its whole `wait` of 2 s.
        let c = hub.client(TOKEN, Duration::from_secs(1));
        let t0 = Instant::now();
        let answer = c.fetch_ops(Duration::from_secs(2)).await.unwrap().unwrap();
        assert!(answer.ops.is_empty());
        // a lower bound only: the hub's own sleep guarantees it
        assert!(t0.elapsed() >= Duration::from_secs(2), "{:?}", t0.elapsed());

        // Held again: a delivery queued while the poll is outstanding is answered at once.
        let poll = tokio::spawn({
            let c = hub.client(TOKEN, Duration::from_secs(1));
            async move { c.fetch_ops(Duration::from_secs(25)).await }
        });
        hub.wait_arrived(2).await;
        hub.set_pending(Some(two_deliveries().as_bytes()));
        let answer = poll.await.unwrap().unwrap().unwrap();
        assert_eq!(answer.ops.len(), 2);
        assert_eq!(answer.ops[0].envelope.get(), ENVELOPE_1);
    }

    #[tokio::test]
    async fn a_long_poll_that_never_ends_times_out_after_wait_and_the_grace() {
        let hub = Hub::start().await;
        hub.with(|s| s.ops_override = Some(Answer::Hang));
        let c = hub.client(TOKEN, Duration::from_secs(1));
        let t0 = Instant::now();
        let e = c.fetch_ops(Duration::from_secs(1)).await.unwrap_err();
        match &e {
            HubClientError::Transport(t) => assert_eq!(t.kind, TransportKind::Timeout, "{t}"),
            other => panic!("{other:?}"),
        }
        let took = t0.elapsed();
        // it waited for `wait` + the grace, not the usual deadline, and did end
        assert!(
            took >= Duration::from_secs(1) + LONG_POLL_GRACE,
            "gave up after {took:?}"
        );
        assert!(took < Duration::from_secs(120), "{took:?}");
        let msg = e.to_string();
        assert!(
            msg.contains("GET") && msg.contains("/api/agent/v1/ops?wait=1"),
            "{msg}"
        );
        assert!(!all_renderings(&e).contains(TOKEN));
    }

    #[tokio::test]
    async fn a_hub_without_the_channel_answers_none() {
        let hub = Hub::start().await;
        hub.with(|s| {
            s.ops_override = Some(Answer::Status(404, b"not here".to_vec()));
        });
        let c = hub.client(TOKEN, Duration::from_secs(5));
        assert!(
            c.fetch_ops(Duration::from_secs(25))
                .await
                .unwrap()
                .is_none()
        );
        // the desired state: none held
        assert_eq!(c.fetch_desired().await.unwrap(), None);
        let seen = hub.seen();
        assert_eq!(seen[1].method, "GET");
        assert_eq!(seen[1].path, "/api/agent/v1/desired");
        assert_eq!(seen[1].query, None);
        assert_eq!(
            seen[1].authorization.as_deref(),
            Some(format!("Bearer {TOKEN}").as_str())
        );
    }

    #[tokio::test]
    async fn channel_errors_are_typed_and_never_show_the_token() {
        let hub = Hub::start().await;
        hub.set_pending(Some(two_deliveries().as_bytes()));
        hub.with(|s| s.desired = Answer::Status(200, b"{}".to_vec()));

        // A wrong token: 401, and the hub's echo of it is redacted.
        let wrong = "wrong-token-SECRET-0b7e";
        let bad = hub.client(wrong, Duration::from_secs(5));
        let errors = [
            bad.fetch_ops(Duration::from_secs(25)).await.unwrap_err(),
            bad.fetch_desired().await.unwrap_err(),
            bad.post_result(&result()).await.unwrap_err(),
        ];
        for e in &errors {
            match e {
                HubClientError::Http(h) => {
                    assert_eq!(h.status, 401);
                    assert!(h.message.contains("bad bearer token"), "{}", h.message);
                    assert!(h.message.contains("<redacted>"), "{}", h.message);
                }
                other => panic!("{other:?}"),
            }
            assert!(!all_renderings(e).contains(wrong), "{e:?}");
        }

        // Bodies that are not `{"ops": [...]}`: typed, not a panic, not a partial parse.
        let c = hub.client(TOKEN, Duration::from_secs(5));
        let token_echo = format!(r#"{{"ops": "{TOKEN}"}}"#);
        for body in [
            "<html>502 Bad Gateway</html>",
            "",
            "[]",
            r#"{"ops": {}}"#,
            r#"{"ops": [{"delivery_id": "d-1"}]}"#,
            r#"{"ops": [{"delivery_id": "d-1", "envelope": {"payload": "x"}}"#,
            token_echo.as_str(),
        ] {
            hub.set_pending(Some(body.as_bytes()));
            let e = c.fetch_ops(Duration::from_secs(25)).await.unwrap_err();
            match &e {
                HubClientError::Answer(AnswerError::Malformed { request, .. }) => {
                    assert!(request.starts_with("GET https://"), "{request}");
                }
                other => panic!("{body:?}: {other:?}"),
            }
            assert!(!all_renderings(&e).contains(TOKEN), "{body:?}: {e:?}");
        }

        // Other statuses are HTTP errors.
        hub.with(|s| s.ops_override = Some(Answer::Status(503, b"busy".to_vec())));
        match c.fetch_ops(Duration::from_secs(25)).await.unwrap_err() {
            HubClientError::Http(h) => assert_eq!((h.status, h.message.as_str()), (503, "busy")),
            other => panic!("{other:?}"),
        }
        hub.with(|s| s.desired = Answer::Status(500, b"{\"error\":\"db down\"}".to_vec()));
        match c.fetch_desired().await.unwrap_err() {
            HubClientError::Http(h) => {
                assert_eq!((h.status, h.message.as_str()), (500, "db down"))
            }
            other => panic!("{other:?}"),
        }
        // A redirect is not followed (it could carry the token elsewhere).
        hub.with(|s| s.ops_override = Some(Answer::Status(307, Vec::new())));
        match c.fetch_ops(Duration::from_secs(25)).await.unwrap_err() {
            HubClientError::Http(h) => assert_eq!(h.status, 307),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_long_poll_answer_over_the_cap_is_refused_whole() {
        let hub = Hub::start().await;
        let c = hub.client(TOKEN, Duration::from_secs(30));
        // Exactly at the cap (valid JSON padded with spaces): accepted.
        let head = format!("{{\"ops\": [{{\"delivery_id\": \"d-1\", \"envelope\": {ENVELOPE_1}}}");
        let mut at_cap = head.clone().into_bytes();
        at_cap.resize(MAX_OPS_ANSWER_BYTES - 2, b' ');
        at_cap.extend_from_slice(b"]}");
        assert_eq!(at_cap.len(), MAX_OPS_ANSWER_BYTES);
        hub.set_pending(Some(&at_cap));
        let answer = c.fetch_ops(Duration::from_secs(25)).await.unwrap().unwrap();
        assert_eq!(answer.ops[0].envelope.get(), ENVELOPE_1);

        // One byte more: an error, although its first MAX bytes parse.
        let mut over = at_cap.clone();
        over.insert(MAX_OPS_ANSWER_BYTES - 2, b' ');
        hub.set_pending(Some(&over));
        let e = c.fetch_ops(Duration::from_secs(25)).await.unwrap_err();
        assert!(
            matches!(&e, HubClientError::Answer(AnswerError::TooLarge { limit, .. }) if *limit == MAX_OPS_ANSWER_BYTES),
            "{e:?}"
        );
        assert!(e.to_string().contains("larger than 4194304 bytes"), "{e}");
    }

    #[tokio::test]
    async fn the_desired_state_is_handed_over_as_sent_up_to_one_byte_over_the_limit() {
        let hub = Hub::start().await;
        let c = hub.client(TOKEN, Duration::from_secs(5));
        let body = b" {\"payloadType\":\"application/vnd.felhom.desired+json\",\n\"payload\":\"e30\",\"signatures\":[]}\r\n".to_vec();
        hub.with(|s| s.desired = Answer::Status(200, body.clone()));
        assert_eq!(c.fetch_desired().await.unwrap(), Some(body));

        // Not parsed here: any bytes go to the verification as they are.
        hub.with(|s| s.desired = Answer::Status(200, b"\xff not json".to_vec()));
        assert_eq!(
            c.fetch_desired().await.unwrap().as_deref(),
            Some(&b"\xff not json"[..])
        );

        // Oversized: the first limit + 1 bytes, so the verification can refuse `too_large`.
        assert_eq!(MAX_DESIRED_READ_BYTES, 64 * 1024 + 1);
        let big: Vec<u8> = (0..200 * 1024).map(|i| (i % 251) as u8).collect();
        hub.with(|s| s.desired = Answer::Status(200, big.clone()));
        let got = c.fetch_desired().await.unwrap().unwrap();
        assert_eq!(got.len(), MAX_DESIRED_READ_BYTES);
        assert_eq!(got, big[..MAX_DESIRED_READ_BYTES]);

        // Exactly at the limit: all of it.
        let at = big[..MAX_DESIRED_READ_BYTES - 1].to_vec();
        hub.with(|s| s.desired = Answer::Status(200, at.clone()));
        assert_eq!(c.fetch_desired().await.unwrap(), Some(at));
    }

    fn result() -> OpResult {
        let mut extra = serde_json::Map::new();
        extra.insert(
            "volid".into(),
            json!("local:backup/vzdump-lxc-101-2026_12_06-17_00_00.tar.zst"),
        );
        OpResult {
            seq: 42,
            kind: ResultKind::Op,
            op_id: Some("0123456789abcdef0123456789abcdef".into()),
            generation: None,
            payload_sha256: Some("ab".repeat(32)),
            delivery_id: Some("d-1".into()),
            state: DecisionState::Applied,
            reason: None,
            message: Some("backup done: «ok»".into()),
            signers: vec!["alice".into(), "bob".into()],
            upids: vec!["UPID:pve1:0000ABCD:00000001:65000000:vzdump:101:root@pam:".into()],
            result: extra,
            started_at: Timestamp::from_unix(1_796_000_000),
            finished_at: Timestamp::from_unix(1_796_000_042),
        }
    }

    #[tokio::test]
    async fn a_result_is_posted_as_its_exact_json() {
        let hub = Hub::start().await;
        let c = hub.client(TOKEN, Duration::from_secs(5));
        let sent = result();
        c.post_result(&sent).await.unwrap();
        let refused = OpResult {
            seq: 43,
            kind: ResultKind::Desired,
            op_id: None,
            generation: Some(7),
            payload_sha256: None,
            delivery_id: None,
            state: DecisionState::Refused,
            reason: Some("rollback".into()),
            message: None,
            signers: vec![],
            upids: vec![],
            result: serde_json::Map::new(),
            started_at: None,
            finished_at: None,
        };
        c.post_result(&refused).await.unwrap();

        let seen = hub.seen();
        assert_eq!(seen.len(), 2);
        for (s, want) in seen.iter().zip([&sent, &refused]) {
            assert_eq!(s.method, "POST");
            assert_eq!(s.path, "/api/agent/v1/ops/result");
            assert_eq!(s.content_type.as_deref(), Some("application/json"));
            // the hub parses it back (unknown fields refused) and gets the same result
            let got: OpResult = serde_json::from_slice(&s.body).unwrap();
            assert_eq!(&got, want);
            let v: serde_json::Value = serde_json::from_slice(&s.body).unwrap();
            assert_eq!(v, serde_json::to_value(want).unwrap());
        }
        // every field present, nulls included
        let v: serde_json::Value = serde_json::from_slice(&seen[1].body).unwrap();
        assert_eq!(v["op_id"], serde_json::Value::Null);
        assert_eq!(v["kind"], "desired");
        assert_eq!(v["state"], "refused");
        assert_eq!(v.as_object().unwrap().len(), 14);

        // 500: not accepted, an HTTP error the caller retries on.
        hub.with(|s| {
            s.result = Answer::Status(500, br#"{"message":"result store unavailable"}"#.to_vec())
        });
        let e = c.post_result(&sent).await.unwrap_err();
        match &e {
            HubClientError::Http(h) => {
                assert_eq!(h.status, 500);
                assert_eq!(h.message, "result store unavailable");
            }
            other => panic!("{other:?}"),
        }
        assert!(!all_renderings(&e).contains(TOKEN));
        // any 2xx is accepted
        hub.with(|s| s.result = Answer::Status(200, br#"{"ok":true}"#.to_vec()));
        c.post_result(&sent).await.unwrap();
    }
}
