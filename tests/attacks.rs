//! Issue 6's attacks, each against real `mybox` processes over real TLS sockets, each required
//! to fail to get in: certificates that are not the paired peer's, path traversal in every
//! request that carries a path, symlinks out of the store, huge length fields, and regexes built
//! to be slow. (Covered elsewhere and not repeated here: the unpaired `serve` client and the
//! oversized-prefix frames in tests/foundation.rs, forged and replayed UDP datagrams in
//! tests/udp_loopback.rs and src/udp/tests.rs.) Each test prints how many bad inputs it tried.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{mybox, TestBox};
use mybox::identity::{DeviceId, Identity};
use mybox::net::tls::{client_config, provider, server_config, FixedPeers};
use mybox::paths::RelPath;
use mybox::protocol::{
    decode, decode_prefixed, encode, huge_length_claims, sample_frames, ErrorCode, Frame,
    ListFilter, Request, Response,
};
use mybox::sync::proto::SyncRequest;
use mybox::udp::proto::{StartRequest, UdpRequest};
use rustls::sign::CertifiedKey;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ------------------------------------------------------------------ allocation measurement

/// The system allocator, recording the largest single allocation made by the current thread
/// while tracking is on (thread-local, so tests running in parallel do not see each other).
struct PeakAlloc;

thread_local! {
    static TRACKING: Cell<bool> = const { Cell::new(false) };
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = TRACKING.try_with(|t| {
        if t.get() {
            let _ = PEAK.try_with(|p| p.set(p.get().max(size)));
        }
    });
}

// SAFETY: forwards every call to the system allocator unchanged; only records sizes.
unsafe impl GlobalAlloc for PeakAlloc {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        note(l.size());
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        note(l.size());
        System.alloc_zeroed(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        note(new);
        System.realloc(p, l, new)
    }
}

#[global_allocator]
static ALLOC: PeakAlloc = PeakAlloc;

/// Largest single allocation `f` makes on this thread.
fn peak_alloc<T>(f: impl FnOnce() -> T) -> (T, usize) {
    PEAK.with(|p| p.set(0));
    TRACKING.with(|t| t.set(true));
    let r = f();
    TRACKING.with(|t| t.set(false));
    (r, PEAK.with(|p| p.get()))
}

/// Every length field of every message type (strings, paths, byte buffers, entry/record/hash
/// lists, version vectors) made to claim 4 GiB, 2^64/3 or just under the 16 MiB cap, inside a
/// frame of a few hundred bytes: the decoder fails without ever allocating the claimed size.
/// (serde pre-allocates at most 1 MiB for a sequence whatever its prefix says; bincode's limit
/// and the input length stop everything else before allocation.)
#[test]
fn decoders_never_allocate_a_claimed_length() {
    const BOUND: usize = 1 << 20;
    let mut tried = 0;
    let mut worst = 0;
    for f in sample_frames() {
        let body = encode(&f).unwrap()[4..].to_vec();
        for at in 0..=body.len() {
            for claim in huge_length_claims() {
                let mut evil = body[..at].to_vec();
                evil.extend_from_slice(&claim);
                evil.extend_from_slice(&body[at..]);
                let (res, peak) = peak_alloc(|| decode(&evil).is_ok());
                assert!(
                    peak <= BOUND,
                    "decoding {} bytes of {f:?} with a length claim at {at} allocated {peak} bytes",
                    evil.len()
                );
                // The 4-byte prefix of the whole frame says the same: refused before reading.
                let mut framed = (u32::MAX).to_be_bytes().to_vec();
                framed.extend_from_slice(&evil);
                let (pre, peak2) = peak_alloc(|| decode_prefixed(&framed).is_err());
                assert!(pre && peak2 <= BOUND);
                let _ = res;
                worst = worst.max(peak);
                tried += 2;
            }
        }
    }
    eprintln!("bad inputs tried: {tried} (largest single allocation {worst} bytes)");
    assert!(tried > 5000);
}

// ------------------------------------------------------------------ raw TLS client

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// What a raw request got back.
#[derive(Debug)]
enum Outcome {
    /// The server closed the connection (or the handshake failed) without answering.
    Closed,
    /// An error response.
    Error(ErrorCode, String),
    /// Anything else: every response up to the one marked `end`.
    Answer(Vec<Response>),
}

fn identity_of(root: &Path) -> Identity {
    mybox::config::BoxDir::open(root)
        .unwrap()
        .identity()
        .unwrap()
}

async fn connect_with(cfg: rustls::ClientConfig, port: u16) -> std::io::Result<Tls> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let name = rustls::pki_types::ServerName::try_from("mybox").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
}

/// A TLS client with `client`'s identity that accepts only `server` (the real mybox verifiers).
async fn connect(client: &Identity, server: &str, port: u16) -> std::io::Result<Tls> {
    let sid: DeviceId = server.parse().unwrap();
    let cfg = client_config(client, Arc::new(FixedPeers(vec![sid]))).unwrap();
    connect_with(cfg, port).await
}

