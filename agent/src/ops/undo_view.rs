//! The operator's view of the reversibility gate's undo points: what `felhom-agent ops
//! list`, `ops show`, `status` and the report's `ops.undo_points` show of them, and the
//! warning when the kept undo backups take too much of a storage.
//!
//! Owns: turning a journal row ([`UndoPoint`]) into its wire shape ([`UndoPointReport`]),
//! checking its strings on the way (a row the gate could not have written is an error, not
//! a guess); the per-storage sum of kept undo backups against `gate.undo_warn_fraction`
//! ([`undo_space_warnings`]); the JSON and the human lines of the listing.
//!
//! Must never: change or remove an undo point. Everything here only reads: the agent
//! removes an undo point only on a signed `release_undo` or a local `ops release`, never on
//! its own, so the only answer to "too much space" is telling the operators.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::{Value, json};

use super::wire::{UndoKind, UndoPointReport, UndoStatus};
use crate::reconcile::journal::{Journal, JournalError, UndoPoint};
use crate::timestamp::Timestamp;

/// Why the undo points could not be shown.
#[derive(Debug, thiserror::Error)]
pub enum UndoViewError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("undo point of operation {op_id}: {what}")]
    Malformed { op_id: String, what: String },
}

/// The wire shape of one journal row.
pub fn report_of(p: &UndoPoint) -> Result<UndoPointReport, UndoViewError> {
    let bad = |what: String| UndoViewError::Malformed {
        op_id: p.op_id.clone(),
        what,
    };
    let kind = UndoKind::parse(&p.kind).ok_or_else(|| bad(format!("unknown kind {:?}", p.kind)))?;
    let status = UndoStatus::parse(&p.status)
        .ok_or_else(|| bad(format!("unknown status {:?}", p.status)))?;
    let created_at = Timestamp::from_unix(p.created_ms.div_euclid(1000))
        .ok_or_else(|| bad(format!("creation time {} ms out of range", p.created_ms)))?;
    Ok(UndoPointReport {
        op_id: p.op_id.clone(),
        vmid: p.vmid,
        kind,
        reference: p.reference.clone(),
        storage: p.storage.clone(),
        size_bytes: p.size_bytes,
        created_at,
        status,
    })
}

/// The kept undo points, oldest first, in their wire shape.
pub fn kept(journal: &Journal) -> Result<Vec<UndoPointReport>, UndoViewError> {
    journal.undo_points_kept()?.iter().map(report_of).collect()
}

/// The kept undo backups on one storage use more of it than `gate.undo_warn_fraction`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UndoSpaceWarning {
    pub storage: String,
    /// The kept undo backups' sizes on it, summed (those whose size is known).
    pub used_bytes: u64,
    pub total_bytes: u64,
    /// How many kept undo backups are on it.
    pub backups: usize,
    pub warn_fraction: f64,
}

impl UndoSpaceWarning {
    /// For people (the report's `errors` entry, `status`).
    pub fn message(&self) -> String {
        let share = self.used_bytes as f64 / self.total_bytes as f64;
        format!(
            "{} kept undo backup{} {:.1}% of storage {} ({} of {}), above gate.undo_warn_fraction {}: \
             release those no longer needed (felhom-agent ops list, ops release OP_ID, or a signed release_undo); \
             the agent never removes them on its own",
            self.backups,
            if self.backups == 1 { " uses" } else { "s use" },
            share * 100.0,
            self.storage,
            human_bytes(self.used_bytes),
            human_bytes(self.total_bytes),
            self.warn_fraction,
        )
    }
}

/// One warning per storage where the kept undo backups, summed, exceed `warn_fraction` of
/// the storage's total. `total` gives a storage's size in bytes (`None`: unknown, e.g. the
/// storage is inactive or not listed; no warning can be decided then). Snapshots and
/// previous values are not counted: PVE does not say a snapshot's size.
pub fn undo_space_warnings(
    points: &[UndoPointReport],
    total: impl Fn(&str) -> Option<u64>,
    warn_fraction: f64,
) -> Vec<UndoSpaceWarning> {
    let mut per: BTreeMap<&str, (u64, usize)> = BTreeMap::new();
    for p in points {
        if p.status != UndoStatus::Kept || p.kind != UndoKind::Backup {
            continue;
        }
        let Some(storage) = p.storage.as_deref() else {
            continue;
        };
        let e = per.entry(storage).or_default();
        e.0 = e.0.saturating_add(p.size_bytes.unwrap_or(0));
        e.1 += 1;
    }
    per.into_iter()
        .filter_map(|(storage, (used, n))| {
            let total = total(storage).filter(|t| *t > 0)?;
            (used as f64 > warn_fraction * total as f64).then(|| UndoSpaceWarning {
                storage: storage.to_string(),
                used_bytes: used,
                total_bytes: total,
                backups: n,
                warn_fraction,
            })
        })
        .collect()
}

