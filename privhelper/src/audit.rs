//! The audited call log: JSON lines in a SHA-256 hash chain, shared by the three
//! instances.
//!
//! Contract (the hub reporter reads these files verbatim; see docs/privhelper.md):
//! - each line is one JSON object ending in `\n`, with an integer `seq` (1, 2, 3, …,
//!   continuing across rotation), `prev` (lower-case hex SHA-256 of the previous line's
//!   exact bytes without its `\n`; 64 zeros for the very first record), `time` (RFC 3339
//!   UTC), `kind` (`intent`, `outcome`, `refused`, `torn`, `cut`) and, where known,
//!   `class`, `peer {pid, uid, gid, comm}`, `op`, `args`;
//! - `<log>.head` holds the last `seq` and `hash`, replaced atomically after each append
//!   (a temp file in the same directory is written and renamed over it), and only once
//!   the records it names are on disk: after a crash the head can lag the log, never
//!   lead it;
//! - `<log>.lock` serializes writers (flock) across the instances. It is mode 0600 (root
//!   only): a reader could otherwise open it and hold a lock on it, and `flock` works on a
//!   read-only descriptor. The wait for it is bounded ([`LOCK_WAIT`]); past that the
//!   append fails (the server answers `audit` and runs nothing);
//! - past `audit_max_bytes` the file is renamed to `<log>.1` (older ones shift up one) and
//!   the new file's first `prev` is the old file's last hash. The oldest files beyond
//!   `audit_keep` are dropped only while they hold nothing the hub may still need: every
//!   record is either acknowledged (its `seq` is at or below the agent's cursor, read from
//!   `audit_ack` at rotation time) or a `refused` record. So refusals can never push an
//!   unreported intent or outcome out of the log.
//!
//! Must never: drop a record silently. A torn last line found at open is overwritten in
//! place by a `torn` record describing it (length, SHA-256, text) before anything is cut,
//! so a crash in between leaves the description; a log shorter than its head is
//! described in a `cut` record that keeps failing `audit verify`.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

pub const ZERO_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";
const FILE_MODE: u32 = 0o640;
/// The writers' lock file: nobody but root may open it (see the module docs).
const LOCK_MODE: u32 = 0o600;
/// Longest wait for the writers' lock. Writers hold it for one append (a write, an
/// fdatasync, a head exchange), so this is only reached when something holds it that
/// should not: the append fails closed instead of stalling every instance.
pub const LOCK_WAIT: Duration = Duration::from_secs(15);
/// Largest acknowledged-cursor file read (it holds `{"seq":N}`).
const MAX_ACK_BYTES: u64 = 4096;
/// Longest tail we scan for the last record (records are far smaller).
const MAX_SCAN: u64 = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("audit log {path}: refused: {reason}")]
    Unsafe { path: PathBuf, reason: String },
}

fn suffixed(p: &Path, suffix: &str) -> PathBuf {
    let mut s: OsString = p.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

pub fn head_path(log: &Path) -> PathBuf {
    suffixed(log, ".head")
}
pub fn lock_path(log: &Path) -> PathBuf {
    suffixed(log, ".lock")
}
pub fn rotated_path(log: &Path, n: u32) -> PathBuf {
    suffixed(log, &format!(".{n}"))
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// One record to append; `seq`, `prev`, `time` and `kind` are added by the writer.
#[derive(Debug, Clone)]
pub struct Entry {
    pub kind: &'static str,
    pub fields: Map<String, Value>,
}

impl Entry {
    pub fn new(kind: &'static str) -> Self {
        Entry {
            kind,
            fields: Map::new(),
        }
    }
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.fields.insert(key.to_string(), value.into());
        self
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Tip {
    seq: u64,
    hash: String,
}

/// What an instance keeps between appends, all of it only trusted under the writers'
/// lock and after checking that the names still lead to it (another instance, or
/// someone else, may have appended, rotated or replaced files since).
#[derive(Debug, Default)]
struct Cache {
    /// The lock file, kept open, with its (dev, ino).
    lock: Option<(File, (u64, u64))>,
    /// The active file as our last append left it.
    active: Option<Active>,
    /// The head and its exchange partner (`<log>.head.tmp`) by (dev, ino), kept open so
    /// a head replacement is one in-place write and one exchange. At most two.
    heads: Vec<((u64, u64), File)>,
}

#[derive(Debug)]
struct Active {
    file: File,
    /// (dev, ino, len) after our last append.
    key: (u64, u64, u64),
    tip: Tip,
}

#[derive(Debug)]
pub struct AuditLog {
    log: PathBuf,
    /// The class of the instance writing (for the records it writes on its own).
    writer: Option<String>,
    max_bytes: u64,
    keep: u32,
    /// The agent's acknowledged-cursor file (see [`read_ack`]); none: nothing is acked.
    ack: Option<PathBuf>,
    /// The cursor as read by [`AuditLog::with_ack`], i.e. while the instance still had
    /// its capabilities (see there).
    ack_at_start: u64,
    /// [`LOCK_WAIT`], shorter in unit tests.
    lock_wait: Duration,
    euid: u32,
    cache: Mutex<Cache>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> AuditError + '_ {
    move |source| AuditError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn open_nofollow(path: &Path, write: bool) -> std::io::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .mode(FILE_MODE);
    if write {
        o.append(true).create(true);
    }
    o.open(path)
}

#[cfg(test)]
thread_local! {
    /// Test hook: stop (as a crash would) after the `torn` record is written and before
    /// the rest of the torn line is cut off.
    static CRASH_BEFORE_TORN_CUT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Opens (creating it 0600 if missing) the writers' lock file, never through a symlink.
fn open_lock(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(LOCK_MODE)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(path)
}

/// Takes an exclusive `flock` on `file`, waiting at most until `deadline`. Polled with
/// `LOCK_NB` (std has no timed flock); the first retries come within 100 µs, so a lock
/// held for one append costs little more than a blocking wait.
fn lock_until(file: &File, deadline: Instant) -> std::io::Result<()> {
    let mut pause = Duration::from_micros(100);
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(()),
            Err(std::fs::TryLockError::WouldBlock) => {}
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the writers' lock was not free in time (held by something that is not a writer?)",
            ));
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(10));
    }
}

/// The agent's acknowledged cursor (`{"seq":N}`: the last record the hub accepted), or 0
/// when it cannot be read. Read as root from a file the agent writes, so: no symlink
/// followed, no FIFO waited on, a regular file only, a few KiB at most; its content is
/// only ever compared with numbers, never echoed.
fn read_ack(path: &Path) -> u64 {
    let Ok(f) = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK | nix::libc::O_CLOEXEC)
        .open(path)
    else {
        return 0;
    };
    if !f.metadata().is_ok_and(|md| md.is_file()) {
        return 0;
    }
    let mut s = String::new();
    if f.take(MAX_ACK_BYTES).read_to_string(&mut s).is_err() {
        return 0;
    }
    serde_json::from_str::<Value>(&s)
        .ok()
        .and_then(|v| v.get("seq").and_then(Value::as_u64))
        .unwrap_or(0)
}

