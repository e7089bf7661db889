//! Helpers for the UDP integration tests: boxes in a temp dir, a `mybox serve` child with its
//! log captured, downloads, and the link emulator.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{RngCore, SeedableRng};

pub fn mybox() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mybox"));
    c.env_remove("MYBOX_BOX").env_remove("MYBOX_LOG");
    c
}

/// `mybox` run inside network namespace `ns` (or directly when None).
pub fn mybox_in(ns: Option<&str>) -> Command {
    match ns {
        None => mybox(),
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_mybox")])
                .env_remove("MYBOX_BOX")
                .env_remove("MYBOX_LOG");
            c
        }
    }
}

pub fn init(dir: &Path) -> String {
    let out = mybox().arg("init").arg(dir).output().unwrap();
    assert!(
        out.status.success(),
        "init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

pub fn peer_add(box_dir: &Path, id: &str, addr: &str) {
    let out = mybox()
        .arg("--box")
        .arg(box_dir)
        .args(["peer", "add", id, addr])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "peer add: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn write_random(path: &Path, size: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; size];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    std::fs::write(path, &v).unwrap();
    v
}

/// A running `mybox serve` whose stderr is collected line by line.
pub struct Server {
    pub child: Child,
    pub addr: String,
    pub log: Arc<Mutex<String>>,
}

impl Server {
    pub fn start(box_dir: &Path, listen: &str, ns: Option<&str>) -> Server {
        let mut child = mybox_in(ns)
            .arg("--box")
            .arg(box_dir)
            .args(["serve", "--listen", listen])
            .env("MYBOX_LOG", "info,mybox=debug")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.contains(" serving "), "serve printed {line:?}");
        let addr = line.split_whitespace().last().unwrap().to_string();
        let log = Arc::new(Mutex::new(String::new()));
        let (l2, err) = (log.clone(), child.stderr.take().unwrap());
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut g = l2.lock().unwrap();
                g.push_str(&line);
                g.push('\n');
            }
        });
        Server { child, addr, log }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Wait until the log contains `needle`; returns the log.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> Option<String> {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            let l = self.log();
            if l.contains(needle) {
                return Some(l);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn signal(&self, sig: i32) {
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGCONT) };
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two boxes: `a` downloads from `b`, which serves.
pub struct Pair {
    pub dir: tempfile::TempDir,
    pub a: PathBuf,
    pub b: PathBuf,
    pub a_id: String,
    pub b_id: String,
    pub server: Server,
}

impl Pair {
    /// `listen`: where b serves; `ns_b`/`ns_a` the namespaces of b's server and a's client.
    pub fn new(listen: &str, ns_b: Option<&str>) -> Pair {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        let a_id = init(&a);
        let b_id = init(&b);
        peer_add(&b, &a_id, "127.0.0.1:1");
        let server = Server::start(&b, listen, ns_b);
        peer_add(&a, &b_id, &server.addr);
        Pair {
            dir,
            a,
            b,
            a_id,
            b_id,
            server,
        }
    }

    pub fn download(
        &self,
        transport: &str,
        file: &str,
        out: &Path,
        ns_a: Option<&str>,
        env: &[(&str, &str)],
    ) -> Output {
        let mut c = mybox_in(ns_a);
        c.arg("--box")
            .arg(&self.a)
            .args(["download", transport, file, "-o"])
            .arg(out)
            .env("MYBOX_LOG", "warn,mybox=info");
        for (k, v) in env {
            c.env(k, v);
        }
        c.output().unwrap()
    }
}

/// Pull `key=<number>` out of the last line containing `marker`.
pub fn counter(log: &str, marker: &str, key: &str) -> u64 {
    let line = log
        .lines()
        .rfind(|l| l.contains(marker))
        .unwrap_or_else(|| panic!("no {marker:?} line in:\n{log}"));
    let pat = format!("{key}=");
    let at = line
        .find(&pat)
        .unwrap_or_else(|| panic!("no {key} in {line}"));
    line[at + pat.len()..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect::<String>()
        .parse()
        .unwrap()
}

pub fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// A running `mybox-linkemu`: two namespaces joined by an emulated link. Stops (and removes
/// the namespaces) when dropped, or when this test process dies (its stdin closes).
pub struct LinkEmu {
    child: Child,
    stdin: Option<std::process::ChildStdin>,
    pub ns_a: String,
    pub ns_b: String,
    pub addr_a: String,
    pub addr_b: String,
    pub log: Arc<Mutex<String>>,
}

impl LinkEmu {
    /// None (with the reason printed) when this process may not create namespaces.
    pub fn start(args: &[&str]) -> Option<LinkEmu> {
        if !is_root() {
            eprintln!("SKIP: network namespaces need root");
            return None;
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_mybox-linkemu"))
            .args(args)
            .arg("--stdin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (l2, err) = (log.clone(), child.stderr.take().unwrap());
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut g = l2.lock().unwrap();
                g.push_str(&line);
                g.push('\n');
            }
        });
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        if !line.starts_with("READY") {
            let _ = child.wait();
            std::thread::sleep(Duration::from_millis(100));
            // We are root here, so a failure is a real failure, not a skip.
            panic!("linkemu failed: {}", log.lock().unwrap());
        }
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{k}=")).map(str::to_string))
                .unwrap()
        };
        Some(LinkEmu {
            ns_a: field("ns_a"),
            ns_b: field("ns_b"),
            addr_a: field("addr_a"),
            addr_b: field("addr_b"),
            stdin: child.stdin.take(),
            child,
            log,
        })
    }

    /// Stop and return the emulator's final statistics.
    pub fn stop(mut self) -> String {
        self.shutdown();
        std::thread::sleep(Duration::from_millis(50));
        self.log.lock().unwrap().clone()
    }

    fn shutdown(&mut self) {
        if let Some(mut s) = self.stdin.take() {
            let _ = s.flush();
        }
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

impl Drop for LinkEmu {
    fn drop(&mut self) {
        self.shutdown();
    }
}

pub fn assert_same_file(a: &Path, b: &Path) {
    let x = std::fs::read(a).unwrap();
    let y = std::fs::read(b).unwrap_or_else(|e| panic!("{}: {e}", b.display()));
    assert_eq!(x.len(), y.len(), "sizes differ");
    assert!(x == y, "{} and {} differ", a.display(), b.display());
}

/// Files left in a box's .mybox/tmp.
pub fn tmp_files(box_dir: &Path) -> Vec<String> {
    std::fs::read_dir(box_dir.join(".mybox/tmp"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}
