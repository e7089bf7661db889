//! The receiving side of a UDP transfer as a sans-IO state machine.
//!
//! It proves the key with HELLO datagrams until the sender answers, accepts authenticated DATA
//! (returning the chunk and where its bytes lie, for the driver to write), and sends ACKs: the
//! cumulative point, delivery counters for the rate controller, an RTT echo, and a gap list.
//! Gaps are reported as soon as they show (chunks below the sender's frontier that are
//! missing) and reported again on a fresh sweep no sooner than one RTT later, so a lost
//! retransmission is retried without flooding the sender with duplicates.

use std::ops::Range;
use std::time::{Duration, Instant};

use super::packet::{self, kind, Counters, Dir, Key, ReplayWindow, SessionId};
use super::sender::{chunk_count, chunk_span, Ack, ACK_FIXED};

pub const HELLO_INTERVAL: Duration = Duration::from_millis(100);
/// An ACK goes out after this many data packets even if the ACK timer has not fired.
const ACK_EVERY: u32 = 64;
/// When idle, an ACK still goes out this often (keeps the sender's view fresh).
const KEEPALIVE: Duration = Duration::from_millis(100);

#[derive(Clone, Debug)]
pub struct Params {
    pub session: SessionId,
    pub total: u64,
    pub chunk: usize,
    /// Largest datagram this side sends (bounds the gap list).
    pub datagram: usize,
    pub idle_timeout: Duration,
}

/// What a data datagram delivered: chunk index, its offset in the transfer, and the range of
/// the datagram buffer holding its bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub chunk: u32,
    pub offset: u64,
    pub bytes: Range<usize>,
}

pub struct Receiver {
    p: Params,
    n: u32,
    tx: Key,
    rx: Key,
    replay: ReplayWindow,
    pn: u64,
    have: Vec<u64>,
    have_count: u32,
    cum: u32,
    frontier: u32,
    // For the sender's RTT samples: newest data packet (by packet number).
    top_pn: u64,
    top_ts: u64,
    top_at: Option<Instant>,
    pub recv_count: u64,
    pub recv_bytes: u64,
    srtt: Duration,
    since_ack: u32,
    last_ack: Option<Instant>,
    hello_next: Option<Instant>,
    heard: bool,
    cursor: u32,
    sweep_start: Instant,
    last_rx: Instant,
    done_pending: bool,
    last_done: Option<Instant>,
    failed: Option<String>,
    pub counters: Counters,
    max_ranges: usize,
}

impl Receiver {
    /// `have`: chunks already on disk from an earlier attempt (bitmap, LSB first).
    pub fn new(exporter: &[u8; 64], p: Params, have: Option<&[u8]>, now: Instant) -> Receiver {
        let n = chunk_count(p.total, p.chunk);
        let words = (n as usize).div_ceil(64);
        let mut r = Receiver {
            tx: Key::derive(exporter, &p.session, Dir::C2s),
            rx: Key::derive(exporter, &p.session, Dir::S2c),
            replay: ReplayWindow::default(),
            pn: 0,
            have: vec![0; words],
            have_count: 0,
            cum: 0,
            frontier: 0,
            top_pn: 0,
            top_ts: 0,
            top_at: None,
            recv_count: 0,
            recv_bytes: 0,
            srtt: Duration::from_millis(50),
            since_ack: 0,
            last_ack: None,
            hello_next: Some(now),
            heard: false,
            cursor: 0,
            sweep_start: now,
            last_rx: now,
            done_pending: false,
            last_done: None,
            failed: None,
            counters: Counters::default(),
            max_ranges: (p.datagram.saturating_sub(packet::OVERHEAD + ACK_FIXED) / 8)
                .clamp(1, 4096),
            n,
            p,
        };
        if let Some(bits) = have {
            for i in 0..n {
                if bits
                    .get(i as usize / 8)
                    .is_some_and(|b| b & (1 << (i % 8)) != 0)
                {
                    r.set(i);
                }
            }
            r.advance_cum();
        }
        r.done_pending = r.is_complete();
        r
    }

    pub fn chunks(&self) -> u32 {
        self.n
    }

    pub fn have_count(&self) -> u32 {
        self.have_count
    }

    pub fn is_complete(&self) -> bool {
        self.have_count == self.n
    }