/// Send `bytes` (one or more encoded frames) and collect the answer to request `id`. Requests
/// the server's sync engine sends us on this connection are ignored. A hang is a failure.
async fn ask(s: &mut Tls, id: u32, bytes: &[u8]) -> Outcome {
    if s.write_all(bytes).await.is_err() || s.flush().await.is_err() {
        return Outcome::Closed;
    }
    let mut buf = Vec::new();
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        while let Ok(Some((frame, used))) = decode_prefixed(&buf) {
            buf.drain(..used);
            if let Frame::Response { id: rid, end, body } = frame {
                if rid != id {
                    continue;
                }
                if let Response::Error { code, message } = body {
                    return Outcome::Error(code, message);
                }
                // A batch whose only run is refused: that refusal is the answer.
                if let Response::Sync(mybox::sync::proto::SyncResponse::Runs(r)) = &body {
                    if let [mybox::sync::proto::RunAnswer::Failed { code, message }] = &r[..] {
                        return Outcome::Error(*code, message.clone());
                    }
                }
                got.push(body);
                if end {
                    return Outcome::Answer(got);
                }
            }
        }
        let mut chunk = vec![0u8; 1 << 16];
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Err(_) => panic!("no answer to request {id} within 20 s"),
            Ok(Ok(0)) | Ok(Err(_)) => {
                return if got.is_empty() {
                    Outcome::Closed
                } else {
                    Outcome::Answer(got)
                }
            }
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn frame(id: u32, body: Request) -> Vec<u8> {
    encode(&Frame::Request { id, body }).unwrap()
}

/// bincode's varint length prefix.
fn varint(n: usize) -> Vec<u8> {
    if n < 251 {
        vec![n as u8]
    } else if n < 1 << 16 {
        let mut v = vec![0xfb];
        v.extend_from_slice(&(n as u16).to_le_bytes());
        v
    } else {
        let mut v = vec![0xfc];
        v.extend_from_slice(&(n as u32).to_le_bytes());
        v
    }
}

const PLACEHOLDER: &str = "PLACEHOLDER-PATH";

/// The requests that carry a path, by name, each built around [`PLACEHOLDER`].
fn path_carriers(secret_hash: [u8; 32]) -> Vec<(&'static str, Request)> {
    let p = RelPath::parse(PLACEHOLDER).unwrap();
    vec![
        (
            "download",
            Request::Download {
                path: p.clone(),
                offset: 0,
            },
        ),
        (
            "list-path",
            Request::List {
                filter: ListFilter::Path(p.clone()),
            },
        ),
        (
            "hash-path",
            Request::Hash {
                filter: ListFilter::Path(p.clone()),
            },
        ),
        (
            "sync-get-blocks",
            Request::Sync(SyncRequest::GetBlocks {
                path: p.clone(),
                first: 0,
                hashes: vec![secret_hash],
            }),
        ),
        (
            "sync-get-batch",
            Request::Sync(SyncRequest::GetBatch {
                runs: vec![mybox::sync::proto::BlockRun {
                    path: p.clone(),
                    first: 0,
                    hashes: vec![secret_hash],
                }],
            }),
        ),
        (
            "udp-start",
            Request::Udp(UdpRequest::Start(StartRequest {
                path: p,
                offset: 0,
                len: None,
                chunk: 1200,
                initial_rate: 1 << 20,
                max_rate: 1 << 24,
                resume: None,
            })),
        ),
    ]
}

/// The request `body` as a frame whose path field holds `raw` (any bytes: what a hostile peer
/// sends, past every client-side check), or whose path length claims `claim`.
fn with_path(id: u32, body: &Request, raw: &[u8], claim: Option<&[u8]>) -> Vec<u8> {
    let enc = frame(id, body.clone());
    let mut b = enc[4..].to_vec();
    let pos = b
        .windows(PLACEHOLDER.len())
        .position(|w| w == PLACEHOLDER.as_bytes())
        .unwrap();
    let mut field = claim
        .map(<[u8]>::to_vec)
        .unwrap_or_else(|| varint(raw.len()));
    field.extend_from_slice(raw);
    b.splice(pos - 1..pos + PLACEHOLDER.len(), field);
    let mut out = (b.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&b);
    out
}

/// Every file under `dir` (recursive), skipping `skip`, with its content.
fn files_outside(dir: &Path, skip: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p == skip {
                continue;
            }
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                stack.push(p);
            } else {
                let data = if ft.is_file() {
                    std::fs::read(&p).unwrap()
                } else {
                    Vec::new()
                };
                out.push((p.display().to_string(), data));
            }
        }
    }
    out.sort();
    out
}

/// A daemon `a` with a paired client box `b` (not running: only its identity and CLI are used).
fn daemon_and_client() -> (TestBox, TestBox) {
    let mut a = TestBox::new("a");
    let b = TestBox::new("b");
    common::pair(&a, &b);
    a.write("ok.txt", b"fine\n");
    a.start();
    (a, b)
}

/// The daemon still answers its real peer: a download over a fresh connection returns the file.
async fn still_serves(a: &mut TestBox, client: &Identity) {
    let mut s = connect(client, &a.id, a.port).await.unwrap();
    let req = frame(
        1,
        Request::Download {
            path: RelPath::parse("ok.txt").unwrap(),
            offset: 0,
        },
    );
    match ask(&mut s, 1, &req).await {
        Outcome::Answer(r) => assert!(
            r.iter()
                .any(|x| matches!(x, Response::Data(d) if &d[..] == b"fine\n")),
            "{r:?}"
        ),
        other => panic!("the daemon stopped serving: {other:?}"),
    }
    assert!(matches!(a.child.as_mut().unwrap().try_wait(), Ok(None)));
}

