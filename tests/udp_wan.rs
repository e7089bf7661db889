//! UDP downloads through `mybox-linkemu` (two network namespaces joined by an emulated link):
//! 64 MiB with 5% random loss, 64 MiB over a delayed, lossy, rate-limited WAN, and a hostile
//! network that corrupts, duplicates and replays datagrams. Needs root (namespaces, TUN); as
//! root they always run.

mod udp_support;

use std::time::Instant;

use udp_support::*;

const MIB: usize = 1024 * 1024;

fn transfer(emu_args: &[&str], size: usize, seed: u64) -> Option<(String, String)> {
    let emu = LinkEmu::start(emu_args)?;
    let p = Pair::new(&format!("{}:0", emu.addr_b), Some(&emu.ns_b));
    let src = p.b.join("big.bin");
    write_random(&src, size, seed);
    let out = p.dir.path().join("out.bin");
    let t = Instant::now();
    let o = p.download("udp", "big.bin", &out, Some(&emu.ns_a), &[]);
    let secs = t.elapsed().as_secs_f64();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "download failed: {err}");
    assert_same_file(&src, &out);
    let slog = p
        .server
        .wait_log("done:", std::time::Duration::from_secs(5))
        .unwrap_or_default();
    drop(p);
    let elog = emu.stop();
    eprintln!(
        "{} MiB through linkemu {emu_args:?} in {secs:.2}s ({:.1} MB/s)\n{elog}{}",
        size / MIB,
        size as f64 / secs / 1e6,
        slog.lines()
            .filter(|l| l.contains("done:"))
            .collect::<String>()
    );
    Some((err, slog))
}

#[test]
fn udp_download_64mib_with_5pct_random_loss() {
    let Some((err, _)) = transfer(&["--loss", "5"], 64 * MIB, 11) else {
        return;
    };
    assert_eq!(counter(&err, "receiver counters", "auth_failed"), 0);
}

#[test]
fn udp_download_64mib_through_emulated_wan() {
    // RTT 20 ms, 1% loss each way, 400 Mbit/s bottleneck with a 50 ms queue.
    transfer(
        &["--delay-ms", "10", "--loss", "1", "--rate-mbit", "400"],
        64 * MIB,
        12,
    );
}

#[test]
fn forged_and_replayed_datagrams_are_rejected() {
    // The network itself attacks: 2% of UDP datagrams get a flipped payload bit (checksum
    // zeroed so the kernel delivers them), 2% trigger a replay of an old datagram, 1% are
    // duplicated. Every one must be dropped and counted; the file must still be exact.
    let Some((err, slog)) = transfer(
        &[
            "--delay-ms",
            "2",
            "--corrupt",
            "2",
            "--replay",
            "2",
            "--dup",
            "1",
        ],
        16 * MIB,
        13,
    ) else {
        return;
    };
    let auth = counter(&err, "receiver counters", "auth_failed");
    let replayed = counter(&err, "receiver counters", "replayed")
        + counter(&err, "receiver counters", "stale");
    assert!(auth > 0, "receiver counted no forgeries:\n{err}");
    assert!(replayed > 0, "receiver counted no replays:\n{err}");
    let s_auth = counter(&slog, "done:", "auth_failed");
    let s_replay = counter(&slog, "done:", "replayed") + counter(&slog, "done:", "stale");
    assert!(s_auth + s_replay > 0, "sender counted nothing:\n{slog}");
}
