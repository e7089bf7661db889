//! Sync-engine wire messages.
//!
//! Index exchange is pulled by the receiver: a box asks `IndexSince { since }` for every record
//! whose sequence is above the last one it stored, and a box whose sequence advanced only sends a
//! tiny `IndexChanged` hint to its connected peers. Keeping the receiver in charge of its cursor
//! means a reconnect, a hint lost with a dropped connection, or two hints racing each other can
//! never leave a gap or apply an older record over a newer one.

use serde::{Deserialize, Serialize};

use crate::model::Record;
use crate::paths::RelPath;
use crate::protocol::ErrorCode;

/// Records per `Response::Records` page.
pub const RECORDS_PER_FRAME: usize = 2000;
/// Budget of encoded record bytes per page (block lists of big files dominate), well under the
/// 16 MiB frame cap.
pub const RECORD_BYTES_PER_FRAME: usize = 6 * 1024 * 1024;
/// Blocks one `GetBlocks` may ask for (2 MiB of data with 128 KiB blocks): the server holds them
/// in memory while it answers, so this bounds a request's footprint.
pub const MAX_BLOCKS_PER_REQUEST: usize = 16;
/// Runs one `GetBatch` may ask for, and blocks in all of them: a batch is streamed (the server
/// holds at most one answer frame and one run in memory), so these bound work, not memory.
pub const MAX_RUNS_PER_BATCH: usize = 256;
pub const MAX_BLOCKS_PER_BATCH: usize = 1024;
/// An answer frame of a batch is sent once it holds this many bytes of block data.
pub const BATCH_FRAME_BYTES: usize = 1024 * 1024;

/// Blocks `first, first+1, ...` of `path`, expected to hash to `hashes`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BlockRun {
    pub path: RelPath,
    pub first: u64,
    pub hashes: Vec<[u8; 32]>,
}

/// The answer to one run of a `GetBatch`, in request order.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum RunAnswer {
    /// Every block of the run, in order.
    Blocks(Vec<crate::protocol::Chunk>),
    /// None of them (the same refusals as `GetBlocks`: changed, busy, not found, ...).
    Failed { code: ErrorCode, message: String },
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum SyncRequest {
    /// Every record with a sequence above `since`: answered by `Response::Records` pages, then
    /// `SyncResponse::IndexEnd`.
    IndexSince { since: u64 },
    /// The sender's index advanced to `max_seq`; the receiver pulls when it likes.
    IndexChanged { max_seq: u64 },
    /// The sender is hashing new versions of these large files (it announces them when done):
    /// the receiver may copy its own versions ahead, to build the new ones from. A hint only;
    /// answered by `SyncResponse::Ack` at once.
    Changing { paths: Vec<RelPath> },
    /// The blocks `first, first+1, ...` of `path`, expected to hash to `hashes`: answered by one
    /// `Response::Data` per block. The server refuses (ErrorCode::Changed) as soon as a block on
    /// disk does not match, so content that was never announced is never shipped.
    GetBlocks {
        path: RelPath,
        first: u64,
        hashes: Vec<[u8; 32]>,
    },
    /// Many runs (typically whole small files) in one request: answered by
    /// `SyncResponse::Runs` frames carrying one `RunAnswer` per run in request order, then
    /// `Response::Done`. One request, one server task and a few frames for hundreds of small
    /// files, where `GetBlocks` costs that per file.
    GetBatch { runs: Vec<BlockRun> },
    /// The sender is going away (shutdown).
    Bye,
    /// As `GetBlocks`, but the server may skip hashing the blocks it reads when the file's stat
    /// key is the one its index recorded and `hashes` are the recorded block hashes: the disk
    /// then holds exactly the announced bytes, unless they rotted silently. The receiver
    /// verifies every block anyway and, on a mismatch, asks again with `GetBlocks`, whose check
    /// refuses the corrupted block and reports it on the serving box. (Hashing every block it
    /// serves was a third of a sender's CPU time.)
    GetIndexedBlocks {
        path: RelPath,
        first: u64,
        hashes: Vec<[u8; 32]>,
    },
}

impl SyncRequest {
    pub fn kind_name(&self) -> &'static str {
        match self {
            SyncRequest::IndexSince { .. } => "index-since",
            SyncRequest::IndexChanged { .. } => "index-changed",
            SyncRequest::Changing { .. } => "changing",
            SyncRequest::GetBlocks { .. } => "get-blocks",
            SyncRequest::GetBatch { .. } => "get-batch",
            SyncRequest::Bye => "bye",
            SyncRequest::GetIndexedBlocks { .. } => "get-indexed-blocks",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum SyncResponse {
    /// End of an index stream: the highest sequence sent (or `since` if nothing was), and the
    /// sender's current maximum (lower than the asker's cursor means the sender's index was
    /// recreated and the asker must start over).
    IndexEnd {
        last_sent: u64,
        current_max: u64,
    },
    Ack,
    /// Answers to consecutive runs of a `GetBatch`.
    Runs(Vec<RunAnswer>),
}

/// Rough encoded size of a record, for paging.
pub fn record_weight(r: &Record) -> usize {
    200 + r.path.as_str().len() + r.blocks.len() * 32 + r.version.0.len() * 16
}

/// Split records into pages that stay far below the frame cap.
pub fn pages(records: Vec<Record>) -> Vec<Vec<Record>> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let mut weight = 0;
    for r in records {
        let w = record_weight(&r);
        if !cur.is_empty()
            && (cur.len() >= RECORDS_PER_FRAME || weight + w > RECORD_BYTES_PER_FRAME)
        {
            out.push(std::mem::take(&mut cur));
            weight = 0;
        }
        weight += w;
        cur.push(r);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}