fn daemon_log(a: &TestBox) -> String {
    let mut s = std::fs::read_to_string(a.log_path()).unwrap_or_default();
    s.push_str(&a.stderr());
    s
}

fn never_leaks(outcome: &Outcome, secret: &[u8], what: &str) {
    let text = format!("{outcome:?}");
    let hex: String = Sha256::digest(secret)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if let Outcome::Answer(r) = outcome {
        for x in r {
            match x {
                Response::Data(d) => assert!(
                    !d.windows(secret.len()).any(|w| w == secret),
                    "{what}: secret content served"
                ),
                Response::Entries(e) => assert!(
                    e.iter()
                        .all(|e| e.sha256 != Some(Sha256::digest(secret).into())),
                    "{what}: secret's hash served"
                ),
                _ => {}
            }
        }
    }
    assert!(
        !text.contains("TOP-SECRET") && !text.contains(&hex),
        "{what}: {text}"
    );
}

// ------------------------------------------------------------------ certificates

/// A client certificate this box never paired: refused at the handshake by the daemon's
/// listener (the sync port), whatever it then sends; the daemon says why and keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpaired_certificate_is_refused_by_the_daemon() {
    let (mut a, b) = daemon_and_client();
    let stranger = Identity::generate().unwrap();
    let mut tried = 0;
    for (id, body) in [
        (1, Request::Ping),
        (
            2,
            Request::List {
                filter: ListFilter::All,
            },
        ),
        (3, Request::Sync(SyncRequest::IndexSince { since: 0 })),
    ] {
        tried += 1;
        let out = match connect(&stranger, &a.id, a.port).await {
            Ok(mut s) => ask(&mut s, id, &frame(id, body)).await,
            Err(_) => Outcome::Closed,
        };
        assert!(matches!(out, Outcome::Closed), "stranger got {out:?}");
    }
    still_serves(&mut a, &identity_of(&b.root)).await;
    let log = daemon_log(&a);
    assert!(log.contains("not paired"), "daemon must log why: {log}");
    eprintln!("bad inputs tried: {tried}");
}

#[derive(Debug)]
struct Forged(Arc<CertifiedKey>);

impl rustls::client::ResolvesClientCert for Forged {
    fn resolve(&self, _: &[&[u8]], _: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

impl rustls::server::ResolvesServerCert for Forged {
    fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// `cert_der` (someone else's public certificate) with a freshly generated private key: the
/// device ID it presents is the paired one, but it cannot sign the handshake.
fn forged_key(cert_der: &[u8]) -> Arc<CertifiedKey> {
    let fresh = Identity::generate().unwrap();
    let key = provider()
        .key_provider
        .load_private_key(rustls::pki_types::PrivateKeyDer::Pkcs8(
            fresh.key_der.clone().into(),
        ))
        .unwrap();
    Arc::new(CertifiedKey::new(
        vec![rustls::pki_types::CertificateDer::from(cert_der.to_vec())],
        key,
    ))
}

/// The paired peer's own certificate (public: `cert.pem`) presented with another private key,
/// in both directions: as a client to the daemon, and as a server to the `mybox` CLI. The
/// handshake signature does not verify, so nothing is served and nothing is asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paired_id_with_another_key_is_refused_both_ways() {
    let (mut a, b) = daemon_and_client();
    let b_ident = identity_of(&b.root);
    let a_ident = identity_of(&a.root);
    let mut tried = 0;

    // 1. Client side: B's certificate, a stranger's key, against A's daemon.
    let sid: DeviceId = a.id.parse().unwrap();
    for (id, body) in [
        (1, Request::Ping),
        (
            2,
            Request::Download {
                path: RelPath::parse("ok.txt").unwrap(),
                offset: 0,
            },
        ),
    ] {
        tried += 1;
        let mut cfg = client_config(&b_ident, Arc::new(FixedPeers(vec![sid]))).unwrap();
        cfg.client_auth_cert_resolver = Arc::new(Forged(forged_key(&b_ident.cert_der)));
        let out = match connect_with(cfg, a.port).await {
            Ok(mut s) => ask(&mut s, id, &frame(id, body)).await,
            Err(_) => Outcome::Closed,
        };
        assert!(matches!(out, Outcome::Closed), "forged client got {out:?}");
    }

    // 2. Server side: a listener presenting A's certificate with a stranger's key; B's CLI,
    // which pins A's ID, dials it.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let fake_addr = listener.local_addr().unwrap();
    let c = TestBox::new("c");
    let c_id: DeviceId = c.id.parse().unwrap();
    let stranger = Identity::generate().unwrap();
    let mut scfg = server_config(&stranger, Arc::new(FixedPeers(vec![c_id]))).unwrap();
    scfg.cert_resolver = Arc::new(Forged(forged_key(&a_ident.cert_der)));
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(scfg));
    // Count handshakes the fake server completed and requests that reached it (none may).
    let reached = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let reached2 = reached.clone();
    let dialled = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let dialled2 = dialled.clone();
    let server = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            dialled2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if let Ok(mut s) = acceptor.accept(tcp).await {
                reached2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut buf = [0u8; 64];
                if let Ok(Ok(n)) =
                    tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await
                {
                    if n > 0 {
                        reached2.fetch_add(1000, std::sync::atomic::Ordering::SeqCst);
                    }
                }
            }
        }
    });
    let out = mybox(&c.root, &["peer", "add", &a.id, &fake_addr.to_string()]);
    assert!(out.status.success(), "{out:?}");
    for args in [
        &["index", "longlist"][..],
        &["hash", "verify", "ok.txt"][..],
    ] {
        tried += 1;
        let root = c.root.clone();
        let out = tokio::task::spawn_blocking(move || mybox(&root, args))
            .await
            .unwrap();
        assert!(
            !out.status.success(),
            "CLI trusted a forged server: {out:?}"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    }
    server.abort();
    let reached = reached.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        reached, 0,
        "a handshake completed or a request reached the forged server"
    );
    // The CLI did dial the forged server (the refusal is the handshake's, not a dead address).
    assert!(dialled.load(std::sync::atomic::Ordering::SeqCst) >= 2);

    still_serves(&mut a, &b_ident).await;
    eprintln!("bad inputs tried: {tried}");
}

