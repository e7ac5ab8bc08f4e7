//! The test bed's envelope factory for signed operations (issue 12): throw-away Ed25519
//! operator keys, `signers.json` files (and their hostile variants), operation and
//! desired-state payloads with every field settable (or raw, e.g. a float vmid), DSSE v1
//! envelopes signed by any subset of keys, and a catalogue of hostile envelopes with the
//! refusal each must get ([`Hostile`]).
//!
//! Owns: how the end-to-end tests make what a hub relays. Signing is DSSE over
//! [`felhom_authz::pae`]; verification is never reimplemented here (the unit tests check
//! what this module makes against [`felhom_authz::verify_op`] and `verify_desired`).
//! Must never: be used outside tests (its keys are throw-away and printed nowhere), write a
//! `signers.json` anywhere but where a test asks, or re-serialize a payload once built: the
//! payload bytes are what is signed and what the agent hashes.

use std::fmt;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use ed25519_dalek::{Signer as _, SigningKey};
use felhom_authz::{DESIRED_PAYLOAD_TYPE, OP_PAYLOAD_TYPE, encode_base64, pae};
use serde::Serialize;
use serde_json::{Value, json};

/// Why a file could not be written.
#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no randomness from the operating system for a key seed")]
    Random,
}

/// Now, in Unix seconds.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A fresh random `op_id` (32 lower-case hex).
pub fn random_op_id() -> String {
    format!("{:032x}", fastrand::u128(..))
}

/// A fresh random `agent_id` (32 lower-case hex).
pub fn random_agent_id() -> String {
    random_op_id()
}

/// A throw-away operator key with its `signers.json` name. `Debug` shows the name and the
/// public key only.
pub struct TestKey {
    name: String,
    key: SigningKey,
}

impl fmt::Debug for TestKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestKey")
            .field("name", &self.name)
            .field("public", &self.public_base64())
            .finish()
    }
}

impl TestKey {
    /// A key from a 32-byte seed (deterministic fixtures).
    pub fn from_seed(name: &str, seed: [u8; 32]) -> TestKey {
        TestKey {
            name: name.into(),
            key: SigningKey::from_bytes(&seed),
        }
    }

    /// A deterministic key whose seed is `n` repeated (`seeded("alice", 1)`).
    pub fn seeded(name: &str, n: u8) -> TestKey {
        TestKey::from_seed(name, [n; 32])
    }

    /// A key from the operating system's CSPRNG.
    pub fn generate(name: &str) -> Result<TestKey, SigningError> {
        use ring::rand::SecureRandom as _;
        let mut seed = [0u8; 32];
        ring::rand::SystemRandom::new()
            .fill(&mut seed)
            .map_err(|_| SigningError::Random)?;
        Ok(TestKey::from_seed(name, seed))
    }

