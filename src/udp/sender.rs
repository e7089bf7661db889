//! The sending side of a UDP transfer as a sans-IO state machine: it takes datagrams and the
//! time, and says which chunk to send next and when to wake up. The driver owns the socket,
//! the file and the clock.
//!
//! Lifecycle: nothing is sent until a datagram sealed with the receiver's key (c2s) arrives;
//! its source address becomes the only destination (address validation: a forged source never
//! gets traffic, so the sender cannot be used to amplify). Then chunks go out in order, paced
//! by the [`RateCtl`]; the receiver's gap lists queue retransmissions, which go before new
//! data; once everything has been sent, unacknowledged chunks are re-sent after a timeout (tail
//! loss). Done when the receiver acknowledges every chunk.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::packet::{self, kind, Counters, Dir, Key, ReplayWindow, SessionId};
use super::rate::{AckSample, Pacer, RateConfig, RateCtl};

/// Bytes of a DATA body before the chunk bytes: type, chunk index, send time (µs since the
/// sender started), frontier (first never-sent chunk), smoothed RTT (µs).
pub const DATA_HEADER: usize = 1 + 4 + 8 + 4 + 4;

/// Silence from the receiver for this long ends the transfer with an error.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug)]
pub struct Params {
    pub session: SessionId,
    /// Total bytes to transfer (the requested range of the file).
    pub total: u64,
    /// Data bytes per chunk (all but the last are full).
    pub chunk: usize,
    pub rate: RateConfig,
    pub idle_timeout: Duration,
}

impl Params {
    pub fn chunks(&self) -> u32 {
        chunk_count(self.total, self.chunk)
    }
}

pub fn chunk_count(total: u64, chunk: usize) -> u32 {
    total.div_ceil(chunk.max(1) as u64) as u32
}

/// The bytes of chunk `i` within the transfer: (offset, length).
pub fn chunk_span(total: u64, chunk: usize, i: u32) -> (u64, usize) {
    let off = i as u64 * chunk as u64;
    let len = (total.saturating_sub(off)).min(chunk as u64) as usize;
    (off, len)
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    Running,
    Done,
    Failed(String),
}

/// Per-chunk state: 0 = never sent, ACKED = acknowledged, else last send time in units of
/// 10 µs since `epoch`, plus one.
const ACKED: u32 = u32::MAX;

pub struct Sender {
    p: Params,
    n: u32,
    tx: Key,
    rx: Key,
    replay: ReplayWindow,
    pub peer: Option<SocketAddr>,
    pn: u64,
    state: Vec<u32>,
    queued: Vec<u64>,
    /// Chunks sent more than once (their gap reports need a longer grace period).
    resent: Vec<u64>,
    retx: VecDeque<u32>,
    next_new: u32,
    /// Every chunk below this is acknowledged.
    cum: u32,
    acked: u32,
    tail_cursor: u32,
    tail_next: Option<Instant>,
    pub rate: RateCtl,
    pacer: Pacer,
    epoch: Instant,
    last_rx: Instant,
    status: Status,
    pub counters: Counters,
    pub sent_packets: u64,
    pub retransmits: u64,
    datagram_max: usize,
}

impl Sender {
    /// `have`: a bitmap (LSB first) of chunks the receiver already holds (resume).
    pub fn new(exporter: &[u8; 64], p: Params, have: Option<&[u8]>, now: Instant) -> Sender {
        let n = p.chunks();
        let mut s = Sender {
            tx: Key::derive(exporter, &p.session, Dir::S2c),
            rx: Key::derive(exporter, &p.session, Dir::C2s),
            replay: ReplayWindow::default(),
            peer: None,
            pn: 0,
            state: vec![0; n as usize],
            queued: vec![0; (n as usize).div_ceil(64)],
            resent: vec![0; (n as usize).div_ceil(64)],
            retx: VecDeque::new(),
            next_new: 0,
            cum: 0,
            acked: 0,
            tail_cursor: 0,
            tail_next: None,
            rate: RateCtl::new(p.rate.clone()),
            pacer: Pacer::new(),
            epoch: now,
            last_rx: now,
            status: Status::Running,
            counters: Counters::default(),
            sent_packets: 0,
            retransmits: 0,
            datagram_max: packet::OVERHEAD + DATA_HEADER + p.chunk,
            n,
            p,
        };
        if let Some(bits) = have {
            for i in 0..n {
                if bits
                    .get(i as usize / 8)
                    .is_some_and(|b| b & (1 << (i % 8)) != 0)
                {
                    s.mark_acked(i);
                }
            }
            s.advance_cum();
        }
        if s.cum == n {
            s.status = Status::Done;
        }
        s
    }