// ------------------------------------------------------------------ paths

/// Hostile spellings of a path, as raw bytes on the wire. `true`: the decoder itself refuses it
/// (the connection is closed, the reason logged); `false`: it is a legal (odd) file name that
/// does not exist, answered with an error.
fn hostile_paths() -> Vec<(Vec<u8>, bool)> {
    let mut v: Vec<(Vec<u8>, bool)> = [
        ("../secret.txt", true),
        ("../../../../../../etc/passwd", true),
        ("..", true),
        ("a/../../secret.txt", true),
        ("./../secret.txt", true),
        ("/etc/passwd", true),
        ("//etc/passwd", true),
        ("/", true),
        ("..\\secret.txt", true),
        ("a\\..\\..\\secret.txt", true),
        ("\\etc\\passwd", true),
        ("a\0b", true),
        ("\0", true),
        ("ok.txt\0.jpg", true),
        (".mybox/key.pem", true),
        (".mybox/config.toml", true),
        ("./.mybox/index.db", true),
        (".mybox", true),
        ("a\nb", true),
        ("\x1b[2J", true),
        ("..%2F..%2Fsecret.txt", false),
        ("%2e%2e/secret.txt", false),
        ("%2E%2E%2Fsecret.txt", false),
        ("..%5csecret.txt", false),
        ("%00", false),
        ("\u{2025}/secret.txt", false),
        ("\u{ff0e}\u{ff0e}/secret.txt", false),
        ("...", false),
    ]
    .iter()
    .map(|(s, r)| (s.as_bytes().to_vec(), *r))
    .collect();
    // Overlong UTF-8 dots and slash, and plain invalid UTF-8.
    v.push((b"\xc0\xae\xc0\xae\xc0\xafsecret.txt".to_vec(), true));
    v.push((b"\xff\xfe".to_vec(), true));
    // Longer than PATH_MAX, and a component longer than NAME_MAX.
    v.push(("a/".repeat(2100).into_bytes(), true));
    v.push(("b".repeat(300).into_bytes(), true));
    v
}

/// Every request that carries a path (download, list/hash of one path, the sync GetBlocks, the
/// UDP negotiation) with every hostile spelling, and with its path length claiming gigabytes:
/// refused (connection closed with the reason logged, or an error answer), nothing outside the
/// store read or written, and the daemon keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traversal_in_every_path_carrying_request_is_refused() {
    let (mut a, b) = daemon_and_client();
    let outside = a.root.parent().unwrap().to_path_buf();
    let secret = b"TOP-SECRET outside the store\n";
    std::fs::write(outside.join("secret.txt"), secret).unwrap();
    let before = files_outside(&outside, &a.root);
    let ident = identity_of(&b.root);
    let hash: [u8; 32] = Sha256::digest(secret).into();
    let mut tried = 0;
    let mut closed = 0;
    let mut s = connect(&ident, &a.id, a.port).await.unwrap();
    let mut id = 10;
    for (name, body) in path_carriers(hash) {
        for (raw, decoder_refuses) in hostile_paths() {
            id += 1;
            tried += 1;
            let what = format!("{name} {:?}", String::from_utf8_lossy(&raw));
            let out = ask(&mut s, id, &with_path(id, &body, &raw, None)).await;
            never_leaks(&out, secret, &what);
            if decoder_refuses {
                assert!(matches!(out, Outcome::Closed), "{what}: {out:?}");
                closed += 1;
                s = connect(&ident, &a.id, a.port).await.unwrap();
            } else {
                assert!(
                    matches!(out, Outcome::Error(ErrorCode::NotFound, _)),
                    "{what}: {out:?}"
                );
            }
        }
        // The path's length prefix claiming 4 GiB, 2^64/3, or nearly the frame cap.
        for claim in huge_length_claims() {
            id += 1;
            tried += 1;
            let out = ask(&mut s, id, &with_path(id, &body, b"x", Some(&claim))).await;
            assert!(matches!(out, Outcome::Closed), "{name} claim: {out:?}");
            closed += 1;
            s = connect(&ident, &a.id, a.port).await.unwrap();
        }
        // The root (the empty path) is a legal path but not a file.
        id += 1;
        tried += 1;
        let out = ask(&mut s, id, &with_path(id, &body, b"", None)).await;
        assert!(
            matches!(
                out,
                Outcome::Error(ErrorCode::NotAFile | ErrorCode::BadPath, _)
            ),
            "{name} root: {out:?}"
        );
    }
    assert_eq!(files_outside(&outside, &a.root), before, "nothing written");
    still_serves(&mut a, &ident).await;
    let log = daemon_log(&a);
    for reason in [
        "contains '..'",
        "absolute",
        "NUL",
        "backslash",
        ".mybox",
        "too long",
    ] {
        assert!(log.contains(reason), "daemon log must say {reason:?}");
    }
    eprintln!("bad inputs tried: {tried} ({closed} refused by the decoder)");
}

