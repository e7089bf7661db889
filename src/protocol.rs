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
pub const PROTOCOL_VERSION: u32 = 3;

/// The bytes of a data message (a download chunk, a block). A chunk decoded by
/// [`decode_shared`] is a view into the received frame's own buffer: the data is not copied
/// out of the frame (bulk transfers copied every byte once more here). Decoded any other way
/// it owns a copy. On the wire it is a plain byte string, as `serde_bytes` writes one.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Chunk(bytes::Bytes);

impl Chunk {
    pub fn into_bytes(self) -> bytes::Bytes {
        self.0
    }
}

impl std::ops::Deref for Chunk {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl AsRef<[u8]> for Chunk {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl From<Vec<u8>> for Chunk {
    fn from(v: Vec<u8>) -> Chunk {
        Chunk(bytes::Bytes::from(v))
    }
}

impl From<bytes::Bytes> for Chunk {
    fn from(b: bytes::Bytes) -> Chunk {
        Chunk(b)
    }
}

impl std::fmt::Debug for Chunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Chunk({} bytes)", self.0.len())
    }
}

impl Serialize for Chunk {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // Under `encode_parts`, a large chunk is announced to the writer, which then keeps a
        // reference to it instead of copying its bytes.
        let share = self.0.len() >= SHARE_MIN && ENCODING_PARTS.get();
        if share {
            SHARED_CHUNK.with(|c| *c.borrow_mut() = Some(self.0.clone()));
        }
        let r = s.serialize_bytes(&self.0);
        if share {
            SHARED_CHUNK.with(|c| c.borrow_mut().take());
        }
        r
    }
}

thread_local! {
    /// The frame buffer [`decode_shared`] is decoding on this thread, if any.
    static DECODING: std::cell::RefCell<Option<bytes::Bytes>> =
        const { std::cell::RefCell::new(None) };
    /// [`encode_parts`] is encoding on this thread.
    static ENCODING_PARTS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// The chunk being serialised under [`encode_parts`], whose bytes its writer is about to get.
    static SHARED_CHUNK: std::cell::RefCell<Option<bytes::Bytes>> =
        const { std::cell::RefCell::new(None) };
}

/// Chunks at least this long are referenced by [`encode_parts`], smaller ones copied (cheaper
/// than one more piece to hand to the socket).
const SHARE_MIN: usize = 1024;

struct ChunkVisitor;

impl<'de> serde::de::Visitor<'de> for ChunkVisitor {
    type Value = Chunk;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a byte string")
    }

    fn visit_borrowed_bytes<E: serde::de::Error>(self, v: &'de [u8]) -> Result<Chunk, E> {
        // Borrowed from the input: when that input is the frame buffer being decoded by
        // `decode_shared`, share it instead of copying.
        let shared = DECODING.with(|d| {
            d.borrow().as_ref().and_then(|src| {
                let (base, p) = (src.as_ptr() as usize, v.as_ptr() as usize);
                (p >= base && p + v.len() <= base + src.len()).then(|| src.slice_ref(v))
            })
        });
        Ok(Chunk(
            shared.unwrap_or_else(|| bytes::Bytes::copy_from_slice(v)),
        ))
    }

    fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Chunk, E> {
        Ok(Chunk(bytes::Bytes::copy_from_slice(v)))
    }

    fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Chunk, E> {
        Ok(Chunk::from(v))
    }
}

impl<'de> Deserialize<'de> for Chunk {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Chunk, D::Error> {
        d.deserialize_bytes(ChunkVisitor)
    }
}

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
    Data(Chunk),
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

/// Decode one frame body taken whole from the connection: the [`Chunk`]s in it are views into
/// `body`, not copies.
pub fn decode_shared(body: bytes::Bytes) -> Result<Frame, FrameError> {
    struct Clear;
    impl Drop for Clear {
        fn drop(&mut self) {
            DECODING.with(|d| d.borrow_mut().take());
        }
    }
    DECODING.with(|d| *d.borrow_mut() = Some(body.clone()));
    let _clear = Clear;
    decode(&body)
}

