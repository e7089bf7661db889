//! UDP bulk transfer (issue 4): a rate-controlled, encrypted datagram path for one file or a
//! byte range of it, negotiated over the authenticated TLS connection.
//!
//! - [`proto`]: the negotiation messages on the TLS connection.
//! - [`packet`]: datagram format, keys (HKDF over the TLS exporter), AEAD, replay window.
//! - [`sender`], [`receiver`]: sans-IO state machines (datagrams and time in, datagrams and
//!   timers out), unit-tested for loss, reordering, duplication, corruption and replay.
//! - [`rate`]: the delay-based, loss-tolerant rate controller and the pacer.
//! - [`driver`]: the socket threads (batched `sendmmsg`/`recvmmsg`, `ppoll`, `pread`/`pwrite`).
//! - this file: serving a request ([`serve`]), and fetching ([`download`] for the CLI,
//!   [`fetch_file`] and [`fetch_range`] for the sync engine).
//!
//! The protocol is described in `docs/udp.md`.

pub mod driver;
pub mod packet;
pub mod proto;
pub mod rate;
pub mod receiver;
pub mod sender;

use std::io::Read;
use std::net::SocketAddr;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::client::{Downloaded, Progress, Session};
use crate::config::BoxDir;
use crate::hashing::{self, FileHashes, StatKey};
use crate::history::Direction;
use crate::model::{EntryInfo, Kind};
use crate::net::rpc::{Conn, Responder, RpcError};
use crate::paths::RelPath;
use crate::protocol::{ErrorCode, Request, Response};
use crate::server::ServerCtx;
use proto::{Resume, StartRequest, UdpRequest, UdpResponse};

/// Datagram size used when the peer is reached over loopback: no link MTU applies there, and
/// big datagrams cut the per-packet cost ~50×.
pub const LOOPBACK_DATAGRAM: usize = 60_000;
/// UDP transfers one serving box runs at once.
pub const MAX_SESSIONS: usize = 16;
/// Bytes of a datagram that are not file data.
pub const DATA_OVERHEAD: usize = packet::OVERHEAD + sender::DATA_HEADER;

static SESSIONS: AtomicUsize = AtomicUsize::new(0);

/// Tuning of one fetch.
#[derive(Clone, Debug)]
pub struct Options {
    /// Largest datagram (UDP payload) the receiver wants.
    pub datagram: usize,
    /// Pacing rate at the start and its ceiling, bytes per second.
    pub initial_rate: u64,
    pub max_rate: u64,
    /// Silence after which a transfer fails.
    pub idle_timeout: Duration,
}

impl Options {
    /// Defaults for a peer at `peer` given the box's configured payload, with environment
    /// overrides for benchmarks: `MYBOX_UDP_PAYLOAD` (bytes), `MYBOX_UDP_RATE_MBIT` (start)
    /// and `MYBOX_UDP_MAX_MBIT` (ceiling).
    pub fn for_peer(config_payload: usize, peer: SocketAddr) -> Options {
        let env_num = |k: &str| {
            std::env::var(k)
                .ok()
                .and_then(|v| v.trim().parse::<f64>().ok())
        };
        let datagram = env_num("MYBOX_UDP_PAYLOAD").map(|v| v as usize).unwrap_or(
            if peer.ip().is_loopback() {
                LOOPBACK_DATAGRAM
            } else {
                config_payload
            },
        );
        let mbit = |v: f64| (v * 125_000.0) as u64;
        Options {
            datagram: datagram.clamp(packet::MIN_DATAGRAM, packet::MAX_DATAGRAM),
            initial_rate: env_num("MYBOX_UDP_RATE_MBIT").map_or(
                if peer.ip().is_loopback() {
                    mbit(2000.0)
                } else {
                    mbit(100.0)
                },
                mbit,
            ),
            max_rate: env_num("MYBOX_UDP_MAX_MBIT").map_or(mbit(40_000.0), mbit),
            idle_timeout: sender::IDLE_TIMEOUT,
        }
    }

    pub fn chunk(&self) -> usize {
        self.datagram.saturating_sub(DATA_OVERHEAD).max(1)
    }
}

