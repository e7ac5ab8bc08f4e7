//! [`Upid`]: a PVE task id, parsed and printed losslessly.
//!
//! Format: `UPID:<node>:<pid>:<pstart>:<starttime>:<type>:<id>:<user>:` with `pid` and
//! `starttime` as 8 hex digits and `pstart` as 8 or 9 (after ~497 days of uptime). The
//! trailing colon belongs to the UPID. `id` may be empty; `user` is the auth id, for a
//! token `user@realm!tokenid`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a string is not a UPID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a PVE task id (UPID) {text:?}: {reason}")]
pub struct UpidError {
    text: String,
    reason: &'static str,
}

/// A PVE task id. Equality and printing use the exact text PVE gave; the text fields are
/// kept as spans into it (the type stays small inside errors).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Upid {
    raw: String,
    pid: u32,
    pstart: u64,
    starttime: u32,
    /// Byte ranges of node, type, id and user in `raw`.
    spans: [(u16, u16); 4],
}

impl Upid {
    fn span(&self, i: usize) -> &str {
        let (a, b) = self.spans[i];
        &self.raw[a as usize..b as usize]
    }
    pub fn node(&self) -> &str {
        self.span(0)
    }
    /// The worker's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }
    /// The worker's start in clock ticks since boot.
    pub fn pstart(&self) -> u64 {
        self.pstart
    }
    /// Epoch seconds.
    pub fn starttime(&self) -> u32 {
        self.starttime
    }
    /// Worker type, e.g. `vzstart`, `vzdump`, `qmconfig`.
    pub fn task_type(&self) -> &str {
        self.span(1)
    }
    /// Usually the vmid; may be empty.
    pub fn id(&self) -> &str {
        self.span(2)
    }
    /// The auth id that started the task (`user@realm` or `user@realm!token`).
    pub fn user(&self) -> &str {
        self.span(3)
    }
    /// The exact text.
    pub fn as_str(&self) -> &str {
        &self.raw
    }
}

fn is_hex_len(s: &str, lens: &[usize]) -> bool {
    lens.contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn valid_node(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// `[^:\s/]` repeated.
fn valid_free(s: &str) -> bool {
    s.chars()
        .all(|c| c != ':' && c != '/' && !c.is_whitespace())
}

impl FromStr for Upid {
    type Err = UpidError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| UpidError {
            text: s.chars().take(200).collect(),
            reason,
        };
        if s.len() > 1024 {
            return Err(err("longer than 1024 bytes"));
        }
        let body = s
            .strip_prefix("UPID:")
            .ok_or_else(|| err("does not start with UPID:"))?;
        let body = body
            .strip_suffix(':')
            .ok_or_else(|| err("does not end with ':'"))?;
        let parts: Vec<&str> = body.split(':').collect();
        let [node, pid, pstart, starttime, task_type, id, user] = parts[..] else {
            return Err(err("expected 7 fields"));
        };
        if !valid_node(node) {
            return Err(err("invalid node name"));
        }
        if !is_hex_len(pid, &[8]) {
            return Err(err("pid is not 8 hex digits"));
        }
        if !is_hex_len(pstart, &[8, 9]) {
            return Err(err("pstart is not 8 or 9 hex digits"));
        }
        if !is_hex_len(starttime, &[8]) {
            return Err(err("starttime is not 8 hex digits"));
        }
        if task_type.is_empty() || !valid_free(task_type) {
            return Err(err("invalid task type"));
        }
        if !valid_free(id) {
            return Err(err("invalid id"));
        }
        if user.is_empty() || !valid_free(user) {
            return Err(err("invalid user"));
        }
        // The lengths are checked above, so these cannot overflow.
        let hex32 = |h: &str| u32::from_str_radix(h, 16).map_err(|_| err("bad hex"));
        // Byte spans of the fields: they follow `UPID:` one after the other, each ended by
        // one ':' (the length cap above keeps every offset within u16).
        let mut spans = [(0u16, 0u16); 7];
        let mut at = "UPID:".len();
        for (i, part) in parts.iter().enumerate() {
            spans[i] = (at as u16, (at + part.len()) as u16);
            at += part.len() + 1;
        }
        Ok(Upid {
            raw: s.to_string(),
            pid: hex32(pid)?,
            pstart: u64::from_str_radix(pstart, 16).map_err(|_| err("bad hex"))?,
            starttime: hex32(starttime)?,
            spans: [spans[0], spans[4], spans[5], spans[6]],
        })
    }
}

impl fmt::Display for Upid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

impl fmt::Debug for Upid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Upid({})", self.raw)
    }
}

