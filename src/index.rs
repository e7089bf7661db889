//! The box's index in SQLite (WAL): one record per path (tombstones included), with the hash
//! cache key (size, mtime, ctime, inode) so unchanged files are never rehashed, and a sequence
//! number per change so peers can ask "what changed since N".

use std::collections::HashMap;

use anyhow::Context;
use rusqlite::{params, Connection, OptionalExtension, Row};

use crate::config::BoxDir;
use crate::hashing::StatKey;
use crate::model::{Kind, Record, VersionVector};
use crate::paths::RelPath;

pub struct Index {
    conn: Connection,
}

/// A record with the stat key its hashes were taken at.
#[derive(Clone, Debug)]
pub struct Stored {
    pub record: Record,
    pub stat: Option<StatKey>,
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS files (
    path        TEXT PRIMARY KEY,
    kind        INTEGER NOT NULL,
    size        INTEGER NOT NULL,
    mtime_ns    INTEGER NOT NULL,
    mode        INTEGER NOT NULL,
    target      TEXT,
    md5         BLOB,
    sha256      BLOB,
    blocks      BLOB,
    version     BLOB NOT NULL,
    deleted     INTEGER NOT NULL,
    sequence    INTEGER NOT NULL,
    modified_by INTEGER NOT NULL,
    st_size     INTEGER,
    st_mtime_ns INTEGER,
    st_ctime_ns INTEGER,
    st_inode    INTEGER
);
CREATE INDEX IF NOT EXISTS files_sequence ON files(sequence);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"#;

fn blob_to_arr<const N: usize>(b: Option<Vec<u8>>) -> Option<[u8; N]> {
    b.and_then(|v| v.try_into().ok())
}

/// The columns [`row_to_stored`] reads, in its order (by position: looking columns up by name
/// costs a search of the column names for each one, for each row).
macro_rules! stored_columns {
    () => {
        "path, kind, size, mtime_ns, mode, target, md5, sha256, blocks, version, deleted, \
         sequence, modified_by, st_size, st_mtime_ns, st_ctime_ns, st_inode"
    };
}

/// A row of `SELECT stored_columns!() FROM files ...`.
fn row_to_stored(row: &Row<'_>) -> rusqlite::Result<Stored> {
    let path: String = row.get(0)?;
    let path = RelPath::parse_or_root(&path).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })?;
    let kind = Kind::from_i64(row.get(1)?).unwrap_or(Kind::File);
    let blocks = match row.get_ref(8)? {
        rusqlite::types::ValueRef::Blob(b) => b
            .chunks_exact(32)
            .filter_map(|c| c.try_into().ok())
            .collect(),
        _ => Vec::new(),
    };
    let version = match row.get_ref(9)? {
        rusqlite::types::ValueRef::Blob(b) => bincode::deserialize(b).unwrap_or_default(),
        _ => VersionVector::default(),
    };
    let st_size: Option<i64> = row.get(13)?;
    let stat = match st_size {
        Some(size) => Some(StatKey {
            size: size as u64,
            mtime_ns: row.get(14)?,
            ctime_ns: row.get(15)?,
            inode: row.get::<_, i64>(16)? as u64,
        }),
        None => None,
    };
    Ok(Stored {
        record: Record {
            path,
            kind,
            size: row.get::<_, i64>(2)? as u64,
            mtime_ns: row.get(3)?,
            mode: row.get::<_, i64>(4)? as u32,
            target: row.get(5)?,
            md5: blob_to_arr(row.get(6)?),
            sha256: blob_to_arr(row.get(7)?),
            blocks,
            version,
            deleted: row.get::<_, i64>(10)? != 0,
            sequence: row.get::<_, i64>(11)? as u64,
            modified_by: row.get::<_, i64>(12)? as u64,
        },
        stat,
    })
}

/// [`Index::get`] on any connection to the index database (e.g. a read-only one of the sync
/// engine's, which need not wait for the index lock).
pub fn get_with(conn: &Connection, path: &RelPath) -> anyhow::Result<Option<Stored>> {
    Ok(conn
        .prepare_cached(concat!(
            "SELECT ",
            stored_columns!(),
            " FROM files WHERE path = ?1"
        ))?
        .query_row(params![path.as_str()], row_to_stored)
        .optional()?)
}

