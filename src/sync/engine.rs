//! The engine of a running daemon: peer sessions (dial with backoff, one connection per peer,
//! incremental index exchange), the scanner loop (inotify paths, debounced, and periodic full
//! rescans) and the puller (plan each changed path, apply through [`Applier`]).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, watch, Notify};

use crate::hashing::pair::sha256_each;
use crate::identity::DeviceId;
use crate::model::{Kind, Record, VvOrder};
use crate::net::rpc::{Conn, Handler, Responder, RpcError};
use crate::paths::RelPath;
use crate::protocol::{Chunk, ErrorCode, Request, Response};
use crate::scan::{self, HashWanted, IgnoreRules};
use crate::server::{BoxHandler, ServerCtx, LOCK_WAIT};
use crate::sync::apply::{self, Applier, ApplyError, Building, PRECOPY_MIN, PRECOPY_TTL};
use crate::sync::planner::{self, Action};
use crate::sync::proto::{self, SyncRequest, SyncResponse};
use crate::sync::store::SyncDb;

mod hydrate;
pub use hydrate::Hydration;

/// Events are collected this long after the first one before a scan runs.
pub const DEBOUNCE: Duration = Duration::from_millis(30);
/// How long the MD5 filler waits after the last change before reading files again.
const MD5_DELAY: Duration = Duration::from_secs(2);
/// Paths of one `Changing` hint looked at (each copy made ahead is a whole large file).
const PRECOPY_PATHS_MAX: usize = 8;
/// The longest the MD5 filler stands aside for syncing before reading its next chunk anyway.
const YIELD_MAX: Duration = Duration::from_secs(30);
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
const PING_EVERY: Duration = Duration::from_secs(30);
/// While this box is pulling, what it indexes is mostly what it has just received, and
/// announcing that at once makes the peer sending it spend its CPU taking back the records of
/// the files it is sending. Announcements wait for the puller to drain, at most this long.
const ANNOUNCE_DEFER_MAX: Duration = Duration::from_secs(1);
/// ... or until this many records wait: the peer takes them in bounded pieces (all of a
/// 100,000-file sync at once raised the sender's peak memory from 75 to 92 MB).
const ANNOUNCE_BACKLOG_MAX: u64 = 16_384;
/// Pull slots: a small file takes one, a big one up to `BIG_FILE_SLOTS`, so many small files
/// overlap their round trips while a few big ones bound the memory held in flight.
const PULL_SLOTS: u32 = 32;
const BIG_FILE_SLOTS: u32 = 8;
/// More distinct changed paths than this in one debounce window: scan the whole store.
const MAX_SCAN_ROOTS: usize = 64;
/// Files at most this big are put in place in batches (see [`Engine::finisher`]).
const BATCH_MAX_FILE: u64 = 16 * 1024 * 1024;
/// Block requests in flight per file (each up to `proto::MAX_BLOCKS_PER_REQUEST` blocks).
const FETCH_PIPELINE: usize = 8;
/// With `transport = "udp"`, files missing at least this much go over the UDP bulk path.
const UDP_MIN_BYTES: u64 = 4 * 1024 * 1024;
/// Bytes asked for in one UDP transfer (held in memory until verified and written).
const UDP_RANGE_BYTES: u64 = 32 * 1024 * 1024;
/// Bytes of a big file written between two nudges of the kernel's writeback.
const WRITEBACK_EVERY: u64 = 32 * 1024 * 1024;
/// Dirty paths planned at a time; the first chunk of a pass is smaller (see `pull_batch`).
const PLAN_CHUNK: usize = 1000;
const FIRST_PLAN_CHUNK: usize = 100;
/// The longest `status --wait` honoured.
pub const MAX_STATUS_WAIT: Duration = Duration::from_secs(24 * 3600);
/// Paths planned per taking of the database and index locks.
const PLAN_LOCK_SLICE: usize = 250;
/// At most this many files per finishing round: what arrived while the previous round flushed
/// (each file an open temp file until it is placed, so fewer if the open-file limit is low;
/// see [`finish_batch_limit`]).
const FINISH_BATCH: usize = 2048;
/// Files at most this big are fetched many per request (`GetBatch`, see [`Engine::fetch_group`]),
/// up to `GROUP_FILES` files or `GROUP_BYTES` bytes per group; a group takes `GROUP_SLOTS` pull
/// slots, so a few groups overlap their round trips, reads and writes. Files of a few MiB too:
/// fetched alone, 8 blocks in flight, they were the last to finish. Below `UDP_MIN_BYTES`,
/// which go over UDP when that transport is chosen.
const GROUP_MAX_FILE: u64 = UDP_MIN_BYTES - 1;
const GROUP_FILES: usize = 64;
const GROUP_BYTES: u64 = 4 * 1024 * 1024;
const GROUP_SLOTS: u32 = 8;
/// Groups of fetched files queued for the finisher: enough for fetching to go on through a
/// round's flush (tens of milliseconds, a few hundred files) instead of waiting for it.
const FINISH_QUEUE: usize = 32;

/// A file fetched into the temp folder, waiting for the finisher.
struct Fetched {
    pl: Planned,
    building: Building,
}

#[derive(Default)]
struct PeerSlot {
    conn: Option<Conn>,
    dialled_by_me: bool,
    hint: Arc<Notify>,
    last_error: Option<String>,
    connected_since: Option<SystemTime>,
    /// The peer's index has been pulled at least once over the current connection.
    index_received: bool,
}

#[derive(Default)]
pub struct Stats {
    pub bytes_fetched: AtomicU64,
    /// The part of `bytes_fetched` that came over the UDP bulk path.
    pub bytes_fetched_udp: AtomicU64,
    pub bytes_reused: AtomicU64,
    /// The part of `bytes_reused` taken from copies made ahead ([`apply::Precopies`]).
    pub bytes_copied_ahead: AtomicU64,
    pub files_pulled: AtomicU64,
    pub deleted: AtomicU64,
    pub conflicts: AtomicU64,
}

pub struct Engine {
    ctx: Arc<ServerCtx>,
    me: u64,
    my_id: DeviceId,
    applier: Arc<Applier>,
    db: Arc<Mutex<SyncDb>>,
    /// A connection of its own for `status`: its walk over both indexes (tens of ms at 10k
    /// files) must not hold `db`, which the puller needs for every file it plans and installs.
    status_db: Mutex<Option<SyncDb>>,
    /// A read-only connection for planning: it reads committed state without waiting for the
    /// index lock, which the finisher holds for whole batches.
    plan_db: Arc<Mutex<Option<SyncDb>>>,
    /// The same for the scanner's first look at event paths (see [`Engine::run_scan`]).
    scan_db: Arc<Mutex<Option<SyncDb>>>,
    peers: Mutex<HashMap<DeviceId, PeerSlot>>,
    dialers: Mutex<BTreeSet<DeviceId>>,
    dirty: Mutex<BTreeSet<RelPath>>,
    retry: Mutex<BTreeMap<RelPath, Instant>>,
    pull_wake: Notify,
    /// Wakes the MD5 filler (see [`HashWanted::Sync`]).
    md5_wake: Notify,
    scan_tx: mpsc::UnboundedSender<RelPath>,
    /// Large files the scanner is about to hash (see [`SyncRequest::Changing`]).
    changing_tx: mpsc::UnboundedSender<Vec<RelPath>>,
    seq_tx: watch::Sender<u64>,
    pub stats: Stats,
    last_error: Mutex<Option<(String, String)>>,
    shutdown: watch::Sender<bool>,
    handler: Arc<dyn Handler>,
    rescan_every: Duration,
    busy: AtomicU64,
    /// Scans running (see [`Engine::wait_for_foreground`]).
    scanning: AtomicU64,
    /// Woken whenever the puller finishes a round or a peer's index arrives (see
    /// [`Engine::status_when_synced`]).
    progress: Notify,
    on_applied: Mutex<Option<OnApplied>>,
    /// On-demand mode: files absent here are not pulled in the background, only streamed in
    /// when read ([`Engine::hydrate`]; directories, links, deletions and updates of files
    /// already here still apply).
    on_demand: bool,
    /// Placeholders being streamed in for reads (see [`Engine::hydrate`]).
    hydrations: Mutex<HashMap<RelPath, Arc<Hydration>>>,
    /// The runtime the engine's tasks run on (hydrations are started from mount threads).
    rt: tokio::runtime::Handle,
}

/// Called with every path the applier just changed on disk (installed, deleted, metadata set,
/// or a conflict loser renamed into place), e.g. so a mount drops the kernel's caches of it.
pub type OnApplied = Arc<dyn Fn(&RelPath) + Send + Sync>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these simple maps leaves it usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A path's hash, for sets of paths that may err towards "seen" (see `pull_batch`).
fn path_key(p: &RelPath) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    p.hash(&mut h);
    h.finish()
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| anyhow::anyhow!("worker failed: {e}"))
}

/// One pass of the MD5 filler: up to 256 files, each read without holding the index and recorded
/// only if it did not change meanwhile. Returns how many were filled in.
fn fill_md5s(local: &crate::query::LocalBox, pause: &dyn Fn()) -> anyhow::Result<usize> {
    let todo = local
        .index
        .lock()
        .map_err(|_| anyhow::anyhow!("index lock"))?
        .missing_md5(256)?;
    tracing::debug!("md5 filler: {} files without an MD5", todo.len());
    let mut filled = 0;
    for (path, stat) in todo {
        match crate::hashing::md5_of(&local.dir.root, &path, pause) {
            Ok(Some((md5, now))) if now == stat => {
                let ix = local
                    .index
                    .lock()
                    .map_err(|_| anyhow::anyhow!("index lock"))?;
                if ix.set_md5_if(&path, stat, md5)? {
                    filled += 1;
                }
            }
            // Changed since it was hashed: its rescan hashes it again.
            Ok(_) => tracing::debug!("md5 of {path}: changed since it was hashed"),
            Err(e) => tracing::debug!("md5 of {path}: {e}"),
        }
    }
    Ok(filled)
}

/// Lower the calling thread's CPU priority to nice 19 (best effort; for threads of their own,
/// since a non-root process cannot raise it back).
fn lower_thread_priority() {
    // SAFETY: gettid and setpriority only change this thread's own nice value (on Linux,
    // PRIO_PROCESS with a thread id addresses that one thread).
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19);
    }
}

impl Engine {
    /// Prepare the engine (clear temp leftovers, scan the store, index local blocks), register it
    /// with the server and start its tasks.
    pub async fn start(
        ctx: Arc<ServerCtx>,
        rescan_every: Duration,
    ) -> anyhow::Result<(Arc<Engine>, Option<crate::sync::watch::Watcher>)> {
        Self::start_with(ctx, rescan_every, false).await
    }

