//! HubDesired over a real journal (SQLite in a temp state_dir) and real Ed25519 envelopes.

use ed25519_dalek::{Signer, SigningKey};
use felhom_authz::{AgentId, DESIRED_PAYLOAD_TYPE, OP_PAYLOAD_TYPE, encode_base64, pae};
use serde_json::{Value, json};

use super::*;

const AGENT: &str = "0123456789abcdef0123456789abcdef";
const OTHER_AGENT: &str = "fedcba9876543210fedcba9876543210";
const NODE: &str = "pve1";

fn key(n: u8) -> SigningKey {
    SigningKey::from_bytes(&[n; 32])
}

/// signers.json with the named keys, reversible threshold 1.
fn trust(keys: &[(&str, &SigningKey)]) -> Trust {
    let keys: Vec<Value> = keys
        .iter()
        .map(|(n, k)| json!({"name": n, "ed25519": encode_base64(k.verifying_key().as_bytes())}))
        .collect();
    let irr = keys.len().max(1);
    let doc = json!({"keys": keys, "threshold": {"reversible": 1, "irreversible": irr}});
    Trust::from_json(doc.to_string().as_bytes()).unwrap()
}

fn ctx() -> Context {
    Context {
        agent_id: AgentId::new(AGENT).unwrap(),
        node: NODE.into(),
        now: 1_800_000_000,
        scratch_vmids: None,
    }
}

fn payload(generation: u64, guests: Value) -> Value {
    json!({"v": 1, "agent_id": AGENT, "node": NODE, "generation": generation, "guests": guests})
}

fn sign(ty: &str, body: &[u8], signers: &[(&str, &SigningKey)]) -> Vec<u8> {
    let sigs: Vec<Value> = signers
        .iter()
        .map(|(id, k)| json!({"keyid": id, "sig": encode_base64(&k.sign(&pae(ty, body)).to_bytes())}))
        .collect();
    json!({"payloadType": ty, "payload": encode_base64(body), "signatures": sigs})
        .to_string()
        .into_bytes()
}

fn envelope(p: &Value, signer: &SigningKey) -> Vec<u8> {
    sign(
        DESIRED_PAYLOAD_TYPE,
        p.to_string().as_bytes(),
        &[("alice", signer)],
    )
}

fn guests(power: &str) -> Value {
    json!([{"vmid": 101, "power": power, "config": {"memory": 2048}}])
}

fn sha_of(p: &Value) -> String {
    hex::encode(payload_sha256(p.to_string().as_bytes()))
}

struct Bed {
    _dir: tempfile::TempDir,
    journal: Arc<Journal>,
    hub: HubDesired,
}

fn bed() -> Bed {
    let dir = tempfile::tempdir().unwrap();
    let journal = Arc::new(Journal::open(dir.path()).unwrap());
    let hub = HubDesired::open(journal.clone());
    Bed {
        _dir: dir,
        journal,
        hub,
    }
}

/// What the engine would get from its next poll.
fn polled(hub: &HubDesired) -> Option<Result<Arc<DesiredState>, String>> {
    hub.poll().map(|r| r.map_err(|e| e.to_string()))
}

fn hub_record(j: &Journal) -> Option<DesiredRecord> {
    j.desired_record(DesiredSourceKind::Hub).unwrap()
}

#[test]
fn with_nothing_kept_the_engine_gets_the_empty_state() {
    let b = bed();
    let s = polled(&b.hub).unwrap().unwrap();
    assert!(s.guests.is_empty());
    assert!(b.hub.poll().is_none());
    assert_eq!(b.hub.applied_generation(), None);
    assert_eq!(
        b.hub.reverify(Some(&trust(&[("alice", &key(1))])), &ctx()),
        None
    );
    assert!(b.hub.poll().is_none(), "nothing changed");
}