    /// The same key under another name (the "one key under two names" variant).
    pub fn renamed(&self, name: &str) -> TestKey {
        TestKey::from_seed(name, self.key.to_bytes())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The raw 32-byte public key.
    pub fn public_bytes(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    /// base64 of the public key, as `signers.json` lists it.
    pub fn public_base64(&self) -> String {
        encode_base64(&self.public_bytes())
    }

    /// The 64-byte Ed25519 signature of `message`.
    pub fn sign_raw(&self, message: &[u8]) -> [u8; 64] {
        self.key.sign(message).to_bytes()
    }

    /// base64 of the signature over `PAE(payload_type, body)`.
    pub fn sign_pae(&self, payload_type: &str, body: &[u8]) -> String {
        encode_base64(&self.sign_raw(&pae(payload_type, body)))
    }
}

/// A `signers.json` as a test wants it, including the variants a careless or hostile
/// operator could write. Keys are kept as text so a broken key can be listed too.
#[derive(Debug, Clone)]
pub struct SignersFile {
    keys: Vec<(String, String)>,
    reversible: u32,
    irreversible: u32,
    max_validity_seconds: Option<u64>,
    clock_skew_seconds: Option<u64>,
}

impl SignersFile {
    /// These keys, `threshold.reversible` 1 and `threshold.irreversible` 2 (1 with one
    /// key); the limits left to their defaults (86400 s, 120 s).
    pub fn new(keys: &[&TestKey]) -> SignersFile {
        SignersFile {
            keys: keys
                .iter()
                .map(|k| (k.name.clone(), k.public_base64()))
                .collect(),
            reversible: 1,
            irreversible: keys.len().clamp(1, 2) as u32,
            max_validity_seconds: None,
            clock_skew_seconds: None,
        }
    }

    pub fn threshold(mut self, reversible: u32, irreversible: u32) -> SignersFile {
        self.reversible = reversible;
        self.irreversible = irreversible;
        self
    }

    pub fn max_validity_seconds(mut self, s: u64) -> SignersFile {
        self.max_validity_seconds = Some(s);
        self
    }

    pub fn clock_skew_seconds(mut self, s: u64) -> SignersFile {
        self.clock_skew_seconds = Some(s);
        self
    }

    /// Adds a key.
    pub fn with_key(mut self, key: &TestKey) -> SignersFile {
        self.keys.push((key.name.clone(), key.public_base64()));
        self
    }

    /// Lists `key`'s public key again under `name` (it still counts once).
    pub fn alias(mut self, name: &str, key: &TestKey) -> SignersFile {
        self.keys.push((name.into(), key.public_base64()));
        self
    }

    /// Lists `name` with arbitrary key text (not base64, wrong length, …).
    pub fn raw_key(mut self, name: &str, ed25519: &str) -> SignersFile {
        self.keys.push((name.into(), ed25519.into()));
        self
    }

    /// Removes every entry named `name` (a key withdrawn from the host's trust).
    pub fn without(mut self, name: &str) -> SignersFile {
        self.keys.retain(|(n, _)| n != name);
        self
    }

    /// The file's JSON text.
    pub fn to_json(&self) -> String {
        let keys: Vec<Value> = self
            .keys
            .iter()
            .map(|(name, k)| json!({"name": name, "ed25519": k}))
            .collect();
        let mut v = json!({
            "keys": keys,
            "threshold": {"reversible": self.reversible, "irreversible": self.irreversible},
        });
        if let Some(s) = self.max_validity_seconds {
            v["max_validity_seconds"] = json!(s);
        }
        if let Some(s) = self.clock_skew_seconds {
            v["clock_skew_seconds"] = json!(s);
        }
        serde_json::to_string_pretty(&v).unwrap_or_default()
    }

    /// The trust this file gives (what the agent would load).
    pub fn trust(&self) -> Result<felhom_authz::Trust, felhom_authz::TrustError> {
        felhom_authz::Trust::from_json(self.to_json().as_bytes())
    }

    /// Writes the file as the agent requires it: owned by root, mode 0644 (writable by
    /// nobody else). Replaced atomically (a temporary file in the same directory, renamed),
    /// so an agent re-reading it on SIGHUP never sees half of it. Needs root.
    pub fn write(&self, path: &Path) -> Result<(), SigningError> {
        self.write_owned(path, 0o644, 0, 0)
    }

    /// Writes the file with another mode and owner (the unsafe-file variants: group- or
    /// world-writable, owned by the agent's uid).
    pub fn write_owned(
        &self,
        path: &Path,
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Result<(), SigningError> {
        let fail = |source| SigningError::Write {
            path: path.to_path_buf(),
            source,
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(fail)?;
        tmp.write_all(self.to_json().as_bytes()).map_err(fail)?;
        tmp.as_file().sync_all().map_err(fail)?;
        std::os::unix::fs::chown(tmp.path(), Some(uid), Some(gid)).map_err(fail)?;
        // After chown: chown clears nothing we set, but set the mode last anyway.
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(mode))
            .map_err(fail)?;
        tmp.persist(path).map_err(|e| fail(e.error))?;
        Ok(())
    }
}

/// A payload as an ordered list of top-level fields, each kept as JSON text, so any field
/// can be set, replaced by raw text (a float vmid), removed or added (an unknown field).
/// [`Payload::raw`] makes a body that is not a JSON object at all.
#[derive(Debug, Clone)]
pub struct Payload {
    payload_type: String,
    fields: Vec<(String, String)>,
    raw: Option<Vec<u8>>,
}

fn to_json_text<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

impl Payload {
    /// An operation with every field of issue 12's table: `v` 1, a random `op_id`, valid
    /// from a minute ago for an hour, `target` null, `params` `{}`, `expect` null, `grant`
    /// `reversible`, `reason` "felhom test bed".
    pub fn op(agent_id: &str, node: &str, kind: &str) -> Payload {
        let now = now_unix();
        let mut p = Payload {
            payload_type: OP_PAYLOAD_TYPE.into(),
            fields: Vec::new(),
            raw: None,
        };
        p = p
            .set("v", 1)
            .set("op_id", random_op_id())
            .set("agent_id", agent_id)
            .set("node", node)
            .set("not_before", now.saturating_sub(60))
            .set("not_after", now + 3600)
            .set("op", kind)
            .set_raw("target", "null")
            .set("params", json!({}))
            .set_raw("expect", "null")
            .set("grant", "reversible")
            .set("reason", "felhom test bed");
        p
    }

    /// An operation on a guest (`target` `{"type", "vmid"}`).
    pub fn guest_op(
        agent_id: &str,
        node: &str,
        kind: &str,
        guest_type: &str,
        vmid: u32,
    ) -> Payload {
        Payload::op(agent_id, node, kind).target(guest_type, vmid)
    }

    /// A desired state: `{"v": 1, "agent_id", "node", "generation", "guests"}`.
    pub fn desired(agent_id: &str, node: &str, generation: u64, guests: Value) -> Payload {
        Payload {
            payload_type: DESIRED_PAYLOAD_TYPE.into(),
            fields: Vec::new(),
            raw: None,
        }
        .set("v", 1)
        .set("agent_id", agent_id)
        .set("node", node)
        .set("generation", generation)
        .set("guests", guests)
    }

    /// A body of arbitrary bytes (not necessarily JSON).
    pub fn raw(payload_type: &str, body: &[u8]) -> Payload {
        Payload {
            payload_type: payload_type.into(),
            fields: Vec::new(),
            raw: Some(body.to_vec()),
        }
    }

    /// Sets a field (replacing it in place, or appending a new, possibly unknown, one).
    pub fn set<T: Serialize>(self, name: &str, value: T) -> Payload {
        self.set_raw(name, &to_json_text(&value))
    }

    /// Sets a field to raw JSON text, e.g. `{"type":"lxc","vmid":101.0}`.
    pub fn set_raw(mut self, name: &str, json_text: &str) -> Payload {
        match self.fields.iter_mut().find(|(n, _)| n == name) {
            Some((_, v)) => *v = json_text.into(),
            None => self.fields.push((name.into(), json_text.into())),
        }
        self
    }

    /// Removes a field.
    pub fn remove(mut self, name: &str) -> Payload {
        self.fields.retain(|(n, _)| n != name);
        self
    }

    /// A field's JSON text.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn op_id(self, op_id: &str) -> Payload {
        self.set("op_id", op_id)
    }

    /// `not_before` and `not_after`.
    pub fn window(self, not_before: u64, not_after: u64) -> Payload {
        self.set("not_before", not_before)
            .set("not_after", not_after)
    }

    /// Valid from a minute ago for `seconds`.
    pub fn valid_for(self, seconds: u64) -> Payload {
        let nb = now_unix().saturating_sub(60);
        self.window(nb, nb + seconds)
    }

    pub fn target(self, guest_type: &str, vmid: u32) -> Payload {
        self.set("target", json!({"type": guest_type, "vmid": vmid}))
    }

    pub fn params(self, params: Value) -> Payload {
        self.set("params", params)
    }

    /// `expect: {"config_digest": D}`.
    pub fn expect_digest(self, digest: &str) -> Payload {
        self.set("expect", json!({"config_digest": digest}))
    }

    pub fn grant(self, grant: &str) -> Payload {
        self.set("grant", grant)
    }

    pub fn reason(self, reason: &str) -> Payload {
        self.set("reason", reason)
    }

    pub fn generation(self, generation: u64) -> Payload {
        self.set("generation", generation)
    }

    pub fn payload_type(&self) -> &str {
        &self.payload_type
    }

    /// The payload bytes exactly as they are signed: `{"name":value,…}` in field order.
    pub fn body(&self) -> Vec<u8> {
        if let Some(raw) = &self.raw {
            return raw.clone();
        }
        let inner: Vec<String> = self
            .fields
            .iter()
            .map(|(n, v)| format!("{}:{v}", to_json_text(n)))
            .collect();
        format!("{{{}}}", inner.join(",")).into_bytes()
    }

    /// Hex SHA-256 of the body (the results' `payload_sha256`).
    pub fn sha256_hex(&self) -> String {
        hex::encode(felhom_authz::payload_sha256(&self.body()))
    }

    /// An envelope of this payload signed by `keys` (each with its own name as `keyid`).
    pub fn sign(&self, keys: &[&TestKey]) -> Envelope {
        keys.iter().fold(Envelope::new(self), |e, k| e.sign(k))
    }
}

/// A DSSE v1 envelope under construction; [`Envelope::text`] is its byte-exact JSON.
#[derive(Debug, Clone)]
pub struct Envelope {
    payload_type: String,
    body: Vec<u8>,
    /// Overrides the base64 of `body` (URL-safe, unpadded, not base64 at all).
    payload_text: Option<String>,
    signatures: Vec<(String, String)>,
    extra: Vec<(String, String)>,
}

impl Envelope {
    /// An unsigned envelope of `payload`.
    pub fn new(payload: &Payload) -> Envelope {
        Envelope::from_body(payload.payload_type(), &payload.body())
    }

    pub fn from_body(payload_type: &str, body: &[u8]) -> Envelope {
        Envelope {
            payload_type: payload_type.into(),
            body: body.to_vec(),
            payload_text: None,
            signatures: Vec::new(),
            extra: Vec::new(),
        }
    }

    /// Adds `key`'s signature over PAE of the current type and body, `keyid` its name.
    pub fn sign(self, key: &TestKey) -> Envelope {
        let keyid = key.name.clone();
        self.sign_as(key, &keyid)
    }

    /// Adds `key`'s signature under another `keyid` hint.
    pub fn sign_as(mut self, key: &TestKey, keyid: &str) -> Envelope {
        let sig = key.sign_pae(&self.payload_type, &self.body);
        self.signatures.push((keyid.into(), sig));
        self
    }

    /// Adds `key`'s valid signature over a different payload (same type).
    pub fn sign_other_body(mut self, key: &TestKey, other_body: &[u8]) -> Envelope {
        let sig = key.sign_pae(&self.payload_type, other_body);
        self.signatures.push((key.name.clone(), sig));
        self
    }

    /// Adds a signature entry as given.
    pub fn push_signature(mut self, keyid: &str, sig_base64: &str) -> Envelope {
        self.signatures.push((keyid.into(), sig_base64.into()));
        self
    }

    /// Appends the signature at `index` again.
    pub fn duplicate_signature(mut self, index: usize) -> Envelope {
        if let Some(s) = self.signatures.get(index).cloned() {
            self.signatures.push(s);
        }
        self
    }

    /// Edits the signature at `index` (decoded bytes) and re-encodes it.
    pub fn edit_signature(mut self, index: usize, edit: impl FnOnce(&mut Vec<u8>)) -> Envelope {
        if let Some((_, sig)) = self.signatures.get_mut(index)
            && let Some(mut bytes) = felhom_authz::decode_base64(sig)
        {
            edit(&mut bytes);
            *sig = encode_base64(&bytes);
        }
        self
    }

    /// Declares another `payloadType` (after signing: the signatures no longer cover it).
    pub fn payload_type(mut self, payload_type: &str) -> Envelope {
        self.payload_type = payload_type.into();
        self
    }

    /// Replaces the payload's base64 text.
    pub fn payload_text(mut self, text: &str) -> Envelope {
        self.payload_text = Some(text.into());
        self
    }

    /// Adds a top-level field (DSSE has none beyond the three: `bad_envelope`).
    pub fn extra_field(mut self, name: &str, json_text: &str) -> Envelope {
        self.extra.push((name.into(), json_text.into()));
        self
    }

    /// The payload's decoded bytes.
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// The envelope's JSON text, byte exact:
    /// `{"payloadType":…,"payload":…,"signatures":[{"keyid":…,"sig":…},…]}`.
    pub fn text(&self) -> String {
        let payload = self
            .payload_text
            .clone()
            .unwrap_or_else(|| encode_base64(&self.body));
        let sigs: Vec<String> = self
            .signatures
            .iter()
            .map(|(k, s)| {
                format!(
                    "{{\"keyid\":{},\"sig\":{}}}",
                    to_json_text(k),
                    to_json_text(s)
                )
            })
            .collect();
        let mut out = format!(
            "{{\"payloadType\":{},\"payload\":{},\"signatures\":[{}]",
            to_json_text(&self.payload_type),
            to_json_text(&payload),
            sigs.join(",")
        );
        for (n, v) in &self.extra {
            out.push_str(&format!(",{}:{v}", to_json_text(n)));
        }
        out.push('}');
        out
    }

    pub fn bytes(&self) -> Vec<u8> {
        self.text().into_bytes()
    }
}

/// Adds the group order ℓ to a signature's little-endian `S` (bytes 32..64): the same
/// signature in a non-canonical encoding, which strict verification refuses.
pub fn malleate_signature(sig: &mut [u8]) {
    const L: [u8; 32] = [
        0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9, 0xde,
        0x14, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
    ];
    if sig.len() != 64 {
        return;
    }
    let mut carry = 0u16;
    for (i, l) in L.iter().enumerate() {
        let v = sig[32 + i] as u16 + *l as u16 + carry;
        sig[32 + i] = v as u8;
        carry = v >> 8;
    }
}

/// What the hostile envelopes are made for: two trusted operator keys and a third,
/// untrusted one, one agent and node, and the guest the operations would act on.
#[derive(Debug)]
pub struct Fixture {
    pub alice: TestKey,
    pub bob: TestKey,
    /// Not in `signers.json`.
    pub mallory: TestKey,
    pub agent_id: String,
    pub node: String,
    /// The guest a hostile operation would stop (it must keep running).
    pub vmid: u32,
    /// What the host trusts: alice and bob, thresholds 1 and 2, default limits.
    pub signers: SignersFile,
}

impl Fixture {
    /// Deterministic keys (seeds 1, 2, 3).
    pub fn new(agent_id: &str, node: &str, vmid: u32) -> Fixture {
        let alice = TestKey::seeded("alice", 1);
        let bob = TestKey::seeded("bob", 2);
        let signers = SignersFile::new(&[&alice, &bob]);
        Fixture {
            alice,
            bob,
            mallory: TestKey::seeded("mallory", 3),
            agent_id: agent_id.into(),
            node: node.into(),
            vmid,
            signers,
        }
    }

    /// A valid `stop` of the fixture's guest.
    pub fn stop(&self) -> Payload {
        Payload::guest_op(&self.agent_id, &self.node, "stop", "lxc", self.vmid)
            .params(json!({"timeout_seconds": 5}))
    }

    /// A valid operation of `kind` with `params` on the fixture's guest (an lxc), granted
    /// the kind's class: `irreversible` for `delete_snapshot`, `destroy` and
    /// `release_undo`, else `reversible`.
    pub fn guest(&self, kind: &str, params: Value) -> Payload {
        let grant = match felhom_authz::Kind::parse(kind).map(|k| k.class()) {
            Some(felhom_authz::Grant::Irreversible) => "irreversible",
            _ => "reversible",
        };
        Payload::guest_op(&self.agent_id, &self.node, kind, "lxc", self.vmid)
            .params(params)
            .grant(grant)
    }

    /// `set_config` of `config` (`{KEY: VALUE|null}`); granted `irreversible` when it
    /// clears `protection` (false, 0 or null), as it must be.
    pub fn set_config(&self, config: Value) -> Payload {
        let clears = config
            .get("protection")
            .is_some_and(|v| v.is_null() || *v == json!(false) || *v == json!(0));
        let p = self.guest("set_config", json!({ "config": config }));
        if clears { p.grant("irreversible") } else { p }
    }

    /// `rollback` to `snapshot`, started afterwards when `start`.
    pub fn rollback(&self, snapshot: &str, start: bool) -> Payload {
        self.guest("rollback", json!({"snapshot": snapshot, "start": start}))
    }

    /// `restore` of `archive` (a backup volid of an lxc) onto `storage`.
    pub fn restore(&self, archive: &str, storage: &str, force: bool, start: bool) -> Payload {
        self.guest(
            "restore",
            json!({"archive": archive, "storage": storage, "force": force, "start": start}),
        )
    }

    /// `delete_snapshot` of `name` (irreversible).
    pub fn delete_snapshot(&self, name: &str) -> Payload {
        self.guest("delete_snapshot", json!({ "name": name }))
    }

    /// `destroy` (irreversible).
    pub fn destroy(&self, purge: bool) -> Payload {
        self.guest("destroy", json!({ "purge": purge }))
    }

    /// `undo` of the operation `op_id`.
    pub fn undo(&self, op_id: &str) -> Payload {
        self.guest("undo", json!({ "op_id": op_id }))
    }

    /// `release_undo` of the operation `op_id`'s undo point (irreversible).
    pub fn release_undo(&self, op_id: &str) -> Payload {
        self.guest("release_undo", json!({ "op_id": op_id }))
    }

    /// A valid desired state of `generation` with no guests.
    pub fn desired(&self, generation: u64) -> Payload {
        Payload::desired(&self.agent_id, &self.node, generation, json!([]))
    }
}

/// Which verification a hostile case's envelope is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// Delivered as an operation (`GET /ops`).
    Op,
    /// Served as the desired state (`GET /desired`).
    Desired,
}

/// One hostile envelope: what to deliver, under which trust, and the refusal it must get.
#[derive(Debug, Clone)]
pub struct HostileCase {
    pub name: &'static str,
    pub channel: Channel,
    pub envelope: String,
    /// The trust the case needs when it is not the fixture's `signers`.
    pub signers: Option<SignersFile>,
    /// The wire code of the refusal (`felhom_authz::Reason::as_str`).
    pub reason: &'static str,
}

/// The hostile envelopes felhom-authz alone refuses (replay, rollback, conflicts and the
/// journal's cases need the agent's state and are built by the tests from [`Payload`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hostile {
    TooLarge,
    UnknownEnvelopeField,
    PayloadNotBase64,
    NoSignatures,
    WrongType,
    SignatureOverOtherPayload,
    UntrustedKey,
    TruncatedSignature,
    NonCanonicalSignature,
    DuplicateSignatureForThreshold2,
    OneKeyUnderTwoNames,
    IrreversibleGrantOneSigner,
    PayloadNotJson,
    UnknownTopLevelField,
    UpperCaseOpId,
    ReasonTooLong,
    UnknownGrant,
    UnsupportedVersion,
    OtherAgentId,
    OtherNode,
    WindowOneSecondTooLong,
    NotYetValid,
    Expired,
    UnknownOp,
    UnknownParamsField,
    FloatVmid,
    UnknownTargetField,
    GuestOpWithoutTarget,
    HostOpWithTarget,
    BadExpectDigest,
    TimeoutOutOfRange,
    DestroyGrantedReversible,
    DeleteSnapshotGrantedReversible,
    ReleaseUndoGrantedReversible,
    ClearProtectionGrantedReversible,
    DestroyOneSigner,
    ClearProtectionOneSigner,
    RestoreArchiveOfOtherType,
    DesiredUnknownField,
    DesiredOtherAgent,
    DesiredSignedAsOp,
    DesiredUntrustedKey,
}

