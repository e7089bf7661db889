//! The asking side: a connection to a peer (or, for `--local`, to this box's own handler over an
//! in-memory pipe, so both answer through the same code), and the calls the CLI makes on it.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};

use crate::config::BoxDir;
use crate::hashing::{self, FileHashes};
use crate::history::{Direction, History};
use crate::identity::DeviceId;
use crate::locks::LockManager;
use crate::model::{EntryInfo, Kind};
use crate::net::rpc::{self, BoxFuture, Conn, Handler, PeerInfo, Responder, RpcError};
use crate::paths::RelPath;
use crate::protocol::{ErrorCode, ListFilter, Request, Response};
use crate::query::LocalBox;
use crate::server::{BoxHandler, ServerCtx};

/// Handler for the asking side of a CLI connection: it serves nothing.
pub struct RefuseAll;

impl Handler for RefuseAll {
    fn handle(&self, _conn: Conn, _req: Request, out: Responder) -> BoxFuture {
        Box::pin(async move {
            let _ = out
                .error(ErrorCode::Unsupported, "this end only asks")
                .await;
        })
    }
}

/// An open connection plus what the CLI needs to describe and log it.
pub struct Session {
    pub conn: Conn,
    pub peer_label: String,
    pub history: History,
    pub dir: BoxDir,
    _task: tokio::task::JoinHandle<()>,
}