/// The same hostile spellings typed at the CLI (`download tcp`, `download udp`, `hash verify`;
/// all but those with NUL, which no argument can hold): one clear line on stderr each, a
/// non-zero status, nothing written, nothing outside the store served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_refuses_hostile_paths_with_one_clear_line() {
    let (mut a, b) = daemon_and_client();
    let outside = a.root.parent().unwrap().to_path_buf();
    std::fs::write(
        outside.join("secret.txt"),
        b"TOP-SECRET outside the store\n",
    )
    .unwrap();
    let out_dir = b.root.parent().unwrap().join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let o = out_dir.to_str().unwrap().to_string();
    let root = b.root.clone();
    let tried = tokio::task::spawn_blocking(move || {
        let mut tried = 0;
        for (raw, _) in hostile_paths() {
            let Ok(p) = String::from_utf8(raw) else {
                continue;
            };
            if p.contains('\0') {
                continue;
            }
            for args in [
                vec!["download", "tcp", p.as_str(), "-o", o.as_str()],
                vec!["download", "udp", p.as_str(), "-o", o.as_str()],
                vec!["hash", "verify", p.as_str()],
            ] {
                tried += 1;
                let out = mybox(&root, &args);
                let err = String::from_utf8_lossy(&out.stderr);
                let short: String = p.chars().take(30).collect();
                assert!(!out.status.success(), "{args:?} succeeded");
                assert_eq!(err.trim_end().lines().count(), 1, "{short:?}: {err}");
                assert!(err.starts_with("mybox: error: "), "{short:?}: {err}");
                assert!(!err.contains("TOP-SECRET") && out.stdout.is_empty());
            }
        }
        tried
    })
    .await
    .unwrap();
    assert_eq!(std::fs::read_dir(&out_dir).unwrap().count(), 0);
    still_serves(&mut a, &identity_of(&b.root)).await;
    eprintln!("bad inputs tried: {tried}");
}

/// A symlink in the store pointing outside it (to a file, and to a directory): `download tcp`,
/// `download udp`, `hash verify` and the sync GetBlocks request never return the target's
/// content, and nothing is written on the asking side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symlinks_out_of_the_store_are_never_followed() {
    let mut a = TestBox::new("a");
    let b = TestBox::new("b");
    common::pair(&a, &b);
    let outside = a.root.parent().unwrap().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let secret = b"TOP-SECRET behind a link\n";
    std::fs::write(outside.join("secret.txt"), secret).unwrap();
    std::os::unix::fs::symlink(outside.join("secret.txt"), a.path("link")).unwrap();
    std::os::unix::fs::symlink(&outside, a.path("dirlink")).unwrap();
    std::os::unix::fs::symlink("../outside/secret.txt", a.path("rellink")).unwrap();
    a.write("ok.txt", b"fine\n");
    a.start();
    let hash: [u8; 32] = Sha256::digest(secret).into();
    let md5_hex: String = {
        use md5::Digest as _;
        md5::Md5::digest(secret)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    let sha_hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    let out_dir = b.root.parent().unwrap().join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let o = out_dir.to_str().unwrap().to_string();
    let mut tried = 0;
    for p in ["link", "rellink", "dirlink/secret.txt"] {
        for args in [
            vec!["download", "tcp", p, "-o", &o],
            vec!["download", "udp", p, "-o", &o],
            vec!["hash", "verify", p],
            vec!["hash", "verify", p, "--json"],
        ] {
            tried += 1;
            let root = b.root.clone();
            let argv: Vec<String> = args.iter().map(|s| s.to_string()).collect();
            let out = tokio::task::spawn_blocking(move || {
                let v: Vec<&str> = argv.iter().map(String::as_str).collect();
                mybox(&root, &v)
            })
            .await
            .unwrap();
            let all = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                !all.contains("TOP-SECRET") && !all.contains(&md5_hex) && !all.contains(&sha_hex),
                "{args:?} leaked the link target: {all}"
            );
            // Downloads of a link fail; `hash verify` of the link itself may describe the link.
            if args[0] == "download" || p.contains('/') {
                assert!(!out.status.success(), "{args:?}: {all}");
            }
        }
    }
    assert_eq!(
        std::fs::read_dir(&out_dir).unwrap().count(),
        0,
        "nothing may be written"
    );
    // The sync engine's block request, with the hash of the target's content (what a peer that
    // guessed the content would send).
    let ident = identity_of(&b.root);
    for p in ["link", "rellink", "dirlink/secret.txt"] {
        tried += 1;
        let mut s = connect(&ident, &a.id, a.port).await.unwrap();
        let body = Request::Sync(SyncRequest::GetBlocks {
            path: RelPath::parse(p).unwrap(),
            first: 0,
            hashes: vec![hash],
        });
        let out = ask(&mut s, 7, &frame(7, body)).await;
        never_leaks(&out, secret, p);
        assert!(matches!(out, Outcome::Error(..)), "GetBlocks {p}: {out:?}");
    }
    still_serves(&mut a, &ident).await;
    eprintln!("bad inputs tried: {tried}");
}

