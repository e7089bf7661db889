//! The planner: a pure function from (this box's record of a path, a peer's record of it) to what
//! must happen here. Version vectors decide "newer", "older" or "concurrent"; concurrent versions
//! with different content are a conflict whose winner every box picks the same way, so exactly
//! the box holding the losing version moves it aside to a conflict copy and nothing is lost.
//!
//! The planner reads no disk and no clock: the engine makes sure the local record describes the
//! disk (it scans before planning, and the applier re-checks the disk right before it commits).

use crate::model::{Kind, Record, VersionVector, VvOrder};
use crate::paths::RelPath;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// This box is up to date (or its version wins and the peer will come to it).
    Nothing,
    /// The local record does not describe the disk yet (a file not hashed): scan, then plan again.
    Rescan,
    /// Store `record` in the index; the disk already holds this content and metadata (a merged
    /// version of identical content, or a tombstone of a path we never had).
    Record(Record),
    /// Make the disk hold `record` (file, directory or symlink), then store it. When the local
    /// file already has this content only the metadata is changed.
    Install(Record),
    /// Remove the local path, then store the tombstone `record`.
    Delete(Record),
    /// Move the local version aside to `loser` (a new path that syncs like any other), then
    /// install `record`.
    Conflict { record: Record, loser: RelPath },
}

/// Is this remote record complete enough to act on? (A file announced before it could be hashed
/// carries no blocks; its owner announces it again once hashed.)
pub fn is_actionable(r: &Record) -> bool {
    r.deleted
        || r.kind != Kind::File
        || (r.sha256.is_some()
            && r.blocks.len() as u64 == r.size.div_ceil(crate::model::BLOCK_SIZE))
}

/// Total order used to pick the winner of a conflict; every box computes the same one.
/// A directory beats a non-directory (moving a whole tree aside would churn every child), an
/// existing path beats a deletion (an edit beats a concurrent delete), then the newer mtime, then
/// the higher device id, then content bytes so that distinct records never tie.
fn conflict_key(r: &Record) -> impl Ord + '_ {
    (
        r.kind == Kind::Dir && !r.deleted,
        !r.deleted,
        r.mtime_ns,
        r.modified_by,
        r.sha256,
        r.target.as_deref(),
        r.size,
        r.mode,
    )
}

/// Does `a` win a conflict against `b`?
pub fn wins(a: &Record, b: &Record) -> bool {
    conflict_key(a) > conflict_key(b)
}

/// Same metadata as far as the disk is concerned (what an install of identical content changes).
fn same_meta(a: &Record, b: &Record) -> bool {
    a.mode == b.mode && (a.kind == Kind::Dir || a.mtime_ns == b.mtime_ns)
}

/// Decide what to do about `remote` given this box's `local` record of the same path.
pub fn plan(local: Option<&Record>, remote: &Record) -> Action {
    if !is_actionable(remote) {
        return Action::Nothing;
    }
    let Some(l) = local else {
        return if remote.deleted {
            Action::Record(remote.clone())
        } else {
            Action::Install(remote.clone())
        };
    };
    if l.kind == Kind::File && !l.deleted && !l.is_hashed() {
        return Action::Rescan;
    }
    match remote.version.compare(&l.version) {
        VvOrder::Equal | VvOrder::Lesser => Action::Nothing,
        VvOrder::Greater => {
            if remote.deleted {
                if l.deleted {
                    Action::Record(remote.clone())
                } else {
                    Action::Delete(remote.clone())
                }
            } else if l.same_content(remote) && same_meta(l, remote) && l.kind != Kind::Dir {
                Action::Record(remote.clone())
            } else {
                Action::Install(remote.clone())
            }
        }
        VvOrder::Concurrent => {
            let merged = l.version.merge(&remote.version);
            let with = |r: &Record, v: &VersionVector| {
                let mut r = r.clone();
                r.version = v.clone();
                r
            };
            if l.same_content(remote) || (l.deleted && remote.deleted) {
                // Identical content is not a conflict: both boxes take the merged version and the
                // winner's metadata, so they end with equal records without moving any data.
                if wins(remote, l) && !(same_meta(l, remote) || l.deleted) {
                    Action::Install(with(remote, &merged))
                } else if wins(remote, l) {
                    Action::Record(with(remote, &merged))
                } else {
                    Action::Record(with(l, &merged))
                }
            } else if l.deleted {
                // Their edit beats our delete.
                Action::Install(with(remote, &merged))
            } else if remote.deleted || wins(l, remote) {
                // Our version wins; the peer moves its version aside and takes ours. Merging here
                // would make our record look newer than theirs and they would overwrite their edit
                // without keeping a copy, so this box changes nothing.
                Action::Nothing
            } else {
                Action::Conflict {
                    record: with(remote, &merged),
                    loser: conflict_name(&l.path, l.mtime_ns, l.modified_by),
                }
            }
        }
    }
}