impl Serialize for Upid {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.raw)
    }
}

impl<'de> Deserialize<'de> for Upid {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Sample {
        upid: String,
        node: String,
        pid: u32,
        pstart: u64,
        starttime: u32,
        #[serde(rename = "type")]
        task_type: String,
        id: String,
        user: String,
    }

    #[derive(Deserialize)]
    struct Samples {
        samples: Vec<Sample>,
    }

    fn samples() -> Vec<Sample> {
        let text = include_str!("../../../tests/fixtures/pve/upid-samples.json");
        serde_json::from_str::<Samples>(text).unwrap().samples
    }

    #[test]
    fn every_real_sample_parses_and_prints_back() {
        let all = samples();
        assert!(all.len() >= 8);
        for s in all {
            let u: Upid = s.upid.parse().unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(u.node(), s.node);
            assert_eq!(u.pid(), s.pid);
            assert_eq!(u.pstart(), s.pstart);
            assert_eq!(u.starttime(), s.starttime);
            assert_eq!(u.task_type(), s.task_type);
            assert_eq!(u.id(), s.id);
            assert_eq!(u.user(), s.user);
            assert_eq!(u.to_string(), s.upid);
            let json = serde_json::to_string(&u).unwrap();
            assert_eq!(serde_json::from_str::<Upid>(&json).unwrap(), u);
        }
    }

    #[test]
    fn nine_digit_pstart_and_lowercase_hex_round_trip() {
        let t = "UPID:pve:0000abcd:1A2B3C4D5:66a1b2c3:vzstart:101:agent@pve!deploy:";
        let u: Upid = t.parse().unwrap();
        assert_eq!(u.pstart(), 0x1A2B3C4D5);
        assert_eq!(u.pid(), 0xabcd);
        assert_eq!(u.to_string(), t);
    }

    #[test]
    fn malformed_upids_are_rejected() {
        for bad in [
            "",
            "UPID:pve:0003F2A1:01B3C4D5:66A1B2C3:vzstart:101:root@pam",
            // proxmoxer's test suite appended `done`; PVE's decoder rejects it too.
            "UPID:node1:000FF1FD:10F9374C:630D702C:vzdump:110:root@pam:done",
            "UPID:pve:3F2A1:01B3C4D5:66A1B2C3:vzstart:101:root@pam:",
            "UPID:pve:0003F2A1:01B3C4D5:66A1B2C3::101:root@pam:",
            "UPID:pve:0003F2A1:01B3C4D5:66A1B2C3:vzstart:101::",
            "UPID:-pve:0003F2A1:01B3C4D5:66A1B2C3:vzstart:101:root@pam:",
            "UPID:pve:0003F2A1:01B3C4D5:66A1B2C3:vz start:101:root@pam:",
            "UPID:pve:0003F2A1:01B3C4D5:66A1B2C3:vzstart:1/1:root@pam:",
            "UPID:pve:0003F2A1:0123456789:66A1B2C3:vzstart:101:root@pam:",
            "OK",
        ] {
            assert!(bad.parse::<Upid>().is_err(), "{bad}");
        }
        assert!(serde_json::from_str::<Upid>("\"OK\"").is_err());
    }
}
