//! Datagram wire format and per-datagram AEAD.
//!
//! ```text
//! +---------+----------------+------------------+----------------------------+----------+
//! | ver (1) | session id(16) | packet number(8) | ciphertext (type + body)   | tag (16) |
//! +---------+----------------+------------------+----------------------------+----------+
//!  \_______________ AAD (authenticated, clear) __/
//! ```
//!
//! AES-256-GCM with one key per direction (HKDF-SHA256 over the TLS exporter, salt = session
//! id). The nonce is the 64-bit packet number, zero-extended to 96 bits; each direction's
//! packet numbers strictly increase, so a (key, nonce) pair is never reused. Every decoding
//! check runs before anything is allocated from a length field; a datagram that fails any
//! check is reported as a [`Drop`] reason and never reaches the state machines.

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use ring::hkdf;

pub const VERSION: u8 = 1;
pub const SESSION_LEN: usize = 16;
pub const HEADER_LEN: usize = 1 + SESSION_LEN + 8;
pub const TAG_LEN: usize = 16;
/// Bytes of a datagram that are not body: header + tag.
pub const OVERHEAD: usize = HEADER_LEN + TAG_LEN;
/// Largest datagram either side builds or accepts (fits in one IPv4 UDP datagram).
pub const MAX_DATAGRAM: usize = 65_000;
/// Smallest datagram size a session may negotiate (room for an ACK with a few ranges).
pub const MIN_DATAGRAM: usize = 256;

pub type SessionId = [u8; SESSION_LEN];

/// Which way a key protects traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// Sender (serving box) to receiver: data.
    S2c,
    /// Receiver to sender: hello, acks, done.
    C2s,
}

impl Dir {
    fn info(self) -> &'static [u8] {
        match self {
            Dir::S2c => b"mybox udp s2c",
            Dir::C2s => b"mybox udp c2s",
        }
    }
}

/// Why a datagram was thrown away (each has a counter in [`Counters`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drop {
    /// Shorter than header + tag, or a body too short for its type.
    Truncated,
    /// Wrong version byte or a session id that is not this session's.
    UnknownSession,
    /// AEAD open failed: forged, corrupted, or sealed with another key.
    AuthFailed,
    /// Packet number already seen.
    Replayed,
    /// Packet number older than the replay window.
    Stale,
    /// Authentic but not acceptable here (wrong type, wrong source address, bad fields).
    Unexpected,
}

/// Counts of everything dropped; tests assert on them and the drivers log them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub received: u64,
    pub accepted: u64,
    pub truncated: u64,
    pub unknown_session: u64,
    pub auth_failed: u64,
    pub replayed: u64,
    pub stale: u64,
    pub unexpected: u64,
    /// Authentic data for a chunk already held (a retransmission that crossed an ack).
    pub duplicate: u64,
}

impl Counters {
    pub fn count(&mut self, d: Drop) {
        match d {
            Drop::Truncated => self.truncated += 1,
            Drop::UnknownSession => self.unknown_session += 1,
            Drop::AuthFailed => self.auth_failed += 1,
            Drop::Replayed => self.replayed += 1,
            Drop::Stale => self.stale += 1,
            Drop::Unexpected => self.unexpected += 1,
        }
    }

    pub fn dropped(&self) -> u64 {
        self.truncated
            + self.unknown_session
            + self.auth_failed
            + self.replayed
            + self.stale
            + self.unexpected
    }
}

impl std::fmt::Display for Counters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "received={} accepted={} duplicate={} truncated={} unknown_session={} auth_failed={} replayed={} stale={} unexpected={}",
            self.received,
            self.accepted,
            self.duplicate,
            self.truncated,
            self.unknown_session,
            self.auth_failed,
            self.replayed,
            self.stale,
            self.unexpected
        )
    }
}

struct Len(usize);
impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// One direction's AEAD key.
pub struct Key {
    key: LessSafeKey,
}