/// What `status` asks Proxmox for the warnings: each storage's total, and the size of an
/// undo backup whose size the gate did not record (from its storage's backup listing).
/// Fills those sizes in `points`.
pub async fn warnings_from_node(
    client: &crate::proxmox::Client,
    points: &mut [UndoPointReport],
    warn_fraction: f64,
) -> Result<Vec<UndoSpaceWarning>, crate::proxmox::ProxmoxError> {
    if !points.iter().any(|p| p.kind == UndoKind::Backup) {
        return Ok(Vec::new());
    }
    let mut unknown: Vec<String> = points
        .iter()
        .filter(|p| p.kind == UndoKind::Backup && p.size_bytes.is_none())
        .filter_map(|p| p.storage.clone())
        .collect();
    unknown.sort();
    unknown.dedup();
    for storage in unknown {
        let listed = client.backups(&storage, None).await?;
        for p in points.iter_mut() {
            if p.size_bytes.is_none() && p.storage.as_deref() == Some(storage.as_str()) {
                p.size_bytes = listed
                    .iter()
                    .find(|b| Some(b.volid.as_str()) == p.reference.as_deref())
                    .and_then(|b| b.size);
            }
        }
    }
    let storages = client.storages().await?;
    Ok(undo_space_warnings(
        points,
        |id| {
            storages
                .iter()
                .find(|s| s.storage == id)
                .and_then(|s| s.total)
        },
        warn_fraction,
    ))
}

/// One undo point for `ops list` / `ops show`: the wire shape plus the operation's kind,
/// its age, and when and by whom it was released.
pub fn point_json(p: &UndoPoint, now_ms: i64) -> Value {
    let released_at = p
        .released_ms
        .and_then(|ms| Timestamp::from_unix(ms.div_euclid(1000)));
    let mut v = match report_of(p) {
        Ok(r) => serde_json::to_value(r).unwrap_or_default(),
        Err(e) => json!({"op_id": p.op_id, "vmid": p.vmid, "error": e.to_string()}),
    };
    v["op_kind"] = p.op_kind.clone().into();
    v["age_seconds"] = (now_ms.saturating_sub(p.created_ms).max(0) / 1000).into();
    v["released_at"] = serde_json::to_value(released_at).unwrap_or_default();
    v["released_by"] = p.released_by.clone().into();
    v
}

/// `ops list`'s `undo_points`: every kept one, oldest first.
pub fn list_json(journal: &Journal, now_ms: i64) -> Result<Value, JournalError> {
    Ok(Value::Array(
        journal
            .undo_points_kept()?
            .iter()
            .map(|p| point_json(p, now_ms))
            .collect(),
    ))
}

/// `ops show`'s `undo_point`: the operation's, kept or released; `null` when it made none.
pub fn show_json(journal: &Journal, op_id: &str, now_ms: i64) -> Result<Value, JournalError> {
    Ok(journal
        .undo_point_get(op_id)?
        .map(|p| point_json(&p, now_ms))
        .unwrap_or(Value::Null))
}

