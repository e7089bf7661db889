//! Sans-IO tests: a sender and a receiver joined by a simulated link (virtual clock, seeded
//! RNG) that loses, delays, reorders, duplicates, corrupts and replays datagrams, and a
//! man in the middle that injects forged ones. Each failure message carries its seed.

use std::collections::BinaryHeap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

use super::packet::{self, kind, Dir, Key};
use super::rate::RateConfig;
use super::receiver::{self, Receiver};
use super::sender::{self, Sender, Status};

const EXP: [u8; 64] = [0x5a; 64];
const SID: [u8; 16] = [0x11; 16];

fn client() -> SocketAddr {
    "10.0.0.2:4000".parse().unwrap()
}

fn attacker() -> SocketAddr {
    "10.0.0.66:4000".parse().unwrap()
}

#[derive(Clone, Debug)]
struct Link {
    loss: f64,
    dup: f64,
    corrupt: f64,
    replay: f64,
    /// One-way delay and extra random delay (reordering).
    delay: Duration,
    jitter: Duration,
    /// Bottleneck rate in bytes/s (0 = none) and its queue limit in bytes.
    rate: f64,
    queue: usize,
}

impl Default for Link {
    fn default() -> Self {
        Link {
            loss: 0.0,
            dup: 0.0,
            corrupt: 0.0,
            replay: 0.0,
            delay: Duration::from_millis(5),
            jitter: Duration::ZERO,
            rate: 0.0,
            queue: usize::MAX,
        }
    }
}

#[derive(PartialEq, Eq)]
struct InFlight {
    at: Instant,
    seq: u64,
    to_receiver: bool,
    from: SocketAddr,
    bytes: Vec<u8>,
}

impl Ord for InFlight {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        // Min-heap on (time, seq).
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}
impl PartialOrd for InFlight {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

struct Sim {
    rng: StdRng,
    link: Link,
    heap: BinaryHeap<InFlight>,
    seq: u64,
    /// When the bottleneck (per direction) is next free.
    busy_until: [Instant; 2],
    captured: Vec<(bool, Vec<u8>)>,
    sent_bytes: u64,
}

impl Sim {
    fn new(seed: u64, link: Link, t0: Instant) -> Sim {
        Sim {
            rng: StdRng::seed_from_u64(seed),
            link,
            heap: BinaryHeap::new(),
            seq: 0,
            busy_until: [t0; 2],
            captured: Vec::new(),
            sent_bytes: 0,
        }
    }

    fn push(&mut self, now: Instant, to_receiver: bool, from: SocketAddr, bytes: Vec<u8>) {
        self.sent_bytes += bytes.len() as u64;
        if self.captured.len() < 5000 && self.rng.gen_bool(0.2) {
            self.captured.push((to_receiver, bytes.clone()));
        }
        let d = to_receiver as usize;
        let mut depart = now;
        if self.link.rate > 0.0 {
            let start = self.busy_until[d].max(now);
            let backlog = start.duration_since(now).as_secs_f64() * self.link.rate;
            if backlog as usize + bytes.len() > self.link.queue {
                return; // tail drop at the bottleneck
            }
            depart = start + Duration::from_secs_f64(bytes.len() as f64 / self.link.rate);
            self.busy_until[d] = depart;
        }
        if self.rng.gen_bool(self.link.loss) {
            return;
        }
        let copies = if self.rng.gen_bool(self.link.dup) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let mut b = bytes.clone();
            let pc = if to_receiver {
                self.link.corrupt
            } else {
                (self.link.corrupt * 5.0).min(1.0)
            };
            if self.rng.gen_bool(pc) {
                let i = self.rng.gen_range(0..b.len());
                b[i] ^= 1 << self.rng.gen_range(0..8);
            }
            let jitter = if self.link.jitter > Duration::ZERO {
                Duration::from_nanos(self.rng.gen_range(0..self.link.jitter.as_nanos() as u64))
            } else {
                Duration::ZERO
            };
            self.seq += 1;
            self.heap.push(InFlight {
                at: depart + self.link.delay + jitter,
                seq: self.seq,
                to_receiver,
                from,
                bytes: b,
            });
        }
        // Acks are few, so they are replayed more often than data.
        let p = if to_receiver {
            self.link.replay
        } else {
            (self.link.replay * 10.0).min(1.0)
        };
        let same: Vec<usize> = (0..self.captured.len())
            .filter(|&i| self.captured[i].0 == to_receiver)
            .collect();
        if !same.is_empty() && self.rng.gen_bool(p) {
            let i = same[self.rng.gen_range(0..same.len())];
            let (dir, old) = self.captured[i].clone();
            self.seq += 1;
            self.heap.push(InFlight {
                at: now + self.link.delay,
                seq: self.seq,
                to_receiver: dir,
                from: client(),
                bytes: old,
            });
        }
    }
}