impl Key {
    /// HKDF-SHA256(salt = session id, ikm = exporter, info = direction label).
    pub fn derive(exporter: &[u8; 64], session: &SessionId, dir: Dir) -> Key {
        let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, session);
        let prk = salt.extract(exporter);
        let info = [dir.info()];
        let mut bytes = [0u8; 32];
        // Expanding 32 bytes from SHA-256 cannot fail (the limit is 255 * 32).
        let okm = prk.expand(&info, Len(32)).expect("hkdf length in range");
        okm.fill(&mut bytes).expect("hkdf length in range");
        let unbound = UnboundKey::new(&AES_256_GCM, &bytes).expect("32-byte AES-256 key");
        Key {
            key: LessSafeKey::new(unbound),
        }
    }

    fn nonce(pn: u64) -> Nonce {
        let mut n = [0u8; aead::NONCE_LEN];
        n[4..].copy_from_slice(&pn.to_be_bytes());
        Nonce::assume_unique_for_key(n)
    }
}

/// Seal a datagram into `out` (cleared first): header, then `body` encrypted, then the tag.
/// `body` starts with the packet type byte.
pub fn seal(key: &Key, session: &SessionId, pn: u64, body: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.reserve(HEADER_LEN + body.len() + TAG_LEN);
    out.push(VERSION);
    out.extend_from_slice(session);
    out.extend_from_slice(&pn.to_be_bytes());
    out.extend_from_slice(body);
    seal_in_place(key, out);
}

/// Seal a datagram whose header and clear body are already in `buf` (as written by
/// [`write_header`]); appends the tag.
pub fn seal_in_place(key: &Key, buf: &mut Vec<u8>) {
    let (head, body) = buf.split_at_mut(HEADER_LEN);
    let pn = u64::from_be_bytes(
        head[1 + SESSION_LEN..HEADER_LEN]
            .try_into()
            .unwrap_or([0; 8]),
    );
    let tag = key
        .key
        .seal_in_place_separate_tag(Key::nonce(pn), Aad::from(&*head), body)
        // Fails only for bodies over ~64 GiB.
        .expect("datagram body within AEAD limits");
    buf.extend_from_slice(tag.as_ref());
}

/// Write the clear header into `buf` (cleared first) so a body can be appended in place.
pub fn write_header(session: &SessionId, pn: u64, buf: &mut Vec<u8>) {
    buf.clear();
    buf.push(VERSION);
    buf.extend_from_slice(session);
    buf.extend_from_slice(&pn.to_be_bytes());
}

/// Check the header of `dgram` without decrypting: its packet number if it is for `session`.
pub fn peek(dgram: &[u8], session: &SessionId) -> Result<u64, Drop> {
    if dgram.len() < OVERHEAD + 1 {
        return Err(Drop::Truncated);
    }
    if dgram[0] != VERSION || dgram[1..1 + SESSION_LEN] != session[..] {
        return Err(Drop::UnknownSession);
    }
    let mut pn = [0u8; 8];
    pn.copy_from_slice(&dgram[1 + SESSION_LEN..HEADER_LEN]);
    Ok(u64::from_be_bytes(pn))
}

/// Authenticate and decrypt `dgram` in place; returns the packet number and the range of
/// `dgram` holding the clear body (type byte first).
pub fn open(
    key: &Key,
    session: &SessionId,
    dgram: &mut [u8],
) -> Result<(u64, std::ops::Range<usize>), Drop> {
    let pn = peek(dgram, session)?;
    let (head, rest) = dgram.split_at_mut(HEADER_LEN);
    let clear = key
        .key
        .open_in_place(Key::nonce(pn), Aad::from(&*head), rest)
        .map_err(|_| Drop::AuthFailed)?;
    let n = clear.len();
    Ok((pn, HEADER_LEN..HEADER_LEN + n))
}

/// Sliding window of packet numbers already accepted (RFC 4303-style bitmap).
#[derive(Clone, Debug, Default)]
pub struct ReplayWindow {
    /// Highest packet number accepted plus one (0 = none yet).
    top: u64,
    bits: [u64; WINDOW_WORDS],
}

const WINDOW_WORDS: usize = 16;
/// Packet numbers this far below the highest one seen are refused as stale.
pub const WINDOW: u64 = (WINDOW_WORDS * 64) as u64;

impl ReplayWindow {
    fn bit(&mut self, pn: u64) -> (&mut u64, u64) {
        let i = (pn % WINDOW) as usize;
        (&mut self.bits[i / 64], 1u64 << (i % 64))
    }

    /// Would `pn` be accepted? (Checked before the AEAD so forged numbers cost nothing, and
    /// committed only after the AEAD succeeds so forgeries cannot poison the window.)
    pub fn check(&mut self, pn: u64) -> Result<(), Drop> {
        if pn >= self.top {
            return Ok(());
        }
        if self.top - pn > WINDOW {
            return Err(Drop::Stale);
        }
        let (w, m) = self.bit(pn);
        if *w & m != 0 {
            Err(Drop::Replayed)
        } else {
            Ok(())
        }
    }

