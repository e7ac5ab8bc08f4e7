//! DSSE v1: the envelope's JSON shape, PAE, base64 and the size cap.
//!
//! Owns: [`pae`] (what a signature covers), [`Envelope`] (parsed with unknown fields
//! refused), [`decode_base64`] (standard and URL-safe, padding optional), and
//! [`payload_sha256`] (the replay store's payload identity).
//! Must never: parse the payload body (that happens in [`crate::payload`], after
//! [`crate::verify`]), or re-serialize anything that is signed: signatures cover the
//! decoded payload bytes exactly as they came.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD_PAD_INDIFFERENT, URL_SAFE_PAD_INDIFFERENT};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::refusal::{Reason, Refusal};

/// An envelope above this many bytes is refused `too_large` before it is parsed.
pub const MAX_ENVELOPE_BYTES: usize = 64 * 1024;
/// More signatures than this is `bad_envelope`: it bounds the verification work one
/// envelope can cause (each signature may be tried against every trusted key).
pub const MAX_SIGNATURES: usize = 16;
/// A `keyid` hint longer than this is `bad_envelope`.
pub const MAX_KEYID_BYTES: usize = 256;

/// `payloadType` of a signed operation.
pub const OP_PAYLOAD_TYPE: &str = "application/vnd.felhom.op+json";
/// `payloadType` of a signed desired state.
pub const DESIRED_PAYLOAD_TYPE: &str = "application/vnd.felhom.desired+json";

/// The two payload types this agent accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PayloadType {
    Op,
    Desired,
}

impl PayloadType {
    pub fn as_str(self) -> &'static str {
        match self {
            PayloadType::Op => OP_PAYLOAD_TYPE,
            PayloadType::Desired => DESIRED_PAYLOAD_TYPE,
        }
    }
}

/// DSSE v1 pre-authentication encoding:
/// `"DSSEv1" SP LEN(type) SP type SP LEN(body) SP body`, lengths in bytes as ASCII decimal.
pub fn pae(payload_type: &str, body: &[u8]) -> Vec<u8> {
    let t = payload_type.as_bytes();
    let tl = t.len().to_string();
    let bl = body.len().to_string();
    let mut out = Vec::with_capacity(7 + tl.len() + 1 + t.len() + 1 + bl.len() + 1 + body.len());
    out.extend_from_slice(b"DSSEv1 ");
    out.extend_from_slice(tl.as_bytes());
    out.push(b' ');
    out.extend_from_slice(t);
    out.push(b' ');
    out.extend_from_slice(bl.as_bytes());
    out.push(b' ');
    out.extend_from_slice(body);
    out
}

/// Base64 in the standard or the URL-safe alphabet, with or without padding. `None` when
/// it is neither (a string mixing both alphabets is neither).
pub fn decode_base64(s: &str) -> Option<Vec<u8>> {
    STANDARD_PAD_INDIFFERENT
        .decode(s)
        .or_else(|_| URL_SAFE_PAD_INDIFFERENT.decode(s))
        .ok()
}

/// Standard base64 with padding: what this crate and `felhom-sign` write.
pub fn encode_base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// SHA-256 of the decoded payload bytes (the body), as the replay store and the results
/// name a payload.
pub fn payload_sha256(body: &[u8]) -> [u8; 32] {
    Sha256::digest(body).into()
}

/// One signature entry as it appears in the envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignatureEntry {
    /// An unauthenticated hint (usually the signer's name); never a security decision.
    #[serde(default)]
    pub keyid: String,
    /// base64 of the 64-byte signature over `pae(payloadType, body)`.
    pub sig: String,
}

/// A DSSE envelope as it appears on the wire. Unknown fields are refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    #[serde(rename = "payloadType")]
    pub payload_type: String,
    /// base64 of the body.
    pub payload: String,
    pub signatures: Vec<SignatureEntry>,
}

