//! Serving a box to its peers: the accept loop (connection limit, handshake timeout) and the
//! request handler that answers queries, streams downloads and hands sync and UDP requests to
//! their modules. Every request served is written to the history log.

use std::future::Future;
use std::io::{Seek, SeekFrom};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};

use crate::hashing::{self, FileHashes, StatKey};
use crate::history::{Direction, History};
use crate::identity::Identity;
use crate::locks::{LockManager, Mode};
use crate::model::BLOCK_SIZE;
use crate::model::{EntryInfo, Kind};
use crate::net::rpc::{BoxFuture, Conn, Handler, Responder};
use crate::net::{self, ConfigPeers};
use crate::paths::{resolve_no_follow, RelPath};
use crate::protocol::{
    ErrorCode, ListFilter, Request, Response, DATA_CHUNK, ENTRIES_PER_FRAME, PROTOCOL_VERSION,
};
use crate::query::{LocalBox, QueryError};

/// Connections served at once; more are refused (closed) until one ends.
pub const MAX_CONNECTIONS: usize = 128;
/// Handshakes in progress at once (unauthenticated sockets).
pub const MAX_HANDSHAKING: usize = 32;
/// Authenticated connections one device may hold open.
pub const MAX_PER_PEER: usize = 64;
/// How long a sender waits for a writer to release a file before giving up.
pub const LOCK_WAIT: Duration = Duration::from_secs(10);

/// Everything the serving side of a box shares between connections.
pub struct ServerCtx {
    pub local: Arc<LocalBox>,
    pub ident: Arc<Identity>,
    pub locks: Arc<LockManager>,
    pub history: History,
    pub peers: Arc<ConfigPeers>,
    /// The sync engine, when this process runs one (`mybox daemon`/`mount`).
    pub sync: std::sync::OnceLock<Arc<crate::sync::Engine>>,
    pub config: crate::config::Config,
}

impl ServerCtx {
    pub fn new(local: Arc<LocalBox>, locks: Arc<LockManager>) -> anyhow::Result<Arc<ServerCtx>> {
        let ident = Arc::new(local.dir.identity()?);
        let config = local.dir.load_config()?;
        Ok(Arc::new(ServerCtx {
            history: History::new(&local.dir),
            peers: ConfigPeers::new(local.dir.clone()),
            local,
            ident,
            locks,
            sync: std::sync::OnceLock::new(),
            config,
        }))
    }

    pub fn tls_acceptor(&self) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
        let cfg = net::tls::server_config(&self.ident, self.peers.clone())?;
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
    }
}

/// The request handler of a box.
#[derive(Clone)]
pub struct BoxHandler(pub Arc<ServerCtx>);

impl Handler for BoxHandler {
    fn handle(&self, conn: Conn, req: Request, out: Responder) -> BoxFuture {
        let ctx = self.0.clone();
        Box::pin(async move {
            let peer = conn.peer().id.short_str();
            let desc = describe(&req);
            let log = !matches!(
                req,
                Request::Hello { .. } | Request::Ping | Request::Sync(_)
            );
            let outcome = serve_one(&ctx, &conn, req, out).await;
            if log {
                ctx.history
                    .record(Direction::Served, &peer, &desc, &outcome);
            }
        })
    }
}

/// A peer-supplied regex for the logs: cut to the accepted length, so a hostile megabyte-long
/// pattern costs the history one short line.
fn log_regex(r: &str) -> String {
    let limit = crate::query::MAX_REGEX_LEN;
    if r.len() <= limit {
        return format!("{r:?}");
    }
    let mut end = limit;
    while !r.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}... ({} bytes)", &r[..end], r.len())
}

