//! Who is on the other end of a connection (`SO_PEERCRED`), whether we serve them, how
//! many connections each uid has open, and which of their refusals are not on record yet.
//!
//! Must never: do I/O beyond `SO_PEERCRED` and `/proc/<pid>/comm` (the server writes the
//! records this module decides on).

use std::collections::{BTreeMap, HashMap};
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::socket::{getsockopt, sockopt};
use serde::Serialize;
use serde_json::Value;

/// `/proc/<pid>/comm` (at most 16 bytes with its newline, one read).
fn comm_of(pid: i32) -> Option<String> {
    use std::io::Read;
    let mut buf = [0u8; 64];
    let n = std::fs::File::open(format!("/proc/{pid}/comm"))
        .and_then(|mut f| f.read(&mut buf))
        .ok()?;
    Some(
        String::from_utf8_lossy(&buf[..n])
            .trim_end_matches('\n')
            .chars()
            .take(32)
            .collect(),
    )
}

/// The peer as the kernel reports it at connect time, plus its command name where
/// `/proc` shows it (it may not: the process may be gone or hidden by `ProtectProc=`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Peer {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
    pub comm: Option<String>,
}

impl Peer {
    pub fn of(stream: &UnixStream) -> std::io::Result<Peer> {
        let cred = getsockopt(stream, sockopt::PeerCredentials).map_err(std::io::Error::from)?;
        let pid = cred.pid();
        Ok(Peer {
            pid,
            uid: cred.uid(),
            gid: cred.gid(),
            comm: comm_of(pid),
        })
    }

    /// Only root and the agent's uid are served. Group membership is not enough: the
    /// socket's group lets a process connect, the uid decides whether it is served.
    pub fn allowed(&self, agent_uid: u32) -> bool {
        self.uid == 0 || self.uid == agent_uid
    }
}

/// Connections one uid other than root may have open at once; a further one is closed at
/// once (and counted as a refusal). Root is not capped: it is outside the threat model
/// (it can stop the helper anyway) and the operator's own parallel calls should not fail.
pub const MAX_OPEN_PER_UID: usize = 8;
/// At most one `refused` record per uid in this time; refusals in between are counted
/// into the next one.
pub const REFUSAL_WINDOW: Duration = Duration::from_secs(1);

/// Refusals of one uid not on record yet: how many, by category, and the last one in
/// full (category, error, reason, op, args) with its peer.
#[derive(Debug, Clone)]
pub struct Refusals {
    pub count: u64,
    pub categories: BTreeMap<&'static str, u64>,
    pub last: Refused,
}

/// One refusal as the audit record describes it.
#[derive(Debug, Clone)]
pub struct Refused {
    pub peer: Peer,
    pub category: &'static str,
    pub error: &'static str,
    pub reason: String,
    pub op: Option<String>,
    pub args: Value,
}

#[derive(Debug, Default)]
struct Window {
    /// When this uid's last `refused` record was written.
    written: Option<Instant>,
    pending: Option<Refusals>,
}

/// Who is connected and who was refused lately, per uid: the connection cap and the
/// coalescing of refusals into at most one record per uid per [`REFUSAL_WINDOW`] (so a
/// flood costs O(1) records per second per uid, and its size and reasons are still on
/// record). Holds no I/O: the server writes what [`PeerBook::refused`] and
/// [`PeerBook::due`] hand it.
#[derive(Debug, Default)]
pub struct PeerBook {
    state: Mutex<BookState>,
}

#[derive(Debug, Default)]
struct BookState {
    open: HashMap<u32, usize>,
    windows: HashMap<u32, Window>,
}

/// One admitted connection; counted until dropped.
#[derive(Debug)]
pub struct Admitted<'a> {
    book: &'a PeerBook,
    uid: u32,
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        let mut st = self.book.lock();
        if let Some(n) = st.open.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                st.open.remove(&self.uid);
            }
        }
    }
}