#[test]
fn a_higher_generation_is_verified_recorded_and_handed_to_the_engine() {
    let alice = key(1);
    let t = trust(&[("alice", &alice)]);
    let b = bed();
    let _ = b.hub.poll();
    let p = payload(3, guests("running"));
    let raw = envelope(&p, &alice);
    let d = b.hub.offer(&raw, Some(&t), &ctx());
    assert_eq!(d.state, DecisionState::Applied, "{d:?}");
    assert_eq!(
        (d.reason, d.generation, d.unchanged),
        (None, Some(3), false)
    );
    assert_eq!(d.payload_sha256.as_deref(), Some(sha_of(&p).as_str()));
    assert_eq!(d.signers, ["alice"]);
    // The engine gets it, parsed by the desired file's parser.
    let s = polled(&b.hub).unwrap().unwrap();
    assert_eq!(s.generation, 3);
    assert_eq!(s.guests[0].vmid.get(), 101);
    assert_eq!(
        s.guests[0].power,
        Some(crate::reconcile::desired::Power::Running)
    );
    assert!(b.hub.poll().is_none());
    assert_eq!(b.hub.applied_generation(), Some(3));
    // The whole envelope is kept with its generation and digest.
    let rec = hub_record(&b.journal).unwrap();
    assert_eq!(rec.generation, 3);
    assert_eq!(rec.sha256, sha_of(&p));
    assert_eq!(rec.envelope.as_deref().map(str::as_bytes), Some(&raw[..]));

    // The result for the hub.
    let r = d.to_result(17);
    assert_eq!(r.seq, 17);
    assert_eq!(r.kind, ResultKind::Desired);
    assert_eq!((&r.op_id, &r.delivery_id), (&None, &None));
    assert_eq!(r.generation, Some(3));
    assert_eq!(r.state, DecisionState::Applied);
    assert!(r.started_at.is_some() && r.finished_at.is_some());
    let v = serde_json::to_value(&r).unwrap();
    assert_eq!(v["kind"], "desired");
    assert_eq!(v["state"], "applied");
    assert_eq!(v["op_id"], Value::Null);

    // A higher one replaces it.
    let p4 = payload(4, guests("stopped"));
    let d = b.hub.offer(&envelope(&p4, &alice), Some(&t), &ctx());
    assert_eq!((d.state, d.generation), (DecisionState::Applied, Some(4)));
    assert_eq!(polled(&b.hub).unwrap().unwrap().generation, 4);
    assert_eq!(hub_record(&b.journal).unwrap().sha256, sha_of(&p4));
}

#[test]
fn equal_same_changes_nothing_equal_different_and_lower_are_rollbacks() {
    let alice = key(1);
    let t = trust(&[("alice", &alice)]);
    let b = bed();
    let _ = b.hub.poll();
    let p5 = payload(5, guests("running"));
    assert_eq!(
        b.hub.offer(&envelope(&p5, &alice), Some(&t), &ctx()).state,
        DecisionState::Applied
    );
    let _ = b.hub.poll();
    let rec = hub_record(&b.journal).unwrap();

    // The same document again: nothing changes, no result needed.
    let d = b.hub.offer(&envelope(&p5, &alice), Some(&t), &ctx());
    assert_eq!(
        (d.state, d.unchanged),
        (DecisionState::Applied, true),
        "{d:?}"
    );
    assert!(b.hub.poll().is_none(), "the engine sees no change");

    // Same generation, other payload: rollback.
    let other = payload(5, guests("stopped"));
    let d = b.hub.offer(&envelope(&other, &alice), Some(&t), &ctx());
    assert_eq!(
        (d.state, d.reason),
        (DecisionState::Refused, Some(ROLLBACK))
    );
    assert_eq!(d.generation, Some(5));
    assert_eq!(d.payload_sha256.as_deref(), Some(sha_of(&other).as_str()));
    assert!(d.message.contains("different payload"), "{}", d.message);

    // Lower: rollback, naming both generations.
    let d = b.hub.offer(
        &envelope(&payload(4, guests("stopped")), &alice),
        Some(&t),
        &ctx(),
    );
    assert_eq!(
        (d.state, d.reason),
        (DecisionState::Refused, Some(ROLLBACK))
    );
    assert_eq!(d.message, "generation 4 is below the applied 5");
    assert!(!d.unchanged);
    assert_eq!(d.to_result(1).reason.as_deref(), Some("rollback"));

    // Nothing moved: the engine still follows generation 5, the record is untouched.
    assert!(b.hub.poll().is_none());
    assert_eq!(b.hub.applied_generation(), Some(5));
    assert_eq!(hub_record(&b.journal).unwrap(), rec);
}

