//! The helper's audit log, forwarded to the hub in order, each record exactly once.
//!
//! The log (written by `felhom-privhelper`, config `privhelper.audit_log`) is JSON lines,
//! each `\n`-terminated, with an integer `seq` (1, 2, 3 … continuing across rotation) and
//! `prev` (hex SHA-256 of the previous line). The helper rotates by rename: the active file
//! is `<audit_log>`, older ones `<audit_log>.1` (newest) … `<audit_log>.N`.
//!
//! Design: the cursor is the last `seq` the hub accepted, stored atomically in
//! `state_dir/audit-cursor.json`. [`AuditReader::read_batch`] returns the records after the
//! cursor (bounded in count and bytes); the cursor moves only through
//! [`AuditReader::commit`], which the heartbeat calls once the hub accepted the report
//! carrying that batch. A failed report re-sends the same records next cycle, so none is
//! lost; a crash before the cursor is saved re-sends them after the restart (the hub can
//! drop a `seq` it already has), and one after never re-sends them.
//!
//! Records are sent verbatim: the exact line text (see [`AuditRecord`]).
//!
//! Reading: all rotated files and the active one are opened first, so a rename during the
//! read does not move data under us; the read starts in the newest file whose first record
//! is at or before the cursor, or at the remembered position (file identity + offset) after
//! the last committed record, which stays valid across a rename. A torn last line (no `\n`
//! yet) is left for the next cycle. A gap in `seq` is re-read once (a rotation may have
//! raced the directory listing); if it is still there the records are gone (rotated away
//! before they were sent), and that is reported as an [`AuditError::Gap`] while the rest
//! flows on. A line that is not JSON with an integer `seq` stops the stream at that line
//! and is reported every cycle: it cannot be sent verbatim as a record, and skipping it
//! silently would hide tampering.
//!
//! Must never: write to the audit log, reorder or rewrite a record, or advance the cursor
//! past a record the hub has not accepted.

use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::envelope::write_atomic;
use super::report::AuditRecord;

/// File name of the cursor inside `state_dir`.
pub const CURSOR_FILE: &str = "audit-cursor.json";
/// Records per report by default; the rest follow in the next cycles.
pub const DEFAULT_MAX_RECORDS: usize = 500;
/// Bytes of audit records per report by default.
pub const DEFAULT_MAX_BYTES: usize = 1024 * 1024;
/// A longer line is not an audit record.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// What can go wrong reading the audit log or keeping the cursor.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuditError {
    #[error("reading audit log {path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error("audit log {path}, byte {offset}: {reason}; records after it are held back")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error(
        "audit records {first_missing}..={last_missing} are missing from the log (rotated away before they were sent?)"
    )]
    Gap {
        first_missing: u64,
        last_missing: u64,
    },
    #[error(
        "the audit log restarted: its newest record is {log_last} but {cursor} were already sent; sending it again from its start"
    )]
    Restarted { cursor: u64, log_last: u64 },
    #[error("audit cursor {path}: {reason}")]
    Cursor { path: PathBuf, reason: String },
}

/// Where a record starts or ends: which file (by identity, so it survives a rename) and
/// the byte offset in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Position {
    dev: u64,
    ino: u64,
    offset: u64,
}

/// What the reader hands the collector for one report.
#[derive(Debug, Default)]
pub struct AuditBatch {
    pub records: Vec<AuditRecord>,
    /// Problems found while reading (the records before them are still in `records`).
    pub errors: Vec<AuditError>,
    /// Give this to [`AuditReader::commit`] once the hub accepted the report.
    pub commit: Option<AuditCommit>,
    /// Highest `seq` seen in the log during the read (to detect a restarted log).
    log_last: Option<u64>,
}

/// Proof of which records a batch carried; committing it moves the cursor past them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditCommit {
    /// The cursor the batch was read after; a commit for another cursor is stale.
    base: u64,
    last_seq: u64,
    end: Position,
}

