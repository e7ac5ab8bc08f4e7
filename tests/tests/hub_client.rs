//! The hub client against `felhom-hubsim` over real TLS, and the cloudflared prober
//! against a stand-in of cloudflared's `/ready`: typed errors, and the token in none of
//! them.

mod hub_support;

use std::time::Duration;

use felhom_agent::config::Secret;
use felhom_agent::hub::client::{HubClient, HubClientError, HubEndpoint, TransportKind};
use felhom_agent::hub::cloudflared::{CloudflaredError, CloudflaredProber};
use felhom_agent::hub::report::{CloudflaredState, HostReport};
use felhom_testbed::hubsim::cloudflared::{CONNECTOR_ID, FakeCloudflared, ReadyMode};
use hub_support::*;
use serde_json::json;

fn client(hub: &HubSim, token: &str, timeout: Duration) -> HubClient {
    HubClient::new(&HubEndpoint {
        url: hub.url.clone(),
        token: Secret::new(token),
        ca_file: Some(hub.ca_file.clone()),
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
    let env = c.post_report(&HostReport::new("pve1")).await.unwrap();
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
        .post_report(&HostReport::new("pve1"))
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
        let e = c.post_report(&HostReport::new("pve1")).await.unwrap_err();
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
    c.post_report(&HostReport::new("pve1")).await.unwrap();
}

#[tokio::test]
async fn a_hub_with_a_certificate_we_do_not_trust_is_refused() {
    let hub = HubSim::start();
    let other = HubSim::start(); // its CA did not sign `hub`'s certificate
    let c = HubClient::new(&HubEndpoint {
        url: hub.url.clone(),
        token: Secret::new(hub.token.clone()),
        ca_file: Some(other.ca_file.clone()),
        timeout: Duration::from_secs(5),
    })
    .unwrap();
    let e = c.post_report(&HostReport::new("pve1")).await.unwrap_err();
    assert!(matches!(e, HubClientError::Transport(_)), "{e:?}");
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
        ca_file: Some(ca),
        timeout: Duration::from_secs(2),
    })
    .unwrap();
    let e = c.post_report(&HostReport::new("pve1")).await.unwrap_err();
    match &e {
        HubClientError::Transport(t) => assert_eq!(t.kind, TransportKind::Connect),
        other => panic!("{other:?}"),
    }
    assert!(!all_renderings(&e).contains("tok-SECRET-xyz"));
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
    assert!(t0.elapsed() < Duration::from_secs(3));

    // 200 is ready even when the body is not cloudflared's; the numbers are then unknown
    cf.set(ReadyMode::Garbage);
    let probe = p.probe().await;
    assert_eq!(probe.report.state, CloudflaredState::Ready);
    assert_eq!(probe.report.ready_connections, None);

    // nothing listening: down
    let url = cf.url();
    drop(cf);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let p = CloudflaredProber::new(&url, Duration::from_millis(500)).unwrap();
    assert_eq!(p.probe().await.report.state, CloudflaredState::Down);
}