struct Outcome {
    s: Sender,
    r: Receiver,
    data: Vec<u8>,
    got: Vec<u8>,
    elapsed: Duration,
}

fn source(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    StdRng::seed_from_u64(seed ^ 0xdead).fill_bytes(&mut v);
    v
}

fn params(total: u64, chunk: usize, rate: RateConfig) -> (sender::Params, receiver::Params) {
    (
        sender::Params {
            session: SID,
            total,
            chunk,
            rate,
            idle_timeout: Duration::from_secs(10),
        },
        receiver::Params {
            session: SID,
            total,
            chunk,
            datagram: 1200,
            idle_timeout: Duration::from_secs(10),
        },
    )
}

fn run(seed: u64, link: Link, total: usize, chunk: usize, limit: Duration) -> Outcome {
    run_with(seed, link, total, chunk, limit, RateConfig::default(), None)
}

fn run_with(
    seed: u64,
    link: Link,
    total: usize,
    chunk: usize,
    limit: Duration,
    rate: RateConfig,
    have: Option<Vec<u8>>,
) -> Outcome {
    let t0 = Instant::now();
    let data = source(total, seed);
    let (sp, rp) = params(total as u64, chunk, rate);
    let mut s = Sender::new(&EXP, sp, have.as_deref(), t0);
    let mut r = Receiver::new(&EXP, rp, have.as_deref(), t0);
    let mut got = vec![0u8; total];
    if let Some(h) = &have {
        for i in 0..r.chunks() {
            if h[i as usize / 8] & (1 << (i % 8)) != 0 {
                let (off, len) = sender::chunk_span(total as u64, chunk, i);
                got[off as usize..off as usize + len]
                    .copy_from_slice(&data[off as usize..off as usize + len]);
            }
        }
    }
    let mut sim = Sim::new(seed, link, t0);
    let mut now = t0;
    let mut out = Vec::new();
    let mut buf = Vec::new();
    while now < t0 + limit {
        while let Some((to, c)) = s.poll_transmit(now) {
            assert_eq!(to, client(), "seed {seed}: data to an unproven address");
            s.build_data(now, c, &mut buf, |off, dst| {
                dst.copy_from_slice(&data[off as usize..off as usize + dst.len()]);
                Ok::<(), ()>(())
            })
            .unwrap();
            sim.push(now, true, "10.0.0.1:5000".parse().unwrap(), buf.clone());
        }
        while r.poll_transmit(now, &mut out) {
            sim.push(now, false, client(), out.clone());
        }
        while sim.heap.peek().is_some_and(|p| p.at <= now) {
            let mut p = sim.heap.pop().unwrap();
            if p.to_receiver {
                if let Some(d) = r.handle_datagram(now, &mut p.bytes) {
                    got[d.offset as usize..d.offset as usize + d.bytes.len()]
                        .copy_from_slice(&p.bytes[d.bytes]);
                }
            } else {
                s.handle_datagram(now, p.from, &mut p.bytes);
            }
        }
        s.handle_timeout(now);
        r.handle_timeout(now);
        if *s.status() != Status::Running && r.is_complete() {
            break;
        }
        if let Status::Failed(e) = s.status() {
            panic!("seed {seed}: sender failed: {e}");
        }
        if let Some(e) = r.failed() {
            panic!("seed {seed}: receiver failed: {e}");
        }
        let mut next = s.poll_timeout(now).min(r.poll_timeout(now));
        if let Some(p) = sim.heap.peek() {
            next = next.min(p.at);
        }
        now = next.max(now + Duration::from_micros(1));
    }
    Outcome {
        s,
        r,
        data,
        got,
        elapsed: now - t0,
    }
}

