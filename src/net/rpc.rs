//! One authenticated connection carrying many requests at once, in both directions. A reader
//! task decodes frames (closing the connection on a malformed or oversized one) and either
//! routes a response to its waiting caller or hands a request to the [`Handler`]; a writer task
//! owns the socket's write half. Bounded channels give backpressure end to end.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Semaphore};

use crate::identity::DeviceId;
use crate::protocol::{self, ErrorCode, Frame, Request, Response};

/// A connection with no frame at all for this long is closed (peers ping well within it).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Once a frame has started, the rest of it must arrive within this (slow-loris guard).
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(30);
/// Requests one connection may have in flight on the serving side.
pub const MAX_INFLIGHT: usize = 64;
/// The most a frame's buffer reserves before its bytes arrive.
const RESERVE_UP_FRONT: usize = 4 * 1024 * 1024;
/// Bytes of large answers (bulk data) queued for the writer at once, in KiB. Counting frames
/// let a fast reader of the disk queue 64 MiB-sized answers: memory the process touched for
/// the first time, page by page, on every transfer. The socket's own buffer covers the link.
const OUT_BUDGET_KIB: u32 = 4096;
/// Frames smaller than this skip the budget (requests, listings, control answers).
const BUDGETED_MIN: usize = 64 * 1024;

/// What is known about the other end of a connection.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub id: DeviceId,
    pub addr: std::net::SocketAddr,
    /// 64 bytes exported from the TLS session (RFC 5705, label "EXPORTER-mybox-udp"): the root
    /// of the UDP bulk path's keys, known only to the two ends of this connection.
    pub exporter: [u8; 64],
}

pub type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Serves requests arriving on a connection.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, conn: Conn, req: Request, out: Responder) -> BoxFuture;
}

#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("connection closed")]
    Closed,
    #[error("request cancelled by the peer")]
    Cancelled,
    #[error("{0}")]
    Frame(#[from] protocol::FrameError),
    #[error("peer error ({code:?}): {message}")]
    Remote { code: ErrorCode, message: String },
    #[error("unexpected response: {0}")]
    Unexpected(String),
}

struct Shared {
    out: mpsc::Sender<Outgoing>,
    /// [`OUT_BUDGET_KIB`] permits; closed with the connection.
    out_budget: Arc<Semaphore>,
    pending: Mutex<HashMap<u32, mpsc::Sender<(Response, bool)>>>,
    cancelled: Mutex<HashSet<u32>>,
    next_id: AtomicU32,
    closed: AtomicBool,
    closed_notify: tokio::sync::Notify,
    info: PeerInfo,
}

/// A handle on a live connection; cheap to clone.
#[derive(Clone)]
pub struct Conn {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Conn({:?} at {})",
            self.shared.info.id, self.shared.info.addr
        )
    }
}

/// One encoded frame on its way to the writer task, as the pieces [`protocol::encode_parts`]
/// made of it (bulk data referenced, not copied into a frame buffer), with its share of the
/// queue's byte budget, given back once it is written.
struct Outgoing {
    frame: protocol::EncodedFrame,
    _budget: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl From<protocol::EncodedFrame> for Outgoing {
    fn from(frame: protocol::EncodedFrame) -> Outgoing {
        Outgoing {
            frame,
            _budget: None,
        }
    }
}

impl Outgoing {
    /// Write every piece, many per call: the TLS layer seals records across pieces, so the
    /// small ones between data blocks cost neither a record nor a system call of their own.
    async fn write_to<W: AsyncWrite + Unpin>(&self, wr: &mut W) -> std::io::Result<()> {
        let parts = &self.frame.parts;
        let (mut i, mut off) = (0usize, 0usize);
        while i < parts.len() {
            let slices: Vec<std::io::IoSlice<'_>> = std::iter::once(&parts[i][off..])
                .chain(parts[i + 1..].iter().map(|p| &p[..]))
                .take(64)
                .map(std::io::IoSlice::new)
                .collect();
            let mut n = wr.write_vectored(&slices).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            while n > 0 && i < parts.len() {
                let left = parts[i].len() - off;
                if n >= left {
                    n -= left;
                    i += 1;
                    off = 0;
                } else {
                    off += n;
                    n = 0;
                }
            }
            // Empty pieces (none are made, but nothing breaks if one is).
            while i < parts.len() && parts[i].len() == off {
                i += 1;
                off = 0;
            }
        }
        Ok(())
    }
}

/// Sends the responses to one request.
pub struct Responder {
    id: u32,
    shared: Arc<Shared>,
    ended: bool,
}

impl Responder {
    async fn push(&mut self, body: Response, end: bool) -> Result<(), RpcError> {
        if self.ended {
            return Ok(());
        }
        if self
            .shared
            .cancelled
            .lock()
            .map(|c| c.contains(&self.id))
            .unwrap_or(false)
        {
            return Err(RpcError::Cancelled);
        }
        let frame = protocol::encode_parts(&Frame::Response {
            id: self.id,
            end,
            body,
        })?;
        let budget = if frame.len >= BUDGETED_MIN {
            let kib = (frame.len / 1024).min(OUT_BUDGET_KIB as usize) as u32;
            let permit = self.shared.out_budget.clone().acquire_many_owned(kib).await;
            Some(permit.map_err(|_| RpcError::Closed)?)
        } else {
            None
        };
        self.ended = end;
        self.shared
            .out
            .send(Outgoing {
                frame,
                _budget: budget,
            })
            .await
            .map_err(|_| RpcError::Closed)
    }

