//! The sync engine's own tables, kept in the box's index database on a connection of their own
//! (WAL lets it read while a scan holds the main index): what each peer announced
//! (`remote_files`) and how far its sequence was read (`remote_seq`); and, in a database of its
//! own, where each block of a local file lives (`BlockTable`, for reusing local data instead of
//! transferring it).

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use rusqlite::{params, Connection, OptionalExtension};

use crate::config::BoxDir;
use crate::model::Record;
use crate::paths::RelPath;

pub struct SyncDb {
    conn: Connection,
}

const LIGHT_SQL: &str = "SELECT path, kind, size, mtime_ns, mode, target, md5 IS NOT NULL, sha256,
    version, deleted, sequence, modified_by FROM files";

/// A row of [`LIGHT_SQL`] as a record without blocks (`None` for a path that no longer parses).
fn light_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Option<Record>> {
    // Text and blobs read in place (`get_ref`), not copied out first.
    let Ok(path) = RelPath::parse(r.get_ref(0)?.as_str()?) else {
        return Ok(None);
    };
    let kind: i64 = r.get(1)?;
    let size: i64 = r.get(2)?;
    let mode: i64 = r.get(4)?;
    let has_md5: bool = r.get(6)?;
    let sha = r.get_ref(7)?.as_blob_or_null()?;
    let version = r.get_ref(8)?.as_blob()?;
    let deleted: i64 = r.get(9)?;
    let seq: i64 = r.get(10)?;
    let by: i64 = r.get(11)?;
    Ok(Some(Record {
        path,
        kind: crate::model::Kind::from_i64(kind).unwrap_or(crate::model::Kind::File),
        size: size.max(0) as u64,
        mtime_ns: r.get(3)?,
        mode: mode as u32,
        target: r.get(5)?,
        // Only presence matters to the planner.
        md5: has_md5.then_some([0; 16]),
        sha256: sha.and_then(|v| v.try_into().ok()),
        blocks: Vec::new(),
        version: bincode::deserialize(version).unwrap_or_default(),
        deleted: deleted != 0,
        sequence: seq.max(0) as u64,
        modified_by: by as u64,
    }))
}

/// Keyed by path first, without a rowid: storing a record is one B-tree insert and finding a
/// path's records one descent (was a rowid table, its (peer, path) key and a path index: three
/// inserts, two descents; a tenth of a receiver's time at 10,000 new files).
const REMOTE_FILES: &str = "CREATE TABLE IF NOT EXISTS remote_files (
    path   TEXT NOT NULL,
    peer   TEXT NOT NULL,
    seq    INTEGER NOT NULL,
    record BLOB NOT NULL,
    PRIMARY KEY (path, peer)
) WITHOUT ROWID;";

/// An index made before [`REMOTE_FILES`]: its rows are moved over once.
const MIGRATE_REMOTE_FILES: &str = "
ALTER TABLE remote_files RENAME TO remote_files_old;
DROP INDEX IF EXISTS remote_files_path;
{REMOTE_FILES}
INSERT OR REPLACE INTO remote_files(path, peer, seq, record)
    SELECT path, peer, seq, record FROM remote_files_old;
DROP TABLE remote_files_old;";

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS remote_seq (peer TEXT PRIMARY KEY, seq INTEGER NOT NULL);
-- The block table moved to a database of its own (`BlockTable`).
DROP TABLE IF EXISTS blocks;
"#;