/// How long a connection waits for another one's write lock before giving up.
const BUSY_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// The pause before try number `tries + 1` for a lock (see [`configure`]), or `None` once
/// [`BUSY_WAIT`] has passed.
fn busy_pause(tries: i32) -> Option<std::time::Duration> {
    use std::time::Duration;
    const FAST_TRIES: u32 = 20;
    const FAST: Duration = Duration::from_micros(100);
    const SLOW: Duration = Duration::from_millis(1);
    let tries = tries.max(0) as u32;
    let waited = if tries <= FAST_TRIES {
        FAST * tries
    } else {
        FAST * FAST_TRIES + SLOW * (tries - FAST_TRIES)
    };
    if waited >= BUSY_WAIT {
        None
    } else if tries < FAST_TRIES {
        Some(FAST)
    } else {
        Some(SLOW)
    }
}

/// Settings of every connection to the index database: WAL, and a wait for locks that polls
/// every 100 µs for its first 2 ms, then every millisecond. The daemon's own connections take
/// turns writing many short transactions; SQLite's own timeout sleeps 1, 2, 5, 10, 15, 20,
/// 25 ms between tries, so a writer waiting behind a 1 ms transaction often slept 10 ms or more.
pub(crate) fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_handler(Some(|tries: i32| {
        let Some(pause) = busy_pause(tries) else {
            return false;
        };
        std::thread::sleep(pause);
        true
    }))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")
}

impl Index {
    pub fn open(b: &BoxDir) -> anyhow::Result<Index> {
        let path = b.index_path();
        let conn =
            Connection::open(&path).with_context(|| format!("opening index {}", path.display()))?;
        configure(&conn)?;
        conn.execute_batch(SCHEMA)
            .context("creating index schema")?;
        Ok(Index { conn })
    }

    /// An in-memory index for tests.
    pub fn open_in_memory() -> anyhow::Result<Index> {
        let conn = Connection::open_in_memory()?;
        conn.execute_batch(SCHEMA)?;
        Ok(Index { conn })
    }

    /// The raw connection, for modules that keep their own tables here (sync state).
    pub fn conn(&self) -> &Connection {
        &self.conn
    }

    pub fn conn_mut(&mut self) -> &mut Connection {
        &mut self.conn
    }

    pub fn get(&self, path: &RelPath) -> anyhow::Result<Option<Stored>> {
        get_with(&self.conn, path)
    }

    /// Every record (tombstones too), ordered by path.
    pub fn all(&self) -> anyhow::Result<Vec<Stored>> {
        let mut stmt = self.conn.prepare_cached(concat!(
            "SELECT ",
            stored_columns!(),
            " FROM files ORDER BY path"
        ))?;
        let rows = stmt.query_map([], row_to_stored)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Live (not deleted) records, ordered by path.
    pub fn live(&self) -> anyhow::Result<Vec<Record>> {
        let mut stmt = self.conn.prepare_cached(concat!(
            "SELECT ",
            stored_columns!(),
            " FROM files WHERE deleted = 0 ORDER BY path"
        ))?;
        let rows = stmt.query_map([], row_to_stored)?;
        Ok(rows
            .map(|r| r.map(|s| s.record))
            .collect::<Result<_, _>>()?)
    }

    /// Live entries as the query commands show them, without loading block lists or version
    /// vectors (a listing of 100,000 files stays cheap). `hashed_files_only` selects regular
    /// files with both digests, for the hash commands.
    pub fn entries(
        &self,
        mtime_range: Option<(i64, i64)>,
        hashed_files_only: bool,
    ) -> anyhow::Result<Vec<crate::model::EntryInfo>> {
        let mut sql = String::from(
            "SELECT path, kind, size, mtime_ns, mode, target, md5, sha256 FROM files WHERE deleted = 0",
        );
        if mtime_range.is_some() {
            sql.push_str(" AND mtime_ns BETWEEN ?1 AND ?2");
        }
        if hashed_files_only {
            sql.push_str(" AND kind = 0 AND md5 IS NOT NULL AND sha256 IS NOT NULL");
        }
        sql.push_str(" ORDER BY path");
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let map = |row: &Row<'_>| -> rusqlite::Result<Option<crate::model::EntryInfo>> {
            let path: String = row.get(0)?;
            let Ok(path) = RelPath::parse(&path) else {
                return Ok(None);
            };
            let kind = Kind::from_i64(row.get(1)?).unwrap_or(Kind::File);
            Ok(Some(crate::model::EntryInfo {
                mime: crate::model::mime_for(&path, kind),
                path,
                kind,
                size: row.get::<_, i64>(2)? as u64,
                mtime_ns: row.get(3)?,
                mode: row.get::<_, i64>(4)? as u32,
                target: row.get(5)?,
                md5: if hashed_files_only {
                    blob_to_arr(row.get(6)?)
                } else {
                    None
                },
                sha256: if hashed_files_only {
                    blob_to_arr(row.get(7)?)
                } else {
                    None
                },
            }))
        };
        let rows = match mtime_range {
            Some((a, b)) => stmt
                .query_map(params![a, b], map)?
                .collect::<Result<Vec<_>, _>>()?,
            None => stmt.query_map([], map)?.collect::<Result<Vec<_>, _>>()?,
        };
        Ok(rows.into_iter().flatten().collect())
    }

