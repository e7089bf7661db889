//! Socket loops around the sans-IO state machines: one OS thread per transfer side, batched
//! datagram I/O (`recvmmsg`/`sendmmsg`), `ppoll` with microsecond timeouts for pacing, and the
//! file I/O (`pread` on the sender, `pwrite` on the receiver).
//!
//! Not used: UDP GSO (`UDP_SEGMENT`). `sendmmsg` already amortises the syscall over a batch,
//! and on loopback the transfer uses ~60 KB datagrams, which cost less than GSO segmentation.

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use socket2::SockAddr;

use super::packet::{self, Counters};
use super::receiver::Receiver;
use super::sender::{Sender, Status};

/// Datagrams per `sendmmsg`/`recvmmsg`.
const BATCH: usize = 32;

/// Bind a UDP socket for a transfer: same family as `peer`, large kernel buffers (a burst at
/// gigabit rates must not overflow them), non-blocking.
pub fn bind_for(peer: SocketAddr) -> io::Result<UdpSocket> {
    let any: SocketAddr = if peer.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(any)?;
    sock.set_nonblocking(true)?;
    set_buffers(&sock, 32 << 20);
    Ok(sock)
}

fn set_buffers(sock: &UdpSocket, bytes: libc::c_int) {
    let fd = sock.as_raw_fd();
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        // The FORCE variants pass the sysctl cap when privileged; otherwise the plain ones
        // get what the cap allows.
        let set = |opt| unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                &bytes as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if set(force) != 0 {
            set(plain);
        }
    }
}

/// Wait until `fd` is readable or `timeout` passes.
fn wait_readable(fd: i32, timeout: Duration) -> io::Result<()> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let t = timeout.min(Duration::from_millis(200));
    let ts = libc::timespec {
        tv_sec: t.as_secs() as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    };
    let r = unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}

fn wait_writable(fd: i32) {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    unsafe { libc::poll(&mut pfd, 1, 5) };
}

/// Receive up to `bufs.len()` datagrams without blocking. Fills `got` with (length, source).
fn recv_batch(
    fd: i32,
    bufs: &mut [Vec<u8>],
    got: &mut Vec<(usize, Option<SocketAddr>)>,
) -> io::Result<()> {
    got.clear();
    let n = bufs.len();
    let mut iovs: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        })
        .collect();
    let mut names: Vec<libc::sockaddr_storage> = vec![unsafe { std::mem::zeroed() }; n];
    let mut msgs: Vec<libc::mmsghdr> = (0..n)
        .map(|i| {
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_name = &mut names[i] as *mut _ as *mut libc::c_void;
            h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
            h.msg_hdr.msg_iov = &mut iovs[i];
            h.msg_hdr.msg_iovlen = 1;
            h
        })
        .collect();
    let r = unsafe {
        libc::recvmmsg(
            fd,
            msgs.as_mut_ptr(),
            n as libc::c_uint,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(()),
            // A previous send hit a closed port (ICMP); not fatal for a datagram socket.
            io::ErrorKind::ConnectionRefused => Ok(()),
            _ => Err(e),
        };
    }
    for (i, m) in msgs.iter().take(r as usize).enumerate() {
        let len = m.msg_len as usize;
        let truncated = m.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
        let addr = unsafe { SockAddr::new(names[i], m.msg_hdr.msg_namelen) }.as_socket();
        // A datagram larger than the buffer is cut; report it as truncated (length 0).
        got.push((if truncated { 0 } else { len }, addr));
    }
    Ok(())
}

/// Send all `msgs` to `to` (or on the connected socket when `to` is None), waiting briefly
/// when the socket buffer is full. Datagrams that still cannot go are dropped: to the
/// protocol that is loss, and it recovers.
fn send_batch(fd: i32, msgs: &[Vec<u8>], to: Option<SocketAddr>) -> io::Result<usize> {
    let addr = to.map(SockAddr::from);
    let mut iovs: Vec<libc::iovec> = msgs
        .iter()
        .map(|b| libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        })
        .collect();
    let mut hdrs: Vec<libc::mmsghdr> = (0..msgs.len())
        .map(|i| {
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            if let Some(a) = &addr {
                h.msg_hdr.msg_name = a.as_ptr() as *mut libc::c_void;
                h.msg_hdr.msg_namelen = a.len();
            }
            h.msg_hdr.msg_iov = &mut iovs[i];
            h.msg_hdr.msg_iovlen = 1;
            h
        })
        .collect();
    let mut done = 0usize;
    let mut stalls = 0;
    while done < hdrs.len() {
        let r = unsafe {
            libc::sendmmsg(
                fd,
                hdrs[done..].as_mut_ptr(),
                (hdrs.len() - done) as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => {
                    stalls += 1;
                    if stalls > 20 {
                        break;
                    }
                    wait_writable(fd);
                    continue;
                }
                io::ErrorKind::ConnectionRefused => {
                    done += 1;
                    continue;
                }
                _ if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    stalls += 1;
                    if stalls > 20 {
                        break;
                    }
                    std::thread::sleep(Duration::from_micros(200));
                    continue;
                }
                _ => return Err(e),
            }
        }
        done += r as usize;
    }
    Ok(done)
}