/// GetBlocks with block indexes whose byte offsets overflow 64 bits: a clear error, no crash of
/// the serving task, and the daemon keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_blocks_with_overflowing_block_indexes_is_refused() {
    let (mut a, b) = daemon_and_client();
    let ident = identity_of(&b.root);
    let hash: [u8; 32] = Sha256::digest(b"fine\n").into();
    let mut tried = 0;
    let mut s = connect(&ident, &a.id, a.port).await.unwrap();
    for (i, first) in [u64::MAX, u64::MAX - 3, u64::MAX / 2, 1 << 47, 1 << 60]
        .into_iter()
        .enumerate()
    {
        tried += 1;
        let id = 20 + i as u32;
        let body = Request::Sync(SyncRequest::GetBlocks {
            path: RelPath::parse("ok.txt").unwrap(),
            first,
            hashes: vec![hash; 16],
        });
        let out = ask(&mut s, id, &frame(id, body)).await;
        match out {
            Outcome::Error(code, msg) => assert!(
                code != ErrorCode::Internal && !msg.contains("panic"),
                "first={first}: {code:?} {msg}"
            ),
            other => panic!("first={first}: {other:?}"),
        }
    }
    still_serves(&mut a, &ident).await;
    let log = daemon_log(&a);
    assert!(!log.contains("panicked"), "{log}");
    eprintln!("bad inputs tried: {tried}");
}

/// A hello with a foreign protocol version and a megabyte-long agent string full of terminal
/// escapes: logged as one short escaped line, and the daemon keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_hello_agent_is_logged_short() {
    let (mut a, b) = daemon_and_client();
    let ident = identity_of(&b.root);
    let mut s = connect(&ident, &a.id, a.port).await.unwrap();
    let agent = "\x1b]0;owned\x07".repeat(1 << 16);
    let out = ask(
        &mut s,
        5,
        &frame(
            5,
            Request::Hello {
                version: 999,
                agent,
            },
        ),
    )
    .await;
    assert!(matches!(out, Outcome::Answer(_)), "{out:?}");
    still_serves(&mut a, &ident).await;
    let log = daemon_log(&a);
    let line = log
        .lines()
        .find(|l| l.contains("speaks protocol 999"))
        .unwrap_or_else(|| panic!("not logged: {log}"));
    assert!(line.len() < 4096, "log line of {} bytes", line.len());
    assert!(!log.contains('\x1b'), "terminal escape reached the log");
    eprintln!("bad inputs tried: 1");
}

// ------------------------------------------------------------------ regexes

/// Regexes built to be slow or huge (enormous repetition counts, nested quantifiers, a
/// megabyte-long pattern, deep nesting) sent raw to `index regex` and `hash` with a regex filter:
/// each is answered within the request (a clear error for what exceeds the bounds, the right
/// answer for what a backtracking engine would choke on), and the daemon keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_regexes_are_bounded() {
    let mut a = TestBox::new("a");
    let b = TestBox::new("b");
    common::pair(&a, &b);
    // Names that make backtracking engines explode on the nested patterns below.
    let long_a = "a".repeat(200);
    a.write(&long_a, b"x");
    a.write(&"x".repeat(60), b"y");
    a.write("ok.txt", b"fine\n");
    a.start();
    let ident = identity_of(&b.root);
    // (pattern, Some(expected match count) if it must compile, None if it must be refused)
    let cases: Vec<(String, Option<usize>)> = vec![
        ("a".repeat(1 << 20), None),
        ("(".repeat(1 << 20), None),
        ("a{1000}{1000}{1000}".into(), None),
        ("(?:(?:(?:a{100}){100}){100}){100}".into(), None),
        (r"\w{1000}\w{1000}\w{1000}".into(), None),
        (r"[\p{L}\p{N}]{5000}".into(), None),
        (format!("{}a{}", "(".repeat(500), ")".repeat(500)), None),
        ("a{4294967295}".into(), None),
        ("(a*)*$".into(), Some(3)),
        ("^(a+)+$".into(), Some(1)),
        ("^(a|a)*$".into(), Some(1)),
        ("^(a|aa)*b$".into(), Some(0)),
        ("^(x+x+)+y$".into(), Some(0)),
        ("^(.*a){20}$".into(), Some(1)),
    ];
    let mut tried = 0;
    let mut s = connect(&ident, &a.id, a.port).await.unwrap();
    let mut id = 100;
    for (pattern, expect) in &cases {
        for hash in [false, true] {
            id += 1;
            tried += 1;
            let filter = ListFilter::Regex(pattern.clone());
            let body = if hash {
                Request::Hash { filter }
            } else {
                Request::List { filter }
            };
            let start = Instant::now();
            let out = ask(&mut s, id, &frame(id, body)).await;
            let took = start.elapsed();
            let short: String = pattern.chars().take(40).collect();
            eprintln!("regex {short:?} ({} bytes): {took:?}", pattern.len());
            match (expect, out) {
                (None, Outcome::Error(ErrorCode::BadRequest, msg)) => {
                    assert!(msg.len() < 2048, "error must be short: {} bytes", msg.len());
                    assert!(
                        msg.contains("limit") || msg.contains("regex"),
                        "unclear error for {short:?}: {msg}"
                    );
                }
                (Some(n), Outcome::Answer(r)) => {
                    let got: usize = r
                        .iter()
                        .map(|x| match x {
                            Response::Entries(e) => e.len(),
                            _ => 0,
                        })
                        .sum();
                    assert_eq!(got, *n, "{short:?}");
                }
                (e, other) => panic!("{short:?} (expected {e:?}): {other:?}"),
            }
        }
    }
    // The request history records each pattern without letting a hostile one bloat it.
    let history = std::fs::metadata(a.path(".mybox/history.log"))
        .unwrap()
        .len();
    assert!(history < 64 * 1024, "history.log grew to {history} bytes");
    // The CLI path gives the same answer as one line.
    tried += 1;
    let out = mybox(&b.root, &["index", "regex", "a{1000}{1000}{1000}"]);
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr)
            .trim_end()
            .lines()
            .count(),
        1
    );
    still_serves(&mut a, &ident).await;
    eprintln!("bad inputs tried: {tried}");
}