/// Sessions counted while alive.
struct SessionSlot;
impl SessionSlot {
    fn take() -> Option<SessionSlot> {
        let n = SESSIONS.fetch_add(1, Ordering::AcqRel);
        if n >= MAX_SESSIONS {
            SESSIONS.fetch_sub(1, Ordering::AcqRel);
            None
        } else {
            Some(SessionSlot)
        }
    }
}
impl Drop for SessionSlot {
    fn drop(&mut self) {
        SESSIONS.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Sets a flag when dropped (stops a driver thread when its async owner goes away).
struct StopOnDrop(Arc<AtomicBool>);
impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

fn hex(b: &[u8]) -> String {
    crate::model::hex(b)
}

// ---------------------------------------------------------------------------- serving side

/// Serve one UDP request on the TLS connection `conn`.
pub async fn serve(
    ctx: &Arc<ServerCtx>,
    conn: &Conn,
    req: proto::UdpRequest,
    out: Responder,
) -> String {
    match req {
        UdpRequest::Start(start) => serve_start(ctx, conn, start, out).await,
    }
}

use crate::server::open_for_send;

/// Reads `[pos, end)` of a file by offset (so it can share the descriptor with the sender).
struct RangeReader {
    f: Arc<std::fs::File>,
    pos: u64,
    end: u64,
}

impl Read for RangeReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let want = (self.end - self.pos).min(buf.len() as u64) as usize;
        if want == 0 {
            return Ok(0);
        }
        let n = self.f.read_at(&mut buf[..want], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// Check a whole file against its recorded block hashes (see `serve_start`).
fn check_cached_blocks(
    f: &std::fs::File,
    path: &RelPath,
    blocks: &[[u8; 32]],
    total: u64,
) -> std::io::Result<()> {
    use crate::model::BLOCK_SIZE;
    let mut buf = vec![0u8; BLOCK_SIZE as usize];
    for (i, want) in blocks.iter().enumerate() {
        let pos = i as u64 * BLOCK_SIZE;
        let len = BLOCK_SIZE.min(total.saturating_sub(pos)) as usize;
        f.read_exact_at(&mut buf[..len], pos)?;
        if <[u8; 32]>::from(Sha256::digest(&buf[..len])) != *want {
            let msg = format!(
                "{path}: block {i} on disk does not match its recorded hash (silent corruption?); \
                 transfer not confirmed"
            );
            tracing::error!("{msg}");
            return Err(std::io::Error::other(msg));
        }
    }
    Ok(())
}

fn chunk_bounds() -> (usize, usize) {
    (
        packet::MIN_DATAGRAM - DATA_OVERHEAD,
        packet::MAX_DATAGRAM - DATA_OVERHEAD,
    )
}

async fn serve_start(
    ctx: &Arc<ServerCtx>,
    conn: &Conn,
    req: StartRequest,
    out: Responder,
) -> String {
    async fn fail(out: Responder, code: ErrorCode, msg: String) -> String {
        let line = format!("error {code:?}: {msg}");
        let _ = out.error(code, msg).await;
        line
    }
    let (lo, hi) = chunk_bounds();
    let chunk = req.chunk as usize;
    if !(lo..=hi).contains(&chunk) {
        return fail(
            out,
            ErrorCode::BadRequest,
            format!("chunk size {chunk} outside {lo}..={hi}"),
        )
        .await;
    }
    let Some(_slot) = SessionSlot::take() else {
        return fail(
            out,
            ErrorCode::Busy,
            format!("{MAX_SESSIONS} UDP transfers already running; try again"),
        )
        .await;
    };
    let ctx2 = ctx.clone();
    let path = req.path.clone();
    let opened = match tokio::task::spawn_blocking(move || open_for_send(&ctx2, &path)).await {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => return fail(out, e.code, e.message).await,
        Err(e) => return fail(out, ErrorCode::Internal, format!("worker failed: {e}")).await,
    };
    let size = opened.key.size;
    if req.offset > size {
        return fail(
            out,
            ErrorCode::BadRequest,
            format!("offset {} beyond the end ({size} bytes)", req.offset),
        )
        .await;
    }
    let total = req.len.unwrap_or(u64::MAX).min(size - req.offset);
    let n = sender::chunk_count(total, chunk);
    if n as u64 * chunk as u64 >= u32::MAX as u64 * chunk as u64 {
        return fail(
            out,
            ErrorCode::BadRequest,
            "range too large for the chunk size".into(),
        )
        .await;
    }
    let whole = req.offset == 0 && total == size;
    let resume = req.resume.filter(|r| {
        whole
            && r.size == size
            && r.mtime_ns == opened.key.mtime_ns
            && r.have.len() == (n as usize).div_ceil(8)
    });
    let peer_addr = conn.peer().addr;
    let sock = match driver::bind_for(peer_addr) {
        Ok(s) => s,
        Err(e) => return fail(out, ErrorCode::Io, format!("udp socket: {e}")).await,
    };
    let port = match sock.local_addr() {
        Ok(a) => a.port(),
        Err(e) => return fail(out, ErrorCode::Io, format!("udp socket: {e}")).await,
    };
    let session: [u8; 16] = rand::random();
    let sid = hex(&session[..4]);
    tracing::info!(
        "udp session {sid}: {} ({total} bytes from {}) to {} on port {port}, {n} chunks of {chunk}{}",
        req.path,
        req.offset,
        conn.peer().id.short_str(),
        if resume.is_some() { ", resuming" } else { "" }
    );
    let mut out = out;
    if out
        .send(Response::Udp(UdpResponse::Ready {
            session,
            port,
            entry: opened.entry.clone(),
            total,
            resumed: resume.is_some(),
        }))
        .await
        .is_err()
    {
        return "cancelled".into();
    }

    // Hashes of exactly the range: cached for a whole unchanged file, else computed while the
    // data goes out (same descriptor, by offset).
    let hasher = {
        let f = opened.file.clone();
        let cached = if whole { opened.cached } else { None };
        let blocks = opened.blocks.clone();
        let offset = req.offset;
        let path = req.path.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<([u8; 16], [u8; 32], u64)> {
            if let Some((m, s)) = cached {
                // The cached hashes vouch for the bytes only if the disk still holds them: every
                // block is checked while the data goes out, and the transfer is never confirmed
                // (no `Finished`) if one has rotten under an unchanged stat key.
                check_cached_blocks(&f, &path, &blocks, total)?;
                return Ok((m, s, total));
            }
            let h = hashing::hash_reader(
                RangeReader {
                    f,
                    pos: offset,
                    end: offset + total,
                },
                total,
            )?;
            Ok((h.md5, h.sha256, h.size))
        })
    };

    let stop = Arc::new(AtomicBool::new(false));
    let _stop_guard = StopOnDrop(stop.clone());
    let params = sender::Params {
        session,
        total,
        chunk,
        rate: rate::RateConfig {
            initial: req.initial_rate.max(1) as f64,
            min: 125e3,
            max: req.max_rate.max(125_000) as f64,
        },
        idle_timeout: sender::IDLE_TIMEOUT,
    };
    let exporter = conn.peer().exporter;
    let file = opened.file.clone();
    let offset = req.offset;
    let stop2 = stop.clone();
    let mut task = tokio::task::spawn_blocking(move || {
        let s = sender::Sender::new(
            &exporter,
            params,
            resume.as_ref().map(|r| &r.have[..]),
            Instant::now(),
        );
        driver::run_sender(&sock, s, &file, offset, &stop2)
    });
    let result = loop {
        tokio::select! {
            r = &mut task => break r,
            _ = conn.closed() => {
                stop.store(true, Ordering::Relaxed);
            }
            _ = tokio::time::sleep(Duration::from_millis(200)) => {
                if out.is_cancelled() {
                    stop.store(true, Ordering::Relaxed);
                }
            }
        }
    };
    let report = match result {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            tracing::warn!("udp session {sid}: {e}");
            return fail(out, ErrorCode::Io, format!("udp transfer failed: {e}")).await;
        }
        Err(e) => return fail(out, ErrorCode::Internal, format!("sender failed: {e}")).await,
    };
    let hashes = match hasher.await {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => return fail(out, ErrorCode::Io, format!("hashing: {e}")).await,
        Err(e) => return fail(out, ErrorCode::Internal, format!("hasher failed: {e}")).await,
    };
    let after = opened.file.metadata().map(|m| StatKey::of(&m)).ok();
    if after != Some(opened.key) || hashes.2 != total {
        return fail(
            out,
            ErrorCode::Changed,
            format!("{}: changed while it was sent; try again", req.path),
        )
        .await;
    }
    let secs = report.elapsed.as_secs_f64().max(1e-6);
    let stats = format!(
        "{} packets ({} retransmitted) in {:.2}s, {:.1} MB/s, final rate {:.0} Mbit/s, {} rate decreases, background loss {:.2}%, dropped: {}",
        report.sent_packets,
        report.retransmits,
        secs,
        total as f64 / secs / 1e6,
        report.final_rate * 8.0 / 1e6,
        report.decreases,
        report.bg_loss * 100.0,
        report.counters
    );
    tracing::info!("udp session {sid} done: {stats}");
    let outcome = format!("ok, {total} bytes over udp, md5 {}", hex(&hashes.0));
    match out
        .end(Response::Udp(UdpResponse::Finished {
            md5: hashes.0,
            sha256: hashes.1,
            size: total,
            stats,
        }))
        .await
    {
        Ok(()) => outcome,
        Err(e) => format!("failed: {e}"),
    }
}

// ---------------------------------------------------------------------------- fetching side

/// Resume record of a partial download, kept beside the partial file in `.mybox/tmp/`.
#[derive(Serialize, Deserialize, Debug, Clone)]
struct PartialState {
    peer: String,
    path: String,
    size: u64,
    mtime_ns: i64,
    chunk: u32,
    #[serde(with = "serde_bytes")]
    have: Vec<u8>,
}

/// The partial file and its state file for (peer, path).
struct Partial {
    part: PathBuf,
    state: PathBuf,
}

impl Partial {
    fn for_path(dir: &BoxDir, peer: &str, path: &RelPath) -> Partial {
        let mut h = Sha256::new();
        h.update(peer.as_bytes());
        h.update([0]);
        h.update(path.as_str().as_bytes());
        let name = hex(&h.finalize()[..16]);
        let tmp = dir.tmp_dir();
        Partial {
            part: tmp.join(format!("udp-{name}{}", crate::scan::PART_SUFFIX)),
            state: tmp.join(format!("udp-{name}.state")),
        }
    }