fn assert_complete(o: &Outcome, seed: u64) {
    assert_eq!(*o.s.status(), Status::Done, "seed {seed}: sender not done");
    assert!(o.r.is_complete(), "seed {seed}: receiver incomplete");
    assert!(o.data == o.got, "seed {seed}: bytes differ");
}

#[test]
fn clean_link_sends_each_chunk_once() {
    let o = run(1, Link::default(), 1_000_000, 1000, Duration::from_secs(30));
    assert_complete(&o, 1);
    assert_eq!(o.s.retransmits, 0);
    assert_eq!(o.r.counters.dropped(), 0);
    assert_eq!(o.r.counters.duplicate, 0);
}

#[test]
fn heavy_loss_both_directions() {
    for seed in 10..14 {
        let link = Link {
            loss: 0.15,
            ..Link::default()
        };
        let o = run(seed, link, 2_000_000, 1100, Duration::from_secs(60));
        assert_complete(&o, seed);
        assert!(o.s.retransmits > 0, "seed {seed}");
    }
}

#[test]
fn last_chunks_lost_are_recovered() {
    // A tiny transfer where every datagram has a high chance of loss: the tail (no later
    // chunk reveals the gap) must come back through the sender's timeout.
    for seed in 20..30 {
        let link = Link {
            loss: 0.4,
            ..Link::default()
        };
        let o = run(seed, link, 3000, 1000, Duration::from_secs(60));
        assert_complete(&o, seed);
    }
}

#[test]
fn reordering_and_duplication() {
    for seed in 30..33 {
        let link = Link {
            loss: 0.02,
            dup: 0.1,
            jitter: Duration::from_millis(8),
            ..Link::default()
        };
        let o = run(seed, link, 1_500_000, 1000, Duration::from_secs(60));
        assert_complete(&o, seed);
        assert!(
            o.r.counters.duplicate > 0 || o.r.counters.replayed > 0,
            "seed {seed}: duplicates were not noticed: {}",
            o.r.counters
        );
    }
}

#[test]
fn corruption_is_dropped_and_counted() {
    let seed = 40;
    let link = Link {
        corrupt: 0.05,
        loss: 0.01,
        ..Link::default()
    };
    let o = run(seed, link, 1_000_000, 1000, Duration::from_secs(60));
    assert_complete(&o, seed);
    let bad = o.r.counters.auth_failed + o.r.counters.unknown_session + o.r.counters.truncated;
    assert!(bad > 0, "seed {seed}: {}", o.r.counters);
    let bad_s = o.s.counters.auth_failed + o.s.counters.unknown_session;
    assert!(bad_s > 0, "seed {seed}: {}", o.s.counters);
}

#[test]
fn replays_are_dropped_and_counted() {
    let seed = 50;
    let link = Link {
        replay: 0.05,
        ..Link::default()
    };
    let o = run(seed, link, 1_000_000, 1000, Duration::from_secs(60));
    assert_complete(&o, seed);
    assert!(
        o.r.counters.replayed + o.r.counters.stale > 0,
        "seed {seed}: {}",
        o.r.counters
    );
    assert!(
        o.s.counters.replayed + o.s.counters.stale > 0,
        "seed {seed}: {}",
        o.s.counters
    );
}

