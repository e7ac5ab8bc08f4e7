//! Shared helpers: fixed test keys, payload building and envelope signing.
#![allow(dead_code)]

use ed25519_dalek::{Signer, SigningKey};
use felhom_authz::{AgentId, Context, Trust, encode_base64 as encode_b64, pae};
use serde_json::{Value, json};

pub const AGENT: &str = "0123456789abcdef0123456789abcdef";
pub const OTHER_AGENT: &str = "fedcba9876543210fedcba9876543210";
pub const NODE: &str = "pve1";
pub const NOW: u64 = 1_800_000_000;
pub const OP_ID: &str = "00112233445566778899aabbccddeeff";

pub fn key(n: u8) -> SigningKey {
    SigningKey::from_bytes(&[n; 32])
}

pub fn pub_b64(k: &SigningKey) -> String {
    encode_b64(k.verifying_key().as_bytes())
}

/// alice = key(1), bob = key(2); mallory = key(9) is never trusted.
pub fn trust(rev: u32, irr: u32) -> Trust {
    trust_with(&[("alice", key(1)), ("bob", key(2))], rev, irr)
}

pub fn trust_with(keys: &[(&str, SigningKey)], rev: u32, irr: u32) -> Trust {
    let keys: Vec<Value> = keys
        .iter()
        .map(|(n, k)| json!({"name": n, "ed25519": pub_b64(k)}))
        .collect();
    let doc = json!({"keys": keys, "threshold": {"reversible": rev, "irreversible": irr},
                     "max_validity_seconds": 3600, "clock_skew_seconds": 60});
    Trust::from_json(doc.to_string().as_bytes()).unwrap()
}

pub fn ctx() -> Context {
    Context {
        agent_id: AgentId::new(AGENT).unwrap(),
        node: NODE.into(),
        now: NOW,
        scratch_vmids: Some(900_000_000..=900_000_999),
    }
}

/// A valid `stop` of lxc 101, valid for 30 minutes around NOW.
pub fn stop_payload() -> Value {
    json!({"v": 1, "op_id": OP_ID, "agent_id": AGENT, "node": NODE,
           "not_before": NOW - 600, "not_after": NOW + 1200, "op": "stop",
           "target": {"type": "lxc", "vmid": 101}, "params": {"timeout_seconds": 30},
           "expect": null, "grant": "reversible", "reason": "maintenance"})
}

pub fn sig(k: &SigningKey, ty: &str, body: &[u8]) -> String {
    encode_b64(&k.sign(&pae(ty, body)).to_bytes())
}

/// An envelope over `body` with one signature per (keyid, key).
pub fn envelope_bytes(ty: &str, body: &[u8], signers: &[(&str, &SigningKey)]) -> Vec<u8> {
    let sigs: Vec<Value> = signers
        .iter()
        .map(|(id, k)| json!({"keyid": id, "sig": sig(k, ty, body)}))
        .collect();
    json!({"payloadType": ty, "payload": encode_b64(body), "signatures": sigs})
        .to_string()
        .into_bytes()
}

pub const OP: &str = felhom_authz::OP_PAYLOAD_TYPE;
pub const DESIRED: &str = felhom_authz::DESIRED_PAYLOAD_TYPE;

pub fn op_env(payload: &Value, signers: &[(&str, &SigningKey)]) -> Vec<u8> {
    envelope_bytes(OP, payload.to_string().as_bytes(), signers)
}