    /// A response with more to follow.
    pub async fn send(&mut self, body: Response) -> Result<(), RpcError> {
        self.push(body, false).await
    }

    /// The last response.
    pub async fn end(mut self, body: Response) -> Result<(), RpcError> {
        self.push(body, true).await
    }

    pub async fn error(self, code: ErrorCode, message: impl Into<String>) -> Result<(), RpcError> {
        self.end(Response::Error {
            code,
            message: message.into(),
        })
        .await
    }

    pub fn is_cancelled(&self) -> bool {
        self.shared
            .cancelled
            .lock()
            .map(|c| c.contains(&self.id))
            .unwrap_or(true)
            || self.shared.closed.load(Ordering::Relaxed)
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        if !self.ended {
            // A handler that returned without a final response still closes the request.
            if let Ok(bytes) = protocol::encode_parts(&Frame::Response {
                id: self.id,
                end: true,
                body: Response::Error {
                    code: ErrorCode::Internal,
                    message: "request ended without an answer".into(),
                },
            }) {
                let _ = self.shared.out.try_send(bytes.into());
            }
        }
        if let Ok(mut c) = self.shared.cancelled.lock() {
            c.remove(&self.id);
        }
    }
}

/// The responses to one request, in order.
pub struct ResponseStream {
    id: u32,
    rx: mpsc::Receiver<(Response, bool)>,
    shared: Arc<Shared>,
    done: bool,
}

impl ResponseStream {
    /// Next response; `None` after the last one.
    pub async fn next(&mut self) -> Result<Option<Response>, RpcError> {
        if self.done {
            return Ok(None);
        }
        match self.rx.recv().await {
            Some((Response::Error { code, message }, _)) => {
                self.done = true;
                Err(RpcError::Remote { code, message })
            }
            Some((resp, end)) => {
                self.done = end;
                Ok(Some(resp))
            }
            None => Err(RpcError::Closed),
        }
    }
}

impl Drop for ResponseStream {
    fn drop(&mut self) {
        if let Ok(mut p) = self.shared.pending.lock() {
            p.remove(&self.id);
        }
        if !self.done {
            if let Ok(bytes) = protocol::encode_parts(&Frame::Cancel { id: self.id }) {
                let _ = self.shared.out.try_send(bytes.into());
            }
        }
    }
}

impl Conn {
    pub fn peer(&self) -> &PeerInfo {
        &self.shared.info
    }

    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Relaxed)
    }

    /// Resolves when the connection has closed.
    pub async fn closed(&self) {
        loop {
            let notified = self.shared.closed_notify.notified();
            if self.is_closed() {
                return;
            }
            notified.await;
        }
    }

    /// Send a request; read its responses from the stream.
    pub async fn request(&self, body: Request) -> Result<ResponseStream, RpcError> {
        if self.is_closed() {
            return Err(RpcError::Closed);
        }
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(16);
        if let Ok(mut p) = self.shared.pending.lock() {
            p.insert(id, tx);
        }
        let stream = ResponseStream {
            id,
            rx,
            shared: self.shared.clone(),
            done: false,
        };
        let bytes = protocol::encode_parts(&Frame::Request { id, body })?;
        self.shared
            .out
            .send(bytes.into())
            .await
            .map_err(|_| RpcError::Closed)?;
        Ok(stream)
    }

    /// Send a request that has exactly one response.
    pub async fn call(&self, body: Request) -> Result<Response, RpcError> {
        let mut s = self.request(body).await?;
        match s.next().await? {
            Some(r) => Ok(r),
            None => Err(RpcError::Closed),
        }
    }

    /// Close the connection (pending requests fail with `Closed`).
    pub fn close(&self) {
        mark_closed(&self.shared);
    }
}

fn mark_closed(shared: &Shared) {
    shared.closed.store(true, Ordering::Relaxed);
    shared.out_budget.close();
    if let Ok(mut p) = shared.pending.lock() {
        p.clear();
    }
    shared.closed_notify.notify_waiters();
}