/// The printed short form (first group of the device ID) of a device's short id.
pub fn short_device_str(short: u64) -> String {
    let enc = data_encoding::BASE32_NOPAD.encode(&short.to_be_bytes());
    enc.chars().take(7).collect()
}

/// `NAME.sync-conflict-YYYYMMDD-HHMMSS-<short device id>.EXT`, from the losing version's mtime and
/// author, so two boxes that both keep the same losing version name it the same.
pub fn conflict_name(path: &RelPath, mtime_ns: i64, device: u64) -> RelPath {
    let secs = mtime_ns.div_euclid(1_000_000_000);
    let stamp = chrono::DateTime::from_timestamp(secs, 0)
        .map(|t| t.format("%Y%m%d-%H%M%S").to_string())
        .unwrap_or_else(|| "00000000-000000".into());
    let name = path.file_name();
    let (stem, ext) = match name.rfind('.') {
        Some(i) if i > 0 => (&name[..i], &name[i..]),
        _ => (name, ""),
    };
    let suffix = format!(".sync-conflict-{stamp}-{}", short_device_str(device));
    let mut stem = stem.to_string();
    while stem.len() + suffix.len() + ext.len() > crate::paths::MAX_NAME_LEN && !stem.is_empty() {
        stem.pop();
    }
    let file = format!("{stem}{suffix}{ext}");
    let parent = path.parent().unwrap_or_else(RelPath::root);
    parent
        .join(&file)
        .unwrap_or_else(|_| RelPath::parse(&file).unwrap_or_else(|_| path.clone()))
}

