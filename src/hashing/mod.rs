//! Content hashing: whole-file MD5 and SHA-256 (what the query commands report) and the SHA-256
//! of every block (what sync compares), computed in one read. Large files feed MD5 on a second
//! thread so the two digests run on both cores.

pub mod pair;

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;

use md5::Md5;
use sha2::{Digest, Sha256};

use crate::model::BLOCK_SIZE;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileHashes {
    pub md5: [u8; 16],
    pub sha256: [u8; 32],
    pub blocks: Vec<[u8; 32]>,
    pub size: u64,
}

/// Files at least this big hash MD5 on a helper thread.
const PARALLEL_THRESHOLD: u64 = 4 * 1024 * 1024;
pub const CHUNK: usize = 1024 * 1024;

/// Incremental hasher usable by a receiver as bytes arrive in order.
pub struct StreamHasher {
    md5: Md5,
    sha: Sha256,
    block: Sha256,
    block_fill: u64,
    blocks: Vec<[u8; 32]>,
    size: u64,
}

impl Default for StreamHasher {
    fn default() -> Self {
        Self::new()
    }
}

impl StreamHasher {
    pub fn new() -> Self {
        StreamHasher {
            md5: Md5::new(),
            sha: Sha256::new(),
            block: Sha256::new(),
            block_fill: 0,
            blocks: Vec::new(),
            size: 0,
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        self.md5.update(data);
        self.update_sha(data);
    }

    fn update_sha(&mut self, mut data: &[u8]) {
        // Block 0 is not hashed separately: the whole-file hasher's state at the end of block 0
        // *is* block 0's hash, so a file of one block (most files) costs one SHA-256 pass.
        while !data.is_empty() {
            let room = (BLOCK_SIZE - self.block_fill) as usize;
            let take = room.min(data.len());
            self.sha.update(&data[..take]);
            if self.size >= BLOCK_SIZE {
                self.block.update(&data[..take]);
            }
            self.block_fill += take as u64;
            self.size += take as u64;
            data = &data[take..];
            if self.block_fill == BLOCK_SIZE {
                let h = if self.size == BLOCK_SIZE {
                    self.sha.clone().finalize().into()
                } else {
                    std::mem::take(&mut self.block).finalize().into()
                };
                self.blocks.push(h);
                self.block_fill = 0;
            }
        }
    }

    pub fn finish(self) -> FileHashes {
        let mut blocks = self.blocks;
        let sha256: [u8; 32] = self.sha.finalize().into();
        if self.block_fill > 0 {
            blocks.push(if self.size < BLOCK_SIZE {
                sha256
            } else {
                self.block.finalize().into()
            });
        }
        FileHashes {
            md5: self.md5.finalize().into(),
            sha256,
            blocks,
            size: self.size,
        }
    }
}

/// MD5 and SHA-256 (+ blocks) on two helper threads, fed chunks in order: a receiver or a
/// sender hashes at the speed of two cores while its own thread does I/O.
pub struct Pipeline {
    md5_tx: Option<mpsc::SyncSender<bytes::Bytes>>,
    sha_tx: Option<mpsc::SyncSender<bytes::Bytes>>,
    md5_thread: Option<std::thread::JoinHandle<[u8; 16]>>,
    sha_thread: Option<std::thread::JoinHandle<StreamHasher>>,
}

impl Default for Pipeline {
    fn default() -> Self {
        Self::new()
    }
}

impl Pipeline {
    pub fn new() -> Self {
        Self::with_blocks(true)
    }

    /// `blocks = false` skips the per-block hashes (a download only verifies whole-file digests).
    pub fn with_blocks(blocks: bool) -> Self {
        let (md5_tx, md5_rx) = mpsc::sync_channel::<bytes::Bytes>(8);
        let (sha_tx, sha_rx) = mpsc::sync_channel::<bytes::Bytes>(8);
        let md5_thread = std::thread::spawn(move || {
            let mut m = Md5::new();
            for chunk in md5_rx {
                m.update(&chunk[..]);
            }
            <[u8; 16]>::from(m.finalize())
        });
        let sha_thread = std::thread::spawn(move || {
            let mut h = StreamHasher::new();
            for chunk in sha_rx {
                if blocks {
                    h.update_sha(&chunk);
                } else {
                    h.sha.update(&chunk[..]);
                    h.size += chunk.len() as u64;
                }
            }
            h
        });
        Pipeline {
            md5_tx: Some(md5_tx),
            sha_tx: Some(sha_tx),
            md5_thread: Some(md5_thread),
            sha_thread: Some(sha_thread),
        }
    }