/// Start the reader and writer tasks of a connection. `handler` serves the peer's requests.
/// The returned join handle finishes when the connection is gone.
pub fn spawn<S>(
    stream: S,
    info: PeerInfo,
    handler: Arc<dyn Handler>,
) -> (Conn, tokio::task::JoinHandle<()>)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let (out_tx, mut out_rx) = mpsc::channel::<Outgoing>(64);
    let shared = Arc::new(Shared {
        out: out_tx,
        out_budget: Arc::new(Semaphore::new(OUT_BUDGET_KIB as usize)),
        pending: Mutex::new(HashMap::new()),
        cancelled: Mutex::new(HashSet::new()),
        next_id: AtomicU32::new(1),
        closed: AtomicBool::new(false),
        closed_notify: tokio::sync::Notify::new(),
        info,
    });
    let conn = Conn {
        shared: shared.clone(),
    };

    let writer_shared = shared.clone();
    let writer = tokio::spawn(async move {
        while let Some(frame) = out_rx.recv().await {
            if frame.write_to(&mut wr).await.is_err() {
                break;
            }
            // Coalesce: only flush once the queue is momentarily empty.
            while let Ok(more) = out_rx.try_recv() {
                if more.write_to(&mut wr).await.is_err() {
                    mark_closed(&writer_shared);
                    return;
                }
            }
            if wr.flush().await.is_err() {
                break;
            }
            if writer_shared.closed.load(Ordering::Relaxed) {
                break;
            }
        }
        let _ = wr.shutdown().await;
        mark_closed(&writer_shared);
    });

    let reader_conn = conn.clone();
    let writer_abort = writer.abort_handle();
    let task = tokio::spawn(async move {
        // However this task ends (including being aborted), the writer goes with it.
        struct AbortOnDrop(tokio::task::AbortHandle);
        impl Drop for AbortOnDrop {
            fn drop(&mut self) {
                self.0.abort();
            }
        }
        let _writer_guard = AbortOnDrop(writer_abort);
        let shared = reader_conn.shared.clone();
        let inflight = Arc::new(Semaphore::new(MAX_INFLIGHT));
        let result = read_loop(&mut rd, &reader_conn, &handler, &inflight).await;
        if let Err(e) = result {
            tracing::info!(
                "connection with {} ({}) closed: {e}",
                shared.info.id.short_str(),
                shared.info.addr
            );
        }
        mark_closed(&shared);
    });
    (conn, task)
}

async fn read_loop<R: AsyncRead + Unpin>(
    rd: &mut R,
    conn: &Conn,
    handler: &Arc<dyn Handler>,
    inflight: &Arc<Semaphore>,
) -> anyhow::Result<()> {
    let shared = &conn.shared;
    loop {
        let mut prefix = [0u8; 4];
        match tokio::time::timeout(IDLE_TIMEOUT, rd.read_exact(&mut prefix)).await {
            Err(_) => anyhow::bail!("idle for {}s", IDLE_TIMEOUT.as_secs()),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(Err(e)) => return Err(e.into()),
            Ok(Ok(_)) => {}
        }
        let len = protocol::check_len(prefix)?;
        // `len` was checked against the cap; read without zero-filling first. Reserve at most
        // 4 MiB up front: a peer that announces 16 MiB and sends 4 bytes must not make us
        // reserve 16 MiB per connection; bigger frames grow as their bytes arrive. Data frames
        // and batch answers (up to ~2 MiB) fit at once: growing means copying what arrived.
        let mut body = Vec::with_capacity(len.min(RESERVE_UP_FRONT));
        let got = tokio::time::timeout(
            FRAME_TIMEOUT,
            (&mut *rd).take(len as u64).read_to_end(&mut body),
        )
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "frame of {len} bytes not completed within {}s",
                FRAME_TIMEOUT.as_secs()
            )
        })??;
        if got != len {
            anyhow::bail!("connection closed in the middle of a {len}-byte frame");
        }
        match protocol::decode_shared(body.into())? {
            Frame::Response { id, end, body } => {
                let tx = shared.pending.lock().ok().and_then(|p| p.get(&id).cloned());
                if let Some(tx) = tx {
                    // The caller may have gone; that is its business.
                    let _ = tx.send((body, end)).await;
                }
                if end {
                    if let Ok(mut p) = shared.pending.lock() {
                        p.remove(&id);
                    }
                }
            }
            Frame::Cancel { id } => {
                if let Ok(mut c) = shared.cancelled.lock() {
                    c.insert(id);
                }
            }
            Frame::Request { id, body } => {
                let permit = inflight.clone().acquire_owned().await?;
                let responder = Responder {
                    id,
                    shared: shared.clone(),
                    ended: false,
                };
                let fut = handler.handle(conn.clone(), body, responder);
                tokio::spawn(async move {
                    fut.await;
                    drop(permit);
                });
            }
        }
    }
}