impl Hostile {
    pub const ALL: [Hostile; 42] = [
        Hostile::TooLarge,
        Hostile::UnknownEnvelopeField,
        Hostile::PayloadNotBase64,
        Hostile::NoSignatures,
        Hostile::WrongType,
        Hostile::SignatureOverOtherPayload,
        Hostile::UntrustedKey,
        Hostile::TruncatedSignature,
        Hostile::NonCanonicalSignature,
        Hostile::DuplicateSignatureForThreshold2,
        Hostile::OneKeyUnderTwoNames,
        Hostile::IrreversibleGrantOneSigner,
        Hostile::PayloadNotJson,
        Hostile::UnknownTopLevelField,
        Hostile::UpperCaseOpId,
        Hostile::ReasonTooLong,
        Hostile::UnknownGrant,
        Hostile::UnsupportedVersion,
        Hostile::OtherAgentId,
        Hostile::OtherNode,
        Hostile::WindowOneSecondTooLong,
        Hostile::NotYetValid,
        Hostile::Expired,
        Hostile::UnknownOp,
        Hostile::UnknownParamsField,
        Hostile::FloatVmid,
        Hostile::UnknownTargetField,
        Hostile::GuestOpWithoutTarget,
        Hostile::HostOpWithTarget,
        Hostile::BadExpectDigest,
        Hostile::TimeoutOutOfRange,
        Hostile::DestroyGrantedReversible,
        Hostile::DeleteSnapshotGrantedReversible,
        Hostile::ReleaseUndoGrantedReversible,
        Hostile::ClearProtectionGrantedReversible,
        Hostile::DestroyOneSigner,
        Hostile::ClearProtectionOneSigner,
        Hostile::RestoreArchiveOfOtherType,
        Hostile::DesiredUnknownField,
        Hostile::DesiredOtherAgent,
        Hostile::DesiredSignedAsOp,
        Hostile::DesiredUntrustedKey,
    ];

