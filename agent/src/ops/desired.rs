//! The signed desired state from the hub (`reconcile.desired_source: "hub"`).
//!
//! Owns: [`HubDesired`], the desired-state provider reconcile follows when the source is the
//! hub: it takes documents the hub serves ([`HubDesired::offer`]), verifies them against
//! this host's current trust (`application/vnd.felhom.desired+json`, the `reversible`
//! threshold, bound to this `agent_id` and `node`), refuses a rollback of the generation
//! (per source, kept in the journal database), parses `guests` with the desired file's own
//! parser, keeps the whole envelope in the journal and hands the state to the engine. At
//! start and after every reload the kept envelope is verified again
//! ([`HubDesired::reverify`]): a document that no longer verifies (its key was removed,
//! operations were switched off) stops being handed out. Each outcome is a
//! [`DesiredDecision`], reported to the hub as a `desired` result.
//!
//! Config changes reconcile makes toward a signed desired state are not gated by the
//! reversibility gate (that gate is for operations); the document's signatures are the
//! authorization.
//!
//! Must never: hand the engine a document that did not verify against the current trust,
//! adopt a generation below (or equal to, with another payload) the adopted one, or parse a
//! byte of the payload before its signatures verified. Calls block on the journal (use
//! `spawn_blocking` from async code).

use std::sync::{Arc, Mutex};

use felhom_authz::{Context, Envelope, Reason, Trust, payload_sha256, verify_desired};

use crate::ops::wire::{DecisionState, OpResult, ResultKind};
use crate::reconcile::desired::{DesiredError, DesiredProvider, DesiredState};
use crate::reconcile::journal::Journal;
use crate::reconcile::journal::desired::{Adoption, DesiredRecord, DesiredSourceKind};
use crate::timestamp::Timestamp;

/// Reason code of a document the agent refuses because its generation went back.
pub const ROLLBACK: &str = "rollback";
/// Reason code when no signers file is installed (signed operations off).
pub const OPS_DISABLED: &str = "ops_disabled";
/// Same code as `felhom_authz::Reason::BadPayload` (a test checks).
const BAD_PAYLOAD: &str = "bad_payload";

/// The decision about one desired-state document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredDecision {
    /// `Applied` (adopted and handed to reconcile, or already in force), `Refused`, or
    /// `Failed` (the journal could not record it).
    pub state: DecisionState,
    /// The refusal code (`rollback`, `ops_disabled`, or a verification reason).
    pub reason: Option<&'static str>,
    pub message: String,
    /// The payload's generation, once it verified.
    pub generation: Option<u64>,
    /// Hex SHA-256 of the decoded payload; `None` when it could not be decoded.
    pub payload_sha256: Option<String>,
    /// Names of the distinct trusted keys that counted.
    pub signers: Vec<String>,
    /// The same document as the one in force: nothing changed and no result needs to be
    /// sent.
    pub unchanged: bool,
}

impl DesiredDecision {
    fn new(
        state: DecisionState,
        reason: Option<&'static str>,
        message: impl Into<String>,
    ) -> DesiredDecision {
        DesiredDecision {
            state,
            reason,
            message: message.into(),
            generation: None,
            payload_sha256: None,
            signers: Vec::new(),
            unchanged: false,
        }
    }

    fn refused(reason: &'static str, message: impl Into<String>) -> DesiredDecision {
        DesiredDecision::new(DecisionState::Refused, Some(reason), message)
    }

    fn failed(message: impl Into<String>) -> DesiredDecision {
        DesiredDecision::new(DecisionState::Failed, None, message)
    }

    fn applied(message: impl Into<String>) -> DesiredDecision {
        DesiredDecision::new(DecisionState::Applied, None, message)
    }

    fn about(mut self, generation: Option<u64>, sha: Option<String>) -> DesiredDecision {
        self.generation = generation;
        self.payload_sha256 = sha;
        self
    }