    /// Records changed after `seq`, in sequence order (incremental index exchange).
    pub fn since(&self, seq: u64, limit: usize) -> anyhow::Result<Vec<Record>> {
        let mut stmt = self.conn.prepare_cached(concat!(
            "SELECT ",
            stored_columns!(),
            " FROM files WHERE sequence > ?1 ORDER BY sequence LIMIT ?2"
        ))?;
        let rows = stmt.query_map(params![seq as i64, limit as i64], row_to_stored)?;
        Ok(rows
            .map(|r| r.map(|s| s.record))
            .collect::<Result<_, _>>()?)
    }

    pub fn max_sequence(&self) -> anyhow::Result<u64> {
        let v: Option<i64> = self
            .conn
            .prepare_cached("SELECT MAX(sequence) FROM files")?
            .query_row([], |r| r.get(0))?;
        Ok(v.unwrap_or(0).max(0) as u64)
    }

    /// Allocate the next sequence number (monotonic even across deletes of rows).
    pub fn next_sequence(&self) -> anyhow::Result<u64> {
        let cur: Option<i64> = self
            .conn
            .prepare_cached("SELECT value FROM meta WHERE key = 'sequence'")?
            .query_row([], |r| r.get(0))
            .optional()?;
        let next = cur.unwrap_or(0).max(self.max_sequence()? as i64) + 1;
        self.conn
            .prepare_cached(
                "INSERT INTO meta(key, value) VALUES('sequence', ?1)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            )?
            .execute(params![next])?;
        Ok(next as u64)
    }

    /// Hand out sequence numbers from memory for a batch of changes (one transaction); call
    /// [`SeqAlloc::commit`] before the transaction ends.
    pub fn seq_alloc(&self) -> anyhow::Result<SeqAlloc> {
        let cur: Option<i64> = self
            .conn
            .prepare_cached("SELECT value FROM meta WHERE key = 'sequence'")?
            .query_row([], |r| r.get(0))
            .optional()?;
        Ok(SeqAlloc {
            last: cur.unwrap_or(0).max(self.max_sequence()? as i64) as u64,
            used: false,
        })
    }

    /// Insert or replace a record as is (its sequence must already be set).
    pub fn put(&self, rec: &Record, stat: Option<StatKey>) -> anyhow::Result<()> {
        let blocks: Vec<u8> = rec.blocks.iter().flatten().copied().collect();
        let version = bincode::serialize(&rec.version)?;
        self.conn
            .prepare_cached(
                "INSERT OR REPLACE INTO files
                 (path, kind, size, mtime_ns, mode, target, md5, sha256, blocks, version, deleted,
                  sequence, modified_by, st_size, st_mtime_ns, st_ctime_ns, st_inode)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
            )?
            .execute(params![
                rec.path.as_str(),
                rec.kind.to_i64(),
                rec.size as i64,
                rec.mtime_ns,
                rec.mode as i64,
                rec.target,
                rec.md5.map(|h| h.to_vec()),
                rec.sha256.map(|h| h.to_vec()),
                if rec.blocks.is_empty() { None } else { Some(blocks) },
                version,
                rec.deleted as i64,
                rec.sequence as i64,
                rec.modified_by as i64,
                stat.map(|s| s.size as i64),
                stat.map(|s| s.mtime_ns),
                stat.map(|s| s.ctime_ns),
                stat.map(|s| s.inode as i64),
            ])?;
        Ok(())
    }

    /// Update only the stat key of a record whose content proved unchanged.
    pub fn set_stat(&self, path: &RelPath, stat: StatKey) -> anyhow::Result<()> {
        self.conn.prepare_cached("UPDATE files SET st_size = ?2, st_mtime_ns = ?3, st_ctime_ns = ?4, st_inode = ?5 WHERE path = ?1")?
            .execute(
            params![path.as_str(), stat.size as i64, stat.mtime_ns, stat.ctime_ns, stat.inode as i64],
        )?;
        Ok(())
    }

    /// Live files that have their SHA-256 but not yet their MD5 (large files announced before
    /// their MD5 was computed), with the stat key their hashes belong to; at most `limit`.
    pub fn missing_md5(&self, limit: usize) -> anyhow::Result<Vec<(RelPath, StatKey)>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT path, st_size, st_mtime_ns, st_ctime_ns, st_inode FROM files
             WHERE deleted = 0 AND kind = 0 AND sha256 IS NOT NULL AND md5 IS NULL
               AND st_size IS NOT NULL LIMIT ?1",
        )?;
        let rows = stmt.query_map([limit as i64], |row| {
            Ok((
                row.get::<_, String>(0)?,
                StatKey {
                    size: row.get::<_, i64>(1)? as u64,
                    mtime_ns: row.get(2)?,
                    ctime_ns: row.get(3)?,
                    inode: row.get::<_, i64>(4)? as u64,
                },
            ))
        })?;
        let mut out = Vec::new();
        for r in rows {
            let (p, key) = r?;
            if let Ok(p) = RelPath::parse(&p) {
                out.push((p, key));
            }
        }
        Ok(out)
    }

    /// Record `md5` for `path` if its hashes still belong to `stat` (not a version: peers need
    /// nothing new). Returns whether it was recorded.
    pub fn set_md5_if(&self, path: &RelPath, stat: StatKey, md5: [u8; 16]) -> anyhow::Result<bool> {
        let n = self
            .conn
            .prepare_cached(
                "UPDATE files SET md5 = ?2 WHERE path = ?1 AND deleted = 0 AND md5 IS NULL
                 AND sha256 IS NOT NULL AND st_size = ?3 AND st_mtime_ns = ?4
                 AND st_ctime_ns = ?5 AND st_inode = ?6",
            )?
            .execute(params![
                path.as_str(),
                md5.to_vec(),
                stat.size as i64,
                stat.mtime_ns,
                stat.ctime_ns,
                stat.inode as i64
            ])?;
        Ok(n == 1)
    }

    /// Stat keys of all live files: what a scan compares the disk against without loading blocks.
    pub fn scan_view(&self) -> anyhow::Result<HashMap<RelPath, ScanRow>> {
        self.scan_view_under(&RelPath::root())
    }

    /// [`scan_view`](Self::scan_view) restricted to `under` and the paths below it, so scanning
    /// one changed file does not load the whole index (a range on the primary key: `/` + 1 is
    /// `0`, so `[under/, under0)` holds exactly the descendants).
    pub fn scan_view_under(&self, under: &RelPath) -> anyhow::Result<HashMap<RelPath, ScanRow>> {
        const COLS: &str = "SELECT path, kind, size, mtime_ns, mode, target, deleted,
                    sha256 IS NOT NULL, md5 IS NOT NULL,
                    st_size, st_mtime_ns, st_ctime_ns, st_inode FROM files";
        let (sql, lo, hi) = if under.is_root() {
            (COLS.to_string(), String::new(), String::new())
        } else {
            (
                format!("{COLS} WHERE path = ?1 OR (path >= ?2 AND path < ?3)"),
                format!("{under}/"),
                format!("{under}0"),
            )
        };
        let mut stmt = self.conn.prepare_cached(&sql)?;
        let mut out = HashMap::new();
        let path_str = under.as_str().to_string();
        let bind: Vec<&dyn rusqlite::ToSql> = if under.is_root() {
            Vec::new()
        } else {
            vec![&path_str as &dyn rusqlite::ToSql, &lo, &hi]
        };
        let rows = stmt.query_map(bind.as_slice(), |row| {
            let path: String = row.get(0)?;
            let st_size: Option<i64> = row.get(9)?;
            let stat = match st_size {
                Some(s) => Some(StatKey {
                    size: s as u64,
                    mtime_ns: row.get(10)?,
                    ctime_ns: row.get(11)?,
                    inode: row.get::<_, i64>(12)? as u64,
                }),
                None => None,
            };
            Ok((
                path,
                ScanRow {
                    kind: Kind::from_i64(row.get(1)?).unwrap_or(Kind::File),
                    size: row.get::<_, i64>(2)? as u64,
                    mtime_ns: row.get(3)?,
                    mode: row.get::<_, i64>(4)? as u32,
                    target: row.get(5)?,
                    deleted: row.get::<_, i64>(6)? != 0,
                    hashed: row.get(7)?,
                    has_md5: row.get(8)?,
                    stat,
                },
            ))
        })?;
        for r in rows {
            let (p, row) = r?;
            if let Ok(p) = RelPath::parse(&p) {
                out.insert(p, row);
            }
        }
        Ok(out)
    }

    /// Run `f` in one transaction (all-or-nothing; much faster for many puts).
    pub fn transaction<T>(
        &mut self,
        f: impl FnOnce(&Index) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        match f(self) {
            Ok(v) => {
                self.conn.execute_batch("COMMIT")?;
                Ok(v)
            }
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                Err(e)
            }
        }
    }

    /// A small integer kept by a module (e.g. this box's short device id).
    pub fn meta_get(&self, key: &str) -> anyhow::Result<Option<i64>> {
        Ok(self
            .conn
            .prepare_cached("SELECT value FROM meta WHERE key = ?1")?
            .query_row(params![key], |r| r.get(0))
            .optional()?)
    }

    pub fn meta_set(&self, key: &str, value: i64) -> anyhow::Result<()> {
        self.conn.prepare_cached("INSERT INTO meta(key, value) VALUES(?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value")?
            .execute(
            params![key, value],
        )?;
        Ok(())
    }
}

