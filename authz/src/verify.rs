//! Signature verification: which distinct trusted keys signed an envelope's PAE.
//!
//! Owns: [`verify_envelope`] (size, shape, base64, strict Ed25519 over
//! `pae(payloadType, body)`, the distinct-key count against the reversible threshold, then
//! the payload type) and the one-call helpers [`verify_op`] and [`verify_desired`].
//! Must never: parse the body before the signatures are verified; count a signature, a
//! `keyid` or a name instead of a distinct public key; fail an envelope because of an
//! extra unknown, duplicate or bad signature when enough good ones are present.
//!
//! Ed25519 is `ed25519-dalek` 2.x `verify_strict`: it refuses non-canonical `S` (≥ ℓ),
//! non-canonical and small-order `R`, and small-order public keys, so one signature has
//! exactly one valid encoding for a given message and key.

use ed25519_dalek::Signature;

use crate::envelope::{Envelope, PayloadType, decode_base64, pae, payload_sha256};
use crate::payload::{Context, DesiredPayload, OpPayload, parse_desired, parse_op};
use crate::refusal::{Reason, Refusal};
use crate::trust::{Grant, Trust};

/// An envelope whose signatures met the reversible threshold, with the body not yet parsed.
/// Only [`verify_envelope`] makes one, so the payload parsers, which take a `Verified`,
/// cannot be handed unverified bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub(crate) payload_type: PayloadType,
    /// The decoded payload bytes, exactly as signed.
    pub(crate) body: Vec<u8>,
    /// SHA-256 of `body`.
    pub(crate) payload_sha256: [u8; 32],
    /// One name per distinct trusted key whose signature verified (the name the `keyid`
    /// hint named when it named one of that key's names, else its first name).
    pub(crate) signers: Vec<String>,
}

impl Verified {
    pub fn payload_type(&self) -> PayloadType {
        self.payload_type
    }

    /// The decoded payload bytes, exactly as signed.
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// SHA-256 of the body.
    pub fn payload_sha256(&self) -> [u8; 32] {
        self.payload_sha256
    }

    /// One name per distinct trusted key whose signature verified.
    pub fn signers(&self) -> &[String] {
        &self.signers
    }

    /// How many distinct trusted keys signed.
    pub fn distinct_signers(&self) -> u32 {
        self.signers.len() as u32
    }
}

/// Verifies an envelope's signatures against `trust` and checks that it carries `expected`.
/// Refusals, in order: `too_large`, `bad_envelope`, `bad_signature` (nothing verifies),
/// `below_threshold` (fewer distinct keys than `threshold.reversible`), `wrong_type`.
pub fn verify_envelope(
    raw: &[u8],
    expected: PayloadType,
    trust: &Trust,
) -> Result<Verified, Refusal> {
    let env = Envelope::parse(raw)?;
    let body = env.body()?;
    let message = pae(&env.payload_type, &body);
    let keys = trust.keys();
    // Which trusted keys (by index) have counted, and under which name.
    let mut counted: Vec<Option<String>> = vec![None; keys.len()];
    for entry in &env.signatures {
        // An undecodable or wrong-length signature is a bad signature: it does not count
        // and does not fail the envelope by itself.
        let Some(sig) = decode_base64(&entry.sig)
            .and_then(|b| <[u8; 64]>::try_from(b.as_slice()).ok())
            .map(|b| Signature::from_bytes(&b))
        else {
            continue;
        };
        // The hinted key first, then every other key that has not counted yet.
        let hinted = keys.iter().position(|k| k.names.contains(&entry.keyid));
        let order = hinted
            .into_iter()
            .chain((0..keys.len()).filter(|i| Some(*i) != hinted));
        for i in order {
            if counted[i].is_some() {
                continue;
            }
            #[cfg(test)]
            tried::record(i);
            if keys[i].key.verify_strict(&message, &sig).is_ok() {
                let name = keys[i]
                    .names
                    .iter()
                    .find(|n| **n == entry.keyid)
                    .unwrap_or(&keys[i].names[0]);
                counted[i] = Some(name.clone());
                break;
            }
        }
    }
    let signers: Vec<String> = counted.into_iter().flatten().collect();
    if signers.is_empty() && !env.signatures.is_empty() {
        return Err(Refusal::new(
            Reason::BadSignature,
            format!(
                "none of the {} signatures verifies under a trusted key",
                env.signatures.len()
            ),
        ));
    }
    let need = trust.threshold(Grant::Reversible);
    if (signers.len() as u32) < need {
        return Err(Refusal::new(
            Reason::BelowThreshold,
            format!(
                "{} distinct trusted keys signed, {need} are required",
                signers.len()
            ),
        ));
    }
    if env.payload_type != expected.as_str() {
        return Err(Refusal::new(
            Reason::WrongType,
            format!(
                "payloadType {:?}, expected {:?}",
                env.payload_type.chars().take(100).collect::<String>(),
                expected.as_str()
            ),
        ));
    }
    Ok(Verified {
        payload_type: expected,
        payload_sha256: payload_sha256(&body),
        body,
        signers,
    })
}