    /// Builds the case against `fx` (times relative to now).
    pub fn build(self, fx: &Fixture) -> HostileCase {
        let a = &fx.alice;
        let stop = fx.stop();
        let alice = |p: &Payload| p.sign(&[a]).text();
        let skew = 120u64;
        let max = 86_400u64;
        let now = now_unix();
        let mut signers = None;
        let mut channel = Channel::Op;
        let (name, envelope, reason) = match self {
            Hostile::TooLarge => (
                "too_large",
                alice(&stop.clone().set("padding", "x".repeat(70 * 1024))),
                "too_large",
            ),
            Hostile::UnknownEnvelopeField => (
                "unknown_envelope_field",
                stop.sign(&[a]).extra_field("critical", "true").text(),
                "bad_envelope",
            ),
            Hostile::PayloadNotBase64 => (
                "payload_not_base64",
                stop.sign(&[a]).payload_text("!!not base64!!").text(),
                "bad_envelope",
            ),
            Hostile::NoSignatures => ("no_signatures", stop.sign(&[]).text(), "below_threshold"),
            Hostile::WrongType => (
                "wrong_type",
                Envelope::new(&stop)
                    .payload_type(DESIRED_PAYLOAD_TYPE)
                    .sign(a)
                    .text(),
                "wrong_type",
            ),
            Hostile::SignatureOverOtherPayload => {
                let other = fx.stop().body();
                (
                    "signature_over_other_payload",
                    Envelope::new(&stop).sign_other_body(a, &other).text(),
                    "bad_signature",
                )
            }
            Hostile::UntrustedKey => (
                "untrusted_key",
                Envelope::new(&stop).sign_as(&fx.mallory, "alice").text(),
                "bad_signature",
            ),
            Hostile::TruncatedSignature => (
                "truncated_signature",
                stop.sign(&[a]).edit_signature(0, |s| s.truncate(63)).text(),
                "bad_signature",
            ),
            Hostile::NonCanonicalSignature => (
                "non_canonical_signature",
                stop.sign(&[a])
                    .edit_signature(0, |s| malleate_signature(s))
                    .text(),
                "bad_signature",
            ),
            Hostile::DuplicateSignatureForThreshold2 => (
                "duplicate_signature_for_threshold_2",
                stop.clone()
                    .grant("irreversible")
                    .sign(&[a])
                    .duplicate_signature(0)
                    .text(),
                "below_threshold",
            ),
            Hostile::OneKeyUnderTwoNames => {
                signers = Some(fx.signers.clone().alias("alice2", a));
                let p = stop.clone().grant("irreversible");
                (
                    "one_key_under_two_names",
                    Envelope::new(&p).sign(a).sign_as(a, "alice2").text(),
                    "below_threshold",
                )
            }
            Hostile::IrreversibleGrantOneSigner => (
                "irreversible_grant_one_signer",
                alice(&stop.clone().grant("irreversible")),
                "below_threshold",
            ),
            Hostile::PayloadNotJson => (
                "payload_not_json",
                alice(&Payload::raw(OP_PAYLOAD_TYPE, b"stop 101 please")),
                "bad_payload",
            ),
            Hostile::UnknownTopLevelField => (
                "unknown_top_level_field",
                alice(&stop.clone().set("sudo", true)),
                "bad_payload",
            ),
            Hostile::UpperCaseOpId => (
                "upper_case_op_id",
                alice(&stop.clone().op_id("0123456789ABCDEF0123456789ABCDEF")),
                "bad_payload",
            ),
            Hostile::ReasonTooLong => (
                "reason_too_long",
                alice(&stop.clone().reason(&"é".repeat(201))),
                "bad_payload",
            ),
            Hostile::UnknownGrant => (
                "unknown_grant",
                alice(&stop.clone().grant("superuser")),
                "bad_payload",
            ),
            Hostile::UnsupportedVersion => (
                "unsupported_version",
                alice(&stop.clone().set("v", 2)),
                "unsupported_version",
            ),
            Hostile::OtherAgentId => (
                "other_agent_id",
                alice(&stop.clone().set("agent_id", other_hex(&fx.agent_id))),
                "wrong_agent",
            ),
            Hostile::OtherNode => (
                "other_node",
                alice(&stop.clone().set("node", format!("{}-other", fx.node))),
                "wrong_node",
            ),
            Hostile::WindowOneSecondTooLong => (
                "window_one_second_too_long",
                alice(&stop.clone().window(now - 60, now - 60 + max + 1)),
                "window_too_long",
            ),
            Hostile::NotYetValid => (
                "not_yet_valid",
                alice(&stop.clone().window(now + skew + 600, now + skew + 1200)),
                "not_yet_valid",
            ),
            Hostile::Expired => (
                "expired",
                alice(&stop.clone().window(now - skew - 1200, now - skew - 600)),
                "expired",
            ),
            Hostile::UnknownOp => (
                "unknown_op",
                alice(&stop.clone().set("op", "format_disks")),
                "unknown_op",
            ),
            Hostile::UnknownParamsField => (
                "unknown_params_field",
                alice(
                    &stop
                        .clone()
                        .params(json!({"timeout_seconds": 5, "force": true})),
                ),
                "invalid_params",
            ),
            Hostile::FloatVmid => (
                "float_vmid",
                alice(&stop.clone().set_raw(
                    "target",
                    &format!("{{\"type\":\"lxc\",\"vmid\":{}.0}}", fx.vmid),
                )),
                "invalid_params",
            ),
            Hostile::UnknownTargetField => (
                "unknown_target_field",
                alice(&stop.clone().set(
                    "target",
                    json!({"type": "lxc", "vmid": fx.vmid, "node": "elsewhere"}),
                )),
                "invalid_params",
            ),
            Hostile::GuestOpWithoutTarget => (
                "guest_op_without_target",
                alice(&stop.clone().set_raw("target", "null")),
                "invalid_params",
            ),
            Hostile::HostOpWithTarget => (
                "host_op_with_target",
                alice(
                    &Payload::op(&fx.agent_id, &fx.node, "usb_unmount")
                        .params(json!({"name": "backup"}))
                        .target("lxc", fx.vmid),
                ),
                "invalid_params",
            ),
            Hostile::BadExpectDigest => (
                "bad_expect_digest",
                alice(&stop.clone().expect_digest("not-a-digest")),
                "invalid_params",
            ),
            Hostile::TimeoutOutOfRange => (
                "timeout_out_of_range",
                alice(&stop.clone().params(json!({"timeout_seconds": 0}))),
                "invalid_params",
            ),
            // Issue 13: the grant against the operation's class. Signed by both keys, so
            // only the grant is wrong.
            Hostile::DestroyGrantedReversible => (
                "destroy_granted_reversible",
                fx.destroy(true)
                    .grant("reversible")
                    .sign(&[a, &fx.bob])
                    .text(),
                "grant_mismatch",
            ),
            Hostile::DeleteSnapshotGrantedReversible => (
                "delete_snapshot_granted_reversible",
                fx.delete_snapshot("before-upgrade")
                    .grant("reversible")
                    .sign(&[a, &fx.bob])
                    .text(),
                "grant_mismatch",
            ),
            Hostile::ReleaseUndoGrantedReversible => (
                "release_undo_granted_reversible",
                fx.release_undo(&random_op_id())
                    .grant("reversible")
                    .sign(&[a, &fx.bob])
                    .text(),
                "grant_mismatch",
            ),
            Hostile::ClearProtectionGrantedReversible => (
                "clear_protection_granted_reversible",
                fx.set_config(json!({"protection": 0}))
                    .grant("reversible")
                    .sign(&[a, &fx.bob])
                    .text(),
                "grant_mismatch",
            ),
            // Granted irreversible but signed by one key (the irreversible threshold is 2).
            Hostile::DestroyOneSigner => (
                "destroy_one_signer",
                alice(&fx.destroy(false)),
                "below_threshold",
            ),
            Hostile::ClearProtectionOneSigner => (
                "clear_protection_one_signer",
                alice(&fx.set_config(json!({"protection": false}))),
                "below_threshold",
            ),
            Hostile::RestoreArchiveOfOtherType => (
                "restore_archive_of_other_type",
                alice(&fx.restore(
                    &format!(
                        "local:backup/vzdump-qemu-{}-2025_01_31-02_00_05.vma.zst",
                        fx.vmid
                    ),
                    "local",
                    true,
                    false,
                )),
                "invalid_params",
            ),
            Hostile::DesiredUnknownField => {
                channel = Channel::Desired;
                (
                    "desired_unknown_field",
                    alice(&fx.desired(1_000_000).set("rollback_ok", true)),
                    "bad_payload",
                )
            }
            Hostile::DesiredOtherAgent => {
                channel = Channel::Desired;
                (
                    "desired_other_agent",
                    alice(
                        &fx.desired(1_000_000)
                            .set("agent_id", other_hex(&fx.agent_id)),
                    ),
                    "wrong_agent",
                )
            }
            Hostile::DesiredSignedAsOp => {
                channel = Channel::Desired;
                (
                    "desired_signed_as_op",
                    Envelope::new(&fx.desired(1_000_000))
                        .payload_type(OP_PAYLOAD_TYPE)
                        .sign(a)
                        .text(),
                    "wrong_type",
                )
            }
            Hostile::DesiredUntrustedKey => {
                channel = Channel::Desired;
                (
                    "desired_untrusted_key",
                    fx.desired(1_000_000).sign(&[&fx.mallory]).text(),
                    "bad_signature",
                )
            }
        };
        HostileCase {
            name,
            channel,
            envelope,
            signers,
            reason,
        }
    }
}