/// A frame encoded as pieces whose concatenation is exactly what [`encode`] makes of it: the
/// bytes of every [`Chunk`] of at least [`SHARE_MIN`] bytes are referenced, not copied; the rest
/// (the length prefix, the fields around the chunks, small chunks) is copied into pieces between
/// them. A sender hands the pieces to the socket together (a vectored write), so bulk data goes
/// from the buffer it was read into straight to the TLS layer.
#[derive(Debug, Default)]
pub struct EncodedFrame {
    pub parts: Vec<bytes::Bytes>,
    /// Total bytes of all parts (the length prefix included).
    pub len: usize,
}

pub fn encode_parts(frame: &Frame) -> Result<EncodedFrame, FrameError> {
    struct Parts {
        done: Vec<bytes::Bytes>,
        head: Vec<u8>,
    }
    impl std::io::Write for Parts {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            // bincode writes a byte string's bytes in one call, with the slice it was given:
            // the announced chunk's own memory.
            let shared = SHARED_CHUNK.with(|c| {
                c.borrow()
                    .as_ref()
                    .filter(|b| b.as_ptr() == buf.as_ptr() && b.len() == buf.len())
                    .cloned()
            });
            match shared {
                Some(b) => {
                    if !self.head.is_empty() {
                        let head = std::mem::take(&mut self.head);
                        self.done.push(bytes::Bytes::from(head));
                    }
                    self.done.push(b);
                }
                None => self.head.extend_from_slice(buf),
            }
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            ENCODING_PARTS.set(false);
            SHARED_CHUNK.with(|c| c.borrow_mut().take());
        }
    }
    // Sized without the decoder's limit, so an oversized frame is reported as such.
    let size = bincode::DefaultOptions::new()
        .serialized_size(frame)
        .map_err(|e| FrameError::Malformed(e.to_string()))? as usize;
    if size > MAX_FRAME {
        return Err(FrameError::TooLarge(size));
    }
    let mut w = Parts {
        done: Vec::new(),
        head: Vec::with_capacity(64),
    };
    w.head.extend_from_slice(&(size as u32).to_be_bytes());
    {
        ENCODING_PARTS.set(true);
        let _reset = Reset;
        codec()
            .serialize_into(&mut w, frame)
            .map_err(|e| FrameError::Malformed(e.to_string()))?;
    }
    if !w.head.is_empty() {
        w.done.push(bytes::Bytes::from(w.head));
    }
    Ok(EncodedFrame {
        parts: w.done,
        len: 4 + size,
    })
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

