//! Seeded randomized convergence: random operations on two boxes, some while they are apart;
//! afterwards both trees are identical (content, mode, mtime) and every last write made while
//! apart survives on both boxes, at its path or as a conflict copy.
//!
//! `MYBOX_SEED=N` replays a run; `MYBOX_SOAK_OPS=N` makes it longer (scripts/soak.sh).

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const DIRS: &[&str] = &["", "d1", "d2", "d1/e"];
const NAMES: &[&str] = &["f0", "f1.txt", "f2 sp", "ü3.md", "f4"];

/// What one side last did to a path while apart: wrote this content, or removed it.
type LastWrites = BTreeMap<String, Option<Vec<u8>>>;

fn rand_path(rng: &mut StdRng) -> String {
    let d = DIRS[rng.gen_range(0..DIRS.len())];
    let n = NAMES[rng.gen_range(0..NAMES.len())];
    if d.is_empty() {
        n.to_string()
    } else {
        format!("{d}/{n}")
    }
}

fn files_under(root: &Path) -> Vec<String> {
    snapshot(root)
        .into_iter()
        .filter(|(_, e)| matches!(e, Entry::File { .. }))
        .map(|(k, _)| k)
        .collect()
}

fn random_content(rng: &mut StdRng) -> Vec<u8> {
    let len = match rng.gen_range(0..10) {
        0 => 0,
        1 => rng.gen_range(100_000..400_000),
        _ => rng.gen_range(1..3000),
    };
    let seed: u8 = rng.gen();
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// One random operation on the store at `root`; records last writes when `track` is given.
fn random_op(rng: &mut StdRng, root: &Path, mut track: Option<&mut LastWrites>) -> String {
    let files = files_under(root);
    let mut note = |p: &str, c: Option<Vec<u8>>| {
        if let Some(t) = track.as_deref_mut() {
            t.insert(p.to_string(), c);
        }
    };
    let op = rng.gen_range(0..10);
    match op {
        0 | 1 => {
            let p = rand_path(rng);
            let full = root.join(&p);
            if full.is_dir() {
                return format!("skip write {p} (dir)");
            }
            let _ = std::fs::create_dir_all(full.parent().unwrap());
            let c = random_content(rng);
            if std::fs::write(&full, &c).is_ok() {
                note(&p, Some(c));
            }
            format!("write {p}")
        }
        2 if !files.is_empty() => {
            let p = &files[rng.gen_range(0..files.len())];
            let full = root.join(p);
            let mut c = std::fs::read(&full).unwrap_or_default();
            let more = random_content(rng);
            c.extend_from_slice(&more[..more.len().min(500)]);
            if std::fs::write(&full, &c).is_ok() {
                note(p, Some(c));
            }
            format!("append {p}")
        }
        3 if !files.is_empty() => {
            let p = &files[rng.gen_range(0..files.len())];
            let full = root.join(p);
            let mut c = std::fs::read(&full).unwrap_or_default();
            c.truncate(c.len() / 2);
            if std::fs::write(&full, &c).is_ok() {
                note(p, Some(c));
            }
            format!("truncate {p}")
        }
        4 if !files.is_empty() => {
            let p = &files[rng.gen_range(0..files.len())];
            if std::fs::remove_file(root.join(p)).is_ok() {
                note(p, None);
            }
            format!("delete {p}")
        }
        5 if !files.is_empty() => {
            let p = files[rng.gen_range(0..files.len())].clone();
            let q = rand_path(rng);
            let (fp, fq) = (root.join(&p), root.join(&q));
            if p == q || fq.is_dir() {
                return format!("skip rename {p}");
            }
            let _ = std::fs::create_dir_all(fq.parent().unwrap());
            let c = std::fs::read(&fp).ok();
            if std::fs::rename(&fp, &fq).is_ok() {
                note(&p, None);
                note(&q, c);
            }
            format!("rename {p} -> {q}")
        }
        6 => {
            let d = DIRS[rng.gen_range(1..DIRS.len())];
            let _ = std::fs::create_dir_all(root.join(d));
            format!("mkdir {d}")
        }
        7 => {
            let d = DIRS[rng.gen_range(1..DIRS.len())];
            let full = root.join(d);
            if full.is_dir() {
                for f in files.iter().filter(|f| f.starts_with(&format!("{d}/"))) {
                    note(f, None);
                }
                let _ = std::fs::remove_dir_all(&full);
            }
            format!("rmdir {d}")
        }
        8 if !files.is_empty() => {
            let p = &files[rng.gen_range(0..files.len())];
            let mode = [0o600, 0o644, 0o755][rng.gen_range(0..3)];
            let _ = std::fs::set_permissions(root.join(p), std::fs::Permissions::from_mode(mode));
            format!("chmod {p} {mode:o}")
        }
        _ => {
            let p = rand_path(rng);
            let full = root.join(&p);
            if full.exists() {
                return format!("skip create {p}");
            }
            let _ = std::fs::create_dir_all(full.parent().unwrap());
            let c = random_content(rng);
            if std::fs::write(&full, &c).is_ok() {
                note(&p, Some(c));
            }
            format!("create {p}")
        }
    }
}

/// A path whose last write (a rename included) put back exactly what the path held when the
/// round began was not changed by that side: its file is the version it had, and a newer
/// version from the other side rightly replaces it (a file moved away and back is not an edit).
fn drop_restores(last: &mut LastWrites, start: &Tree) {
    last.retain(|p, c| {
        !matches!((c.as_ref(), start.get(p)), (Some(c), Some(Entry::File { data, .. })) if data == c)
    });
}

/// Every content a side wrote last while apart exists at its path or in a conflict copy of it.
fn check_survivors(t: &Tree, side: &str, last: &LastWrites, seed: u64) {
    for (p, c) in last {
        let Some(c) = c else { continue };
        let (stem, _) = match p.rsplit_once('/') {
            Some((_, n)) => (n.split('.').next().unwrap_or(n).to_string(), ()),
            None => (p.split('.').next().unwrap_or(p).to_string(), ()),
        };
        let found = t.iter().any(|(k, e)| {
            let matches_path = k == p || (k.contains(".sync-conflict-") && k.contains(&stem));
            matches_path && matches!(e, Entry::File { data, .. } if data == c)
        });
        assert!(
            found,
            "seed {seed}: {side}'s last write to {p} ({} bytes) was lost",
            c.len()
        );
    }
}

#[test]
fn random_operations_converge() {
    let seed: u64 = std::env::var("MYBOX_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let ops: usize = std::env::var("MYBOX_SOAK_OPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(90);
    eprintln!("random convergence: MYBOX_SEED={seed} MYBOX_SOAK_OPS={ops}");
    let mut rng = StdRng::seed_from_u64(seed);
    let (a, mut b) = two_boxes();
    let rounds = (ops / 30).max(1);
    let mut log = Vec::new();
    for round in 0..rounds {
        // Connected: both sides change things while sync runs.
        for _ in 0..10 {
            let (name, root) = if rng.gen_bool(0.5) {
                ("a", &a.root)
            } else {
                ("b", &b.root)
            };
            let what = random_op(&mut rng, root, None);
            log.push(format!("r{round} connected {name}: {what}"));
            std::thread::sleep(Duration::from_millis(rng.gen_range(0..40)));
        }
        let result =
            std::panic::catch_unwind(|| wait_converged(&[&a, &b], Duration::from_secs(60)));
        if let Err(e) = result {
            panic!(
                "seed {seed}: no convergence after connected round {round}\nops:\n{}\n{e:?}",
                log.join("\n")
            );
        }
        // Apart: b's daemon is stopped (or killed -9 in the middle of whatever it was doing),
        // both sides change things.
        if rng.gen_bool(0.3) {
            log.push(format!("r{round} kill -9 b"));
            b.kill9();
        } else {
            b.stop();
        }
        let mut last_a = LastWrites::new();
        let mut last_b = LastWrites::new();
        let (start_a, start_b) = (snapshot(&a.root), snapshot(&b.root));
        for _ in 0..10 {
            let what = random_op(&mut rng, &a.root, Some(&mut last_a));
            log.push(format!("r{round} apart a: {what}"));
            let what = random_op(&mut rng, &b.root, Some(&mut last_b));
            log.push(format!("r{round} apart b: {what}"));
        }
        drop_restores(&mut last_a, &start_a);
        drop_restores(&mut last_b, &start_b);
        std::thread::sleep(Duration::from_millis(200));
        b.start();
        let t =
            match std::panic::catch_unwind(|| wait_converged(&[&a, &b], Duration::from_secs(60))) {
                Ok(t) => t,
                Err(e) => panic!(
                    "seed {seed}: no convergence after apart round {round}\nops:\n{}\n{e:?}",
                    log.join("\n")
                ),
            };
        let r = std::panic::catch_unwind(|| {
            check_survivors(&t, "a", &last_a, seed);
            check_survivors(&t, "b", &last_b, seed);
        });
        if let Err(e) = r {
            panic!("{e:?}\nops:\n{}", log.join("\n"));
        }
    }
    eprintln!("seed {seed}: {} operations, converged", log.len());
}