/// Short text of a request for logs.
pub fn describe(req: &Request) -> String {
    match req {
        Request::Hello { .. } => "hello".into(),
        Request::List { filter } => match filter {
            ListFilter::All => "index longlist".into(),
            ListFilter::MtimeRange { start_ns, end_ns } => format!(
                "index shortlist {} {}",
                crate::timeparse::format_ns(*start_ns),
                crate::timeparse::format_ns(*end_ns)
            ),
            ListFilter::Regex(r) => format!("index regex {}", log_regex(r)),
            ListFilter::Path(p) => format!("index path {p}"),
        },
        Request::Hash { filter } => match filter {
            ListFilter::Path(p) => format!("hash verify {p}"),
            ListFilter::All => "hash checkall".into(),
            ListFilter::Regex(r) => format!("hash regex {}", log_regex(r)),
            other => format!("hash {other:?}"),
        },
        Request::Download { path, offset } if *offset > 0 => {
            format!("download tcp {path} from {offset}")
        }
        Request::Download { path, .. } => format!("download tcp {path}"),
        Request::Sync(s) => format!("sync {}", s.kind_name()),
        Request::Udp(u) => format!("udp {}", u.kind_name()),
        Request::Ping => "ping".into(),
    }
}

async fn send_entries(mut out: Responder, entries: Vec<EntryInfo>) -> String {
    let n = entries.len();
    let mut chunks = entries.chunks(ENTRIES_PER_FRAME).peekable();
    if chunks.peek().is_none() {
        let _ = out.end(Response::Entries(Vec::new())).await;
        return "ok, 0 entries".into();
    }
    while let Some(chunk) = chunks.next() {
        let body = Response::Entries(chunk.to_vec());
        let r = if chunks.peek().is_none() {
            return match out.end(body).await {
                Ok(()) => format!("ok, {n} {}", if n == 1 { "entry" } else { "entries" }),
                Err(e) => format!("failed: {e}"),
            };
        } else {
            out.send(body).await
        };
        if let Err(e) = r {
            return format!("failed: {e}");
        }
    }
    format!("ok, {n} {}", if n == 1 { "entry" } else { "entries" })
}

/// `send_entries`, then, after a listing of a large tree, hand the allocator's free memory back
/// to the system: a query's scan and listing take tens of MB (100,000 files) on whichever
/// blocking thread ran it, and glibc keeps that per-thread arena's free pages, so without this
/// an idle daemon's RSS grows with every thread that ever answered a big query.
async fn send_large_entries(out: Responder, entries: Vec<EntryInfo>) -> String {
    let large = entries.len() >= 10_000;
    let r = send_entries(out, entries).await;
    if large {
        // SAFETY: malloc_trim only returns free memory to the OS; no pointer is involved.
        #[cfg(target_env = "gnu")]
        unsafe {
            libc::malloc_trim(0);
        }
    }
    r
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, QueryError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| QueryError::new(ErrorCode::Internal, format!("worker failed: {e}")))
}

async fn serve_one(ctx: &Arc<ServerCtx>, conn: &Conn, req: Request, out: Responder) -> String {
    async fn fail(out: Responder, e: QueryError) -> String {
        let msg = format!("error {:?}: {}", e.code, e.message);
        let _ = out.error(e.code, e.message).await;
        msg
    }
    match req {
        Request::Hello { version, agent } => {
            if version != PROTOCOL_VERSION {
                tracing::warn!(
                    "peer {} speaks protocol {version} ({})",
                    conn.peer().id.short_str(),
                    net::clip(&agent)
                );
            }
            let _ = out
                .end(Response::Hello {
                    version: PROTOCOL_VERSION,
                    agent: net::agent(),
                })
                .await;
            "ok".into()
        }
        Request::Ping => {
            let _ = out.end(Response::Pong).await;
            "ok".into()
        }
        Request::List { filter } => {
            let local = ctx.local.clone();
            match blocking(move || local.list(&filter)).await.and_then(|r| r) {
                Ok(entries) => send_large_entries(out, entries).await,
                Err(e) => fail(out, e).await,
            }
        }
        Request::Hash { filter } => {
            let local = ctx.local.clone();
            match blocking(move || local.hash(&filter)).await.and_then(|r| r) {
                Ok(entries) => send_large_entries(out, entries).await,
                Err(e) => fail(out, e).await,
            }
        }
        Request::Download { path, offset } => match serve_download(ctx, path, offset, out).await {
            Ok(s) => s,
            Err(e) => format!("error: {e}"),
        },
        Request::Sync(r) => crate::sync::serve(ctx, conn, r, out).await,
        Request::Udp(r) => crate::udp::serve(ctx, conn, r, out).await,
    }
}