    fn load(&self, peer: &str, path: &RelPath) -> Option<PartialState> {
        let bytes = std::fs::read(&self.state).ok()?;
        let st: PartialState = bincode::deserialize(&bytes).ok()?;
        (st.peer == peer && st.path == path.as_str() && self.part.exists()).then_some(st)
    }

    fn save(&self, st: &PartialState) -> std::io::Result<()> {
        let bytes = bincode::serialize(st).map_err(std::io::Error::other)?;
        let tmp = self.state.with_extension("state.tmp");
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, &self.state)
    }

    fn discard(&self) {
        let _ = std::fs::remove_file(&self.state);
        let _ = std::fs::remove_file(&self.part);
    }
}

/// Writes chunks into the partial file and checkpoints the bitmap beside it.
struct FileSink {
    file: Arc<std::fs::File>,
    partial: Partial,
    state: PartialState,
}

impl driver::Sink for FileSink {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.file.write_all_at(data, offset)
    }
    fn write_parts_at(&mut self, offset: u64, parts: &[&[u8]]) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        if parts.len() < 2 {
            return parts.first().map_or(Ok(()), |p| self.write_at(offset, p));
        }
        let iov: Vec<libc::iovec> = parts
            .iter()
            .map(|p| libc::iovec {
                iov_base: p.as_ptr() as *mut libc::c_void,
                iov_len: p.len(),
            })
            .collect();
        let n = unsafe {
            libc::pwritev(
                self.file.as_raw_fd(),
                iov.as_ptr(),
                iov.len().min(libc::UIO_MAXIOV as usize) as libc::c_int,
                offset as libc::off_t,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // A short write (or more parts than one call takes): finish part by part.
        let mut done = n as u64;
        let mut off = offset;
        for p in parts {
            let len = p.len() as u64;
            if done >= len {
                done -= len;
            } else {
                self.file.write_all_at(&p[done as usize..], off + done)?;
                done = 0;
            }
            off += len;
        }
        Ok(())
    }
    fn checkpoint(&mut self, bitmap: &[u8]) {
        // The bitmap may only claim data already handed to the kernel (it is: writes happen
        // before their chunk is counted); a crash that loses page cache is caught by the
        // final hash check, which then restarts from scratch.
        self.state.have = bitmap.to_vec();
        if let Err(e) = self.partial.save(&self.state) {
            tracing::warn!("cannot save udp resume state: {e}");
        }
    }
}

