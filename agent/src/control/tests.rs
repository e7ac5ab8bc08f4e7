use std::os::unix::fs::MetadataExt;

use tokio::sync::watch;

use super::*;
use crate::reconcile::desired::{DesiredProvider, FileProvider};
use crate::reconcile::engine::{Engine, EngineDeps, EngineSettings, Gate};
use crate::reconcile::fakenode::{FakeGuest, FakeNode};
use crate::reconcile::journal::Journal;
use crate::reconcile::normalize::GuestKind;

#[test]
fn state_lock_is_exclusive_and_names_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let first = StateLock::acquire(dir.path()).unwrap();
    let err = StateLock::acquire(dir.path()).unwrap_err();
    match &err {
        ControlError::Locked { holder, .. } => {
            assert_eq!(
                holder.as_deref(),
                Some(std::process::id().to_string().as_str())
            )
        }
        other => panic!("{other:?}"),
    }
    assert!(
        err.to_string()
            .contains("in use by another felhom-agent process")
    );
    drop(first);
    let _again = StateLock::acquire(dir.path()).expect("released on drop");
}

async fn daemon(dir: &Path) -> (Arc<EngineHandle>, Arc<FakeNode>) {
    let desired = dir.join("desired.json");
    std::fs::write(
        &desired,
        br#"{"generation": 2, "guests": [{"vmid": 101, "power": "running", "config": {"memory": 1024}}]}"#,
    )
    .unwrap();
    let n = Arc::new(FakeNode::new(
        vec![(101, FakeGuest::new(GuestKind::Lxc, "stopped"))],
        Duration::from_millis(2),
    ));
    let (_tx, rx) = watch::channel(Gate::Blocked);
    std::mem::forget(_tx); // keep the gate closed for the whole test
    let provider: Arc<dyn DesiredProvider> = Arc::new(FileProvider::new(&desired));
    let engine = Engine::spawn(EngineDeps {
        pve: n.clone(),
        journal: Arc::new(Journal::open(dir).unwrap()),
        provider,
        gate: rx,
        settings: EngineSettings {
            poll_interval: Duration::from_millis(5),
            ..EngineSettings::default()
        },
    });
    (Arc::new(engine), n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_requests_reach_the_daemon_over_a_real_socket() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    assert!(matches!(
        request(&sock, &Request::Status).await,
        Err(ControlError::NotRunning { .. })
    ));
    // A stale socket file from a crashed daemon is replaced (the lock proves it is stale).
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(matches!(
        request(&sock, &Request::Status).await,
        Err(ControlError::NotRunning { .. })
    ));
    let lock = StateLock::acquire(dir.path()).unwrap();
    let (engine, node) = daemon(dir.path()).await;
    std::fs::write(dir.path().join(ENVELOPE_FILE), br#"{"blocked":true}"#).unwrap();
    let server = ControlServer::start(
        &sock,
        &lock,
        Arc::new(DaemonHandler {
            engine: engine.clone(),
            state_dir: dir.path().to_path_buf(),
            envelope: None,
            mutations: None,
            signed_ops: None,
            restore: Default::default(),
        }),
    )
    .unwrap();
    assert_eq!(std::fs::metadata(&sock).unwrap().mode() & 0o777, 0o660);

    // wait for the first cycle (the status below is the one it leaves)
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while engine.status().cycles == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no engine cycle in 30 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let status = request(&sock, &Request::Status).await.unwrap();
    assert_eq!(status["daemon"], "running");
    assert_eq!(status["reconcile"]["blocked"], true);
    assert_eq!(status["reconcile"]["desired_generation"], 2);
    assert_eq!(status["last_envelope"]["blocked"], true);

    let plan = request(&sock, &Request::Plan).await.unwrap();
    let ops: Vec<&str> = plan["actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["op"]["op"].as_str().unwrap())
        .collect();
    assert_eq!(ops, vec!["set_config", "start"]);
    assert!(
        node.calls().is_empty(),
        "plan does not mutate (and the gate is closed)"
    );

    let shown = request(&sock, &Request::JournalShow { limit: 10 })
        .await
        .unwrap();
    assert_eq!(shown["entries"].as_array().unwrap().len(), 0);
    assert_eq!(shown["safe_mode"], Value::Null);
    let verified = request(&sock, &Request::JournalVerify).await.unwrap();
    assert_eq!(verified["entries"], 0);

    // Garbage and oversized requests get a clear error, not a hang or a crash.
    let mut s = UnixStream::connect(&sock).await.unwrap();
    s.write_all(b"{\"cmd\":\"format_disk\"}\n").await.unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).await.unwrap();
    let reply: Reply = serde_json::from_str(answer.trim()).unwrap();
    assert!(
        matches!(
            reply,
            Reply::Error {
                kind: ErrorKind::Usage,
                ..
            }
        ),
        "{reply:?}"
    );
    let mut s = UnixStream::connect(&sock).await.unwrap();
    let big = vec![b'x'; MAX_MESSAGE + 10];
    let _ = s.write_all(&big).await;
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer).await;
    assert!(
        answer.is_empty(),
        "an oversized request is dropped unanswered"
    );

    drop(server);
    assert!(!sock.exists(), "socket removed when the server stops");
    engine.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_non_socket_file_is_never_removed() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("agent.sock");
    std::fs::write(&sock, b"precious").unwrap();
    let lock = StateLock::acquire(dir.path()).unwrap();
    struct Nothing;
    impl Handler for Nothing {
        fn handle(&self, _req: Request, _peer: Peer) -> BoxFut<'_, Reply> {
            Box::pin(async { ok(1) })
        }
    }
    let err = ControlServer::start(&sock, &lock, Arc::new(Nothing)).unwrap_err();
    assert!(err.to_string().contains("not a socket"), "{err}");
    assert_eq!(std::fs::read(&sock).unwrap(), b"precious");
}

#[test]
fn only_root_and_the_agents_user_may_undo_or_release() {
    let daemon = 65534;
    assert!(
        Peer { uid: Some(0) }
            .may_change_undo(daemon)
            .unwrap()
            .starts_with("local:")
    );
    assert!(Peer { uid: Some(daemon) }.may_change_undo(daemon).is_ok());
    let e = Peer { uid: Some(1234) }
        .may_change_undo(daemon)
        .unwrap_err();
    assert!(e.contains("uid 65534") && e.contains("uid 1234"), "{e}");
    assert!(Peer { uid: None }.may_change_undo(daemon).is_err());
    // a uid without a name is recorded by number
    assert_eq!(
        Peer {
            uid: Some(4_000_000_000)
        }
        .may_change_undo(4_000_000_000)
        .unwrap(),
        "local:uid 4000000000"
    );
}

#[test]
fn undo_and_release_requests_carry_a_valid_op_id_only() {
    let good = r#"{"cmd":"ops_undo","op_id":"0123456789abcdef0123456789abcdef","wait_seconds":5}"#;
    let req: Request = serde_json::from_str(good).unwrap();
    assert!(req.is_mutation());
    for bad in [
        r#"{"cmd":"ops_undo","op_id":"0123456789ABCDEF0123456789ABCDEF","wait_seconds":5}"#,
        r#"{"cmd":"ops_release","op_id":"../../etc","wait_seconds":5}"#,
        r#"{"cmd":"ops_release","op_id":"0123456789abcdef0123456789abcdef"}"#,
    ] {
        assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
    }
}
