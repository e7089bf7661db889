//! Helpers for the sync integration tests: boxes in temp folders, real `mybox daemon` processes
//! on loopback, waiting for convergence, and comparing trees (content, mode, mtime).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_mybox");

pub struct TestBox {
    pub _tmp: tempfile::TempDir,
    pub root: PathBuf,
    pub id: String,
    pub port: u16,
    pub child: Option<Child>,
    pub name: String,
    /// Address the daemon listens on and peers dial (loopback unless the test moves the box
    /// into a network namespace).
    pub host: String,
    /// Network namespace the daemon runs in (`ip netns exec`), if any.
    pub ns: Option<String>,
}

/// A port for a daemon that starts later. Chosen below Linux's ephemeral range (32768+), so an
/// outgoing connection of another test cannot take it in the meantime, and never handed out twice
/// in one test binary.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let start = 20000 + (std::process::id() % 6000) as u16;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20000 + (start - 20000 + n * 7) % 12000;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

pub fn mybox(root: &Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .arg("--box")
        .arg(root)
        .args(args)
        .output()
        .expect("running mybox")
}

impl TestBox {
    pub fn new(name: &str) -> TestBox {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().join(name);
        let out = Command::new(BIN)
            .arg("init")
            .arg(&root)
            .output()
            .expect("mybox init");
        assert!(out.status.success(), "init: {out:?}");
        let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let root = root.canonicalize().expect("canonical root");
        TestBox {
            _tmp: tmp,
            root,
            id,
            port: free_port(),
            child: None,
            name: name.to_string(),
            host: "127.0.0.1".to_string(),
            ns: None,
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    pub fn log_path(&self) -> PathBuf {
        self.root.join(".mybox").join("daemon.log")
    }

    pub fn start(&mut self) {
        assert!(self.child.is_none(), "already running");
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.join(".mybox").join("stderr.log"))
            .expect("stderr log");
        let mut cmd = match &self.ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, BIN]);
                c
            }
            None => Command::new(BIN),
        };
        let mut child = cmd
            .arg("--box")
            .arg(&self.root)
            .args(["daemon", "--listen"])
            .arg(format!("{}:{}", self.host, self.port))
            .args(["--rescan-interval", "3"])
            .env("MYBOX_LOG", "info,mybox=debug")
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn daemon");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_default();
        assert!(
            line.contains(" serving ") && line.contains(&format!(" on {}:", self.host)),
            "daemon {} did not start: {line:?}\n{}",
            self.name,
            self.stderr()
        );
        self.child = Some(child);
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.root.join(".mybox").join("stderr.log")).unwrap_or_default()
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    panic!("daemon {} did not stop on SIGTERM", self.name);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `mybox status --json` as text, whatever it says (for failure messages).
    pub fn status_text(&self) -> String {
        let out = mybox(&self.root, &["status", "--json"]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    pub fn status_json(&self) -> serde_json::Value {
        let out = mybox(&self.root, &["status", "--json"]);
        assert!(out.status.success(), "status: {out:?}");
        serde_json::from_slice(&out.stdout).expect("status json")
    }

    pub fn write(&self, rel: &str, data: &[u8]) {
        let p = self.path(rel);
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).expect("mkdir");
        }
        std::fs::write(p, data).expect("write");
    }

    pub fn read(&self, rel: &str) -> Option<Vec<u8>> {
        std::fs::read(self.path(rel)).ok()
    }

    pub fn snapshot(&self) -> Tree {
        snapshot(&self.root)
    }
}

impl Drop for TestBox {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Pin each box as the other's peer.
pub fn pair(a: &TestBox, b: &TestBox) {
    let out = mybox(
        &a.root,
        &["peer", "add", &b.id, &format!("{}:{}", b.host, b.port)],
    );
    assert!(out.status.success(), "{out:?}");
    let out = mybox(
        &b.root,
        &["peer", "add", &a.id, &format!("{}:{}", a.host, a.port)],
    );
    assert!(out.status.success(), "{out:?}");
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    File {
        mode: u32,
        mtime_ns: i64,
        data: Vec<u8>,
    },
    Dir {
        mode: u32,
    },
    Link {
        target: String,
        mtime_ns: i64,
    },
}

pub type Tree = BTreeMap<String, Entry>;

/// Everything under `root` except `.mybox/`.
pub fn snapshot(root: &Path) -> Tree {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            let rel = p
                .strip_prefix(root)
                .expect("prefix")
                .to_string_lossy()
                .into_owned();
            if rel == ".mybox" {
                continue;
            }
            let Ok(md) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            let mtime_ns = md.mtime() * 1_000_000_000 + md.mtime_nsec();
            let mode = md.permissions().mode() & 0o7777;
            let ent = if md.file_type().is_symlink() {
                Entry::Link {
                    target: std::fs::read_link(&p)
                        .map(|t| t.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    mtime_ns,
                }
            } else if md.is_dir() {
                stack.push(p.clone());
                Entry::Dir { mode }
            } else {
                Entry::File {
                    mode,
                    mtime_ns,
                    data: std::fs::read(&p).unwrap_or_default(),
                }
            };
            out.insert(rel, ent);
        }
    }
    out
}