/// Full verification of an operation envelope: signatures, then the payload against this
/// agent's context (see [`parse_op`]).
pub fn verify_op(raw: &[u8], trust: &Trust, ctx: &Context) -> Result<OpPayload, Refusal> {
    let v = verify_envelope(raw, PayloadType::Op, trust)?;
    parse_op(&v, trust, ctx)
}

/// Full verification of a desired-state envelope (see [`parse_desired`]).
pub fn verify_desired(raw: &[u8], trust: &Trust, ctx: &Context) -> Result<DesiredPayload, Refusal> {
    let v = verify_envelope(raw, PayloadType::Desired, trust)?;
    parse_desired(&v, ctx)
}

/// Test-only record of which trusted keys (by index) were tried, in order, so a test can
/// observe the hint-first order without timing.
#[cfg(test)]
mod tried {
    use std::cell::RefCell;

    thread_local! {
        static TRIED: RefCell<Vec<usize>> = const { RefCell::new(Vec::new()) };
    }

    pub(super) fn record(i: usize) {
        TRIED.with(|t| t.borrow_mut().push(i));
    }

    /// The keys tried since the last call, and clears the record.
    pub(super) fn take() -> Vec<usize> {
        TRIED.with(|t| std::mem::take(&mut *t.borrow_mut()))
    }
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::{Signer, SigningKey};
    use serde_json::{Value, json};

    use super::*;
    use crate::envelope::{OP_PAYLOAD_TYPE, encode_base64};

    fn key(n: u8) -> SigningKey {
        SigningKey::from_bytes(&[n; 32])
    }

    /// alice = key(1) (index 0), bob = key(2) (index 1), carol = key(3) (index 2).
    fn trust(reversible: u32) -> Trust {
        let keys: Vec<Value> = [("alice", 1), ("bob", 2), ("carol", 3)]
            .iter()
            .map(|(n, k)| json!({"name": n, "ed25519": encode_base64(key(*k).verifying_key().as_bytes())}))
            .collect();
        let doc = json!({"keys": keys, "threshold": {"reversible": reversible, "irreversible": 3},
                         "max_validity_seconds": 3600, "clock_skew_seconds": 60});
        Trust::from_json(doc.to_string().as_bytes()).unwrap()
    }

    fn envelope(signers: &[(&str, u8)]) -> Vec<u8> {
        let body = br#"{"any":"body"}"#;
        let message = pae(OP_PAYLOAD_TYPE, body);
        let sigs: Vec<Value> = signers
            .iter()
            .map(|(id, k)| json!({"keyid": id, "sig": encode_base64(&key(*k).sign(&message).to_bytes())}))
            .collect();
        json!({"payloadType": OP_PAYLOAD_TYPE, "payload": encode_base64(body), "signatures": sigs})
            .to_string()
            .into_bytes()
    }

    fn verify(signers: &[(&str, u8)], reversible: u32) -> (Vec<String>, Vec<usize>) {
        tried::take();
        let v = verify_envelope(&envelope(signers), PayloadType::Op, &trust(reversible)).unwrap();
        (v.signers().to_vec(), tried::take())
    }

    #[test]
    fn the_hinted_key_is_tried_first_and_alone_when_it_verifies() {
        // carol is the last key: a plain walk over the keys would try alice and bob first.
        assert_eq!(verify(&[("carol", 3)], 1), (vec!["carol".into()], vec![2]));
        assert_eq!(verify(&[("bob", 2)], 1), (vec!["bob".into()], vec![1]));
        // Two signatures with correct hints: exactly two verifications.
        assert_eq!(
            verify(&[("carol", 3), ("bob", 2)], 2),
            (vec!["bob".into(), "carol".into()], vec![2, 1])
        );
    }

    #[test]
    fn a_wrong_or_unknown_hint_falls_back_to_the_other_keys_in_order() {
        // The hint names bob, carol signed: bob first, then the others in trust order.
        assert_eq!(
            verify(&[("bob", 3)], 1),
            (vec!["carol".into()], vec![1, 0, 2])
        );
        // A hint that names no trusted key: every key in trust order.
        assert_eq!(
            verify(&[("zed", 3)], 1),
            (vec!["carol".into()], vec![0, 1, 2])
        );
        // A key that already counted is not tried again for a later signature.
        assert_eq!(
            verify(&[("alice", 1), ("alice", 3)], 1),
            (vec!["alice".into(), "carol".into()], vec![0, 1, 2])
        );
    }
}