/// One frame of every message variant (every request, response, filter, sync and UDP message,
/// error code), for round-trip tests and as the fuzzer's starting points. The `match` below has
/// no wildcard arm, so a new variant does not compile until it gets a sample here.
#[doc(hidden)]
pub fn sample_frames() -> Vec<Frame> {
    use crate::model::{Kind, VersionVector};
    use crate::sync::proto::{BlockRun, RunAnswer, SyncRequest, SyncResponse};
    use crate::udp::proto::{Resume, StartRequest, UdpRequest, UdpResponse};
    let path = RelPath::parse("dir/file.txt").unwrap_or_default();
    let entry = EntryInfo {
        path: path.clone(),
        kind: Kind::File,
        size: 3,
        mtime_ns: -5,
        mode: 0o644,
        mime: "text/plain".into(),
        target: Some("t".into()),
        md5: Some([1; 16]),
        sha256: Some([2; 32]),
    };
    let record = Record {
        path: path.clone(),
        kind: Kind::Symlink,
        size: 1 << 20,
        mtime_ns: 7,
        mode: 0o755,
        target: Some("../x".into()),
        md5: None,
        sha256: Some([3; 32]),
        blocks: vec![[4; 32], [5; 32]],
        version: VersionVector(vec![(1, 2), (3, 4)]),
        deleted: true,
        sequence: 9,
        modified_by: 11,
    };
    let filters = vec![
        ListFilter::All,
        ListFilter::MtimeRange {
            start_ns: -1,
            end_ns: i64::MAX,
        },
        ListFilter::Regex("^a.*b$".into()),
        ListFilter::Path(path.clone()),
    ];
    let mut requests = vec![
        Request::Hello {
            version: PROTOCOL_VERSION,
            agent: "mybox/x".into(),
        },
        Request::Download {
            path: path.clone(),
            offset: 5,
        },
        Request::Sync(SyncRequest::IndexSince { since: 3 }),
        Request::Sync(SyncRequest::IndexChanged { max_seq: 4 }),
        Request::Sync(SyncRequest::Changing {
            paths: vec![path.clone()],
        }),
        Request::Sync(SyncRequest::GetBlocks {
            path: path.clone(),
            first: 2,
            hashes: vec![[6; 32]; 3],
        }),
        Request::Sync(SyncRequest::GetBatch {
            runs: vec![
                BlockRun {
                    path: path.clone(),
                    first: 0,
                    hashes: vec![[7; 32]],
                },
                BlockRun {
                    path: path.clone(),
                    first: 4,
                    hashes: vec![[8; 32]; 2],
                },
            ],
        }),
        Request::Sync(SyncRequest::Bye),
        Request::Sync(SyncRequest::GetIndexedBlocks {
            path: path.clone(),
            first: 2,
            hashes: vec![[6; 32]; 3],
        }),
        Request::Ping,
    ];
    for f in &filters {
        requests.push(Request::List { filter: f.clone() });
        requests.push(Request::Hash { filter: f.clone() });
    }
    for resume in [
        None,
        Some(Resume {
            size: 100,
            mtime_ns: 8,
            have: vec![0xa5, 0x01],
        }),
    ] {
        requests.push(Request::Udp(UdpRequest::Start(StartRequest {
            path: path.clone(),
            offset: 1,
            len: Some(50),
            chunk: 1200,
            initial_rate: 1 << 20,
            max_rate: 1 << 30,
            resume,
        })));
    }
    let mut responses = vec![
        Response::Hello {
            version: PROTOCOL_VERSION,
            agent: "mybox/y".into(),
        },
        Response::Entries(vec![entry.clone(), entry.clone()]),
        Response::FileHeader {
            entry: entry.clone(),
        },
        Response::Data(vec![0, 1, 2, 255].into()),
        Response::FileTrailer {
            md5: [7; 16],
            sha256: [8; 32],
            size: 4,
        },
        Response::Sync(SyncResponse::IndexEnd {
            last_sent: 1,
            current_max: 2,
        }),
        Response::Sync(SyncResponse::Ack),
        Response::Sync(SyncResponse::Runs(vec![
            RunAnswer::Blocks(vec![vec![1, 2].into(), Chunk::default()]),
            RunAnswer::Failed {
                code: ErrorCode::Changed,
                message: "m".into(),
            },
        ])),
        Response::Udp(UdpResponse::Ready {
            session: [9; 16],
            port: 4000,
            entry: entry.clone(),
            total: 3,
            resumed: true,
        }),
        Response::Udp(UdpResponse::Finished {
            md5: [10; 16],
            sha256: [11; 32],
            size: 3,
            stats: "s".into(),
        }),
        Response::Records(vec![record]),
        Response::Pong,
        Response::Done,
    ];
    for code in [
        ErrorCode::BadRequest,
        ErrorCode::BadPath,
        ErrorCode::NotFound,
        ErrorCode::NotAFile,
        ErrorCode::Busy,
        ErrorCode::Changed,
        ErrorCode::Io,
        ErrorCode::Unsupported,
        ErrorCode::Internal,
    ] {
        responses.push(Response::Error {
            code,
            message: format!("{code:?}"),
        });
    }
    let mut frames: Vec<Frame> = Vec::new();
    for (i, body) in requests.into_iter().enumerate() {
        frames.push(Frame::Request { id: i as u32, body });
    }
    for (i, body) in responses.into_iter().enumerate() {
        frames.push(Frame::Response {
            id: i as u32,
            end: i % 2 == 0,
            body,
        });
    }
    frames.push(Frame::Cancel { id: u32::MAX });
    // Exhaustiveness witness: a variant missing above is a compile error here.
    for f in &frames {
        match f {
            Frame::Request { body, .. } => match body {
                Request::Hello { .. }
                | Request::List { .. }
                | Request::Hash { .. }
                | Request::Download { .. }
                | Request::Ping => {}
                Request::Sync(s) => match s {
                    SyncRequest::IndexSince { .. }
                    | SyncRequest::IndexChanged { .. }
                    | SyncRequest::Changing { .. }
                    | SyncRequest::GetBlocks { .. }
                    | SyncRequest::GetIndexedBlocks { .. }
                    | SyncRequest::GetBatch { .. }
                    | SyncRequest::Bye => {}
                },
                Request::Udp(UdpRequest::Start(_)) => {}
            },
            Frame::Response { body, .. } => match body {
                Response::Hello { .. }
                | Response::Entries(_)
                | Response::FileHeader { .. }
                | Response::Data(_)
                | Response::FileTrailer { .. }
                | Response::Records(_)
                | Response::Pong
                | Response::Error { .. }
                | Response::Done => {}
                Response::Sync(
                    SyncResponse::IndexEnd { .. } | SyncResponse::Ack | SyncResponse::Runs(_),
                ) => {}
                Response::Udp(UdpResponse::Ready { .. } | UdpResponse::Finished { .. }) => {}
            },
            Frame::Cancel { .. } => {}
        }
    }
    frames
}

