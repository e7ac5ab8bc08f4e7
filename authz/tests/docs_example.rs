//! docs/signed-ops.md's worked example, checked byte for byte: a hub implementer copies
//! these bytes, so they must be exactly what this crate produces and accepts.

use ed25519_dalek::{Signer, SigningKey};
use felhom_authz::{
    AgentId, Context, OP_PAYLOAD_TYPE, Trust, decode_base64, encode_base64, pae, payload_sha256,
    verify_op,
};

fn doc() -> String {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/signed-ops.md");
    std::fs::read_to_string(p).unwrap()
}

/// The fenced block right after `<!-- worked-example: NAME -->`, without its final newline.
fn block(doc: &str, name: &str) -> String {
    let marker = format!("<!-- worked-example: {name} -->\n");
    let at = doc
        .find(&marker)
        .unwrap_or_else(|| panic!("no {name} block"))
        + marker.len();
    let rest = &doc[at..];
    let open = rest.find('\n').unwrap() + 1;
    assert!(
        rest.starts_with("```"),
        "{name}: block must follow the marker"
    );
    let body = &rest[open..];
    let close = body.find("\n```").unwrap();
    body[..close].to_string()
}

#[test]
fn the_worked_example_is_exact() {
    let doc = doc();
    let seed: [u8; 32] = hex::decode(block(&doc, "seed"))
        .unwrap()
        .try_into()
        .unwrap();
    let key = SigningKey::from_bytes(&seed);

    // The PEM holds the same seed (PKCS#8 v1: the key is its last 32 bytes).
    let pem = block(&doc, "pem");
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = decode_base64(&b64).unwrap();
    assert_eq!(der.len(), 48);
    assert_eq!(der[der.len() - 32..], seed);

    let signers = block(&doc, "signers");
    let trust = Trust::from_json(signers.as_bytes()).unwrap();
    assert_eq!(
        trust.keys()[0].key.as_bytes(),
        key.verifying_key().as_bytes()
    );

    let payload = block(&doc, "payload");
    assert_eq!(payload.len(), 296);
    assert_eq!(
        block(&doc, "sha256"),
        hex::encode(payload_sha256(payload.as_bytes()))
    );
    let pae_bytes = pae(OP_PAYLOAD_TYPE, payload.as_bytes());
    assert_eq!(block(&doc, "pae").as_bytes(), pae_bytes.as_slice());
    let sig = encode_base64(&key.sign(&pae_bytes).to_bytes());
    assert_eq!(block(&doc, "signature"), sig);

    let env = block(&doc, "envelope");
    let v: serde_json::Value = serde_json::from_str(&env).unwrap();
    assert_eq!(v["payload"], encode_base64(payload.as_bytes()));
    assert_eq!(v["signatures"][0]["sig"], sig);
    let ctx = Context {
        agent_id: AgentId::new("0123456789abcdef0123456789abcdef").unwrap(),
        node: "pve1".into(),
        now: 1_767_225_600 + 30,
        scratch_vmids: None,
    };
    let op = verify_op(env.as_bytes(), &trust, &ctx).unwrap();
    assert_eq!(op.signers, ["alice"]);
    assert_eq!(op.op_id.as_str(), "5f0c6a1e9b3d4c2f8a7e6d5c4b3a2918");
    assert_eq!(op.reason, "kernel update");
}