/// What the reader thread of a download produces.
enum Chunk {
    Header(EntryInfo),
    Data(bytes::Bytes),
    Trailer(FileHashes),
    Fail(QueryError),
}

/// Stream one file: a header, data frames, then a trailer with the hashes of exactly the bytes
/// sent. The file is read under a shared lock (no in-process writer can change it meanwhile), and
/// if an outside writer changed it anyway the transfer ends in an error the client retries.
async fn serve_download(
    ctx: &Arc<ServerCtx>,
    path: RelPath,
    offset: u64,
    mut out: Responder,
) -> anyhow::Result<String> {
    let (tx, mut rx) = mpsc::channel::<Chunk>(4);
    let ctx2 = ctx.clone();
    let reader = tokio::task::spawn_blocking(move || {
        if let Err(e) = read_for_download(&ctx2, &path, offset, &tx) {
            let _ = tx.blocking_send(Chunk::Fail(e));
        }
    });
    let mut sent: u64 = 0;
    let mut outcome = String::from("failed");
    while let Some(chunk) = rx.recv().await {
        match chunk {
            Chunk::Header(entry) => out.send(Response::FileHeader { entry }).await?,
            Chunk::Data(d) => {
                sent += d.len() as u64;
                if out.send(Response::Data(d.into())).await.is_err() {
                    outcome = "cancelled".into();
                    break;
                }
            }
            Chunk::Trailer(h) => {
                out.end(Response::FileTrailer {
                    md5: h.md5,
                    sha256: h.sha256,
                    size: h.size,
                })
                .await?;
                outcome = format!("ok, {sent} bytes, md5 {}", crate::model::hex(&h.md5));
                break;
            }
            Chunk::Fail(e) => {
                outcome = format!("error {:?}: {}", e.code, e.message);
                out.error(e.code, e.message).await?;
                break;
            }
        }
    }
    drop(rx);
    let _ = reader.await;
    Ok(outcome)
}

/// A store file opened for sending (TCP or UDP) under a shared lock.
pub struct Opened {
    pub file: Arc<std::fs::File>,
    pub key: StatKey,
    pub entry: EntryInfo,
    /// MD5 and SHA-256 from the index, when taken at exactly this stat key.
    pub cached: Option<([u8; 16], [u8; 32])>,
    /// The recorded block hashes that go with `cached` (empty when not cached).
    pub blocks: Vec<[u8; 32]>,
    pub _guard: crate::locks::Guard,
}

/// Open `path` for a transfer: never a symlink (anywhere in the path, checked by the kernel at
/// open), only a regular file, under a shared per-file lock so no in-process writer changes it
/// meanwhile; with the index's hashes when they describe exactly this file.
pub fn open_for_send(ctx: &ServerCtx, path: &RelPath) -> Result<Opened, QueryError> {
    let root = &ctx.local.dir.root;
    let full = resolve_no_follow(root, path)
        .map_err(|e| QueryError::new(ErrorCode::BadPath, e.to_string()))?;
    let md = std::fs::symlink_metadata(&full)
        .map_err(|e| QueryError::new(ErrorCode::NotFound, format!("{path}: {e}")))?;
    if md.file_type().is_symlink() {
        return Err(QueryError::new(
            ErrorCode::NotAFile,
            format!("{path}: is a symlink; mybox never follows links (the link itself syncs)"),
        ));
    }
    if !md.is_file() {
        return Err(QueryError::new(
            ErrorCode::NotAFile,
            format!("{path}: not a regular file"),
        ));
    }
    let guard = ctx
        .locks
        .lock(path, Mode::Shared, LOCK_WAIT)
        .ok_or_else(|| {
            QueryError::new(ErrorCode::Busy, format!("{path}: being written; try again"))
        })?;
    let f = crate::paths::open_beneath(root, path)
        .map_err(|e| QueryError::new(ErrorCode::Io, format!("{path}: {e}")))?;
    let md = f
        .metadata()
        .map_err(|e| QueryError::new(ErrorCode::Io, e.to_string()))?;
    if !md.is_file() {
        return Err(QueryError::new(
            ErrorCode::NotAFile,
            format!("{path}: not a regular file"),
        ));
    }
    let key = StatKey::of(&md);
    // Cached hashes are only trusted with a full block list: a download that skips hashing
    // still checks every block against it, so bytes rotten on disk are never served as the
    // recorded version.
    let (cached, blocks) = ctx
        .local
        .index
        .lock()
        .ok()
        .and_then(|ix| ix.get(path).ok().flatten())
        .filter(|s| s.stat == Some(key) && s.record.is_hashed() && !s.record.deleted)
        .filter(|s| s.record.blocks.len() as u64 == key.size.div_ceil(BLOCK_SIZE))
        .and_then(|s| Some(((s.record.md5?, s.record.sha256?), s.record.blocks)))
        .map_or((None, Vec::new()), |(c, b)| (Some(c), b));
    use std::os::unix::fs::PermissionsExt;
    let entry = EntryInfo {
        path: path.clone(),
        kind: Kind::File,
        size: key.size,
        mtime_ns: key.mtime_ns,
        mode: md.permissions().mode() & 0o7777,
        mime: crate::model::mime_for(path, Kind::File),
        target: None,
        md5: cached.map(|c| c.0),
        sha256: cached.map(|c| c.1),
    };
    Ok(Opened {
        file: Arc::new(f),
        key,
        entry,
        cached,
        blocks,
        _guard: guard,
    })
}