/// What a finished sender loop reports.
#[derive(Debug, Clone)]
pub struct SenderReport {
    pub counters: Counters,
    pub sent_packets: u64,
    pub retransmits: u64,
    pub final_rate: f64,
    pub bg_loss: f64,
    /// Rate decreases (congestion signals acted on).
    pub decreases: u64,
    pub elapsed: Duration,
}

/// Run `s` until the receiver has everything, it fails, or `stop` is set. `base` is the file
/// offset of the transfer's first byte.
pub fn run_sender(
    sock: &UdpSocket,
    mut s: Sender,
    file: &std::fs::File,
    base: u64,
    stop: &AtomicBool,
) -> Result<SenderReport, String> {
    let fd = sock.as_raw_fd();
    let started = Instant::now();
    let mut rbufs: Vec<Vec<u8>> = (0..16).map(|_| vec![0u8; packet::MAX_DATAGRAM]).collect();
    let mut got = Vec::with_capacity(16);
    let mut out: Vec<Vec<u8>> = (0..BATCH)
        .map(|_| Vec::with_capacity(s.datagram_max()))
        .collect();
    let report = |s: &Sender| SenderReport {
        counters: s.counters,
        sent_packets: s.sent_packets,
        retransmits: s.retransmits,
        final_rate: s.rate.rate(),
        bg_loss: s.rate.bg_loss,
        decreases: s.rate.decreases,
        elapsed: started.elapsed(),
    };
    loop {
        if stop.load(Ordering::Relaxed) {
            return Err("stopped".into());
        }
        let mut now = Instant::now();
        loop {
            recv_batch(fd, &mut rbufs, &mut got).map_err(|e| format!("udp receive: {e}"))?;
            for (i, (len, from)) in got.iter().enumerate() {
                let Some(from) = *from else { continue };
                s.handle_datagram(now, from, &mut rbufs[i][..*len]);
            }
            if got.len() < rbufs.len() {
                break;
            }
        }
        s.handle_timeout(now);
        match s.status() {
            Status::Done => return Ok(report(&s)),
            Status::Failed(e) => return Err(e.clone()),
            Status::Running => {}
        }
        let mut count = 0;
        let mut peer = None;
        while count < BATCH {
            let Some((to, chunk)) = s.poll_transmit(now) else {
                break;
            };
            peer = Some(to);
            s.build_data(now, chunk, &mut out[count], |off, dst| {
                file.read_exact_at(dst, base + off)
            })
            .map_err(|e| format!("reading the file: {e}"))?;
            count += 1;
        }
        if count > 0 {
            send_batch(fd, &out[..count], peer).map_err(|e| format!("udp send: {e}"))?;
            now = Instant::now();
        }
        if count == BATCH {
            continue;
        }
        let wake = s.poll_timeout(now);
        let wait = wake.saturating_duration_since(Instant::now());
        if wait > Duration::from_micros(50) || count == 0 {
            wait_readable_s(fd, wait)?;
        }
    }
}

fn wait_readable_s(fd: i32, t: Duration) -> Result<(), String> {
    wait_readable(fd, t).map_err(|e| format!("poll: {e}"))
}