impl AuditCommit {
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct CursorFile {
    seq: u64,
}

#[derive(Deserialize)]
struct SeqOnly {
    seq: u64,
}

/// Reads the audit log after the cursor.
#[derive(Debug)]
pub struct AuditReader {
    log: PathBuf,
    cursor_path: PathBuf,
    cursor: u64,
    max_records: usize,
    max_bytes: usize,
    /// Start of record `cursor + 1`, when known from the last commit.
    resume: Option<Position>,
}

impl AuditReader {
    /// Loads the cursor from `state_dir` (0 when there is none yet).
    pub fn open(log: &Path, state_dir: &Path) -> Result<Self, AuditError> {
        let cursor_path = state_dir.join(CURSOR_FILE);
        let cursor = match fs::read(&cursor_path) {
            Ok(bytes) => {
                serde_json::from_slice::<CursorFile>(&bytes)
                    .map_err(|e| AuditError::Cursor {
                        path: cursor_path.clone(),
                        reason: e.to_string(),
                    })?
                    .seq
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => {
                return Err(AuditError::Cursor {
                    path: cursor_path,
                    reason: e.to_string(),
                });
            }
        };
        Ok(AuditReader {
            log: log.to_path_buf(),
            cursor_path,
            cursor,
            max_records: DEFAULT_MAX_RECORDS,
            max_bytes: DEFAULT_MAX_BYTES,
            resume: None,
        })
    }

    /// Changes the per-report bounds (at least one record).
    pub fn with_limits(mut self, max_records: usize, max_bytes: usize) -> Self {
        self.max_records = max_records.max(1);
        self.max_bytes = max_bytes.max(1);
        self
    }

    /// The last `seq` the hub accepted (0 = none).
    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The records after the cursor, in order, bounded. Never fails as a whole: problems
    /// are in [`AuditBatch::errors`]. A missing log (no helper yet) is an empty batch.
    pub fn read_batch(&mut self) -> AuditBatch {
        let mut batch = self.read_once(false, self.cursor);
        if batch
            .errors
            .iter()
            .any(|e| matches!(e, AuditError::Gap { .. }))
        {
            // A rotation may have raced the listing; a second look sees a stable set.
            batch = self.read_once(true, self.cursor);
        }
        if let Some(log_last) = batch.log_last.take()
            && batch.records.is_empty()
            && log_last < self.cursor
        {
            // Every record in the log is older than the cursor: the log was started over
            // (deleted, or a new helper install). Send it from its start.
            let cursor = self.cursor;
            batch = self.read_once(true, 0);
            batch
                .errors
                .insert(0, AuditError::Restarted { cursor, log_last });
        }
        batch.log_last = None;
        batch
    }

    /// Moves the cursor past a batch the hub accepted and saves it atomically.
    pub fn commit(&mut self, commit: AuditCommit) -> Result<(), AuditError> {
        if commit.base != self.cursor {
            return Ok(()); // stale: read before an earlier commit
        }
        let mut bytes = serde_json::to_vec(&CursorFile {
            seq: commit.last_seq,
        })
        .map_err(|e| AuditError::Cursor {
            path: self.cursor_path.clone(),
            reason: e.to_string(),
        })?;
        bytes.push(b'\n');
        write_atomic(&self.cursor_path, &bytes).map_err(|e| AuditError::Cursor {
            path: self.cursor_path.clone(),
            reason: e.to_string(),
        })?;
        self.cursor = commit.last_seq;
        self.resume = Some(commit.end);
        Ok(())
    }

    /// The log's files, oldest first, opened now so later renames do not affect the read.
    fn open_files(&self) -> Result<Vec<OpenLog>, AuditError> {
        let io_err = |path: &Path, e: io::Error| AuditError::Io {
            path: path.to_path_buf(),
            reason: e.to_string(),
        };
        let dir = self
            .log
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let base = match self.log.file_name().and_then(|n| n.to_str()) {
            Some(b) => b.to_owned(),
            None => {
                return Err(AuditError::Io {
                    path: self.log.clone(),
                    reason: "audit log path has no file name".into(),
                });
            }
        };
        let mut rotated: Vec<(u64, PathBuf)> = Vec::new();
        match fs::read_dir(dir) {
            Ok(entries) => {
                for entry in entries {
                    let entry = entry.map_err(|e| io_err(dir, e))?;
                    let name = entry.file_name();
                    let Some(name) = name.to_str() else { continue };
                    if let Some(n) = name
                        .strip_prefix(base.as_str())
                        .and_then(|rest| rest.strip_prefix('.'))
                        .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
                        .and_then(|n| n.parse::<u64>().ok())
                    {
                        rotated.push((n, entry.path()));
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(dir, e)),
        }
        rotated.sort_by_key(|r| std::cmp::Reverse(r.0)); // .N (oldest) … .1
        let mut out = Vec::new();
        for path in rotated
            .into_iter()
            .map(|(_, p)| p)
            .chain(std::iter::once(self.log.clone()))
        {
            match File::open(&path) {
                Ok(file) => {
                    let meta = file.metadata().map_err(|e| io_err(&path, e))?;
                    out.push(OpenLog {
                        path,
                        dev: meta.dev(),
                        ino: meta.ino(),
                        file,
                    });
                }
                // rotated away between the listing and the open: the retry sees it
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&path, e)),
            }
        }
        Ok(out)
    }

    fn read_once(&mut self, final_attempt: bool, cursor: u64) -> AuditBatch {
        let mut batch = AuditBatch::default();
        let mut files = match self.open_files() {
            Ok(f) => f,
            Err(e) => {
                batch.errors.push(e);
                return batch;
            }
        };
        if files.is_empty() {
            return batch;
        }
        // Where to start: the remembered position, else the newest file whose first record
        // is at or before the one we want.
        let want = cursor + 1;
        let mut start = None;
        if cursor == self.cursor
            && let Some(pos) = self.resume
            && let Some(i) = files
                .iter()
                .position(|f| f.dev == pos.dev && f.ino == pos.ino)
        {
            let long_enough = files[i]
                .file
                .metadata()
                .is_ok_and(|m| m.len() >= pos.offset);
            match files[i].first_seq_at(pos.offset) {
                _ if !long_enough => {}
                Ok(Some(seq)) if seq == want => start = Some((i, pos.offset)),
                Ok(None) => start = Some((i, pos.offset)),
                _ => {}
            }
        }
        let (start_file, start_offset) = match start {
            Some(s) => s,
            None => {
                let mut idx = 0;
                for (i, f) in files.iter_mut().enumerate() {
                    match f.first_seq_at(0) {
                        Ok(Some(seq)) if seq <= want => idx = i,
                        _ => {}
                    }
                }
                (idx, 0)
            }
        };

        let mut scan = Scan {
            cursor,
            expected: if cursor == 0 { None } else { Some(want) },
            bytes: 0,
            last: None,
            log_last: None,
            max_records: self.max_records,
            max_bytes: self.max_bytes,
            final_attempt,
        };
        for (i, f) in files.iter_mut().enumerate().skip(start_file) {
            let from = if i == start_file { start_offset } else { 0 };
            match scan.file(f, from, &mut batch) {
                Ok(Flow::Continue) => {}
                Ok(Flow::Stop) => break,
                Err(e) => {
                    batch.errors.push(e);
                    break;
                }
            }
        }
        batch.commit = scan.last.map(|(last_seq, end)| AuditCommit {
            base: self.cursor,
            last_seq,
            end,
        });
        batch.log_last = scan.log_last;
        batch
    }
}

#[derive(Debug)]
struct OpenLog {
    path: PathBuf,
    dev: u64,
    ino: u64,
    file: File,
}

impl OpenLog {
    /// The `seq` of the first complete line at `offset`; `None` when there is none yet.
    fn first_seq_at(&mut self, offset: u64) -> io::Result<Option<u64>> {
        self.file.seek(SeekFrom::Start(offset))?;
        let mut reader = BufReader::new((&self.file).take(MAX_LINE_BYTES as u64 + 1));
        let mut line = Vec::new();
        reader.read_until(b'\n', &mut line)?;
        if line.last() != Some(&b'\n') {
            return Ok(None);
        }
        Ok(serde_json::from_slice::<SeqOnly>(&line).ok().map(|s| s.seq))
    }
}

enum Flow {
    Continue,
    Stop,
}

struct Scan {
    cursor: u64,
    expected: Option<u64>,
    bytes: usize,
    last: Option<(u64, Position)>,
    log_last: Option<u64>,
    max_records: usize,
    max_bytes: usize,
    final_attempt: bool,
}

impl Scan {
    fn file(
        &mut self,
        f: &mut OpenLog,
        from: u64,
        batch: &mut AuditBatch,
    ) -> Result<Flow, AuditError> {
        let io_err = |e: io::Error| AuditError::Io {
            path: f.path.clone(),
            reason: e.to_string(),
        };
        f.file.seek(SeekFrom::Start(from)).map_err(io_err)?;
        let mut reader = BufReader::new(&f.file);
        let mut offset = from;
        let mut line = Vec::new();
        loop {
            if batch.records.len() >= self.max_records || self.bytes >= self.max_bytes {
                return Ok(Flow::Stop);
            }
            line.clear();
            let n = (&mut reader)
                .take(MAX_LINE_BYTES as u64 + 1)
                .read_until(b'\n', &mut line)
                .map_err(io_err)?;
            if n == 0 {
                return Ok(Flow::Continue); // end of this file
            }
            if line.last() != Some(&b'\n') {
                if n > MAX_LINE_BYTES {
                    return Err(AuditError::Corrupt {
                        path: f.path.clone(),
                        offset,
                        reason: format!("line longer than {MAX_LINE_BYTES} bytes"),
                    });
                }
                // torn: the helper has not finished writing it
                return Ok(Flow::Continue);
            }
            let start = offset;
            offset += n as u64;
            let text = &line[..line.len() - 1];
            let parsed = std::str::from_utf8(text)
                .map_err(|e| e.to_string())
                .and_then(|s| {
                    let seq = serde_json::from_str::<SeqOnly>(s)
                        .map_err(|e| e.to_string())?
                        .seq;
                    let rec = AuditRecord::from_line(s).map_err(|e| e.to_string())?;
                    Ok((seq, rec))
                });
            let (seq, record) = match parsed {
                Ok(p) => p,
                Err(reason) => {
                    return Err(AuditError::Corrupt {
                        path: f.path.clone(),
                        offset: start,
                        reason: format!("not a JSON audit record with an integer seq: {reason}"),
                    });
                }
            };
            self.log_last = Some(self.log_last.map_or(seq, |m| m.max(seq)));
            if seq <= self.cursor || self.last.is_some_and(|(l, _)| seq <= l) {
                continue; // already sent (or a duplicate line)
            }
            if let Some(exp) = self.expected
                && seq != exp
            {
                let gap = AuditError::Gap {
                    first_missing: exp,
                    last_missing: seq - 1,
                };
                if !self.final_attempt {
                    batch.errors.push(gap);
                    return Ok(Flow::Stop);
                }
                batch.errors.push(gap);
            }
            self.bytes += text.len();
            batch.records.push(record);
            self.expected = Some(seq + 1);
            self.last = Some((
                seq,
                Position {
                    dev: f.dev,
                    ino: f.ino,
                    offset,
                },
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};
    use std::io::Write;

    /// Writes audit lines the way the helper does: `seq`, `prev` chain, `\n`, rotation by
    /// rename.
    struct FakeHelperLog {
        path: PathBuf,
        seq: u64,
        prev: String,
    }

    impl FakeHelperLog {
        fn new(path: PathBuf) -> Self {
            FakeHelperLog {
                path,
                seq: 0,
                prev: "0".repeat(64),
            }
        }

        fn line(&mut self) -> String {
            self.seq += 1;
            let line = format!(
                r#"{{"seq":{},"prev":"{}","ts":"2025-01-31T02:00:05Z","class":"smart","op":"smart_read","args":{{"device":"sda"}},"ok":true}}"#,
                self.seq, self.prev
            );
            self.prev = hex::encode(Sha256::digest(line.as_bytes()));
            line
        }

        fn append(&mut self, n: usize) {
            let mut f = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .unwrap();
            for _ in 0..n {
                let l = self.line();
                f.write_all(format!("{l}\n").as_bytes()).unwrap();
            }
        }

        /// Writes a line without its `\n` (the helper is mid-write).
        fn append_torn(&mut self) -> String {
            let l = self.line();
            let mut f = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .unwrap();
            f.write_all(l.as_bytes()).unwrap();
            l
        }

        fn finish_torn(&self) {
            let mut f = fs::OpenOptions::new()
                .append(true)
                .open(&self.path)
                .unwrap();
            f.write_all(b"\n").unwrap();
        }

        /// `log.N-1` → `log.N` … `log` → `log.1`; keeps at most `keep` rotated files.
        fn rotate(&self, keep: u32) {
            let name = |n: u32| PathBuf::from(format!("{}.{n}", self.path.display()));
            let _ = fs::remove_file(name(keep));
            for n in (1..keep).rev() {
                if name(n).exists() {
                    fs::rename(name(n), name(n + 1)).unwrap();
                }
            }
            fs::rename(&self.path, name(1)).unwrap();
        }
    }

    fn seqs(b: &AuditBatch) -> Vec<u64> {
        b.records
            .iter()
            .map(|r| serde_json::from_str::<SeqOnly>(r.as_str()).unwrap().seq)
            .collect()
    }

    fn setup() -> (tempfile::TempDir, FakeHelperLog, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let logdir = dir.path().join("log");
        let state = dir.path().join("state");
        fs::create_dir_all(&logdir).unwrap();
        fs::create_dir_all(&state).unwrap();
        let log = FakeHelperLog::new(logdir.join("privhelper-audit.jsonl"));
        (dir, log, state)
    }

    fn send_all(r: &mut AuditReader) -> Vec<u64> {
        let mut out = Vec::new();
        loop {
            let b = r.read_batch();
            assert!(b.errors.is_empty(), "{:?}", b.errors);
            if b.records.is_empty() {
                return out;
            }
            out.extend(seqs(&b));
            r.commit(b.commit.unwrap()).unwrap();
        }
    }

    #[test]
    fn missing_log_is_empty_not_an_error() {
        let (_d, log, state) = setup();
        let mut r = AuditReader::open(&log.path, &state).unwrap();
        let b = r.read_batch();
        assert!(b.records.is_empty() && b.errors.is_empty() && b.commit.is_none());
        // and a missing directory too
        let mut r = AuditReader::open(&state.join("nope/audit.jsonl"), &state).unwrap();
        assert!(r.read_batch().errors.is_empty());
    }

    #[test]
    fn records_are_resent_until_committed_then_never_again() {
        let (_d, mut log, state) = setup();
        log.append(3);
        let mut r = AuditReader::open(&log.path, &state).unwrap();
        let b1 = r.read_batch();
        assert_eq!(seqs(&b1), [1, 2, 3]);
        // the hub did not accept: the same records again, plus new ones
        log.append(1);
        let b2 = r.read_batch();
        assert_eq!(seqs(&b2), [1, 2, 3, 4]);
        r.commit(b2.commit.unwrap()).unwrap();
        assert_eq!(r.cursor(), 4);
        // a stale commit (of the batch read before) changes nothing
        r.commit(b1.commit.unwrap()).unwrap();
        assert_eq!(r.cursor(), 4);
        assert!(r.read_batch().records.is_empty());
        log.append(2);
        assert_eq!(send_all(&mut r), [5, 6]);
    }

    #[test]
    fn lines_are_forwarded_verbatim() {
        let (_d, mut log, state) = setup();
        log.append(2);
        let text = fs::read_to_string(&log.path).unwrap();
        let mut r = AuditReader::open(&log.path, &state).unwrap();
        let b = r.read_batch();
        let sent: Vec<&str> = b.records.iter().map(|r| r.as_str()).collect();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(sent, lines);
        // the chain is checkable by the hub from what was sent
        assert_eq!(
            hex::encode(Sha256::digest(sent[0].as_bytes())),
            serde_json::from_str::<serde_json::Value>(sent[1]).unwrap()["prev"]
        );
    }

    #[test]
    fn a_torn_last_line_waits_for_its_newline() {
        let (_d, mut log, state) = setup();
        log.append(2);
        log.append_torn();
        let mut r = AuditReader::open(&log.path, &state).unwrap();
        let b = r.read_batch();
        assert_eq!(seqs(&b), [1, 2]);
        assert!(b.errors.is_empty());
        r.commit(b.commit.unwrap()).unwrap();
        assert!(r.read_batch().records.is_empty());
        log.finish_torn();
        log.append(1);
        assert_eq!(send_all(&mut r), [3, 4]);
    }

    #[test]
    fn batches_are_bounded_and_the_rest_follows() {
        let (_d, mut log, state) = setup();
        log.append(1200);
        let mut r = AuditReader::open(&log.path, &state).unwrap();
        let mut sizes = Vec::new();
        let mut all = Vec::new();
        loop {
            let b = r.read_batch();
            if b.records.is_empty() {
                break;
            }
            sizes.push(b.records.len());
            all.extend(seqs(&b));
            r.commit(b.commit.unwrap()).unwrap();
        }
        assert_eq!(sizes, [500, 500, 200]);
        assert_eq!(all, (1..=1200).collect::<Vec<_>>());
        // the byte bound too
        let (_d, mut log, state) = setup();
        log.append(10);
        let one = fs::read_to_string(&log.path)
            .unwrap()
            .lines()
            .next()
            .unwrap()
            .len();
        let mut r = AuditReader::open(&log.path, &state)
            .unwrap()
            .with_limits(500, one * 3);
        assert_eq!(r.read_batch().records.len(), 3);
    }

    #[test]
    fn the_cursor_survives_a_restart() {
        let (_d, mut log, state) = setup();
        log.append(5);
        {
            let mut r = AuditReader::open(&log.path, &state).unwrap();
            let b = r.read_batch();
            r.commit(b.commit.unwrap()).unwrap();
            log.append(2);
            // read 6, 7 but "crash" before the hub accepted them
            assert_eq!(seqs(&r.read_batch()), [6, 7]);
        }
        let mut r = AuditReader::open(&log.path, &state).unwrap();
        assert_eq!(r.cursor(), 5);
        assert_eq!(send_all(&mut r), [6, 7]);
        let r = AuditReader::open(&log.path, &state).unwrap();
        assert_eq!(r.cursor(), 7);
    }

    #[test]
    fn rotation_is_followed_without_loss_or_repeat() {
        let (_d, mut log, state) = setup();
        log.append(5);
        let mut r = AuditReader::open(&log.path, &state)
            .unwrap()
            .with_limits(3, usize::MAX);
        let b = r.read_batch();
        assert_eq!(seqs(&b), [1, 2, 3]);
        // rotate between the read and the commit: the remembered position follows the inode
        log.rotate(5);
        log.append(3);
        r.commit(b.commit.unwrap()).unwrap();
        let mut got = send_all(&mut r);
        assert_eq!(got, [4, 5, 6, 7, 8]);
        // several rotations while the agent was down
        for _ in 0..3 {
            log.append(4);
            log.rotate(5);
        }
        log.append(1);
        let mut fresh = AuditReader::open(&log.path, &state).unwrap();
        got = send_all(&mut fresh);
        assert_eq!(got, (9..=21).collect::<Vec<_>>());
    }

    #[test]
    fn records_rotated_away_are_reported_as_a_gap_and_the_rest_flows() {
        let (_d, mut log, state) = setup();
        log.append(2);
        let mut r = AuditReader::open(&log.path, &state).unwrap();
        let b = r.read_batch();
        r.commit(b.commit.unwrap()).unwrap();
        // the agent is down while five rotations happen with only two kept
        for _ in 0..5 {
            log.append(2);
            log.rotate(2);
        }
        log.append(1);
        let mut r = AuditReader::open(&log.path, &state).unwrap();
        let b = r.read_batch();
        assert_eq!(
            b.errors,
            [AuditError::Gap {
                first_missing: 3,
                last_missing: 8
            }]
        );
        assert_eq!(seqs(&b), [9, 10, 11, 12, 13]);
        r.commit(b.commit.unwrap()).unwrap();
        assert!(r.read_batch().errors.is_empty());
    }

    #[test]
    fn a_corrupt_line_holds_back_what_follows_and_says_where() {
        let (_d, mut log, state) = setup();
        log.append(2);
        fs::OpenOptions::new()
            .append(true)
            .open(&log.path)
            .unwrap()
            .write_all(b"{\"no_seq\":true}\n")
            .unwrap();
        log.append(1);
        let mut r = AuditReader::open(&log.path, &state).unwrap();
        for _ in 0..2 {
            let b = r.read_batch();
            assert_eq!(seqs(&b), [1, 2]);
            assert!(
                matches!(&b.errors[..], [AuditError::Corrupt { offset, .. }] if *offset > 0),
                "{:?}",
                b.errors
            );
        }
    }

    #[test]
    fn a_restarted_log_is_sent_from_its_start() {
        let (_d, mut log, state) = setup();
        log.append(10);
        let mut r = AuditReader::open(&log.path, &state).unwrap();
        send_all(&mut r);
        // the log is deleted and the helper starts over
        fs::remove_file(&log.path).unwrap();
        let mut log = FakeHelperLog::new(log.path.clone());
        log.append(3);
        let b = r.read_batch();
        assert_eq!(seqs(&b), [1, 2, 3]);
        assert_eq!(
            b.errors,
            [AuditError::Restarted {
                cursor: 10,
                log_last: 3
            }]
        );
        r.commit(b.commit.unwrap()).unwrap();
        assert_eq!(r.cursor(), 3);
        log.append(1);
        assert_eq!(send_all(&mut r), [4]);
    }

    #[test]
    fn a_corrupt_cursor_file_is_a_typed_error() {
        let (_d, log, state) = setup();
        fs::write(state.join(CURSOR_FILE), "garbage").unwrap();
        assert!(matches!(
            AuditReader::open(&log.path, &state),
            Err(AuditError::Cursor { .. })
        ));
    }
}