    /// The decision as the result sent to the hub (`kind: desired`; `op_id` and
    /// `delivery_id` null; decided now).
    pub fn to_result(&self, seq: u64) -> OpResult {
        let now = Timestamp::now();
        OpResult {
            seq,
            kind: ResultKind::Desired,
            op_id: None,
            generation: self.generation,
            payload_sha256: self.payload_sha256.clone(),
            delivery_id: None,
            state: self.state,
            reason: self.reason.map(str::to_string),
            message: Some(self.message.clone()),
            signers: self.signers.clone(),
            upids: Vec::new(),
            result: serde_json::Map::new(),
            started_at: Some(now),
            finished_at: Some(now),
        }
    }
}

/// What the provider hands the engine now.
#[derive(Debug)]
enum Serving {
    /// A kept document waits for [`HubDesired::reverify`]; the engine gets nothing yet.
    Unverified,
    /// In force. `sha` is the payload's (None: the empty state, no document adopted).
    State {
        state: Arc<DesiredState>,
        sha: Option<String>,
    },
    /// Nothing usable; the engine shows why and mutates nothing.
    Error(Arc<DesiredError>),
}

#[derive(Debug)]
struct Inner {
    serving: Serving,
    /// Bumped on every change of `serving`; `poll` hands out a change once.
    version: u64,
    polled: u64,
    /// The adopted document's generation (the rollback floor), as last read or written.
    kept: Option<u64>,
}

impl Inner {
    fn serve(&mut self, serving: Serving) {
        self.serving = serving;
        self.version += 1;
    }

    fn stop(&mut self, why: String) {
        self.serve(Serving::Error(Arc::new(DesiredError::Hub(why))));
    }

    fn in_force(&self) -> Option<(&Arc<DesiredState>, &str)> {
        match &self.serving {
            Serving::State {
                state,
                sha: Some(sha),
            } => Some((state, sha)),
            _ => None,
        }
    }
}

/// The hub's signed desired state, as a [`DesiredProvider`] (see the module docs).
#[derive(Debug)]
pub struct HubDesired {
    journal: Arc<Journal>,
    /// Held through a whole offer or re-verification (journal I/O included), so they
    /// happen one at a time; `inner` is locked only briefly, so `poll` never waits on disk.
    serial: Mutex<()>,
    inner: Mutex<Inner>,
}

/// Parses a verified document's guests with the desired file's parser.
fn parse_state(generation: u64, guests: Vec<serde_json::Value>) -> Result<DesiredState, String> {
    let doc = serde_json::json!({"generation": generation, "guests": guests});
    DesiredState::from_json(doc.to_string().as_bytes()).map_err(|e| e.to_string())
}

/// Hex SHA-256 of the envelope's decoded payload, when it decodes at all.
fn decoded_sha(raw: &[u8]) -> Option<String> {
    let body = Envelope::parse(raw).ok()?.body().ok()?;
    Some(hex::encode(payload_sha256(&body)))
}

const OPS_OFF: &str = "signed operations are off on this host (no signers file)";