fn create_schema(conn: &Connection) -> anyhow::Result<()> {
    let old_layout: Option<String> = conn
        .query_row(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'remote_files'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    if old_layout.is_some_and(|sql| !sql.contains("WITHOUT ROWID")) {
        let migrate = MIGRATE_REMOTE_FILES.replace("{REMOTE_FILES}", REMOTE_FILES);
        conn.execute_batch(&format!("BEGIN IMMEDIATE; {migrate} COMMIT;"))
            .context("moving the peers' records to their new table")?;
    }
    conn.execute_batch(REMOTE_FILES)
        .context("creating sync tables")?;
    conn.execute_batch(SCHEMA).context("creating sync tables")?;
    Ok(())
}

impl SyncDb {
    pub fn open(b: &BoxDir) -> anyhow::Result<SyncDb> {
        let conn = Connection::open(b.index_path()).context("opening sync tables")?;
        crate::index::configure(&conn)?;
        create_schema(&conn)?;
        Ok(SyncDb { conn })
    }

    /// A read-only connection for long walks over both indexes (`status`). Not memory-mapped:
    /// a walk touches every page, and mapped pages count in the daemon's resident memory (at
    /// 100k files that alone put the receiver past 100 MB).
    pub fn open_reader(b: &BoxDir) -> anyhow::Result<SyncDb> {
        let db = SyncDb::open(b)?;
        db.conn.pragma_update(None, "query_only", true)?;
        Ok(db)
    }

    /// This box's own record of `path`, as last committed (see [`crate::index::get_with`]).
    pub fn local_record(&self, path: &RelPath) -> anyhow::Result<Option<Record>> {
        Ok(self.local_stored(path)?.map(|s| s.record))
    }

    /// [`local_record`](Self::local_record) with the stat key it was recorded with.
    pub fn local_stored(&self, path: &RelPath) -> anyhow::Result<Option<crate::index::Stored>> {
        crate::index::get_with(&self.conn, path)
    }

    pub fn open_in_memory() -> anyhow::Result<SyncDb> {
        let conn = Connection::open_in_memory()?;
        create_schema(&conn)?;
        Ok(SyncDb { conn })
    }

    pub fn remote_seq(&self, peer: &str) -> anyhow::Result<u64> {
        let v: Option<i64> = self
            .conn
            .prepare_cached("SELECT seq FROM remote_seq WHERE peer = ?1")?
            .query_row(params![peer], |r| r.get(0))
            .optional()?;
        Ok(v.unwrap_or(0).max(0) as u64)
    }

    pub fn set_remote_seq(&self, peer: &str, seq: u64) -> anyhow::Result<()> {
        self.conn
            .prepare_cached(
                "INSERT INTO remote_seq(peer, seq) VALUES(?1, ?2)
             ON CONFLICT(peer) DO UPDATE SET seq = excluded.seq",
            )?
            .execute(params![peer, seq as i64])?;
        Ok(())
    }

    /// Store a page of a peer's records (one transaction); a record never replaces a newer one.
    pub fn store_remote(&mut self, peer: &str, records: &[Record]) -> anyhow::Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO remote_files(peer, path, seq, record) VALUES(?1, ?2, ?3, ?4)
                 ON CONFLICT(path, peer) DO UPDATE SET seq = excluded.seq, record = excluded.record
                 WHERE excluded.seq >= remote_files.seq",
            )?;
            for r in records {
                let blob = bincode::serialize(r)?;
                stmt.execute(params![peer, r.path.as_str(), r.sequence as i64, blob])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Forget everything a peer announced (its index was recreated).
    pub fn reset_remote(&self, peer: &str) -> anyhow::Result<()> {
        self.conn
            .prepare_cached("DELETE FROM remote_files WHERE peer = ?1")?
            .execute(params![peer])?;
        self.conn
            .prepare_cached("DELETE FROM remote_seq WHERE peer = ?1")?
            .execute(params![peer])?;
        Ok(())
    }

    /// Every peer's record of `path`, ordered by peer.
    pub fn remote_records(&self, path: &RelPath) -> anyhow::Result<Vec<(String, Record)>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT peer, record FROM remote_files WHERE path = ?1 ORDER BY peer",
        )?;
        let rows = stmt.query_map(params![path.as_str()], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (peer, blob) = row?;
            if let Ok(rec) = bincode::deserialize::<Record>(&blob) {
                out.push((peer, rec));
            }
        }
        Ok(out)
    }

    /// Every peer's records of the entries directly inside `dir`, as (peer, record).
    pub fn remote_children(&self, dir: &RelPath) -> anyhow::Result<Vec<(String, Record)>> {
        let (sql, lo, hi) = if dir.is_root() {
            (
                "SELECT peer, record FROM remote_files WHERE instr(path, '/') = 0",
                String::new(),
                String::new(),
            )
        } else {
            // Everything below `dir/`: paths from "dir/" up to (not including) "dir0" ('0' is
            // the character after '/').
            (
                "SELECT peer, record FROM remote_files WHERE path > ?1 AND path < ?2",
                format!("{}/", dir.as_str()),
                format!("{}0", dir.as_str()),
            )
        };
        let mut stmt = self.conn.prepare_cached(sql)?;
        let map = |r: &rusqlite::Row| Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?));
        let rows: Vec<(String, Vec<u8>)> = if dir.is_root() {
            stmt.query_map([], map)?.collect::<Result<_, _>>()?
        } else {
            stmt.query_map(params![lo, hi], map)?
                .collect::<Result<_, _>>()?
        };
        let mut out = Vec::new();
        for (peer, blob) in rows {
            if let Ok(rec) = bincode::deserialize::<Record>(&blob) {
                if rec.path.parent().as_ref() == Some(dir) {
                    out.push((peer, rec));
                }
            }
        }
        Ok(out)
    }

    /// The local index without block lists (what `status` compares; a 100k-file index with its
    /// blocks would cost far more memory than the answer is worth), one record at a time.
    pub fn for_each_local_light(&self, mut f: impl FnMut(Record)) -> anyhow::Result<()> {
        let mut stmt = self.conn.prepare_cached(LIGHT_SQL)?;
        let mut rows = stmt.query([])?;
        while let Some(row) = rows.next()? {
            if let Some(rec) = light_row(row)? {
                f(rec);
            }
        }
        Ok(())
    }

    /// Walk this box's records (without blocks) and `peer`'s (blocks dropped) together in path
    /// order, calling `f` once per path either side has: memory stays flat however big the
    /// indexes are.
    pub fn merge_with_remote(
        &self,
        peer: &str,
        mut f: impl FnMut(Option<Record>, Option<Record>),
    ) -> anyhow::Result<()> {
        let mut ls = self
            .conn
            .prepare_cached(&format!("{LIGHT_SQL} ORDER BY path"))?;
        let mut rs = self.conn.prepare_cached(
            "SELECT path, record FROM remote_files WHERE peer = ?1 ORDER BY path",
        )?;
        let mut lrows = ls.query([])?;
        let mut rrows = rs.query(params![peer])?;
        let next_local = |rows: &mut rusqlite::Rows<'_>| -> anyhow::Result<Option<Record>> {
            while let Some(row) = rows.next()? {
                if let Some(r) = light_row(row)? {
                    return Ok(Some(r));
                }
            }
            Ok(None)
        };
        let next_remote = |rows: &mut rusqlite::Rows<'_>| -> anyhow::Result<Option<Record>> {
            while let Some(row) = rows.next()? {
                let blob = row.get_ref(1)?.as_blob()?;
                if let Ok(mut rec) = bincode::deserialize::<Record>(blob) {
                    rec.blocks = Vec::new();
                    return Ok(Some(rec));
                }
            }
            Ok(None)
        };
        let mut l = next_local(&mut lrows)?;
        let mut r = next_remote(&mut rrows)?;
        loop {
            // SQLite orders TEXT by bytes, as str's Ord does.
            let order = match (&l, &r) {
                (None, None) => break,
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (Some(a), Some(b)) => a.path.as_str().cmp(b.path.as_str()),
            };
            match order {
                std::cmp::Ordering::Less => {
                    f(l.take(), None);
                    l = next_local(&mut lrows)?;
                }
                std::cmp::Ordering::Greater => {
                    f(None, r.take());
                    r = next_remote(&mut rrows)?;
                }
                std::cmp::Ordering::Equal => {
                    f(l.take(), r.take());
                    l = next_local(&mut lrows)?;
                    r = next_remote(&mut rrows)?;
                }
            }
        }
        Ok(())
    }
}

