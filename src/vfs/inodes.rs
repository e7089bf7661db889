//! Inode numbers for the mount: a stable number per path while the kernel remembers it.
//!
//! Numbers are handed out from a counter and never reused, so the FUSE generation can stay 0.
//! A path keeps its number across renames (the node moves, descendants too). A node whose path
//! was unlinked or replaced stays as an orphan (path `None`) until the kernel forgets it, so an
//! open file can still be `fstat`ed. Nodes with no kernel reference (only seen by `readdir`)
//! are kept: they are small, and a later lookup reuses their number.

use std::collections::HashMap;

use crate::paths::RelPath;

pub const ROOT_INO: u64 = 1;
/// The virtual `.mybox` directory at the root (see [`super::MOUNT_MARKER`]).
pub const META_INO: u64 = 2;
/// The marker file inside it.
pub const MARKER_INO: u64 = 3;
const FIRST_FREE: u64 = 16;

#[derive(Debug)]
struct Node {
    /// Every path naming this inode (more than one for hard links); the first is used for
    /// operations. Empty for an orphan.
    paths: Vec<RelPath>,
    lookups: u64,
}

impl Node {
    /// `old` now names nothing (`None`) or is called `new`.
    fn replace(&mut self, old: &RelPath, new: Option<RelPath>) {
        if let Some(i) = self.paths.iter().position(|p| p == old) {
            match new {
                Some(n) => self.paths[i] = n,
                None => {
                    self.paths.remove(i);
                }
            }
        }
    }
}

#[derive(Debug)]
pub struct InodeTable {
    nodes: HashMap<u64, Node>,
    by_path: HashMap<RelPath, u64>,
    next: u64,
}

impl Default for InodeTable {
    fn default() -> Self {
        Self::new()
    }
}

impl InodeTable {
    pub fn new() -> Self {
        let mut t = InodeTable {
            nodes: HashMap::new(),
            by_path: HashMap::new(),
            next: FIRST_FREE,
        };
        t.nodes.insert(
            ROOT_INO,
            Node {
                paths: vec![RelPath::root()],
                lookups: 1,
            },
        );
        t.by_path.insert(RelPath::root(), ROOT_INO);
        t
    }

    /// Path of `ino`; `None` for unknown inodes and orphans.
    pub fn path(&self, ino: u64) -> Option<RelPath> {
        self.nodes.get(&ino).and_then(|n| n.paths.first().cloned())
    }

    pub fn exists(&self, ino: u64) -> bool {
        self.nodes.contains_key(&ino)
    }

    pub fn ino_of(&self, path: &RelPath) -> Option<u64> {
        self.by_path.get(path).copied()
    }

    /// The number for `path`, allocating one if needed; `lookup` adds a kernel reference.
    pub fn get_or_insert(&mut self, path: &RelPath, lookup: bool) -> u64 {
        let ino = match self.by_path.get(path) {
            Some(&ino) => ino,
            None => {
                let ino = self.next;
                self.next += 1;
                self.nodes.insert(
                    ino,
                    Node {
                        paths: vec![path.clone()],
                        lookups: 0,
                    },
                );
                self.by_path.insert(path.clone(), ino);
                ino
            }
        };
        if lookup {
            if let Some(n) = self.nodes.get_mut(&ino) {
                n.lookups += 1;
            }
        }
        ino
    }

    /// One more kernel reference to `ino`, if it is still called `name` in `dir` (else the
    /// caller looks the name up afresh).
    pub fn add_lookup(&mut self, ino: u64, dir: &RelPath, name: &str) -> bool {
        let named = |p: &RelPath| {
            let s = p.as_str();
            if dir.is_root() {
                return s == name;
            }
            let d = dir.as_str();
            s.len() == d.len() + 1 + name.len()
                && s.starts_with(d)
                && s.ends_with(name)
                && s.as_bytes()[d.len()] == b'/'
        };
        match self.nodes.get_mut(&ino) {
            Some(n) if n.paths.iter().any(named) => {
                n.lookups += 1;
                true
            }
            _ => false,
        }
    }

    /// A hard link: `path` now names `ino` too (one more kernel reference).
    pub fn add_link(&mut self, ino: u64, path: &RelPath) {
        self.unlink(path);
        if let Some(n) = self.nodes.get_mut(&ino) {
            n.paths.push(path.clone());
            n.lookups += 1;
            self.by_path.insert(path.clone(), ino);
        }
    }

    /// The kernel dropped `n` references to `ino`.
    pub fn forget(&mut self, ino: u64, n: u64) {
        if ino == ROOT_INO || ino == META_INO || ino == MARKER_INO {
            return;
        }
        let gone = match self.nodes.get_mut(&ino) {
            Some(node) => {
                node.lookups = node.lookups.saturating_sub(n);
                node.lookups == 0
            }
            None => false,
        };
        if gone {
            if let Some(node) = self.nodes.remove(&ino) {
                for p in node.paths {
                    if self.by_path.get(&p) == Some(&ino) {
                        self.by_path.remove(&p);
                    }
                }
            }
        }
    }

    /// `path` no longer names anything: its node (if any) loses that name, and becomes an
    /// orphan if it was the last one. Returns its number and whether it is now an orphan.
    pub fn unlink(&mut self, path: &RelPath) -> Option<u64> {
        let ino = self.by_path.remove(path)?;
        if let Some(n) = self.nodes.get_mut(&ino) {
            n.replace(path, None);
            if n.paths.is_empty() && n.lookups == 0 {
                self.nodes.remove(&ino);
            }
        }
        Some(ino)
    }

    /// Does `ino` still have a name?
    pub fn is_orphan(&self, ino: u64) -> bool {
        self.nodes.get(&ino).is_none_or(|n| n.paths.is_empty())
    }