/// Collects a range in memory.
struct MemSink(Vec<u8>);

impl driver::Sink for MemSink {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let start = offset as usize;
        let end = start + data.len();
        let dst = self
            .0
            .get_mut(start..end)
            .ok_or_else(|| std::io::Error::other("chunk outside the range"))?;
        dst.copy_from_slice(data);
        Ok(())
    }
}

use crate::client::{fatal, Failure};

fn remote_failure(e: RpcError) -> Failure {
    match e {
        RpcError::Remote {
            code: ErrorCode::Changed | ErrorCode::Busy,
            message,
        } => Failure {
            error: anyhow!("peer says: {message}"),
            retryable: true,
        },
        other => fatal(crate::client::explain(other)),
    }
}

/// What the receiving half of an attempt needs.
struct Incoming {
    total: u64,
    entry: EntryInfo,
    chunk: usize,
    session: [u8; 16],
    port: u16,
    have: Option<Vec<u8>>,
}

/// Run the UDP receive for one negotiated session into `sink`; returns the sink and the
/// sender's final hashes once the sender confirmed over TLS.
async fn receive<S: driver::Sink + Send + 'static>(
    conn: &Conn,
    stream: &mut crate::net::rpc::ResponseStream,
    inc: &Incoming,
    opts: &Options,
    sink: S,
    progress: Option<Progress>,
    shared: Arc<driver::Progress>,
) -> Result<(S, ([u8; 16], [u8; 32], u64)), Failure> {
    let server: SocketAddr = (conn.peer().addr.ip(), inc.port).into();
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_guard = StopOnDrop(stop.clone());
    let mut empty_sink = None;
    let mut task = if inc.total > 0 {
        let sock = driver::bind_for(server).map_err(|e| fatal(anyhow!("udp socket: {e}")))?;
        // Connected: the kernel drops datagrams from any other source.
        sock.connect(server)
            .map_err(|e| fatal(anyhow!("udp connect to {server}: {e}")))?;
        let params = receiver::Params {
            session: inc.session,
            total: inc.total,
            chunk: inc.chunk,
            datagram: opts.datagram.max(inc.chunk + DATA_OVERHEAD),
            idle_timeout: opts.idle_timeout,
        };
        let r = receiver::Receiver::new(
            &conn.peer().exporter,
            params,
            inc.have.as_deref(),
            Instant::now(),
        );
        if r.have_count() > 0 {
            tracing::info!(
                "udp: resuming with {} of {} chunks already here",
                r.have_count(),
                r.chunks()
            );
        }
        let (stop2, shared2, chunk, total) = (stop.clone(), shared.clone(), inc.chunk, inc.total);
        let mut sink = sink;
        Some(tokio::task::spawn_blocking(move || {
            let res = driver::run_receiver(&sock, r, &mut sink, chunk, total, &stop2, &shared2);
            (res, sink)
        }))
    } else {
        shared.complete.store(true, Ordering::Release);
        empty_sink = Some(sink);
        None
    };
    let ticker_total = inc.total;
    let finished = loop {
        let thread = async {
            match task.as_mut() {
                Some(t) => t.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = stream.next() => match r {
                Ok(Some(Response::Udp(UdpResponse::Finished { md5, sha256, size, stats }))) => {
                    tracing::info!("udp: sender reports {stats}");
                    break (md5, sha256, size);
                }
                Ok(Some(other)) => return Err(fatal(anyhow!("unexpected answer: {other:?}"))),
                Ok(None) => return Err(fatal(anyhow!("the peer ended the transfer without its hashes"))),
                Err(e) => return Err(remote_failure(e)),
            },
            r = thread => {
                return Err(match r {
                    Ok(((_, Err(e)), _)) => fatal(anyhow!("UDP transfer from {} failed: {e}; the partial data stays in .mybox/tmp and the next attempt resumes", conn.peer().id.short_str())),
                    Ok(((_, Ok(())), _)) => fatal(anyhow!("receiver stopped early")),
                    Err(e) => fatal(anyhow!("receiver failed: {e}")),
                });
            }
            _ = tokio::time::sleep(Duration::from_millis(100)) => {
                if let Some(p) = &progress {
                    p(shared.received.load(Ordering::Relaxed).min(ticker_total), ticker_total);
                }
            }
        }
    };
    stop.store(true, Ordering::Relaxed);
    let sink = match task {
        Some(t) => match t.await {
            Ok(((r, Ok(())), sink)) => {
                tracing::info!("udp: receiver counters: {}", r.counters);
                if !r.is_complete() {
                    return Err(fatal(anyhow!(
                        "sender finished but {} of {} chunks are missing",
                        r.chunks() - r.have_count(),
                        r.chunks()
                    )));
                }
                sink
            }
            Ok(((_, Err(e)), _)) => return Err(fatal(anyhow!("udp receiver: {e}"))),
            Err(e) => return Err(fatal(anyhow!("receiver failed: {e}"))),
        },
        None => empty_sink
            .take()
            .ok_or_else(|| fatal(anyhow!("internal: sink lost")))?,
    };
    if let Some(p) = &progress {
        p(inc.total, inc.total);
    }
    Ok((sink, finished))
}

async fn start(
    conn: &Conn,
    req: StartRequest,
) -> Result<
    (
        crate::net::rpc::ResponseStream,
        [u8; 16],
        u16,
        EntryInfo,
        u64,
        bool,
    ),
    Failure,
> {
    let mut stream = conn
        .request(Request::Udp(UdpRequest::Start(req)))
        .await
        .map_err(|e| fatal(crate::client::explain(e)))?;
    match stream.next().await {
        Ok(Some(Response::Udp(UdpResponse::Ready {
            session,
            port,
            entry,
            total,
            resumed,
        }))) => Ok((stream, session, port, entry, total, resumed)),
        Ok(other) => Err(fatal(anyhow!("unexpected answer: {other:?}"))),
        Err(e) => Err(remote_failure(e)),
    }
}

/// Hash the partial file's contiguous prefix as it grows (so the hashes are ready when the
/// last chunk lands), reading back what the receiver wrote.
fn hash_behind(
    file: Arc<std::fs::File>,
    total: u64,
    shared: Arc<driver::Progress>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<FileHashes> {
    let pipe = hashing::Pipeline::new();
    let mut pos = 0u64;
    while pos < total {
        let ready = shared.contiguous.load(Ordering::Acquire).min(total);
        if ready <= pos {
            if stop.load(Ordering::Relaxed) {
                return Err(std::io::Error::other("stopped"));
            }
            std::thread::sleep(Duration::from_millis(2));
            continue;
        }
        let n = (ready - pos).min(hashing::CHUNK as u64) as usize;
        let mut buf = vec![0u8; n];
        file.read_exact_at(&mut buf, pos)?;
        // Start writing the finished prefix to disk now, so the final fsync only waits for
        // the tail instead of the whole file (advisory; errors show at that fsync).
        if (pos + n as u64) % (16 << 20) < n as u64 {
            use std::os::fd::AsRawFd;
            let from = (pos + n as u64).saturating_sub(16 << 20);
            unsafe {
                libc::sync_file_range(
                    file.as_raw_fd(),
                    from as libc::off64_t,
                    (16 << 20) as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WRITE,
                )
            };
        }
        pos += n as u64;
        pipe.feed(buf.into())?;
    }
    pipe.finish()
}

/// Move the verified partial file to `dest` with the sender's mode and mtime. The partial
/// never sits at `dest`: a cross-device destination gets a temp copy next to it first.
fn install(part: &Path, dest: &Path, entry: &EntryInfo) -> anyhow::Result<()> {
    fn finish_file(f: &std::fs::File, entry: &EntryInfo) -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(entry.mode & 0o7777))?;
        let mtime = filetime::FileTime::from_unix_time(
            entry.mtime_ns.div_euclid(1_000_000_000),
            entry.mtime_ns.rem_euclid(1_000_000_000) as u32,
        );
        filetime::set_file_handle_times(f, None, Some(mtime))?;
        f.sync_all()?;
        Ok(())
    }
    let f = std::fs::OpenOptions::new().write(true).open(part)?;
    finish_file(&f, entry)?;
    drop(f);
    let dir = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    match std::fs::rename(part, dest) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            let name = dest
                .file_name()
                .ok_or_else(|| anyhow!("{}: not a file name", dest.display()))?;
            let tmp = dir.join(format!(
                ".{}.{:08x}{}",
                name.to_string_lossy(),
                rand::random::<u32>(),
                crate::scan::PART_SUFFIX
            ));
            let copy = (|| -> anyhow::Result<()> {
                let mut src = std::fs::File::open(part)?;
                let mut dst = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&tmp)?;
                std::io::copy(&mut src, &mut dst)?;
                finish_file(&dst, entry)?;
                std::fs::rename(&tmp, dest)?;
                Ok(())
            })();
            if let Err(e) = copy {
                let _ = std::fs::remove_file(&tmp);
                return Err(e.context(format!("copying into {}", dest.display())));
            }
            let _ = std::fs::remove_file(part);
        }
        Err(e) => return Err(anyhow!(e).context(format!("renaming into {}", dest.display()))),
    }
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