    pub fn failed(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// Has any authentic datagram come from the sender?
    pub fn heard(&self) -> bool {
        self.heard
    }

    pub fn has(&self, i: u32) -> bool {
        self.have
            .get(i as usize / 64)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    fn set(&mut self, i: u32) -> bool {
        let (w, m) = (i as usize / 64, 1u64 << (i % 64));
        if self.have[w] & m != 0 {
            return false;
        }
        self.have[w] |= m;
        self.have_count += 1;
        true
    }

    fn advance_cum(&mut self) {
        while self.cum < self.n && self.has(self.cum) {
            // Skip whole words at once.
            let w = self.cum as usize / 64;
            if self.cum % 64 == 0 && self.have[w] == u64::MAX {
                self.cum = (self.cum + 64).min(self.n);
            } else {
                self.cum += 1;
            }
        }
    }

    /// Chunks below this are all here (everything before it can be hashed in order).
    pub fn contiguous(&self) -> u32 {
        self.cum
    }

    /// The bitmap of chunks held, LSB first (what a resumed attempt starts from).
    pub fn bitmap(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity((self.n as usize).div_ceil(8));
        for w in &self.have {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.truncate((self.n as usize).div_ceil(8));
        out
    }

    /// Feed one datagram from the sender's address. On fresh data, returns where its bytes
    /// are in `dgram` (decrypted in place) for the driver to write.
    pub fn handle_datagram(&mut self, now: Instant, dgram: &mut [u8]) -> Option<Delivery> {
        self.counters.received += 1;
        match self.open(now, dgram) {
            Ok(d) => {
                self.counters.accepted += 1;
                self.last_rx = now;
                self.heard = true;
                self.hello_next = None;
                d
            }
            Err(d) => {
                self.counters.count(d);
                None
            }
        }
    }

    fn open(&mut self, now: Instant, dgram: &mut [u8]) -> Result<Option<Delivery>, packet::Drop> {
        let pn = packet::peek(dgram, &self.p.session)?;
        self.replay.check(pn)?;
        let (_, range) = packet::open(&self.rx, &self.p.session, dgram)?;
        self.replay.commit(pn);
        let base = range.start;
        let body = &dgram[range];
        let mut r = packet::Reader::new(body);
        if r.u8()? != kind::DATA {
            return Err(packet::Drop::Unexpected);
        }
        let chunk = r.u32()?;
        let ts = r.u64()?;
        let frontier = r.u32()?;
        let srtt = r.u32()?;
        if chunk >= self.n || frontier > self.n {
            return Err(packet::Drop::Unexpected);
        }
        let (offset, len) = chunk_span(self.p.total, self.p.chunk, chunk);
        if r.remaining() != len {
            return Err(packet::Drop::Unexpected);
        }
        let start = base + super::sender::DATA_HEADER;
        self.recv_count += 1;
        self.recv_bytes += len as u64;
        self.since_ack += 1;
        if pn >= self.top_pn || self.top_at.is_none() {
            self.top_pn = pn;
            self.top_ts = ts;
            self.top_at = Some(now);
        }
        self.frontier = self.frontier.max(frontier).max(chunk + 1);
        if srtt > 0 {
            self.srtt = Duration::from_micros(srtt as u64).min(Duration::from_secs(5));
        }
        if self.is_complete() {
            // The sender missed our DONE; say it again.
            self.done_pending = true;
            self.counters.duplicate += 1;
            return Ok(None);
        }
        if !self.set(chunk) {
            self.counters.duplicate += 1;
            return Ok(None);
        }
        self.advance_cum();
        if self.is_complete() {
            self.done_pending = true;
        }
        Ok(Some(Delivery {
            chunk,
            offset,
            bytes: start..start + len,
        }))
    }

    fn ack_interval(&self) -> Duration {
        (self.srtt / 4).clamp(Duration::from_millis(1), Duration::from_millis(10))
    }

    /// Check timers (the sender's silence).
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.failed.is_none()
            && !self.is_complete()
            && now.saturating_duration_since(self.last_rx) > self.p.idle_timeout
        {
            self.failed = Some(if self.heard {
                format!(
                    "the sender went silent for {}s with {} of {} chunks received",
                    self.p.idle_timeout.as_secs(),
                    self.have_count,
                    self.n
                )
            } else {
                format!(
                    "no answer over UDP within {}s (is UDP blocked between the boxes?)",
                    self.p.idle_timeout.as_secs()
                )
            });
        }
    }

    /// The next datagram to send, sealed into `out`; false if nothing is due.
    pub fn poll_transmit(&mut self, now: Instant, out: &mut Vec<u8>) -> bool {
        if self.failed.is_some() {
            return false;
        }
        if self.done_pending {
            // At most one DONE per millisecond however many late data packets arrive.
            if self
                .last_done
                .is_some_and(|t| now < t + Duration::from_millis(1))
            {
                return false;
            }
            self.done_pending = false;
            self.last_done = Some(now);
            self.seal(&[kind::DONE], out);
            return true;
        }
        if self.is_complete() {
            return false;
        }
        if let Some(t) = self.hello_next {
            if now >= t {
                self.hello_next = Some(now + HELLO_INTERVAL);
                self.seal(&[kind::HELLO], out);
                return true;
            }
            return false;
        }
        let due = match self.last_ack {
            None => true,
            Some(t) => {
                (self.since_ack >= ACK_EVERY)
                    || (self.since_ack > 0 && now >= t + self.ack_interval())
                    || now >= t + KEEPALIVE
            }
        };
        if !due {
            return false;
        }
        let ack = self.build_ack(now);
        let mut body = Vec::with_capacity(ACK_FIXED + ack.missing.len() * 8);
        ack.encode(&mut body);
        self.seal(&body, out);
        self.since_ack = 0;
        self.last_ack = Some(now);
        true
    }

    fn seal(&mut self, body: &[u8], out: &mut Vec<u8>) {
        let pn = self.pn;
        self.pn += 1;
        packet::seal(&self.tx, &self.p.session, pn, body, out);
    }

    fn next_missing(&self, from: u32, to: u32) -> Option<u32> {
        let mut i = from;
        while i < to {
            let w = self.have[i as usize / 64];
            let bit = i % 64;
            let inv = !w >> bit;
            if inv == 0 {
                i = (i - bit) + 64;
                continue;
            }
            let cand = i + inv.trailing_zeros();
            return (cand < to).then_some(cand);
        }
        None
    }

    fn next_present(&self, from: u32, to: u32) -> u32 {
        let mut i = from;
        while i < to {
            let w = self.have[i as usize / 64];
            let bit = i % 64;
            let v = w >> bit;
            if v == 0 {
                i = (i - bit) + 64;
                continue;
            }
            return (i + v.trailing_zeros()).min(to);
        }
        to
    }

    fn build_ack(&mut self, now: Instant) -> Ack {
        let to = self.frontier.min(self.n);
        if self.cursor < self.cum {
            self.cursor = self.cum;
        }
        if self.cursor >= to && now >= self.sweep_start + self.srtt {
            // Start a fresh sweep: gaps reported a round trip ago and still open are lost
            // again (or their retransmission was).
            self.cursor = self.cum;
            self.sweep_start = now;
        }
        let from = self.cursor.min(to);
        let mut missing = Vec::new();
        let mut pos = from;
        while pos < to && missing.len() < self.max_ranges {
            let Some(m) = self.next_missing(pos, to) else {
                pos = to;
                break;
            };
            let e = self.next_present(m, to);
            missing.push((m, e - m));
            pos = e;
        }
        self.cursor = pos;
        let ack_delay_us = self
            .top_at
            .map(|t| {
                now.saturating_duration_since(t)
                    .as_micros()
                    .min(u32::MAX as u128) as u32
            })
            .unwrap_or(0);
        Ack {
            echo_ts: self.top_ts,
            ack_delay_us,
            echo_pn: self.top_pn,
            recv_count: self.recv_count,
            recv_bytes: self.recv_bytes,
            cum: self.cum,
            from,
            to: pos.max(from),
            missing,
        }
    }

    /// When the driver should call again.
    pub fn poll_timeout(&self, now: Instant) -> Instant {
        let idle = self.last_rx + self.p.idle_timeout;
        if self.done_pending {
            return self
                .last_done
                .map(|t| t + Duration::from_millis(1))
                .unwrap_or(now)
                .max(now);
        }
        if self.is_complete() {
            return now + Duration::from_secs(3600);
        }
        if let Some(t) = self.hello_next {
            return t.min(idle);
        }
        let next_ack = match self.last_ack {
            None => now,
            Some(t) if self.since_ack > 0 => t + self.ack_interval(),
            Some(t) => t + KEEPALIVE,
        };
        next_ack.min(idle)
    }
}