/// Sequence numbers handed out within one transaction.
pub struct SeqAlloc {
    last: u64,
    used: bool,
}

impl SeqAlloc {
    pub fn take(&mut self) -> u64 {
        self.last += 1;
        self.used = true;
        self.last
    }

    pub fn commit(self, ix: &Index) -> anyhow::Result<()> {
        if self.used {
            ix.meta_set("sequence", self.last as i64)?;
        }
        Ok(())
    }
}

/// What a scan needs to know about a stored path.
#[derive(Clone, Debug)]
pub struct ScanRow {
    pub kind: Kind,
    pub size: u64,
    pub mtime_ns: i64,
    pub mode: u32,
    pub target: Option<String>,
    pub deleted: bool,
    /// SHA-256 and blocks known (enough to sync).
    pub hashed: bool,
    /// MD5 known too (what the hash commands report).
    pub has_md5: bool,
    pub stat: Option<StatKey>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(p: &str, seq: u64) -> Record {
        Record {
            path: RelPath::parse(p).unwrap(),
            kind: Kind::File,
            size: 3,
            mtime_ns: 1_700_000_000_000_000_000,
            mode: 0o644,
            target: None,
            md5: Some([1; 16]),
            sha256: Some([2; 32]),
            blocks: vec![[3; 32], [4; 32]],
            version: VersionVector(vec![(9, 1)]),
            deleted: false,
            sequence: seq,
            modified_by: 9,
        }
    }

