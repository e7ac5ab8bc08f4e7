//! PVE's error forms. Owns the mapping from an API error to status, reason phrase and
//! body for a given version; handlers only construct [`ApiError`] values.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

/// An error an API handler returns, in PVE's terms.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    /// The message exactly as PVE carries it (usually with a trailing `\n`).
    pub message: String,
    /// Per-parameter errors of a 400.
    pub errors: Option<BTreeMap<String, String>>,
}

impl ApiError {
    /// A handler's `die "text\n"`: 500.
    pub fn die(text: impl Into<String>) -> ApiError {
        let mut message = text.into();
        if !message.ends_with('\n') {
            message.push('\n');
        }
        ApiError {
            status: 500,
            message,
            errors: None,
        }
    }

    /// `raise_perm_exc("<what>")`: 403 `Permission check failed (<what>)`.
    pub fn perm(what: impl AsRef<str>) -> ApiError {
        ApiError {
            status: 403,
            message: format!("Permission check failed ({})\n", what.as_ref()),
            errors: None,
        }
    }

    /// `raise_perm_exc()` without a reason.
    pub fn perm_bare() -> ApiError {
        ApiError {
            status: 403,
            message: "Permission check failed\n".to_owned(),
            errors: None,
        }
    }

    /// `raise_param_exc({...})`: 400 with per-parameter errors.
    pub fn params(errors: BTreeMap<String, String>) -> ApiError {
        ApiError {
            status: 400,
            message: "Parameter verification failed.\n".to_owned(),
            errors: Some(errors),
        }
    }

    /// One parameter error.
    pub fn param(name: &str, text: impl Into<String>) -> ApiError {
        let mut m = BTreeMap::new();
        m.insert(name.to_owned(), text.into());
        ApiError::params(m)
    }

    /// The REST handler's answer for an unknown path or method.
    pub fn not_implemented(method: &str, rel_path: &str) -> ApiError {
        ApiError {
            status: 501,
            message: format!("Method '{method} {rel_path}' not implemented"),
            errors: None,
        }
    }

    /// The reason phrase: the first line of the message, or PVE's generic 400 when the
    /// message would put CR/LF into the status line.
    pub fn reason(&self) -> String {
        first_line(&self.message)
    }

    /// The JSON body (`data: null`, `errors`, and `message` when the version has it).
    pub fn body(&self, with_message: bool) -> Value {
        let mut m = Map::new();
        m.insert("data".to_owned(), Value::Null);
        if let Some(errors) = &self.errors {
            m.insert("errors".to_owned(), json!(errors));
        }
        if with_message {
            m.insert("message".to_owned(), Value::String(self.message.clone()));
        }
        Value::Object(m)
    }
}

/// The first line of `text` (what pve-http-server puts into the status line).
pub fn first_line(text: &str) -> String {
    let line = text.split('\n').next().unwrap_or("");
    line.trim_end_matches('\r').replace('\r', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        let e = ApiError::perm("/vms/101, VM.PowerMgmt");
        assert_eq!(e.status, 403);
        assert_eq!(
            e.reason(),
            "Permission check failed (/vms/101, VM.PowerMgmt)"
        );
        assert_eq!(
            e.body(true),
            json!({"data":null,"message":"Permission check failed (/vms/101, VM.PowerMgmt)\n"})
        );
        assert_eq!(e.body(false), json!({"data":null}));
        let p = ApiError::param("upid", "no such task");
        assert_eq!(p.reason(), "Parameter verification failed.");
        assert_eq!(
            p.body(false),
            json!({"data":null,"errors":{"upid":"no such task"}})
        );
        assert_eq!(
            ApiError::die("CT 101 already running").message,
            "CT 101 already running\n"
        );
        assert_eq!(ApiError::die("a\nb\n").reason(), "a");
    }
}