    pub fn status(&self) -> &Status {
        &self.status
    }

    pub fn chunks(&self) -> u32 {
        self.n
    }

    pub fn acked(&self) -> u32 {
        self.acked
    }

    fn micros(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_micros() as u64
    }

    fn stamp(&self, now: Instant) -> u32 {
        ((self.micros(now) / 10).min(ACKED as u64 - 2) as u32) + 1
    }

    fn mark_acked(&mut self, i: u32) {
        if let Some(s) = self.state.get_mut(i as usize) {
            if *s != ACKED {
                *s = ACKED;
                self.acked += 1;
            }
        }
    }

    fn advance_cum(&mut self) {
        while self.cum < self.n && self.state[self.cum as usize] == ACKED {
            self.cum += 1;
        }
    }

    /// Feed one datagram that arrived from `from`.
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, dgram: &mut [u8]) {
        self.counters.received += 1;
        if let Some(peer) = self.peer {
            if peer != from {
                // Authentic or not, only the validated address is listened to.
                self.counters.count(packet::Drop::Unexpected);
                return;
            }
        }
        let pn = match packet::peek(dgram, &self.p.session) {
            Ok(pn) => pn,
            Err(d) => return self.counters.count(d),
        };
        if let Err(d) = self.replay.check(pn) {
            return self.counters.count(d);
        }
        let body = match packet::open(&self.rx, &self.p.session, dgram) {
            Ok((_, r)) => &dgram[r],
            Err(d) => return self.counters.count(d),
        };
        self.replay.commit(pn);
        if let Err(d) = self.on_body(now, body) {
            return self.counters.count(d);
        }
        self.counters.accepted += 1;
        self.last_rx = now;
        if self.peer.is_none() {
            tracing::debug!("udp: receiver proved the key from {from}");
            self.peer = Some(from);
        }
    }

    fn on_body(&mut self, now: Instant, body: &[u8]) -> Result<(), packet::Drop> {
        let mut r = packet::Reader::new(body);
        match r.u8()? {
            kind::HELLO => Ok(()),
            kind::DONE => {
                for i in self.cum..self.n {
                    self.mark_acked(i);
                }
                self.cum = self.n;
                self.status = Status::Done;
                Ok(())
            }
            kind::ACK => {
                let ack = Ack::decode(&mut r)?;
                self.on_ack(now, &ack);
                Ok(())
            }
            _ => Err(packet::Drop::Unexpected),
        }
    }

    fn on_ack(&mut self, now: Instant, a: &Ack) {
        let n = self.n;
        let rtt = if a.echo_ts > 0 {
            let sent = Duration::from_micros(a.echo_ts);
            let age = now
                .saturating_duration_since(self.epoch)
                .saturating_sub(sent);
            let rtt = age.saturating_sub(Duration::from_micros(a.ack_delay_us as u64));
            (rtt > Duration::ZERO).then_some(rtt)
        } else {
            None
        };
        self.rate.on_ack(
            now,
            AckSample {
                rtt,
                echo_pn: a.echo_pn,
                recv_count: a.recv_count,
                recv_bytes: a.recv_bytes,
            },
        );
        for i in self.cum..a.cum.min(n) {
            self.mark_acked(i);
        }
        // Inside [from, to): everything not listed as missing has arrived.
        let to = a.to.min(n);
        let mut pos = a.from.min(to);
        // Grace periods, in 10 µs units. The first report of a chunk sent once arrives about
        // one RTT after that send, so half an RTT guards only against reordering. A chunk
        // already re-sent may be reported again (by the receiver's next sweep) while the new
        // copy is still in flight: that report arrives within one current RTT of the re-send.
        let srtt = self.rate.srtt_or(Duration::from_millis(50));
        let current = srtt.max(self.rate.latest_rtt.unwrap_or(srtt));
        let units = |d: Duration| (d.as_micros() / 10).min(u32::MAX as u128) as u32;
        let first_grace = units((srtt / 2).max(Duration::from_micros(500)));
        let again_grace = units(current * 11 / 10 + Duration::from_millis(1));
        let now_stamp = self.stamp(now);
        for &(start, len) in &a.missing {
            let start = start.clamp(pos, to);
            let end = start.saturating_add(len).min(to);
            for i in pos..start {
                self.mark_acked(i);
            }
            for i in start..end {
                let st = self.state[i as usize];
                if st == ACKED || st == 0 {
                    continue;
                }
                // A gap reported within about one RTT of the last send may describe the
                // copy still in flight; it will be reported again if it is really lost.
                let resent = self.resent[i as usize / 64] & (1u64 << (i % 64)) != 0;
                let grace = if resent { again_grace } else { first_grace };
                if now_stamp.saturating_sub(st) < grace {
                    continue;
                }
                self.queue_retx(i);
            }
            pos = end;
        }
        for i in pos..to {
            self.mark_acked(i);
        }
        self.advance_cum();
        if self.cum == n {
            self.status = Status::Done;
        }
    }

    fn queue_retx(&mut self, i: u32) {
        let (w, m) = (i as usize / 64, 1u64 << (i % 64));
        if self.queued[w] & m == 0 {
            self.queued[w] |= m;
            self.retx.push_back(i);
        }
    }

    fn unqueue(&mut self, i: u32) {
        self.queued[i as usize / 64] &= !(1u64 << (i % 64));
    }

    /// Check timers (the receiver's silence).
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.status == Status::Running
            && now.saturating_duration_since(self.last_rx) > self.p.idle_timeout
        {
            self.status = Status::Failed(format!(
                "no word from the receiver for {}s",
                self.p.idle_timeout.as_secs()
            ));
        }
    }

    /// The next chunk to send now, if pacing allows one. The driver then builds it with
    /// [`build_data`](Self::build_data).
    pub fn poll_transmit(&mut self, now: Instant) -> Option<(SocketAddr, u32)> {
        if self.status != Status::Running {
            return None;
        }
        let peer = self.peer?;
        let chunk = self.pick(now)?;
        let (_, len) = chunk_span(self.p.total, self.p.chunk, chunk);
        let size = packet::OVERHEAD + DATA_HEADER + len;
        if !self.pacer.take(now, self.rate.rate(), size) {
            // Put it back in front; it is the next one when tokens are there.
            self.queue_front(chunk);
            return None;
        }
        Some((peer, chunk))
    }

    fn queue_front(&mut self, i: u32) {
        let (w, m) = (i as usize / 64, 1u64 << (i % 64));
        if self.queued[w] & m == 0 {
            self.queued[w] |= m;
            self.retx.push_front(i);
        }
    }

    fn pick(&mut self, now: Instant) -> Option<u32> {
        while let Some(i) = self.retx.pop_front() {
            self.unqueue(i);
            if self.state[i as usize] != ACKED {
                return Some(i);
            }
        }
        while self.next_new < self.n {
            let i = self.next_new;
            self.next_new += 1;
            if self.state[i as usize] != ACKED {
                return Some(i);
            }
        }
        // Everything went out at least once: re-send what stays unacknowledged for too long
        // (the loss of the last chunks shows in no gap list).
        if self.tail_next.is_some_and(|t| now < t) {
            return None;
        }
        let srtt = self.rate.srtt_or(Duration::from_millis(100));
        let rto = (srtt * 2).max(Duration::from_millis(20));
        let rto_units = (rto.as_micros() / 10) as u32;
        let now_stamp = self.stamp(now);
        if self.tail_cursor < self.cum {
            self.tail_cursor = self.cum;
        }
        let mut found = false;
        let mut scanned = 0u32;
        while self.tail_cursor < self.n && scanned < 65_536 {
            let i = self.tail_cursor;
            self.tail_cursor += 1;
            scanned += 1;
            let st = self.state[i as usize];
            if st != ACKED && now_stamp.saturating_sub(st) >= rto_units {
                self.queue_retx(i);
                found = true;
                if self.retx.len() >= 4096 {
                    break;
                }
            }
        }
        if self.tail_cursor >= self.n {
            self.tail_cursor = self.cum;
            if !found {
                self.tail_next = Some(now + rto / 4);
            }
        }
        let i = self.retx.pop_front()?;
        self.unqueue(i);
        Some(i)
    }

    /// Build the DATA datagram for `chunk` into `out`: `fill` writes the chunk's bytes into the
    /// slice it is given (the driver reads the file there, so data is copied once).
    pub fn build_data<E>(
        &mut self,
        now: Instant,
        chunk: u32,
        out: &mut Vec<u8>,
        fill: impl FnOnce(u64, &mut [u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let (off, len) = chunk_span(self.p.total, self.p.chunk, chunk);
        let pn = self.pn;
        self.pn += 1;
        packet::write_header(&self.p.session, pn, out);
        out.push(kind::DATA);
        out.extend_from_slice(&chunk.to_be_bytes());
        out.extend_from_slice(&self.micros(now).max(1).to_be_bytes());
        out.extend_from_slice(&self.next_new.to_be_bytes());
        let srtt = self.rate.srtt_or(Duration::from_millis(50)).as_micros() as u32;
        out.extend_from_slice(&srtt.to_be_bytes());
        let start = out.len();
        out.resize(start + len, 0);
        fill(off, &mut out[start..])?;
        packet::seal_in_place(&self.tx, out);
        let stamp = self.stamp(now);
        let st = &mut self.state[chunk as usize];
        if *st != 0 && *st != ACKED {
            self.retransmits += 1;
            self.resent[chunk as usize / 64] |= 1u64 << (chunk % 64);
        }
        if *st != ACKED {
            *st = stamp;
        }
        self.sent_packets += 1;
        Ok(())
    }

    /// When the driver should call again (pacing, tail timer, idle timeout).
    pub fn poll_timeout(&self, now: Instant) -> Instant {
        let idle = self.last_rx + self.p.idle_timeout;
        if self.status != Status::Running || self.peer.is_none() {
            return idle;
        }
        let pending = !self.retx.is_empty() || self.next_new < self.n;
        let t = if pending {
            // Wake when a full datagram is affordable, not before (no spinning).
            self.pacer.next_at(now, self.rate.rate(), self.datagram_max)
        } else {
            self.tail_next
                .unwrap_or(now + Duration::from_millis(5))
                .max(now)
        };
        t.min(idle)
    }

    pub fn datagram_max(&self) -> usize {
        self.datagram_max
    }
}

/// An acknowledgement (c2s).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ack {
    /// Send time (sender µs) of the newest data packet, 0 if none yet.
    pub echo_ts: u64,
    /// Time between that packet's arrival and this ACK.
    pub ack_delay_us: u32,
    /// Highest sender packet number received.
    pub echo_pn: u64,
    /// Data packets received in total.
    pub recv_count: u64,
    /// Payload bytes received in total.
    pub recv_bytes: u64,
    /// All chunks below this are held.
    pub cum: u32,
    /// In [from, to) exactly the `missing` ranges (start, len) are absent.
    pub from: u32,
    pub to: u32,
    pub missing: Vec<(u32, u32)>,
}