    /// Move `from` (and everything below it) to `to`; whatever `to` named loses that name, and
    /// its number is returned.
    pub fn rename(&mut self, from: &RelPath, to: &RelPath) -> Option<u64> {
        let replaced = self.unlink(to);
        let moved: Vec<(RelPath, u64)> = self
            .by_path
            .iter()
            .filter(|(p, _)| p.starts_with(from))
            .map(|(p, i)| (p.clone(), *i))
            .collect();
        for (old, ino) in moved {
            self.by_path.remove(&old);
            let suffix = &old.as_str()[from.as_str().len()..];
            let new = RelPath::parse(&format!("{}{}", to.as_str(), suffix)).ok();
            if let Some(n) = self.nodes.get_mut(&ino) {
                n.replace(&old, new.clone());
            }
            if let Some(new) = new {
                self.by_path.insert(new, ino);
            }
        }
        replaced
    }

    /// Swap two paths and their subtrees (RENAME_EXCHANGE).
    pub fn exchange(&mut self, a: &RelPath, b: &RelPath) {
        let affected: Vec<(RelPath, u64)> = self
            .by_path
            .iter()
            .filter(|(p, _)| p.starts_with(a) || p.starts_with(b))
            .map(|(p, i)| (p.clone(), *i))
            .collect();
        for (p, _) in &affected {
            self.by_path.remove(p);
        }
        // Compute every new name first, so a node named under both a and b (hard links) is
        // updated name by name.
        let mut renamed = Vec::new();
        for (p, ino) in affected {
            let (from, to) = if p.starts_with(a) { (a, b) } else { (b, a) };
            let np = RelPath::parse_or_root(&format!(
                "{}{}",
                to.as_str(),
                &p.as_str()[from.as_str().len()..]
            ))
            .ok();
            renamed.push((p, np, ino));
        }
        for (old, new, ino) in &renamed {
            if let Some(n) = self.nodes.get_mut(ino) {
                if let Some(i) = n.paths.iter().position(|x| x == old) {
                    if let Some(new) = new {
                        n.paths[i] = new.clone();
                    } else {
                        n.paths.remove(i);
                    }
                }
            }
        }
        for (_, new, ino) in renamed {
            if let Some(new) = new {
                self.by_path.insert(new, ino);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath::parse(s).unwrap()
    }

    #[test]
    fn stable_numbers_and_forget() {
        let mut t = InodeTable::new();
        let a = t.get_or_insert(&p("a"), true);
        assert_eq!(t.get_or_insert(&p("a"), true), a);
        t.forget(a, 1);
        assert_eq!(t.path(a), Some(p("a")));
        t.forget(a, 1);
        assert_eq!(t.path(a), None);
        assert_ne!(
            t.get_or_insert(&p("a"), true),
            a,
            "numbers are never reused"
        );
    }

    #[test]
    fn rename_moves_subtree_and_orphans_target() {
        let mut t = InodeTable::new();
        let d = t.get_or_insert(&p("d"), true);
        let f = t.get_or_insert(&p("d/f"), true);
        let x = t.get_or_insert(&p("x"), true);
        assert_eq!(t.rename(&p("d"), &p("x")), Some(x));
        assert_eq!(t.path(d), Some(p("x")));
        assert_eq!(t.path(f), Some(p("x/f")));
        assert_eq!(t.path(x), None);
        assert!(t.is_orphan(x));
        assert!(t.exists(x), "orphan kept until forgotten");
        t.forget(x, 1);
        assert!(!t.exists(x));
        // A sibling with a common prefix is not moved.
        let dd = t.get_or_insert(&p("xy"), true);
        t.rename(&p("x"), &p("z"));
        assert_eq!(t.path(dd), Some(p("xy")));
    }

    #[test]
    fn add_lookup_only_under_the_listed_name() {
        let mut t = InodeTable::new();
        let a = t.get_or_insert(&p("d/a"), false);
        let top = t.get_or_insert(&p("a"), false);
        assert!(t.add_lookup(a, &p("d"), "a"));
        assert!(t.add_lookup(top, &RelPath::root(), "a"));
        assert!(!t.add_lookup(a, &RelPath::root(), "a"));
        assert!(!t.add_lookup(a, &p("d"), "b"));
        assert!(!t.add_lookup(a, &p("dd"), "a"));
        t.rename(&p("d/a"), &p("d/b"));
        assert!(!t.add_lookup(a, &p("d"), "a"), "renamed since listed");
        assert!(t.add_lookup(a, &p("d"), "b"));
        t.forget(a, 2);
        assert!(!t.add_lookup(a, &p("d"), "b"), "forgotten");
    }

    #[test]
    fn hard_links_share_a_number() {
        let mut t = InodeTable::new();
        let a = t.get_or_insert(&p("a"), true);
        t.add_link(a, &p("b"));
        assert_eq!(t.ino_of(&p("b")), Some(a));
        t.unlink(&p("a"));
        assert_eq!(t.path(a), Some(p("b")), "the other name carries on");
        assert!(!t.is_orphan(a));
        t.unlink(&p("b"));
        assert!(t.is_orphan(a));
    }

    #[test]
    fn exchange_swaps() {
        let mut t = InodeTable::new();
        let a = t.get_or_insert(&p("a"), true);
        let b = t.get_or_insert(&p("b"), true);
        let af = t.get_or_insert(&p("a/f"), true);
        t.exchange(&p("a"), &p("b"));
        assert_eq!(t.path(a), Some(p("b")));
        assert_eq!(t.path(b), Some(p("a")));
        assert_eq!(t.path(af), Some(p("b/f")));
    }
}