impl Envelope {
    /// Parses an envelope: the size cap (`too_large`), then the JSON shape and the
    /// signature count (`bad_envelope`). The payload stays encoded.
    pub fn parse(raw: &[u8]) -> Result<Envelope, Refusal> {
        if raw.len() > MAX_ENVELOPE_BYTES {
            return Err(Refusal::new(
                Reason::TooLarge,
                format!(
                    "envelope is {} bytes, the limit is {MAX_ENVELOPE_BYTES}",
                    raw.len()
                ),
            ));
        }
        let env: Envelope = serde_json::from_slice(raw)
            .map_err(|e| Refusal::new(Reason::BadEnvelope, format!("not a DSSE envelope: {e}")))?;
        if env.signatures.len() > MAX_SIGNATURES {
            return Err(Refusal::new(
                Reason::BadEnvelope,
                format!(
                    "{} signatures, at most {MAX_SIGNATURES} are accepted",
                    env.signatures.len()
                ),
            ));
        }
        if env
            .signatures
            .iter()
            .any(|s| s.keyid.len() > MAX_KEYID_BYTES)
        {
            return Err(Refusal::new(
                Reason::BadEnvelope,
                format!("a keyid is longer than {MAX_KEYID_BYTES} bytes"),
            ));
        }
        Ok(env)
    }

    /// The decoded payload bytes (`bad_envelope` when it is not base64).
    pub fn body(&self) -> Result<Vec<u8>, Refusal> {
        decode_base64(&self.payload).ok_or_else(|| {
            Refusal::new(
                Reason::BadEnvelope,
                "payload is not base64 (standard or URL-safe)",
            )
        })
    }

    /// Serializes the envelope as compact JSON (what `felhom-sign` prints).
    pub fn to_json(&self) -> String {
        // A struct of strings always serializes.
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pae_matches_the_dsse_spec_vector() {
        // DSSE protocol.md's example.
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world".to_vec()
        );
    }

    #[test]
    fn pae_counts_bytes_not_characters_and_keeps_the_body_raw() {
        assert_eq!(pae("", b""), b"DSSEv1 0  0 ".to_vec());
        // "é" is two bytes; a body with spaces, a NUL and a newline is copied as is.
        assert_eq!(
            pae("é", b"a b\0\n"),
            b"DSSEv1 2 \xc3\xa9 5 a b\0\n".to_vec()
        );
        let body = vec![b'x'; 1000];
        let out = pae(OP_PAYLOAD_TYPE, &body);
        assert!(out.starts_with(b"DSSEv1 30 application/vnd.felhom.op+json 1000 xxx"));
        assert_eq!(out.len(), "DSSEv1 30 ".len() + 30 + " 1000 ".len() + 1000);
    }

    #[test]
    fn base64_both_alphabets_with_and_without_padding() {
        // 0xfb 0xff encodes to "+/8=" (standard) and "-_8=" (URL-safe).
        for s in ["+/8=", "+/8", "-_8=", "-_8"] {
            assert_eq!(decode_base64(s), Some(vec![0xfb, 0xff]), "{s}");
        }
        assert_eq!(decode_base64(""), Some(vec![]));
        for s in ["+_8=", "!!!!", "+/8==", "a", "+/9="] {
            assert_eq!(decode_base64(s), None, "{s}");
        }
    }

    #[test]
    fn size_cap_is_checked_before_parsing() {
        let big = vec![b' '; MAX_ENVELOPE_BYTES + 1];
        assert_eq!(Envelope::parse(&big).unwrap_err().reason, Reason::TooLarge);
        let at_cap = vec![b' '; MAX_ENVELOPE_BYTES];
        assert_eq!(
            Envelope::parse(&at_cap).unwrap_err().reason,
            Reason::BadEnvelope
        );
    }

    #[test]
    fn envelope_shape_is_strict() {
        let ok = br#"{"payloadType":"t","payload":"","signatures":[{"keyid":"a","sig":"AA"}]}"#;
        assert!(Envelope::parse(ok).is_ok());
        let no_keyid = br#"{"payloadType":"t","payload":"","signatures":[{"sig":"AA"}]}"#;
        assert_eq!(Envelope::parse(no_keyid).unwrap().signatures[0].keyid, "");
        for bad in [
            &br#"{"payloadType":"t","payload":"","signatures":[],"x":1}"#[..],
            br#"{"payloadType":"t","payload":""}"#,
            br#"{"payloadType":"t","payload":"","signatures":[{"keyid":"a","sig":"AA","cert":""}]}"#,
            br#"[]"#,
            b"\xff",
        ] {
            assert_eq!(
                Envelope::parse(bad).unwrap_err().reason,
                Reason::BadEnvelope,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn payload_sha256_is_sha256_of_the_body() {
        assert_eq!(
            hex::encode(payload_sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