/// Files whose block locations change, each with its new block hashes (none: it is gone).
pub type BlockRows = Vec<(RelPath, Vec<[u8; 32]>)>;

enum BlockMsg {
    Rows(BlockRows),
    Flushed(mpsc::Sender<()>),
}

const BLOCK_SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS blocks (
    hash BLOB NOT NULL,
    path TEXT NOT NULL,
    idx  INTEGER NOT NULL,
    PRIMARY KEY (hash, path, idx)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS blocks_path ON blocks(path);
"#;

/// Where each block of a local file lives (`.mybox/blocks.db`), written on a thread of its own
/// in the order changes are recorded. The table is advisory (a location is verified before
/// use, and it is rebuilt from the index at every start), so a file's blocks need not be in it
/// the moment the file is; and, in a database of its own, its writes do not wait for the
/// index's (SQLite has one writer per database, and the finisher holds the index's across a
/// `syncfs`). In the index database and written by the finisher, the block rows of 10,000
/// received small files took a sixth of the finisher's time, which is what such a pull waits
/// for.
pub struct BlockTable {
    reader: Mutex<Connection>,
    writer: Arc<Mutex<Connection>>,
    tx: Option<mpsc::Sender<BlockMsg>>,
    filter: Mutex<HashFilter>,
}

/// Which block hashes may be in the table (a Bloom filter): nearly every block a pull of new
/// files asks about is in no local file, and the filter says so without a query. Bits are only
/// set (a block that left the table may still answer "maybe"; the query then says no); past
/// its capacity it answers "maybe" to everything, until a rebuild sizes it again.
struct HashFilter {
    bits: Vec<u64>,
    inserted: usize,
    capacity: usize,
}

impl HashFilter {
    /// Room for `n` hashes at 16 bits each (8 at capacity: about 3 % false "maybe").
    fn for_hashes(n: usize) -> HashFilter {
        let bits = n.max(1 << 16).saturating_mul(16).next_power_of_two();
        HashFilter {
            bits: vec![0; bits / 64],
            inserted: 0,
            capacity: bits / 8,
        }
    }

    /// Three bit positions, from three words of the (uniformly random) SHA-256 itself.
    fn positions(&self, h: &[u8; 32]) -> [usize; 3] {
        let mask = self.bits.len() * 64 - 1;
        let word = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&h[i * 8..i * 8 + 8]);
            u64::from_le_bytes(w) as usize & mask
        };
        [word(0), word(1), word(2)]
    }

    fn insert(&mut self, h: &[u8; 32]) {
        if self.inserted >= self.capacity {
            return;
        }
        for b in self.positions(h) {
            self.bits[b / 64] |= 1 << (b % 64);
        }
        self.inserted += 1;
    }

    fn may_contain(&self, h: &[u8; 32]) -> bool {
        self.inserted >= self.capacity
            || self
                .positions(h)
                .iter()
                .all(|&b| self.bits[b / 64] & (1 << (b % 64)) != 0)
    }
}