async fn fetch_file_once(
    conn: &Conn,
    dir: &BoxDir,
    path: &RelPath,
    dest: &Path,
    opts: &Options,
    progress: Option<Progress>,
) -> Result<(EntryInfo, FileHashes), Failure> {
    let peer = conn.peer().id.to_string();
    let partial = Partial::for_path(dir, &peer, path);
    std::fs::create_dir_all(dir.tmp_dir()).map_err(|e| fatal(anyhow!("{e}")))?;
    let prior = partial.load(&peer, path);
    let chunk = prior
        .as_ref()
        .map(|p| p.chunk as usize)
        .unwrap_or_else(|| opts.chunk());
    let req = StartRequest {
        path: path.clone(),
        offset: 0,
        len: None,
        chunk: chunk as u32,
        initial_rate: opts.initial_rate,
        max_rate: opts.max_rate,
        resume: prior.as_ref().map(|p| Resume {
            size: p.size,
            mtime_ns: p.mtime_ns,
            have: p.have.clone(),
        }),
    };
    let (mut stream, session, port, entry, total, resumed) = start(conn, req).await?;
    if entry.kind != Kind::File {
        return Err(fatal(anyhow!("{path}: not a regular file")));
    }
    if !resumed {
        partial.discard();
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&partial.part)
        .with_context(|| format!("creating {}", partial.part.display()))
        .map_err(fatal)?;
    file.set_len(total).map_err(|e| fatal(anyhow!("{e}")))?;
    let file = Arc::new(file);
    let state = PartialState {
        peer: peer.clone(),
        path: path.as_str().to_string(),
        size: entry.size,
        mtime_ns: entry.mtime_ns,
        chunk: chunk as u32,
        have: if resumed {
            prior.map(|p| p.have).unwrap_or_default()
        } else {
            Vec::new()
        },
    };
    let have = resumed.then(|| state.have.clone());
    let sink = FileSink {
        file: file.clone(),
        partial: Partial::for_path(dir, &peer, path),
        state,
    };
    let shared = Arc::new(driver::Progress::default());
    let hstop = Arc::new(AtomicBool::new(false));
    let _hstop_guard = StopOnDrop(hstop.clone());
    let hasher = {
        let (f, s, st) = (file.clone(), shared.clone(), hstop.clone());
        tokio::task::spawn_blocking(move || hash_behind(f, total, s, st))
    };
    let inc = Incoming {
        total,
        entry: entry.clone(),
        chunk,
        session,
        port,
        have,
    };
    let t_start = Instant::now();
    let (_sink, (md5, sha256, size)) = receive(
        conn,
        &mut stream,
        &inc,
        opts,
        sink,
        progress,
        shared.clone(),
    )
    .await?;
    let t_data = t_start.elapsed();
    shared.contiguous.store(total, Ordering::Release);
    let got = hasher
        .await
        .map_err(|e| fatal(anyhow!("hasher failed: {e}")))?
        .map_err(|e| fatal(anyhow!("hashing the received file: {e}")))?;
    if got.md5 != md5 || got.sha256 != sha256 || got.size != size || size != total {
        partial.discard();
        return Err(Failure {
            error: anyhow!(
                "verification failed: got {} bytes md5 {}, sender says {} bytes md5 {}",
                got.size,
                hex(&got.md5),
                size,
                hex(&md5)
            ),
            retryable: true,
        });
    }
    let mut entry = inc.entry;
    let dest2 = dest.to_path_buf();
    let part = partial.part.clone();
    let entry2 = entry.clone();
    let t_hash = t_start.elapsed();
    tokio::task::spawn_blocking(move || install(&part, &dest2, &entry2))
        .await
        .map_err(|e| fatal(anyhow!("{e}")))?
        .map_err(fatal)?;
    tracing::info!(
        "udp: {total} bytes: data and sender's hashes after {:.2}s, own hashes after {:.2}s, fsynced and in place after {:.2}s",
        t_data.as_secs_f64(),
        t_hash.as_secs_f64(),
        t_start.elapsed().as_secs_f64()
    );
    let _ = std::fs::remove_file(&partial.state);
    entry.md5 = Some(got.md5);
    entry.sha256 = Some(got.sha256);
    Ok((entry, got))
}