impl HubDesired {
    /// Loads the kept document from the journal. It is not handed to the engine before
    /// [`HubDesired::reverify`] verified it against the current trust. With none kept the
    /// engine gets the empty state (no guests, no actions) at once.
    pub fn open(journal: Arc<Journal>) -> HubDesired {
        let (serving, kept) = match journal.desired_record(DesiredSourceKind::Hub) {
            Ok(None) => (
                Serving::State {
                    state: Arc::new(DesiredState::default()),
                    sha: None,
                },
                None,
            ),
            Ok(Some(rec)) => (Serving::Unverified, Some(rec.generation)),
            Err(e) => (Serving::Error(Arc::new(DesiredError::Journal(e))), None),
        };
        HubDesired {
            journal,
            serial: Mutex::new(()),
            inner: Mutex::new(Inner {
                serving,
                version: 1,
                polled: 0,
                kept,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The generation of the document in force now (handed to the engine); `None` when
    /// none is (none adopted, not verified yet, or stopped by a re-verification).
    pub fn applied_generation(&self) -> Option<u64> {
        self.lock().in_force().map(|(s, _)| s.generation)
    }

    /// The generation adopted last, in force or not: the floor below which documents are
    /// refused `rollback`.
    pub fn kept_generation(&self) -> Option<u64> {
        self.lock().kept
    }

    /// Verifies a desired-state envelope from the hub and adopts it when its generation
    /// is above the adopted one (see the module docs). `trust` is `None` when signed
    /// operations are off.
    pub fn offer(&self, raw: &[u8], trust: Option<&Trust>, ctx: &Context) -> DesiredDecision {
        let sha = decoded_sha(raw);
        let Some(trust) = trust else {
            return DesiredDecision::refused(OPS_DISABLED, OPS_OFF).about(None, sha);
        };
        let payload = match verify_desired(raw, trust, ctx) {
            Ok(p) => p,
            Err(r) => {
                return DesiredDecision::refused(r.reason.as_str(), r.message).about(None, sha);
            }
        };
        let generation = payload.generation;
        let sha = hex::encode(payload.payload_sha256);
        let signers = payload.signers.clone();
        let decided = |d: DesiredDecision| DesiredDecision {
            signers: signers.clone(),
            ..d.about(Some(generation), Some(sha.clone()))
        };
        let _serial = self.serial.lock().unwrap_or_else(|p| p.into_inner());
        let stored = match self.journal.desired_record(DesiredSourceKind::Hub) {
            Ok(r) => r,
            Err(e) => return decided(DesiredDecision::failed(format!("journal: {e}"))),
        };
        if let Some(rec) = &stored {
            self.lock().kept = Some(rec.generation);
            if let Some(refusal) = rollback(rec, generation, &sha) {
                return decided(DesiredDecision::refused(ROLLBACK, refusal));
            }
            if rec.sha256 == sha && self.lock().in_force().is_some_and(|(_, s)| s == sha) {
                return decided(DesiredDecision {
                    unchanged: true,
                    ..DesiredDecision::applied(format!(
                        "generation {generation} is already in force"
                    ))
                });
            }
        }
        let state = match parse_state(generation, payload.guests) {
            Ok(s) => s,
            Err(e) => return decided(DesiredDecision::refused(BAD_PAYLOAD, e)),
        };
        let Ok(text) = std::str::from_utf8(raw) else {
            // A parsed envelope is JSON, hence UTF-8; kept as text.
            return decided(DesiredDecision::refused(
                Reason::BadEnvelope.as_str(),
                "not UTF-8",
            ));
        };
        match self
            .journal
            .adopt_desired(DesiredSourceKind::Hub, generation, &sha, Some(text))
        {
            Ok(Adoption::Adopted(_)) => {}
            Ok(Adoption::Refused(rec)) => {
                self.lock().kept = Some(rec.generation);
                let why = rollback(&rec, generation, &sha).unwrap_or_default();
                return decided(DesiredDecision::refused(ROLLBACK, why));
            }
            Err(e) => return decided(DesiredDecision::failed(format!("journal: {e}"))),
        }
        {
            let mut inner = self.lock();
            inner.kept = Some(generation);
            inner.serve(Serving::State {
                state: Arc::new(state),
                sha: Some(sha.clone()),
            });
        }
        tracing::info!(generation, signers = ?signers, "signed desired state adopted");
        decided(DesiredDecision::applied(format!(
            "generation {generation} adopted"
        )))
    }

    /// Verifies the kept document again against the current trust (at start and after
    /// every reload). If it verifies it is handed to the engine (again) and `None` is
    /// returned; if not, the engine stops getting it (its status shows why) and the refused
    /// (or failed) decision is returned for reporting.
    pub fn reverify(&self, trust: Option<&Trust>, ctx: &Context) -> Option<DesiredDecision> {
        let _serial = self.serial.lock().unwrap_or_else(|p| p.into_inner());
        let rec = match self.journal.desired_record(DesiredSourceKind::Hub) {
            Ok(Some(rec)) => rec,
            Ok(None) => {
                self.lock().kept = None;
                if !matches!(self.lock().serving, Serving::State { .. }) {
                    self.lock().serve(Serving::State {
                        state: Arc::new(DesiredState::default()),
                        sha: None,
                    });
                }
                return None;
            }
            Err(e) => {
                let d = DesiredDecision::failed(format!("journal: {e}"));
                self.lock()
                    .serve(Serving::Error(Arc::new(DesiredError::Journal(e))));
                return Some(d);
            }
        };
        self.lock().kept = Some(rec.generation);
        let (generation, sha) = (rec.generation, rec.sha256.clone());
        let about = |d: DesiredDecision| d.about(Some(generation), Some(sha.clone()));
        let envelope = rec.envelope.unwrap_or_default();
        let Some(trust) = trust else {
            self.lock().stop(format!(
                "generation {generation} is not in force: {OPS_DISABLED}: {OPS_OFF}"
            ));
            return Some(about(DesiredDecision::refused(OPS_DISABLED, OPS_OFF)));
        };
        let payload = match verify_desired(envelope.as_bytes(), trust, ctx) {
            Ok(p) => p,
            Err(r) => {
                let code = r.reason.as_str();
                self.lock().stop(format!(
                    "generation {generation} no longer verifies: {code}: {}",
                    r.message
                ));
                tracing::warn!(generation, reason = code, message = %r.message,
                    "the kept signed desired state no longer verifies; reconcile stops following it");
                return Some(about(DesiredDecision::refused(code, r.message)));
            }
        };
        if payload.generation != generation || hex::encode(payload.payload_sha256) != sha {
            let why = "the kept envelope does not match its journal record";
            self.lock().stop(why.to_string());
            return Some(about(DesiredDecision::failed(why)));
        }
        if self.lock().in_force().is_some_and(|(_, s)| s == sha) {
            return None;
        }
        match parse_state(generation, payload.guests) {
            Ok(state) => {
                self.lock().serve(Serving::State {
                    state: Arc::new(state),
                    sha: Some(sha),
                });
                None
            }
            Err(e) => {
                self.lock()
                    .stop(format!("generation {generation}: {BAD_PAYLOAD}: {e}"));
                Some(about(DesiredDecision {
                    signers: payload.signers,
                    ..DesiredDecision::refused(BAD_PAYLOAD, e)
                }))
            }
        }
    }
}

/// Why `generation` with payload `sha` would roll back the adopted record, if it would.
fn rollback(rec: &DesiredRecord, generation: u64, sha: &str) -> Option<String> {
    if generation < rec.generation {
        Some(format!(
            "generation {generation} is below the applied {}",
            rec.generation
        ))
    } else if generation == rec.generation && rec.sha256 != sha {
        Some(format!(
            "generation {generation} is the applied one with a different payload"
        ))
    } else {
        None
    }
}

impl DesiredProvider for HubDesired {
    fn poll(&self) -> Option<Result<Arc<DesiredState>, Arc<DesiredError>>> {
        let mut inner = self.lock();
        if inner.polled == inner.version {
            return None;
        }
        inner.polled = inner.version;
        match &inner.serving {
            Serving::Unverified => None,
            Serving::State { state, .. } => Some(Ok(state.clone())),
            Serving::Error(e) => Some(Err(e.clone())),
        }
    }

    fn describe(&self) -> String {
        match self.lock().serving {
            Serving::Unverified => "hub (kept document not verified yet)".to_string(),
            _ => "hub".to_string(),
        }
    }
}

#[cfg(test)]
mod tests;