/// Bincode varint length prefixes that claim far more than any frame holds (a u64, u32::MAX,
/// and one byte under the frame cap), for tests that splice them into encoded messages.
#[doc(hidden)]
pub fn huge_length_claims() -> Vec<Vec<u8>> {
    let mut u64_claim = vec![0xfd];
    u64_claim.extend_from_slice(&(u64::MAX / 3).to_le_bytes());
    let mut u32_claim = vec![0xfc];
    u32_claim.extend_from_slice(&u32::MAX.to_le_bytes());
    let mut under_cap = vec![0xfc];
    under_cap.extend_from_slice(&(MAX_FRAME as u32 - 1).to_le_bytes());
    vec![u64_claim, u32_claim, under_cap]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_decode_views_the_frame_buffer() {
        let data: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        let frame = Frame::Response {
            id: 3,
            end: false,
            body: Response::Sync(crate::sync::proto::SyncResponse::Runs(vec![
                crate::sync::proto::RunAnswer::Blocks(vec![data[..1000].to_vec().into()]),
            ])),
        };
        for f in [
            frame,
            Frame::Response {
                id: 7,
                end: true,
                body: Response::Data(data.clone().into()),
            },
        ] {
            let bytes = encode(&f).unwrap();
            let body = bytes::Bytes::copy_from_slice(&bytes[4..]);
            let back = decode_shared(body.clone()).unwrap();
            assert_eq!(back, f);
            let chunk = match &back {
                Frame::Response {
                    body: Response::Data(c),
                    ..
                } => c.clone(),
                Frame::Response {
                    body: Response::Sync(crate::sync::proto::SyncResponse::Runs(r)),
                    ..
                } => match &r[0] {
                    crate::sync::proto::RunAnswer::Blocks(b) => b[0].clone(),
                    other => panic!("{other:?}"),
                },
                other => panic!("{other:?}"),
            };
            // The chunk lies inside the frame buffer: nothing was copied.
            let (base, p) = (body.as_ptr() as usize, chunk.as_ptr() as usize);
            assert!(p >= base && p + chunk.len() <= base + body.len());
            // A plain decode copies, and nothing is left behind for the next decode.
            let plain = decode(&bytes[4..]).unwrap();
            assert_eq!(plain, f);
        }
    }

    fn joined(e: &EncodedFrame) -> Vec<u8> {
        let v: Vec<u8> = e.parts.iter().flat_map(|p| p.iter().copied()).collect();
        assert_eq!(v.len(), e.len);
        v
    }

    #[test]
    fn parts_are_the_encoded_frame_and_reference_large_chunks() {
        // Every message variant, and data and block answers around each varint width and
        // around the sharing threshold.
        let mut frames = sample_frames();
        for len in [
            0usize,
            1,
            250,
            251,
            1023,
            1024,
            65_535,
            65_536,
            131_072,
            1 << 20,
        ] {
            let data: Chunk = (0..len).map(|i| (i * 7) as u8).collect::<Vec<u8>>().into();
            for (id, end) in [(0u32, false), (1, true), (u32::MAX, false)] {
                frames.push(Frame::Response {
                    id,
                    end,
                    body: Response::Data(data.clone()),
                });
            }
            let runs = vec![
                crate::sync::proto::RunAnswer::Blocks(vec![data.clone(), vec![9u8; 3].into()]),
                crate::sync::proto::RunAnswer::Failed {
                    code: ErrorCode::Busy,
                    message: "busy".into(),
                },
                crate::sync::proto::RunAnswer::Blocks(vec![data.clone()]),
            ];
            frames.push(Frame::Response {
                id: 7,
                end: false,
                body: Response::Sync(crate::sync::proto::SyncResponse::Runs(runs)),
            });
        }
        for f in &frames {
            let whole = encode(f).unwrap();
            let parts = encode_parts(f).unwrap();
            assert_eq!(joined(&parts), whole, "{f:?}");
        }
        // A large chunk is referenced (the same memory), a small one copied.
        let big: Chunk = vec![5u8; 4096].into();
        let small: Chunk = vec![6u8; 100].into();
        let f = Frame::Response {
            id: 1,
            end: true,
            body: Response::Sync(crate::sync::proto::SyncResponse::Runs(vec![
                crate::sync::proto::RunAnswer::Blocks(vec![small.clone(), big.clone()]),
            ])),
        };
        let parts = encode_parts(&f).unwrap();
        assert!(parts.parts.iter().any(|p| p.as_ptr() == big.as_ptr()));
        assert!(!parts.parts.iter().any(|p| p.as_ptr() == small.as_ptr()));
        // Encoding elsewhere on the thread afterwards copies as before.
        assert_eq!(encode(&f).unwrap(), joined(&parts));
        let too_big: Chunk = vec![0u8; MAX_FRAME].into();
        assert!(matches!(
            encode_parts(&Frame::Response {
                id: 1,
                end: false,
                body: Response::Data(too_big)
            }),
            Err(FrameError::TooLarge(_))
        ));
    }

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
                body: Response::Data(vec![1, 2, 3].into()),
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
    fn every_sample_variant_roundtrips() {
        let frames = sample_frames();
        assert!(frames.len() >= 39, "{} samples", frames.len());
        for f in frames {
            let bytes = encode(&f).unwrap();
            let (back, used) = decode_prefixed(&bytes).unwrap().unwrap();
            assert_eq!(back, f);
            assert_eq!(used, bytes.len());
        }
    }

    /// Every length field of every message claims far more than the frame holds (u32::MAX and
    /// u64 lengths, and one just under the cap): decoding fails cleanly; that it never allocates
    /// the claimed size is measured by `decoders_never_allocate_a_claimed_length` in
    /// tests/attacks.rs, which counts allocations.
    #[test]
    fn huge_inner_lengths_fail_cleanly() {
        let mut tried = 0;
        for f in sample_frames() {
            let body = encode(&f).unwrap()[4..].to_vec();
            for at in 0..body.len() {
                for claim in huge_length_claims() {
                    let mut evil = body[..at].to_vec();
                    evil.extend_from_slice(&claim);
                    evil.extend_from_slice(&body[at..]);
                    // Whatever decodes must have consumed the claim as a number, not a length.
                    if let Ok(back) = decode(&evil) {
                        assert!(encode(&back).is_ok());
                    }
                    tried += 1;
                }
            }
        }
        assert!(tried > 1000);
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