fn read_for_download(
    ctx: &ServerCtx,
    path: &RelPath,
    offset: u64,
    tx: &mpsc::Sender<Chunk>,
) -> Result<(), QueryError> {
    let opened = open_for_send(ctx, path)?;
    let mut f = std::fs::File::try_clone(&opened.file)
        .map_err(|e| QueryError::new(ErrorCode::Io, e.to_string()))?;
    let key = opened.key;
    let cached = opened.cached;
    let entry = opened.entry.clone();
    let closed = || QueryError::new(ErrorCode::Internal, "client went away");
    tx.blocking_send(Chunk::Header(entry))
        .map_err(|_| closed())?;
    let pipeline = if cached.is_none() {
        Some(hashing::Pipeline::with_blocks(false))
    } else {
        None
    };
    // With cached hashes, reading starts at the block holding `offset` so every byte sent is
    // inside a block checked against the index.
    let mut pos: u64 = 0;
    if pipeline.is_none() {
        pos = offset - offset % BLOCK_SIZE;
        f.seek(SeekFrom::Start(pos))
            .map_err(|e| QueryError::new(ErrorCode::Io, e.to_string()))?;
    }
    loop {
        let chunk = hashing::read_chunk(&mut f, DATA_CHUNK)
            .map_err(|e| QueryError::new(ErrorCode::Io, e.to_string()))?;
        if chunk.is_empty() {
            break;
        }
        if pipeline.is_none() {
            check_blocks(path, &opened.blocks, pos, &chunk)?;
        }
        let end = pos + chunk.len() as u64;
        let chunk = bytes::Bytes::from(chunk);
        if let Some(p) = &pipeline {
            p.feed(chunk.clone())
                .map_err(|e| QueryError::new(ErrorCode::Internal, e.to_string()))?;
        }
        if end > offset {
            let skip = offset.saturating_sub(pos) as usize;
            tx.blocking_send(Chunk::Data(chunk.slice(skip..)))
                .map_err(|_| closed())?;
        }
        pos = end;
    }
    let after = StatKey::of(
        &f.metadata()
            .map_err(|e| QueryError::new(ErrorCode::Io, e.to_string()))?,
    );
    if after != key || pos != key.size {
        return Err(QueryError::new(
            ErrorCode::Changed,
            format!("{path}: changed while it was sent; try again"),
        ));
    }
    let hashes = match (pipeline, cached) {
        (Some(p), _) => p
            .finish()
            .map_err(|e| QueryError::new(ErrorCode::Internal, e.to_string()))?,
        (None, Some(c)) => FileHashes {
            md5: c.0,
            sha256: c.1,
            blocks: Vec::new(),
            size: key.size,
        },
        (None, None) => return Err(QueryError::new(ErrorCode::Internal, "no hashes")),
    };
    tx.blocking_send(Chunk::Trailer(hashes))
        .map_err(|_| closed())?;
    Ok(())
}