#[test]
fn unverifiable_documents_are_refused_with_their_reason_and_change_nothing() {
    let alice = key(1);
    let mallory = key(9);
    let t = trust(&[("alice", &alice)]);
    let b = bed();
    let _ = b.hub.poll();
    let p = payload(2, guests("running"));

    // Operations off (no signers file).
    let d = b.hub.offer(&envelope(&p, &alice), None, &ctx());
    assert_eq!(
        (d.state, d.reason),
        (DecisionState::Refused, Some(OPS_DISABLED))
    );
    assert_eq!(d.payload_sha256.as_deref(), Some(sha_of(&p).as_str()));
    assert_eq!(d.generation, None, "not verified: generation unknown");

    // Signed by an untrusted key.
    let d = b.hub.offer(&envelope(&p, &mallory), Some(&t), &ctx());
    assert_eq!(d.reason, Some("bad_signature"), "{d:?}");
    assert_eq!(d.payload_sha256.as_deref(), Some(sha_of(&p).as_str()));
    assert!(d.signers.is_empty());

    // For another agent.
    let mut other = p.clone();
    other["agent_id"] = json!(OTHER_AGENT);
    let d = b.hub.offer(&envelope(&other, &alice), Some(&t), &ctx());
    assert_eq!(d.reason, Some("wrong_agent"), "{d:?}");

    // An operation envelope offered as a desired state.
    let d = b.hub.offer(
        &sign(
            OP_PAYLOAD_TYPE,
            p.to_string().as_bytes(),
            &[("alice", &alice)],
        ),
        Some(&t),
        &ctx(),
    );
    assert_eq!(d.reason, Some("wrong_type"), "{d:?}");

    // Not an envelope at all: no payload digest.
    let d = b.hub.offer(b"{\"payload\":", Some(&t), &ctx());
    assert_eq!(d.reason, Some("bad_envelope"), "{d:?}");
    assert_eq!(d.payload_sha256, None);

    // A guests list the desired-file parser refuses (an unknown key): bad_payload, with
    // the parser's message.
    let bad = payload(2, json!([{"vmid": 101, "config": {"rootfs": "local:8"}}]));
    let d = b.hub.offer(&envelope(&bad, &alice), Some(&t), &ctx());
    assert_eq!(d.reason, Some(BAD_PAYLOAD), "{d:?}");
    assert_eq!(BAD_PAYLOAD, Reason::BadPayload.as_str());
    assert!(d.message.contains("rootfs"), "{}", d.message);
    assert_eq!(d.generation, Some(2));
    assert_eq!(d.signers, ["alice"]);
    let d = b.hub.offer(
        &envelope(&payload(2, json!([{"vmid": 101, "colour": "red"}])), &alice),
        Some(&t),
        &ctx(),
    );
    assert_eq!(d.reason, Some(BAD_PAYLOAD), "{d:?}");
    assert!(d.message.contains("colour"), "{}", d.message);

    // None of them was recorded or handed to the engine.
    assert_eq!(hub_record(&b.journal), None);
    assert!(b.hub.poll().is_none());
    assert_eq!(b.hub.applied_generation(), None);
}