/// A 32-hex id that differs from `id`.
fn other_hex(id: &str) -> String {
    loop {
        let o = random_agent_id();
        if o != id {
            return o;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use felhom_authz::{AgentId, Context, Kind, Reason, verify_desired, verify_op};

    use super::*;

    const AGENT: &str = "0123456789abcdef0123456789abcdef";

    fn fx() -> Fixture {
        Fixture::new(AGENT, "pve1", 101)
    }

    fn ctx() -> Context {
        Context {
            agent_id: AgentId::new(AGENT).unwrap(),
            node: "pve1".into(),
            now: now_unix(),
            scratch_vmids: None,
        }
    }

    #[test]
    fn a_signed_stop_verifies_with_the_written_trust() {
        let fx = fx();
        let trust = fx.signers.trust().unwrap();
        let p = fx.stop();
        let op = verify_op(&p.sign(&[&fx.alice]).bytes(), &trust, &ctx()).unwrap();
        assert_eq!(op.kind, Kind::Stop);
        assert_eq!(op.signers, ["alice"]);
        assert_eq!(hex::encode(op.payload_sha256), p.sha256_hex());
        assert_eq!(
            Some(format!("\"{}\"", op.op_id.as_str())).as_deref(),
            p.get("op_id")
        );
        // both keys, irreversible grant: the threshold of 2 is met by distinct keys
        let p2 = fx.stop().grant("irreversible");
        let op = verify_op(&p2.sign(&[&fx.bob, &fx.alice]).bytes(), &trust, &ctx()).unwrap();
        assert_eq!(op.signers, ["alice", "bob"]);
        // a snapshot, a backup and a usb mount made with the builders verify too
        for p in [
            Payload::guest_op(AGENT, "pve1", "snapshot", "qemu", 102)
                .params(json!({"name": "before", "description": "x"})),
            Payload::guest_op(AGENT, "pve1", "backup", "lxc", 101)
                .params(json!({"storage": "local", "mode": "snapshot", "compress": "zstd"}))
                .expect_digest(&"a".repeat(40)),
            Payload::op(AGENT, "pve1", "usb_mount")
                .params(json!({"device": "/dev/sdb1", "name": "backup"})),
            Payload::guest_op(AGENT, "pve1", "start", "lxc", 101).valid_for(600),
        ] {
            verify_op(&p.sign(&[&fx.alice]).bytes(), &trust, &ctx())
                .unwrap_or_else(|r| panic!("{r}: {}", String::from_utf8_lossy(&p.body())));
        }
        // the gated kinds' builders, signed as their class needs (both keys for an
        // irreversible grant)
        let irreversible = [
            fx.destroy(true),
            fx.delete_snapshot("old-1"),
            fx.release_undo(&random_op_id()),
            fx.set_config(json!({"protection": null})),
        ];
        for p in &irreversible {
            assert_eq!(p.get("grant"), Some("\"irreversible\""));
        }
        let reversible = [
            fx.set_config(json!({"memory": 1024, "onboot": true, "protection": 1})),
            fx.rollback("daily", true),
            fx.restore(
                "nas:backup/vzdump-lxc-101-2025_01_31-02_00_05.tar.zst",
                "local-lvm",
                false,
                true,
            ),
            fx.undo(&random_op_id()),
        ];
        for p in irreversible.iter().chain(&reversible) {
            let keys: &[&TestKey] = if p.get("grant") == Some("\"irreversible\"") {
                &[&fx.alice, &fx.bob]
            } else {
                &[&fx.alice]
            };
            let op = verify_op(&p.sign(keys).bytes(), &trust, &ctx())
                .unwrap_or_else(|r| panic!("{r}: {}", String::from_utf8_lossy(&p.body())));
            assert!(op.kind.is_gated());
        }
        let d = verify_desired(&fx.desired(7).sign(&[&fx.bob]).bytes(), &trust, &ctx()).unwrap();
        assert_eq!((d.generation, d.signers), (7, vec!["bob".to_string()]));
    }

    #[test]
    fn payload_text_is_exact_and_ordered() {
        let p = Payload::op(AGENT, "pve1", "start")
            .op_id(&"f".repeat(32))
            .window(100, 200)
            .target("lxc", 101)
            .reason("r");
        assert_eq!(
            String::from_utf8(p.body()).unwrap(),
            format!(
                r#"{{"v":1,"op_id":"{}","agent_id":"{AGENT}","node":"pve1","not_before":100,"not_after":200,"op":"start","target":{{"type":"lxc","vmid":101}},"params":{{}},"expect":null,"grant":"reversible","reason":"r"}}"#,
                "f".repeat(32)
            )
        );
        let env = p.sign(&[&TestKey::seeded("alice", 1)]);
        let v: Value = serde_json::from_str(&env.text()).unwrap();
        assert_eq!(
            felhom_authz::decode_base64(v["payload"].as_str().unwrap()).unwrap(),
            p.body()
        );
        assert!(
            env.text()
                .starts_with(r#"{"payloadType":"application/vnd.felhom.op+json","payload":""#)
        );
        assert_eq!(v["signatures"][0]["keyid"], "alice");
        // the signature is over the PAE, checked with the public key alone
        let sig = felhom_authz::decode_base64(v["signatures"][0]["sig"].as_str().unwrap()).unwrap();
        let vk = ed25519_dalek::VerifyingKey::from_bytes(&TestKey::seeded("x", 1).public_bytes())
            .unwrap();
        vk.verify_strict(
            &pae(OP_PAYLOAD_TYPE, &p.body()),
            &ed25519_dalek::Signature::from_bytes(&sig.try_into().unwrap()),
        )
        .unwrap();
    }

    #[test]
    fn every_hostile_case_gets_its_reason_from_authz() {
        let fx = fx();
        let mut names = std::collections::HashSet::new();
        for h in Hostile::ALL {
            let case = h.build(&fx);
            assert!(names.insert(case.name), "{} twice", case.name);
            let trust = case
                .signers
                .as_ref()
                .unwrap_or(&fx.signers)
                .trust()
                .unwrap();
            let got = match case.channel {
                Channel::Op => verify_op(case.envelope.as_bytes(), &trust, &ctx()).map(|_| ()),
                Channel::Desired => {
                    verify_desired(case.envelope.as_bytes(), &trust, &ctx()).map(|_| ())
                }
            };
            match got {
                Ok(()) => panic!("{} was accepted", case.name),
                Err(r) => assert_eq!(r.reason.as_str(), case.reason, "{}: {r}", case.name),
            }
        }
        assert!(names.len() >= 25);
        // every authz reason is among them
        let covered: std::collections::HashSet<&str> =
            Hostile::ALL.iter().map(|h| h.build(&fx).reason).collect();
        for r in Reason::ALL {
            assert!(covered.contains(r.as_str()), "{r} not covered");
        }
    }

    #[test]
    fn hostile_changes_are_the_only_difference() {
        // The baseline of each hostile case (unchanged stop, alice) is accepted, and the
        // same payload signed by both keys meets the irreversible threshold: so
        // the duplicate-signature and two-names cases fail for their one reason.
        let fx = fx();
        let trust = fx.signers.trust().unwrap();
        let p = fx.stop().grant("irreversible");
        verify_op(&p.sign(&[&fx.alice, &fx.bob]).bytes(), &trust, &ctx()).unwrap();
        let two_names = fx
            .signers
            .clone()
            .alias("alice2", &fx.alice)
            .trust()
            .unwrap();
        assert_eq!(
            two_names.keys().len(),
            2,
            "alice2 is alice: still two distinct keys"
        );
        // a renamed key signs identically
        let env = Envelope::new(&p).sign(&fx.alice.renamed("alice2"));
        let r = verify_op(&env.bytes(), &two_names, &ctx()).unwrap_err();
        assert_eq!(r.reason, Reason::BelowThreshold);
        // removing bob from the trust stops what bob alone signed
        let by_bob = fx.stop().sign(&[&fx.bob]).bytes();
        verify_op(&by_bob, &trust, &ctx()).unwrap();
        let no_bob = fx
            .signers
            .clone()
            .without("bob")
            .threshold(1, 1)
            .trust()
            .unwrap();
        assert_eq!(
            verify_op(&by_bob, &no_bob, &ctx()).unwrap_err().reason,
            Reason::BadSignature
        );
        // the window edge: exactly max_validity_seconds is fine
        let now = now_unix();
        let edge = fx.stop().window(now - 60, now - 60 + 86_400);
        verify_op(&edge.sign(&[&fx.alice]).bytes(), &trust, &ctx()).unwrap();
    }

    #[test]
    fn signers_variants_are_the_configuration_errors_they_claim() {
        let fx = fx();
        assert!(matches!(
            fx.signers.clone().threshold(1, 3).trust(),
            Err(felhom_authz::TrustError::ThresholdAboveKeys { .. })
        ));
        assert!(matches!(
            fx.signers
                .clone()
                .raw_key("short", &encode_base64(&[1u8; 31]))
                .trust(),
            Err(felhom_authz::TrustError::KeyLength { len: 31, .. })
        ));
        assert!(matches!(
            fx.signers.clone().alias("alice", &fx.bob).trust(),
            Err(felhom_authz::TrustError::DuplicateName(_))
        ));
        let t = fx
            .signers
            .clone()
            .max_validity_seconds(60)
            .clock_skew_seconds(5)
            .trust()
            .unwrap();
        assert_eq!((t.max_validity_seconds(), t.clock_skew_seconds()), (60, 5));
    }

    #[test]
    fn signers_file_is_written_root_owned_0644_and_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("signers.json");
        let fx = fx();
        fx.signers.write(&path).unwrap();
        let md = std::fs::metadata(&path).unwrap();
        assert_eq!((md.uid(), md.gid(), md.mode() & 0o7777), (0, 0, 0o644));
        felhom_authz::check_file_metadata(&md, 65534).unwrap();
        let t = felhom_authz::Trust::from_json(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(t.names(), ["alice", "bob"]);
        // an unsafe variant, replacing the file atomically
        fx.signers.write_owned(&path, 0o664, 0, 0).unwrap();
        let md = std::fs::metadata(&path).unwrap();
        assert_eq!(md.mode() & 0o7777, 0o664);
        assert!(felhom_authz::check_file_metadata(&md, 65534).is_err());
        let err = fx
            .signers
            .write(&dir.path().join("no/such/dir/signers.json"));
        assert!(matches!(err, Err(SigningError::Write { .. })));
    }

    #[test]
    fn generated_keys_differ_and_debug_hides_the_secret() {
        let a = TestKey::generate("a").unwrap();
        let b = TestKey::generate("b").unwrap();
        assert_ne!(a.public_bytes(), b.public_bytes());
        let dbg = format!("{a:?}");
        assert!(dbg.contains(&a.public_base64()));
        assert!(!dbg.contains(&encode_base64(&a.key.to_bytes())));
    }
}