/// Whether a rotated file may be dropped: every record in it is acknowledged (`seq` at or
/// below `ack`) or a refusal. A line that cannot be read as a record keeps the file.
fn droppable(path: &Path, ack: u64) -> std::io::Result<bool> {
    use std::io::BufRead;
    let f = open_nofollow(path, false)?;
    for line in std::io::BufReader::new(f).split(b'\n') {
        let line = line?;
        let Ok(v) = serde_json::from_slice::<Value>(&line) else {
            return Ok(false);
        };
        let seq = v.get("seq").and_then(Value::as_u64);
        let kind = v.get("kind").and_then(Value::as_str);
        match (seq, kind) {
            (Some(seq), _) if seq <= ack => {}
            (Some(_), Some("refused")) => {}
            _ => return Ok(false),
        }
    }
    Ok(true)
}

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Reads `(seq, hash)` from a head file; `None` if absent.
pub fn read_head(log: &Path) -> std::io::Result<Option<(u64, String)>> {
    let p = head_path(log);
    let mut s = String::new();
    match open_nofollow(&p, false) {
        Ok(f) => {
            f.take(4096).read_to_string(&mut s)?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    }
    let bad = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let v: Value = serde_json::from_str(&s).map_err(|e| bad(format!("head file: {e}")))?;
    match (
        v.get("seq").and_then(Value::as_u64),
        v.get("hash").and_then(Value::as_str),
        v.get("check").and_then(Value::as_str),
    ) {
        (Some(seq), Some(hash), Some(check)) if check == head_check(seq, hash) => {
            Ok(Some((seq, hash.to_string())))
        }
        (Some(_), Some(_), _) => Err(bad("head file damaged: its check does not match".into())),
        _ => Err(bad("head file lacks seq/hash".into())),
    }
}

/// First 16 hex digits of SHA-256("<seq>:<hash>"): lets a reader tell a damaged head
/// block from a valid one.
fn head_check(seq: u64, hash: &str) -> String {
    sha256_hex(format!("{seq}:{hash}").as_bytes())[..16].to_string()
}

/// The head is one fixed-size block, well inside one disk sector.
const HEAD_LEN: usize = 192;

fn head_block(seq: u64, hash: &str) -> Vec<u8> {
    let json = format!(
        "{{\"seq\":{seq},\"hash\":\"{hash}\",\"check\":\"{}\"}}",
        head_check(seq, hash)
    );
    let mut b = json.into_bytes();
    b.resize(HEAD_LEN - 1, b' ');
    b.push(b'\n');
    b
}

/// `renameat2(old, new, RENAME_EXCHANGE)`: swaps the two names atomically.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn exchange(old: &Path, new: &Path) -> std::io::Result<()> {
    use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};
    renameat2(AT_FDCWD, old, AT_FDCWD, new, RenameFlags::RENAME_EXCHANGE).map_err(Into::into)
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn exchange(_old: &Path, _new: &Path) -> std::io::Result<()> {
    Err(std::io::Error::from_raw_os_error(nix::libc::ENOSYS))
}

/// The file system (or kernel) cannot exchange names.
fn is_unsupported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(nix::libc::EINVAL) | Some(nix::libc::ENOSYS) | Some(nix::libc::EOPNOTSUPP)
    )
}

/// The end of the active file: its last complete line and any bytes after it.
struct TailScan {
    last_line: Option<Vec<u8>>,
    /// (offset, bytes) of an unterminated last line.
    torn: Option<(u64, Vec<u8>)>,
}

fn scan_tail(f: &mut File, len: u64) -> std::io::Result<TailScan> {
    let mut buf: Vec<u8> = Vec::new();
    let mut start = len;
    loop {
        let newlines = buf.iter().filter(|&&b| b == b'\n').count();
        // Enough once we hold the newline ending the last complete line and the one
        // before it (whether or not a torn fragment follows).
        if start == 0 || newlines >= 2 || len - start >= MAX_SCAN {
            break;
        }
        let step = start.min(64 * 1024);
        start -= step;
        let mut chunk = vec![0u8; step as usize];
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(&mut chunk)?;
        chunk.extend_from_slice(&buf);
        buf = chunk;
    }
    let mut torn = None;
    let mut body: &[u8] = &buf;
    if !buf.is_empty() && buf.last() != Some(&b'\n') {
        let cut = buf.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        torn = Some((start + cut as u64, buf[cut..].to_vec()));
        body = &buf[..cut];
    }
    let last_line = if body.is_empty() {
        None
    } else {
        let without_nl = &body[..body.len() - 1];
        let from = without_nl
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        if from == 0 && start > 0 {
            // The line is longer than the scan window; treat as unreadable.
            None
        } else {
            Some(without_nl[from..].to_vec())
        }
    };
    Ok(TailScan { last_line, torn })
}