/// Fetch a whole file from the peer on `conn` over UDP into `dest` (verified, with the
/// sender's mode and mtime), retrying when the file changed under the sender. Partial data
/// lives in `dir`'s `.mybox/tmp/` and an interrupted fetch resumes from it.
pub async fn fetch_file(
    conn: &Conn,
    dir: &BoxDir,
    path: &RelPath,
    dest: &Path,
    opts: &Options,
    progress: Option<Progress>,
) -> anyhow::Result<Downloaded> {
    let mut last = None;
    for attempt in 1..=3 {
        match fetch_file_once(conn, dir, path, dest, opts, progress.clone()).await {
            Ok((entry, hashes)) => {
                return Ok(Downloaded {
                    path: dest.to_path_buf(),
                    entry,
                    hashes,
                    attempts: attempt,
                })
            }
            Err(f) if f.retryable => {
                tracing::warn!("udp download of {path} (attempt {attempt}): {:#}", f.error);
                last = Some(f.error);
            }
            Err(f) => return Err(f.error),
        }
    }
    Err(last.unwrap_or_else(|| anyhow!("download failed")))
}

/// Fetch `len` bytes at `offset` of the peer's `path` into memory over UDP (for the sync
/// engine's block fetches). Every byte is authenticated per datagram and the range's SHA-256
/// is checked against the sender's.
pub async fn fetch_range(
    conn: &Conn,
    path: &RelPath,
    offset: u64,
    len: u64,
    opts: &Options,
) -> anyhow::Result<Vec<u8>> {
    if len > crate::protocol::MAX_FRAME as u64 * 64 {
        bail!("range of {len} bytes is too large to fetch into memory");
    }
    let req = StartRequest {
        path: path.clone(),
        offset,
        len: Some(len),
        chunk: opts.chunk() as u32,
        initial_rate: opts.initial_rate,
        max_rate: opts.max_rate,
        resume: None,
    };
    let (mut stream, session, port, entry, total, _) =
        start(conn, req).await.map_err(|f| f.error)?;
    let inc = Incoming {
        total,
        entry,
        chunk: opts.chunk(),
        session,
        port,
        have: None,
    };
    let shared = Arc::new(driver::Progress::default());
    let sink = MemSink(vec![0u8; total as usize]);
    let (sink, (_md5, sha256, size)) = receive(conn, &mut stream, &inc, opts, sink, None, shared)
        .await
        .map_err(|f| f.error)?;
    let got: [u8; 32] = Sha256::digest(&sink.0).into();
    if got != sha256 || size != total {
        bail!("range {offset}+{len} of {path} did not verify");
    }
    Ok(sink.0)
}

/// `download udp`.
pub async fn download(
    s: &Session,
    path: &RelPath,
    dest: &Path,
    progress: Option<Progress>,
) -> anyhow::Result<Downloaded> {
    let what = format!("download udp {path}");
    let cfg = s.dir.load_config()?;
    let opts = Options::for_peer(cfg.udp_payload, s.conn.peer().addr);
    let res = fetch_file(&s.conn, &s.dir, path, dest, &opts, progress).await;
    let outcome = match &res {
        Ok(d) => format!("ok, {} bytes, md5 {}", d.entry.size, hex(&d.hashes.md5)),
        Err(e) => format!("error: {e:#}"),
    };
    s.history
        .record(Direction::Made, &s.peer_label, &what, &outcome);
    res
}

#[cfg(test)]
mod tests;
