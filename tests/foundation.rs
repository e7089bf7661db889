//! Issue 2 end to end: real `mybox` processes, real TLS over loopback, checked against what the
//! file system says (sizes from metadata, MD5/SHA-256 computed here independently).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use md5::{Digest, Md5};
use serde_json::Value;
use sha2::Sha256;

const BIN: &str = env!("CARGO_BIN_EXE_mybox");

struct TestBox {
    dir: PathBuf,
    id: String,
    server: Option<Child>,
    addr: Option<String>,
}

impl TestBox {
    fn new(parent: &Path, name: &str) -> TestBox {
        let dir = parent.join(name);
        let out = Command::new(BIN)
            .arg("init")
            .arg(&dir)
            .output()
            .expect("run mybox init");
        assert!(
            out.status.success(),
            "init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let id = String::from_utf8(out.stdout).unwrap().trim().to_string();
        TestBox {
            dir,
            id,
            server: None,
            addr: None,
        }
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new(BIN);
        c.arg("--box").arg(&self.dir).env_remove("MYBOX_BOX");
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().expect("run mybox")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "mybox {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "mybox {args:?} should fail but printed {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "error must be one line: {err:?}"
        );
        assert!(err.starts_with("mybox: error: "), "{err:?}");
        err
    }

    fn json(&self, args: &[&str]) -> Vec<Value> {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.ok(&a);
        serde_json::from_str::<Vec<Value>>(&out)
            .unwrap_or_else(|e| panic!("bad json from {args:?}: {e}\n{out}"))
    }

    /// Start `mybox serve` on an ephemeral loopback port; wait until it prints its address.
    fn serve(&mut self) -> String {
        let mut child = self
            .cmd()
            .args(["serve", "--listen", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn serve");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        assert!(
            line.contains(" serving "),
            "unexpected serve output {line:?}"
        );
        let addr = line.split_whitespace().last().unwrap().to_string();
        self.server = Some(child);
        self.addr = Some(addr.clone());
        addr
    }

    /// Stop the server and return what it logged.
    fn stop(&mut self) -> String {
        let mut log = String::new();
        if let Some(mut c) = self.server.take() {
            let _ = c.kill();
            let _ = c.wait();
            if let Some(mut e) = c.stderr.take() {
                let _ = e.read_to_string(&mut log);
            }
        }
        log
    }

    fn server_alive(&mut self) -> bool {
        matches!(self.server.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }
}

impl Drop for TestBox {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Two paired boxes; `a` serving.
fn pair(tmp: &Path) -> (TestBox, TestBox) {
    let mut a = TestBox::new(tmp, "a");
    let b = TestBox::new(tmp, "b");
    let addr = a.serve();
    b.ok(&["peer", "add", &a.id, &addr]);
    a.ok(&["peer", "add", &b.id, "127.0.0.1:9"]);
    (a, b)
}

fn md5_hex(data: &[u8]) -> String {
    hex(&Md5::digest(data))
}

fn sha_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn populate(root: &Path) {
    std::fs::write(root.join("hello.txt"), b"hello\n").unwrap();
    std::fs::write(root.join("empty"), b"").unwrap();
    std::fs::create_dir_all(root.join("docs/deep")).unwrap();
    std::fs::write(
        root.join("docs/notes with space.md"),
        b"# notes\n".repeat(100),
    )
    .unwrap();
    std::fs::write(root.join("docs/deep/ünïcode.txt"), "ünïcode\n").unwrap();
    let big: Vec<u8> = (0..5_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(root.join("docs/big.bin"), &big).unwrap();
    std::fs::set_permissions(
        root.join("docs/big.bin"),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    std::os::unix::fs::symlink("hello.txt", root.join("link")).unwrap();
    // Fixed old mtime on one file for shortlist.
    let t = filetime::FileTime::from_unix_time(1_000_000_000, 0);
    filetime::set_file_mtime(root.join("empty"), t).unwrap();
}

fn by_path(list: &[Value]) -> std::collections::BTreeMap<String, Value> {
    list.iter()
        .map(|v| (v["path"].as_str().unwrap().to_string(), v.clone()))
        .collect()
}

#[test]
fn init_creates_a_box_and_refuses_to_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let pre = tmp.path().join("existing");
    std::fs::create_dir_all(&pre).unwrap();
    std::fs::write(pre.join("keep.txt"), b"keep").unwrap();
    let out = Command::new(BIN).arg("init").arg(&pre).output().unwrap();
    assert!(out.status.success());
    let id = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(id.len(), 63, "device id {id:?}");
    assert_eq!(std::fs::read(pre.join("keep.txt")).unwrap(), b"keep");
    for f in ["cert.pem", "key.pem"] {
        let md = std::fs::metadata(pre.join(".mybox").join(f)).unwrap();
        assert_eq!(md.permissions().mode() & 0o777, 0o600, "{f}");
    }
    assert!(pre.join(".mybox/config.toml").exists());
    assert!(pre.join(".mybox/index.db").exists());
    let again = Command::new(BIN).arg("init").arg(&pre).output().unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("refusing to overwrite"));
    // `id` prints the ID alone, found via --box, MYBOX_BOX, or from a subdirectory.
    let b = TestBox {
        dir: pre.clone(),
        id: id.clone(),
        server: None,
        addr: None,
    };
    assert_eq!(b.ok(&["id"]), format!("{id}\n"));
    let via_env = Command::new(BIN)
        .arg("id")
        .env("MYBOX_BOX", &pre)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8(via_env.stdout).unwrap().trim(), id);
    std::fs::create_dir_all(pre.join("sub/dir")).unwrap();
    let via_cwd = Command::new(BIN)
        .arg("id")
        .env_remove("MYBOX_BOX")
        .current_dir(pre.join("sub/dir"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8(via_cwd.stdout).unwrap().trim(), id);
    let nowhere = Command::new(BIN)
        .arg("id")
        .env_remove("MYBOX_BOX")
        .current_dir(tmp.path())
        .output()
        .unwrap();
    assert!(!nowhere.status.success());
}

#[test]
fn peer_add_list_remove_and_malformed_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let a = TestBox::new(tmp.path(), "a");
    let b = TestBox::new(tmp.path(), "b");
    let err = a.fails(&["peer", "add", "NOT-AN-ID", "127.0.0.1:1"]);
    assert!(err.contains("malformed device ID"), "{err}");
    // One character off: the check character catches it.
    let mut typo: Vec<char> = b.id.chars().collect();
    typo[3] = if typo[3] == 'A' { 'B' } else { 'A' };
    let typo: String = typo.into_iter().collect();
    a.fails(&["peer", "add", &typo, "127.0.0.1:1"]);
    a.fails(&["peer", "add", &b.id, "no-port"]);
    a.fails(&["peer", "add", &a.id, "127.0.0.1:1"]);
    a.ok(&["peer", "add", &b.id, "127.0.0.1:4000"]);
    let list = a.ok(&["peer", "list"]);
    assert!(
        list.contains(&b.id) && list.contains("127.0.0.1:4000"),
        "{list}"
    );
    a.ok(&["peer", "remove", &b.id]);
    assert!(!a.ok(&["peer", "list"]).contains(&b.id));
    a.fails(&["peer", "remove", &b.id]);
    let err = a.fails(&["index", "longlist"]);
    assert!(err.contains("no peer"), "{err}");
}

#[test]
fn queries_answer_about_the_peer_files() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = pair(tmp.path());
    populate(&a.dir);
    std::fs::write(b.dir.join("only-on-b.txt"), b"b").unwrap();

    // longlist: every path of A, nothing of B, never .mybox.
    let list = by_path(&b.json(&["index", "longlist"]));
    let expected = [
        "docs",
        "docs/big.bin",
        "docs/deep",
        "docs/deep/ünïcode.txt",
        "docs/notes with space.md",
        "empty",
        "hello.txt",
        "link",
    ];
    assert_eq!(list.keys().cloned().collect::<Vec<_>>(), expected);
    for (p, v) in &list {
        let md = std::fs::symlink_metadata(a.dir.join(p)).unwrap();
        let kind = if md.is_dir() {
            "dir"
        } else if md.file_type().is_symlink() {
            "symlink"
        } else {
            "file"
        };
        assert_eq!(v["kind"], kind, "{p}");
        if kind == "file" {
            assert_eq!(v["size"].as_u64().unwrap(), md.len(), "{p}");
        }
        assert_eq!(v["mode"], format!("{:04o}", md.mode() & 0o7777), "{p}");
        let mtime = chrono::DateTime::parse_from_rfc3339(v["mtime"].as_str().unwrap()).unwrap();
        assert_eq!(mtime.timestamp(), md.mtime(), "{p}");
        assert!(v["mtime"].as_str().unwrap().ends_with('Z'));
        assert!(v["mime"].is_string());
    }
    assert_eq!(list["hello.txt"]["mime"], "text/plain");
    assert_eq!(list["docs/big.bin"]["mode"], "0640");
    // The table form is readable and has the human size.
    let table = b.ok(&["index", "longlist"]);
    assert!(
        table.contains("PATH")
            && table.contains("4.8 MiB")
            && table.contains("docs/deep/ünïcode.txt"),
        "{table}"
    );

    // shortlist: inclusive range; `empty` is from 2001.
    let old = by_path(&b.json(&["index", "shortlist", "@999999999", "@1000000000"]));
    assert_eq!(old.keys().collect::<Vec<_>>(), ["empty"]);
    let old2 = by_path(&b.json(&["index", "shortlist", "2001-09-01", "2001-09-30"]));
    assert!(old2.contains_key("empty"));
    let recent = by_path(&b.json(&[
        "index",
        "shortlist",
        "2020-01-01T00:00:00Z",
        "2999-01-01 00:00:00",
    ]));
    assert!(recent.contains_key("hello.txt") && !recent.contains_key("empty"));
    let err = b.fails(&["index", "shortlist", "yesterday", "today"]);
    assert!(err.contains("bad time"), "{err}");

    // regex
    let re = by_path(&b.json(&["index", "regex", r"\.(txt|md)$"]));
    assert_eq!(
        re.keys().collect::<Vec<_>>(),
        [
            "docs/deep/ünïcode.txt",
            "docs/notes with space.md",
            "hello.txt"
        ]
    );
    let err = b.fails(&["index", "regex", "(unclosed"]);
    assert!(err.contains("bad regex"), "{err}");

    // hash verify / checkall against independently computed digests.
    let v = b.json(&["hash", "verify", "docs/big.bin"]);
    let big = std::fs::read(a.dir.join("docs/big.bin")).unwrap();
    assert_eq!(v.len(), 1);
    assert_eq!(v[0]["md5"], md5_hex(&big));
    assert_eq!(v[0]["sha256"], sha_hex(&big));
    let all = by_path(&b.json(&["hash", "checkall"]));
    assert_eq!(
        all.keys().collect::<Vec<_>>(),
        [
            "docs/big.bin",
            "docs/deep/ünïcode.txt",
            "docs/notes with space.md",
            "empty",
            "hello.txt"
        ]
    );
    for (p, v) in &all {
        let data = std::fs::read(a.dir.join(p)).unwrap();
        assert_eq!(v["md5"], md5_hex(&data), "{p}");
        assert_eq!(v["sha256"], sha_hex(&data), "{p}");
    }
    let err = b.fails(&["hash", "verify", "docs"]);
    assert!(err.contains("not a regular file"), "{err}");
    let err = b.fails(&["hash", "verify", "missing.txt"]);
    assert!(err.contains("no such file"), "{err}");
    // A changed file is rehashed (the cache is keyed by stat).
    std::fs::write(a.dir.join("hello.txt"), b"changed\n").unwrap();
    let v = b.json(&["hash", "verify", "hello.txt"]);
    assert_eq!(v[0]["md5"], md5_hex(b"changed\n"));

    // --local answers about B itself.
    let mine = by_path(&b.json(&["--local", "index", "longlist"]));
    assert_eq!(mine.keys().collect::<Vec<_>>(), ["only-on-b.txt"]);
    let mine = b.json(&["--local", "hash", "verify", "only-on-b.txt"]);
    assert_eq!(mine[0]["md5"], md5_hex(b"b"));

    // The history log on both sides has the requests.
    let served = std::fs::read_to_string(a.dir.join(".mybox/history.log")).unwrap();
    assert!(
        served.contains("served")
            && served.contains("hash checkall")
            && served.contains("index longlist"),
        "{served}"
    );
    assert!(served.contains(&b.id[..7]));
    let made = std::fs::read_to_string(b.dir.join(".mybox/history.log")).unwrap();
    assert!(
        made.contains("made") && made.contains("index regex"),
        "{made}"
    );
}

#[test]
fn download_tcp_verifies_and_keeps_metadata() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = pair(tmp.path());
    populate(&a.dir);
    let out_dir = tmp.path().join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let dest = out_dir.join("got.bin");
    let printed = b.ok(&[
        "download",
        "tcp",
        "docs/big.bin",
        "-o",
        dest.to_str().unwrap(),
    ]);
    let src = std::fs::read(a.dir.join("docs/big.bin")).unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), src);
    assert!(
        printed.contains(&md5_hex(&src)) && printed.contains("got.bin"),
        "{printed}"
    );
    let (sm, dm) = (
        std::fs::metadata(a.dir.join("docs/big.bin")).unwrap(),
        std::fs::metadata(&dest).unwrap(),
    );
    assert_eq!(dm.mode() & 0o7777, 0o640);
    assert_eq!((dm.mtime(), dm.mtime_nsec()), (sm.mtime(), sm.mtime_nsec()));
    // Default destination: the file's name in the current directory; unicode and spaces fine.
    let out = b
        .cmd()
        .args(["download", "TCP", "docs/notes with space.md"])
        .current_dir(&out_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(out_dir.join("notes with space.md")).unwrap(),
        b"# notes\n".repeat(100)
    );
    b.ok(&["download", "tcp", "empty", "-o", out_dir.to_str().unwrap()]);
    assert_eq!(std::fs::read(out_dir.join("empty")).unwrap(), b"");
    let j = b.json(&[
        "download",
        "tcp",
        "hello.txt",
        "-o",
        out_dir.to_str().unwrap(),
    ]);
    assert_eq!(j[0]["md5"], md5_hex(b"hello\n"));
    // No partial files left behind.
    let leftovers: Vec<_> = std::fs::read_dir(&out_dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("mybox-part"))
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn hostile_paths_and_symlinks_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = pair(tmp.path());
    populate(&a.dir);
    let secret = tmp.path().join("secret.txt");
    std::fs::write(&secret, b"TOP SECRET").unwrap();
    std::os::unix::fs::symlink(&secret, a.dir.join("escape")).unwrap();
    std::os::unix::fs::symlink(tmp.path(), a.dir.join("escdir")).unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let o = out.to_str().unwrap();
    for bad in [
        "../../etc/passwd",
        "/etc/passwd",
        "docs/../../x",
        ".mybox/key.pem",
        "a\\..\\..\\b",
    ] {
        b.fails(&["download", "tcp", bad, "-o", o]);
        b.fails(&["hash", "verify", bad]);
    }
    let err = b.fails(&["download", "tcp", "escape", "-o", o]);
    assert!(err.contains("symlink"), "{err}");
    let err = b.fails(&["download", "tcp", "escdir/secret.txt", "-o", o]);
    assert!(err.contains("symlink"), "{err}");
    b.fails(&["hash", "verify", "escdir/secret.txt"]);
    // The link is listed as a link, its target's content never served.
    let list = by_path(&b.json(&["index", "longlist"]));
    assert_eq!(list["escape"]["kind"], "symlink");
    assert!(!list.contains_key("escdir/secret.txt"));
    assert_eq!(
        std::fs::read_dir(&out).unwrap().count(),
        0,
        "nothing may be written"
    );
    let mut a = a;
    assert!(a.server_alive());
}

