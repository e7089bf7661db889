//! On-demand reads of placeholders: the file is streamed from a peer into a temp file, block by
//! block, while it is being read. A read waits only for the blocks it covers, and asks for them
//! ahead of the background stream; the stream follows the last read (sequential readers find
//! their next blocks in flight already) and fills the rest. Every block is verified against its
//! SHA-256 before it counts as present. When the file is complete it is installed like any
//! pulled file (temp + rename, index commit) and later opens read the store file.

use std::collections::BTreeSet;
use std::fs::File;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::{
    blocking, checked_retry, fetch_run, fetch_run_checked, lock, write_blocks, Engine,
    FETCH_PIPELINE, WRITEBACK_EVERY,
};
use crate::model::{Kind, Record, BLOCK_SIZE};
use crate::sync::apply::{ApplyError, Building};
use crate::sync::proto::MAX_BLOCKS_PER_REQUEST;
use crate::vfs::{VfsError, VfsResult};

/// Extra requests allowed in flight for blocks a reader waits for, so a read far from the
/// stream does not queue behind it.
const URGENT_EXTRA: usize = 4;
/// Failed block requests of one stream asked again before it gives up.
const RUN_RETRIES: u32 = 3;

/// A placeholder being streamed in (shared by every open of it).
pub struct Hydration {
    rec: Record,
    /// The temp file, for readers (the fetcher writes through its own descriptor).
    file: Arc<File>,
    st: Mutex<State>,
    /// Readers wait here for blocks, failure or installation.
    arrived: Condvar,
    /// Readers wake the fetcher with new urgent blocks.
    wake: Notify,
}

struct State {
    /// Blocks present and verified in the temp file.
    have: Vec<bool>,
    missing: usize,
    /// Blocks fetched or being fetched.
    asked: Vec<bool>,
    /// Blocks readers wait for, not asked for yet.
    urgent: BTreeSet<u64>,
    /// Where the background stream continues.
    cursor: u64,
    failed: Option<String>,
    /// Installed in the store: `Some(Ok)`; complete but not installed: `Some(Err)`.
    installed: Option<Result<(), String>>,
}

impl Hydration {
    fn new(rec: &Record, file: File, missing: &[u64]) -> Hydration {
        let n = rec.blocks.len();
        let mut have = vec![true; n];
        for &i in missing {
            if let Some(h) = have.get_mut(i as usize) {
                *h = false;
            }
        }
        Hydration {
            rec: rec.clone(),
            file: Arc::new(file),
            st: Mutex::new(State {
                asked: have.clone(),
                have,
                missing: missing.len(),
                urgent: BTreeSet::new(),
                cursor: 0,
                failed: None,
                installed: None,
            }),
            arrived: Condvar::new(),
            wake: Notify::new(),
        }
    }

    fn failed(&self) -> bool {
        lock(&self.st).failed.is_some()
    }

    fn fail(&self, msg: String) {
        let mut st = lock(&self.st);
        if st.failed.is_none() {
            st.failed = Some(msg);
        }
        drop(st);
        self.arrived.notify_all();
    }

    fn set_installed(&self, r: Result<(), String>) {
        lock(&self.st).installed = Some(r);
        self.arrived.notify_all();
    }

    /// Blocks present so far (for status and logs).
    pub fn present(&self) -> (usize, usize) {
        let st = lock(&self.st);
        (st.have.len() - st.missing, st.have.len())
    }

    /// The next run of blocks to ask for: those readers wait for first, else the stream's.
    fn next_run(&self) -> Option<(u64, usize)> {
        let mut st = lock(&self.st);
        let n = st.have.len() as u64;
        let start = loop {
            let Some(i) = st.urgent.pop_first() else {
                break None;
            };
            if !st.asked[i as usize] {
                break Some(i);
            }
        };
        let start = match start {
            Some(i) => i,
            None => {
                let c = st.cursor.min(n);
                (c..n).chain(0..c).find(|&i| !st.asked[i as usize])?
            }
        };
        let mut len = 0usize;
        while len < MAX_BLOCKS_PER_REQUEST
            && start + (len as u64) < n
            && !st.asked[(start + len as u64) as usize]
        {
            st.asked[(start + len as u64) as usize] = true;
            len += 1;
        }
        st.cursor = start + len as u64;
        Some((start, len))
    }

    fn has_urgent(&self) -> bool {
        !lock(&self.st).urgent.is_empty()
    }

    /// A request for these blocks failed: ask for them again, first.
    fn ask_again(&self, first: u64, len: usize) {
        let mut st = lock(&self.st);
        for i in first..first + len as u64 {
            if !st.have[i as usize] {
                st.asked[i as usize] = false;
                st.urgent.insert(i);
            }
        }
    }

    fn arrived_run(&self, first: u64, len: usize) {
        let mut st = lock(&self.st);
        for i in first..first + len as u64 {
            if !std::mem::replace(&mut st.have[i as usize], true) {
                st.missing -= 1;
            }
        }
        drop(st);
        self.arrived.notify_all();
    }