// ------------------------------------------------------------------ a hostile sync peer

/// Pin a fresh identity in `b` at an address where nothing listens, so the connection that
/// identity opens itself is the one `b` syncs over; start `b`'s daemon.
fn pin_hostile_peer(b: &mut TestBox) -> Identity {
    let evil = Identity::generate().unwrap();
    let dead = common::free_port();
    let out = mybox(
        &b.root,
        &[
            "peer",
            "add",
            &evil.id.to_string(),
            &format!("127.0.0.1:{dead}"),
        ],
    );
    assert!(out.status.success(), "{out:?}");
    b.start();
    evil
}

/// A record as the hostile peer announces it: files hold `content` (one block); `size`
/// overrides the size a file claims.
fn announced(
    dev: u64,
    path: &str,
    kind: mybox::model::Kind,
    seq: u64,
    content: &[u8],
    size: Option<u64>,
    target: Option<String>,
) -> mybox::model::Record {
    use mybox::model::{Kind, Record, VersionVector};
    let file = kind == Kind::File;
    let sha: [u8; 32] = Sha256::digest(content).into();
    let md5: [u8; 16] = {
        use md5::Digest as _;
        md5::Md5::digest(content).into()
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64;
    Record {
        path: RelPath::parse(path).unwrap(),
        kind,
        size: if file {
            size.unwrap_or(content.len() as u64)
        } else {
            0
        },
        mtime_ns: now,
        mode: if file { 0o644 } else { 0o777 },
        target,
        md5: file.then_some(md5),
        sha256: file.then_some(sha),
        blocks: if file { vec![sha] } else { vec![] },
        version: VersionVector(vec![(dev, seq)]),
        deleted: false,
        sequence: seq,
        modified_by: dev,
    }
}

/// Connect to `b` as `ident`, hint that our index advanced, and answer `b`'s requests: our
/// index is `records`, every block asked for is `content`. Returns a stop switch and the task,
/// which yields the paths whose blocks `b` asked for.
async fn run_hostile_peer(
    ident: &Identity,
    b: &TestBox,
    records: Vec<mybox::model::Record>,
    content: Vec<u8>,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Vec<String>>,
) {
    use mybox::sync::proto::SyncResponse;
    let top = records.iter().map(|r| r.sequence).max().unwrap_or(0);
    let b_id: DeviceId = b.id.parse().unwrap();
    let cfg = client_config(ident, Arc::new(FixedPeers(vec![b_id]))).unwrap();
    let mut s = connect_with(cfg, b.port).await.unwrap();
    // The hint makes `b` adopt this connection and pull our index.
    let hint = frame(1, Request::Sync(SyncRequest::IndexChanged { max_seq: top }));
    s.write_all(&hint).await.unwrap();
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let mut buf = Vec::new();
        let mut asked_blocks = Vec::new();
        loop {
            while let Ok(Some((frame, used))) = decode_prefixed(&buf) {
                buf.drain(..used);
                let Frame::Request { id, body } = frame else {
                    continue;
                };
                let mut replies = Vec::new();
                match body {
                    Request::Sync(SyncRequest::IndexSince { since }) => {
                        if since < top {
                            replies.push((false, Response::Records(records.clone())));
                        }
                        replies.push((
                            true,
                            Response::Sync(SyncResponse::IndexEnd {
                                last_sent: top,
                                current_max: top,
                            }),
                        ));
                    }
                    Request::Sync(
                        SyncRequest::GetBlocks { path, hashes, .. }
                        | SyncRequest::GetIndexedBlocks { path, hashes, .. },
                    ) => {
                        asked_blocks.push(path.to_string());
                        for _ in hashes {
                            replies.push((false, Response::Data(content.clone().into())));
                        }
                        replies.push((true, Response::Done));
                    }
                    Request::Sync(SyncRequest::GetBatch { runs }) => {
                        let mut answers = Vec::new();
                        for run in runs {
                            asked_blocks.push(run.path.to_string());
                            let blocks =
                                run.hashes.iter().map(|_| content.clone().into()).collect();
                            answers.push(mybox::sync::proto::RunAnswer::Blocks(blocks));
                        }
                        replies.push((false, Response::Sync(SyncResponse::Runs(answers))));
                        replies.push((true, Response::Done));
                    }
                    Request::Hello { .. } => replies.push((
                        true,
                        Response::Hello {
                            version: mybox::protocol::PROTOCOL_VERSION,
                            agent: "hostile".into(),
                        },
                    )),
                    Request::Ping => replies.push((true, Response::Pong)),
                    Request::Sync(_) => replies.push((true, Response::Sync(SyncResponse::Ack))),
                    _ => replies.push((
                        true,
                        Response::Error {
                            code: ErrorCode::Unsupported,
                            message: "no".into(),
                        },
                    )),
                }
                for (end, body) in replies {
                    let bytes = encode(&Frame::Response { id, end, body }).unwrap();
                    if s.write_all(&bytes).await.is_err() {
                        return asked_blocks;
                    }
                }
                let _ = s.flush().await;
            }
            let mut chunk = vec![0u8; 1 << 16];
            tokio::select! {
                _ = &mut stop_rx => return asked_blocks,
                r = s.read(&mut chunk) => match r {
                    Ok(0) | Err(_) => return asked_blocks,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                },
            }
        }
    });
    (stop_tx, task)
}