impl BlockTable {
    /// Open the box's block table; one that cannot be opened (a damaged file) is started
    /// afresh: nothing in it is not also in the index, and the rebuild at start refills it.
    pub fn open(b: &BoxDir) -> anyhow::Result<BlockTable> {
        let path = b.meta().join("blocks.db");
        match BlockTable::open_at(&path) {
            Ok(t) => Ok(t),
            Err(e) => {
                tracing::warn!("{e:#}; starting the block table afresh");
                for ext in ["", "-wal", "-shm"] {
                    let mut p = path.clone().into_os_string();
                    p.push(ext);
                    let _ = std::fs::remove_file(p);
                }
                BlockTable::open_at(&path)
            }
        }
    }

    pub fn open_at(path: &std::path::Path) -> anyhow::Result<BlockTable> {
        let open = || -> anyhow::Result<Connection> {
            let conn = Connection::open(path)
                .with_context(|| format!("opening block table {}", path.display()))?;
            crate::index::configure(&conn)?;
            Ok(conn)
        };
        let writer = open()?;
        writer
            .execute_batch(BLOCK_SCHEMA)
            .context("creating block table")?;
        let writer = Arc::new(Mutex::new(writer));
        let reader = Mutex::new(open()?);
        let (tx, rx) = mpsc::channel::<BlockMsg>();
        let w = writer.clone();
        let spawned = std::thread::Builder::new()
            .name("block-table".into())
            .spawn(move || block_writer(&w, &rx));
        Ok(BlockTable {
            reader,
            writer,
            // Without the thread the rows are written where they are recorded.
            tx: spawned.ok().map(|_| tx),
            // Whatever an earlier daemon left: "maybe" to all until the rebuild.
            filter: Mutex::new(HashFilter {
                bits: vec![0],
                inserted: 0,
                capacity: 0,
            }),
        })
    }

