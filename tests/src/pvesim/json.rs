//! JSON output the way Perl's `to_json` writes it: object keys in no stable order.
//! Owns only serialization; never changes values.

use serde_json::Value;

/// Serializes `value` compactly with every object's keys in random order.
pub fn to_string_shuffled(value: &Value, rng: &mut fastrand::Rng) -> String {
    let mut out = String::with_capacity(256);
    write_value(value, rng, &mut out);
    out
}

fn write_value(value: &Value, rng: &mut fastrand::Rng, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            rng.shuffle(&mut keys);
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_leaf(&Value::String(key.clone()), out);
                out.push(':');
                if let Some(v) = map.get(key) {
                    write_value(v, rng, out);
                }
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_value(v, rng, out);
            }
            out.push(']');
        }
        leaf => write_leaf(leaf, out),
    }
}

fn write_leaf(value: &Value, out: &mut String) {
    // Serializing a leaf `Value` cannot fail.
    out.push_str(&serde_json::to_string(value).unwrap_or_else(|_| "null".to_owned()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn same_value_different_key_orders() {
        let v = json!({"a":1,"b":"x","c":[1,{"d":null,"e":0.5}],"f":{"g":true},"h":"\n"});
        let mut rng = fastrand::Rng::with_seed(7);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..50 {
            let s = to_string_shuffled(&v, &mut rng);
            let back: Value = serde_json::from_str(&s).unwrap();
            assert_eq!(back, v);
            seen.insert(s);
        }
        assert!(seen.len() > 5, "keys should come in several orders");
    }
}
