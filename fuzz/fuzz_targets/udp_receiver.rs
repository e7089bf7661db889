#![no_main]
//! The sans-IO UDP state machines under a hostile link: the input is a script of datagrams
//! (raw bytes, bodies sealed with the session keys so the parsers behind the AEAD are reached,
//! replays of earlier datagrams) mixed with the real sender/receiver exchange and clock steps.
//! Never a panic; the receiver's counts stay in range; and unless the script holds the keys,
//! every byte the receiver delivers is exactly the sender's byte at that offset.
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use mybox::udp::packet::{self, Dir, Key, MIN_DATAGRAM, OVERHEAD};
use mybox::udp::rate::RateConfig;
use mybox::udp::receiver::{self, Receiver};
use mybox::udp::sender::{self, chunk_span, Sender, DATA_HEADER};

const EXP: [u8; 64] = [0x42; 64];
const SID: [u8; 16] = [0x17; 16];

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes([self.u8()?, self.u8()?]))
    }
    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = (self.u16().unwrap_or(0) as usize)
            .min(max)
            .min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a.to_vec()
    }
}

/// The file's byte at `off` (what the sender reads).
fn byte_at(off: u64) -> u8 {
    (off.wrapping_mul(31) ^ (off >> 8)) as u8
}

fuzz_target!(|data: &[u8]| {
    let mut inp = Input(data);
    let total = inp.u16().unwrap_or(0) as u64 * (1 + inp.u8().unwrap_or(0) as u64 % 16);
    let chunk = 1 + inp.u16().unwrap_or(0) as usize % 2048;
    let datagram = (OVERHEAD + DATA_HEADER + chunk).max(MIN_DATAGRAM);
    let t0 = Instant::now();
    let mut now = t0;
    let client: SocketAddr = "10.0.0.2:4000".parse().unwrap();
    let attacker: SocketAddr = "10.0.0.66:4000".parse().unwrap();
    let mut rx = Receiver::new(
        &EXP,
        receiver::Params {
            session: SID,
            total,
            chunk,
            datagram,
            idle_timeout: Duration::from_secs(10),
        },
        None,
        now,
    );
    let mut tx = Sender::new(
        &EXP,
        sender::Params {
            session: SID,
            total,
            chunk,
            rate: RateConfig::default(),
            idle_timeout: Duration::from_secs(10),
        },
        None,
        now,
    );
    let s2c = Key::derive(&EXP, &SID, Dir::S2c);
    let c2s = Key::derive(&EXP, &SID, Dir::C2s);
    let mut keyed_forgery = false;
    let mut seen: Vec<Vec<u8>> = Vec::new();
    let mut out = Vec::new();
    let mut steps = 0;
    while let Some(op) = inp.u8() {
        steps += 1;
        if steps > 256 {
            break;
        }
        let mut to_rx: Vec<Vec<u8>> = Vec::new();
        match op % 7 {
            0 => to_rx.push(inp.bytes(70_000)),
            1 => {
                let mut d = inp.bytes(70_000);
                let from = if inp.u8().unwrap_or(0) & 1 == 0 {
                    client
                } else {
                    attacker
                };
                tx.handle_datagram(now, from, &mut d);
            }
            2 => {
                // A body sealed with the data key: reaches the receiver's parser.
                keyed_forgery = true;
                let pn = inp.u16().unwrap_or(0) as u64;
                let body = inp.bytes(4096);
                packet::seal(&s2c, &SID, pn, &body, &mut out);
                to_rx.push(out.clone());
            }
            3 => {
                // A body sealed with the ack key: reaches the sender's ACK/HELLO parser.
                let pn = inp.u16().unwrap_or(0) as u64;
                let body = inp.bytes(4096);
                packet::seal(&c2s, &SID, pn, &body, &mut out);
                let from = if inp.u8().unwrap_or(0) & 1 == 0 {
                    client
                } else {
                    attacker
                };
                tx.handle_datagram(now, from, &mut out);
            }
            4 => {
                // Replay (possibly bit-flipped) something seen on the wire.
                if !seen.is_empty() {
                    let i = inp.u8().unwrap_or(0) as usize % seen.len();
                    let mut d = seen[i].clone();
                    if let (Some(pos), Some(x)) = (inp.u16(), inp.u8()) {
                        if !d.is_empty() {
                            let p = pos as usize % d.len();
                            d[p] ^= x;
                        }
                    }
                    to_rx.push(d.clone());
                    tx.handle_datagram(now, client, &mut d);
                }
            }
            5 => {
                let ms = inp.u16().unwrap_or(1) as u64;
                now += Duration::from_micros(ms * 50);
                rx.handle_timeout(now);
                tx.handle_timeout(now);
            }
            _ => {
                // The honest exchange: the receiver's datagrams to the sender, data back.
                let deliver = inp.u8().unwrap_or(0xff);
                for _ in 0..8 {
                    if !rx.poll_transmit(now, &mut out) {
                        break;
                    }
                    assert!(out.len() <= datagram.max(packet::MAX_DATAGRAM));
                    if seen.len() < 64 {
                        seen.push(out.clone());
                    }
                    if deliver & 1 != 0 {
                        tx.handle_datagram(now, client, &mut out);
                    }
                }
                for _ in 0..16 {
                    let Some((_, c)) = tx.poll_transmit(now) else {
                        break;
                    };
                    let res: Result<(), ()> = tx.build_data(now, c, &mut out, |off, buf| {
                        for (k, b) in buf.iter_mut().enumerate() {
                            *b = byte_at(off + k as u64);
                        }
                        Ok(())
                    });
                    assert!(res.is_ok());
                    if seen.len() < 64 {
                        seen.push(out.clone());
                    }
                    if deliver & 2 != 0 {
                        to_rx.push(out.clone());
                    }
                }
                now += Duration::from_millis(1);
            }
        }
        for mut d in to_rx {
            let len = d.len();
            if let Some(del) = rx.handle_datagram(now, &mut d) {
                assert!(del.chunk < rx.chunks());
                assert!(del.bytes.end <= len && del.bytes.start <= del.bytes.end);
                let (off, n) = chunk_span(total, chunk, del.chunk);
                assert_eq!(del.offset, off);
                assert_eq!(del.bytes.len(), n);
                if !keyed_forgery {
                    for (k, b) in d[del.bytes].iter().enumerate() {
                        assert_eq!(*b, byte_at(off + k as u64), "delivered byte differs");
                    }
                }
            }
        }
        assert!(rx.have_count() <= rx.chunks());
        assert!(rx.contiguous() <= rx.chunks());
        assert_eq!(rx.bitmap().len(), (rx.chunks() as usize).div_ceil(8));
        assert!(tx.acked() <= tx.chunks());
        let _ = rx.poll_timeout(now);
        let _ = tx.poll_timeout(now);
    }
});
