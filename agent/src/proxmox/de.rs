//! Deserializers for PVE's JSON habits: numbers sent as strings (`"1.5"`, `"106"`),
//! booleans as `0`/`1`, absent meaning default.

use felhom_protocol::Vmid;
use serde::Deserialize;
use serde::de::{self, Deserializer, Unexpected};
use serde_json::Value;

fn value_to_f64(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn value_to_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64().or_else(|| {
            n.as_f64()
                .filter(|f| *f >= 0.0 && f.fract() == 0.0)
                .map(|f| f as u64)
        }),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn value_to_i64(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// 0/1 numbers, `"0"`/`"1"` strings, or real booleans.
pub(crate) fn value_to_bool(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::Number(n) => match n.as_u64() {
            Some(0) => Some(false),
            Some(1) => Some(true),
            _ => None,
        },
        Value::String(s) => match s.as_str() {
            "0" => Some(false),
            "1" => Some(true),
            _ => None,
        },
        _ => None,
    }
}

fn invalid<E: de::Error>(v: &Value, expected: &str) -> E {
    let unexp = match v {
        Value::Null => Unexpected::Unit,
        Value::Bool(b) => Unexpected::Bool(*b),
        Value::Number(_) => Unexpected::Other("number"),
        Value::String(s) => Unexpected::Str(s),
        Value::Array(_) => Unexpected::Seq,
        Value::Object(_) => Unexpected::Map,
    };
    E::invalid_value(unexp, &expected)
}

pub(crate) fn opt_f64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    match Option::<Value>::deserialize(d)? {
        None | Some(Value::Null) => Ok(None),
        Some(v) => value_to_f64(&v)
            .map(Some)
            .ok_or_else(|| invalid(&v, "a number or a numeric string")),
    }
}

pub(crate) fn opt_u64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    match Option::<Value>::deserialize(d)? {
        None | Some(Value::Null) => Ok(None),
        Some(v) => value_to_u64(&v)
            .map(Some)
            .ok_or_else(|| invalid(&v, "a whole number or a numeric string")),
    }
}

pub(crate) fn u64_flex<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let v = Value::deserialize(d)?;
    value_to_u64(&v).ok_or_else(|| invalid(&v, "a whole number or a numeric string"))
}

pub(crate) fn opt_i64<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    match Option::<Value>::deserialize(d)? {
        None | Some(Value::Null) => Ok(None),
        Some(v) => value_to_i64(&v)
            .map(Some)
            .ok_or_else(|| invalid(&v, "an integer or a numeric string")),
    }
}

/// Absent means false.
pub(crate) fn bool01<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    Ok(opt_bool01(d)?.unwrap_or(false))
}

pub(crate) fn opt_bool01<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    match Option::<Value>::deserialize(d)? {
        None | Some(Value::Null) => Ok(None),
        Some(v) => value_to_bool(&v)
            .map(Some)
            .ok_or_else(|| invalid(&v, "0 or 1")),
    }
}

/// A vmid as a number or (before PVE 8.2) a string.
pub(crate) fn vmid<'de, D: Deserializer<'de>>(d: D) -> Result<Vmid, D::Error> {
    let v = Value::deserialize(d)?;
    let n = value_to_u64(&v).ok_or_else(|| invalid(&v, "a vmid"))?;
    Vmid::new(n).map_err(de::Error::custom)
}

pub(crate) fn opt_vmid<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vmid>, D::Error> {
    match Option::<Value>::deserialize(d)? {
        None | Some(Value::Null) => Ok(None),
        Some(v) => {
            let n = value_to_u64(&v).ok_or_else(|| invalid(&v, "a vmid"))?;
            Vmid::new(n).map(Some).map_err(de::Error::custom)
        }
    }
}

/// `["0.15","0.05","0.01"]`, strings or numbers.
pub(crate) fn f64_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
    let items = Option::<Vec<Value>>::deserialize(d)?.unwrap_or_default();
    items
        .iter()
        .map(|v| value_to_f64(v).ok_or_else(|| invalid(v, "a number or a numeric string")))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize, Debug)]
    struct T {
        #[serde(default, deserialize_with = "opt_f64")]
        f: Option<f64>,
        #[serde(default, deserialize_with = "bool01")]
        b: bool,
        #[serde(deserialize_with = "vmid")]
        v: Vmid,
    }

    #[test]
    fn strings_numbers_and_absent() {
        let t: T = serde_json::from_str(r#"{"f":"1.5","b":1,"v":"106"}"#).unwrap();
        assert_eq!(t.f, Some(1.5));
        assert!(t.b);
        assert_eq!(t.v.get(), 106);
        let t: T = serde_json::from_str(r#"{"v":101}"#).unwrap();
        assert_eq!(t.f, None);
        assert!(!t.b);
        assert!(serde_json::from_str::<T>(r#"{"v":101,"b":2}"#).is_err());
        assert!(serde_json::from_str::<T>(r#"{"v":"abc"}"#).is_err());
        assert!(serde_json::from_str::<T>(r#"{"v":5}"#).is_err());
    }
}