    #[test]
    fn put_get_since() {
        let mut ix = Index::open_in_memory().unwrap();
        ix.transaction(|ix| {
            ix.put(&rec("a", 1), None)?;
            ix.put(&rec("b/c", 2), None)?;
            Ok(())
        })
        .unwrap();
        let got = ix.get(&RelPath::parse("b/c").unwrap()).unwrap().unwrap();
        assert_eq!(got.record, rec("b/c", 2));
        assert_eq!(ix.since(1, 100).unwrap().len(), 1);
        assert_eq!(ix.max_sequence().unwrap(), 2);
        assert_eq!(ix.next_sequence().unwrap(), 3);
        assert_eq!(ix.next_sequence().unwrap(), 4);
        assert_eq!(ix.live().unwrap().len(), 2);
    }

    #[test]
    fn lock_waits_poll_fast_then_slowly_and_end() {
        use std::time::Duration;
        assert_eq!(busy_pause(0), Some(Duration::from_micros(100)));
        assert_eq!(busy_pause(19), Some(Duration::from_micros(100)));
        assert_eq!(busy_pause(20), Some(Duration::from_millis(1)));
        // 2 ms of fast tries, then 1 ms each: 30 s are up after 29,998 slow tries.
        assert_eq!(busy_pause(20 + 29_997), Some(Duration::from_millis(1)));
        assert_eq!(busy_pause(20 + 29_998), None);
        assert_eq!(busy_pause(i32::MAX), None);
        assert_eq!(busy_pause(-1), Some(Duration::from_micros(100)));
    }

    #[test]
    fn a_writer_waits_for_another_connections_transaction() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.db");
        let open = || {
            let c = Connection::open(&path).unwrap();
            configure(&c).unwrap();
            c.execute_batch(SCHEMA).unwrap();
            c
        };
        let (mut first, second) = (open(), open());
        let tx = first.transaction().unwrap();
        tx.execute("INSERT INTO meta(key, value) VALUES('a', 1)", [])
            .unwrap();
        let writer = std::thread::spawn(move || {
            let t0 = std::time::Instant::now();
            second
                .execute("INSERT INTO meta(key, value) VALUES('b', 2)", [])
                .map(|_| t0.elapsed())
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        tx.commit().unwrap();
        let waited = writer
            .join()
            .unwrap()
            .expect("the second writer gets the lock");
        assert!(waited >= std::time::Duration::from_millis(40), "{waited:?}");
        let n: i64 = first
            .query_row("SELECT COUNT(*) FROM meta", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 2);
    }
}
