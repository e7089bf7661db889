//! `mybox-linkemu`: a small WAN emulator for tests and benchmarks.
//!
//! Two private network namespaces, `mbx-a-<pid>` and `mbx-b-<pid>`, each get a TUN device
//! (10.77.<n>.1/24 and 10.77.<n>.2/24). A user-space forwarder moves every IP packet between the
//! two TUN file descriptors and applies, in each direction: a token-bucket rate limit with a
//! bounded (tail-drop) queue, Bernoulli loss, and a one-way delay. TCP and UDP therefore see
//! the same link. This exists because the kernel here has no netem; tbf alone cannot delay.
//!
//! For security tests it can also act as a hostile network on UDP: corrupt payload bytes (with
//! the UDP checksum zeroed so the kernel still delivers them), duplicate, or replay old
//! datagrams.
//!
//! Usage:
//!   mybox-linkemu [OPTIONS]            set up, print one `READY ...` line, run until SIGTERM,
//!                                      SIGINT, or (with --stdin) end of standard input
//!   mybox-linkemu [OPTIONS] -- CMD...  set up, run CMD with LINKEMU_* variables, tear down,
//!                                      exit with CMD's status
//!
//! Nothing is routed outside the two namespaces; both are deleted on exit.

use std::collections::VecDeque;
use std::io::{BufRead, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Parser, Debug, Clone)]
#[command(
    name = "mybox-linkemu",
    about = "Emulate a WAN link between two network namespaces"
)]
struct Args {
    /// One-way delay in each direction, milliseconds (RTT = 2 × this).
    #[arg(long, default_value_t = 0.0)]
    delay_ms: f64,
    /// Random loss in each direction, percent.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Rate limit in each direction, Mbit/s (0 = none).
    #[arg(long, default_value_t = 0.0)]
    rate_mbit: f64,
    /// Queue in front of the rate limit, milliseconds of data at that rate (tail drop beyond).
    #[arg(long, default_value_t = 50.0)]
    queue_ms: f64,
    /// MTU of the TUN devices.
    #[arg(long, default_value_t = 1500)]
    mtu: u32,
    /// Percent of UDP datagrams corrupted (one payload byte flipped, checksum zeroed).
    #[arg(long, default_value_t = 0.0)]
    corrupt: f64,
    /// Percent of UDP datagrams after which an old captured UDP datagram is replayed.
    #[arg(long, default_value_t = 0.0)]
    replay: f64,
    /// Percent of packets duplicated.
    #[arg(long, default_value_t = 0.0)]
    dup: f64,
    /// RNG seed (default: from the pid).
    #[arg(long)]
    seed: Option<u64>,
    /// Exit when standard input reaches its end (so a test that dies takes the link with it).
    #[arg(long)]
    stdin: bool,
    /// Command to run (in the host namespace; use `ip netns exec $LINKEMU_NS_A ...`).
    #[arg(last = true)]
    cmd: Vec<String>,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .with_context(|| "running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn open_tun(name: &str) -> anyhow::Result<OwnedFd> {
    let fd = unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK,
        )
    };
    if fd < 0 {
        bail!("open /dev/net/tun: {}", std::io::Error::last_os_error());
    }
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = IfReq {
        name: [0; 16],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF as _, &mut req) };
    if r < 0 {
        bail!("TUNSETIFF {name}: {}", std::io::Error::last_os_error());
    }
    Ok(fd)
}

struct Setup {
    ns: [String; 2],
    addr: [String; 2],
}