    /// Hash `chunk` next (a `Bytes` clone shares the buffer with the caller).
    pub fn feed(&self, chunk: bytes::Bytes) -> io::Result<()> {
        let dead = || io::Error::other("hash thread ended early");
        self.md5_tx
            .as_ref()
            .ok_or_else(dead)?
            .send(chunk.clone())
            .map_err(|_| dead())?;
        self.sha_tx
            .as_ref()
            .ok_or_else(dead)?
            .send(chunk)
            .map_err(|_| dead())
    }

    pub fn finish(mut self) -> io::Result<FileHashes> {
        self.md5_tx.take();
        self.sha_tx.take();
        let md5 = self
            .md5_thread
            .take()
            .map(|t| t.join())
            .ok_or_else(|| io::Error::other("md5 thread missing"))?
            .map_err(|_| io::Error::other("md5 thread panicked"))?;
        let sha = self
            .sha_thread
            .take()
            .map(|t| t.join())
            .ok_or_else(|| io::Error::other("sha thread missing"))?
            .map_err(|_| io::Error::other("sha thread panicked"))?;
        let mut out = sha.finish();
        out.md5 = md5;
        Ok(out)
    }
}

/// Read up to `CHUNK` bytes (less only at end of input).
pub fn read_chunk(r: &mut impl Read, size: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; size];
    let mut filled = 0;
    while filled < size {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    buf.truncate(filled);
    Ok(buf)
}

/// Hash everything `r` yields.
pub fn hash_reader(mut r: impl Read, size_hint: u64) -> io::Result<FileHashes> {
    if size_hint < PARALLEL_THRESHOLD {
        let mut h = StreamHasher::new();
        let mut buf = vec![0u8; CHUNK.min(size_hint.max(4096) as usize + 1)];
        loop {
            let n = r.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        return Ok(h.finish());
    }
    let p = Pipeline::new();
    loop {
        let chunk = read_chunk(&mut r, CHUNK)?;
        if chunk.is_empty() {
            break;
        }
        p.feed(chunk.into())?;
    }
    p.finish()
}

/// Open a regular file without following a symlink at its last component.
pub fn open_nofollow(path: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// Identity of a file's content state as far as metadata can tell; the hash cache key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StatKey {
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub inode: u64,
}

impl StatKey {
    pub fn of(md: &std::fs::Metadata) -> StatKey {
        StatKey {
            size: md.size(),
            mtime_ns: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
            ctime_ns: md.ctime() * 1_000_000_000 + md.ctime_nsec(),
            inode: md.ino(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HashError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("not a regular file")]
    NotFile,
    #[error("file kept changing while it was hashed")]
    Unstable,
}

/// Hash a file on disk, retrying if it changes underneath (a writer mid-write): the result always
/// describes one consistent state, returned with its stat key.
pub fn hash_file_stable(
    root: &Path,
    rel: &crate::paths::RelPath,
) -> Result<(FileHashes, StatKey), HashError> {
    stable(root, rel, |f: &File, n| hash_reader(f, n))
}

/// [`hash_file_stable`] for sync: see [`hash_reader_for_sync`].
pub fn hash_file_stable_for_sync(
    root: &Path,
    rel: &crate::paths::RelPath,
) -> Result<(ContentHashes, StatKey), HashError> {
    stable(root, rel, |f: &File, n| hash_reader_for_sync(f, n))
}

/// [`hash_file_stable`] without MD5: see [`hash_reader_without_md5`].
pub fn hash_file_stable_without_md5(
    root: &Path,
    rel: &crate::paths::RelPath,
) -> Result<(ContentHashes, StatKey), HashError> {
    stable(root, rel, |f: &File, n| hash_reader_without_md5(f, n))
}

/// What a hashing pass saw: how many bytes it read.
trait HashedSize {
    fn hashed_size(&self) -> u64;
}

impl HashedSize for FileHashes {
    fn hashed_size(&self) -> u64 {
        self.size
    }
}

impl HashedSize for ContentHashes {
    fn hashed_size(&self) -> u64 {
        self.size
    }
}

fn stable<T: HashedSize>(
    root: &Path,
    rel: &crate::paths::RelPath,
    hash: impl Fn(&File, u64) -> io::Result<T>,
) -> Result<(T, StatKey), HashError> {
    for _ in 0..5 {
        let f = crate::paths::open_beneath(root, rel)?;
        let before = f.metadata()?;
        if !before.is_file() {
            return Err(HashError::NotFile);
        }
        let key = StatKey::of(&before);
        let hashes = hash(&f, key.size)?;
        let after = StatKey::of(&f.metadata()?);
        if after == key && hashes.hashed_size() == key.size {
            return Ok((hashes, key));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Err(HashError::Unstable)
}

/// What sync needs of a file: SHA-256 of the whole and of every block. MD5 is what the query
/// commands report, and at 1.6 s/GiB it is the slowest digest here, so a large file changed on
/// disk is announced without it and [`md5_of`] fills it in afterwards.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContentHashes {
    pub md5: Option<[u8; 16]>,
    pub sha256: [u8; 32],
    pub blocks: Vec<[u8; 32]>,
    pub size: u64,
}

impl From<FileHashes> for ContentHashes {
    fn from(h: FileHashes) -> Self {
        ContentHashes {
            md5: Some(h.md5),
            sha256: h.sha256,
            blocks: h.blocks,
            size: h.size,
        }
    }
}

/// Per-block SHA-256 of bytes fed in order.
#[derive(Default)]
struct BlockHasher {
    cur: Sha256,
    fill: u64,
    blocks: Vec<[u8; 32]>,
}

impl BlockHasher {
    fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let take = ((BLOCK_SIZE - self.fill) as usize).min(data.len());
            self.cur.update(&data[..take]);
            self.fill += take as u64;
            data = &data[take..];
            if self.fill == BLOCK_SIZE {
                self.blocks
                    .push(std::mem::take(&mut self.cur).finalize().into());
                self.fill = 0;
            }
        }
    }

    fn finish(mut self) -> Vec<[u8; 32]> {
        if self.fill > 0 {
            self.blocks.push(self.cur.finalize().into());
        }
        self.blocks
    }
}

/// Hash what `r` yields for sync: below [`PARALLEL_THRESHOLD`] everything in one pass (MD5
/// included, it is cheap there); above it, no MD5, and the whole-file and per-block SHA-256
/// run on two threads, so a 1 GiB file takes one SHA-256 pass of wall time instead of the
/// MD5's 1.6 s.
pub fn hash_reader_for_sync(r: impl Read, size_hint: u64) -> io::Result<ContentHashes> {
    if size_hint < PARALLEL_THRESHOLD {
        return hash_reader(r, size_hint).map(ContentHashes::from);
    }
    hash_reader_without_md5(r, size_hint)
}

/// SHA-256 of the whole and of every block, never MD5 (for a writer's commits through the
/// mount: the MD5 filler completes them in the background, off the writer's CPU).
pub fn hash_reader_without_md5(mut r: impl Read, size_hint: u64) -> io::Result<ContentHashes> {
    if size_hint < PARALLEL_THRESHOLD {
        let mut h = StreamHasher::new();
        let mut buf = vec![0u8; CHUNK.min(size_hint.max(4096) as usize + 1)];
        loop {
            let n = match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            h.update_sha(&buf[..n]);
        }
        let done = h.finish();
        return Ok(ContentHashes {
            md5: None,
            sha256: done.sha256,
            blocks: done.blocks,
            size: done.size,
        });
    }
    let (whole_tx, whole_rx) = mpsc::sync_channel::<Arc<Vec<u8>>>(8);
    let (blocks_tx, blocks_rx) = mpsc::sync_channel::<Arc<Vec<u8>>>(8);
    let whole = std::thread::spawn(move || {
        let mut h = Sha256::new();
        let mut size = 0u64;
        for chunk in whole_rx {
            h.update(&chunk[..]);
            size += chunk.len() as u64;
        }
        (<[u8; 32]>::from(h.finalize()), size)
    });
    let blocks = std::thread::spawn(move || {
        let mut h = BlockHasher::default();
        for chunk in blocks_rx {
            h.update(&chunk);
        }
        h.finish()
    });
    let dead = || io::Error::other("hash thread ended early");
    let fed = (|| -> io::Result<()> {
        loop {
            let chunk = Arc::new(read_chunk(&mut r, CHUNK)?);
            if chunk.is_empty() {
                return Ok(());
            }
            whole_tx.send(chunk.clone()).map_err(|_| dead())?;
            blocks_tx.send(chunk).map_err(|_| dead())?;
        }
    })();
    drop(whole_tx);
    drop(blocks_tx);
    let joined_whole = whole.join();
    let joined_blocks = blocks.join();
    fed?;
    let (sha256, size) = joined_whole.map_err(|_| io::Error::other("sha thread panicked"))?;
    let blocks = joined_blocks.map_err(|_| io::Error::other("block thread panicked"))?;
    Ok(ContentHashes {
        md5: None,
        sha256,
        blocks,
        size,
    })
}

/// MD5 of a file as it is now, with the stat key it had throughout (None when it changed while
/// being read: whoever changed it triggers a rescan). `pause` runs before each chunk is read:
/// a background caller waits there while more urgent work uses the disk.
pub fn md5_of(
    root: &Path,
    rel: &crate::paths::RelPath,
    pause: &dyn Fn(),
) -> Result<Option<([u8; 16], StatKey)>, HashError> {
    let mut f = crate::paths::open_beneath(root, rel)?;
    let before = f.metadata()?;
    if !before.is_file() {
        return Err(HashError::NotFile);
    }
    let key = StatKey::of(&before);
    let mut m = Md5::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        pause();
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        };
        m.update(&buf[..n]);
    }
    let after = StatKey::of(&f.metadata()?);
    Ok((after == key).then(|| (m.finalize().into(), key)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(data: &[u8]) -> FileHashes {
        let blocks = data
            .chunks(BLOCK_SIZE as usize)
            .map(|c| <[u8; 32]>::from(Sha256::digest(c)))
            .collect();
        FileHashes {
            md5: Md5::digest(data).into(),
            sha256: Sha256::digest(data).into(),
            blocks,
            size: data.len() as u64,
        }
    }

    #[test]
    fn matches_reference_small_and_big() {
        for len in [
            0usize,
            1,
            4096,
            BLOCK_SIZE as usize,
            BLOCK_SIZE as usize + 1,
            5 * 1024 * 1024 + 7,
        ] {
            let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let got = hash_reader(&data[..], len as u64).unwrap();
            assert_eq!(got, reference(&data), "len {len}");
            let mut s = StreamHasher::new();
            for c in data.chunks(1000) {
                s.update(c);
            }
            assert_eq!(s.finish(), reference(&data));
        }
    }

    #[test]
    fn sync_hashes_match_reference_without_md5_when_large() {
        for len in [
            0usize,
            4096,
            4 * 1024 * 1024,
            4 * 1024 * 1024 + 1,
            9 * 1024 * 1024 + 5,
        ] {
            let data: Vec<u8> = (0..len).map(|i| (i * 17 % 253) as u8).collect();
            let want = reference(&data);
            let got = hash_reader_for_sync(&data[..], len as u64).unwrap();
            assert_eq!(got.sha256, want.sha256, "len {len}");
            assert_eq!(got.blocks, want.blocks, "len {len}");
            assert_eq!(got.size, want.size);
            let large = len as u64 >= PARALLEL_THRESHOLD;
            assert_eq!(got.md5, (!large).then_some(want.md5), "len {len}");
            let bare = hash_reader_without_md5(&data[..], len as u64).unwrap();
            assert_eq!(
                (bare.md5, bare.sha256, &bare.blocks, bare.size),
                (None, want.sha256, &want.blocks, want.size),
                "len {len}"
            );
        }
    }

    #[test]
    fn md5_of_a_file_matches_and_reports_its_stat() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(dir.path().join("f"), &data).unwrap();
        let rel = crate::paths::RelPath::parse("f").unwrap();
        let (md5, key) = md5_of(dir.path(), &rel, &|| ()).unwrap().unwrap();
        assert_eq!(md5, <[u8; 16]>::from(Md5::digest(&data)));
        assert_eq!(key.size, data.len() as u64);
    }

    #[test]
    fn md5_known_value() {
        let h = hash_reader(&b"hello\n"[..], 6).unwrap();
        assert_eq!(
            crate::model::hex(&h.md5),
            "b1946ac92492d2347c6235b4d2611184"
        );
    }
}