pub const ACK_FIXED: usize = 1 + 8 + 4 + 8 + 8 + 8 + 4 + 4 + 4 + 2;

impl Ack {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(kind::ACK);
        out.extend_from_slice(&self.echo_ts.to_be_bytes());
        out.extend_from_slice(&self.ack_delay_us.to_be_bytes());
        out.extend_from_slice(&self.echo_pn.to_be_bytes());
        out.extend_from_slice(&self.recv_count.to_be_bytes());
        out.extend_from_slice(&self.recv_bytes.to_be_bytes());
        out.extend_from_slice(&self.cum.to_be_bytes());
        out.extend_from_slice(&self.from.to_be_bytes());
        out.extend_from_slice(&self.to.to_be_bytes());
        out.extend_from_slice(&(self.missing.len() as u16).to_be_bytes());
        for (s, l) in &self.missing {
            out.extend_from_slice(&s.to_be_bytes());
            out.extend_from_slice(&l.to_be_bytes());
        }
    }

    /// Decode after the type byte. The range count is checked against the bytes present
    /// before anything is allocated.
    pub fn decode(r: &mut packet::Reader) -> Result<Ack, packet::Drop> {
        let echo_ts = r.u64()?;
        let ack_delay_us = r.u32()?;
        let echo_pn = r.u64()?;
        let recv_count = r.u64()?;
        let recv_bytes = r.u64()?;
        let cum = r.u32()?;
        let from = r.u32()?;
        let to = r.u32()?;
        let count = r.u16()? as usize;
        if r.remaining() != count * 8 || from > to {
            return Err(packet::Drop::Unexpected);
        }
        let mut missing = Vec::with_capacity(count);
        let mut last_end = from;
        for _ in 0..count {
            let s = r.u32()?;
            let l = r.u32()?;
            let end = s.checked_add(l).ok_or(packet::Drop::Unexpected)?;
            // Ranges are sorted, disjoint, non-empty and inside [from, to).
            if s < last_end || l == 0 || end > to {
                return Err(packet::Drop::Unexpected);
            }
            last_end = end;
            missing.push((s, l));
        }
        Ok(Ack {
            echo_ts,
            ack_delay_us,
            echo_pn,
            recv_count,
            recv_bytes,
            cum,
            from,
            to,
            missing,
        })
    }
}