#[test]
fn unpaired_device_is_refused_at_the_handshake() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut a, _b) = pair(tmp.path());
    let stranger = TestBox::new(tmp.path(), "stranger");
    stranger.ok(&["peer", "add", &a.id, a.addr.as_deref().unwrap()]);
    let err = stranger.fails(&["index", "longlist"]);
    assert!(err.contains("handshake") || err.contains("closed"), "{err}");
    // The stranger pins the wrong ID for the server: it refuses the server.
    let c = TestBox::new(tmp.path(), "c");
    let wrong = TestBox::new(tmp.path(), "wrong");
    c.ok(&["peer", "add", &wrong.id, a.addr.as_deref().unwrap()]);
    c.fails(&["index", "longlist"]);
    std::thread::sleep(Duration::from_millis(200));
    assert!(a.server_alive());
    let log = a.stop();
    assert!(log.contains("not paired"), "server log must say why: {log}");
}

#[test]
fn both_boxes_serve_and_ask_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let mut a = TestBox::new(tmp.path(), "a");
    let mut b = TestBox::new(tmp.path(), "b");
    std::fs::write(a.dir.join("from-a.txt"), b"aaa").unwrap();
    std::fs::write(b.dir.join("from-b.txt"), b"bbbb").unwrap();
    let aa = a.serve();
    let ba = b.serve();
    a.ok(&["peer", "add", &b.id, &ba]);
    b.ok(&["peer", "add", &a.id, &aa]);
    let (ra, rb) = std::thread::scope(|s| {
        let ha = s.spawn(|| {
            let mut last = Vec::new();
            for _ in 0..5 {
                last = a.json(&["hash", "checkall"]);
            }
            last
        });
        let hb = s.spawn(|| {
            let mut last = Vec::new();
            for _ in 0..5 {
                last = b.json(&["hash", "checkall"]);
            }
            last
        });
        (ha.join().unwrap(), hb.join().unwrap())
    });
    assert_eq!(ra[0]["path"], "from-b.txt");
    assert_eq!(ra[0]["md5"], md5_hex(b"bbbb"));
    assert_eq!(rb[0]["path"], "from-a.txt");
    assert_eq!(rb[0]["md5"], md5_hex(b"aaa"));
}