#[test]
fn a_restart_follows_the_kept_document_until_its_key_is_removed() {
    let alice = key(1);
    let bob = key(2);
    let both = trust(&[("alice", &alice), ("bob", &bob)]);
    let dir = tempfile::tempdir().unwrap();
    let p = payload(7, guests("running"));
    {
        let journal = Arc::new(Journal::open(dir.path()).unwrap());
        let hub = HubDesired::open(journal);
        let d = hub.offer(&envelope(&p, &alice), Some(&both), &ctx());
        assert_eq!(d.state, DecisionState::Applied);
    }

    // Restart: the kept document is not handed out before it verified again.
    let journal = Arc::new(Journal::open(dir.path()).unwrap());
    let hub = HubDesired::open(journal.clone());
    assert!(hub.poll().is_none(), "unverified: the engine gets nothing");
    assert_eq!(hub.applied_generation(), None);
    assert_eq!(hub.kept_generation(), Some(7));
    assert!(hub.describe().contains("not verified"));
    // Verified against the same trust: reconcile follows it without the hub.
    assert_eq!(hub.reverify(Some(&both), &ctx()), None);
    let s = polled(&hub).unwrap().unwrap();
    assert_eq!((s.generation, s.guests.len()), (7, 1));
    assert_eq!(hub.applied_generation(), Some(7));
    assert_eq!(hub.describe(), "hub");
    // A reload with the same trust changes nothing.
    assert_eq!(hub.reverify(Some(&both), &ctx()), None);
    assert!(hub.poll().is_none());

    // alice's key removed from signers.json: the document stops, and why is shown.
    let bob_only = trust(&[("bob", &bob)]);
    let d = hub
        .reverify(Some(&bob_only), &ctx())
        .expect("a refusal to report");
    assert_eq!(
        (d.state, d.reason),
        (DecisionState::Refused, Some("bad_signature"))
    );
    assert_eq!(d.generation, Some(7));
    assert_eq!(d.payload_sha256.as_deref(), Some(sha_of(&p).as_str()));
    let e = polled(&hub).unwrap().unwrap_err();
    assert!(
        e.contains("generation 7 no longer verifies: bad_signature"),
        "{e}"
    );
    assert_eq!(hub.applied_generation(), None);
    // The rollback floor stays: an older document is still refused.
    let older = hub.offer(
        &sign(
            DESIRED_PAYLOAD_TYPE,
            payload(6, guests("stopped")).to_string().as_bytes(),
            &[("bob", &bob)],
        ),
        Some(&bob_only),
        &ctx(),
    );
    assert_eq!(older.reason, Some(ROLLBACK));
    // Operations switched off: refused ops_disabled.
    let d = hub.reverify(None, &ctx()).unwrap();
    assert_eq!(d.reason, Some(OPS_DISABLED));

    // The same document re-signed by a trusted key is taken back (same generation, same
    // payload: not a rollback) and kept with its new signatures.
    let resigned = sign(
        DESIRED_PAYLOAD_TYPE,
        p.to_string().as_bytes(),
        &[("bob", &bob)],
    );
    let d = hub.offer(&resigned, Some(&bob_only), &ctx());
    assert_eq!(
        (d.state, d.unchanged),
        (DecisionState::Applied, false),
        "{d:?}"
    );
    assert_eq!(polled(&hub).unwrap().unwrap().generation, 7);
    assert_eq!(
        hub_record(&journal)
            .unwrap()
            .envelope
            .as_deref()
            .map(str::as_bytes),
        Some(&resigned[..])
    );
    // The key brought back does not matter any more; removing bob now would stop it.
    assert_eq!(hub.reverify(Some(&bob_only), &ctx()), None);
    let d = hub
        .reverify(Some(&trust(&[("alice", &alice)])), &ctx())
        .unwrap();
    assert_eq!(d.reason, Some("bad_signature"));
}

#[test]
fn a_kept_document_for_another_agent_stops_at_reverify() {
    let alice = key(1);
    let t = trust(&[("alice", &alice)]);
    let b = bed();
    let d = b.hub.offer(
        &envelope(&payload(1, guests("running")), &alice),
        Some(&t),
        &ctx(),
    );
    assert_eq!(d.state, DecisionState::Applied);
    let moved = Context {
        agent_id: AgentId::new(OTHER_AGENT).unwrap(),
        ..ctx()
    };
    let d = b.hub.reverify(Some(&t), &moved).unwrap();
    assert_eq!(d.reason, Some("wrong_agent"));
    assert_eq!(b.hub.applied_generation(), None);
}