/// Wait until `b` holds `plain.txt` with `content` (the hostile peer's ordinary file).
async fn wait_plain(b: &TestBox, content: &[u8], deadline: Instant) {
    while b.read("plain.txt").as_deref() != Some(content) {
        assert!(
            Instant::now() < deadline,
            "the ordinary file never arrived: {}",
            daemon_log(b)
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A paired peer that turns hostile while syncing: it announces a symlink `esc` to a directory
/// outside the receiver's store and then a file `esc/evil.txt`, plus a file under a symlink the
/// receiver already has (`dirlink/evil3.txt`), and serves their blocks when asked. The receiver
/// keeps the link as a link but never writes through it: nothing appears outside its store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_sync_peer_cannot_write_through_symlinks() {
    use mybox::model::Kind;
    let mut b = TestBox::new("b");
    let outside = b.root.parent().unwrap().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, b.path("dirlink")).unwrap();
    let ident = pin_hostile_peer(&mut b);
    let evil = b"EVIL content\n".to_vec();
    let dev = ident.id.short();
    let link_target = Some(outside.display().to_string());
    let records = vec![
        announced(dev, "esc", Kind::Symlink, 1, b"", None, link_target),
        announced(dev, "esc/evil.txt", Kind::File, 2, &evil, None, None),
        announced(dev, "dirlink/evil3.txt", Kind::File, 3, &evil, None, None),
        announced(dev, "plain.txt", Kind::File, 4, &evil, None, None),
    ];
    let (stop, peer) = run_hostile_peer(&ident, &b, records, evil.clone()).await;
    // B applies what it can: the ordinary file, and the link as a link.
    let deadline = Instant::now() + Duration::from_secs(20);
    wait_plain(&b, &evil, deadline).await;
    // Both hostile paths were tried, and refused with a reason.
    while !b.path("esc").is_symlink()
        || !["esc/evil.txt:", "dirlink/evil3.txt:"].iter().all(|p| {
            daemon_log(&b)
                .lines()
                .any(|l| l.contains("WARN") && l.contains(p))
        })
    {
        assert!(
            Instant::now() < deadline,
            "no refusal logged: {}",
            daemon_log(&b)
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let _ = stop.send(());
    let asked = peer.await.unwrap();
    let written: Vec<_> = std::fs::read_dir(&outside)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(
        written.is_empty(),
        "written outside the store: {written:?} (blocks asked for {asked:?})"
    );
    assert!(b.path("dirlink").is_symlink() && b.path("esc").is_symlink());
    assert!(matches!(b.child.as_mut().unwrap().try_wait(), Ok(None)));
    eprintln!("bad inputs tried: 2 (blocks asked for {asked:?})");
}

/// A hostile peer announcing files of absurd sizes (2^63 bytes and more, with one block): the
/// receiver neither fetches nor allocates for them, and keeps answering `status` (it once
/// aborted on "memory allocation of 4503599627370496 bytes failed" in `status`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_sync_peer_cannot_exhaust_memory_with_claimed_sizes() {
    use mybox::model::Kind;
    let mut b = TestBox::new("b");
    let ident = pin_hostile_peer(&mut b);
    let evil = b"EVIL content\n".to_vec();
    let dev = ident.id.short();
    let sizes = [u64::MAX, 1 << 63, 1 << 56];
    let mut records: Vec<_> = sizes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let name = format!("huge{i}.bin");
            announced(dev, &name, Kind::File, i as u64 + 1, &evil, Some(*s), None)
        })
        .collect();
    records.push(announced(
        dev,
        "plain.txt",
        Kind::File,
        9,
        &evil,
        None,
        None,
    ));
    let (stop, peer) = run_hostile_peer(&ident, &b, records, evil.clone()).await;
    wait_plain(&b, &evil, Instant::now() + Duration::from_secs(20)).await;
    let root = b.root.clone();
    let out = tokio::task::spawn_blocking(move || mybox(&root, &["status", "--json"]))
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "status failed: {out:?}\n{}",
        daemon_log(&b)
    );
    let _ = stop.send(());
    let asked = peer.await.unwrap();
    assert!(
        asked.iter().all(|p| !p.starts_with("huge")),
        "fetched {asked:?}"
    );
    assert!(matches!(b.child.as_mut().unwrap().try_wait(), Ok(None)));
    eprintln!("bad inputs tried: {}", sizes.len());
}
