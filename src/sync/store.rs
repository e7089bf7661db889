//! The sync engine's own tables, kept in the box's index database on a connection of their own
//! (WAL lets it read while a scan holds the main index): what each peer announced
//! (`remote_files`), how far its sequence was read (`remote_seq`), and where each block of a local
//! file lives (`blocks`, for reusing local data instead of transferring it).

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
    let path: String = r.get(0)?;
    let Ok(path) = RelPath::parse(&path) else {
        return Ok(None);
    };
    let kind: i64 = r.get(1)?;
    let size: i64 = r.get(2)?;
    let mode: i64 = r.get(4)?;
    let has_md5: bool = r.get(6)?;
    let sha: Option<Vec<u8>> = r.get(7)?;
    let version: Vec<u8> = r.get(8)?;
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
        version: bincode::deserialize(&version).unwrap_or_default(),
        deleted: deleted != 0,
        sequence: seq.max(0) as u64,
        modified_by: by as u64,
    }))
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS remote_files (
    peer   TEXT NOT NULL,
    path   TEXT NOT NULL,
    seq    INTEGER NOT NULL,
    record BLOB NOT NULL,
    PRIMARY KEY (peer, path)
);
CREATE INDEX IF NOT EXISTS remote_files_path ON remote_files(path);
CREATE TABLE IF NOT EXISTS remote_seq (peer TEXT PRIMARY KEY, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS blocks (hash BLOB NOT NULL, path TEXT NOT NULL, idx INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS blocks_hash ON blocks(hash);
CREATE INDEX IF NOT EXISTS blocks_path ON blocks(path);
"#;

impl SyncDb {
    pub fn open(b: &BoxDir) -> anyhow::Result<SyncDb> {
        let conn = Connection::open(b.index_path()).context("opening sync tables")?;
        crate::index::configure(&conn)?;
        conn.execute_batch(SCHEMA).context("creating sync tables")?;
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
        conn.execute_batch(SCHEMA)?;
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
                 ON CONFLICT(peer, path) DO UPDATE SET seq = excluded.seq, record = excluded.record
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
    /// blocks would cost far more memory than the answer is worth).
    pub fn local_light(&self) -> anyhow::Result<Vec<Record>> {
        let mut out = Vec::new();
        self.for_each_local_light(|r| out.push(r))?;
        Ok(out)
    }

    /// [`local_light`](Self::local_light), one record at a time.
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
                let blob: Vec<u8> = row.get(1)?;
                if let Ok(mut rec) = bincode::deserialize::<Record>(&blob) {
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

    pub fn for_each_remote(&self, peer: &str, mut f: impl FnMut(Record)) -> anyhow::Result<()> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT record FROM remote_files WHERE peer = ?1")?;
        let mut rows = stmt.query(params![peer])?;
        while let Some(row) = rows.next()? {
            let blob: Vec<u8> = row.get(0)?;
            if let Ok(mut rec) = bincode::deserialize::<Record>(&blob) {
                rec.blocks = Vec::new();
                f(rec);
            }
        }
        Ok(())
    }

    /// Replace the block locations of `path` (none when it is gone or not a hashed file).
    pub fn set_blocks(&mut self, path: &RelPath, blocks: &[[u8; 32]]) -> anyhow::Result<()> {
        let tx = self.conn.transaction()?;
        tx.execute("DELETE FROM blocks WHERE path = ?1", params![path.as_str()])?;
        {
            let mut stmt =
                tx.prepare_cached("INSERT INTO blocks(hash, path, idx) VALUES(?1, ?2, ?3)")?;
            for (i, h) in blocks.iter().enumerate() {
                stmt.execute(params![&h[..], path.as_str(), i as i64])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// [`set_blocks`](Self::set_blocks) for many files in one transaction.
    pub fn set_blocks_many(&mut self, files: &[(&RelPath, &[[u8; 32]])]) -> anyhow::Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut del = tx.prepare_cached("DELETE FROM blocks WHERE path = ?1")?;
            let mut ins =
                tx.prepare_cached("INSERT INTO blocks(hash, path, idx) VALUES(?1, ?2, ?3)")?;
            for (path, blocks) in files {
                del.execute(params![path.as_str()])?;
                for (i, h) in blocks.iter().enumerate() {
                    ins.execute(params![&h[..], path.as_str(), i as i64])?;
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Rebuild the whole block table from the live files of the index.
    pub fn rebuild_blocks(&mut self, files: &[(RelPath, Vec<[u8; 32]>)]) -> anyhow::Result<()> {
        let tx = self.conn.transaction()?;
        tx.execute("DELETE FROM blocks", [])?;
        {
            let mut stmt =
                tx.prepare_cached("INSERT INTO blocks(hash, path, idx) VALUES(?1, ?2, ?3)")?;
            for (p, blocks) in files {
                for (i, h) in blocks.iter().enumerate() {
                    stmt.execute(params![&h[..], p.as_str(), i as i64])?;
                }
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Local places that held a block with this hash when last scanned (verify before use).
    pub fn find_block(&self, hash: &[u8; 32]) -> anyhow::Result<Vec<(RelPath, u64)>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT path, idx FROM blocks WHERE hash = ?1 LIMIT 4")?;
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
