//! One line of text for an error and its sources (`outer: inner: root cause`), for
//! messages and log lines about transport failures (reqwest wraps hyper wraps io).
//!
//! Owns only the rendering; callers strip URLs or secrets before calling it.

/// `e` followed by each source that adds something (a source whose text is already in
/// the line, as reqwest's often repeat hyper's, is skipped).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let t = inner.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("{0}")]
    struct E(&'static str, #[source] Option<Box<E>>);

    #[test]
    fn sources_are_joined_and_repeats_skipped() {
        let root = E("connection refused", None);
        let mid = E(
            "tcp connect error: connection refused",
            Some(Box::new(root)),
        );
        let top = E("error sending request", Some(Box::new(mid)));
        assert_eq!(
            error_chain(&top),
            "error sending request: tcp connect error: connection refused"
        );
    }
}