pub fn is_conflict_copy(path: &RelPath) -> bool {
    path.file_name().contains(".sync-conflict-")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rec(path: &str, content: u8, mtime: i64, by: u64, version: &[(u64, u64)]) -> Record {
        Record {
            path: RelPath::parse(path).unwrap(),
            kind: Kind::File,
            size: 1,
            mtime_ns: mtime,
            mode: 0o644,
            target: None,
            md5: Some([content; 16]),
            sha256: Some([content; 32]),
            blocks: vec![[content; 32]],
            version: VersionVector(version.to_vec()),
            deleted: false,
            sequence: 1,
            modified_by: by,
        }
    }

    #[test]
    fn newer_remote_installs_older_ignored() {
        let l = rec("a", 1, 10, 1, &[(1, 1)]);
        let r = rec("a", 2, 20, 2, &[(1, 1), (2, 2)]);
        assert_eq!(plan(Some(&l), &r), Action::Install(r.clone()));
        assert_eq!(plan(Some(&r), &l), Action::Nothing);
        assert_eq!(plan(None, &r), Action::Install(r.clone()));
    }

    #[test]
    fn conflict_loser_is_older_mtime() {
        let a = rec("d/x.txt", 1, 10_000_000_000, 1, &[(1, 2)]);
        let b = rec("d/x.txt", 2, 20_000_000_000, 2, &[(1, 1), (2, 2)]);
        // On a's box the remote (b) wins: a moves aside.
        match plan(Some(&a), &b) {
            Action::Conflict { record, loser } => {
                assert_eq!(record.sha256, b.sha256);
                assert!(loser
                    .as_str()
                    .starts_with("d/x.sync-conflict-19700101-000010-"));
                assert!(loser.as_str().ends_with(".txt"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(plan(Some(&b), &a), Action::Nothing);
    }

    #[test]
    fn edit_beats_delete() {
        let mut del = rec("a", 0, 30, 1, &[(1, 2)]);
        del.deleted = true;
        del.sha256 = None;
        let edit = rec("a", 2, 5, 2, &[(1, 1), (2, 2)]);
        assert!(matches!(plan(Some(&del), &edit), Action::Install(_)));
        assert_eq!(plan(Some(&edit), &del), Action::Nothing);
    }

    #[test]
    fn identical_is_not_conflict() {
        let a = rec("a", 7, 10, 1, &[(1, 1)]);
        let b = rec("a", 7, 10, 2, &[(2, 1)]);
        let pa = plan(Some(&a), &b);
        let pb = plan(Some(&b), &a);
        for p in [&pa, &pb] {
            assert!(matches!(p, Action::Record(_) | Action::Install(_)), "{p:?}");
        }
    }

    #[test]
    fn conflict_names() {
        let p = RelPath::parse("a/b.tar.gz").unwrap();
        let n = conflict_name(&p, 0, 0);
        assert_eq!(
            n.as_str(),
            "a/b.tar.sync-conflict-19700101-000000-AAAAAAA.gz"
        );
        let p = RelPath::parse(".bashrc").unwrap();
        assert!(conflict_name(&p, 0, 0)
            .as_str()
            .starts_with(".bashrc.sync-conflict-"));
        assert!(is_conflict_copy(&conflict_name(&p, 0, 0)));
    }

    // ---- property tests: random pairs of records, simulated to convergence ----

    fn arb_record() -> impl Strategy<Value = Record> {
        (
            0u8..3,                                                  // content
            0i64..3,                                                 // mtime
            1u64..4,                                                 // modified_by
            proptest::collection::btree_map(1u64..4, 1u64..4, 0..3), // version
            0u8..4,                                                  // kind/deleted
            prop_oneof![Just(0o644u32), Just(0o600u32)],
        )
            .prop_map(|(c, m, by, v, k, mode)| {
                let mut r = rec("p/f.txt", c, m, by, &v.into_iter().collect::<Vec<_>>());
                r.mode = mode;
                match k {
                    1 => {
                        r.kind = Kind::Dir;
                        r.size = 0;
                        r.md5 = None;
                        r.sha256 = None;
                        r.blocks.clear();
                    }
                    2 => {
                        r.kind = Kind::Symlink;
                        r.size = 0;
                        r.md5 = None;
                        r.sha256 = None;
                        r.blocks.clear();
                        r.target = Some(format!("t{c}"));
                    }
                    3 => {
                        r.deleted = true;
                        r.size = 0;
                        r.md5 = None;
                        r.sha256 = None;
                        r.blocks.clear();
                    }
                    _ => {}
                }
                r
            })
    }

    /// A box in the simulation: its record of the path plus the conflict copies it holds.
    #[derive(Clone, Debug)]
    struct SimBox {
        rec: Option<Record>,
        copies: Vec<(RelPath, Record)>,
    }

    fn step(me: &mut SimBox, other: &Record) -> bool {
        match plan(me.rec.as_ref(), other) {
            Action::Nothing => false,
            Action::Rescan => panic!("hashed records never need a rescan"),
            Action::Record(r) | Action::Install(r) | Action::Delete(r) => {
                let changed = me.rec.as_ref() != Some(&r);
                me.rec = Some(r);
                changed
            }
            Action::Conflict { record, loser } => {
                if let Some(l) = me.rec.take() {
                    me.copies.push((loser, l));
                }
                me.rec = Some(record);
                true
            }
        }
    }

    proptest! {
        #[test]
        fn plan_is_deterministic(l in proptest::option::of(arb_record()), r in arb_record()) {
            prop_assert_eq!(plan(l.as_ref(), &r), plan(l.as_ref(), &r));
        }

        #[test]
        fn exactly_one_side_keeps_a_conflict_copy(a in arb_record(), b in arb_record()) {
            let pa = plan(Some(&a), &b);
            let pb = plan(Some(&b), &a);
            let ca = matches!(pa, Action::Conflict { .. });
            let cb = matches!(pb, Action::Conflict { .. });
            prop_assert!(!(ca && cb), "both sides move aside: {pa:?} {pb:?}");
            if a.version.compare(&b.version) == VvOrder::Concurrent
                && !a.same_content(&b) && !a.deleted && !b.deleted
            {
                prop_assert!(ca || cb, "nobody keeps the loser: {pa:?} {pb:?}");
            }
        }

        #[test]
        fn two_boxes_converge_and_lose_nothing(a in arb_record(), b in arb_record()) {
            // Equal versions always describe equal records in a real system.
            prop_assume!(a.version.compare(&b.version) != VvOrder::Equal);
            let mut x = SimBox { rec: Some(a.clone()), copies: vec![] };
            let mut y = SimBox { rec: Some(b.clone()), copies: vec![] };
            let mut rounds = 0;
            loop {
                rounds += 1;
                prop_assert!(rounds < 8, "no convergence: {x:?} {y:?}");
                let yr = y.rec.clone().unwrap();
                let c1 = step(&mut x, &yr);
                let xr = x.rec.clone().unwrap();
                let c2 = step(&mut y, &xr);
                if !c1 && !c2 {
                    break;
                }
            }
            let (xr, yr) = (x.rec.clone().unwrap(), y.rec.clone().unwrap());
            prop_assert!(xr.same_content(&yr) || (xr.deleted && yr.deleted), "{xr:?} != {yr:?}");
            prop_assert_eq!(&xr.version, &yr.version);
            // A version nobody superseded survives at its path or as a conflict copy.
            let order = a.version.compare(&b.version);
            for (orig, dominated) in [(&a, order == VvOrder::Lesser), (&b, order == VvOrder::Greater)] {
                if dominated || orig.deleted {
                    continue;
                }
                let kept = xr.same_content(orig)
                    || x.copies.iter().chain(y.copies.iter()).any(|(_, c)| c.same_content(orig));
                // Identical-content merges keep the content but may take the other's metadata.
                prop_assert!(kept || orig.kind == Kind::Dir, "lost {orig:?}");
            }
        }
    }
}
