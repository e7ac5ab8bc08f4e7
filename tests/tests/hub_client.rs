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
