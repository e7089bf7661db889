//! UDP negotiation messages carried on the TLS control connection.
//!
//! The receiver asks with [`UdpRequest::Start`]; the sender answers [`UdpResponse::Ready`]
//! (session id, UDP port, the file's metadata) and, once every chunk is acknowledged,
//! [`UdpResponse::Finished`] with the MD5 and SHA-256 of exactly the bytes of the range — or an
//! error (`Changed` if the file changed during the transfer).

use serde::{Deserialize, Serialize};

use crate::model::EntryInfo;
use crate::paths::RelPath;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum UdpRequest {
    Start(StartRequest),
}

impl UdpRequest {
    pub fn kind_name(&self) -> &'static str {
        match self {
            UdpRequest::Start(_) => "start",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct StartRequest {
    pub path: RelPath,
    /// First byte of the range.
    pub offset: u64,
    /// Bytes wanted; `None` = to the end of the file.
    pub len: Option<u64>,
    /// Data bytes per chunk (the receiver picks it: its datagram size minus overheads).
    pub chunk: u32,
    /// Pacing rate at the start and the ceiling, bytes per second.
    pub initial_rate: u64,
    pub max_rate: u64,
    /// Chunks the receiver already holds from an interrupted attempt.
    pub resume: Option<Resume>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Resume {
    /// The file's size and mtime when the partial data was fetched; the sender honours the
    /// bitmap only if the file is still exactly that.
    pub size: u64,
    pub mtime_ns: i64,
    /// One bit per chunk, LSB first.
    #[serde(with = "serde_bytes")]
    pub have: Vec<u8>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum UdpResponse {
    Ready {
        session: [u8; 16],
        port: u16,
        entry: EntryInfo,
        /// Bytes in the range actually served.
        total: u64,
        /// Whether the resume bitmap was accepted.
        resumed: bool,
    },
    Finished {
        md5: [u8; 16],
        sha256: [u8; 32],
        size: u64,
        /// One line of sender statistics for the receiver's log.
        stats: String,
    },
}