impl AuditLog {
    /// Prepares the directory (created 0750 if missing; it must not be a symlink nor
    /// writable by others). Returns warnings about its group for the start-up log.
    pub fn open(
        log: &Path,
        max_bytes: u64,
        keep: u32,
        agent_gid: u32,
    ) -> Result<(AuditLog, Vec<String>), AuditError> {
        let dir = log.parent().unwrap_or(Path::new("/"));
        let mut warnings = Vec::new();
        if std::fs::symlink_metadata(dir).is_err() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o750)
                .create(dir)
                .map_err(io_err(dir))?;
        }
        let md = std::fs::symlink_metadata(dir).map_err(io_err(dir))?;
        if !md.is_dir() {
            return Err(AuditError::Unsafe {
                path: dir.to_path_buf(),
                reason: "not a directory (symlinks refused)".into(),
            });
        }
        let euid = nix::unistd::geteuid().as_raw();
        if md.uid() != 0 && md.uid() != euid {
            return Err(AuditError::Unsafe {
                path: dir.to_path_buf(),
                reason: format!("owned by uid {}", md.uid()),
            });
        }
        if md.permissions().mode() & 0o002 != 0 {
            return Err(AuditError::Unsafe {
                path: dir.to_path_buf(),
                reason: "writable by others".into(),
            });
        }
        if md.gid() != agent_gid {
            warnings.push(format!(
                "audit directory {} has group {}, not the agent's group {agent_gid}: the agent cannot read the log",
                dir.display(),
                md.gid()
            ));
        }
        Ok((
            AuditLog {
                log: log.to_path_buf(),
                writer: None,
                max_bytes,
                keep,
                ack: None,
                ack_at_start: 0,
                lock_wait: LOCK_WAIT,
                euid,
                cache: Mutex::new(Cache::default()),
            },
            warnings,
        ))
    }

    /// Names the instance's class in the `torn`/`cut` records it writes.
    pub fn for_class(mut self, class: &str) -> Self {
        self.writer = Some(class.to_string());
        self
    }

    /// Where rotation reads the agent's acknowledged cursor (see the module docs). Read
    /// once here too, and to be called before the instance drops its capabilities: the
    /// agent's state directory is 0700, and the smart and usb instances keep no
    /// `CAP_DAC_*`, so at rotation time they may not be able to read it. Rotation uses the
    /// larger of the two readings (a stale one only keeps more).
    pub fn with_ack(mut self, ack: Option<PathBuf>) -> Self {
        self.ack_at_start = ack.as_deref().map_or(0, read_ack);
        self.ack = ack;
        self
    }

    /// The keys every record has (`class`, `peer`, `op`, `args`), for the records the
    /// writer adds on its own.
    fn own(&self, kind: &'static str) -> Entry {
        Entry::new(kind)
            .with(
                "class",
                self.writer.clone().map(Value::from).unwrap_or(Value::Null),
            )
            .with("peer", Value::Null)
            .with("op", Value::Null)
            .with("args", Value::Null)
    }

    /// Appends `entry` (after any `torn`/`cut` record the state of the file calls for),
    /// makes it durable (fdatasync) and then replaces the head, all under the writers'
    /// lock. When this returns, the record is on disk (an intent before its operation
    /// runs). Returns the entry's `seq`.
    ///
    /// Why every record is synced before the head names it: the head is how a removed
    /// tail is told apart from a log that simply ended, so a head naming a record that
    /// was still only in the page cache would, after a power loss, look like records were
    /// cut (`audit verify` would fail for good). Synced first, the head can only lag.
    pub fn append(&self, entry: &Entry) -> Result<u64, AuditError> {
        self.append_then(entry, |_| ())
            .map(|(seq, ())| seq)
            .map_err(|(e, _)| e)
    }

    /// [`AuditLog::append`] that runs `after_write` once the record is written (it is in
    /// the page cache: a crash of the helper no longer loses it) and before the sync and
    /// the head replacement, still holding the writers' lock. The server sends an
    /// operation's reply there, so the client does not wait for the outcome's fdatasync,
    /// while a reader taking the lock still never sees a head behind the log.
    /// `after_write` must not block for long (it holds up the other instances).
    ///
    /// Errors: `(error, None)` when nothing was written (`after_write` did not run),
    /// `(error, Some(r))` when the sync or the head failed after it ran.
    pub fn append_then<R>(
        &self,
        entry: &Entry,
        after_write: impl FnOnce(u64) -> R,
    ) -> Result<(u64, R), (AuditError, Option<R>)> {
        let mut guard = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let cache = &mut *guard;
        let lock_p = lock_path(&self.log);
        let lock = self
            .take_lock(&mut cache.lock)
            .map_err(|e| (io_err(&lock_p)(e), None))?;
        let result = match self.write_locked(&mut cache.active, entry) {
            Err(e) => Err((e, None)),
            Ok(tip) => {
                let r = after_write(tip.seq);
                let synced = match &cache.active {
                    Some(a) => a.file.sync_data().map_err(io_err(&self.log)),
                    None => Ok(()),
                };
                match synced.and_then(|()| self.replace_head(&mut cache.heads, &tip)) {
                    Ok(()) => Ok((tip.seq, r)),
                    Err(e) => Err((e, Some(r))),
                }
            }
        };
        let _ = lock.unlock();
        if result.is_err() {
            // Start over from the names next time.
            *cache = Cache::default();
        }
        result
    }

    /// Takes the writers' lock on the kept lock file, opening it if needed. A lock on a
    /// file that is no longer under the lock's name excludes nobody, so the name is
    /// checked once the lock is held, and a replaced lock file is opened anew. A lock
    /// file others could open (left by an older version, mode 0640) is replaced by a
    /// private one while its lock is held, so two writers never hold different files.
    /// Each wait is bounded by [`LOCK_WAIT`] (`TimedOut`).
    fn take_lock<'a>(&self, slot: &'a mut Option<(File, (u64, u64))>) -> std::io::Result<&'a File> {
        let path = lock_path(&self.log);
        let deadline = Instant::now() + self.lock_wait;
        for _ in 0..4 {
            let (file, id) = match slot.take() {
                Some(kept) => kept,
                None => {
                    let f = open_lock(&path)?;
                    let md = f.metadata()?;
                    (f, (md.dev(), md.ino()))
                }
            };
            lock_until(&file, deadline)?;
            match std::fs::symlink_metadata(&path) {
                Ok(md) if (md.dev(), md.ino()) == id => {
                    if md.mode() & 0o7777 == LOCK_MODE && (md.uid() == 0 || md.uid() == self.euid) {
                        return Ok(&slot.insert((file, id)).0);
                    }
                    let fresh = suffixed(&path, ".new");
                    let _ = std::fs::remove_file(&fresh);
                    let made = OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(LOCK_MODE)
                        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
                        .open(&fresh)
                        .and_then(|_| std::fs::rename(&fresh, &path));
                    let _ = file.unlock();
                    made?;
                }
                // Replaced or removed: let go of it and open what the name holds now.
                _ => {
                    let _ = file.unlock();
                }
            }
        }
        Err(std::io::Error::other(
            "the lock file keeps being replaced under us",
        ))
    }

    fn open_active(&self) -> Result<(File, std::fs::Metadata), AuditError> {
        let f = open_nofollow(&self.log, true).map_err(io_err(&self.log))?;
        let md = f.metadata().map_err(io_err(&self.log))?;
        if !md.is_file() {
            return Err(AuditError::Unsafe {
                path: self.log.clone(),
                reason: "not a regular file".into(),
            });
        }
        if md.uid() != 0 && md.uid() != self.euid {
            return Err(AuditError::Unsafe {
                path: self.log.clone(),
                reason: format!("owned by uid {}", md.uid()),
            });
        }
        if md.permissions().mode() & 0o7777 != FILE_MODE {
            f.set_permissions(std::fs::Permissions::from_mode(FILE_MODE))
                .map_err(io_err(&self.log))?;
        }
        Ok((f, md))
    }

    /// Writes `entry` (and any `torn`/`cut` record first) to the active file in one
    /// write, leaving that file and the new tip (the entry's `seq` and hash) in `slot`.
    ///
    /// The file kept from our last append is used again only while the log's name still
    /// leads to it with the length we left (no other instance appended, nobody rotated,
    /// replaced or changed it); otherwise the file is opened and checked anew and the tip
    /// worked out from its end.
    fn write_locked(&self, slot: &mut Option<Active>, entry: &Entry) -> Result<Tip, AuditError> {
        let named = match std::fs::symlink_metadata(&self.log) {
            Ok(md) => Some(md),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err(&self.log)(e)),
        };
        let reusable = match (slot.take(), &named) {
            (Some(a), Some(md))
                if (md.dev(), md.ino()) == (a.key.0, a.key.1)
                    && md.is_file()
                    && md.permissions().mode() & 0o7777 == FILE_MODE
                    && (md.uid() == 0 || md.uid() == self.euid) =>
            {
                Some(a)
            }
            _ => None,
        };
        let mut pending: Vec<Entry> = Vec::new();
        let (mut f, len, mut tip) = match reusable {
            Some(a) if named.as_ref().is_some_and(|md| md.len() == a.key.2) => {
                (a.file, a.key.2, a.tip)
            }
            Some(mut a) => {
                let len = named.as_ref().map_or(0, |md| md.len());
                let tip = self.find_tip(&mut a.file, len, &mut pending)?;
                (a.file, len, tip)
            }
            None => {
                let (mut f, md) = self.open_active()?;
                let tip = self.find_tip(&mut f, md.len(), &mut pending)?;
                (f, md.len(), tip)
            }
        };
        if len > self.max_bytes {
            // The file being retired is made durable before it is renamed.
            f.sync_data().map_err(io_err(&self.log))?;
            self.rotate()?;
            f = self.open_active()?.0;
        }
        let mut buf = Vec::with_capacity(1024 * (pending.len() + 1));
        for p in &pending {
            self.render_record(&mut buf, &mut tip, p)?;
        }
        self.render_record(&mut buf, &mut tip, entry)?;
        f.write_all(&buf).map_err(io_err(&self.log))?;
        let md = f.metadata().map_err(io_err(&self.log))?;
        *slot = Some(Active {
            file: f,
            key: (md.dev(), md.ino(), md.len()),
            tip: tip.clone(),
        });
        Ok(tip)
    }

    /// Works out the last record from the file (and head), repairing a torn tail and
    /// noting a cut in `pending`.
    fn find_tip(
        &self,
        f: &mut File,
        len: u64,
        pending: &mut Vec<Entry>,
    ) -> Result<Tip, AuditError> {
        let scan = scan_tail(f, len).map_err(io_err(&self.log))?;
        let head = match read_head(&self.log) {
            Ok(h) => h,
            // A damaged head cannot tell us about a cut; say so and go on (it is rewritten
            // after this append). Refusing to log would stop every operation.
            Err(e) => {
                eprintln!(
                    "felhom-privhelper: warning: {}: {e}; continuing from the log itself",
                    head_path(&self.log).display()
                );
                None
            }
        };
        let mut tip = match &scan.last_line {
            Some(line) => {
                let seq = serde_json::from_slice::<Value>(line)
                    .ok()
                    .and_then(|v| v.get("seq").and_then(Value::as_u64))
                    .or_else(|| head.as_ref().map(|h| h.0))
                    .unwrap_or(0);
                Tip {
                    seq,
                    hash: sha256_hex(line),
                }
            }
            None => match &head {
                Some((seq, hash)) => Tip {
                    seq: *seq,
                    hash: hash.clone(),
                },
                None => Tip {
                    seq: 0,
                    hash: ZERO_HASH.to_string(),
                },
            },
        };
        if let Some((hseq, hhash)) = &head
            && *hseq > tip.seq
        {
            pending.push(
                self.own("cut")
                    .with(
                        "reason",
                        "the log ends before the record its head file names: records were removed",
                    )
                    .with("head_seq", *hseq)
                    .with("head_hash", hhash.clone())
                    .with("log_last_seq", tip.seq),
            );
            // Keep seq monotonic for readers that already saw the removed records.
            tip.seq = *hseq;
        }
        if let Some((offset, bytes)) = &scan.torn {
            self.replace_torn_tail(f, *offset, bytes, &mut tip)?;
        }
        Ok(tip)
    }

    /// Overwrites a torn last line (no newline: a write was interrupted) with a `torn`
    /// record describing it, then cuts off what is left of it. The record is written and
    /// synced first, so a crash before the cut leaves the description in the log (and a
    /// shorter torn fragment, which the next open describes in turn); cut first, a crash
    /// would lose the fragment without a trace.
    fn replace_torn_tail(
        &self,
        f: &File,
        offset: u64,
        bytes: &[u8],
        tip: &mut Tip,
    ) -> Result<(), AuditError> {
        use std::os::unix::fs::FileExt;
        let text: String = String::from_utf8_lossy(bytes).chars().take(1024).collect();
        let record = self
            .own("torn")
            .with("reason", "the last line had no newline when the log was opened (a write was interrupted); this record was written over it and describes it")
            .with("torn", json!({"offset": offset, "bytes": bytes.len(), "sha256": sha256_hex(bytes), "text": text}));
        let mut buf = Vec::with_capacity(2048);
        let mut next = tip.clone();
        self.render_record(&mut buf, &mut next, &record)?;
        // `f` appends; a positioned write needs a descriptor without O_APPEND, on the
        // very same file.
        let w = OpenOptions::new()
            .write(true)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
            .open(&self.log)
            .map_err(io_err(&self.log))?;
        let (a, b) = (
            f.metadata().map_err(io_err(&self.log))?,
            w.metadata().map_err(io_err(&self.log))?,
        );
        if (a.dev(), a.ino()) != (b.dev(), b.ino()) {
            return Err(AuditError::Unsafe {
                path: self.log.clone(),
                reason: "the log was replaced while its torn tail was being repaired".into(),
            });
        }
        w.write_all_at(&buf, offset).map_err(io_err(&self.log))?;
        w.sync_data().map_err(io_err(&self.log))?;
        #[cfg(test)]
        if CRASH_BEFORE_TORN_CUT.with(|c| c.get()) {
            return Err(io_err(&self.log)(std::io::Error::other(
                "simulated crash between the torn record and the cut",
            )));
        }
        let end = offset + buf.len() as u64;
        if a.len().max(b.len()) > end {
            w.set_len(end).map_err(io_err(&self.log))?;
            w.sync_data().map_err(io_err(&self.log))?;
        }
        *tip = next;
        Ok(())
    }

    /// Renders one record after `tip` into `buf` (with its `\n`) and advances `tip`.
    fn render_record(
        &self,
        buf: &mut Vec<u8>,
        tip: &mut Tip,
        entry: &Entry,
    ) -> Result<u64, AuditError> {
        let seq = tip.seq + 1;
        let mut obj = Map::new();
        obj.insert("seq".into(), seq.into());
        obj.insert("prev".into(), tip.hash.clone().into());
        obj.insert("time".into(), crate::clock::now_rfc3339().into());
        obj.insert("kind".into(), entry.kind.into());
        for (k, v) in &entry.fields {
            obj.insert(k.clone(), v.clone());
        }
        let start = buf.len();
        serde_json::to_writer(&mut *buf, &Value::Object(obj)).map_err(|e| AuditError::Io {
            path: self.log.clone(),
            source: std::io::Error::other(e),
        })?;
        tip.seq = seq;
        tip.hash = sha256_hex(&buf[start..]);
        buf.push(b'\n');
        Ok(seq)
    }

    /// Replaces the head atomically: the new block is written into the temp file
    /// `<log>.head.tmp` (same directory) and renamed over the head with
    /// `renameat2(RENAME_EXCHANGE)`, so any reader opening the head gets either the old or
    /// the new file, each holding one complete block. The exchange leaves the previous
    /// head under the temp name, to be overwritten next time.
    ///
    /// The records the head names are already on disk (see [`AuditLog::append`]); the head
    /// itself is not fsynced, nor is the directory: if a crash loses this exchange or the
    /// block written into the temp file, the head is an earlier one (it lags the log,
    /// which `audit verify` accepts), and an earlier head also names records on disk.
    /// Both inodes keep their one allocated block, so the exchange never depends on data
    /// that is not on disk yet (a block written in place is all old or all new: it lies in
    /// one sector; `check` would expose anything else).
    ///
    /// Why not a fresh temp file per append renamed over the head: that allocates and frees
    /// an inode and a block every time, and on ext4 the replace-by-rename heuristic
    /// (auto_da_alloc) pushes the new file's data out at the rename and the next
    /// fdatasync's journal commit waits for it; measured here, +0.3 ms per operation
    /// against +0.03 ms for the exchange. Where the file system cannot exchange names
    /// (e.g. NFS, older ZFS), the fresh temp file is synced and renamed over the head.
    fn replace_head(
        &self,
        heads: &mut Vec<((u64, u64), File)>,
        tip: &Tip,
    ) -> Result<(), AuditError> {
        let head = head_path(&self.log);
        let tmp = suffixed(&self.log, ".head.tmp");
        let block = head_block(tip.seq, &tip.hash);
        if !self.write_temp_in_place(heads, &tmp, &block)? {
            self.write_temp_fresh(&tmp, &block)?;
        }
        match exchange(&tmp, &head) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // No head yet (a new log): the first one is made durable once, with its
                // directory entry.
                let f = open_nofollow(&tmp, false).map_err(io_err(&tmp))?;
                f.sync_data().map_err(io_err(&tmp))?;
                std::fs::rename(&tmp, &head).map_err(io_err(&head))?;
                let dir = self.log.parent().unwrap_or(Path::new("/"));
                fsync_dir(dir).map_err(io_err(dir))
            }
            Err(e) if is_unsupported(&e) => {
                // No exchange here: the temp file must be on disk before it replaces the
                // head, or a crash could leave an empty head.
                let f = open_nofollow(&tmp, false).map_err(io_err(&tmp))?;
                f.sync_data().map_err(io_err(&tmp))?;
                std::fs::rename(&tmp, &head).map_err(io_err(&head))
            }
            Err(e) => Err(io_err(&head)(e)),
        }
    }

    /// Overwrites the temp file's block in place; `false` when there is no usable temp
    /// file (missing, a symlink, not a regular file of one block, or not ours). The two
    /// inodes the head and temp names swap between are kept open in `heads`; which one
    /// the temp name holds now is read from the name (only writers holding the lock
    /// rename these names, and an inode we hold open keeps its number).
    fn write_temp_in_place(
        &self,
        heads: &mut Vec<((u64, u64), File)>,
        tmp: &Path,
        block: &[u8],
    ) -> Result<bool, AuditError> {
        use std::os::unix::fs::FileExt;
        let usable = |md: &std::fs::Metadata| {
            md.is_file() && md.len() == HEAD_LEN as u64 && (md.uid() == 0 || md.uid() == self.euid)
        };
        let md = match std::fs::symlink_metadata(tmp) {
            Ok(md) if usable(&md) => md,
            _ => return Ok(false),
        };
        let id = (md.dev(), md.ino());
        if let Some((_, f)) = heads.iter().find(|(k, _)| *k == id) {
            f.write_all_at(block, 0).map_err(io_err(tmp))?;
            return Ok(true);
        }
        let f = match OpenOptions::new()
            .write(true)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
            .open(tmp)
        {
            Ok(f) => f,
            Err(_) => return Ok(false),
        };
        let md = f.metadata().map_err(io_err(tmp))?;
        if !usable(&md) {
            return Ok(false);
        }
        f.write_all_at(block, 0).map_err(io_err(tmp))?;
        if heads.len() >= 2 {
            heads.remove(0);
        }
        heads.push(((md.dev(), md.ino()), f));
        Ok(true)
    }

    /// Creates the temp file anew with `block`, synced (so the block it holds is on disk
    /// before any exchange can make it the head).
    fn write_temp_fresh(&self, tmp: &Path, block: &[u8]) -> Result<(), AuditError> {
        match std::fs::remove_file(tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(tmp)(e)),
        }
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
            .open(tmp)
            .map_err(io_err(tmp))?;
        f.write_all(block).map_err(io_err(tmp))?;
        f.sync_data().map_err(io_err(tmp))
    }

    /// Shifts every rotated file up one and the active file to `.1`, then drops the
    /// oldest files beyond `keep` while [`droppable`] (from the oldest end only, so the
    /// numbering stays contiguous).
    fn rotate(&self) -> Result<(), AuditError> {
        let mut n = 0;
        while std::fs::symlink_metadata(rotated_path(&self.log, n + 1)).is_ok() {
            n += 1;
        }
        for k in (1..=n).rev() {
            let from = rotated_path(&self.log, k);
            let to = rotated_path(&self.log, k + 1);
            std::fs::rename(&from, &to).map_err(io_err(&from))?;
        }
        let first = rotated_path(&self.log, 1);
        std::fs::rename(&self.log, &first).map_err(io_err(&self.log))?;
        let mut total = n + 1;
        if total > self.keep {
            let ack = self
                .ack
                .as_deref()
                .map_or(0, read_ack)
                .max(self.ack_at_start);
            while total > self.keep {
                let oldest = rotated_path(&self.log, total);
                if !droppable(&oldest, ack).map_err(io_err(&oldest))? {
                    break;
                }
                std::fs::remove_file(&oldest).map_err(io_err(&oldest))?;
                total -= 1;
            }
        }
        let dir = self.log.parent().unwrap_or(Path::new("/"));
        fsync_dir(dir).map_err(io_err(dir))?;
        Ok(())
    }
}

