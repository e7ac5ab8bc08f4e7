//! Why an envelope was refused: the closed set of reason codes of issue 12 that apply to
//! one envelope on its own (replay, rollback, conflicts and preconditions are decided by
//! the agent with its journal, as are issue 13's `protected`, `not_reversible` and
//! `undo_point_failed`).
//!
//! Owns: [`Reason`] (its `as_str()` is the wire code) and [`Refusal`] (a reason plus a
//! message for humans). Must never: put secret or unbounded input in a message.

use std::fmt;

/// A refusal reason code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The envelope is larger than 64 KiB.
    TooLarge,
    /// Not a DSSE envelope: bad JSON, bad base64 payload, unknown fields, no or too many
    /// signatures.
    BadEnvelope,
    /// `payloadType` is not the one expected here.
    WrongType,
    /// No signature verifies under any trusted key.
    BadSignature,
    /// Fewer distinct trusted keys signed than the threshold asks for.
    BelowThreshold,
    /// The verified body is not a valid payload (JSON, field types, unknown fields).
    BadPayload,
    /// `v` is not 1.
    UnsupportedVersion,
    /// `agent_id` is not this agent's.
    WrongAgent,
    /// `node` is not this agent's node.
    WrongNode,
    /// Before `not_before - skew`.
    NotYetValid,
    /// At or after `not_after + skew`.
    Expired,
    /// `not_after - not_before` is above `max_validity_seconds`.
    WindowTooLong,
    /// `op` is not a kind this agent knows.
    UnknownOp,
    /// The grant is below the operation's class: its kind's (`delete_snapshot`, `destroy`,
    /// `release_undo` are irreversible), or the class its params make (a `set_config` that
    /// clears `protection` is irreversible).
    GrantMismatch,
    /// `target`, `expect` or `params` do not fit the kind.
    InvalidParams,
}

impl Reason {
    /// Every reason, in the order of issue 12's list.
    pub const ALL: [Reason; 15] = [
        Reason::TooLarge,
        Reason::BadEnvelope,
        Reason::WrongType,
        Reason::BadSignature,
        Reason::BelowThreshold,
        Reason::BadPayload,
        Reason::UnsupportedVersion,
        Reason::WrongAgent,
        Reason::WrongNode,
        Reason::NotYetValid,
        Reason::Expired,
        Reason::WindowTooLong,
        Reason::UnknownOp,
        Reason::GrantMismatch,
        Reason::InvalidParams,
    ];

    /// The snake_case wire code.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::TooLarge => "too_large",
            Reason::BadEnvelope => "bad_envelope",
            Reason::WrongType => "wrong_type",
            Reason::BadSignature => "bad_signature",
            Reason::BelowThreshold => "below_threshold",
            Reason::BadPayload => "bad_payload",
            Reason::UnsupportedVersion => "unsupported_version",
            Reason::WrongAgent => "wrong_agent",
            Reason::WrongNode => "wrong_node",
            Reason::NotYetValid => "not_yet_valid",
            Reason::Expired => "expired",
            Reason::WindowTooLong => "window_too_long",
            Reason::UnknownOp => "unknown_op",
            Reason::GrantMismatch => "grant_mismatch",
            Reason::InvalidParams => "invalid_params",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An envelope's refusal: the code and what exactly was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("refused ({reason}): {message}")]
pub struct Refusal {
    pub reason: Reason,
    pub message: String,
}

impl Refusal {
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        let mut message: String = message.into();
        if message.len() > 512 {
            let mut cut = 512;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push('…');
        }
        Refusal { reason, message }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_the_issue_codes_and_distinct() {
        let codes: Vec<&str> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            codes,
            [
                "too_large",
                "bad_envelope",
                "wrong_type",
                "bad_signature",
                "below_threshold",
                "bad_payload",
                "unsupported_version",
                "wrong_agent",
                "wrong_node",
                "not_yet_valid",
                "expired",
                "window_too_long",
                "unknown_op",
                "grant_mismatch",
                "invalid_params"
            ]
        );
    }

    #[test]
    fn long_messages_are_cut_on_a_char_boundary() {
        let r = Refusal::new(Reason::BadPayload, "é".repeat(400));
        assert!(r.message.len() <= 512 + '…'.len_utf8());
        assert!(r.message.ends_with('…'));
    }
}