mod engine {
    //! The engine follows the hub's document through `source_for` / `spawn_with_source`,
    //! on the in-memory node.

    use std::time::Duration;

    use tokio::sync::watch;

    use super::*;
    use crate::config::{Config, DesiredSource, ProxmoxConfig, Secret, TlsVerify};
    use crate::reconcile::engine::{Engine, EngineDeps, EngineSettings, Gate, source_for};
    use crate::reconcile::fakenode::{FakeGuest, FakeNode};
    use crate::reconcile::normalize::GuestKind;

    fn config(state_dir: &std::path::Path, source: DesiredSource) -> Config {
        let mut c = Config::for_tests(
            NODE,
            state_dir.to_path_buf(),
            ProxmoxConfig {
                url: "https://127.0.0.1:8006".into(),
                token_id: "felhom@pve!agent".into(),
                token_secret: Secret::new("unused"),
                tls: TlsVerify::Insecure,
            },
        );
        c.reconcile.desired_source = source;
        c
    }

    async fn wait_until(mut f: impl FnMut() -> bool) -> bool {
        // Generous: the engine polls its provider every 5 ms here.
        for _ in 0..6000 {
            if f() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        f()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reconcile_follows_the_signed_document_and_stops_when_it_no_longer_verifies() {
        let alice = key(1);
        let t = trust(&[("alice", &alice)]);
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), DesiredSource::Hub);
        let journal = Arc::new(Journal::open(dir.path()).unwrap());
        let source = source_for(&cfg, &journal);
        let hub = source.hub.clone().expect("the hub source");
        let node = Arc::new(FakeNode::new(
            vec![(101, FakeGuest::new(GuestKind::Lxc, "stopped"))],
            Duration::from_millis(1),
        ));
        let (_gate, gate_rx) = watch::channel(Gate::Open);
        let h = Engine::spawn_with_source(
            EngineDeps {
                pve: node.clone(),
                journal: journal.clone(),
                provider: source.provider.clone(),
                gate: gate_rx,
                settings: EngineSettings {
                    poll_interval: Duration::from_millis(5),
                    resync_interval: Duration::from_millis(50),
                    ..EngineSettings::default()
                },
            },
            source.hub,
        );
        assert!(h.hub_desired().is_some_and(|x| Arc::ptr_eq(&x, &hub)));
        assert_eq!(h.desired_source(), "hub");

        let d = hub.offer(
            &envelope(&payload(3, guests("running")), &alice),
            Some(&t),
            &ctx(),
        );
        assert_eq!(d.state, DecisionState::Applied);
        h.kick();
        assert!(
            wait_until(|| node.guest_state(101).status == "running"
                && h.status().applied_generation == Some(3))
            .await,
            "{:?}",
            h.status()
        );
        assert_eq!(h.status().desired_error, None);

        // alice's key removed: the engine has no usable desired state and says why; a
        // guest stopped by hand is left alone.
        let bob = key(2);
        assert!(
            hub.reverify(Some(&trust(&[("bob", &bob)])), &ctx())
                .is_some()
        );
        assert!(
            wait_until(|| h.status().desired_error.is_some()).await,
            "{:?}",
            h.status()
        );
        let e = h.status().desired_error.unwrap();
        assert!(e.contains("no longer verifies: bad_signature"), "{e}");
        node.with_guest(101, |g| g.status = "stopped".into());
        let calls = node.calls().len();
        let target = h.status().cycles + 5;
        assert!(wait_until(|| h.status().cycles >= target).await);
        assert_eq!(
            node.calls().len(),
            calls,
            "nothing is sent without a verified document"
        );
        assert_eq!(node.guest_state(101).status, "stopped");

        // Another source by reload: the hub's provider is no longer reachable.
        let file_cfg = config(dir.path(), DesiredSource::File);
        h.set_source(source_for(&file_cfg, &journal));
        assert!(h.hub_desired().is_none());
        assert_eq!(h.desired_source(), "empty");
        h.shutdown(Duration::from_secs(1)).await;
    }
}