#[test]
fn shell_reads_assignment_spellings_from_stdin() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = pair(tmp.path());
    populate(&a.dir);
    let out_dir = tmp.path().join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let mut child = b
        .cmd()
        .arg("shell")
        .current_dir(&out_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"INDEX LONGLIST\nhash Verify hello.txt\nDownload TCP hello.txt\nindex regex (\nindex shortlist @0 @2000000000\nquit\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stdout.contains("docs/big.bin"), "{stdout}");
    assert!(stdout.contains(&md5_hex(b"hello\n")), "{stdout}");
    assert!(stderr.contains("bad regex"), "{stderr}");
    assert_eq!(
        std::fs::read(out_dir.join("hello.txt")).unwrap(),
        b"hello\n"
    );
    // One bad line is reported, the rest still ran; the exit status says something failed.
    assert!(!out.status.success());
    assert!(
        stdout.matches("entries").count() >= 2 || stdout.contains("entry"),
        "{stdout}"
    );
}

/// Raw TLS client speaking the wire protocol by hand, to send what the CLI never would.
mod raw {
    use super::*;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    pub async fn connect(
        client_box: &Path,
        server_id: &str,
        addr: &str,
    ) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        let ident = mybox::config::BoxDir::open(client_box)
            .unwrap()
            .identity()
            .unwrap();
        let sid: mybox::identity::DeviceId = server_id.parse().unwrap();
        let cfg = mybox::net::tls::client_config(
            &ident,
            Arc::new(mybox::net::tls::FixedPeers(vec![sid])),
        )
        .unwrap();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("mybox").unwrap();
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .unwrap()
    }

    /// Send bytes; return true if the server then closed the connection.
    pub async fn closes_after(
        stream: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
        bytes: &[u8],
    ) -> bool {
        stream.write_all(bytes).await.unwrap();
        stream.flush().await.unwrap();
        let mut buf = vec![0u8; 65536];
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => true,
            Ok(Ok(_)) => false,
            Err(_) => false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_frames_close_only_that_connection() {
    use mybox::paths::RelPath;
    use mybox::protocol::{encode, Frame, Request};
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = pair(tmp.path());
    std::fs::write(a.dir.join("ok.txt"), b"fine").unwrap();
    let addr = a.addr.clone().unwrap();

    // A path that climbs out, smuggled past the client-side check by patching encoded bytes.
    let placeholder = "AAAAAAAAAAAAAAAA";
    let frame = Frame::Request {
        id: 1,
        body: Request::Download {
            path: RelPath::parse(placeholder).unwrap(),
            offset: 0,
        },
    };
    let mut bytes = encode(&frame).unwrap();
    let pos = bytes
        .windows(16)
        .position(|w| w == placeholder.as_bytes())
        .unwrap();
    bytes[pos..pos + 16].copy_from_slice(b"../../etc/passwd");
    let mut s = raw::connect(&b.dir, &a.id, &addr).await;
    assert!(
        raw::closes_after(&mut s, &bytes).await,
        "traversal frame must close the connection"
    );

    // A length prefix far over the cap.
    let mut s = raw::connect(&b.dir, &a.id, &addr).await;
    assert!(raw::closes_after(&mut s, &[0xff, 0xff, 0xff, 0xff, 1, 2, 3]).await);
    // Garbage of a plausible length.
    let mut s = raw::connect(&b.dir, &a.id, &addr).await;
    let mut junk = vec![0, 0, 0, 32];
    junk.extend_from_slice(&[0xee; 32]);
    assert!(raw::closes_after(&mut s, &junk).await);

    // The server still serves a well-behaved client, and nothing was written anywhere.
    let bdir = b.dir.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(BIN)
            .arg("--box")
            .arg(&bdir)
            .args(["hash", "verify", "ok.txt", "--json"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&md5_hex(b"fine")));
    assert!(!tmp.path().join("etc").exists());
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(1) {
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn silent_and_slow_connections_do_not_lock_out_the_peer() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut a, b) = pair(tmp.path());
    std::fs::write(a.dir.join("x.txt"), b"x").unwrap();
    let addr = a.addr.clone().unwrap();
    // 100 sockets that never speak, and a few that dribble bytes of a fake handshake.
    let mut idle: Vec<std::net::TcpStream> = (0..100)
        .filter_map(|_| std::net::TcpStream::connect(&addr).ok())
        .collect();
    for s in idle.iter_mut().take(5) {
        let _ = s.write_all(&[0x16]);
    }
    let start = Instant::now();
    let v = b.json(&["hash", "verify", "x.txt"]);
    assert_eq!(v[0]["md5"], md5_hex(b"x"));
    assert!(
        start.elapsed() < Duration::from_secs(8),
        "real peer waited {:?}",
        start.elapsed()
    );
    drop(idle);
    assert!(a.server_alive());
}