    /// Queue new block locations (written soon, in order).
    pub fn record(&self, rows: BlockRows) {
        if rows.is_empty() {
            return;
        }
        if let Ok(mut f) = self.filter.lock() {
            for h in rows.iter().flat_map(|(_, b)| b) {
                f.insert(h);
            }
        }
        let rows = match &self.tx {
            Some(tx) => match tx.send(BlockMsg::Rows(rows)) {
                Ok(()) => return,
                // The writer is gone: write them here.
                Err(mpsc::SendError(BlockMsg::Rows(rows))) => rows,
                Err(_) => return,
            },
            None => rows,
        };
        write_rows(&self.writer, rows);
    }

    /// Wait until everything recorded so far is in the table.
    pub fn flush(&self) {
        let Some(tx) = &self.tx else { return };
        let (done_tx, done_rx) = mpsc::channel();
        if tx.send(BlockMsg::Flushed(done_tx)).is_ok() {
            let _ = done_rx.recv();
        }
    }

    /// Replace the whole table with the blocks of `files` (the live files of the index).
    pub fn rebuild(&self, files: &[(RelPath, Vec<[u8; 32]>)]) -> anyhow::Result<()> {
        self.flush();
        let mut conn = self
            .writer
            .lock()
            .map_err(|_| anyhow::anyhow!("block table lock poisoned"))?;
        let tx = conn.transaction()?;
        tx.execute("DELETE FROM blocks", [])?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT OR IGNORE INTO blocks(hash, path, idx) VALUES(?1, ?2, ?3)",
            )?;
            for (p, blocks) in files {
                for (i, h) in blocks.iter().enumerate() {
                    stmt.execute(params![&h[..], p.as_str(), i as i64])?;
                }
            }
        }
        tx.commit()?;
        let mut filter = HashFilter::for_hashes(files.iter().map(|(_, b)| b.len()).sum());
        for h in files.iter().flat_map(|(_, b)| b) {
            filter.insert(h);
        }
        if let Ok(mut f) = self.filter.lock() {
            *f = filter;
        }
        Ok(())
    }

    /// Local places that held a block with this hash when last scanned (verify before use).
    pub fn find(&self, hash: &[u8; 32]) -> anyhow::Result<Vec<(RelPath, u64)>> {
        if self.filter.lock().is_ok_and(|f| !f.may_contain(hash)) {
            return Ok(Vec::new());
        }
        let conn = self
            .reader
            .lock()
            .map_err(|_| anyhow::anyhow!("block table lock poisoned"))?;
        let mut stmt =
            conn.prepare_cached("SELECT path, idx FROM blocks WHERE hash = ?1 LIMIT 4")?;
        let rows = stmt.query_map(params![&hash[..]], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (p, i) = row?;
            if let Ok(p) = RelPath::parse(&p) {
                out.push((p, i.max(0) as u64));
            }
        }
        Ok(out)
    }
}

/// Rows that queued while the last transaction ran go in together, up to this many files.
const BLOCK_WRITE_MAX: usize = 8192;

fn block_writer(conn: &Mutex<Connection>, rx: &mpsc::Receiver<BlockMsg>) {
    let mut waiting: Vec<mpsc::Sender<()>> = Vec::new();
    while let Ok(first) = rx.recv() {
        let mut rows = BlockRows::new();
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                BlockMsg::Rows(r) => rows.extend(r),
                BlockMsg::Flushed(done) => waiting.push(done),
            }
            if rows.len() < BLOCK_WRITE_MAX {
                next = rx.try_recv().ok();
            }
        }
        write_rows(conn, rows);
        for done in waiting.drain(..) {
            let _ = done.send(());
        }
    }
}