impl PeerBook {
    fn lock(&self) -> std::sync::MutexGuard<'_, BookState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts a new connection of `uid`; `None` when that uid already has
    /// [`MAX_OPEN_PER_UID`] open (root: never).
    pub fn admit(&self, uid: u32) -> Option<Admitted<'_>> {
        let mut st = self.lock();
        let n = st.open.entry(uid).or_insert(0);
        if uid != 0 && *n >= MAX_OPEN_PER_UID {
            return None;
        }
        *n += 1;
        Some(Admitted { book: self, uid })
    }

    /// Notes a refusal; returns what to write now (this refusal with those counted since
    /// the uid's last record) or `None` when a record was written for this uid less than
    /// [`REFUSAL_WINDOW`] ago (it is counted into the next one).
    pub fn refused(&self, r: Refused, now: Instant) -> Option<Refusals> {
        let mut st = self.lock();
        let w = st.windows.entry(r.peer.uid).or_default();
        let p = w.pending.get_or_insert_with(|| Refusals {
            count: 0,
            categories: BTreeMap::new(),
            last: r.clone(),
        });
        p.count += 1;
        *p.categories.entry(r.category).or_insert(0) += 1;
        p.last = r;
        if w.written
            .is_some_and(|t| now.duration_since(t) < REFUSAL_WINDOW)
        {
            return None;
        }
        w.written = Some(now);
        w.pending.take()
    }

    /// Takes the counted refusals whose window has passed (all of them when `all`, e.g.
    /// before exiting), marking each uid as written now; forgets quiet uids.
    pub fn due(&self, now: Instant, all: bool) -> Vec<Refusals> {
        let mut st = self.lock();
        let mut out = Vec::new();
        st.windows.retain(|_, w| {
            let passed = w
                .written
                .is_none_or(|t| now.duration_since(t) >= REFUSAL_WINDOW);
            if let Some(p) = w.pending.take_if(|_| passed || all) {
                out.push(p);
                w.written = Some(now);
                return true;
            }
            w.pending.is_some() || !passed
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refusal(uid: u32, category: &'static str) -> Refused {
        Refused {
            peer: Peer {
                pid: 7,
                uid,
                gid: uid,
                comm: None,
            },
            category,
            error: "framing",
            reason: "r".into(),
            op: None,
            args: Value::Null,
        }
    }

    #[test]
    fn a_flood_costs_one_record_per_uid_per_window_and_keeps_its_count() {
        let book = PeerBook::default();
        let t0 = Instant::now();
        // The first refusal is written at once.
        let first = book.refused(refusal(1000, "peer"), t0).unwrap();
        assert_eq!(first.count, 1);
        // A thousand more within the window: none written; another uid is not held up.
        for i in 0..1000 {
            let cat = if i % 2 == 0 { "framing" } else { "limit" };
            assert!(book.refused(refusal(1000, cat), t0).is_none());
        }
        assert_eq!(book.refused(refusal(1001, "peer"), t0).unwrap().count, 1);
        assert!(book.due(t0 + Duration::from_millis(500), false).is_empty());
        // Once the window passed, one record carries all of them.
        let due = book.due(t0 + REFUSAL_WINDOW, false);
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].count, 1000);
        assert_eq!(due[0].categories["framing"], 500);
        assert_eq!(due[0].categories["limit"], 500);
        // The next refusal right after that summary waits for the next window.
        assert!(
            book.refused(refusal(1000, "peer"), t0 + REFUSAL_WINDOW)
                .is_none()
        );
        let rest = book.due(t0 + REFUSAL_WINDOW, true);
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].count, 1);
        // Quiet uids are forgotten.
        assert!(book.due(t0 + 10 * REFUSAL_WINDOW, false).is_empty());
        assert!(book.lock().windows.is_empty());
    }

    #[test]
    fn a_uid_gets_eight_connections_root_is_not_capped() {
        let book = PeerBook::default();
        let held: Vec<_> = (0..MAX_OPEN_PER_UID)
            .map(|_| book.admit(1000).unwrap())
            .collect();
        assert!(book.admit(1000).is_none());
        assert!(book.admit(1001).is_some());
        let roots: Vec<_> = (0..20).map(|_| book.admit(0).unwrap()).collect();
        drop(held);
        assert!(book.admit(1000).is_some());
        drop(roots);
    }
}