    /// [`Engine::start`], optionally in on-demand mode (see [`Engine::fetch_now`]).
    pub async fn start_with(
        ctx: Arc<ServerCtx>,
        rescan_every: Duration,
        on_demand: bool,
    ) -> anyhow::Result<(Arc<Engine>, Option<crate::sync::watch::Watcher>)> {
        raise_fd_limit();
        let b = ctx.local.dir.clone();
        let tmp = b.tmp_dir().join("sync");
        std::fs::create_dir_all(&tmp)?;
        apply::clear_tmp(&tmp);
        let db = Arc::new(Mutex::new(SyncDb::open(&b)?));
        let blocks = Arc::new(crate::sync::store::BlockTable::open(&b)?);
        let me = ctx.local.device;
        // First scan: catches everything that happened while no daemon ran, including a file
        // renamed into place just before a crash (same content as the peer's: a merge, not a
        // conflict).
        {
            let local = ctx.local.clone();
            let blocks = blocks.clone();
            blocking(move || -> anyhow::Result<()> {
                let mut ix = local
                    .index
                    .lock()
                    .map_err(|_| anyhow::anyhow!("index lock"))?;
                let s = scan::scan(&local.dir, &mut ix, me, &RelPath::root(), HashWanted::Sync)?;
                for e in &s.errors {
                    tracing::warn!("scan: {e}");
                }
                let files: Vec<(RelPath, Vec<[u8; 32]>)> = ix
                    .live()?
                    .into_iter()
                    .filter(|r| r.kind == Kind::File && !r.blocks.is_empty())
                    .map(|r| (r.path, r.blocks))
                    .collect();
                drop(ix);
                blocks.rebuild(&files)?;
                Ok(())
            })
            .await??;
        }
        let max_seq = {
            let local = ctx.local.clone();
            blocking(move || {
                local
                    .index
                    .lock()
                    .ok()
                    .and_then(|ix| ix.max_sequence().ok())
            })
            .await?
            .unwrap_or(0)
        };
        let (scan_tx, scan_rx) = mpsc::unbounded_channel();
        let (changing_tx, changing_rx) = mpsc::unbounded_channel();
        let (seq_tx, _) = watch::channel(max_seq);
        let (shutdown, _) = watch::channel(false);
        let own_creates = Arc::new(crate::sync::watch::OwnCreates::default());
        let applier = Arc::new(Applier {
            root: b.root.clone(),
            tmp,
            local: ctx.local.clone(),
            locks: ctx.locks.clone(),
            db: db.clone(),
            blocks,
            own_creates: own_creates.clone(),
            precopies: Default::default(),
        });
        let engine = Arc::new(Engine {
            handler: Arc::new(BoxHandler(ctx.clone())),
            my_id: ctx.ident.id,
            ctx: ctx.clone(),
            me,
            applier,
            db,
            status_db: Mutex::new(None),
            plan_db: Arc::new(Mutex::new(None)),
            scan_db: Arc::new(Mutex::new(None)),
            peers: Mutex::new(HashMap::new()),
            dialers: Mutex::new(BTreeSet::new()),
            dirty: Mutex::new(BTreeSet::new()),
            retry: Mutex::new(BTreeMap::new()),
            pull_wake: Notify::new(),
            md5_wake: Notify::new(),
            scan_tx: scan_tx.clone(),
            changing_tx,
            seq_tx,
            stats: Stats::default(),
            last_error: Mutex::new(None),
            shutdown,
            rescan_every,
            busy: AtomicU64::new(0),
            scanning: AtomicU64::new(0),
            progress: Notify::new(),
            on_applied: Mutex::new(None),
            on_demand,
            hydrations: Mutex::new(HashMap::new()),
            rt: tokio::runtime::Handle::current(),
        });
        if ctx.sync.set(engine.clone()).is_err() {
            anyhow::bail!("a sync engine is already registered");
        }
        let watcher = match crate::sync::watch::start(&b.root, scan_tx, own_creates) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(
                    "cannot watch {}: {e}; relying on rescans every {}s",
                    b.root.display(),
                    rescan_every.as_secs()
                );
                None
            }
        };
        tokio::spawn(engine.clone().scanner(scan_rx));
        tokio::spawn(engine.clone().puller());
        tokio::spawn(engine.clone().md5_filler());
        tokio::spawn(engine.clone().announce_changing(changing_rx));
        tokio::spawn(engine.clone().supervisor());
        // Whatever the stored remote indexes still need (e.g. after a restart).
        for peer in ctx.peers.current() {
            engine.mark_need(peer.to_string()).await;
        }
        Ok((engine, watcher))
    }

    fn stopping(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Stop: tell peers goodbye and let the current file finish (bounded).
    pub async fn stop(&self) {
        let _ = self.shutdown.send(true);
        let conns: Vec<Conn> = lock(&self.peers)
            .values()
            .filter_map(|s| s.conn.clone())
            .collect();
        for c in conns {
            let _ = tokio::time::timeout(
                Duration::from_millis(300),
                c.call(Request::Sync(SyncRequest::Bye)),
            )
            .await;
            c.close();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.busy.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn set_error(&self, msg: String) {
        tracing::warn!("{msg}");
        *lock(&self.last_error) = Some((msg, chrono::Utc::now().to_rfc3339()));
    }

    /// Set the callback told about every path the applier changes (see [`OnApplied`]).
    pub fn set_on_applied(&self, f: OnApplied) {
        *lock(&self.on_applied) = Some(f);
    }

    /// These paths changed locally and their new versions are already in the index (e.g.
    /// committed by the mount): announce them to peers now instead of after the next rescan.
    /// They go through the scanner, which skips paths whose stat key matches their record and
    /// then publishes the new sequence number to the sessions.
    pub fn local_changed(&self, paths: &[RelPath]) {
        for p in paths {
            self.request_scan(p.clone());
        }
        // Already in the index, so the scanner will not report them as changed: plan them
        // against the peers' versions here (see `run_scan`).
        self.mark_dirty(paths.iter().cloned());
        // The mount commits files without their MD5.
        self.md5_wake.notify_one();
    }

    /// The record a pinned peer has for `path` that would be installed here (a file, directory
    /// or link that is live there and absent here): what a mount shows as a placeholder.
    pub fn placeholder(&self, path: &RelPath) -> Option<Record> {
        let remotes = lock(&self.db).remote_records(path).ok()?;
        self.installable(path, remotes)
    }

    fn installable(&self, path: &RelPath, remotes: Vec<(String, Record)>) -> Option<Record> {
        let pinned: BTreeSet<String> = self
            .ctx
            .peers
            .current()
            .iter()
            .map(|p| p.to_string())
            .collect();
        let remotes: Vec<Record> = remotes
            .into_iter()
            .filter(|(peer, r)| pinned.contains(peer) && !r.deleted)
            .map(|(_, r)| r)
            .collect();
        if remotes.is_empty() {
            return None;
        }
        let local = {
            let ix = self.ctx.local.index.lock().ok()?;
            ix.get(path).ok()?.map(|s| s.record)
        };
        if local.as_ref().is_some_and(|l| !l.deleted) {
            return None;
        }
        remotes
            .into_iter()
            .find_map(|r| match planner::plan(local.as_ref(), &r) {
                Action::Install(r) if !r.deleted => Some(r),
                _ => None,
            })
    }

    /// Placeholders directly inside `dir` (see [`Engine::placeholder`]).
    pub fn placeholders_in(&self, dir: &RelPath) -> Vec<Record> {
        let children = match lock(&self.db).remote_children(dir) {
            Ok(c) => c,
            Err(_) => return Vec::new(),
        };
        let mut by_path: BTreeMap<RelPath, Vec<(String, Record)>> = BTreeMap::new();
        for (peer, r) in children {
            by_path.entry(r.path.clone()).or_default().push((peer, r));
        }
        by_path
            .into_iter()
            .filter_map(|(p, rs)| self.installable(&p, rs))
            .collect()
    }

    /// Fetch placeholder `record` now (even in on-demand mode) and wait until it is installed
    /// in the store, at most `timeout`. Fails at once when no peer that has it is connected.
    pub fn fetch_now(self: &Arc<Self>, record: &Record, timeout: Duration) -> anyhow::Result<()> {
        self.hydrate(record)?.wait_installed(timeout)
    }

    /// On-demand mode leaves files that are absent here to [`Engine::hydrate`].
    fn deferred(&self, pl: &Planned) -> bool {
        if !self.on_demand || pl.local.as_ref().is_some_and(|l| !l.deleted) {
            return false;
        }
        match &pl.action {
            Action::Install(r) | Action::Conflict { record: r, .. } => r.kind == Kind::File,
            _ => false,
        }
    }

    fn applied(&self, paths: &[&RelPath]) {
        let Some(f) = lock(&self.on_applied).clone() else {
            return;
        };
        let paths: Vec<RelPath> = paths.iter().map(|p| (*p).clone()).collect();
        // Kernel cache invalidation can wait on the kernel's locks of that inode: never on a
        // runtime worker.
        tokio::task::spawn_blocking(move || {
            for p in &paths {
                f(p);
            }
        });
    }

    fn request_scan(&self, p: RelPath) {
        let _ = self.scan_tx.send(p);
    }

    fn mark_dirty(&self, paths: impl IntoIterator<Item = RelPath>) {
        let mut d = lock(&self.dirty);
        let before = d.len();
        d.extend(paths);
        if d.len() != before {
            drop(d);
            self.pull_wake.notify_one();
        }
    }

    fn retry_later(&self, p: RelPath, after: Duration) {
        lock(&self.retry).insert(p, Instant::now() + after);
        self.pull_wake.notify_one();
    }

    // ---------------------------------------------------------------- scanning

    async fn scanner(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<RelPath>) {
        let mut tick = tokio::time::interval(self.rescan_every.max(Duration::from_millis(200)));
        tick.tick().await; // the start-up scan just ran
        let mut stop = self.shutdown.subscribe();
        loop {
            let mut set = BTreeSet::new();
            tokio::select! {
                p = rx.recv() => match p {
                    Some(p) => { set.insert(p); }
                    None => return,
                },
                _ = tick.tick() => { set.insert(RelPath::root()); }
                _ = stop.changed() => return,
            }
            let deadline = tokio::time::Instant::now() + DEBOUNCE;
            while let Ok(Some(p)) = tokio::time::timeout_at(deadline, rx.recv()).await {
                set.insert(p);
            }
            while let Ok(p) = rx.try_recv() {
                set.insert(p);
            }
            self.run_scan(set).await;
        }
    }

    /// Fill in the MD5 of large files that were announced without it (scans hash for sync
    /// first; files received from a peer that deferred it too), a little after things calm
    /// down, without holding the index while reading.
    async fn md5_filler(self: Arc<Self>) {
        let mut stop = self.shutdown.subscribe();
        self.md5_wake.notify_one(); // whatever a previous run left unfinished
        loop {
            tokio::select! {
                _ = self.md5_wake.notified() => {}
                _ = stop.changed() => return,
            }
            tokio::select! {
                _ = tokio::time::sleep(MD5_DELAY) => {}
                _ = stop.changed() => return,
            }
            let local = self.ctx.local.clone();
            let engine = self.clone();
            let (tx, rx) = tokio::sync::oneshot::channel();
            // A thread of its own at low priority: syncing and serving go first. Nice 19 only
            // yields the CPU; its reads also stand aside while this box pulls or scans (one
            // byte changed in a 1 GiB file, arriving while this read the previous 1 GiB from
            // disk: copy 1.5-1.95 s instead of 0.54-0.72 s).
            let spawned = std::thread::Builder::new()
                .name("md5-filler".into())
                .spawn(move || {
                    lower_thread_priority();
                    let _ = tx.send(fill_md5s(&local, &|| engine.wait_for_foreground()));
                });
            let res = match spawned {
                Ok(_) => rx
                    .await
                    .map_err(|_| anyhow::anyhow!("md5 filler thread failed")),
                Err(e) => Err(anyhow::anyhow!("starting the md5 filler: {e}")),
            };
            match res {
                Ok(Ok(n)) if n > 0 => {
                    tracing::debug!("md5 filled in for {n} files");
                    // There may be more than one batch.
                    self.md5_wake.notify_one();
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) | Err(e) => tracing::warn!("filling in MD5s: {e:#}"),
            }
        }
    }

    /// Blocks the calling (background) thread while the puller or the scanner works, at most
    /// [`YIELD_MAX`] at a time, so background reading always makes some progress.
    fn wait_for_foreground(&self) {
        let deadline = Instant::now() + YIELD_MAX;
        while (self.busy.load(Ordering::Relaxed) > 0
            || self.scanning.load(Ordering::Relaxed) > 0
            || self.applier.precopies.running())
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Tell the connected peers which large files this box is about to hash (each may copy its
    /// own version ahead meanwhile).
    async fn announce_changing(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<Vec<RelPath>>) {
        let mut stop = self.shutdown.subscribe();
        loop {
            let paths = tokio::select! {
                p = rx.recv() => match p {
                    Some(p) => p,
                    None => return,
                },
                _ = stop.changed() => return,
            };
            let conns: Vec<Conn> = lock(&self.peers)
                .values()
                .filter_map(|s| s.conn.clone())
                .collect();
            for conn in conns {
                let req = Request::Sync(SyncRequest::Changing {
                    paths: paths.clone(),
                });
                tokio::spawn(async move {
                    let _ = conn.call(req).await;
                });
            }
        }
    }

    async fn run_scan(&self, paths: BTreeSet<RelPath>) {
        self.scanning.fetch_add(1, Ordering::Relaxed);
        let _scanning = Decrement(&self.scanning);
        let changing = self.changing_tx.clone();
        let local = self.ctx.local.clone();
        let applier = self.applier.clone();
        let me = self.me;
        let scan_db = self.scan_db.clone();
        let res = blocking(move || -> anyhow::Result<(Vec<RelPath>, Option<u64>)> {
            // Most events are about our own applies, already indexed with their stat key: drop
            // those before deciding what to scan, so a burst of received files does not turn
            // into full rescans. The first look is on a read-only connection, without the index
            // lock (the finisher's batches need it; 10,000 installed files meant 10,000 lookups
            // under it); what is left is looked at again under the lock.
            let paths: BTreeSet<RelPath> = {
                let mut reader = lock(&scan_db);
                if reader.is_none() {
                    *reader = SyncDb::open_reader(&local.dir).ok();
                }
                match reader.as_ref() {
                    Some(r) => {
                        let paths: BTreeSet<RelPath> = paths
                            .into_iter()
                            .filter(|p| !unchanged(&local.dir.root, |p| r.local_stored(p), p))
                            .collect();
                        // Large files about to be hashed again: the peers hear of them before
                        // the hashing starts (0.6 s for 1 GiB).
                        let large: Vec<RelPath> = paths
                            .iter()
                            .filter(|p| {
                                r.local_stored(p).ok().flatten().is_some_and(|st| {
                                    let r = &st.record;
                                    r.kind == Kind::File && !r.deleted && r.size >= PRECOPY_MIN
                                })
                            })
                            .cloned()
                            .collect();
                        if !large.is_empty() {
                            let _ = changing.send(large);
                        }
                        paths
                    }
                    None => paths,
                }
            };
            if paths.is_empty() {
                return Ok((Vec::new(), None));
            }
            let mut ix = local
                .index
                .lock()
                .map_err(|_| anyhow::anyhow!("index lock"))?;
            let paths: BTreeSet<RelPath> = paths
                .into_iter()
                .filter(|p| !unchanged(&local.dir.root, |p| ix.get(p), p))
                .collect();
            let roots = reduce_roots(paths);
            let mut changed = Vec::new();
            for r in &roots {
                let s = scan::scan(&local.dir, &mut ix, me, r, HashWanted::Sync)?;
                for e in &s.errors {
                    tracing::debug!("scan: {e}");
                }
                changed.extend(s.changed);
            }
            let mut blocks = Vec::new();
            for p in &changed {
                let b = ix
                    .get(p)?
                    .map(|s| s.record)
                    .filter(|r| r.kind == Kind::File && !r.deleted)
                    .map(|r| r.blocks)
                    .unwrap_or_default();
                blocks.push((p.clone(), b));
            }
            let max = ix.max_sequence()?;
            // Queued before the index lock goes: in order with the applier's own.
            applier.blocks.record(blocks);
            drop(ix);
            Ok((changed, Some(max)))
        })
        .await;
        match res {
            Ok(Ok((changed, max))) => {
                if !changed.is_empty() {
                    tracing::debug!("scan: {} changed", changed.len());
                    self.md5_wake.notify_one();
                    // Plan these paths again against what the peers have: a peer's version
                    // that this box's old version beat (so nothing was done) may now be the one
                    // to take, e.g. it is an edit and the local change was a delete. That peer
                    // waits for this box to pull its edit, and nothing new would arrive from it
                    // to trigger the pull.
                    self.mark_dirty(changed);
                }
                if let Some(max) = max {
                    self.seq_tx.send_if_modified(|v| {
                        let m = *v != max;
                        *v = max;
                        m
                    });
                }
            }
            Ok(Err(e)) | Err(e) => self.set_error(format!("scan failed: {e:#}")),
        }
    }

    // ---------------------------------------------------------------- peers

    /// Keep one dialler per pinned peer.
    async fn supervisor(self: Arc<Self>) {
        let mut stop = self.shutdown.subscribe();
        loop {
            for id in self.ctx.peers.current() {
                if lock(&self.dialers).insert(id) {
                    tokio::spawn(self.clone().dial_loop(id));
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = stop.changed() => return,
            }
        }
    }

    fn connected(&self, id: &DeviceId) -> Option<Conn> {
        lock(&self.peers)
            .get(id)
            .and_then(|s| s.conn.clone())
            .filter(|c| !c.is_closed())
    }

    fn conn_for(&self, peer: &str) -> Option<Conn> {
        let id: DeviceId = peer.parse().ok()?;
        self.connected(&id)
    }

    async fn dial_loop(self: Arc<Self>, id: DeviceId) {
        let mut backoff = BACKOFF_MIN;
        let mut stop = self.shutdown.subscribe();
        loop {
            if self.stopping() {
                return;
            }
            let cfg = match self.ctx.local.dir.load_config() {
                Ok(c) => c,
                Err(_) => {
                    tokio::time::sleep(backoff).await;
                    continue;
                }
            };
            let Some(pc) = cfg.find_peer(&id).cloned() else {
                lock(&self.dialers).remove(&id);
                if let Some(c) = self.connected(&id) {
                    c.close();
                }
                return;
            };
            if let Some(c) = self.connected(&id) {
                backoff = BACKOFF_MIN;
                tokio::select! {
                    _ = c.closed() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.changed() => return,
                }
                continue;
            }
            match crate::net::connect(&self.ctx.ident, &pc.addr, id, self.handler.clone()).await {
                Ok((conn, _task)) => {
                    tracing::info!("connected to {} at {}", id.short_str(), pc.addr);
                    backoff = BACKOFF_MIN;
                    self.adopt(conn, true);
                }
                Err(e) => {
                    let msg = format!("{e:#}");
                    tracing::debug!("dial {}: {msg}", id.short_str());
                    lock(&self.peers).entry(id).or_default().last_error = Some(msg);
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.changed() => return,
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    /// Accepted connections are adopted only once they make a sync request (a CLI query uses the
    /// same identity but never syncs).
    pub fn on_incoming(&self, _conn: Conn) {}

    fn is_current(&self, conn: &Conn) -> bool {
        lock(&self.peers)
            .get(&conn.peer().id)
            .and_then(|s| s.conn.as_ref())
            .is_some_and(|c| same_conn(c, conn))
    }

    /// Make `conn` the connection to its peer, unless a better one exists. When both boxes dial
    /// each other at once, both keep the connection dialled by the lower device ID.
    fn adopt(self: &Arc<Self>, conn: Conn, dialled_by_me: bool) {
        if self.stopping() {
            conn.close();
            return;
        }
        let id = conn.peer().id;
        let prefer_mine = self.my_id < id;
        let mut peers = lock(&self.peers);
        let slot = peers.entry(id).or_default();
        if let Some(old) = slot.conn.as_ref().filter(|c| !c.is_closed()) {
            if same_conn(old, &conn) {
                return;
            }
            if slot.dialled_by_me == prefer_mine || dialled_by_me != prefer_mine {
                drop(peers);
                tokio::spawn(say_bye(conn));
                return;
            }
            tokio::spawn(say_bye(old.clone()));
        }
        slot.conn = Some(conn.clone());
        slot.dialled_by_me = dialled_by_me;
        slot.last_error = None;
        slot.connected_since = Some(SystemTime::now());
        slot.index_received = false;
        let hint = slot.hint.clone();
        drop(peers);
        tracing::info!("syncing with {} ({})", id.short_str(), conn.peer().addr);
        tokio::spawn(self.clone().session(id, conn, hint));
    }

    /// At least one peer connected, and the whole index of every connected peer received.
    fn peers_indexes_received(&self) -> bool {
        let peers = lock(&self.peers);
        let mut live = peers
            .values()
            .filter(|s| s.conn.as_ref().is_some_and(|c| !c.is_closed()))
            .peekable();
        live.peek().is_some() && live.all(|s| s.index_received)
    }

    /// Wait (at most `max`) until the puller has nothing in hand or queued and every connected
    /// peer's index is in (more to pull may still be on its way).
    /// Returns early once `seq` is `ANNOUNCE_BACKLOG_MAX` records past `announced`.
    async fn until_pulled(&self, max: Duration, seq: &mut watch::Receiver<u64>, announced: u64) {
        let deadline = tokio::time::Instant::now() + max;
        loop {
            let progress = self.progress.notified();
            tokio::pin!(progress);
            progress.as_mut().enable();
            let idle = self.busy.load(Ordering::Relaxed) == 0
                && lock(&self.dirty).is_empty()
                && self.peers_indexes_received();
            if idle || seq.borrow().saturating_sub(announced) >= ANNOUNCE_BACKLOG_MAX {
                return;
            }
            tokio::select! {
                _ = progress => {}
                r = seq.changed() => if r.is_err() { return },
                _ = tokio::time::sleep_until(deadline) => return,
            }
        }
    }

    async fn session(self: Arc<Self>, id: DeviceId, conn: Conn, hint: Arc<Notify>) {
        let peer = id.to_string();
        self.mark_need(peer.clone()).await;
        // Tell the peer whenever our index advances.
        let pusher = {
            let conn = conn.clone();
            let me = self.clone();
            let mut rx = self.seq_tx.subscribe();
            tokio::spawn(async move {
                loop {
                    let max_seq = *rx.borrow_and_update();
                    let r = conn
                        .call(Request::Sync(SyncRequest::IndexChanged { max_seq }))
                        .await;
                    if let Err(RpcError::Closed) = r {
                        return;
                    }
                    if rx.changed().await.is_err() {
                        return;
                    }
                    me.until_pulled(ANNOUNCE_DEFER_MAX, &mut rx, max_seq).await;
                }
            })
        };
        loop {
            if conn.is_closed() || self.stopping() {
                break;
            }
            if let Err(e) = self.pull_index(&peer, &conn).await {
                if conn.is_closed() {
                    break;
                }
                let msg = format!("index from {}: {e:#}", id.short_str());
                tracing::warn!("{msg}");
                lock(&self.peers).entry(id).or_default().last_error = Some(msg);
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            if let Some(slot) = lock(&self.peers).get_mut(&id) {
                if slot.conn.as_ref().is_some_and(|c| same_conn(c, &conn)) {
                    slot.index_received = true;
                }
            }
            self.progress.notify_waiters();
            tokio::select! {
                _ = hint.notified() => {}
                _ = conn.closed() => break,
                _ = tokio::time::sleep(PING_EVERY) => {
                    let ok = matches!(
                        tokio::time::timeout(Duration::from_secs(10), conn.call(Request::Ping)).await,
                        Ok(Ok(Response::Pong))
                    );
                    if !ok {
                        tracing::info!("peer {} stopped answering pings", id.short_str());
                        conn.close();
                        break;
                    }
                }
            }
        }
        pusher.abort();
        let mut peers = lock(&self.peers);
        if let Some(slot) = peers.get_mut(&id) {
            if slot.conn.as_ref().is_some_and(|c| same_conn(c, &conn)) {
                slot.conn = None;
                slot.connected_since = None;
                tracing::info!("disconnected from {}", id.short_str());
            }
        }
    }

    /// Ask the peer for everything after our cursor and store it.
    async fn pull_index(&self, peer: &str, conn: &Conn) -> anyhow::Result<()> {
        let since = {
            let db = self.db.clone();
            let p = peer.to_string();
            blocking(move || lock(&db).remote_seq(&p)).await??
        };
        let mut s = conn
            .request(Request::Sync(SyncRequest::IndexSince { since }))
            .await?;
        let mut total = 0usize;
        while let Some(r) = s.next().await? {
            match r {
                Response::Records(recs) => {
                    let page: Vec<RelPath> = recs.iter().map(|r| r.path.clone()).collect();
                    let db = self.db.clone();
                    let p = peer.to_string();
                    blocking(move || lock(&db).store_remote(&p, &recs)).await??;
                    // Pulling starts with the first page, not after the whole index arrived.
                    total += page.len();
                    self.mark_dirty(page);
                }
                Response::Sync(SyncResponse::IndexEnd {
                    last_sent,
                    current_max,
                }) => {
                    let db = self.db.clone();
                    let p = peer.to_string();
                    if current_max < since {
                        // The peer's index was recreated: its sequence numbers start over.
                        tracing::warn!("peer {peer} restarted its index; fetching it whole");
                        blocking(move || lock(&db).reset_remote(&p)).await??;
                    } else {
                        blocking(move || lock(&db).set_remote_seq(&p, last_sent)).await??;
                    }
                }
                other => anyhow::bail!("unexpected answer to index-since: {other:?}"),
            }
        }
        if total > 0 {
            tracing::debug!("{total} records from {}", &peer[..7.min(peer.len())]);
        }
        Ok(())
    }

    /// Queue every path where the stored index of `peer` has something we lack.
    async fn mark_need(&self, peer: String) {
        let db = self.db.clone();
        // Streamed, and local records without their block lists: at 100k files loading both
        // indexes whole cost more memory than the rest of the daemon.
        let res = blocking(move || -> anyhow::Result<Vec<RelPath>> {
            let db = lock(&db);
            // Both indexes walked together in path order: only the answer is held (a map of
            // the local index first cost the sender of 100,000 files 30 MB at each connect).
            let mut out = Vec::new();
            db.merge_with_remote(&peer, |mine, theirs| {
                let Some(r) = theirs else { return };
                let newer = mine.is_none_or(|l| {
                    matches!(
                        r.version.compare(&l.version),
                        VvOrder::Greater | VvOrder::Concurrent
                    )
                });
                if newer {
                    out.push(r.path);
                }
            })?;
            Ok(out)
        })
        .await;
        match res {
            Ok(Ok(paths)) => self.mark_dirty(paths),
            Ok(Err(e)) | Err(e) => self.set_error(format!("reading stored index: {e:#}")),
        }
    }

    // ---------------------------------------------------------------- serving

    pub async fn serve(self: &Arc<Self>, conn: &Conn, req: SyncRequest, out: Responder) -> String {
        match req {
            SyncRequest::IndexSince { since } => {
                if !self.is_current(conn) {
                    self.adopt(conn.clone(), false);
                }
                self.serve_index(since, out).await
            }
            SyncRequest::Changing { paths } => {
                // On demand, a file absent here is streamed when read, not built ahead.
                if !self.on_demand {
                    // Slots taken here, before the answer, so the peer's announcement that
                    // follows finds them (a build waits for its copy) however late the copies
                    // start.
                    let paths: Vec<RelPath> = paths
                        .into_iter()
                        .take(PRECOPY_PATHS_MAX)
                        .filter(|p| self.applier.precopies.reserve(p))
                        .collect();
                    let applier = self.applier.clone();
                    tokio::spawn(async move {
                        let a = applier.clone();
                        let made = blocking(move || {
                            paths.iter().filter(|p| a.precopy_reserved(p)).count()
                        })
                        .await;
                        if matches!(made, Ok(n) if n > 0) {
                            tokio::time::sleep(PRECOPY_TTL + Duration::from_secs(1)).await;
                            applier.precopies.expire();
                        }
                    });
                }
                let _ = out.end(Response::Sync(SyncResponse::Ack)).await;
                "ok".into()
            }
            SyncRequest::IndexChanged { .. } => {
                if !self.is_current(conn) {
                    self.adopt(conn.clone(), false);
                }
                if let Some(s) = lock(&self.peers).get(&conn.peer().id) {
                    s.hint.notify_one();
                }
                let _ = out.end(Response::Sync(SyncResponse::Ack)).await;
                "ok".into()
            }
            SyncRequest::GetBlocks {
                path,
                first,
                hashes,
            } => self.serve_blocks(path, first, hashes, true, out).await,
            SyncRequest::GetIndexedBlocks {
                path,
                first,
                hashes,
            } => self.serve_blocks(path, first, hashes, false, out).await,
            SyncRequest::GetBatch { runs } => self.serve_batch(runs, out).await,
            SyncRequest::Bye => {
                let _ = out.end(Response::Sync(SyncResponse::Ack)).await;
                if self.is_current(conn) {
                    tracing::info!("peer {} said goodbye", conn.peer().id.short_str());
                }
                conn.close();
                "ok".into()
            }
        }
    }

    async fn serve_index(&self, since: u64, mut out: Responder) -> String {
        let mut cursor = since;
        let mut sent = 0usize;
        loop {
            let local = self.ctx.local.clone();
            let c = cursor;
            let recs = match blocking(move || {
                local
                    .index
                    .lock()
                    .map_err(|_| anyhow::anyhow!("index lock"))
                    .and_then(|ix| ix.since(c, proto::RECORDS_PER_FRAME))
            })
            .await
            {
                Ok(Ok(r)) => r,
                Ok(Err(e)) | Err(e) => {
                    let _ = out.error(ErrorCode::Internal, format!("{e:#}")).await;
                    return "failed".into();
                }
            };
            let Some(last) = recs.last() else { break };
            cursor = last.sequence;
            sent += recs.len();
            for page in proto::pages(recs) {
                if out.send(Response::Records(page)).await.is_err() {
                    return "cancelled".into();
                }
            }
        }
        let local = self.ctx.local.clone();
        let current_max = blocking(move || {
            local
                .index
                .lock()
                .ok()
                .and_then(|ix| ix.max_sequence().ok())
        })
        .await
        .ok()
        .flatten()
        .unwrap_or(cursor);
        let _ = out
            .end(Response::Sync(SyncResponse::IndexEnd {
                last_sent: cursor,
                current_max: current_max.max(cursor),
            }))
            .await;
        format!("ok, {sent} records")
    }

    async fn serve_blocks(
        &self,
        path: RelPath,
        first: u64,
        hashes: Vec<[u8; 32]>,
        checked: bool,
        mut out: Responder,
    ) -> String {
        if hashes.is_empty() || hashes.len() > proto::MAX_BLOCKS_PER_REQUEST {
            let _ = out
                .error(
                    ErrorCode::BadRequest,
                    format!(
                        "between 1 and {} blocks per request",
                        proto::MAX_BLOCKS_PER_REQUEST
                    ),
                )
                .await;
            return "bad request".into();
        }
        let root = self.ctx.local.dir.root.clone();
        let locks = self.ctx.locks.clone();
        let local = self.ctx.local.clone();
        let p = path.clone();
        let corrupt = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let corrupt2 = corrupt.clone();
        let res = blocking(move || -> Result<Vec<Vec<u8>>, (ErrorCode, String)> {
            let _g = locks
                .lock(&p, crate::locks::Mode::Shared, LOCK_WAIT)
                .ok_or_else(|| (ErrorCode::Busy, format!("{p}: being written")))?;
            let f = crate::paths::open_beneath(&root, &p).map_err(|e| match e {
                e if crate::paths::is_through_symlink(&e) => (ErrorCode::BadPath, e.to_string()),
                e => (ErrorCode::NotFound, format!("{p}: {e}")),
            })?;
            let md = f.metadata().map_err(|e| (ErrorCode::Io, e.to_string()))?;
            if !md.is_file() {
                return Err((ErrorCode::NotAFile, format!("{p}: not a regular file")));
            }
            // Unchanged since it was hashed and asked for exactly the recorded blocks: the
            // receiver's own check stands in for ours (see `SyncRequest::GetIndexedBlocks`).
            let trusted = !checked && {
                let st = local
                    .index
                    .lock()
                    .ok()
                    .and_then(|ix| ix.get(&p).ok().flatten());
                st.is_some_and(|s| {
                    !s.record.deleted
                        && s.stat == Some(crate::hashing::StatKey::of(&md))
                        && usize::try_from(first)
                            .ok()
                            .and_then(|f| s.record.blocks.get(f..f.checked_add(hashes.len())?))
                            == Some(&hashes[..])
                })
            };
            let mut out = Vec::with_capacity(hashes.len());
            for (k, h) in hashes.iter().enumerate() {
                let block = if trusted {
                    read_raw_block(&f, first + k as u64, md.len()).map(Some)
                } else {
                    apply::read_block(&f, first + k as u64, md.len(), h)
                };
                match block {
                    Ok(Some(b)) => out.push(b),
                    Ok(None) => {
                        // Same stat key as when it was hashed, different bytes: the disk
                        // changed under the file system's back. Never served, and said loudly.
                        let recorded = local
                            .index
                            .lock()
                            .ok()
                            .and_then(|ix| ix.get(&p).ok().flatten())
                            .and_then(|s| s.stat);
                        if recorded == Some(crate::hashing::StatKey::of(&md)) {
                            corrupt2.store(true, Ordering::Relaxed);
                            return Err((
                                ErrorCode::Changed,
                                format!(
                                    "{p}: block {} on disk does not match its recorded hash \
                                     (silent corruption?); not served",
                                    first + k as u64
                                ),
                            ));
                        }
                        return Err((
                            ErrorCode::Changed,
                            format!("{p}: changed since it was announced"),
                        ));
                    }
                    Err(e) => return Err((ErrorCode::Changed, format!("{p}: {e}"))),
                }
            }
            Ok(out)
        })
        .await;
        match res {
            Ok(Ok(blocks)) => {
                let n = blocks.len();
                for b in blocks {
                    if out.send(Response::Data(b.into())).await.is_err() {
                        return "cancelled".into();
                    }
                }
                let _ = out.end(Response::Done).await;
                format!("ok, {n} blocks")
            }
            Ok(Err((code, msg))) => {
                if corrupt.load(Ordering::Relaxed) {
                    tracing::error!("{msg}");
                    self.set_error(msg.clone());
                }
                let _ = out.error(code, msg.clone()).await;
                msg
            }
            Err(e) => {
                let _ = out.error(ErrorCode::Internal, e.to_string()).await;
                "failed".into()
            }
        }
    }

    /// Answer a `GetBatch`: one blocking task reads the runs in order (each file opened once,
    /// through `open_beneath`, every block checked against its hash as `GetBlocks` does) and
    /// hands answer frames of about [`proto::BATCH_FRAME_BYTES`] to this task, which sends them;
    /// the channel of one frame bounds what is held in memory however big the batch.
    async fn serve_batch(&self, runs: Vec<proto::BlockRun>, mut out: Responder) -> String {
        let blocks: usize = runs.iter().map(|r| r.hashes.len()).sum();
        let bad_run = runs
            .iter()
            .any(|r| r.hashes.is_empty() || r.hashes.len() > proto::MAX_BLOCKS_PER_REQUEST);
        if runs.is_empty()
            || runs.len() > proto::MAX_RUNS_PER_BATCH
            || blocks > proto::MAX_BLOCKS_PER_BATCH
            || bad_run
        {
            let _ = out
                .error(
                    ErrorCode::BadRequest,
                    format!(
                        "between 1 and {} runs of 1 to {} blocks, at most {} blocks in all",
                        proto::MAX_RUNS_PER_BATCH,
                        proto::MAX_BLOCKS_PER_REQUEST,
                        proto::MAX_BLOCKS_PER_BATCH
                    ),
                )
                .await;
            return "bad request".into();
        }
        let n = runs.len();
        let root = self.ctx.local.dir.root.clone();
        let locks = self.ctx.locks.clone();
        let local = self.ctx.local.clone();
        let (tx, mut rx) = mpsc::channel::<Vec<proto::RunAnswer>>(1);
        let reader = tokio::task::spawn_blocking(move || -> Vec<String> {
            // What the index holds for the batch's files, read under one lock: a file still as
            // indexed is served without hashing it again (the asker checks every block anyway
            // and asks for a mismatched file again, then with `GetBlocks`, which hashes here).
            let known: HashMap<RelPath, crate::index::Stored> = match local.index.lock() {
                Ok(ix) => {
                    // One read transaction (rolled back when dropped): SQLite takes its locks
                    // once for the batch, not once per lookup.
                    let tx = ix.conn().unchecked_transaction().ok();
                    let known = runs
                        .iter()
                        .filter_map(|r| Some((r.path.clone(), ix.get(&r.path).ok().flatten()?)))
                        .collect();
                    drop(tx);
                    known
                }
                Err(_) => HashMap::new(),
            };
            let mut corrupt = Vec::new();
            let mut frame = Vec::new();
            let mut bytes = 0usize;
            // The root opened once for the batch's files.
            let root_dir = crate::paths::RootDir::open(&root);
            for run in runs {
                let answer = match &root_dir {
                    Ok(dir) => read_run(dir, &locks, &local, known.get(&run.path), &run),
                    Err(e) => Err(run_err(ErrorCode::Io, format!("opening the store: {e}"))),
                };
                let answer = match answer {
                    Ok(blocks) => {
                        bytes += blocks.iter().map(|b| b.len()).sum::<usize>();
                        proto::RunAnswer::Blocks(blocks.into_iter().map(Chunk::from).collect())
                    }
                    Err(RunError {
                        code,
                        message,
                        corrupt: c,
                    }) => {
                        if c {
                            corrupt.push(message.clone());
                        }
                        proto::RunAnswer::Failed { code, message }
                    }
                };
                frame.push(answer);
                if bytes >= proto::BATCH_FRAME_BYTES {
                    bytes = 0;
                    if tx.blocking_send(std::mem::take(&mut frame)).is_err() {
                        return corrupt;
                    }
                }
            }
            if !frame.is_empty() {
                let _ = tx.blocking_send(frame);
            }
            corrupt
        });
        let mut cancelled = false;
        while let Some(frame) = rx.recv().await {
            if out
                .send(Response::Sync(SyncResponse::Runs(frame)))
                .await
                .is_err()
            {
                // Dropping the receiver stops the reader at its next frame.
                cancelled = true;
                break;
            }
        }
        drop(rx);
        match reader.await {
            Ok(corrupt) => {
                for msg in corrupt {
                    tracing::error!("{msg}");
                    self.set_error(msg);
                }
            }
            Err(e) => {
                let _ = out.error(ErrorCode::Internal, e.to_string()).await;
                return "failed".into();
            }
        }
        if cancelled {
            return "cancelled".into();
        }
        let _ = out.end(Response::Done).await;
        format!("ok, {n} runs")
    }

    // ---------------------------------------------------------------- pulling

    async fn puller(self: Arc<Self>) {
        let mut stop = self.shutdown.subscribe();
        loop {
            let next_retry = lock(&self.retry).values().min().copied();
            let sleep_until = next_retry
                .map(tokio::time::Instant::from_std)
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                _ = self.pull_wake.notified() => {}
                _ = tokio::time::sleep_until(sleep_until) => {}
                _ = stop.changed() => return,
            }
            let mut paths: BTreeSet<RelPath> = std::mem::take(&mut *lock(&self.dirty));
            {
                let now = Instant::now();
                let mut r = lock(&self.retry);
                let due: Vec<RelPath> = r
                    .iter()
                    .filter(|(_, t)| **t <= now)
                    .map(|(p, _)| p.clone())
                    .collect();
                for p in due {
                    r.remove(&p);
                    paths.insert(p);
                }
            }
            if paths.is_empty() {
                continue;
            }
            self.busy.fetch_add(1, Ordering::Relaxed);
            self.pull_batch(paths).await;
            self.busy.fetch_sub(1, Ordering::Relaxed);
            self.progress.notify_waiters();
            self.md5_wake.notify_one();
            let local = self.ctx.local.clone();
            if let Ok(Some(max)) = blocking(move || {
                local
                    .index
                    .lock()
                    .ok()
                    .and_then(|ix| ix.max_sequence().ok())
            })
            .await
            {
                self.seq_tx.send_if_modified(|v| {
                    let m = *v != max;
                    *v = max;
                    m
                });
            }
        }
    }

    async fn plan_paths(&self, paths: BTreeSet<RelPath>) -> anyhow::Result<Vec<Planned>> {
        let local = self.ctx.local.clone();
        let db = self.db.clone();
        let pinned: BTreeSet<String> = self
            .ctx
            .peers
            .current()
            .iter()
            .map(|p| p.to_string())
            .collect();
        let stop = self.shutdown.subscribe();
        let plan_db = self.plan_db.clone();
        blocking(move || -> anyhow::Result<Vec<Planned>> {
            let ignore = IgnoreRules::load(&local.dir);
            // The pinned peers' records of a path, unless none or the path is ignored here.
            let wanted_remotes = |remotes: Vec<(String, Record)>, p: &RelPath| {
                let remotes: Vec<(String, Record)> = remotes
                    .into_iter()
                    .filter(|(peer, _)| pinned.contains(peer))
                    .collect();
                if remotes.is_empty() || ignore.is_ignored(p, remotes[0].1.kind == Kind::Dir) {
                    None
                } else {
                    Some(remotes)
                }
            };
            let mut out = Vec::new();
            let paths: Vec<RelPath> = paths.into_iter().collect();
            // Planning reads committed state on a connection of its own: through the engine's
            // (behind the index lock, which the finisher holds for whole batches), it queued
            // path by path and a chunk took 100+ ms while the fetch pipeline ran dry. The plan
            // carries the local record it saw; the apply checks it is still current.
            let mut reader = lock(&plan_db);
            if reader.is_none() {
                *reader = SyncDb::open_reader(&local.dir).ok();
            }
            for slice in paths.chunks(PLAN_LOCK_SLICE) {
                if *stop.borrow() {
                    // Shutting down: the rest is planned again on the next start.
                    break;
                }
                let mut wanted = Vec::with_capacity(slice.len());
                let mut locals = Vec::with_capacity(slice.len());
                match reader.as_ref() {
                    Some(r) => {
                        for p in slice {
                            let remotes = wanted_remotes(r.remote_records(p)?, p);
                            if let Some(remotes) = remotes {
                                locals.push(r.local_record(p)?);
                                wanted.push((p, remotes));
                            }
                        }
                    }
                    None => {
                        // No second connection (an in-memory index): the shared ones.
                        let db = lock(&db);
                        for p in slice {
                            if let Some(remotes) = wanted_remotes(db.remote_records(p)?, p) {
                                wanted.push((p, remotes));
                            }
                        }
                        drop(db);
                        let ix = local
                            .index
                            .lock()
                            .map_err(|_| anyhow::anyhow!("index lock"))?;
                        for (p, _) in &wanted {
                            locals.push(ix.get(p)?.map(|s| s.record));
                        }
                    }
                }
                for ((p, remotes), l) in wanted.into_iter().zip(locals) {
                    let multi = remotes.len() > 1;
                    for (peer, r) in remotes {
                        let a = planner::plan(l.as_ref(), &r);
                        if a != Action::Nothing {
                            out.push(Planned {
                                path: p.clone(),
                                peer,
                                local: l.clone(),
                                action: a,
                                multi,
                            });
                            break;
                        }
                    }
                }
            }
            Ok(out)
        })
        .await?
    }

    async fn pull_batch(self: &Arc<Self>, paths: BTreeSet<RelPath>) {
        // Planned and started a chunk at a time (plans carry whole records: 100k of them at once
        // was most of the daemon's memory). Order within a chunk: index-only updates,
        // directories and links (parents first), then files in parallel; deletions (children
        // first) wait until every file is in place, so a renamed file can still copy its blocks
        // from the old path.
        let sem = Arc::new(tokio::sync::Semaphore::new(PULL_SLOTS as usize));
        let (fin_tx, fin_rx) = mpsc::channel::<Vec<Fetched>>(FINISH_QUEUE);
        let finisher = tokio::spawn(self.clone().finisher(fin_rx));
        let mut deletes = Vec::new();
        // Paths of this pass, hashed: paths marked dirty while it runs join it (the next
        // pages of a peer's index, local changes), except those it has already taken, which
        // may still be in flight and wait for the next pass. A collision only defers a path.
        let mut taken: HashSet<u64> = paths.iter().map(path_key).collect();
        let mut rest: VecDeque<RelPath> = paths.into_iter().collect();
        let mut chunks_planned = 0usize;
        // The next chunk is planned while this one is fetched (planning is a few SQLite reads
        // per path, and the chunks' paths are disjoint). The first chunk is small, so the
        // first fetches start after planning a few paths rather than a thousand.
        let mut plan_next = |rest: &mut VecDeque<RelPath>| {
            if rest.is_empty() {
                lock(&self.dirty).retain(|p| {
                    let joins = taken.insert(path_key(p));
                    if joins {
                        rest.push_back(p.clone());
                    }
                    !joins
                });
            }
            if rest.is_empty() {
                return None;
            }
            let size = if chunks_planned == 0 {
                FIRST_PLAN_CHUNK
            } else {
                PLAN_CHUNK
            };
            chunks_planned += 1;
            let chunk: BTreeSet<RelPath> = rest.drain(..size.min(rest.len())).collect();
            let me = self.clone();
            let paths = chunk.clone();
            Some((
                chunk,
                tokio::spawn(async move { me.plan_paths(paths).await }),
            ))
        };
        let mut next = plan_next(&mut rest);
        while let Some((chunk, planning)) = next.take() {
            next = plan_next(&mut rest);
            let plans = match planning.await {
                Ok(plans) => plans,
                Err(e) => Err(anyhow::anyhow!("planning task: {e}")),
            };
            let plans = match plans {
                Ok(mut p) => {
                    // Files left to the mount are new placeholders there: tell it (directory
                    // listings the kernel cached must show them at once).
                    let deferred: Vec<RelPath> = p
                        .iter()
                        .filter(|pl| self.deferred(pl))
                        .map(|pl| pl.path.clone())
                        .collect();
                    if !deferred.is_empty() {
                        self.applied(&deferred.iter().collect::<Vec<_>>());
                    }
                    p.retain(|pl| !self.deferred(pl));
                    p
                }
                Err(e) => {
                    self.set_error(format!("planning: {e:#}"));
                    for p in chunk {
                        self.retry_later(p, Duration::from_secs(2));
                    }
                    continue;
                }
            };
            let mut dirs = Vec::new();
            let mut files = Vec::new();
            for pl in plans {
                match &pl.action {
                    Action::Delete(_) => deletes.push(pl),
                    Action::Install(r) | Action::Conflict { record: r, .. }
                        if r.kind == Kind::Dir =>
                    {
                        dirs.push(pl)
                    }
                    // Links go in before the chunk's files too: a file below a link the same
                    // chunk makes (`esc`, `esc/f`) would otherwise race it, its parents made as
                    // a directory where the link belongs.
                    Action::Install(r) | Action::Conflict { record: r, .. }
                        if r.kind == Kind::Symlink =>
                    {
                        dirs.push(pl)
                    }
                    Action::Record(_) | Action::Rescan => dirs.push(pl),
                    _ => files.push(pl),
                }
            }
            // Plain directory installs of the chunk in one blocking call (a tree of a few
            // hundred directories was as many thread-pool hops, one after the other); the rest
            // one at a time, in the same (parents-first) order.
            let mut plain_dirs = Vec::new();
            for pl in dirs {
                match &pl.action {
                    Action::Install(r) if r.kind == Kind::Dir && !self.stopping() => {
                        plain_dirs.push(pl)
                    }
                    _ => {
                        self.install_dirs(std::mem::take(&mut plain_dirs)).await;
                        self.execute(pl).await;
                    }
                }
            }
            self.install_dirs(plain_dirs).await;
            // Small new files go many per request (grouped by the peer that has them); the
            // rest one task each.
            let mut groups: BTreeMap<String, (Vec<Planned>, u64)> = BTreeMap::new();
            let mut singles = Vec::new();
            for pl in files {
                match &pl.action {
                    Action::Install(r) if r.kind == Kind::File && r.size <= GROUP_MAX_FILE => {
                        let size = r.size;
                        let g = groups.entry(pl.peer.clone()).or_default();
                        g.0.push(pl);
                        g.1 += size;
                        if g.0.len() >= GROUP_FILES || g.1 >= GROUP_BYTES {
                            let (group, _) = std::mem::take(g);
                            if !self.start_group(group, &sem, &fin_tx).await {
                                break;
                            }
                        }
                    }
                    _ => singles.push(pl),
                }
            }
            for (_, (group, _)) in groups {
                if !group.is_empty() && !self.start_group(group, &sem, &fin_tx).await {
                    break;
                }
            }
            // Detached tasks bounded by the semaphore, not a JoinSet: a JoinSet keeps every
            // finished task's allocation until it is joined.
            for pl in singles {
                let size = match &pl.action {
                    Action::Install(r) | Action::Conflict { record: r, .. } => r.size,
                    _ => 0,
                };
                let slots = (size / (256 * 1024)).clamp(1, BIG_FILE_SLOTS as u64) as u32;
                let Ok(permit) = sem.clone().acquire_many_owned(slots).await else {
                    break;
                };
                let me = self.clone();
                let batched = matches!(&pl.action,
                    Action::Install(r) if r.kind == Kind::File && r.size <= BATCH_MAX_FILE);
                let fin = fin_tx.clone();
                tokio::spawn(async move {
                    if batched {
                        me.execute_batched(pl, &fin).await;
                    } else {
                        me.execute(pl).await;
                    }
                    drop(permit);
                });
            }
        }
        drop(fin_tx);
        // Every slot back means every file task has finished; the finisher ends with the last one.
        let _ = sem.acquire_many(PULL_SLOTS).await;
        let _ = finisher.await;
        deletes.sort_by(|a, b| b.path.cmp(&a.path));
        for pl in deletes {
            self.execute(pl).await;
        }
    }

    /// Install planned directories (plain installs, parents first) in one blocking call.
    async fn install_dirs(self: &Arc<Self>, dirs: Vec<Planned>) {
        if dirs.is_empty() {
            return;
        }
        let metas: Vec<(RelPath, bool)> =
            dirs.iter().map(|pl| (pl.path.clone(), pl.multi)).collect();
        let ap = self.applier.clone();
        let mut recs = Vec::with_capacity(dirs.len());
        for pl in dirs {
            match pl.action {
                Action::Install(r) => recs.push((r, pl.local)),
                _ => {
                    let err = ApplyError::Other(format!("{}: not a directory install", pl.path));
                    self.settle(pl.path, pl.multi, None, Err(err));
                }
            }
        }
        let res = blocking(move || ap.install_dirs(recs)).await;
        match res {
            Ok(results) => {
                let multi: HashMap<RelPath, bool> = metas.into_iter().collect();
                for (path, r) in results {
                    let m = multi.get(&path).copied().unwrap_or(false);
                    self.settle(path, m, None, r);
                }
            }
            Err(e) => {
                for (path, multi) in metas {
                    let err = ApplyError::Other(format!("{path}: {e:#}"));
                    self.settle(path, multi, None, Err(err));
                }
            }
        }
    }

    /// Start fetching a group of small files in a task of its own (bounded by the pull slots);
    /// false when the slots are gone (shutting down).
    async fn start_group(
        self: &Arc<Self>,
        group: Vec<Planned>,
        sem: &Arc<tokio::sync::Semaphore>,
        fin: &mpsc::Sender<Vec<Fetched>>,
    ) -> bool {
        let Ok(permit) = sem.clone().acquire_many_owned(GROUP_SLOTS).await else {
            return false;
        };
        let me = self.clone();
        let fin = fin.clone();
        tokio::spawn(async move {
            me.fetch_group(group, &fin).await;
            drop(permit);
        });
        true
    }

    /// Fetch the missing blocks of a batch file again with `GetBlocks` (the sender hashes every
    /// block), write and seal it: after a block of it failed its check.
    async fn refetch_checked(
        &self,
        peer: &str,
        mut f: Fetched,
        first_error: ApplyError,
    ) -> Result<(Fetched, u64), (RelPath, bool, ApplyError)> {
        tracing::warn!("{first_error}; asking again with the sender checking every block");
        let (path, multi) = (f.pl.path.clone(), f.pl.multi);
        let Some(conn) = self.conn_for(peer) else {
            return Err((path.clone(), multi, ApplyError::Unavailable(path)));
        };
        let mut fetched = Vec::new();
        for run in runs(&f.building.missing, proto::MAX_BLOCKS_PER_REQUEST) {
            let hashes = run
                .iter()
                .map(|i| f.building.rec.blocks[*i as usize])
                .collect();
            let rec_path = f.building.rec.path.clone();
            match fetch_run_checked(conn.clone(), rec_path, run[0], hashes).await {
                Ok((first, blocks)) => fetched.push((first, blocks)),
                Err(e) => return Err((path, multi, e)),
            }
        }
        let ap = self.applier.clone();
        let done = blocking(move || {
            let res = (|| {
                let mut n = 0;
                for (first, blocks) in &fetched {
                    n += write_blocks(&f.building, *first, blocks)?;
                }
                ap.seal(&mut f.building)?;
                Ok(n)
            })();
            (f, res)
        })
        .await;
        match done {
            Ok((f, Ok(n))) => Ok((f, n)),
            Ok((_, Err(e))) => Err((path, multi, e)),
            Err(e) => Err((
                path.clone(),
                multi,
                ApplyError::Other(format!("{path}: {e:#}")),
            )),
        }
    }

    /// Fetch a group of small new files from one peer and hand them to the finisher: one
    /// blocking call builds every temp file from local blocks, one `GetBatch` (or a few) brings
    /// all the missing blocks, one blocking call checks and writes them. Per file that replaces
    /// a task, an RPC with its frames and wake-ups, and three thread-pool hops.
    async fn fetch_group(self: &Arc<Self>, group: Vec<Planned>, fin: &mpsc::Sender<Vec<Fetched>>) {
        if self.stopping() {
            return;
        }
        let Some(peer) = group.first().map(|pl| pl.peer.clone()) else {
            return;
        };
        let metas: Vec<(RelPath, bool)> =
            group.iter().map(|pl| (pl.path.clone(), pl.multi)).collect();
        let ap = self.applier.clone();
        let prepared = blocking(move || prepare_group(&ap, group)).await;
        let prepared = match prepared {
            Ok(p) => p,
            Err(e) => {
                for (path, multi) in metas {
                    let err = ApplyError::Other(format!("{path}: {e:#}"));
                    self.settle(path, multi, None, Err(err));
                }
                return;
            }
        };
        let mut ready: Vec<Fetched> = Vec::new();
        let mut fetch: Vec<Fetched> = Vec::new();
        for (pl, res) in prepared {
            match res {
                Ok(None) => self.settle(pl.path, pl.multi, None, Ok(Vec::new())),
                Ok(Some(building)) => {
                    self.stats
                        .bytes_reused
                        .fetch_add(building.reused, Ordering::Relaxed);
                    self.stats
                        .bytes_copied_ahead
                        .fetch_add(building.copied_ahead, Ordering::Relaxed);
                    if building.missing.is_empty() {
                        ready.push(Fetched { pl, building });
                    } else {
                        fetch.push(Fetched { pl, building });
                    }
                }
                Err(e) => self.settle(pl.path, pl.multi, None, Err(e)),
            }
        }
        if !fetch.is_empty() {
            let answers = match self.conn_for(&peer) {
                Some(conn) => fetch_batch(&conn, &fetch).await,
                None => Err(ApplyError::Unavailable(RelPath::root())),
            };
            match answers {
                Ok(answers) => {
                    let fetch_metas: Vec<(RelPath, bool)> = fetch
                        .iter()
                        .map(|f| (f.pl.path.clone(), f.pl.multi))
                        .collect();
                    // Check (SHA-256 per block) and write every block, and seal the files here
                    // rather than in the finisher, which is one task for all groups.
                    let ap = self.applier.clone();
                    let written = blocking(move || {
                        // Every block of the group hashed first, two at a time.
                        let digests = {
                            let data: Vec<&[u8]> = answers
                                .iter()
                                .flat_map(|a| a.iter().flatten().map(|(_, d)| &d[..]))
                                .collect();
                            sha256_each(&data)
                        };
                        let mut digests = digests.into_iter();
                        // Each file's own digests, taken before anything can fail.
                        let answers: Vec<_> = answers
                            .into_iter()
                            .map(|a| {
                                a.map(|blocks| {
                                    let own: Vec<[u8; 32]> =
                                        digests.by_ref().take(blocks.len()).collect();
                                    (blocks, own)
                                })
                            })
                            .collect();
                        fetch
                            .into_iter()
                            .zip(answers)
                            .map(|(mut f, blocks)| {
                                let res = blocks.and_then(|(blocks, own)| {
                                    let mut n = 0u64;
                                    for ((i, d), digest) in blocks.into_iter().zip(own) {
                                        f.building.write_hashed_block(i, &d, digest)?;
                                        n += d.len() as u64;
                                    }
                                    ap.seal(&mut f.building)?;
                                    Ok(n)
                                });
                                (f, res)
                            })
                            .collect::<Vec<_>>()
                    })
                    .await;
                    match written {
                        Ok(written) => {
                            for (f, res) in written {
                                let res = match res {
                                    // The sender served it unhashed (as indexed): ask again
                                    // with the sender checking every block, so a corrupted
                                    // file there is refused and reported, not asked for forever.
                                    Err(e @ ApplyError::Mismatch(_)) => {
                                        self.refetch_checked(&peer, f, e).await
                                    }
                                    Ok(n) => Ok((f, n)),
                                    Err(e) => Err((f.pl.path, f.pl.multi, e)),
                                };
                                match res {
                                    Ok((f, n)) => {
                                        self.stats.bytes_fetched.fetch_add(n, Ordering::Relaxed);
                                        ready.push(f);
                                    }
                                    Err((path, multi, e)) => self.settle(path, multi, None, Err(e)),
                                }
                            }
                        }
                        Err(e) => {
                            // The temp files went with the failed worker; the paths are retried.
                            for (path, multi) in fetch_metas {
                                let err = ApplyError::Other(format!("{path}: {e:#}"));
                                self.settle(path, multi, None, Err(err));
                            }
                        }
                    }
                }
                Err(e) => {
                    for f in fetch {
                        let err = match &e {
                            ApplyError::Unavailable(_) => {
                                ApplyError::Unavailable(f.pl.path.clone())
                            }
                            other => ApplyError::Other(format!("{}: {other}", f.pl.path)),
                        };
                        self.settle(f.pl.path, f.pl.multi, None, Err(err));
                    }
                }
            }
        }
        if ready.is_empty() {
            return;
        }
        let metas: Vec<(RelPath, bool)> = ready
            .iter()
            .map(|f| (f.pl.path.clone(), f.pl.multi))
            .collect();
        if fin.send(ready).await.is_err() {
            for (path, multi) in metas {
                let err = ApplyError::Other(format!("{path}: finisher gone"));
                self.settle(path, multi, None, Err(err));
            }
        }
    }

    async fn execute(self: &Arc<Self>, pl: Planned) {
        if self.stopping() {
            return;
        }
        let path = pl.path.clone();
        let multi = pl.multi;
        let loser = match &pl.action {
            Action::Conflict { loser, .. } => Some(loser.clone()),
            _ => None,
        };
        let res = self.execute_inner(pl).await;
        self.settle(path, multi, loser, res);
    }

    /// A plain install of a file, fetched here and handed to the finisher to be put in place with
    /// others (see [`Applier::finish_files`]).
    async fn execute_batched(self: &Arc<Self>, pl: Planned, finisher: &mpsc::Sender<Vec<Fetched>>) {
        if self.stopping() {
            return;
        }
        let Action::Install(rec) = pl.action.clone() else {
            return self.execute(pl).await;
        };
        match self.build(&pl.peer, rec, pl.local.clone(), true).await {
            Ok(None) => self.settle(pl.path, pl.multi, None, Ok(Vec::new())),
            Ok(Some(building)) => {
                let (path, multi) = (pl.path.clone(), pl.multi);
                if finisher.send(vec![Fetched { pl, building }]).await.is_err() {
                    self.settle(
                        path.clone(),
                        multi,
                        None,
                        Err(ApplyError::Other(format!("{path}: finisher gone"))),
                    );
                }
            }
            Err(e) => self.settle(pl.path, pl.multi, None, Err(e)),
        }
    }

    /// Put fetched files in place in batches: whatever has arrived while the previous batch was
    /// being committed forms the next one, so a lone file goes at once and a flood of small files
    /// shares its fsyncs and index commits.
    async fn finisher(self: Arc<Self>, mut rx: mpsc::Receiver<Vec<Fetched>>) {
        // One `syncfs` a round: the batch made durable by the previous round is put in place,
        // and the flush that makes its names durable (before they are recorded) also makes the
        // data of the files fetched meanwhile durable (before they are linked, next round).
        // While files keep coming, rounds follow each other without waiting, each taking what
        // arrived during the last. (Before: a flush for each batch's data and one for its names,
        // in two stages whose flushes ran at once, each waiting on all dirty data: 28 flushes
        // for the std docs instead of 12.)
        let mut durable = apply::DurableBatch::default();
        let mut durable_metas: Vec<(RelPath, bool)> = Vec::new();
        let mut open = true;
        loop {
            let mut batch: Vec<Fetched> = Vec::new();
            if open && durable_metas.is_empty() {
                match rx.recv().await {
                    Some(f) => batch = f,
                    None => open = false,
                }
            }
            while open && batch.len() < finish_batch_limit() {
                match rx.try_recv() {
                    Ok(f) => batch.extend(f),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => open = false,
                }
            }
            if batch.is_empty() && durable_metas.is_empty() {
                if open {
                    continue;
                }
                break;
            }
            let metas: Vec<(RelPath, bool)> = batch
                .iter()
                .map(|f| (f.pl.path.clone(), f.pl.multi))
                .collect();
            let items: Vec<_> = batch
                .into_iter()
                .map(|f| (f.building, f.pl.local))
                .collect();
            let placing = std::mem::take(&mut durable);
            let placed_metas = std::mem::replace(&mut durable_metas, metas);
            let ap = self.applier.clone();
            let res = blocking(move || {
                let sealed = ap.seal_files(items);
                let (finished, next) = ap.place_files(placing, sealed);
                let max = ap
                    .local
                    .index
                    .lock()
                    .ok()
                    .and_then(|ix| ix.max_sequence().ok());
                (finished, next, max)
            })
            .await;
            match res {
                Ok((finished, next, max)) => {
                    // Published as it grows, so a long pull is announced in bounded pieces
                    // (see `ANNOUNCE_BACKLOG_MAX`).
                    if let Some(max) = max {
                        self.seq_tx.send_if_modified(|v| {
                            let m = *v != max;
                            *v = max;
                            m
                        });
                    }
                    self.settle_finished(placed_metas, Ok(finished));
                    durable = next;
                }
                Err(e) => {
                    // The worker went with both batches' temp files: their paths are retried.
                    let again = anyhow::anyhow!("{e:#}");
                    self.settle_finished(placed_metas, Err(e));
                    self.settle_finished(std::mem::take(&mut durable_metas), Err(again));
                }
            }
        }
    }

    fn settle_finished(&self, metas: Vec<(RelPath, bool)>, res: anyhow::Result<apply::Finished>) {
        match res {
            Ok(results) => {
                for ((path, multi), (_, res)) in metas.into_iter().zip(results) {
                    if res.is_ok() {
                        self.stats.files_pulled.fetch_add(1, Ordering::Relaxed);
                    }
                    self.settle(path, multi, None, res);
                }
            }
            Err(e) => {
                for (path, multi) in metas {
                    let err = ApplyError::Other(format!("{path}: {e:#}"));
                    self.settle(path, multi, None, Err(err));
                }
            }
        }
    }

    /// Record the outcome of applying one planned path: caches, rescans, retries, errors.
    fn settle(
        &self,
        path: RelPath,
        multi: bool,
        loser: Option<RelPath>,
        res: Result<Vec<RelPath>, ApplyError>,
    ) {
        match res {
            Ok(to_scan) => {
                match &loser {
                    Some(l) => self.applied(&[&path, l]),
                    None => self.applied(&[&path]),
                }
                for p in to_scan {
                    self.request_scan(p);
                }
                if multi {
                    self.mark_dirty([path]);
                }
            }
            Err(ApplyError::LocalChange(p)) => {
                tracing::debug!("{p}: changed locally; rescanning before planning again");
                self.request_scan(p.clone());
                self.retry_later(p, Duration::from_millis(200));
            }
            Err(ApplyError::Busy(p)) => self.retry_later(p, Duration::from_millis(500)),
            Err(ApplyError::NotEmpty(p)) => self.retry_later(p, Duration::from_secs(2)),
            // Queued again as soon as that peer connects (`mark_need`); this is only a backstop.
            Err(ApplyError::Unavailable(p)) => self.retry_later(p, Duration::from_secs(10)),
            Err(e @ ApplyError::NoSpace(_)) => {
                self.set_error(format!("{path}: {e}; will retry"));
                self.retry_later(path, Duration::from_secs(2));
            }
            Err(e) => {
                self.set_error(format!("{path}: {e}"));
                self.retry_later(path, Duration::from_secs(2));
            }
        }
    }

    async fn execute_inner(self: &Arc<Self>, pl: Planned) -> Result<Vec<RelPath>, ApplyError> {
        let ap = self.applier.clone();
        let expected = pl.local.clone();
        match pl.action {
            Action::Nothing => Ok(Vec::new()),
            Action::Rescan => {
                self.request_scan(pl.path.clone());
                self.retry_later(pl.path, Duration::from_millis(300));
                Ok(Vec::new())
            }
            Action::Record(r) => {
                blocking(move || ap.record_only(r, expected.as_ref())).await??;
                Ok(Vec::new())
            }
            Action::Delete(r) => {
                tracing::info!("delete {}", r.path);
                blocking(move || ap.delete(r, expected.as_ref())).await??;
                self.stats.deleted.fetch_add(1, Ordering::Relaxed);
                Ok(Vec::new())
            }
            Action::Install(r) => self.install(&pl.peer, r, expected, None).await,
            Action::Conflict { record, loser } => {
                tracing::info!(
                    "conflict on {}: keeping the local version as {loser}",
                    record.path
                );
                let out = self
                    .install(&pl.peer, record, expected, Some(loser))
                    .await?;
                self.stats.conflicts.fetch_add(1, Ordering::Relaxed);
                Ok(out)
            }
        }
    }

    async fn install(
        self: &Arc<Self>,
        peer: &str,
        rec: Record,
        expected: Option<Record>,
        loser: Option<RelPath>,
    ) -> Result<Vec<RelPath>, ApplyError> {
        let ap = self.applier.clone();
        if rec.kind != Kind::File {
            return blocking(move || ap.install_other(rec, expected.as_ref(), loser.as_ref()))
                .await?;
        }
        let Some(building) = self
            .build(peer, rec, expected.clone(), loser.is_none())
            .await?
        else {
            return Ok(Vec::new());
        };
        let out =
            blocking(move || ap.finish_file(building, expected.as_ref(), loser.as_ref())).await??;
        self.stats.files_pulled.fetch_add(1, Ordering::Relaxed);
        Ok(out)
    }

    /// Build a file in the temp folder from local blocks and the peer's; `None` when the local
    /// file already had the content and only its metadata needed setting (done here, when
    /// `meta_shortcut`).
    async fn build(
        self: &Arc<Self>,
        peer: &str,
        rec: Record,
        expected: Option<Record>,
        meta_shortcut: bool,
    ) -> Result<Option<Building>, ApplyError> {
        let ap = self.applier.clone();
        // Same content already here: only metadata changes.
        if meta_shortcut {
            if let Some(l) = expected.as_ref() {
                if l.kind == Kind::File && !l.deleted && l.same_content(&rec) {
                    blocking(move || ap.set_meta(rec, expected.as_ref())).await??;
                    return Ok(None);
                }
            }
        }
        let r2 = rec.clone();
        let ap2 = ap.clone();
        let building = blocking(move || {
            ap2.prepare_file(&r2).map(|mut b| {
                b.write_directly();
                b
            })
        })
        .await??;
        self.stats
            .bytes_reused
            .fetch_add(building.reused, Ordering::Relaxed);
        self.stats
            .bytes_copied_ahead
            .fetch_add(building.copied_ahead, Ordering::Relaxed);
        if !building.missing.is_empty() {
            let conn = self
                .conn_for(peer)
                .ok_or_else(|| ApplyError::Unavailable(rec.path.clone()))?;
            // Several requests in flight, so the link and both ends stay busy (one at a time
            // left each waiting on the other's read, hash and write).
            let missing_bytes: u64 = building
                .missing
                .iter()
                .map(|i| building.block_len(*i))
                .sum();
            if missing_bytes >= UDP_MIN_BYTES {
                if let Some(opts) = self.udp_options(&conn) {
                    match self.fetch_udp(&conn, &building, &opts).await {
                        Ok(()) => return Ok(Some(building)),
                        // Whatever arrived and verified stays written; TCP fetches it all again
                        // (simple, and only after UDP failed, e.g. a firewall dropping it).
                        Err(e) => tracing::warn!(
                            "{}: UDP transfer failed ({e:#}); fetching over TCP",
                            rec.path
                        ),
                    }
                }
            }
            let all_runs = runs(&building.missing, proto::MAX_BLOCKS_PER_REQUEST);
            if let [run] = &all_runs[..] {
                // Small files: no task to spawn and wake.
                let hashes: Vec<[u8; 32]> = run
                    .iter()
                    .map(|i| building.rec.blocks[*i as usize])
                    .collect();
                let (first, blocks) =
                    fetch_run(conn.clone(), rec.path.clone(), run[0], hashes).await?;
                let n = write_run(&conn, &building, first, blocks).await?;
                self.stats.bytes_fetched.fetch_add(n, Ordering::Relaxed);
                return Ok(Some(building));
            }
            let mut todo = all_runs.into_iter();
            let mut inflight = tokio::task::JoinSet::new();
            let spawn = |set: &mut tokio::task::JoinSet<_>, run: Vec<u64>| {
                let hashes: Vec<[u8; 32]> = run
                    .iter()
                    .map(|i| building.rec.blocks[*i as usize])
                    .collect();
                set.spawn(fetch_run(conn.clone(), rec.path.clone(), run[0], hashes));
            };
            for run in todo.by_ref().take(FETCH_PIPELINE) {
                spawn(&mut inflight, run);
            }
            let mut unflushed = 0u64;
            while let Some(joined) = inflight.join_next().await {
                let (first, blocks) =
                    joined.map_err(|e| ApplyError::Other(format!("{}: {e}", rec.path)))??;
                let n = write_run(&conn, &building, first, blocks).await?;
                self.stats.bytes_fetched.fetch_add(n, Ordering::Relaxed);
                unflushed += n;
                if unflushed >= WRITEBACK_EVERY {
                    building.start_writeback();
                    unflushed = 0;
                }
                if let Some(run) = todo.next() {
                    spawn(&mut inflight, run);
                }
            }
        }
        Ok(Some(building))
    }

    /// UDP options when this box is configured with `transport = "udp"`.
    fn udp_options(&self, conn: &Conn) -> Option<crate::udp::Options> {
        let cfg = self.ctx.local.dir.load_config().ok()?;
        (cfg.transport == crate::config::Transport::Udp)
            .then(|| crate::udp::Options::for_peer(cfg.udp_payload, conn.peer().addr))
    }

    /// Fetch the missing blocks of a file over the UDP bulk path, a run of contiguous blocks
    /// at a time; every block is checked against its hash as it is written.
    async fn fetch_udp(
        &self,
        conn: &Conn,
        building: &Building,
        opts: &crate::udp::Options,
    ) -> anyhow::Result<()> {
        let per_range = (UDP_RANGE_BYTES / crate::model::BLOCK_SIZE) as usize;
        for run in runs(&building.missing, per_range) {
            let first = run[0];
            let len: u64 = run.iter().map(|i| building.block_len(*i)).sum();
            let data = crate::udp::fetch_range(
                conn,
                &building.rec.path,
                first * crate::model::BLOCK_SIZE,
                len,
                opts,
            )
            .await?;
            for (k, i) in run.iter().enumerate() {
                let start = k * crate::model::BLOCK_SIZE as usize;
                let end = start + building.block_len(*i) as usize;
                let block = data
                    .get(start..end)
                    .ok_or_else(|| anyhow::anyhow!("short UDP range"))?;
                building.write_block(*i, block)?;
            }
            self.stats.bytes_fetched.fetch_add(len, Ordering::Relaxed);
            self.stats
                .bytes_fetched_udp
                .fetch_add(len, Ordering::Relaxed);
        }
        Ok(())
    }

    // ---------------------------------------------------------------- status

    /// The status once this box is in sync: at least one peer connected, every connected peer's
    /// index received, nothing being pulled and nothing left to pull. Event-driven (woken by the
    /// puller and the index exchange), so waiting costs nothing while the sync runs, where
    /// polling `status` meant a full pass over both indexes each time. `synced` says whether
    /// that state was reached before `timeout`.
    pub async fn status_when_synced(self: &Arc<Self>, timeout: Duration) -> serde_json::Value {
        // A day at most: any larger ask (a typo, a hostile control request) must not overflow
        // the clock arithmetic.
        let timeout = timeout.min(MAX_STATUS_WAIT);
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let woken = self.progress.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let idle = self.busy.load(Ordering::Relaxed) == 0 && lock(&self.dirty).is_empty();
            let peers_ready = self.peers_indexes_received();
            let timed_out = tokio::time::Instant::now() >= deadline;
            if (idle && peers_ready) || timed_out {
                let mut st = self.status().await;
                let synced = idle && peers_ready && st["to_pull_files"].as_u64() == Some(0);
                if synced || timed_out {
                    st["synced"] = serde_json::Value::Bool(synced);
                    return st;
                }
            }
            // Woken by progress, or a look every so often (a retry coming due, a peer leaving).
            tokio::select! {
                _ = woken => {}
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    pub async fn status(self: &Arc<Self>) -> serde_json::Value {
        let me = self.clone();
        blocking(move || me.status_blocking())
            .await
            .unwrap_or_else(|e| serde_json::json!({"error": e.to_string()}))
    }

    fn status_blocking(&self) -> serde_json::Value {
        // Streams over both indexes (merge by path): a status poll must not cost memory in
        // proportion to the number of files.
        let (mut files, mut conflicts) = (0u64, 0u64);
        // MD5s still to compute are counted in the same pass (a query of their own was a
        // second scan of the index: 4-7 ms of the 40-60 ms status that ends a 10,000-file sync).
        let (mut md5_files, mut md5_bytes) = (0u64, 0u64);
        let mut count_local = |r: &Record| {
            if !r.deleted {
                files += 1;
                if planner::is_conflict_copy(&r.path) {
                    conflicts += 1;
                }
                if r.md5_pending() {
                    md5_files += 1;
                    md5_bytes += r.size;
                }
            }
        };
        let mut sdb = lock(&self.status_db);
        if sdb.is_none() {
            match SyncDb::open_reader(&self.ctx.local.dir) {
                Ok(d) => *sdb = Some(d),
                Err(e) => return serde_json::json!({"error": format!("{e:#}")}),
            }
        }
        let Some(sdb) = sdb.as_ref() else {
            return serde_json::json!({"error": "no status connection"});
        };
        let pinned = self.ctx.peers.current();
        if pinned.is_empty() {
            let _ = sdb.for_each_local_light(|r| count_local(&r));
        }
        let mut peers_json = Vec::new();
        let cfg = self.ctx.local.dir.load_config().ok();
        let ignore = IgnoreRules::load(&self.ctx.local.dir);
        // Being streamed in for a read: work to pull, not online-only.
        let wanted: HashSet<RelPath> = lock(&self.hydrations).keys().cloned().collect();
        let (mut in_files, mut in_bytes) = (0u64, 0u64);
        let (mut online_files, mut online_bytes) = (0u64, 0u64);
        let mut online_seen: HashSet<RelPath> = HashSet::new();
        for (k, id) in pinned.into_iter().enumerate() {
            let peer = id.to_string();
            let (mut nf, mut nb, mut of, mut ob) = (0u64, 0u64, 0u64, 0u64);
            // The local side is counted during the first peer's walk (one pass, not two).
            let _ = sdb.merge_with_remote(&peer, |l, r| {
                if k == 0 {
                    if let Some(l) = &l {
                        count_local(l);
                    }
                }
                let Some(r) = r else {
                    // Only here: the peer still needs it unless it is a tombstone.
                    if let Some(l) = l.filter(|l| !l.deleted) {
                        of += 1;
                        if l.kind == Kind::File {
                            ob += l.size;
                        }
                    }
                    return;
                };
                if let Some(l) = &l {
                    let newer = matches!(
                        l.version.compare(&r.version),
                        VvOrder::Greater | VvOrder::Concurrent
                    );
                    if newer && !l.same_content(&r) {
                        of += 1;
                        if l.kind == Kind::File && !l.deleted {
                            ob += l.size;
                        }
                    }
                }
                if ignore.is_ignored(&r.path, r.kind == Kind::Dir) {
                    return;
                }
                // Blocks were dropped for memory; the planner only needs them to be complete.
                let mut full = r;
                // A block list longer than a frame can carry was never complete: leave it empty
                // (and never allocate what a hostile peer's size claims).
                let n = full.size.div_ceil(crate::model::BLOCK_SIZE);
                if n <= (crate::protocol::MAX_FRAME / 32) as u64 {
                    full.blocks = vec![[0; 32]; n as usize];
                }
                if planner::plan(l.as_ref(), &full) == Action::Nothing {
                    return;
                }
                let live_file = full.kind == Kind::File && !full.deleted;
                // On demand, a file not here is fetched when read: not pending work.
                let online_only = self.on_demand
                    && live_file
                    && l.as_ref().is_none_or(|l| l.deleted)
                    && !wanted.contains(&full.path);
                if online_only {
                    // Counted once however many peers have it.
                    if online_seen.insert(full.path.clone()) {
                        online_files += 1;
                        online_bytes += full.size;
                    }
                } else {
                    nf += 1;
                    if live_file {
                        nb += full.size;
                    }
                }
            });
            in_files += nf;
            in_bytes += nb;
            let slot = lock(&self.peers);
            let s = slot.get(&id);
            let connected = s
                .and_then(|s| s.conn.as_ref())
                .is_some_and(|c| !c.is_closed());
            peers_json.push(serde_json::json!({
                "id": peer,
                "short": id.short_str(),
                "addr": cfg.as_ref().and_then(|c| c.find_peer(&id)).map(|p| p.addr.clone()),
                "connected": connected,
                "index_received": connected && s.is_some_and(|s| s.index_received),
                "connected_since": s.and_then(|s| s.connected_since).map(|t| chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339()),
                "to_pull_files": nf,
                "to_pull_bytes": nb,
                "to_push_files": of,
                "to_push_bytes": ob,
                "last_error": s.and_then(|s| s.last_error.clone()),
            }));
        }
        let last = lock(&self.last_error).clone();
        serde_json::json!({
            "device": self.my_id.to_string(),
            "box": self.ctx.local.dir.root,
            "peers": peers_json,
            "to_pull_files": in_files,
            "to_pull_bytes": in_bytes,
            "pending_retries": lock(&self.retry).len(),
            "conflicts": conflicts,
            "files": files,
            "on_demand": self.on_demand,
            "online_only_files": online_files,
            "online_only_bytes": online_bytes,
            "md5_pending_files": md5_files,
            "md5_pending_bytes": md5_bytes,
            "last_error": last.as_ref().map(|l| l.0.clone()),
            "last_error_at": last.as_ref().map(|l| l.1.clone()),
            "stats": {
                "bytes_fetched": self.stats.bytes_fetched.load(Ordering::Relaxed),
                "bytes_fetched_udp": self.stats.bytes_fetched_udp.load(Ordering::Relaxed),
                "bytes_reused": self.stats.bytes_reused.load(Ordering::Relaxed),
                "bytes_copied_ahead": self.stats.bytes_copied_ahead.load(Ordering::Relaxed),
                "files_pulled": self.stats.files_pulled.load(Ordering::Relaxed),
                "deleted": self.stats.deleted.load(Ordering::Relaxed),
                "conflicts_resolved": self.stats.conflicts.load(Ordering::Relaxed),
            },
        })
    }
}

/// [`FINISH_BATCH`], or less when the open-file limit is low: a round holds two batches of
/// open temp files, the queue and the groups in flight more (about four batches' worth).
fn finish_batch_limit() -> usize {
    static LIMIT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *LIMIT.get_or_init(|| {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit only writes the struct passed to it.
        let files = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
            lim.rlim_cur as usize
        } else {
            1024
        };
        (files / 8).clamp(GROUP_FILES, FINISH_BATCH)
    })
}

/// Raise the soft limit on open files to the hard one: files being built stay open until their
/// batch is put in place (several hundred at a time with many small files), more than the usual
/// soft default of 1024 leaves room for next to sockets, the index and a mount.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed to them.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) != 0 {
                tracing::debug!("cannot raise the open-file limit");
            }
        }
    }
}

/// Is `p` (a file, link or absent path; never a directory, whose children may have changed
/// unseen) exactly as the index describes it? Then an event about it needs no scan.
fn unchanged(
    root: &std::path::Path,
    get: impl Fn(&RelPath) -> anyhow::Result<Option<crate::index::Stored>>,
    p: &RelPath,
) -> bool {
    if p.is_root() {
        return false;
    }
    let Ok(Some(st)) = get(p) else {
        return false;
    };
    let r = &st.record;
    match scan::disk_entry_as_recorded(root, p) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => r.deleted,
        Ok(Some(e)) if !r.deleted && e.kind == r.kind && e.mode == r.mode => match e.kind {
            Kind::File => r.is_hashed() && st.stat == Some(e.stat) && e.mtime_ns == r.mtime_ns,
            Kind::Symlink => e.target == r.target && e.mtime_ns == r.mtime_ns,
            Kind::Dir => false,
        },
        _ => false,
    }
}

/// One planned change.
struct Planned {
    path: RelPath,
    peer: String,
    local: Option<Record>,
    action: Action,
    multi: bool,
}

/// The temp files for planned installs of small files (`None` for a file whose local version
/// already has that content: only its metadata is set, here).
#[allow(clippy::type_complexity)]
fn prepare_group(
    ap: &Applier,
    group: Vec<Planned>,
) -> Vec<(Planned, Result<Option<Building>, ApplyError>)> {
    let mut out = Vec::with_capacity(group.len());
    let mut build = Vec::new();
    for pl in group {
        let Action::Install(rec) = &pl.action else {
            let e = ApplyError::Other(format!("{}: not an install", pl.path));
            out.push((pl, Err(e)));
            continue;
        };
        let live = pl.local.as_ref().filter(|l| !l.deleted);
        if let Some(l) = live {
            if l.kind == Kind::File && l.same_content(rec) {
                let res = ap.set_meta(rec.clone(), pl.local.as_ref()).map(|()| None);
                out.push((pl, res));
                continue;
            }
        }
        build.push(pl);
    }
    let recs: Vec<(&Record, bool)> = build
        .iter()
        .filter_map(|pl| match &pl.action {
            Action::Install(r) => Some((r, pl.local.as_ref().is_some_and(|l| !l.deleted))),
            _ => None,
        })
        .collect();
    let built = ap.prepare_files(&recs);
    drop(recs);
    for (pl, b) in build.into_iter().zip(built) {
        out.push((pl, b.map(Some)));
    }
    out
}

/// Blocks of one file fetched by a batch: (block index, data), or why they are not here.
type FileBlocks = Result<Vec<(u64, Chunk)>, ApplyError>;

/// Fetch the missing blocks of every file of `files` with `GetBatch` requests (as few as the
/// per-request limits allow); one answer per file, in order. `Err` only when the requests
/// themselves failed (the connection, or a refusal of the whole batch).
async fn fetch_batch(conn: &Conn, files: &[Fetched]) -> Result<Vec<FileBlocks>, ApplyError> {
    // Every run, tagged with its file.
    let mut all: Vec<(usize, proto::BlockRun)> = Vec::new();
    for (fi, f) in files.iter().enumerate() {
        let b = &f.building;
        for run in runs(&b.missing, proto::MAX_BLOCKS_PER_REQUEST) {
            let hashes = run.iter().map(|i| b.rec.blocks[*i as usize]).collect();
            all.push((
                fi,
                proto::BlockRun {
                    path: b.rec.path.clone(),
                    first: run[0],
                    hashes,
                },
            ));
        }
    }
    let mut out: Vec<FileBlocks> = files.iter().map(|_| Ok(Vec::new())).collect();
    let mut rest = all.into_iter().peekable();
    while rest.peek().is_some() {
        let mut tags = Vec::new();
        let mut req = Vec::new();
        let mut blocks = 0usize;
        while let Some((_, r)) = rest.peek() {
            if !req.is_empty()
                && (req.len() >= proto::MAX_RUNS_PER_BATCH
                    || blocks + r.hashes.len() > proto::MAX_BLOCKS_PER_BATCH)
            {
                break;
            }
            let Some((fi, r)) = rest.next() else { break };
            blocks += r.hashes.len();
            tags.push((fi, r.first, r.hashes.len()));
            req.push(r);
        }
        let mut s = conn
            .request(Request::Sync(SyncRequest::GetBatch { runs: req }))
            .await
            .map_err(|e| ApplyError::Other(format!("batch request: {e}")))?;
        let mut next = 0usize;
        loop {
            match s.next().await {
                Ok(Some(Response::Sync(SyncResponse::Runs(answers)))) => {
                    for a in answers {
                        let Some(&(fi, first, want)) = tags.get(next) else {
                            return Err(ApplyError::Other("batch: too many answers".into()));
                        };
                        next += 1;
                        let path = &files[fi].building.rec.path;
                        let Ok(got) = &mut out[fi] else { continue };
                        match a {
                            proto::RunAnswer::Blocks(bs) if bs.len() == want => {
                                for (k, d) in bs.into_iter().enumerate() {
                                    got.push((first + k as u64, d));
                                }
                            }
                            proto::RunAnswer::Blocks(_) => {
                                out[fi] = Err(ApplyError::Other(format!(
                                    "{path}: wrong number of blocks"
                                )));
                            }
                            proto::RunAnswer::Failed { code, message } => {
                                out[fi] = Err(match code {
                                    ErrorCode::Busy => ApplyError::Busy(path.clone()),
                                    _ => ApplyError::Other(message),
                                });
                            }
                        }
                    }
                }
                Ok(Some(Response::Done)) | Ok(None) => break,
                Ok(Some(other)) => {
                    return Err(ApplyError::Other(format!("batch: unexpected {other:?}")))
                }
                Err(e) => return Err(ApplyError::Other(format!("batch: {e}"))),
            }
        }
        if next != tags.len() {
            return Err(ApplyError::Other("batch: short answer".into()));
        }
    }
    Ok(out)
}

/// Why a run of a batch was not served.
struct RunError {
    code: ErrorCode,
    message: String,
    /// The disk holds bytes that do not match a hash recorded for the same stat key.
    corrupt: bool,
}

fn run_err(code: ErrorCode, message: String) -> RunError {
    RunError {
        code,
        message,
        corrupt: false,
    }
}

/// Read one run of a `GetBatch` for a peer: the same checks as `GetBlocks` (no symlinked
/// parent, `open_beneath`, a shared lock so a file being written is never shipped), except that
/// a file being written is refused at once as busy (the asker retries it) instead of holding up
/// the rest of the batch, and that blocks are hashed against what was announced only when the
/// file is not exactly as indexed (`known`, same stat key and the asked blocks recorded), as
/// `GetIndexedBlocks` does.
fn read_run(
    root: &crate::paths::RootDir,
    locks: &Arc<crate::locks::LockManager>,
    local: &crate::query::LocalBox,
    known: Option<&crate::index::Stored>,
    run: &proto::BlockRun,
) -> Result<Vec<Vec<u8>>, RunError> {
    let p = &run.path;
    let _g = locks
        .try_lock(p, crate::locks::Mode::Shared)
        .ok_or_else(|| run_err(ErrorCode::Busy, format!("{p}: being written")))?;
    // The kernel refuses a symlink anywhere on the path (openat2), no separate check needed.
    let f = root.open_file(p).map_err(|e| match e {
        e if crate::paths::is_through_symlink(&e) => run_err(ErrorCode::BadPath, e.to_string()),
        e => run_err(ErrorCode::NotFound, format!("{p}: {e}")),
    })?;
    let md = f
        .metadata()
        .map_err(|e| run_err(ErrorCode::Io, e.to_string()))?;
    if !md.is_file() {
        return Err(run_err(
            ErrorCode::NotAFile,
            format!("{p}: not a regular file"),
        ));
    }
    let trusted = known.is_some_and(|s| {
        !s.record.deleted
            && s.stat == Some(crate::hashing::StatKey::of(&md))
            && usize::try_from(run.first)
                .ok()
                .and_then(|f| s.record.blocks.get(f..f.checked_add(run.hashes.len())?))
                == Some(&run.hashes[..])
    });
    let mut out = Vec::with_capacity(run.hashes.len());
    for (k, h) in run.hashes.iter().enumerate() {
        let i = run.first.saturating_add(k as u64);
        let block = if trusted {
            read_raw_block(&f, i, md.len()).map(Some)
        } else {
            apply::read_block(&f, i, md.len(), h)
        };
        match block {
            Ok(Some(b)) => out.push(b),
            Ok(None) => {
                let recorded = local
                    .index
                    .lock()
                    .ok()
                    .and_then(|ix| ix.get(p).ok().flatten())
                    .and_then(|s| s.stat);
                if recorded == Some(crate::hashing::StatKey::of(&md)) {
                    return Err(RunError {
                        code: ErrorCode::Changed,
                        message: format!(
                            "{p}: block {i} on disk does not match its recorded hash \
                             (silent corruption?); not served"
                        ),
                        corrupt: true,
                    });
                }
                return Err(run_err(
                    ErrorCode::Changed,
                    format!("{p}: changed since it was announced"),
                ));
            }
            Err(e) => return Err(run_err(ErrorCode::Changed, format!("{p}: {e}"))),
        }
    }
    Ok(out)
}

/// Ask `conn` for the blocks `first..first + hashes.len()` of `path`; returns them in order.
/// The sender skips its own hash check when its file is as indexed: the caller verifies every
/// block (`Building::write_block`) and asks again with [`fetch_run_checked`] on a mismatch.
async fn fetch_run(
    conn: Conn,
    path: RelPath,
    first: u64,
    hashes: Vec<[u8; 32]>,
) -> Result<(u64, Vec<Chunk>), ApplyError> {
    fetch_blocks(conn, path, first, hashes, false).await
}

/// [`fetch_run`] with the sender hashing every block it reads: a corrupted block is refused
/// and reported there.
async fn fetch_run_checked(
    conn: Conn,
    path: RelPath,
    first: u64,
    hashes: Vec<[u8; 32]>,
) -> Result<(u64, Vec<Chunk>), ApplyError> {
    fetch_blocks(conn, path, first, hashes, true).await
}

async fn fetch_blocks(
    conn: Conn,
    path: RelPath,
    first: u64,
    hashes: Vec<[u8; 32]>,
    sender_checks: bool,
) -> Result<(u64, Vec<Chunk>), ApplyError> {
    let req = if sender_checks {
        SyncRequest::GetBlocks {
            path: path.clone(),
            first,
            hashes,
        }
    } else {
        SyncRequest::GetIndexedBlocks {
            path: path.clone(),
            first,
            hashes,
        }
    };
    request_blocks(conn, path, first, req).await
}

/// Write blocks `first, first+1, ...` fetched with [`fetch_run`] into `b` (each checked against
/// its hash); when one does not match, fetch the run again with the sender checking too.
/// Returns the bytes written.
async fn write_run(
    conn: &Conn,
    b: &Building,
    first: u64,
    blocks: Vec<Chunk>,
) -> Result<u64, ApplyError> {
    match write_blocks(b, first, &blocks) {
        Ok(n) => Ok(n),
        Err(e) => {
            let (path, hashes) = checked_retry(b, first, blocks.len(), &e);
            let (_, blocks) = fetch_run_checked(conn.clone(), path, first, hashes).await?;
            write_blocks(b, first, &blocks)
        }
    }
}

/// Write blocks `first, first+1, ...` into `b`, each checked against its hash; the bytes written.
fn write_blocks(b: &Building, first: u64, blocks: &[Chunk]) -> Result<u64, ApplyError> {
    let data: Vec<&[u8]> = blocks.iter().map(|d| &d[..]).collect();
    let mut n = 0;
    for (k, (d, digest)) in data.iter().zip(sha256_each(&data)).enumerate() {
        b.write_hashed_block(first + k as u64, d, digest)?;
        n += d.len() as u64;
    }
    Ok(n)
}

/// Log a failed block write and give what a checked retry of the run asks for.
fn checked_retry(b: &Building, first: u64, len: usize, e: &ApplyError) -> (RelPath, Vec<[u8; 32]>) {
    tracing::warn!("{e}; asking again with the sender checking every block");
    let start = (first as usize).min(b.rec.blocks.len());
    let end = start.saturating_add(len).min(b.rec.blocks.len());
    (b.rec.path.clone(), b.rec.blocks[start..end].to_vec())
}

async fn request_blocks(
    conn: Conn,
    path: RelPath,
    first: u64,
    req: SyncRequest,
) -> Result<(u64, Vec<Chunk>), ApplyError> {
    let want = match &req {
        SyncRequest::GetBlocks { hashes, .. } | SyncRequest::GetIndexedBlocks { hashes, .. } => {
            hashes.len()
        }
        _ => 0,
    };
    let mut s = conn
        .request(Request::Sync(req))
        .await
        .map_err(|e| ApplyError::Other(format!("{path}: {e}")))?;
    let mut blocks = Vec::with_capacity(want);
    loop {
        match s.next().await {
            Ok(Some(Response::Data(d))) => {
                if blocks.len() == want {
                    return Err(ApplyError::Other(format!("{path}: too many blocks")));
                }
                blocks.push(d);
            }
            Ok(Some(Response::Done)) | Ok(None) => break,
            Ok(Some(other)) => {
                return Err(ApplyError::Other(format!("{path}: unexpected {other:?}")))
            }
            Err(e) => return Err(ApplyError::Other(format!("{path}: {e}"))),
        }
    }
    if blocks.len() != want {
        return Err(ApplyError::Other(format!("{path}: short block answer")));
    }
    Ok((first, blocks))
}

/// Read block `i` of a file whose content is known (see `serve_blocks`); an index whose offset
/// overflows (it may come from a peer) is refused.
fn read_raw_block(f: &std::fs::File, i: u64, size: u64) -> std::io::Result<Vec<u8>> {
    use std::os::fd::AsRawFd;
    let start = i
        .checked_mul(crate::model::BLOCK_SIZE)
        .filter(|s| *s < size)
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("block {i} is out of range"),
            )
        })?;
    let len = crate::model::BLOCK_SIZE.min(size - start) as usize;
    // pread straight into the buffer's spare capacity: one call per block (`read_to_end` grows
    // its reads from 8 KiB, five calls for 128 KiB) and no zeroing of memory about to be filled.
    let mut buf: Vec<u8> = Vec::with_capacity(len);
    while buf.len() < len {
        let at = start + buf.len() as u64;
        let spare = buf.spare_capacity_mut();
        // SAFETY: the kernel writes at most `spare.len()` bytes into `spare`, which we own; only
        // the bytes it reports written are then counted as initialised.
        let n = unsafe {
            libc::pread(
                f.as_raw_fd(),
                spare.as_mut_ptr().cast(),
                spare.len(),
                at as libc::off_t,
            )
        };
        match n {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n if n < 0 => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            // SAFETY: `n` more bytes were initialised by pread, within the capacity.
            n => unsafe { buf.set_len(buf.len() + n as usize) },
        }
    }
    Ok(buf)
}

fn same_conn(a: &Conn, b: &Conn) -> bool {
    // Two handles on one connection share their peer info allocation.
    std::ptr::eq(a.peer(), b.peer())
}

async fn say_bye(c: Conn) {
    let _ = tokio::time::timeout(
        Duration::from_millis(500),
        c.call(Request::Sync(SyncRequest::Bye)),
    )
    .await;
    c.close();
}

/// Consecutive block indices, in runs of at most `max`.
fn runs(idx: &[u64], max: usize) -> Vec<Vec<u64>> {
    let mut out: Vec<Vec<u64>> = Vec::new();
    for &i in idx {
        match out.last_mut() {
            Some(r) if r.len() < max && r.last().is_some_and(|l| *l + 1 == i) => r.push(i),
            _ => out.push(vec![i]),
        }
    }
    out
}

/// The smallest set of subtrees covering `set`; the root when there are too many.
fn reduce_roots(set: BTreeSet<RelPath>) -> Vec<RelPath> {
    if set.is_empty() {
        return Vec::new();
    }
    if set.contains(&RelPath::root()) || set.len() > MAX_SCAN_ROOTS {
        return vec![RelPath::root()];
    }
    let mut out: Vec<RelPath> = Vec::new();
    for p in set {
        if out.iter().any(|o| p.starts_with(o)) {
            continue;
        }
        out.push(p);
    }
    out
}

/// Decrements a counter when dropped (whatever way the scope is left).
struct Decrement<'a>(&'a AtomicU64);

impl Drop for Decrement<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_blocks_are_read_whole_and_a_short_file_is_an_error() {
        use std::io::Write;
        let bs = crate::model::BLOCK_SIZE as usize;
        let data: Vec<u8> = (0..2 * bs + 1000).map(|i| (i % 251) as u8).collect();
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&data).unwrap();
        let size = data.len() as u64;
        assert_eq!(read_raw_block(&f, 0, size).unwrap(), data[..bs]);
        assert_eq!(read_raw_block(&f, 2, size).unwrap(), data[2 * bs..]);
        let beyond = read_raw_block(&f, 3, size).unwrap_err();
        assert_eq!(beyond.kind(), std::io::ErrorKind::InvalidInput);
        assert!(read_raw_block(&f, u64::MAX, size).is_err());
        // The file shrank after it was stat'ed: the block cannot be read whole.
        f.set_len(2 * bs as u64 + 10).unwrap();
        let short = read_raw_block(&f, 2, size).unwrap_err();
        assert_eq!(short.kind(), std::io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn runs_split() {
        assert_eq!(
            runs(&[0, 1, 2, 5, 6, 9], 2),
            vec![vec![0, 1], vec![2], vec![5, 6], vec![9]]
        );
    }

    #[test]
    fn scan_view_under_selects_the_subtree() {
        let ix = crate::index::Index::open_in_memory().unwrap();
        for (i, p) in ["a", "a/b", "a/b/c", "a b", "a0", "ab", "b"]
            .iter()
            .enumerate()
        {
            let r = Record {
                path: RelPath::parse(p).unwrap(),
                kind: Kind::File,
                size: 0,
                mtime_ns: 0,
                mode: 0o644,
                target: None,
                md5: None,
                sha256: None,
                blocks: vec![],
                version: Default::default(),
                deleted: false,
                sequence: i as u64 + 1,
                modified_by: 1,
            };
            ix.put(&r, None).unwrap();
        }
        let mut got: Vec<String> = ix
            .scan_view_under(&RelPath::parse("a").unwrap())
            .unwrap()
            .into_keys()
            .map(|p| p.to_string())
            .collect();
        got.sort();
        assert_eq!(got, vec!["a", "a/b", "a/b/c"]);
        assert_eq!(ix.scan_view().unwrap().len(), 7);
    }

    #[test]
    fn roots_reduce() {
        let s: BTreeSet<RelPath> = ["a", "a/b", "a b", "c/d"]
            .iter()
            .map(|p| RelPath::parse(p).unwrap())
            .collect();
        let r: Vec<String> = reduce_roots(s).iter().map(|p| p.to_string()).collect();
        assert_eq!(r, vec!["a", "a b", "c/d"]);
    }
}