    /// Record `pn` as seen (after [`check`](Self::check) and authentication).
    pub fn commit(&mut self, pn: u64) {
        if pn >= self.top {
            // Clear the bits of the numbers skipped over; they are now inside the window.
            let advance = pn + 1 - self.top;
            if advance >= WINDOW {
                self.bits = [0; WINDOW_WORDS];
            } else {
                for p in self.top..=pn {
                    let (w, m) = self.bit(p);
                    *w &= !m;
                }
            }
            self.top = pn + 1;
        }
        let (w, m) = self.bit(pn);
        *w |= m;
    }
}

/// Little helpers for reading fixed-width big-endian fields with bounds checks.
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], Drop> {
        if self.buf.len() < n {
            return Err(Drop::Truncated);
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    pub fn u8(&mut self) -> Result<u8, Drop> {
        Ok(self.take(1)?[0])
    }
    pub fn u16(&mut self) -> Result<u16, Drop> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    pub fn u32(&mut self) -> Result<u32, Drop> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub fn u64(&mut self) -> Result<u64, Drop> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    pub fn rest(self) -> &'a [u8] {
        self.buf
    }
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }
}

/// Packet types (first byte of the clear body).
pub mod kind {
    /// c2s: "I hold the key; send to this address".
    pub const HELLO: u8 = 1;
    /// s2c: one chunk of data.
    pub const DATA: u8 = 2;
    /// c2s: acknowledgement with a gap list.
    pub const ACK: u8 = 3;
    /// c2s: every chunk is here.
    pub const DONE: u8 = 4;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> (Key, Key, SessionId) {
        let exp = [7u8; 64];
        let sid = [9u8; 16];
        (
            Key::derive(&exp, &sid, Dir::S2c),
            Key::derive(&exp, &sid, Dir::C2s),
            sid,
        )
    }

    #[test]
    fn seal_open_roundtrip_and_tamper() {
        let (s2c, c2s, sid) = keys();
        let mut out = Vec::new();
        seal(&s2c, &sid, 42, &[kind::DATA, 1, 2, 3], &mut out);
        let mut copy = out.clone();
        let (pn, r) = open(&s2c, &sid, &mut copy).unwrap();
        assert_eq!(pn, 42);
        assert_eq!(&copy[r], &[kind::DATA, 1, 2, 3]);
        // Wrong direction key.
        assert_eq!(
            open(&c2s, &sid, &mut out.clone()).unwrap_err(),
            Drop::AuthFailed
        );
        // Every single-bit flip is caught (header bits by session check or AEAD).
        for i in 0..out.len() * 8 {
            let mut t = out.clone();
            t[i / 8] ^= 1 << (i % 8);
            assert!(open(&s2c, &sid, &mut t).is_err(), "bit {i}");
        }
        // Truncations.
        for n in 0..out.len() {
            assert!(open(&s2c, &sid, &mut out[..n].to_vec()).is_err());
        }
        // Other session.
        assert_eq!(
            open(&s2c, &[1u8; 16], &mut out.clone()).unwrap_err(),
            Drop::UnknownSession
        );
        // Other exporter.
        let other = Key::derive(&[8u8; 64], &sid, Dir::S2c);
        assert_eq!(
            open(&other, &sid, &mut out.clone()).unwrap_err(),
            Drop::AuthFailed
        );
    }

    #[test]
    fn replay_window() {
        let mut w = ReplayWindow::default();
        for pn in [0u64, 1, 5, 3, 2000] {
            w.check(pn).unwrap();
            w.commit(pn);
            assert_eq!(w.check(pn), Err(Drop::Replayed));
        }
        assert_eq!(w.check(5), Err(Drop::Stale));
        w.check(1999).unwrap();
        w.check(2000 - WINDOW + 1).unwrap();
        assert_eq!(w.check(2000 - WINDOW - 1), Err(Drop::Stale));
        w.commit(1500);
        assert_eq!(w.check(1500), Err(Drop::Replayed));
        // A jump keeps the in-window history right.
        w.commit(2100);
        assert_eq!(w.check(2000), Err(Drop::Replayed));
        w.check(2050).unwrap();
    }
}
