//! Wire messages and framing. A frame is a 4-byte big-endian length followed by that many bytes
//! of bincode; the length is checked against [`MAX_FRAME`] before anything is allocated, and the
//! decoder itself is bounded by the same limit. Knows nothing of sockets.

use bincode::Options;
use serde::{Deserialize, Serialize};

use crate::model::{EntryInfo, Record};
use crate::paths::RelPath;

/// Hard cap on one frame (bytes after the length prefix).
pub const MAX_FRAME: usize = 16 * 1024 * 1024;
/// Payload of one data frame in a TCP download.
pub const DATA_CHUNK: usize = 1024 * 1024;
/// Entries per listing frame, so a 100k-file listing streams instead of hitting the cap.
pub const ENTRIES_PER_FRAME: usize = 2000;
/// Protocol version spoken; bumped on incompatible changes.
pub const PROTOCOL_VERSION: u32 = 1;

/// Which paths a listing selects.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum ListFilter {
    All,
    /// mtime within [start, end], nanoseconds since the epoch, inclusive.
    MtimeRange {
        start_ns: i64,
        end_ns: i64,
    },
    /// Paths matching a regex (validated and size-bounded by the server).
    Regex(String),
    /// One path (hash verify).
    Path(RelPath),
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum Request {
    /// Version handshake, first request on every connection.
    Hello {
        version: u32,
        agent: String,
    },
    /// index longlist / shortlist / regex.
    List {
        filter: ListFilter,
    },
    /// hash verify / checkall.
    Hash {
        filter: ListFilter,
    },
    /// download tcp: stream the file from `offset`.
    Download {
        path: RelPath,
        offset: u64,
    },
    /// Sync-engine messages (defined by the sync module).
    Sync(crate::sync::proto::SyncRequest),
    /// UDP bulk-path negotiation (defined by the udp module).
    Udp(crate::udp::proto::UdpRequest),
    Ping,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum ErrorCode {
    BadRequest,
    BadPath,
    NotFound,
    NotAFile,
    Busy,
    Changed,
    Io,
    Unsupported,
    Internal,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum Response {
    Hello {
        version: u32,
        agent: String,
    },
    /// A page of a listing; more may follow until `end` of the frame.
    Entries(Vec<EntryInfo>),
    /// Start of a download: metadata (hashes may be absent; the trailer has them).
    FileHeader {
        entry: EntryInfo,
    },
    Data(#[serde(with = "serde_bytes")] Vec<u8>),
    /// End of a download: hashes of exactly the bytes sent.
    FileTrailer {
        md5: [u8; 16],
        sha256: [u8; 32],
        size: u64,
    },
    Sync(crate::sync::proto::SyncResponse),
    Udp(crate::udp::proto::UdpResponse),
    Records(Vec<Record>),
    Pong,
    Error {
        code: ErrorCode,
        message: String,
    },
    /// Empty final response.
    Done,
}

/// The unit on the wire. Requests carry an id; every response to it carries the same id, the
/// last one with `end = true`. Both ends may send requests on one connection.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum Frame {
    Request {
        id: u32,
        body: Request,
    },
    Response {
        id: u32,
        end: bool,
        body: Response,
    },
    /// The requester no longer wants the responses to `id`.
    Cancel {
        id: u32,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte cap")]
    TooLarge(usize),
    #[error("malformed frame: {0}")]
    Malformed(String),
}

fn codec() -> impl bincode::Options {
    bincode::DefaultOptions::new()
        .with_limit(MAX_FRAME as u64)
        .reject_trailing_bytes()
}

/// Encode a frame with its length prefix.
pub fn encode(frame: &Frame) -> Result<Vec<u8>, FrameError> {
    let size = codec()
        .serialized_size(frame)
        .map_err(|e| FrameError::Malformed(e.to_string()))? as usize;
    if size > MAX_FRAME {
        return Err(FrameError::TooLarge(size));
    }
    let mut out = Vec::with_capacity(4 + size);
    out.extend_from_slice(&(size as u32).to_be_bytes());
    codec()
        .serialize_into(&mut out, frame)
        .map_err(|e| FrameError::Malformed(e.to_string()))?;
    Ok(out)
}

/// Check a length prefix before reading (and allocating) the body.
pub fn check_len(prefix: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    if len == 0 {
        return Err(FrameError::Malformed("empty frame".into()));
    }
    Ok(len)
}

/// Decode one frame body (without its prefix).
pub fn decode(body: &[u8]) -> Result<Frame, FrameError> {
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(body.len()));
    }
    codec()
        .deserialize(body)
        .map_err(|e| FrameError::Malformed(e.to_string()))
}

/// Try to take one frame off the front of `buf` (for fuzzing and tests): `Ok(None)` means more
/// bytes are needed.
pub fn decode_prefixed(buf: &[u8]) -> Result<Option<(Frame, usize)>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = check_len([buf[0], buf[1], buf[2], buf[3]])?;
    if buf.len() < 4 + len {
        return Ok(None);
    }
    Ok(Some((decode(&buf[4..4 + len])?, 4 + len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let frames = vec![
            Frame::Request {
                id: 1,
                body: Request::List {
                    filter: ListFilter::Regex("a.*".into()),
                },
            },
            Frame::Response {
                id: 1,
                end: false,
                body: Response::Data(vec![1, 2, 3]),
            },
            Frame::Cancel { id: 9 },
            Frame::Request {
                id: 2,
                body: Request::Download {
                    path: RelPath::parse("x/y").unwrap(),
                    offset: 5,
                },
            },
        ];
        for f in frames {
            let bytes = encode(&f).unwrap();
            let (back, used) = decode_prefixed(&bytes).unwrap().unwrap();
            assert_eq!(back, f);
            assert_eq!(used, bytes.len());
            assert!(decode_prefixed(&bytes[..bytes.len() - 1])
                .unwrap()
                .is_none());
        }
    }

    #[test]
    fn rejects_oversized_and_garbage() {
        assert!(check_len([0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(check_len([0, 0, 0, 0]).is_err());
        assert!(decode(&[0xff; 64]).is_err());
        // A Data frame whose inner length claims 4 GiB must fail without allocating it.
        let mut evil = vec![1u8, 1, 0, 0, 0, 3]; // Response id=1 end=false, variant Data
        evil.extend_from_slice(&[0xfc, 0xff, 0xff, 0xff, 0xff]);
        assert!(decode(&evil).is_err());
        // A path that tries to climb out is refused by the decoder itself.
        let bad = Frame::Request {
            id: 3,
            body: Request::Download {
                path: RelPath::root(),
                offset: 0,
            },
        };
        let mut bytes = encode(&bad).unwrap();
        // Replace the empty path with "../x" by re-encoding by hand.
        bytes.truncate(4);
        let mut body = Vec::new();
        body.extend_from_slice(&[0u8, 3, 3, 4]);
        body.extend_from_slice(b"../x");
        body.push(0);
        assert!(decode(&body).is_err());
    }
}
