//! Validated value types used on both sides of the root fence and by the Proxmox client.
//!
//! Every type here has private fields, a fallible constructor, and serde `try_from` so that
//! JSON and bincode decoding go through the same check. Must never: expose a way to build
//! an unchecked value outside `#[cfg(test)]`.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why a value was rejected. Carries the field name so the message says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

impl ValueError {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        ValueError::Invalid {
            field,
            reason: reason.into(),
        }
    }
}

/// A Proxmox guest id. PVE accepts 100..=999_999_999 (`pve-vmid` format in pve-common).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u64", into = "u32")]
pub struct Vmid(u32);

impl Vmid {
    pub const MIN: u32 = 100;
    pub const MAX: u32 = 999_999_999;

    pub fn new(v: u64) -> Result<Self, ValueError> {
        if (Self::MIN as u64..=Self::MAX as u64).contains(&v) {
            Ok(Vmid(v as u32))
        } else {
            Err(ValueError::invalid(
                "vmid",
                format!("{v} is outside {}..={}", Self::MIN, Self::MAX),
            ))
        }
    }

    pub fn get(self) -> u32 {
        self.0
    }
}

impl TryFrom<u64> for Vmid {
    type Error = ValueError;
    fn try_from(v: u64) -> Result<Self, Self::Error> {
        Vmid::new(v)
    }
}

impl From<Vmid> for u32 {
    fn from(v: Vmid) -> u32 {
        v.0
    }
}

impl std::str::FromStr for Vmid {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || s.len() > 10 {
            return Err(ValueError::invalid(
                "vmid",
                format!("{s:?} is not a number"),
            ));
        }
        Vmid::new(
            s.parse::<u64>()
                .map_err(|e| ValueError::invalid("vmid", e.to_string()))?,
        )
    }
}

impl fmt::Display for Vmid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmid_range_is_pves() {
        assert!(Vmid::new(99).is_err());
        assert_eq!(Vmid::new(100).unwrap().get(), 100);
        assert_eq!(Vmid::new(999_999_999).unwrap().get(), 999_999_999);
        assert!(Vmid::new(1_000_000_000).is_err());
        assert!("0101x".parse::<Vmid>().is_err());
        assert!("".parse::<Vmid>().is_err());
        assert_eq!("101".parse::<Vmid>().unwrap().get(), 101);
    }

    #[test]
    fn vmid_decoding_validates() {
        assert!(serde_json::from_str::<Vmid>("42").is_err());
        assert_eq!(serde_json::from_str::<Vmid>("120").unwrap().get(), 120);
        assert_eq!(
            serde_json::to_string(&Vmid::new(120).unwrap()).unwrap(),
            "120"
        );
    }
}