/// Replace the block locations of each file of `rows`, in one transaction.
fn write_rows(conn: &Mutex<Connection>, rows: BlockRows) {
    if rows.is_empty() {
        return;
    }
    let Ok(mut conn) = conn.lock() else {
        tracing::warn!("block table: lock poisoned");
        return;
    };
    let res = (|| -> anyhow::Result<()> {
        let tx = conn.transaction()?;
        {
            let mut del = tx.prepare_cached("DELETE FROM blocks WHERE path = ?1")?;
            let mut ins = tx.prepare_cached(
                "INSERT OR IGNORE INTO blocks(hash, path, idx) VALUES(?1, ?2, ?3)",
            )?;
            for (path, blocks) in &rows {
                del.execute(params![path.as_str()])?;
                for (i, h) in blocks.iter().enumerate() {
                    ins.execute(params![&h[..], path.as_str(), i as i64])?;
                }
            }
        }
        tx.commit()?;
        Ok(())
    })();
    if let Err(e) = res {
        tracing::warn!("block table: {e:#}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(p: &str) -> RelPath {
        RelPath::parse(p).unwrap()
    }

    #[test]
    fn block_locations_are_written_behind_in_order_and_replaced_per_file() {
        let dir = tempfile::tempdir().unwrap();
        let t = BlockTable::open_at(&dir.path().join("blocks.db")).unwrap();
        let (h1, h2, h3) = ([1u8; 32], [2u8; 32], [3u8; 32]);
        t.record(vec![(rel("a"), vec![h1, h2]), (rel("b"), vec![h2])]);
        t.flush();
        assert_eq!(t.find(&h1).unwrap(), vec![(rel("a"), 0)]);
        let mut at = t.find(&h2).unwrap();
        at.sort_by(|x, y| x.0.as_str().cmp(y.0.as_str()));
        assert_eq!(at, vec![(rel("a"), 1), (rel("b"), 0)]);
        // A file's new blocks replace its old ones; a later change of the same file wins.
        t.record(vec![(rel("a"), vec![h3])]);
        t.record(vec![(rel("b"), vec![])]);
        t.record(vec![(rel("a"), vec![h3, h1])]);
        t.flush();
        assert_eq!(t.find(&h2).unwrap(), vec![]);
        assert_eq!(t.find(&h3).unwrap(), vec![(rel("a"), 0)]);
        assert_eq!(t.find(&h1).unwrap(), vec![(rel("a"), 1)]);
        // Rebuilt from the index: only what it lists.
        t.rebuild(&[(rel("c"), vec![h2])]).unwrap();
        assert_eq!(t.find(&h1).unwrap(), vec![]);
        assert_eq!(t.find(&h2).unwrap(), vec![(rel("c"), 0)]);
        // Reopened (the next daemon): the rows are on disk, found before any rebuild.
        drop(t);
        let t = BlockTable::open_at(&dir.path().join("blocks.db")).unwrap();
        assert_eq!(t.find(&h2).unwrap(), vec![(rel("c"), 0)]);
    }

    fn record(path: &str, seq: u64, size: u64) -> Record {
        Record {
            path: rel(path),
            kind: crate::model::Kind::File,
            size,
            mtime_ns: 1,
            mode: 0o644,
            target: None,
            md5: None,
            sha256: Some([7; 32]),
            blocks: vec![[7; 32]],
            version: crate::model::VersionVector::new(),
            deleted: false,
            sequence: seq,
            modified_by: 1,
        }
    }

    #[test]
    fn peers_records_stored_in_the_old_layout_are_moved_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (b, _) = crate::config::BoxDir::init(&dir.path().join("box")).unwrap();
        {
            // The layout before: a rowid table, its (peer, path) key and a path index.
            let conn = Connection::open(b.index_path()).unwrap();
            conn.execute_batch(
                "CREATE TABLE remote_files (peer TEXT NOT NULL, path TEXT NOT NULL,
                     seq INTEGER NOT NULL, record BLOB NOT NULL, PRIMARY KEY (peer, path));
                 CREATE INDEX remote_files_path ON remote_files(path);",
            )
            .unwrap();
            for (peer, r) in [("P", record("a", 3, 10)), ("Q", record("a", 5, 20))] {
                conn.execute(
                    "INSERT INTO remote_files VALUES (?1, ?2, ?3, ?4)",
                    params![
                        peer,
                        r.path.as_str(),
                        r.sequence as i64,
                        bincode::serialize(&r).unwrap()
                    ],
                )
                .unwrap();
            }
        }
        let mut db = SyncDb::open(&b).unwrap();
        let got = db.remote_records(&rel("a")).unwrap();
        let sizes: Vec<(&str, u64)> = got.iter().map(|(p, r)| (p.as_str(), r.size)).collect();
        assert_eq!(sizes, [("P", 10), ("Q", 20)]);
        // Newer records replace older ones, an older one never replaces a newer one.
        db.store_remote("P", &[record("a", 4, 11)]).unwrap();
        db.store_remote("Q", &[record("a", 1, 99)]).unwrap();
        let got = db.remote_records(&rel("a")).unwrap();
        let sizes: Vec<(&str, u64)> = got.iter().map(|(p, r)| (p.as_str(), r.size)).collect();
        assert_eq!(sizes, [("P", 11), ("Q", 20)]);
        let mut seen = Vec::new();
        db.merge_with_remote("Q", |_, r| seen.extend(r.map(|r| r.size)))
            .unwrap();
        assert_eq!(seen, [20]);
        // Opened again (the next daemon): nothing to move, nothing lost.
        drop(db);
        let db = SyncDb::open(&b).unwrap();
        assert_eq!(db.remote_records(&rel("a")).unwrap().len(), 2);
        let old: i64 = db
            .conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name LIKE 'remote_files_%'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(old, 0);
    }

    #[test]
    fn files_still_without_their_md5_are_counted_until_it_is_filled_in() {
        let dir = tempfile::tempdir().unwrap();
        let (b, _) = crate::config::BoxDir::init(&dir.path().join("box")).unwrap();
        let ix = crate::index::Index::open(&b).unwrap();
        let stat = crate::hashing::StatKey {
            size: 10,
            mtime_ns: 1,
            ctime_ns: 1,
            inode: 1,
        };
        let mut done = record("done", 1, 5);
        done.md5 = Some([1; 16]);
        ix.put(&done, None).unwrap();
        ix.put(&record("big", 2, 10), Some(stat)).unwrap();
        ix.put(&record("bigger", 3, 30), None).unwrap();
        let mut gone = record("gone", 4, 70);
        gone.deleted = true;
        ix.put(&gone, None).unwrap();
        let db = SyncDb::open_reader(&b).unwrap();
        // What `status` counts, from the light records it walks.
        let pending = || {
            let mut n = (0, 0);
            db.for_each_local_light(|r| {
                if r.md5_pending() {
                    n = (n.0 + 1, n.1 + r.size);
                }
            })
            .unwrap();
            n
        };
        assert_eq!(pending(), (2, 40));
        assert!(ix.set_md5_if(&rel("big"), stat, [2; 16]).unwrap());
        assert_eq!(pending(), (1, 30));
    }

    #[test]
    fn a_damaged_block_table_is_started_afresh() {
        let dir = tempfile::tempdir().unwrap();
        let (b, _) = crate::config::BoxDir::init(&dir.path().join("box")).unwrap();
        std::fs::write(b.meta().join("blocks.db"), vec![0xA5u8; 8192]).unwrap();
        let t = BlockTable::open(&b).unwrap();
        t.record(vec![(rel("a"), vec![[9; 32]])]);
        t.flush();
        assert_eq!(t.find(&[9; 32]).unwrap(), vec![(rel("a"), 0)]);
    }

    #[test]
    fn the_hash_filter_never_denies_a_hash_it_holds() {
        let mut f = HashFilter::for_hashes(1000);
        let hash = |i: u32| -> [u8; 32] {
            use sha2::Digest;
            sha2::Sha256::digest(i.to_le_bytes()).into()
        };
        for i in 0..1000 {
            f.insert(&hash(i));
        }
        assert!((0..1000).all(|i| f.may_contain(&hash(i))));
        // Sized for 65,536 at least: a thousand in it leave almost every other hash out.
        let maybe = (1000..11_000).filter(|&i| f.may_contain(&hash(i))).count();
        assert!(maybe < 10, "{maybe} false maybes in 10,000");
        // Past its capacity it says "maybe" to everything rather than deny.
        let mut full = HashFilter::for_hashes(0);
        for i in 0..(full.capacity as u32 + 1) {
            full.insert(&hash(i));
        }
        assert!(full.may_contain(&hash(u32::MAX)));
    }
}