pub fn diff(a: &Tree, b: &Tree) -> String {
    let mut out = String::new();
    for (k, v) in a {
        match b.get(k) {
            None => out.push_str(&format!("  only in first: {k}\n")),
            Some(w) if w != v => {
                out.push_str(&format!("  differs: {k}: {} vs {}\n", short(v), short(w)))
            }
            _ => {}
        }
    }
    for k in b.keys() {
        if !a.contains_key(k) {
            out.push_str(&format!("  only in second: {k}\n"));
        }
    }
    out
}

fn short(e: &Entry) -> String {
    match e {
        Entry::File {
            mode,
            mtime_ns,
            data,
        } => format!(
            "file mode {mode:o} mtime {mtime_ns} {} bytes {:?}",
            data.len(),
            String::from_utf8_lossy(&data[..data.len().min(40)])
        ),
        other => format!("{other:?}"),
    }
}

/// Wait until all boxes hold identical trees (and stay so across two looks).
pub fn wait_converged(boxes: &[&TestBox], timeout: Duration) -> Tree {
    let deadline = Instant::now() + timeout;
    let mut last_diff = String::new();
    loop {
        let first = boxes[0].snapshot();
        let mut all_same = true;
        for b in &boxes[1..] {
            let t = b.snapshot();
            if t != first {
                all_same = false;
                last_diff = format!("{} vs {}:\n{}", boxes[0].name, b.name, diff(&first, &t));
                break;
            }
        }
        if all_same {
            std::thread::sleep(Duration::from_millis(150));
            if boxes.iter().all(|b| b.snapshot() == first) {
                return first;
            }
        }
        if Instant::now() > deadline {
            let differing = differing_paths(boxes);
            let records: Vec<String> = boxes
                .iter()
                .map(|b| {
                    format!(
                        "--- {} index records of differing paths ---\n{}\n--- {} status ---\n{}",
                        b.name,
                        index_records(b, &differing),
                        b.name,
                        b.status_text()
                    )
                })
                .collect();
            let logs: Vec<String> = boxes
                .iter()
                .map(|b| {
                    let e = b.stderr();
                    let tail: Vec<&str> = e.lines().rev().take(40).collect();
                    format!(
                        "--- {} stderr tail ---\n{}",
                        b.name,
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    )
                })
                .collect();
            panic!(
                "boxes did not converge within {timeout:?}:\n{last_diff}\n{}\n{}",
                records.join("\n"),
                logs.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Paths whose entries differ between the boxes, with their parent directories.
fn differing_paths(boxes: &[&TestBox]) -> Vec<String> {
    let trees: Vec<Tree> = boxes.iter().map(|b| b.snapshot()).collect();
    let mut out = std::collections::BTreeSet::new();
    for t in &trees[1..] {
        for k in trees[0].keys().chain(t.keys()) {
            if trees[0].get(k) != t.get(k) {
                let mut p = k.as_str();
                out.insert(p.to_string());
                while let Some((parent, _)) = p.rsplit_once('/') {
                    out.insert(parent.to_string());
                    p = parent;
                }
            }
        }
    }
    out.into_iter().collect()
}

/// What `b`'s index holds for `paths` (version vectors included), read beside the daemon.
pub fn index_records(b: &TestBox, paths: &[String]) -> String {
    let opened = mybox::config::BoxDir::open(&b.root).and_then(|d| mybox::index::Index::open(&d));
    let ix = match opened {
        Ok(ix) => ix,
        Err(e) => return format!("(index not readable: {e:#})"),
    };
    let mut out = String::new();
    for p in paths {
        let rec = mybox::paths::RelPath::parse(p)
            .map_err(anyhow::Error::from)
            .and_then(|rp| ix.get(&rp));
        match rec {
            Ok(Some(st)) => out.push_str(&format!("  {p}: {:?} stat {:?}\n", st.record, st.stat)),
            Ok(None) => out.push_str(&format!("  {p}: no record\n")),
            Err(e) => out.push_str(&format!("  {p}: {e:#}\n")),
        }
    }
    out
}

/// The mode `b`'s own index records for `path` (None: no live record).
pub fn local_mode(b: &TestBox, path: &str) -> Option<u32> {
    let d = mybox::config::BoxDir::open(&b.root).ok()?;
    let ix = mybox::index::Index::open(&d).ok()?;
    let st = ix.get(&mybox::paths::RelPath::parse(path).ok()?).ok()??;
    (!st.record.deleted).then_some(st.record.mode)
}

/// Wait until `f` holds.
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Two paired, running boxes.
pub fn two_boxes() -> (TestBox, TestBox) {
    let mut a = TestBox::new("a");
    let mut b = TestBox::new("b");
    pair(&a, &b);
    a.start();
    b.start();
    (a, b)
}

pub fn set_mtime(p: &Path, secs: i64) {
    let t = filetime::FileTime::from_unix_time(secs, 0);
    filetime::set_symlink_file_times(p, t, t).expect("set mtime");
}

pub fn conflict_copies(t: &Tree) -> Vec<String> {
    t.keys()
        .filter(|k| k.contains(".sync-conflict-"))
        .cloned()
        .collect()
}

pub const CONVERGE: Duration = Duration::from_secs(30);
