//! The audited call log: JSON lines in a SHA-256 hash chain, shared by the three
//! instances.
//!
//! Contract (the hub reporter reads these files verbatim; see docs/privhelper.md):
//! - each line is one JSON object ending in `\n`, with an integer `seq` (1, 2, 3, …,
//!   continuing across rotation), `prev` (lower-case hex SHA-256 of the previous line's
//!   exact bytes without its `\n`; 64 zeros for the very first record), `time` (RFC 3339
//!   UTC), `kind` (`intent`, `outcome`, `refused`, `torn`, `cut`) and, where known,
//!   `class`, `peer {pid, uid, gid, comm}`, `op`, `args`;
//! - `<log>.head` holds the last `seq` and `hash`, replaced atomically after each append;
//! - `<log>.lock` serializes writers (flock) across the instances;
//! - past `audit_max_bytes` the file is renamed to `<log>.1` (older ones shift up to
//!   `<log>.<audit_keep>`) and the new file's first `prev` is the old file's last hash.
//!
//! Must never: drop a record silently. A torn last line found at open is cut off and
//! described (length, SHA-256, text) in a `torn` record; a log shorter than its head is
//! described in a `cut` record that keeps failing `audit verify`.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

pub const ZERO_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";
const FILE_MODE: u32 = 0o640;
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

#[derive(Debug, Default)]
struct Cache {
    /// (dev, ino, len) of the active file after our last append.
    key: Option<(u64, u64, u64)>,
    tip: Option<Tip>,
}

