//! Rate controller for the UDP sender: rate-based (paced), delay-driven, loss-tolerant.
//!
//! TCP reads every loss as congestion, so random loss alone caps it near MSS/RTT·1/√p. This
//! controller instead watches two signals per measurement interval (about one RTT):
//! - queueing delay: the smallest RTT seen in the interval minus the path's minimum RTT. A
//!   standing queue means the bottleneck is full, whatever the loss rate.
//! - loss far above the background: the loss rate measured while the queue was empty is the
//!   link's own (random) loss; only loss well above it (a tail-dropping queue, a policer, an
//!   overflowing socket buffer) counts as congestion.
//!
//! With neither signal the rate grows (×1.5 per interval until the first congestion; then
//! ×1.25 while below the best delivery rate of the last ~2 s, ×1.06 above it); on a signal it
//! drops to 0.9 × that best delivery rate (at most halving), then holds for one interval so the
//! queue it built can drain before it is judged again.

use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct RateConfig {
    /// Bytes per second at the start.
    pub initial: f64,
    pub min: f64,
    pub max: f64,
}

impl Default for RateConfig {
    fn default() -> Self {
        RateConfig {
            initial: 12.5e6, // 100 Mbit/s
            min: 125e3,      // 1 Mbit/s
            max: 5e9,
        }
    }
}

#[derive(Clone, Debug)]
pub struct RateCtl {
    cfg: RateConfig,
    rate: f64,
    slow_start: bool,
    /// Delivery rates of recent intervals (time, bytes/s): their maximum estimates what the
    /// path can carry (it cannot deliver faster than its bottleneck), as in BBR.
    deliveries: std::collections::VecDeque<(Instant, f64)>,
    pub srtt: Option<Duration>,
    /// The newest RTT sample.
    pub latest_rtt: Option<Duration>,
    min_rtt: Option<Duration>,
    min_rtt_at: Option<Instant>,
    /// Background (random) loss, learnt while the queue was empty.
    pub bg_loss: f64,
    // Interval bookkeeping.
    start: Option<Instant>,
    start_echo_pn: u64,
    start_recv: u64,
    start_bytes: u64,
    interval_min_rtt: Option<Duration>,
    hold: bool,
    /// Number of decreases, for logs and tests.
    pub decreases: u64,
    pub last_loss: f64,
    pub last_queue: Duration,
}

/// What one ACK tells the controller.
#[derive(Clone, Copy, Debug)]
pub struct AckSample {
    pub rtt: Option<Duration>,
    /// Highest sender packet number the receiver has seen.
    pub echo_pn: u64,
    /// Data packets the receiver has received in total (duplicates included).
    pub recv_count: u64,
    /// Bytes delivered so far (payload), for the delivery rate.
    pub recv_bytes: u64,
}

impl RateCtl {
    pub fn new(cfg: RateConfig) -> Self {
        let rate = cfg.initial.clamp(cfg.min, cfg.max);
        RateCtl {
            cfg,
            rate,
            slow_start: true,
            deliveries: std::collections::VecDeque::new(),
            srtt: None,
            latest_rtt: None,
            min_rtt: None,
            min_rtt_at: None,
            bg_loss: 0.0,
            start: None,
            start_echo_pn: 0,
            start_recv: 0,
            start_bytes: 0,
            interval_min_rtt: None,
            hold: false,
            decreases: 0,
            last_loss: 0.0,
            last_queue: Duration::ZERO,
        }
    }