/// Check `chunk` (read at `pos`, a block boundary) against the recorded block hashes. A mismatch
/// at an unchanged stat key is damage on disk: logged, and the download fails rather than
/// serving bytes that are not the recorded version.
fn check_blocks(
    path: &RelPath,
    blocks: &[[u8; 32]],
    pos: u64,
    chunk: &[u8],
) -> Result<(), QueryError> {
    use sha2::Digest;
    for (k, piece) in chunk.chunks(BLOCK_SIZE as usize).enumerate() {
        let i = (pos / BLOCK_SIZE) as usize + k;
        let ok = blocks
            .get(i)
            .is_some_and(|want| <[u8; 32]>::from(sha2::Sha256::digest(piece)) == *want);
        if !ok {
            tracing::error!(
                "{path}: block {i} on disk does not match its recorded hash (corrupted?); not served"
            );
            return Err(QueryError::new(
                ErrorCode::Io,
                format!("{path}: block {i} on disk does not match its recorded hash (corrupted?)"),
            ));
        }
    }
    Ok(())
}

/// Accept peers on `listener` until `shutdown` resolves.
///
/// Limits keep a box serving its real peers under abuse: unauthenticated handshakes are capped
/// and, when the cap is hit, the *oldest* pending handshake is dropped (so a flood of silent
/// sockets cannot lock a peer out: a fresh connection always gets its chance); authenticated
/// connections are capped per device and in total.
pub async fn run_listener(
    ctx: Arc<ServerCtx>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let acceptor = ctx.tls_acceptor()?;
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let handler: Arc<dyn Handler> = Arc::new(BoxHandler(ctx.clone()));
    let pending: Arc<
        std::sync::Mutex<std::collections::VecDeque<(u64, tokio::task::AbortHandle)>>,
    > = Arc::default();
    let per_peer: Arc<
        std::sync::Mutex<std::collections::HashMap<crate::identity::DeviceId, usize>>,
    > = Arc::default();
    let mut next_id: u64 = 0;
    tokio::pin!(shutdown);
    loop {
        let (tcp, addr) = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(
                "refusing connection from {addr}: {MAX_CONNECTIONS} connections already open"
            );
            drop(tcp);
            continue;
        };
        if let Ok(mut p) = pending.lock() {
            p.retain(|(_, h)| !h.is_finished());
            while p.len() >= MAX_HANDSHAKING {
                if let Some((_, oldest)) = p.pop_front() {
                    tracing::warn!("{MAX_HANDSHAKING} handshakes pending: dropping the oldest");
                    oldest.abort();
                }
            }
        }
        next_id += 1;
        let my_id = next_id;
        let acceptor = acceptor.clone();
        let handler = handler.clone();
        let ctx = ctx.clone();
        let pending2 = pending.clone();
        let per_peer = per_peer.clone();
        let handshake = tokio::spawn(async move {
            let r = net::accept(&acceptor, tcp, addr, handler).await;
            if let Ok(mut p) = pending2.lock() {
                p.retain(|(id, _)| *id != my_id);
            }
            r
        });
        if let Ok(mut p) = pending.lock() {
            p.push_back((my_id, handshake.abort_handle()));
        }
        tokio::spawn(async move {
            let (conn, task) = match handshake.await {
                Ok(Ok(x)) => x,
                Ok(Err(e)) => {
                    tracing::warn!("{e:#}");
                    return;
                }
                Err(_) => return, // aborted to make room
            };
            let peer = conn.peer().id;
            let count = per_peer.lock().map(|mut m| {
                let c = m.entry(peer).or_insert(0);
                *c += 1;
                *c
            });
            if count.map(|c| c > MAX_PER_PEER).unwrap_or(true) {
                tracing::warn!(
                    "peer {} has {MAX_PER_PEER} connections open already; closing this one",
                    peer.short_str()
                );
                conn.close();
                task.abort();
            } else {
                tracing::debug!("peer {} connected from {addr}", peer.short_str());
                if let Some(engine) = ctx.sync.get() {
                    engine.on_incoming(conn.clone());
                }
                let _ = task.await;
            }
            if let Ok(mut m) = per_peer.lock() {
                if let Some(c) = m.get_mut(&peer) {
                    *c -= 1;
                    if *c == 0 {
                        m.remove(&peer);
                    }
                }
            }
            drop(permit);
        });
    }
}