/// `1.5 GiB`, `512 B`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// `3d 4h`, `5h 2m`, `40s`: the two largest units.
pub fn human_age(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

/// One line per undo point of [`point_json`] values (`ops list`).
pub fn render_lines(points: &[Value]) -> String {
    if points.is_empty() {
        return "no undo points kept\n".into();
    }
    let mut out = format!("undo points kept: {}\n", points.len());
    for p in points {
        out.push_str(&render_one(p));
    }
    out
}

/// One undo point as a line (`ops list`, `ops show`).
pub fn render_one(p: &Value) -> String {
    if let Some(e) = p["error"].as_str() {
        return format!(
            "  {}  vmid {}: {e}\n",
            p["op_id"].as_str().unwrap_or("?"),
            p["vmid"]
        );
    }
    let reference = p["ref"].as_str().unwrap_or("-");
    let storage = p["storage"]
        .as_str()
        .map(|s| format!(" on {s}"))
        .unwrap_or_default();
    let size = p["size_bytes"]
        .as_u64()
        .map(human_bytes)
        .unwrap_or_else(|| "size unknown".into());
    let status = match p["status"].as_str() {
        Some("released") => format!(
            ", released{}",
            p["released_by"]
                .as_str()
                .map(|b| format!(" by {b}"))
                .unwrap_or_default()
        ),
        _ => String::new(),
    };
    format!(
        "  {}  vmid {:<6} {:<15} {reference}{storage}  {size}  {} old  (made by {}{status})\n",
        p["op_id"].as_str().unwrap_or("?"),
        p["vmid"],
        p["kind"].as_str().unwrap_or("?"),
        human_age(p["age_seconds"].as_u64().unwrap_or(0)),
        p["op_kind"].as_str().unwrap_or("?"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(op: char, kind: &str, storage: Option<&str>, size: Option<u64>) -> UndoPoint {
        UndoPoint {
            op_id: op.to_string().repeat(32),
            op_kind: "rollback".into(),
            vmid: 101,
            guest_kind: "lxc".into(),
            kind: kind.into(),
            reference: Some(match kind {
                "backup" => format!(
                    "{}:backup/vzdump-lxc-101-2026_12_06-10_00_00.tar.zst",
                    storage.unwrap_or("x")
                ),
                _ => "felhom-undo-0123456789ab".into(),
            }),
            storage: storage.map(str::to_owned),
            size_bytes: size,
            detail: Value::Null,
            created_ms: 1_764_100_000_000,
            status: "kept".into(),
            released_ms: None,
            released_by: None,
        }
    }

    fn reports(points: &[UndoPoint]) -> Vec<UndoPointReport> {
        points.iter().map(|p| report_of(p).unwrap()).collect()
    }

    const GIB: u64 = 1 << 30;

    #[test]
    fn backups_are_summed_per_storage_against_the_fraction() {
        let points = reports(&[
            point('a', "backup", Some("nas"), Some(15 * GIB)),
            point('b', "backup", Some("nas"), Some(10 * GIB)),
            point('c', "backup", Some("local"), Some(10 * GIB)),
            // snapshots and previous values have no size PVE tells: never counted
            point('d', "snapshot", None, None),
            point('e', "previous_values", None, None),
        ]);
        let total = |s: &str| match s {
            "nas" => Some(100 * GIB),
            "local" => Some(100 * GIB),
            _ => None,
        };
        // 25 GiB of 100 GiB on nas is above 0.2; 10 GiB on local is not
        let w = undo_space_warnings(&points, total, 0.2);
        assert_eq!(
            w,
            vec![UndoSpaceWarning {
                storage: "nas".into(),
                used_bytes: 25 * GIB,
                total_bytes: 100 * GIB,
                backups: 2,
                warn_fraction: 0.2,
            }]
        );
        let m = w[0].message();
        assert!(
            m.starts_with("2 kept undo backups use 25.0% of storage nas (25.0 GiB of 100.0 GiB)"),
            "{m}"
        );
        assert!(m.contains("ops release OP_ID"), "{m}");
        // each alone is not above, the sum is: exactly at the fraction is not above
        assert!(undo_space_warnings(&points, total, 0.25).is_empty());
        assert_eq!(undo_space_warnings(&points, total, 0.09).len(), 2);
    }

    #[test]
    fn released_points_and_unknown_totals_decide_nothing() {
        let mut released = point('a', "backup", Some("nas"), Some(90 * GIB));
        released.status = "released".into();
        let points = reports(&[released, point('b', "backup", Some("gone"), Some(90 * GIB))]);
        let total = |s: &str| match s {
            "nas" => Some(100 * GIB),
            "zero" => Some(0),
            _ => None,
        };
        assert!(undo_space_warnings(&points, total, 0.2).is_empty());
        let zero = reports(&[point('c', "backup", Some("zero"), Some(1))]);
        assert!(undo_space_warnings(&zero, total, 0.2).is_empty());
    }

    #[test]
    fn a_row_the_gate_could_not_have_written_is_an_error() {
        let mut p = point('a', "clone", None, None);
        assert!(matches!(
            report_of(&p),
            Err(UndoViewError::Malformed { .. })
        ));
        p.kind = "snapshot".into();
        p.status = "gone".into();
        assert!(report_of(&p).is_err());
        p.status = "kept".into();
        let r = report_of(&p).unwrap();
        assert_eq!(r.kind, UndoKind::Snapshot);
        assert_eq!(r.created_at, Timestamp::from_unix(1_764_100_000).unwrap());
        // and it renders as an error line, not a panic
        let v = point_json(&point('b', "clone", None, None), 0);
        assert!(render_one(&v).contains("unknown kind"));
    }

    #[test]
    fn the_listing_shows_kind_ref_storage_size_and_age() {
        let p = point('a', "backup", Some("nas"), Some(3 * GIB / 2));
        let v = point_json(&p, p.created_ms + (2 * 86_400 + 5 * 3600) * 1000);
        assert_eq!(v["ref"], p.reference.clone().unwrap());
        assert_eq!(v["age_seconds"], 2 * 86_400 + 5 * 3600);
        let text = render_lines(&[v]);
        assert!(text.starts_with("undo points kept: 1\n"), "{text}");
        let line = text.lines().nth(1).unwrap();
        for part in [
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            "vmid 101",
            "backup",
            "nas:backup/vzdump-lxc-101-2026_12_06-10_00_00.tar.zst on nas",
            "1.5 GiB",
            "2d 5h old",
            "made by rollback",
        ] {
            assert!(line.contains(part), "{part:?} not in {line:?}");
        }
        let snap = point_json(
            &point('b', "snapshot", None, None),
            1_764_100_000_000 + 61_000,
        );
        let line = render_one(&snap);
        assert!(
            line.contains("felhom-undo-0123456789ab  size unknown  1m 1s old"),
            "{line}"
        );
        assert_eq!(render_lines(&[]), "no undo points kept\n");
    }

    #[test]
    fn sizes_and_ages_read_well() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(u64::MAX), "16384.0 PiB");
        assert_eq!(human_age(59), "59s");
        assert_eq!(human_age(3600), "1h 0m");
        assert_eq!(human_age(86_400 * 400), "400d 0h");
    }
}