impl Drop for Setup {
    fn drop(&mut self) {
        for ns in &self.ns {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

#[derive(Default)]
struct Stats {
    forwarded: AtomicU64,
    lost: AtomicU64,
    queue_drop: AtomicU64,
    corrupted: AtomicU64,
    replayed: AtomicU64,
}

struct Queue {
    q: Mutex<VecDeque<(Instant, Vec<u8>)>>,
    cv: Condvar,
}

fn is_udp(p: &[u8]) -> Option<usize> {
    // IPv4 only: version 4, protocol 17, unfragmented. Returns the UDP header offset.
    if p.len() < 28 || p[0] >> 4 != 4 || p[9] != 17 {
        return None;
    }
    let ihl = (p[0] & 0x0f) as usize * 4;
    (p.len() >= ihl + 8).then_some(ihl)
}

fn poll_in(fd: i32, ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    unsafe { libc::poll(&mut p, 1, ms) > 0 }
}

/// Read packets from `src`, shape them, queue them for the writer.
fn reader(src: Arc<OwnedFd>, q: Arc<Queue>, a: Args, seed: u64, stats: Arc<Stats>) {
    let mut rng = StdRng::seed_from_u64(seed);
    let rate = a.rate_mbit * 1e6 / 8.0; // bytes/s
    let delay = Duration::from_secs_f64(a.delay_ms.max(0.0) / 1000.0);
    let queue_limit = Duration::from_secs_f64(a.queue_ms.max(0.0) / 1000.0);
    let mut busy_until = Instant::now();
    let mut captured: VecDeque<Vec<u8>> = VecDeque::new();
    let mut buf = vec![0u8; 65_536];
    let fd = src.as_raw_fd();
    while !STOP.load(Ordering::Relaxed) {
        let n = unsafe { libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
        if n <= 0 {
            poll_in(fd, 100);
            continue;
        }
        let mut pkt = buf[..n as usize].to_vec();
        let now = Instant::now();
        // Rate limit with a bounded queue: the packet leaves the bottleneck when the ones
        // before it have, and is dropped if that is more than the queue holds.
        let mut depart = now;
        if rate > 0.0 {
            let start = busy_until.max(now);
            if start.duration_since(now) > queue_limit {
                stats.queue_drop.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            depart = start + Duration::from_secs_f64(pkt.len() as f64 / rate);
            busy_until = depart;
        }
        if a.loss > 0.0 && rng.gen_bool((a.loss / 100.0).min(1.0)) {
            stats.lost.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let mut extra = Vec::new();
        if let Some(off) = is_udp(&pkt) {
            if a.replay > 0.0 {
                if captured.len() < 4096 && rng.gen_bool(0.2) {
                    captured.push_back(pkt.clone());
                } else if !captured.is_empty() && rng.gen_bool(0.01) {
                    captured.pop_front();
                }
                if !captured.is_empty() && rng.gen_bool((a.replay / 100.0).min(1.0)) {
                    let i = rng.gen_range(0..captured.len());
                    extra.push(captured[i].clone());
                    stats.replayed.fetch_add(1, Ordering::Relaxed);
                }
            }
            if a.corrupt > 0.0 && pkt.len() > off + 8 && rng.gen_bool((a.corrupt / 100.0).min(1.0))
            {
                let i = rng.gen_range(off + 8..pkt.len());
                pkt[i] ^= 1 << rng.gen_range(0..8);
                // UDP over IPv4 may carry no checksum; zero it so the kernel delivers the
                // corrupted datagram to the application, whose AEAD must catch it.
                pkt[off + 6] = 0;
                pkt[off + 7] = 0;
                stats.corrupted.fetch_add(1, Ordering::Relaxed);
            }
        }
        if a.dup > 0.0 && rng.gen_bool((a.dup / 100.0).min(1.0)) {
            extra.push(pkt.clone());
        }
        let at = depart + delay;
        let mut g = match q.q.lock() {
            Ok(g) => g,
            Err(_) => return,
        };
        let was_empty = g.is_empty();
        g.push_back((at, pkt));
        for e in extra {
            g.push_back((at, e));
        }
        drop(g);
        // Release times only grow, so a writer already waiting for the head packet needs no
        // wake-up; waking it per packet costs two context switches each at 100k packets/s.
        if was_empty {
            q.cv.notify_one();
        }
    }
}

/// Write queued packets to `dst` when their time comes.
fn writer(dst: Arc<OwnedFd>, q: Arc<Queue>, stats: Arc<Stats>) {
    let fd = dst.as_raw_fd();
    let Ok(mut g) = q.q.lock() else { return };
    while !STOP.load(Ordering::Relaxed) {
        let now = Instant::now();
        match g.front() {
            Some((at, _)) if *at <= now => {
                let mut due = Vec::new();
                while g.front().is_some_and(|(at, _)| *at <= now) {
                    if let Some((_, p)) = g.pop_front() {
                        due.push(p);
                    }
                }
                drop(g);
                for p in due {
                    let r = unsafe { libc::write(fd, p.as_ptr() as *const libc::c_void, p.len()) };
                    if r > 0 {
                        stats.forwarded.fetch_add(1, Ordering::Relaxed);
                    }
                }
                g = match q.q.lock() {
                    Ok(g) => g,
                    Err(_) => return,
                };
            }
            Some((at, _)) => {
                let wait = at.duration_since(now);
                g = match q.cv.wait_timeout(g, wait) {
                    Ok((g, _)) => g,
                    Err(_) => return,
                };
            }
            None => {
                g = match q.cv.wait_timeout(g, Duration::from_millis(100)) {
                    Ok((g, _)) => g,
                    Err(_) => return,
                };
            }
        }
    }
}

fn setup(a: &Args) -> anyhow::Result<(Setup, [Arc<OwnedFd>; 2])> {
    let pid = std::process::id();
    let n = pid % 250 + 1;
    let ns = [format!("mbx-a-{pid}"), format!("mbx-b-{pid}")];
    let dev = [format!("mbxa{pid}"), format!("mbxb{pid}")];
    let addr = [format!("10.77.{n}.1"), format!("10.77.{n}.2")];
    let mut s = Setup {
        ns: [String::new(), String::new()],
        addr: addr.clone(),
    };
    let mut fds = Vec::new();
    for i in 0..2 {
        ip(&["netns", "add", &ns[i]])?;
        s.ns[i] = ns[i].clone();
        let fd = open_tun(&dev[i])?;
        ip(&["link", "set", "dev", &dev[i], "netns", &ns[i]])?;
        ip(&["-n", &ns[i], "link", "set", "dev", "lo", "up"])?;
        ip(&[
            "-n",
            &ns[i],
            "addr",
            "add",
            &format!("{}/24", addr[i]),
            "dev",
            &dev[i],
        ])?;
        ip(&[
            "-n",
            &ns[i],
            "link",
            "set",
            "dev",
            &dev[i],
            "mtu",
            &a.mtu.to_string(),
            // A long device queue: when the forwarder is briefly slower than the sender the
            // packets wait (a delay the sender can see) instead of vanishing as fake loss.
            "txqueuelen",
            "10000",
            "up",
        ])?;
        fds.push(Arc::new(fd));
    }
    let b = fds.pop().context("tun b")?;
    let a_fd = fds.pop().context("tun a")?;
    Ok((s, [a_fd, b]))
}

fn main() {
    let a = Args::parse();
    std::process::exit(match run(a) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mybox-linkemu: error: {e:#}");
            2
        }
    });
}

fn run(a: Args) -> anyhow::Result<i32> {
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGHUP, on_signal as *const () as libc::sighandler_t);
    }
    let (setup, [fa, fb]) = setup(&a)?;
    let seed = a.seed.unwrap_or(std::process::id() as u64);
    let stats = [Arc::new(Stats::default()), Arc::new(Stats::default())];
    let mut threads = Vec::new();
    for (i, (src, dst)) in [(fa.clone(), fb.clone()), (fb.clone(), fa.clone())]
        .into_iter()
        .enumerate()
    {
        let q = Arc::new(Queue {
            q: Mutex::new(VecDeque::new()),
            cv: Condvar::new(),
        });
        let (q2, a2, st) = (q.clone(), a.clone(), stats[i].clone());
        threads.push(std::thread::spawn(move || {
            reader(src, q2, a2, seed.wrapping_add(i as u64 * 7919), st)
        }));
        let st = stats[i].clone();
        threads.push(std::thread::spawn(move || writer(dst, q, st)));
    }
    let ready = format!(
        "READY ns_a={} ns_b={} addr_a={} addr_b={}",
        setup.ns[0], setup.ns[1], setup.addr[0], setup.addr[1]
    );
    if a.stdin {
        std::thread::spawn(|| {
            let stdin = std::io::stdin();
            let mut line = String::new();
            let mut lock = stdin.lock();
            while matches!(lock.read_line(&mut line), Ok(n) if n > 0) {
                line.clear();
            }
            STOP.store(true, Ordering::SeqCst);
        });
    }
    let mut code = 0;
    if a.cmd.is_empty() {
        println!("{ready}");
        let _ = std::io::stdout().flush();
        while !STOP.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(50));
        }
    } else {
        eprintln!("{ready}");
        let mut child = Command::new(&a.cmd[0])
            .args(&a.cmd[1..])
            .env("LINKEMU_NS_A", &setup.ns[0])
            .env("LINKEMU_NS_B", &setup.ns[1])
            .env("LINKEMU_ADDR_A", &setup.addr[0])
            .env("LINKEMU_ADDR_B", &setup.addr[1])
            .spawn()
            .with_context(|| format!("running {}", a.cmd[0]))?;
        loop {
            if let Some(st) = child.try_wait()? {
                code = st.code().unwrap_or(1);
                break;
            }
            if STOP.load(Ordering::Relaxed) {
                let _ = child.kill();
                let _ = child.wait();
                code = 1;
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        STOP.store(true, Ordering::SeqCst);
    }
    STOP.store(true, Ordering::SeqCst);
    for t in threads {
        let _ = t.join();
    }
    for (name, s) in ["a->b", "b->a"].iter().zip(&stats) {
        eprintln!(
            "linkemu {name}: forwarded={} lost={} queue_drop={} corrupted={} replayed={}",
            s.forwarded.load(Ordering::Relaxed),
            s.lost.load(Ordering::Relaxed),
            s.queue_drop.load(Ordering::Relaxed),
            s.corrupted.load(Ordering::Relaxed),
            s.replayed.load(Ordering::Relaxed)
        );
    }
    drop(setup);
    Ok(code)
}