/// Where received bytes go.
pub trait Sink {
    fn write_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Write `parts` back to back from `offset` (consecutive chunks of one receive batch, so
    /// a file sink can use one `pwritev` instead of one `pwrite` per datagram).
    fn write_parts_at(&mut self, offset: u64, parts: &[&[u8]]) -> io::Result<()> {
        let mut off = offset;
        for p in parts {
            self.write_at(off, p)?;
            off += p.len() as u64;
        }
        Ok(())
    }
    /// Called about once a second and at the end with the receiver's bitmap (for resume).
    fn checkpoint(&mut self, _bitmap: &[u8]) {}
}

/// Shared progress of a running receiver, read by the hasher and the progress bar.
#[derive(Default, Debug)]
pub struct Progress {
    /// Bytes from the start of the transfer that are all present.
    pub contiguous: AtomicU64,
    /// Bytes received in total.
    pub received: AtomicU64,
    pub complete: AtomicBool,
}

/// Run `r` until `stop` is set (the caller sets it once the sender's final word came over the
/// control connection) or it fails. After completion it keeps answering late data with DONE.
pub fn run_receiver(
    sock: &UdpSocket,
    mut r: Receiver,
    sink: &mut dyn Sink,
    chunk: usize,
    total: u64,
    stop: &AtomicBool,
    progress: &Arc<Progress>,
) -> (Receiver, Result<(), String>) {
    let fd = sock.as_raw_fd();
    let size = chunk + packet::OVERHEAD + super::sender::DATA_HEADER;
    let mut rbufs: Vec<Vec<u8>> = (0..BATCH).map(|_| vec![0u8; size + 1]).collect();
    let mut got = Vec::with_capacity(BATCH);
    let mut deliveries: Vec<(u64, usize, std::ops::Range<usize>)> = Vec::with_capacity(BATCH);
    let mut out = Vec::with_capacity(2048);
    let mut last_checkpoint = Instant::now();
    let publish = |r: &Receiver| {
        let c = (r.contiguous() as u64 * chunk as u64).min(total);
        progress.contiguous.store(c, Ordering::Release);
        if r.is_complete() {
            progress.complete.store(true, Ordering::Release);
        }
    };
    publish(&r);
    loop {
        if stop.load(Ordering::Relaxed) {
            sink.checkpoint(&r.bitmap());
            return (r, Ok(()));
        }
        let mut now = Instant::now();
        let mut any = false;
        for _ in 0..8 {
            if let Err(e) = recv_batch(fd, &mut rbufs, &mut got) {
                sink.checkpoint(&r.bitmap());
                return (r, Err(format!("udp receive: {e}")));
            }
            any |= !got.is_empty();
            deliveries.clear();
            for (i, (len, _)) in got.iter().enumerate() {
                if let Some(d) = r.handle_datagram(now, &mut rbufs[i][..*len]) {
                    deliveries.push((d.offset, i, d.bytes));
                }
            }
            // Runs of consecutive chunks go to the sink in one call.
            let mut k = 0;
            while k < deliveries.len() {
                let start = deliveries[k].0;
                let mut end = k;
                let mut next_off = start + deliveries[k].2.len() as u64;
                while end + 1 < deliveries.len() && deliveries[end + 1].0 == next_off {
                    end += 1;
                    next_off += deliveries[end].2.len() as u64;
                }
                let parts: Vec<&[u8]> = deliveries[k..=end]
                    .iter()
                    .map(|(_, i, range)| &rbufs[*i][range.clone()])
                    .collect();
                if let Err(e) = sink.write_parts_at(start, &parts) {
                    sink.checkpoint(&r.bitmap());
                    return (r, Err(format!("writing: {e}")));
                }
                progress
                    .received
                    .fetch_add(next_off - start, Ordering::Relaxed);
                k = end + 1;
            }
            if got.len() < rbufs.len() {
                break;
            }
        }
        if any {
            publish(&r);
            now = Instant::now();
        }
        let mut msgs: Vec<Vec<u8>> = Vec::new();
        while r.poll_transmit(now, &mut out) {
            msgs.push(out.clone());
            if msgs.len() >= 8 {
                break;
            }
        }
        if !msgs.is_empty() {
            if let Err(e) = send_batch(fd, &msgs, None) {
                sink.checkpoint(&r.bitmap());
                return (r, Err(format!("udp send: {e}")));
            }
        }
        r.handle_timeout(now);
        if let Some(e) = r.failed() {
            let e = e.to_string();
            sink.checkpoint(&r.bitmap());
            return (r, Err(e));
        }
        if now.duration_since(last_checkpoint) > Duration::from_secs(1) {
            sink.checkpoint(&r.bitmap());
            last_checkpoint = now;
        }
        if !any {
            let mut wait = r
                .poll_timeout(now)
                .saturating_duration_since(Instant::now());
            if r.is_complete() {
                // Only late data and the stop flag matter now; look at the flag often.
                wait = wait.min(Duration::from_millis(5));
            }
            if let Err(e) = wait_readable_s(fd, wait) {
                return (r, Err(e));
            }
        }
    }
}