/// Which peer a command is for: `--peer`, or the only one pinned.
pub fn choose_peer(dir: &BoxDir, wanted: Option<&str>) -> anyhow::Result<(DeviceId, String)> {
    let cfg = dir.load_config()?;
    if let Some(w) = wanted {
        let id: DeviceId = w.parse().map_err(|e| anyhow!("--peer {w:?}: {e}"))?;
        let p = cfg.find_peer(&id).ok_or_else(|| {
            anyhow!(
                "peer {} is not paired with this box (mybox peer list)",
                id.short_str()
            )
        })?;
        return Ok((id, p.addr.clone()));
    }
    match cfg.peers.as_slice() {
        [] => bail!("this box has no peer yet: pair one with `mybox peer add ID HOST:PORT`"),
        [p] => Ok((
            p.id.parse()
                .map_err(|e| anyhow!("bad peer id in config: {e}"))?,
            p.addr.clone(),
        )),
        many => bail!(
            "this box has {} peers; choose one with --peer ID ({})",
            many.len(),
            many.iter()
                .map(|p| p.id.get(..7).unwrap_or(&p.id).to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// The connection was closed during or right after the TLS handshake (an unpaired box, or a
/// server shedding pending handshakes), as opposed to refused, unreachable or timed out.
fn is_handshake_drop(e: &anyhow::Error) -> bool {
    let m = format!("{e:#}");
    m.contains("closed the connection during the handshake") || m.contains("TLS handshake with")
}

impl Session {
    /// Connect to a peer of `dir`.
    pub async fn remote(dir: &BoxDir, peer: Option<&str>) -> anyhow::Result<Session> {
        let (id, addr) = choose_peer(dir, peer)?;
        let ident = dir.identity()?;
        // A server with 32 handshakes pending drops the oldest (src/server.rs), which looks
        // exactly like a refusal: when many clients dial at once, try again a few times (with
        // jitter, so they do not return together) before reporting it.
        let mut attempt = 0u32;
        let (conn, task) = loop {
            match crate::net::connect(&ident, &addr, id, Arc::new(RefuseAll)).await {
                Ok(c) => break c,
                Err(e) if attempt < 3 && is_handshake_drop(&e) => {
                    attempt += 1;
                    let jitter = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| u64::from(d.subsec_nanos()) % 150)
                        .unwrap_or(0);
                    tracing::debug!("{e:#}; trying again ({attempt})");
                    tokio::time::sleep(std::time::Duration::from_millis((100 << attempt) + jitter))
                        .await;
                }
                Err(e) => return Err(e),
            }
        };
        Ok(Session {
            conn,
            peer_label: id.short_str(),
            history: History::new(dir),
            dir: dir.clone(),
            _task: task,
        })
    }

    /// A connection to this box's own request handler, in memory.
    pub async fn local(dir: &BoxDir) -> anyhow::Result<Session> {
        let local = Arc::new(LocalBox::open(dir.clone())?);
        let ctx = ServerCtx::new(local, LockManager::new())?;
        let me = ctx.ident.id;
        let (a, b) = tokio::io::duplex(4 * 1024 * 1024);
        let info = PeerInfo {
            id: me,
            addr: ([127, 0, 0, 1], 0).into(),
            exporter: rand::random_exporter(),
        };
        let (_server_conn, server_task) = rpc::spawn(b, info.clone(), Arc::new(BoxHandler(ctx)));
        let (conn, task) = rpc::spawn(a, info, Arc::new(RefuseAll));
        // The server half lives as long as the client half.
        let task = tokio::spawn(async move {
            let _ = task.await;
            server_task.abort();
        });
        Ok(Session {
            conn,
            peer_label: "self".into(),
            history: History::new(dir),
            dir: dir.clone(),
            _task: task,
        })
    }

    fn log(&self, request: &str, outcome: &str) {
        self.history
            .record(Direction::Made, &self.peer_label, request, outcome);
    }

    async fn entries(&self, req: Request, what: &str) -> anyhow::Result<Vec<EntryInfo>> {
        let run = async {
            let mut s = self.conn.request(req).await?;
            let mut all = Vec::new();
            while let Some(r) = s.next().await? {
                match r {
                    Response::Entries(mut e) => all.append(&mut e),
                    other => return Err(RpcError::Unexpected(format!("{other:?}"))),
                }
            }
            Ok::<_, RpcError>(all)
        };
        match run.await {
            Ok(v) => {
                self.log(what, &format!("ok, {} entries", v.len()));
                Ok(v)
            }
            Err(e) => {
                self.log(what, &format!("error: {e}"));
                Err(explain(e))
            }
        }
    }

    pub async fn list(&self, filter: ListFilter, what: &str) -> anyhow::Result<Vec<EntryInfo>> {
        self.entries(Request::List { filter }, what).await
    }

    pub async fn hash(&self, filter: ListFilter, what: &str) -> anyhow::Result<Vec<EntryInfo>> {
        self.entries(Request::Hash { filter }, what).await
    }
}

/// Turn a remote error into a one-line message a person understands.
pub fn explain(e: RpcError) -> anyhow::Error {
    match e {
        RpcError::Remote { message, .. } => anyhow!("peer says: {message}"),
        RpcError::Closed => anyhow!("the peer closed the connection"),
        other => anyhow!("{other}"),
    }
}

mod rand {
    /// Exporter bytes for the in-memory `--local` connection (no TLS there to export from).
    pub fn random_exporter() -> [u8; 64] {
        use ::rand::RngCore;
        let mut b = [0u8; 64];
        ::rand::thread_rng().fill_bytes(&mut b);
        b
    }
}

/// Result of a finished, verified download.
#[derive(Debug, Clone)]
pub struct Downloaded {
    pub path: PathBuf,
    pub entry: EntryInfo,
    pub hashes: FileHashes,
    pub attempts: u32,
}

/// Progress callback: (bytes so far, total).
pub type Progress = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// A file being received: written through a temp file next to the target, hashed on two cores
/// as it arrives, then checked, fsynced and renamed into place.
pub struct Receiver {
    tmp: PathBuf,
    file: Option<std::fs::File>,
    pipeline: Option<hashing::Pipeline>,
    written: u64,
}

impl Receiver {
    pub fn create(dest: &Path) -> anyhow::Result<Receiver> {
        let dir = dest
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = dest
            .file_name()
            .ok_or_else(|| anyhow!("{}: not a file name", dest.display()))?;
        let tmp = dir.join(format!(
            ".{}.{:08x}{}",
            name.to_string_lossy(),
            ::rand::random::<u32>(),
            crate::scan::PART_SUFFIX
        ));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        Ok(Receiver {
            tmp,
            file: Some(file),
            pipeline: Some(hashing::Pipeline::with_blocks(false)),
            written: 0,
        })
    }

    pub fn write(&mut self, data: bytes::Bytes) -> anyhow::Result<()> {
        let f = self
            .file
            .as_mut()
            .ok_or_else(|| anyhow!("receiver closed"))?;
        // Hash first, then write: the hash threads get the bytes while this thread may sit in the
        // kernel's dirty-page throttling, so MD5 (the slowest step) never waits on the disk.
        if let Some(p) = &self.pipeline {
            p.feed(data.clone())?;
        }
        f.write_all(&data)
            .with_context(|| format!("writing {}", self.tmp.display()))?;
        let before = self.written;
        self.written += data.len() as u64;
        // Nudge the kernel's writeback every 32 MiB, so the fsync in `finish` has little left.
        if before >> 25 != self.written >> 25 {
            use std::os::fd::AsRawFd;
            // SAFETY: the descriptor is open for the call; 0, 0 means the whole file.
            unsafe {
                libc::sync_file_range(f.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
            }
        }
        Ok(())
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    /// Check the received bytes against `expect` (the sender's hashes) and move the file into
    /// place with the sender's mode and mtime. On mismatch the temp file is removed.
    pub fn finish(
        mut self,
        dest: &Path,
        entry: &EntryInfo,
        expect_md5: [u8; 16],
        expect_sha: [u8; 32],
    ) -> anyhow::Result<FileHashes> {
        let got = self
            .pipeline
            .take()
            .ok_or_else(|| anyhow!("receiver closed"))?
            .finish()?;
        if got.md5 != expect_md5 || got.sha256 != expect_sha || got.size != entry.size {
            bail!(
                "verification failed: got {} bytes md5 {}, sender says {} bytes md5 {}",
                got.size,
                crate::model::hex(&got.md5),
                entry.size,
                crate::model::hex(&expect_md5)
            );
        }
        let f = self.file.take().ok_or_else(|| anyhow!("receiver closed"))?;
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(entry.mode & 0o7777))?;
        let mtime = filetime::FileTime::from_unix_time(
            entry.mtime_ns.div_euclid(1_000_000_000),
            entry.mtime_ns.rem_euclid(1_000_000_000) as u32,
        );
        filetime::set_file_handle_times(&f, None, Some(mtime))?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&self.tmp, dest)
            .with_context(|| format!("renaming into {}", dest.display()))?;
        if let Some(dir) = dest.parent() {
            if let Ok(d) = std::fs::File::open(if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            }) {
                let _ = d.sync_all();
            }
        }
        Ok(got)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// `download tcp`: fetch `path` from the peer into `dest`, verify, retry a few times if the file
/// changed under the sender or the bytes did not verify.
pub async fn download_tcp(
    s: &Session,
    path: &RelPath,
    dest: &Path,
    progress: Option<Progress>,
) -> anyhow::Result<Downloaded> {
    let what = format!("download tcp {path}");
    let mut last_err = None;
    for attempt in 1..=3 {
        match download_tcp_once(s, path, dest, progress.clone()).await {
            Ok((entry, hashes)) => {
                s.log(
                    &what,
                    &format!(
                        "ok, {} bytes, md5 {}",
                        entry.size,
                        crate::model::hex(&hashes.md5)
                    ),
                );
                return Ok(Downloaded {
                    path: dest.to_path_buf(),
                    entry,
                    hashes,
                    attempts: attempt,
                });
            }
            Err(e) => {
                let retry = e.retryable;
                s.log(&what, &format!("attempt {attempt}: {}", e.error));
                if !retry {
                    return Err(e.error);
                }
                tracing::warn!(
                    "download of {path} failed (attempt {attempt}): {:#}",
                    e.error
                );
                last_err = Some(e.error);
            }
        }
    }
    Err(last_err.unwrap_or_else(|| anyhow!("download failed")))
}

/// Why a download attempt failed, and whether trying again can help (shared by TCP and UDP).
pub(crate) struct Failure {
    pub(crate) error: anyhow::Error,
    pub(crate) retryable: bool,
}

pub(crate) fn fatal(e: impl Into<anyhow::Error>) -> Failure {
    Failure {
        error: e.into(),
        retryable: false,
    }
}

async fn download_tcp_once(
    s: &Session,
    path: &RelPath,
    dest: &Path,
    progress: Option<Progress>,
) -> Result<(EntryInfo, FileHashes), Failure> {
    let mut stream = s
        .conn
        .request(Request::Download {
            path: path.clone(),
            offset: 0,
        })
        .await
        .map_err(|e| fatal(explain(e)))?;
    let entry = match stream.next().await {
        Ok(Some(Response::FileHeader { entry })) => entry,
        Ok(other) => return Err(fatal(anyhow!("unexpected answer: {other:?}"))),
        Err(RpcError::Remote {
            code: ErrorCode::Changed | ErrorCode::Busy,
            message,
        }) => {
            return Err(Failure {
                error: anyhow!("peer says: {message}"),
                retryable: true,
            })
        }
        Err(e) => return Err(fatal(explain(e))),
    };
    if entry.kind != Kind::File {
        return Err(fatal(anyhow!("{path}: not a regular file")));
    }
    // Blocking file writes happen on a dedicated thread fed through a bounded channel.
    let (tx, rx) = std::sync::mpsc::sync_channel::<bytes::Bytes>(8);
    let dest_owned = dest.to_path_buf();
    let writer = tokio::task::spawn_blocking(move || -> anyhow::Result<Receiver> {
        let mut r = Receiver::create(&dest_owned)?;
        for chunk in rx {
            r.write(chunk)?;
        }
        Ok(r)
    });
    let mut got: u64 = 0;
    let trailer = loop {
        match stream.next().await {
            Ok(Some(Response::Data(d))) => {
                got += d.len() as u64;
                if let Some(p) = &progress {
                    p(got, entry.size);
                }
                if tx.send(d.into_bytes()).is_err() {
                    break None;
                }
            }
            Ok(Some(Response::FileTrailer { md5, sha256, size })) => {
                break Some((md5, sha256, size))
            }
            Ok(Some(other)) => {
                drop(tx);
                let _ = writer.await;
                return Err(fatal(anyhow!("unexpected answer: {other:?}")));
            }
            Ok(None) => break None,
            Err(RpcError::Remote {
                code: ErrorCode::Changed,
                message,
            }) => {
                drop(tx);
                let _ = writer.await;
                return Err(Failure {
                    error: anyhow!("peer says: {message}"),
                    retryable: true,
                });
            }
            Err(e) => {
                drop(tx);
                let _ = writer.await;
                return Err(fatal(explain(e)));
            }
        }
    };
    drop(tx);
    let receiver = match writer.await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Err(fatal(e)),
        Err(e) => return Err(fatal(anyhow!("writer failed: {e}"))),
    };
    let Some((md5, sha256, size)) = trailer else {
        return Err(fatal(anyhow!("transfer ended early after {got} bytes")));
    };
    let mut entry = entry;
    entry.size = size;
    let dest_owned = dest.to_path_buf();
    let entry2 = entry.clone();
    let hashes =
        tokio::task::spawn_blocking(move || receiver.finish(&dest_owned, &entry2, md5, sha256))
            .await
            .map_err(|e| fatal(anyhow!("{e}")))?
            .map_err(|e| Failure {
                error: e,
                retryable: true,
            })?;
    entry.md5 = Some(hashes.md5);
    entry.sha256 = Some(hashes.sha256);
    Ok((entry, hashes))
}