    /// Current pacing rate, bytes per second.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    pub fn srtt_or(&self, d: Duration) -> Duration {
        self.srtt.unwrap_or(d)
    }

    fn interval_len(&self) -> Duration {
        self.srtt
            .unwrap_or(Duration::from_millis(10))
            .clamp(Duration::from_millis(5), Duration::from_millis(200))
    }

    pub fn on_ack(&mut self, now: Instant, s: AckSample) {
        if let Some(rtt) = s.rtt {
            self.latest_rtt = Some(rtt);
            self.srtt = Some(match self.srtt {
                None => rtt,
                Some(old) => (old * 7 + rtt) / 8,
            });
            // The path minimum, forgotten after 10 s so a route change is learnt.
            let stale = self
                .min_rtt_at
                .is_none_or(|t| now.duration_since(t) > Duration::from_secs(10));
            if stale || self.min_rtt.is_none_or(|m| rtt <= m) {
                self.min_rtt = Some(rtt);
                self.min_rtt_at = Some(now);
            }
            self.interval_min_rtt = Some(self.interval_min_rtt.map_or(rtt, |m| m.min(rtt)));
        }
        let Some(start) = self.start else {
            self.begin(now, s);
            return;
        };
        let elapsed = now.duration_since(start);
        if elapsed < self.interval_len() {
            return;
        }
        let sent = s.echo_pn.saturating_sub(self.start_echo_pn);
        let got = s.recv_count.saturating_sub(self.start_recv);
        let bytes = s.recv_bytes.saturating_sub(self.start_bytes);
        let delivery = bytes as f64 / elapsed.as_secs_f64().max(1e-6);
        let loss = if sent >= 20 {
            (1.0 - got as f64 / sent as f64).clamp(0.0, 1.0)
        } else {
            self.bg_loss
        };
        let queue = match (self.interval_min_rtt, self.min_rtt) {
            (Some(i), Some(m)) => i.saturating_sub(m),
            _ => Duration::ZERO,
        };
        self.last_loss = loss;
        self.last_queue = queue;
        if sent >= 20 {
            self.deliveries.push_back((now, delivery));
        }
        // Two seconds of history (and at least a few intervals on long paths).
        while self.deliveries.len() > 8
            && self
                .deliveries
                .front()
                .is_some_and(|(t, _)| now.duration_since(*t) > Duration::from_secs(2))
        {
            self.deliveries.pop_front();
        }
        let max_delivery = self.deliveries.iter().map(|d| d.1).fold(0.0, f64::max);
        let min_rtt = self.min_rtt.unwrap_or(Duration::from_millis(1));
        // A queue of a quarter of the base RTT (at least 3 ms, so scheduler noise on a busy
        // host is not read as a queue) means the bottleneck is full.
        let queue_limit = (min_rtt / 4).max(Duration::from_millis(3));
        let queued = queue > queue_limit;
        let loss_limit = 2.0 * self.bg_loss + 0.05;
        let lossy = sent >= 20 && loss > loss_limit;
        if !queued && sent >= 20 && loss < 0.5 {
            // Learn the link's own loss only while it is not saturated.
            self.bg_loss = 0.9 * self.bg_loss + 0.1 * loss;
        }
        if self.hold {
            self.hold = false;
        } else if queued || lossy {
            // Just under what the path recently carried, so the queue drains; but not a
            // collapse to one bad interval's delivery (a loss burst depresses it).
            let target = if max_delivery > 0.0 {
                (max_delivery * 0.9).min(self.rate * 0.9)
            } else {
                self.rate * 0.7
            };
            self.rate = target.max(self.rate * 0.5);
            self.slow_start = false;
            self.hold = true;
            self.decreases += 1;
        } else {
            // Fast back up to the rate the path is known to carry, slow probing beyond it.
            let factor = if self.slow_start {
                1.5
            } else if self.rate < max_delivery * 0.95 {
                1.25
            } else {
                1.06
            };
            let mut next = self.rate * factor;
            // Never run far ahead of what actually arrives (receiver- or app-limited).
            if delivery > 0.0 && sent >= 20 {
                next = next.min(delivery.max(self.cfg.min) * 2.0 + 1e6);
            }
            self.rate = next.max(self.rate.min(next));
        }
        self.rate = self.rate.clamp(self.cfg.min, self.cfg.max);
        self.begin(now, s);
    }

    fn begin(&mut self, now: Instant, s: AckSample) {
        self.start = Some(now);
        self.start_echo_pn = s.echo_pn;
        self.start_recv = s.recv_count;
        self.start_bytes = s.recv_bytes;
        self.interval_min_rtt = None;
    }
}

/// Token bucket for pacing: `take` succeeds while tokens are available; tokens accrue at the
/// controller's rate up to a small burst.
#[derive(Clone, Debug)]
pub struct Pacer {
    tokens: f64,
    last: Option<Instant>,
}

impl Default for Pacer {
    fn default() -> Self {
        Self::new()
    }
}

impl Pacer {
    pub fn new() -> Self {
        Pacer {
            tokens: 0.0,
            last: None,
        }
    }

    fn burst(rate: f64, packet: usize) -> f64 {
        // 2 ms of data (the timer granularity of the drivers), at least a small batch.
        (rate * 0.002).max(packet as f64 * 8.0)
    }

    fn refill(&mut self, now: Instant, rate: f64, packet: usize) {
        let Some(last) = self.last else {
            // Start with a full bucket so the first batch goes out at once.
            self.last = Some(now);
            self.tokens = Self::burst(rate, packet);
            return;
        };
        let dt = now.saturating_duration_since(last).as_secs_f64();
        self.last = Some(now);
        self.tokens = (self.tokens + dt * rate).min(Self::burst(rate, packet));
    }

    /// Spend `bytes` if there are tokens for them.
    pub fn take(&mut self, now: Instant, rate: f64, bytes: usize) -> bool {
        self.refill(now, rate, bytes);
        if self.tokens >= bytes as f64 {
            self.tokens -= bytes as f64;
            true
        } else {
            false
        }
    }

    /// When `bytes` will be affordable.
    pub fn next_at(&self, now: Instant, rate: f64, bytes: usize) -> Instant {
        let missing = (bytes as f64 - self.tokens).max(0.0);
        now + Duration::from_secs_f64(missing / rate.max(1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(loss: f64, queue_ms: u64, rounds: usize) -> RateCtl {
        let mut c = RateCtl::new(RateConfig::default());
        let t0 = Instant::now();
        let mut pn = 0u64;
        let mut recv = 0u64;
        for i in 0..rounds {
            let now = t0 + Duration::from_millis(20 * i as u64);
            pn += 1000;
            recv += (1000.0 * (1.0 - loss)) as u64;
            c.on_ack(
                now,
                AckSample {
                    rtt: Some(Duration::from_millis(20 + if i > 5 { queue_ms } else { 0 })),
                    echo_pn: pn,
                    recv_count: recv,
                    recv_bytes: recv * 1200 * 100,
                },
            );
        }
        c
    }

    #[test]
    fn random_loss_is_not_congestion() {
        let c = run(0.03, 0, 100);
        assert_eq!(c.decreases, 0, "{c:?}");
        assert!(c.rate() > 100e6, "{}", c.rate());
        assert!((c.bg_loss - 0.03).abs() < 0.01, "{}", c.bg_loss);
    }

    #[test]
    fn queueing_delay_backs_off() {
        let c = run(0.0, 30, 100);
        assert!(c.decreases > 10, "{c:?}");
    }

    #[test]
    fn pacer_limits_rate() {
        let mut p = Pacer::new();
        let t0 = Instant::now();
        let mut sent = 0usize;
        for us in 0..100_000u64 {
            let now = t0 + Duration::from_micros(us);
            while p.take(now, 10e6, 1000) {
                sent += 1000;
            }
        }
        // 100 ms at 10 MB/s = 1 MB (+ one burst).
        assert!((900_000..1_100_000).contains(&sent), "{sent}");
    }
}