#[derive(Debug)]
pub struct AuditLog {
    log: PathBuf,
    max_bytes: u64,
    keep: u32,
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
    let v: Value = serde_json::from_str(&s).map_err(|e| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, format!("head file: {e}"))
    })?;
    match (
        v.get("seq").and_then(Value::as_u64),
        v.get("hash").and_then(Value::as_str),
    ) {
        (Some(seq), Some(hash)) => Ok(Some((seq, hash.to_string()))),
        _ => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "head file lacks seq/hash",
        )),
    }
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
                max_bytes,
                keep,
                cache: Mutex::new(Cache::default()),
            },
            warnings,
        ))
    }

    /// Appends `entry` (after any `torn`/`cut` record the state of the file calls for),
    /// fsyncs it and replaces the head. Returns the entry's `seq`.
    pub fn append(&self, entry: &Entry) -> Result<u64, AuditError> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let lock_p = lock_path(&self.log);
        let lock = open_nofollow(&lock_p, true).map_err(io_err(&lock_p))?;
        lock.lock().map_err(io_err(&lock_p))?;
        let result = self.append_locked(&mut cache, entry);
        if result.is_err() {
            *cache = Cache::default();
        }
        let _ = lock.unlock();
        result
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
        let euid = nix::unistd::geteuid().as_raw();
        if md.uid() != 0 && md.uid() != euid {
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

    fn append_locked(&self, cache: &mut Cache, entry: &Entry) -> Result<u64, AuditError> {
        let (mut f, mut md) = self.open_active()?;
        let key = (md.dev(), md.ino(), md.len());
        let mut pending: Vec<Entry> = Vec::new();
        let mut tip = match (&cache.key, &cache.tip) {
            (Some(k), Some(t)) if *k == key => t.clone(),
            _ => self.find_tip(&mut f, md.len(), &mut pending)?,
        };
        if md.len() > self.max_bytes {
            self.rotate()?;
            let (nf, nmd) = self.open_active()?;
            f = nf;
            md = nmd;
        }
        let _ = md;
        for p in &pending {
            self.write_record(&mut f, &mut tip, p)?;
        }
        let seq = self.write_record(&mut f, &mut tip, entry)?;
        let md = f.metadata().map_err(io_err(&self.log))?;
        cache.key = Some((md.dev(), md.ino(), md.len()));
        cache.tip = Some(tip);
        Ok(seq)
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
        let head = read_head(&self.log).map_err(io_err(&head_path(&self.log)))?;
        if let Some((offset, bytes)) = &scan.torn {
            f.set_len(*offset).map_err(io_err(&self.log))?;
            f.sync_all().map_err(io_err(&self.log))?;
            let text: String = String::from_utf8_lossy(bytes).chars().take(1024).collect();
            pending.push(
                Entry::new("torn")
                    .with("reason", "the last line had no newline when the log was opened (a write was interrupted); it was cut off and is described here")
                    .with("torn", json!({"offset": offset, "bytes": bytes.len(), "sha256": sha256_hex(bytes), "text": text})),
            );
        }
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
                Entry::new("cut")
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
        Ok(tip)
    }

    fn write_record(&self, f: &mut File, tip: &mut Tip, entry: &Entry) -> Result<u64, AuditError> {
        let seq = tip.seq + 1;
        let mut obj = Map::new();
        obj.insert("seq".into(), seq.into());
        obj.insert("prev".into(), tip.hash.clone().into());
        obj.insert("time".into(), crate::clock::now_rfc3339().into());
        obj.insert("kind".into(), entry.kind.into());
        for (k, v) in &entry.fields {
            obj.insert(k.clone(), v.clone());
        }
        let line = serde_json::to_vec(&Value::Object(obj)).map_err(|e| AuditError::Io {
            path: self.log.clone(),
            source: std::io::Error::other(e),
        })?;
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(&line);
        buf.push(b'\n');
        f.write_all(&buf).map_err(io_err(&self.log))?;
        f.sync_data().map_err(io_err(&self.log))?;
        tip.seq = seq;
        tip.hash = sha256_hex(&line);
        self.write_head(tip)?;
        Ok(seq)
    }

    fn write_head(&self, tip: &Tip) -> Result<(), AuditError> {
        let head = head_path(&self.log);
        let tmp = suffixed(&self.log, ".head.tmp");
        let _ = std::fs::remove_file(&tmp);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        let body = format!("{{\"seq\":{},\"hash\":\"{}\"}}\n", tip.seq, tip.hash);
        f.write_all(body.as_bytes()).map_err(io_err(&tmp))?;
        f.sync_data().map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, &head).map_err(io_err(&head))?;
        Ok(())
    }

    fn rotate(&self) -> Result<(), AuditError> {
        for n in (1..self.keep).rev() {
            let from = rotated_path(&self.log, n);
            if from.exists() {
                let to = rotated_path(&self.log, n + 1);
                std::fs::rename(&from, &to).map_err(io_err(&from))?;
            }
        }
        let first = rotated_path(&self.log, 1);
        std::fs::rename(&self.log, &first).map_err(io_err(&self.log))?;
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

/// Checks every present file (oldest rotated first), the chain across them, and the head.
pub fn verify(log: &Path) -> Result<VerifyReport, VerifyFailure> {
    let fail = |file: &Path, line: usize, seq: Option<u64>, reason: String| VerifyFailure {
        file: file.to_path_buf(),
        line,
        seq,
        reason,
    };
    let mut files = Vec::new();
    let mut n = 1;
    while rotated_path(log, n).exists() {
        n += 1;
    }
    for k in (1..n).rev() {
        files.push(rotated_path(log, k));
    }
    if rotated_path(log, n + 1).exists() {
        return Err(fail(
            &rotated_path(log, n),
            0,
            None,
            "rotated file missing (a later one exists)".into(),
        ));
    }
    if log.exists() {
        files.push(log.to_path_buf());
    }
    let mut notes = Vec::new();
    let mut prev: Option<(u64, String)> = None;
    let mut records = 0u64;
    let mut first_seq = None;
    let mut where_last = (log.to_path_buf(), 0usize);
    for file in &files {
        let bytes =
            std::fs::read(file).map_err(|e| fail(file, 0, None, format!("cannot read: {e}")))?;
        if !bytes.is_empty() && bytes.last() != Some(&b'\n') {
            let line_no = bytes.iter().filter(|&&b| b == b'\n').count() + 1;
            // Check everything before the torn line first, so an earlier fault is named first.
            let cut = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            check_lines(
                file,
                &bytes[..cut],
                &mut prev,
                &mut records,
                &mut first_seq,
                &mut notes,
            )?;
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
        check_lines(
            file,
            &bytes,
            &mut prev,
            &mut records,
            &mut first_seq,
            &mut notes,
        )?;
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
                notes.push(format!("head names seq {hseq}, behind the last record {lseq} (an append was interrupted before the head was replaced)"));
            }
        }
    }
    Ok(VerifyReport {
        records,
        first_seq,
        last_seq: prev.map(|p| p.0),
        files,
        notes,
    })
}

fn check_lines(
    file: &Path,
    bytes: &[u8],
    prev: &mut Option<(u64, String)>,
    records: &mut u64,
    first_seq: &mut Option<u64>,
    notes: &mut Vec<String>,
) -> Result<(), VerifyFailure> {
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
    for (i, line) in body.split(|&b| b == b'\n').enumerate() {
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
                    return Err(fail(
                        line_no,
                        Some(seq),
                        format!("records {}..={} are missing (removed)", *pseq + 1, seq - 1),
                    ));
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
        *prev = Some((seq, sha256_hex(line)));
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
            a.append(&Entry::new("intent").with("i", i)).unwrap();
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

    #[test]
    fn torn_tail_is_recorded_not_dropped() {
        let d = tmp();
        let log = d.join("a.jsonl");
        let a = open(&log, 1 << 20);
        a.append(&Entry::new("intent")).unwrap();
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
            a.append(&Entry::new("intent")).unwrap();
        }
        let text = std::fs::read_to_string(&log).unwrap();
        let keep: String = text.lines().take(2).map(|l| format!("{l}\n")).collect();
        std::fs::write(&log, keep).unwrap();
        let e = verify(&log).unwrap_err();
        assert!(e.reason.contains("truncated"), "{e}");
        let b = open(&log, 1 << 20);
        assert_eq!(b.append(&Entry::new("intent")).unwrap(), 5);
        assert!(verify(&log).unwrap_err().reason.contains("cut"));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