#[test]
fn random_loss_does_not_throttle_and_bottleneck_is_respected() {
    // 10 MB/s bottleneck, 40 ms RTT, 2% random loss each way: a loss-based controller would
    // collapse; this one should keep most of the link.
    let seed = 60;
    let link = Link {
        loss: 0.02,
        delay: Duration::from_millis(20),
        rate: 10e6,
        queue: 400_000,
        ..Link::default()
    };
    let total = 20_000_000;
    let rate = RateConfig {
        initial: 2e6,
        ..RateConfig::default()
    };
    let o = run_with(
        seed,
        link,
        total,
        1138,
        Duration::from_secs(120),
        rate,
        None,
    );
    assert_complete(&o, seed);
    let goodput = total as f64 / o.elapsed.as_secs_f64();
    assert!(
        goodput > 6e6,
        "seed {seed}: goodput {goodput:.0} B/s over {:?}, retransmits {}",
        o.elapsed,
        o.s.retransmits
    );
    // And it did not blindly flood: retransmissions stay near the loss rate plus tail drops.
    assert!(
        (o.s.retransmits as f64) < 0.15 * (total / 1138) as f64,
        "seed {seed}: {} retransmits",
        o.s.retransmits
    );
}

#[test]
fn resume_sends_only_missing_chunks() {
    let seed = 70;
    let total = 100_000usize;
    let chunk = 1000;
    let n = total / chunk;
    let mut have = vec![0u8; n.div_ceil(8)];
    for i in 0..n / 2 {
        have[i / 8] |= 1 << (i % 8);
    }
    let o = run_with(
        seed,
        Link::default(),
        total,
        chunk,
        Duration::from_secs(10),
        RateConfig::default(),
        Some(have),
    );
    assert_complete(&o, seed);
    assert_eq!(o.s.sent_packets as usize, n - n / 2);
}

#[test]
fn nothing_is_sent_before_the_key_is_proven() {
    let t0 = Instant::now();
    let (sp, _) = params(1_000_000, 1000, RateConfig::default());
    let mut s = Sender::new(&EXP, sp, None, t0);
    let mut rng = StdRng::seed_from_u64(80);
    // Random garbage, a HELLO under another exporter, a HELLO under another session id,
    // truncated datagrams: none of them unlocks the sender.
    for i in 0..200 {
        let mut junk = vec![0u8; rng.gen_range(0..1300)];
        rng.fill_bytes(&mut junk);
        if i % 3 == 0 && junk.len() > packet::HEADER_LEN {
            junk[0] = packet::VERSION;
            junk[1..17].copy_from_slice(&SID);
        }
        s.handle_datagram(t0, attacker(), &mut junk);
    }
    let mut wrong = Vec::new();
    let other = Key::derive(&[0x77; 64], &SID, Dir::C2s);
    packet::seal(&other, &SID, 0, &[kind::HELLO], &mut wrong);
    s.handle_datagram(t0, attacker(), &mut wrong);
    let wrong_dir = Key::derive(&EXP, &SID, Dir::S2c);
    packet::seal(&wrong_dir, &SID, 1, &[kind::HELLO], &mut wrong);
    s.handle_datagram(t0, attacker(), &mut wrong);
    let right = Key::derive(&EXP, &SID, Dir::C2s);
    packet::seal(&right, &[0x22; 16], 2, &[kind::HELLO], &mut wrong);
    s.handle_datagram(t0, attacker(), &mut wrong);
    for ms in 0..100 {
        assert!(s.poll_transmit(t0 + Duration::from_millis(ms)).is_none());
    }
    assert_eq!(s.counters.accepted, 0);
    assert!(s.counters.auth_failed >= 2, "{}", s.counters);
    assert!(s.counters.unknown_session > 0, "{}", s.counters);
    assert!(s.counters.truncated > 0, "{}", s.counters);
    // The genuine HELLO from the client validates the client's address only.
    let mut hello = Vec::new();
    packet::seal(&right, &SID, 3, &[kind::HELLO], &mut hello);
    let mut replay = hello.clone();
    s.handle_datagram(t0, client(), &mut hello);
    assert_eq!(s.peer, Some(client()));
    let t = t0 + Duration::from_millis(200);
    assert_eq!(s.poll_transmit(t).map(|x| x.0), Some(client()));
    // A replayed HELLO from elsewhere changes nothing; from the client it is counted.
    s.handle_datagram(t, attacker(), &mut replay.clone());
    assert_eq!(s.peer, Some(client()));
    s.handle_datagram(t, client(), &mut replay);
    assert_eq!(s.counters.replayed, 1);
}