/// Result of a successful verification.
#[derive(Debug)]
pub struct VerifyReport {
    pub records: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub files: Vec<PathBuf>,
    pub notes: Vec<String>,
    /// Intents whose outcome never came, oldest first. The chain is whole, so no record
    /// was removed: the helper stopped while the operation ran (crash, power loss, kill),
    /// or it is still running. Reported, not a failure: a crash is a fact to show, and
    /// failing would leave verify failing forever after one.
    pub open_intents: Vec<OpenIntent>,
}

/// An intent without an outcome (see [`VerifyReport::open_intents`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenIntent {
    pub seq: u64,
    pub op: String,
    pub file: PathBuf,
    pub line: usize,
}

/// The first bad record.
#[derive(Debug, thiserror::Error)]
#[error("{}:{line}: {}{reason}", file.display(), seq.map(|s| format!("seq {s}: ")).unwrap_or_default())]
pub struct VerifyFailure {
    pub file: PathBuf,
    pub line: usize,
    pub seq: Option<u64>,
    pub reason: String,
}

/// The `N` of every `<log>.N` in the log's directory, sorted.
fn rotated_numbers(log: &Path) -> std::io::Result<Vec<u32>> {
    let dir = log.parent().unwrap_or(Path::new("/"));
    let Some(name) = log.file_name().map(|n| n.as_encoded_bytes().to_vec()) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry_name = entry?.file_name();
        let b = entry_name.as_encoded_bytes();
        if b.len() > name.len() + 1 && b.starts_with(&name) && b[name.len()] == b'.' {
            let digits = &b[name.len() + 1..];
            if digits.iter().all(u8::is_ascii_digit)
                && digits[0] != b'0'
                && let Some(n) = std::str::from_utf8(digits)
                    .ok()
                    .and_then(|d| d.parse().ok())
            {
                out.push(n);
            }
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Checks every present file (oldest rotated first), the chain across them, and the head.
pub fn verify(log: &Path) -> Result<VerifyReport, VerifyFailure> {
    // Read a consistent log + head while helpers may be writing: the writers' lock,
    // shared. (No lock file: no writer has ever run.)
    let _lock = match File::open(lock_path(log)) {
        Ok(f) => {
            f.lock_shared().map_err(|e| VerifyFailure {
                file: lock_path(log),
                line: 0,
                seq: None,
                reason: format!("cannot take the lock: {e}"),
            })?;
            Some(f)
        }
        Err(_) => None,
    };
    let fail = |file: &Path, line: usize, seq: Option<u64>, reason: String| VerifyFailure {
        file: file.to_path_buf(),
        line,
        seq,
        reason,
    };
    let rotated = rotated_numbers(log).map_err(|e| {
        fail(
            log.parent().unwrap_or(Path::new("/")),
            0,
            None,
            format!("cannot list the log's directory: {e}"),
        )
    })?;
    // Rotation shifts names up one by one from the top: the numbers in use are 1..=N.
    if let Some(k) = (1..=rotated.len() as u32).find(|k| rotated.binary_search(k).is_err()) {
        let last = rotated.last().copied().unwrap_or(k);
        return Err(fail(
            &rotated_path(log, k),
            0,
            None,
            format!(
                "rotated file missing while {} exists: a file was removed",
                rotated_path(log, last).display()
            ),
        ));
    }
    let mut files: Vec<PathBuf> = rotated
        .iter()
        .rev()
        .map(|&k| rotated_path(log, k))
        .collect();
    if std::fs::symlink_metadata(log).is_ok() {
        files.push(log.to_path_buf());
    } else {
        for other in [head_path(log), lock_path(log)] {
            if std::fs::symlink_metadata(&other).is_ok() {
                return Err(fail(
                    log,
                    0,
                    None,
                    format!(
                        "the log is missing but {} exists: the log was removed",
                        other.display()
                    ),
                ));
            }
        }
    }
    let mut w = Walk::default();
    let mut where_last = (log.to_path_buf(), 0usize);
    for file in &files {
        let bytes =
            std::fs::read(file).map_err(|e| fail(file, 0, None, format!("cannot read: {e}")))?;
        if !bytes.is_empty() && bytes.last() != Some(&b'\n') {
            let line_no = bytes.iter().filter(|&&b| b == b'\n').count() + 1;
            // Check everything before the torn line first, so an earlier fault is named first.
            let cut = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            check_lines(file, &bytes[..cut], &mut w)?;
            let prev = &w.prev;
            return Err(fail(
                file,
                line_no,
                prev.as_ref().map(|p| p.0 + 1),
                format!(
                    "torn record: the last line has no newline ({} bytes) after seq {}",
                    bytes.len() - cut,
                    prev.as_ref().map_or(0, |p| p.0)
                ),
            ));
        }
        check_lines(file, &bytes, &mut w)?;
        where_last = (file.clone(), bytes.iter().filter(|&&b| b == b'\n').count());
    }
    let head = read_head(log).map_err(|e| {
        fail(
            &head_path(log),
            0,
            None,
            format!("head file unreadable: {e}"),
        )
    })?;
    let Walk {
        prev,
        records,
        first_seq,
        mut notes,
        seen,
        open,
    } = w;
    match (&prev, head) {
        (None, None) => {}
        (Some(_), None) => {
            return Err(fail(&head_path(log), 0, None, "head file missing".into()));
        }
        (None, Some((hseq, _))) => {
            return Err(fail(
                log,
                0,
                Some(hseq),
                format!("log is empty but the head names seq {hseq}: records removed (truncated)"),
            ));
        }
        (Some((lseq, lhash)), Some((hseq, hhash))) => {
            if hseq > *lseq {
                return Err(fail(
                    &where_last.0,
                    where_last.1,
                    Some(*lseq),
                    format!(
                        "log ends at seq {lseq} but the head names seq {hseq}: records {}..={hseq} were removed (truncated)",
                        lseq + 1
                    ),
                ));
            }
            if hseq == *lseq && hhash != *lhash {
                return Err(fail(
                    &where_last.0,
                    where_last.1,
                    Some(*lseq),
                    "the last record was altered: its hash does not match the head".into(),
                ));
            }
            if hseq < *lseq {
                match seen.iter().find(|(s, _)| *s == hseq) {
                    Some((_, h)) if *h == hhash => notes.push(format!(
                        "head names seq {hseq}, behind the last record {lseq} (the head was not replaced after the last append, e.g. after a power loss)"
                    )),
                    _ => {
                        return Err(fail(
                            &head_path(log),
                            0,
                            Some(hseq),
                            format!("the head names seq {hseq} with a hash no record of that seq has"),
                        ));
                    }
                }
            }
        }
    }
    // An intent whose outcome never came. The chain above is whole and the head matches,
    // so the outcome was not removed: the helper stopped while the operation ran (crash,
    // power loss, kill), or it is still running at this moment.
    let open_intents = open
        .into_iter()
        .map(|(seq, (file, line, op))| OpenIntent {
            seq,
            op,
            file,
            line,
        })
        .collect();
    Ok(VerifyReport {
        records,
        first_seq,
        last_seq: prev.map(|p| p.0),
        files,
        notes,
        open_intents,
    })
}

/// What [`verify`] carries from line to line and file to file.
#[derive(Debug, Default)]
struct Walk {
    /// `seq` and hash of the last record checked.
    prev: Option<(u64, String)>,
    records: u64,
    first_seq: Option<u64>,
    notes: Vec<String>,
    seen: Vec<(u64, String)>,
    /// Intents not (yet) followed by their outcome: seq → (file, line, op).
    open: std::collections::BTreeMap<u64, (PathBuf, usize, String)>,
}

fn check_lines(file: &Path, bytes: &[u8], w: &mut Walk) -> Result<(), VerifyFailure> {
    let Walk {
        prev,
        records,
        first_seq,
        notes,
        seen,
        open,
    } = w;
    let fail = |line: usize, seq: Option<u64>, reason: String| VerifyFailure {
        file: file.to_path_buf(),
        line,
        seq,
        reason,
    };
    if bytes.is_empty() {
        return Ok(());
    }
    let body = &bytes[..bytes.len() - 1];
    let all: Vec<&[u8]> = body.split(|&b| b == b'\n').collect();
    let later_seqs: Vec<Option<u64>> = all
        .iter()
        .map(|l| {
            serde_json::from_slice::<Value>(l)
                .ok()
                .and_then(|v| v.get("seq").and_then(Value::as_u64))
        })
        .collect();
    for (i, line) in all.iter().copied().enumerate() {
        let line_no = i + 1;
        let v: Value = serde_json::from_slice(line).map_err(|e| {
            fail(
                line_no,
                prev.as_ref().map(|p| p.0 + 1),
                format!("not a JSON record ({e}): edited or corrupted"),
            )
        })?;
        let seq = v
            .get("seq")
            .and_then(Value::as_u64)
            .ok_or_else(|| fail(line_no, None, "no integer seq".into()))?;
        let p = v
            .get("prev")
            .and_then(Value::as_str)
            .ok_or_else(|| fail(line_no, Some(seq), "no prev".into()))?;
        if v.get("kind").and_then(Value::as_str) == Some("cut") {
            return Err(fail(
                line_no,
                Some(seq),
                format!(
                    "the helper found the log cut: records after seq {} up to seq {} were removed",
                    v.get("log_last_seq").and_then(Value::as_u64).unwrap_or(0),
                    v.get("head_seq").and_then(Value::as_u64).unwrap_or(0)
                ),
            ));
        }
        match prev {
            None => {
                if seq == 1 && p != ZERO_HASH {
                    return Err(fail(
                        line_no,
                        Some(seq),
                        "first record's prev is not 64 zeros".into(),
                    ));
                }
                if seq != 1 {
                    notes.push(format!(
                        "chain starts at seq {seq} (older records rotated away)"
                    ));
                }
                *first_seq = Some(seq);
            }
            Some((pseq, phash)) => {
                if seq <= *pseq {
                    return Err(fail(
                        line_no,
                        Some(seq),
                        format!(
                            "out of order: follows seq {pseq} (records reordered or duplicated)"
                        ),
                    ));
                }
                if seq != *pseq + 1 {
                    let expected = *pseq + 1;
                    let reason = if later_seqs[i + 1..].contains(&Some(expected)) {
                        format!(
                            "out of order: seq {seq} comes before seq {expected} (records reordered)"
                        )
                    } else {
                        format!("records {expected}..={} are missing (removed)", seq - 1)
                    };
                    return Err(fail(line_no, Some(seq), reason));
                }
                if p != phash {
                    return Err(fail(
                        line_no.saturating_sub(1).max(1),
                        Some(*pseq),
                        format!(
                            "record seq {pseq} was altered: its hash does not match the prev of seq {seq}"
                        ),
                    ));
                }
            }
        }
        match v.get("kind").and_then(Value::as_str) {
            Some("intent") => {
                let op = v.get("op").and_then(Value::as_str).unwrap_or("?");
                open.insert(seq, (file.to_path_buf(), line_no, op.to_string()));
            }
            Some("outcome") => {
                if let Some(i) = v.get("intent_seq").and_then(Value::as_u64) {
                    open.remove(&i);
                }
            }
            _ => {}
        }
        let hash = sha256_hex(line);
        seen.push((seq, hash.clone()));
        *prev = Some((seq, hash));
        *records += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "felhom-audit-unit-{}-{}",
            std::process::id(),
            fastish()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
    fn fastish() -> u128 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    }

    fn open(log: &Path, max: u64) -> AuditLog {
        AuditLog::open(log, max, 3, 0).unwrap().0
    }

    #[test]
    fn chain_rotation_and_verify() {
        let d = tmp();
        let log = d.join("a.jsonl");
        let a = open(&log, 4096);
        for i in 0..60 {
            a.append(&Entry::new("refused").with("i", i)).unwrap();
        }
        let r = verify(&log).unwrap();
        assert_eq!(r.last_seq, Some(60));
        assert!(rotated_path(&log, 1).exists());
        assert!(!rotated_path(&log, 4).exists());
        // The new file's first prev is the old file's last line hash.
        let old = std::fs::read_to_string(rotated_path(&log, 1)).unwrap();
        let last_old = old.lines().last().unwrap();
        let new = std::fs::read_to_string(&log).unwrap();
        let first_new: Value = serde_json::from_str(new.lines().next().unwrap()).unwrap();
        assert_eq!(first_new["prev"], sha256_hex(last_old.as_bytes()));
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// Two instances sharing one log, each keeping its files open between appends: each
    /// notices the other's appends and rotations, a torn tail left by a third party, and a
    /// lock file or head replaced under it.
    #[test]
    fn writers_keeping_files_open_follow_each_other() {
        let d = tmp();
        let log = d.join("a.jsonl");
        let (a, b) = (open(&log, 2048), open(&log, 2048));
        for i in 0..40u64 {
            let w = if i % 3 == 0 { &b } else { &a };
            assert_eq!(
                w.append(&Entry::new("refused").with("i", i)).unwrap(),
                i + 1
            );
        }
        assert!(rotated_path(&log, 1).exists(), "the writers rotated");
        let r = verify(&log).unwrap();
        assert_eq!(r.last_seq, Some(40));
        assert_eq!(read_head(&log).unwrap().unwrap().0, 40);

        // A torn line appended behind both writers' backs is noticed by the next one.
        OpenOptions::new()
            .append(true)
            .open(&log)
            .unwrap()
            .write_all(b"{\"seq\":41")
            .unwrap();
        assert_eq!(a.append(&Entry::new("refused")).unwrap(), 42);
        let text = std::fs::read_to_string(&log).unwrap();
        let kinds: Vec<String> = text
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap()["kind"].to_string())
            .collect();
        assert_eq!(kinds[kinds.len() - 2..], ["\"torn\"", "\"refused\""]);

        // A lock file replaced under the name: both writers move to the new one.
        let lock = lock_path(&log);
        std::fs::remove_file(&lock).unwrap();
        b.append(&Entry::new("refused")).unwrap();
        assert!(
            lock.exists(),
            "the writer went on with a lock nobody else can find"
        );
        let held = File::open(&lock).unwrap();
        held.lock().unwrap();
        // `a` still holds the old lock file open; it must wait for the new one.
        std::thread::scope(|scope| {
            let (tx, rx) = std::sync::mpsc::channel();
            let a = &a;
            scope.spawn(move || {
                a.append(&Entry::new("refused")).unwrap();
                tx.send(()).unwrap();
            });
            assert!(
                rx.recv_timeout(std::time::Duration::from_millis(300))
                    .is_err(),
                "a writer appended while the (new) lock file was held"
            );
            held.unlock().unwrap();
            rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
        });

        // A head removed and a temp file replaced: the kept inodes are not written to.
        std::fs::remove_file(head_path(&log)).unwrap();
        std::fs::remove_file(suffixed(&log, ".head.tmp")).unwrap();
        a.append(&Entry::new("refused")).unwrap();
        b.append(&Entry::new("refused")).unwrap();
        let r = verify(&log).unwrap();
        assert_eq!(r.last_seq, Some(46));
        assert_eq!(read_head(&log).unwrap().unwrap().0, 46);
        std::fs::remove_dir_all(&d).unwrap();
    }

    fn kinds_and_seqs(log: &Path) -> Vec<(String, u64)> {
        let mut files: Vec<PathBuf> = rotated_numbers(log)
            .unwrap()
            .into_iter()
            .rev()
            .map(|k| rotated_path(log, k))
            .collect();
        files.push(log.to_path_buf());
        files
            .iter()
            .flat_map(|f| {
                std::fs::read_to_string(f)
                    .unwrap()
                    .lines()
                    .map(|l| {
                        let v: Value = serde_json::from_str(l).unwrap();
                        (
                            v["kind"].as_str().unwrap().to_string(),
                            v["seq"].as_u64().unwrap(),
                        )
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Refusals alone never push an intent or outcome the hub has not acknowledged out of
    /// the log: files beyond `keep` stay until the agent's cursor passes them; files of
    /// refusals only, or of acknowledged records, are dropped as before.
    #[test]
    fn rotation_keeps_what_the_hub_has_not_acknowledged() {
        let d = tmp();
        let log = d.join("a.jsonl");
        let ack = d.join("audit-cursor.json");
        let a = open(&log, 4096).with_ack(Some(ack.clone()));
        // Refusals only: dropped down to `keep` (3) rotated files.
        for _ in 0..100 {
            a.append(&Entry::new("refused").with("reason", "x".repeat(200)))
                .unwrap();
        }
        assert_eq!(rotated_numbers(&log).unwrap(), [1, 2, 3]);
        let first = a
            .append(&Entry::new("intent").with("op", "smart_read"))
            .unwrap();
        a.append(&Entry::new("outcome").with("intent_seq", first))
            .unwrap();
        // A flood of refusals after it: the files holding the intent and all after it stay.
        for _ in 0..200 {
            a.append(&Entry::new("refused").with("reason", "x".repeat(200)))
                .unwrap();
        }
        let kept = kinds_and_seqs(&log);
        assert!(kept.contains(&("intent".into(), first)), "{kept:?}");
        assert!(kept.contains(&("outcome".into(), first + 1)));
        assert!(rotated_numbers(&log).unwrap().len() > 3);
        verify(&log).unwrap();
        // A symlink, a FIFO or garbage as the cursor acknowledges nothing.
        std::os::unix::fs::symlink("/etc/passwd", &ack).unwrap();
        a.append(&Entry::new("refused").with("reason", "x".repeat(4000)))
            .unwrap();
        a.append(&Entry::new("refused")).unwrap();
        assert!(kinds_and_seqs(&log).contains(&("intent".into(), first)));
        std::fs::remove_file(&ack).unwrap();
        nix::unistd::mkfifo(&ack, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        a.append(&Entry::new("refused").with("reason", "x".repeat(4000)))
            .unwrap();
        a.append(&Entry::new("refused")).unwrap();
        assert!(kinds_and_seqs(&log).contains(&("intent".into(), first)));
        std::fs::remove_file(&ack).unwrap();
        // The hub accepted them: the next rotation drops the old files down to `keep`.
        std::fs::write(&ack, format!("{{\"seq\": {}}}", first + 1)).unwrap();
        a.append(&Entry::new("refused").with("reason", "x".repeat(4000)))
            .unwrap();
        a.append(&Entry::new("refused")).unwrap();
        assert_eq!(rotated_numbers(&log).unwrap(), [1, 2, 3]);
        assert!(!kinds_and_seqs(&log).iter().any(|(k, _)| k == "intent"));
        verify(&log).unwrap();
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn verify_reports_an_open_intent_a_missing_rotated_file_and_a_missing_log() {
        let d = tmp();
        let log = d.join("a.jsonl");
        let a = open(&log, 1 << 20);
        let i = a
            .append(&Entry::new("intent").with("op", "usb_mount"))
            .unwrap();
        a.append(&Entry::new("refused")).unwrap();
        let r = verify(&log).unwrap();
        assert_eq!(
            r.open_intents,
            [OpenIntent {
                seq: i,
                op: "usb_mount".into(),
                file: log.clone(),
                line: 1
            }]
        );
        a.append(&Entry::new("outcome").with("intent_seq", i))
            .unwrap();
        assert_eq!(verify(&log).unwrap().open_intents, []);

        // Rotated files .1 … .3; removing .1 and .2 leaves a hole below .3.
        let b = open(&log, 4096).with_ack(Some(d.join("ack")));
        std::fs::write(d.join("ack"), "{\"seq\": 1000000}").unwrap();
        while rotated_numbers(&log).unwrap().len() < 3 {
            b.append(&Entry::new("refused").with("r", "x".repeat(300)))
                .unwrap();
        }
        verify(&log).unwrap();
        std::fs::remove_file(rotated_path(&log, 1)).unwrap();
        std::fs::remove_file(rotated_path(&log, 2)).unwrap();
        let e = verify(&log).unwrap_err();
        assert!(e.reason.contains("rotated file missing"), "{e}");
        assert_eq!(e.file, rotated_path(&log, 1));

        // No log beside its head and lock.
        let log2 = d.join("b.jsonl");
        open(&log2, 1 << 20).append(&Entry::new("refused")).unwrap();
        std::fs::remove_file(&log2).unwrap();
        let e = verify(&log2).unwrap_err();
        assert!(e.reason.contains("the log is missing"), "{e}");
        std::fs::remove_file(head_path(&log2)).unwrap();
        assert!(
            verify(&log2)
                .unwrap_err()
                .reason
                .contains("the log is missing")
        );
        std::fs::remove_file(lock_path(&log2)).unwrap();
        verify(&log2).unwrap();
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// Nobody but the writers can hold the lock: it is 0600 (an old 0640 one is replaced
    /// by a private one), and a lock held by something else is waited for a bounded time,
    /// then the append fails (nothing written).
    #[test]
    fn the_lock_is_private_and_its_wait_bounded() {
        let d = tmp();
        let log = d.join("a.jsonl");
        let mut a = open(&log, 1 << 20);
        a.lock_wait = Duration::from_millis(300);
        a.append(&Entry::new("refused")).unwrap();
        let lock = lock_path(&log);
        assert_eq!(std::fs::metadata(&lock).unwrap().mode() & 0o7777, LOCK_MODE);
        // An older version's group-readable lock file, held by a reader: replaced once
        // free, never used as it is.
        std::fs::remove_file(&lock).unwrap();
        std::fs::write(&lock, b"").unwrap();
        std::fs::set_permissions(&lock, std::fs::Permissions::from_mode(0o640)).unwrap();
        let old = std::fs::metadata(&lock).unwrap().ino();
        let reader = File::open(&lock).unwrap();
        reader.lock().unwrap();
        let e = a.append(&Entry::new("refused")).unwrap_err();
        assert!(e.to_string().contains("not free in time"), "{e}");
        assert_eq!(kinds_and_seqs(&log).len(), 1, "nothing written");
        reader.unlock().unwrap();
        a.append(&Entry::new("refused")).unwrap();
        let md = std::fs::metadata(&lock).unwrap();
        assert_eq!(md.mode() & 0o7777, LOCK_MODE);
        assert_ne!(md.ino(), old);
        // The reader's kept descriptor locks a file no writer uses any more.
        reader.lock().unwrap();
        a.append(&Entry::new("refused")).unwrap();
        assert_eq!(kinds_and_seqs(&log).len(), 3);
        verify(&log).unwrap();
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// The `torn` record goes over the torn line before the rest of it is cut off: a
    /// crash between the two leaves the description (and a shorter fragment, which the
    /// next writer describes in turn).
    #[test]
    fn a_crash_while_repairing_a_torn_tail_leaves_its_description() {
        let d = tmp();
        let log = d.join("a.jsonl");
        let a = open(&log, 1 << 20);
        a.append(&Entry::new("refused")).unwrap();
        // A fragment longer than the record that describes it.
        let fragment = format!("{{\"seq\":2,\"prev\":\"{}", "ab".repeat(2000));
        let mut f = OpenOptions::new().append(true).open(&log).unwrap();
        f.write_all(fragment.as_bytes()).unwrap();
        drop(f);
        let b = open(&log, 1 << 20);
        CRASH_BEFORE_TORN_CUT.with(|c| c.set(true));
        assert!(b.append(&Entry::new("refused")).is_err());
        CRASH_BEFORE_TORN_CUT.with(|c| c.set(false));
        let text = std::fs::read_to_string(&log).unwrap();
        let torn: Value = serde_json::from_str(text.lines().nth(1).unwrap()).unwrap();
        assert_eq!(torn["kind"], "torn");
        assert_eq!(torn["seq"], 2);
        assert_eq!(torn["torn"]["bytes"], fragment.len());
        assert_eq!(torn["torn"]["sha256"], sha256_hex(fragment.as_bytes()));
        assert!(verify(&log).unwrap_err().reason.contains("torn"));
        // The next writer describes the rest and goes on.
        let c = open(&log, 1 << 20);
        assert_eq!(c.append(&Entry::new("refused")).unwrap(), 4);
        let kinds: Vec<String> = kinds_and_seqs(&log).into_iter().map(|k| k.0).collect();
        assert_eq!(kinds, ["refused", "torn", "torn", "refused"]);
        verify(&log).unwrap();
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn torn_tail_is_recorded_not_dropped() {
        let d = tmp();
        let log = d.join("a.jsonl");
        let a = open(&log, 1 << 20);
        a.append(&Entry::new("refused")).unwrap();
        let mut f = OpenOptions::new().append(true).open(&log).unwrap();
        f.write_all(b"{\"seq\":2,\"prev\":\"ab").unwrap();
        drop(f);
        assert!(verify(&log).unwrap_err().reason.contains("torn"));
        let b = open(&log, 1 << 20);
        let seq = b.append(&Entry::new("refused")).unwrap();
        assert_eq!(seq, 3);
        verify(&log).unwrap();
        let text = std::fs::read_to_string(&log).unwrap();
        let torn: Value = serde_json::from_str(text.lines().nth(1).unwrap()).unwrap();
        assert_eq!(torn["kind"], "torn");
        assert_eq!(
            torn["torn"]["sha256"],
            sha256_hex(b"{\"seq\":2,\"prev\":\"ab")
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn cut_at_record_boundary_is_detected_and_kept_failing() {
        let d = tmp();
        let log = d.join("a.jsonl");
        let a = open(&log, 1 << 20);
        for _ in 0..3 {
            a.append(&Entry::new("refused")).unwrap();
        }
        let text = std::fs::read_to_string(&log).unwrap();
        let keep: String = text.lines().take(2).map(|l| format!("{l}\n")).collect();
        std::fs::write(&log, keep).unwrap();
        let e = verify(&log).unwrap_err();
        assert!(e.reason.contains("truncated"), "{e}");
        let b = open(&log, 1 << 20);
        assert_eq!(b.append(&Entry::new("refused")).unwrap(), 5);
        assert!(verify(&log).unwrap_err().reason.contains("cut"));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn head_is_one_block_and_a_damaged_head_is_reported() {
        let d = tmp();
        let log = d.join("a.jsonl");
        let a = open(&log, 1 << 20);
        a.append(&Entry::new("refused")).unwrap();
        a.append(&Entry::new("refused")).unwrap();
        let head = std::fs::read(head_path(&log)).unwrap();
        assert_eq!(head.len(), HEAD_LEN);
        assert_eq!(read_head(&log).unwrap().unwrap().0, 2);
        // Flip one hex digit of the hash.
        let mut bad = head.clone();
        let pos = bad.windows(8).position(|w| w == b"\"hash\":\"").unwrap() + 8;
        bad[pos] = if bad[pos] == b'0' { b'1' } else { b'0' };
        std::fs::write(head_path(&log), &bad).unwrap();
        let e = verify(&log).unwrap_err();
        assert!(e.reason.contains("damaged"), "{e}");
        // The writer goes on from the log and rewrites the head.
        assert_eq!(
            open(&log, 1 << 20).append(&Entry::new("refused")).unwrap(),
            3
        );
        verify(&log).unwrap();
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn head_is_replaced_atomically_and_an_open_reader_keeps_a_whole_block() {
        let d = tmp();
        let log = d.join("a.jsonl");
        let a = open(&log, 1 << 20);
        let tmp_p = suffixed(&log, ".head.tmp");
        let mut inodes = Vec::new();
        for n in 1..=4u64 {
            a.append(&Entry::new("refused")).unwrap();
            assert_eq!(read_head(&log).unwrap().unwrap().0, n);
            inodes.push(std::fs::metadata(head_path(&log)).unwrap().ino());
        }
        // Replaced, not rewritten: every append puts another file under the head's name.
        assert!(inodes.windows(2).all(|w| w[0] != w[1]), "{inodes:?}");
        // The previous head is what the temp name holds now (one whole block).
        let prev = std::fs::read(&tmp_p).unwrap();
        assert_eq!(prev.len(), HEAD_LEN);
        let v: Value = serde_json::from_slice(&prev).unwrap();
        assert_eq!(v["seq"], 3);
        // A reader that opened the head before an append still reads a whole, valid
        // block: the append wrote into the other file.
        let mut held = File::open(head_path(&log)).unwrap();
        a.append(&Entry::new("refused")).unwrap();
        let mut text = String::new();
        held.read_to_string(&mut text).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["seq"], 4);
        assert_eq!(
            v["check"],
            head_check(4, v["hash"].as_str().unwrap()).as_str()
        );
        assert_eq!(read_head(&log).unwrap().unwrap().0, 5);
        verify(&log).unwrap();
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_lagging_head_is_a_note_and_a_bad_temp_file_is_replaced_not_followed() {
        let d = tmp();
        let log = d.join("a.jsonl");
        let a = open(&log, 1 << 20);
        a.append(&Entry::new("refused")).unwrap();
        let head_after_1 = std::fs::read(head_path(&log)).unwrap();
        a.append(&Entry::new("refused")).unwrap();
        a.append(&Entry::new("refused")).unwrap();
        // A crash lost the last head replacements: the head names seq 1 of 3.
        std::fs::write(head_path(&log), &head_after_1).unwrap();
        let r = verify(&log).unwrap();
        assert_eq!(r.last_seq, Some(3));
        assert!(
            r.notes.iter().any(|n| n.contains("behind")),
            "{:?}",
            r.notes
        );
        // The next append puts it right again.
        a.append(&Entry::new("refused")).unwrap();
        assert_eq!(read_head(&log).unwrap().unwrap().0, 4);
        assert!(verify(&log).unwrap().notes.is_empty());

        // A symlink planted under the temp name is removed, never written through.
        let tmp_p = suffixed(&log, ".head.tmp");
        let victim = d.join("victim");
        std::fs::write(&victim, b"untouched").unwrap();
        std::fs::remove_file(&tmp_p).unwrap();
        std::os::unix::fs::symlink(&victim, &tmp_p).unwrap();
        a.append(&Entry::new("refused")).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"untouched");
        assert_eq!(read_head(&log).unwrap().unwrap().0, 5);
        assert!(!std::fs::symlink_metadata(&tmp_p).unwrap().is_symlink());
        // A temp file of the wrong size is made anew.
        std::fs::write(&tmp_p, b"short").unwrap();
        a.append(&Entry::new("refused")).unwrap();
        assert_eq!(read_head(&log).unwrap().unwrap().0, 6);
        assert_eq!(std::fs::metadata(&tmp_p).unwrap().len(), HEAD_LEN as u64);
        verify(&log).unwrap();
        // No head at all (deleted): the next append makes one.
        std::fs::remove_file(head_path(&log)).unwrap();
        assert!(
            verify(&log)
                .unwrap_err()
                .reason
                .contains("head file missing")
        );
        a.append(&Entry::new("refused")).unwrap();
        assert_eq!(read_head(&log).unwrap().unwrap().0, 7);
        verify(&log).unwrap();
        std::fs::remove_dir_all(&d).unwrap();
    }
}