    /// Wait until the file is installed in the store (or that failed), at most `timeout`.
    pub fn wait_installed(&self, timeout: Duration) -> anyhow::Result<()> {
        let end = Instant::now() + timeout;
        let mut st = lock(&self.st);
        loop {
            if let Some(e) = &st.failed {
                anyhow::bail!("{}", e);
            }
            if let Some(r) = &st.installed {
                return r.clone().map_err(|e| anyhow::anyhow!("{e}"));
            }
            let now = Instant::now();
            if now >= end {
                anyhow::bail!("{}: not fetched within {timeout:?}", self.rec.path);
            }
            st = self
                .arrived
                .wait_timeout(st, end - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

impl crate::vfs::hooks::Hydration for Hydration {
    fn file(&self) -> Arc<File> {
        self.file.clone()
    }

    fn wait(&self, offset: u64, len: u64, timeout: Duration) -> VfsResult<()> {
        let size = self.rec.size;
        if len == 0 || offset >= size {
            return Ok(());
        }
        let end = offset.saturating_add(len).min(size);
        let (first, last) = (offset / BLOCK_SIZE, (end - 1) / BLOCK_SIZE);
        let deadline = Instant::now() + timeout;
        let mut st = lock(&self.st);
        let mut asked = false;
        loop {
            if let Some(e) = &st.failed {
                return Err(VfsError::new(libc::EIO, e.clone()));
            }
            if (first..=last).all(|i| st.have[i as usize]) {
                return Ok(());
            }
            if !asked {
                asked = true;
                let want: Vec<u64> = (first..=last).filter(|&i| !st.asked[i as usize]).collect();
                if !want.is_empty() {
                    tracing::debug!(
                        "{}: read at block {first} asks for {} blocks ahead of the stream \
                         ({} of {} blocks here)",
                        self.rec.path,
                        want.len(),
                        st.have.len() - st.missing,
                        st.have.len()
                    );
                    st.urgent.extend(want);
                    self.wake.notify_one();
                }
                // The stream goes on from here: a sequential reader's next blocks come next.
                st.cursor = last + 1;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(VfsError::new(
                    libc::EIO,
                    format!(
                        "{}: block {first} not fetched within {timeout:?}",
                        self.rec.path
                    ),
                ));
            }
            st = self
                .arrived
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

impl Engine {
    /// Start streaming placeholder `record` into a temp file for reads (or join the stream under
    /// way). Fails at once when no connected peer has this version.
    pub fn hydrate(self: &Arc<Self>, record: &Record) -> anyhow::Result<Arc<Hydration>> {
        let path = record.path.clone();
        if record.kind != Kind::File {
            anyhow::bail!("{path}: not a file");
        }
        if let Some(h) = lock(&self.hydrations).get(&path) {
            if h.rec.same_content(record) && !h.failed() {
                return Ok(h.clone());
            }
        }
        let peer = lock(&self.db)
            .remote_records(&path)?
            .into_iter()
            .filter(|(_, r)| r.same_content(record))
            .map(|(peer, _)| peer)
            .find(|p| self.conn_for(p).is_some())
            .ok_or_else(|| anyhow::anyhow!("{path}: no connected peer has this version"))?;
        let expected = self
            .ctx
            .local
            .index
            .lock()
            .map_err(|_| anyhow::anyhow!("index lock"))?
            .get(&path)?
            .map(|s| s.record);
        let building = self
            .applier
            .prepare_file(record)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let h = Arc::new(Hydration::new(
            record,
            building.file.try_clone()?,
            &building.missing,
        ));
        {
            let mut all = lock(&self.hydrations);
            match all.get(&path) {
                // Another open started the same stream meanwhile: ours is dropped (temp removed).
                Some(other) if other.rec.same_content(record) && !other.failed() => {
                    return Ok(other.clone());
                }
                _ => {
                    all.insert(path.clone(), h.clone());
                }
            }
        }
        tracing::info!(
            "{path}: streaming {} of {} bytes for a read",
            building
                .missing
                .iter()
                .map(|i| building.block_len(*i))
                .sum::<u64>(),
            record.size
        );
        self.rt.spawn(
            self.clone()
                .hydrate_run(h.clone(), building, peer, expected),
        );
        Ok(h)
    }

    async fn hydrate_run(
        self: Arc<Self>,
        h: Arc<Hydration>,
        building: Building,
        peer: String,
        expected: Option<Record>,
    ) {
        let path = h.rec.path.clone();
        let building = Arc::new(building);
        self.busy.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let fetched = self.hydrate_fetch(&h, &building, &peer).await;
        self.busy.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        let result = match fetched.and_then(|()| {
            Arc::try_unwrap(building)
                .map_err(|_| ApplyError::Other(format!("{path}: temp file still in use")))
        }) {
            Err(e) => {
                let msg = format!("{e}");
                tracing::warn!("{path}: streaming for a read failed: {msg}");
                h.fail(msg);
                Err(())
            }
            Ok(building) => {
                let ap = self.applier.clone();
                let exp = expected.clone();
                match blocking(move || ap.finish_file(building, exp.as_ref(), None)).await {
                    Ok(Ok(to_scan)) => {
                        self.stats
                            .files_pulled
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::info!("{path}: fetched for a read and installed");
                        h.set_installed(Ok(()));
                        self.applied(&[&path]);
                        for p in to_scan {
                            self.request_scan(p);
                        }
                        Ok(())
                    }
                    Ok(Err(e)) => {
                        // Readers keep the complete content; the store is left to the puller.
                        tracing::warn!("{path}: fetched for a read, not installed: {e}");
                        h.set_installed(Err(e.to_string()));
                        Err(())
                    }
                    Err(e) => {
                        h.set_installed(Err(e.to_string()));
                        Err(())
                    }
                }
            }
        };
        {
            let mut all = lock(&self.hydrations);
            if all.get(&path).is_some_and(|x| Arc::ptr_eq(x, &h)) {
                all.remove(&path);
            }
        }
        // A newer version may have arrived meanwhile (deferred as a placeholder): plan again.
        if result.is_ok() {
            self.mark_dirty([path]);
        }
    }

    /// Fetch every missing block of `building` from `peer`, readers' blocks first.
    async fn hydrate_fetch(
        &self,
        h: &Arc<Hydration>,
        building: &Arc<Building>,
        peer: &str,
    ) -> Result<(), ApplyError> {
        let path = h.rec.path.clone();
        let mut inflight = tokio::task::JoinSet::new();
        let mut unflushed = 0u64;
        let mut stop = self.shutdown.subscribe();
        let mut failures = 0;
        loop {
            loop {
                let depth = if h.has_urgent() {
                    FETCH_PIPELINE + URGENT_EXTRA
                } else {
                    FETCH_PIPELINE
                };
                if inflight.len() >= depth {
                    break;
                }
                let Some((first, len)) = h.next_run() else {
                    break;
                };
                let conn = self
                    .conn_for(peer)
                    .ok_or_else(|| ApplyError::Other(format!("{path}: the peer disconnected")))?;
                let b = building.clone();
                inflight.spawn(async move {
                    fetch_and_write(conn, b, first, len)
                        .await
                        .map_err(|e| (first, len, e))
                });
            }
            if inflight.is_empty() {
                return match h.present() {
                    (have, n) if have == n => Ok(()),
                    (have, n) => Err(ApplyError::Other(format!(
                        "{path}: {have} of {n} blocks after the stream ended"
                    ))),
                };
            }
            tokio::select! {
                joined = inflight.join_next() => {
                    let Some(joined) = joined else { continue };
                    let (first, len, bytes) = match joined
                        .map_err(|e| ApplyError::Other(format!("{path}: {e}")))?
                    {
                        Ok(done) => done,
                        Err((first, len, e)) => {
                            // E.g. the connection was replaced by a newer one: ask again on
                            // whichever is current, a few times.
                            failures += 1;
                            if failures > RUN_RETRIES || self.conn_for(peer).is_none() {
                                return Err(e);
                            }
                            tracing::debug!("{path}: blocks {first}+{len}: {e}; asking again");
                            h.ask_again(first, len);
                            continue;
                        }
                    };
                    h.arrived_run(first, len);
                    self.stats
                        .bytes_fetched
                        .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
                    unflushed += bytes;
                    if unflushed >= WRITEBACK_EVERY {
                        building.start_writeback();
                        unflushed = 0;
                    }
                }
                _ = h.wake.notified() => {}
                _ = stop.changed() => {
                    return Err(ApplyError::Other(format!("{path}: shutting down")));
                }
            }
        }
    }
}

/// Fetch blocks `first..first + len` and write them (each verified against its hash) into the
/// temp file, off the runtime's threads; a block that fails its hash is asked for again with the
/// sender checking too (see [`super::write_run`]).
async fn fetch_and_write(
    conn: crate::net::rpc::Conn,
    b: Arc<Building>,
    first: u64,
    len: usize,
) -> Result<(u64, usize, u64), ApplyError> {
    let hashes: Vec<[u8; 32]> = b.rec.blocks[first as usize..first as usize + len].to_vec();
    let (first, blocks) = fetch_run(conn.clone(), b.rec.path.clone(), first, hashes).await?;
    let b2 = b.clone();
    let bytes = match blocking(move || write_blocks(&b2, first, &blocks)).await? {
        Ok(n) => n,
        Err(e) => {
            let (path, hashes) = checked_retry(&b, first, len, &e);
            let (_, blocks) = fetch_run_checked(conn, path, first, hashes).await?;
            blocking(move || write_blocks(&b, first, &blocks)).await??
        }
    };
    Ok((first, len, bytes))
}