#[test]
fn receiver_rejects_forged_and_stale_session_data() {
    let t0 = Instant::now();
    let (_, rp) = params(10_000, 1000, RateConfig::default());
    let mut r = Receiver::new(&EXP, rp, None, t0);
    // A sender of another session (stale session id) and one with another exporter.
    for (exp, sid) in [(EXP, [0x33u8; 16]), ([0x44u8; 64], SID)] {
        let (sp, _) = params(10_000, 1000, RateConfig::default());
        let sp = sender::Params { session: sid, ..sp };
        let mut s = Sender::new(&exp, sp, None, t0);
        let mut buf = Vec::new();
        s.build_data(t0, 0, &mut buf, |_, d| {
            d.fill(0xee);
            Ok::<(), ()>(())
        })
        .unwrap();
        assert!(r.handle_datagram(t0, &mut buf).is_none());
    }
    assert_eq!(r.counters.unknown_session, 1);
    assert_eq!(r.counters.auth_failed, 1);
    assert_eq!(r.have_count(), 0);
    // Authentic data with a bad length for its chunk is refused too.
    let key = Key::derive(&EXP, &SID, Dir::S2c);
    let mut body = vec![kind::DATA];
    body.extend_from_slice(&3u32.to_be_bytes());
    body.extend_from_slice(&1u64.to_be_bytes());
    body.extend_from_slice(&4u32.to_be_bytes());
    body.extend_from_slice(&1000u32.to_be_bytes());
    body.extend_from_slice(&[1u8; 999]);
    let mut d = Vec::new();
    packet::seal(&key, &SID, 9, &body, &mut d);
    assert!(r.handle_datagram(t0, &mut d).is_none());
    assert_eq!(r.counters.unexpected, 1);
    // A chunk index out of range.
    body[1..5].copy_from_slice(&99u32.to_be_bytes());
    body.push(1);
    packet::seal(&key, &SID, 10, &body, &mut d);
    assert!(r.handle_datagram(t0, &mut d).is_none());
    assert_eq!(r.counters.unexpected, 2);
    assert_eq!(r.have_count(), 0);
}

#[test]
fn silence_fails_with_a_clear_error() {
    let t0 = Instant::now();
    let (sp, rp) = params(10_000, 1000, RateConfig::default());
    let mut r = Receiver::new(&EXP, rp, None, t0);
    r.handle_timeout(t0 + Duration::from_secs(11));
    assert!(
        r.failed().unwrap().contains("no answer"),
        "{:?}",
        r.failed()
    );
    let mut s = Sender::new(&EXP, sp, None, t0);
    s.handle_timeout(t0 + Duration::from_secs(11));
    assert!(matches!(s.status(), Status::Failed(_)));
}

#[test]
fn ack_decoder_survives_garbage() {
    let mut rng = StdRng::seed_from_u64(90);
    for _ in 0..20_000 {
        let mut b = vec![0u8; rng.gen_range(0..200)];
        rng.fill_bytes(&mut b);
        if b.len() > 45 && rng.gen_bool(0.5) {
            // Plausible count field with too few bytes behind it.
            b[44] = 0;
            b[45] = rng.gen();
        }
        let _ = sender::Ack::decode(&mut packet::Reader::new(&b));
    }
    let a = sender::Ack {
        echo_ts: 5,
        ack_delay_us: 6,
        echo_pn: 7,
        recv_count: 8,
        recv_bytes: 9,
        cum: 10,
        from: 10,
        to: 30,
        missing: vec![(12, 3), (20, 1)],
    };
    let mut enc = Vec::new();
    a.encode(&mut enc);
    assert_eq!(
        sender::Ack::decode(&mut packet::Reader::new(&enc[1..])).unwrap(),
        a
    );
    // Overlapping ranges are refused.
    let bad = sender::Ack {
        missing: vec![(12, 3), (13, 1)],
        ..a
    };
    bad.encode(&mut enc);
    let mut e2 = Vec::new();
    bad.encode(&mut e2);
    assert!(sender::Ack::decode(&mut packet::Reader::new(&e2[1..])).is_err());
}
