//! `mybox daemon` and `mybox status`: one process per box that serves it to its peers, keeps it
//! in sync through the [`crate::sync`] engine, and answers `status` on a control socket
//! (`.mybox/control.sock`, one JSON request and one JSON answer per line).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

use crate::config::BoxDir;

/// Log to stderr and to `.mybox/daemon.log` (called before anything else logs).
pub fn init_logging(box_dir: Option<&PathBuf>, verbose: u8) {
    use tracing_subscriber::fmt::writer::MakeWriterExt;
    let default = match verbose {
        0 => "info",
        1 => "info,mybox=debug",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("MYBOX_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let file = crate::cli::find_box(box_dir).ok().and_then(|b| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(b.meta().join("daemon.log"))
            .ok()
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_target(false);
    let _ = match file {
        Some(f) => builder
            .with_writer(std::io::stderr.and(std::sync::Mutex::new(f)))
            .try_init(),
        None => builder.with_writer(std::io::stderr).try_init(),
    };
}

/// glibc gives every thread that allocates its own arena; with the blocking pool, hashing threads
/// and tokio workers that multiplies a long-running daemon's resident memory for no speed gain.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only tunes the allocator; called before the daemon's threads allocate much.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Held for the daemon's lifetime: a second daemon on the same box is refused.
struct InstanceLock(#[allow(dead_code)] std::fs::File);

fn lock_instance(b: &BoxDir) -> anyhow::Result<InstanceLock> {
    let path = b.meta().join("daemon.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r != 0 {
        bail!(
            "another mybox daemon is already running for {} (holds {})",
            b.root.display(),
            path.display()
        );
    }
    let mut f = f;
    let _ = f.set_len(0);
    let _ = writeln!(f, "{}", std::process::id());
    Ok(InstanceLock(f))
}

/// A started daemon: instance lock held, listener bound, sync engine running, control socket
/// answering. [`Daemon::serve`] accepts peers until told to stop, then stops the engine.
/// Shared by `mybox daemon` and `mybox mount` (which also mounts the store over the same
/// [`crate::server::ServerCtx`], so FUSE writers and the sync engine share one lock manager).
pub struct Daemon {
    pub ctx: Arc<crate::server::ServerCtx>,
    pub engine: Arc<crate::sync::Engine>,
    /// The address actually listened on.
    pub addr: std::net::SocketAddr,
    listener: tokio::net::TcpListener,
    sock: PathBuf,
    _watcher: Option<crate::sync::watch::Watcher>,
    _instance: InstanceLock,
}

impl Daemon {
    /// Take the instance lock, bind the listener, start the engine and the control socket.
    pub async fn start(
        b: &BoxDir,
        listen: Option<String>,
        rescan_secs: u64,
        on_demand: bool,
    ) -> anyhow::Result<Daemon> {
        let instance = lock_instance(b)?;
        limit_malloc_arenas();
        let cfg = b.load_config()?;
        let addr = listen.unwrap_or(cfg.listen.clone());
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("listening on {addr}"))?;
        let local = Arc::new(crate::query::LocalBox::open(b.clone())?);
        let ctx = crate::server::ServerCtx::new(local, crate::locks::LockManager::new())?;
        let (engine, watcher) = crate::sync::Engine::start_with(
            ctx.clone(),
            Duration::from_secs(rescan_secs.max(1)),
            on_demand,
        )
        .await?;
        let actual = listener.local_addr()?;

        let sock = b.control_socket();
        let _ = std::fs::remove_file(&sock); // stale: we hold the instance lock
        let control = tokio::net::UnixListener::bind(&sock)
            .with_context(|| format!("control socket {}", sock.display()))?;
        tokio::spawn(control_loop(control, engine.clone()));
        tracing::info!(
            "daemon for {} as {} on {actual}",
            b.root.display(),
            ctx.ident.id.short_str()
        );
        Ok(Daemon {
            ctx,
            engine,
            addr: actual,
            listener,
            sock,
            _watcher: watcher,
            _instance: instance,
        })
    }

    /// Serve peers until `shutdown` completes, then stop the engine and remove the control
    /// socket (the instance lock is released when this returns).
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Daemon {
            ctx,
            engine,
            listener,
            sock,
            _watcher,
            _instance,
            ..
        } = self;
        crate::server::run_listener(ctx, listener, shutdown).await?;
        tracing::info!("stopping");
        engine.stop().await;
        let _ = std::fs::remove_file(&sock);
        tracing::info!("stopped");
        Ok(())
    }
}

pub async fn run(b: &BoxDir, listen: Option<String>, rescan_secs: u64) -> anyhow::Result<()> {
    let d = Daemon::start(b, listen, rescan_secs, false).await?;
    println!(
        "mybox {} serving {} on {}",
        d.ctx.ident.id,
        b.root.display(),
        d.addr
    );
    let _ = std::io::stdout().flush();
    d.serve(crate::cli::shutdown_signal()).await?;
    exit_soon();
    Ok(())
}

/// Leaving the runtime waits for blocking work (hashing a huge file, say); everything on disk is
/// already consistent (temp files are cleared on the next start), so do not hang on it.
pub fn exit_soon() {
    std::thread::spawn(|| {
        std::thread::sleep(Duration::from_secs(10));
        std::process::exit(0);
    });
}

async fn control_loop(l: tokio::net::UnixListener, engine: Arc<crate::sync::Engine>) {
    loop {
        let Ok((stream, _)) = l.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let engine = engine.clone();
        tokio::spawn(async move {
            let (rd, mut wr) = stream.into_split();
            let mut lines = tokio::io::BufReader::new(rd).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let req: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                let answer = match req.get("cmd").and_then(|c| c.as_str()) {
                    Some("status") => match req.get("wait_ms").and_then(|w| w.as_u64()) {
                        Some(ms) => engine.status_when_synced(Duration::from_millis(ms)).await,
                        None => engine.status().await,
                    },
                    _ => serde_json::json!({"error": "unknown command (try {\"cmd\":\"status\"})"}),
                };
                let mut text = answer.to_string();
                text.push('\n');
                if wr.write_all(text.as_bytes()).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// `mybox status`: ask the running daemon.
pub fn status(b: &BoxDir, json: bool, wait: Option<Duration>) -> anyhow::Result<()> {
    let sock = b.control_socket();
    let mut s = std::os::unix::net::UnixStream::connect(&sock).map_err(|_| {
        anyhow::anyhow!(
            "no mybox daemon is running for {} (start one with `mybox daemon`)",
            b.root.display()
        )
    })?;
    let wait = wait.map(|w| w.min(crate::sync::engine::MAX_STATUS_WAIT));
    let request = match wait {
        Some(w) => {
            s.set_read_timeout(Some(w + Duration::from_secs(30)))?;
            format!("{{\"cmd\":\"status\",\"wait_ms\":{}}}\n", w.as_millis())
        }
        None => {
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            "{\"cmd\":\"status\"}\n".to_string()
        }
    };
    s.write_all(request.as_bytes())?;
    let mut line = String::new();
    BufReader::new(&s)
        .read_line(&mut line)
        .context("reading the daemon's answer")?;
    let v: serde_json::Value =
        serde_json::from_str(&line).context("the daemon's answer is not JSON")?;
    let not_synced = wait.is_some() && v["synced"].as_bool() != Some(true);
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        if not_synced {
            anyhow::bail!("not in sync after {:?}", wait.unwrap_or_default());
        }
        return Ok(());
    }
    let s = |v: &serde_json::Value| v.as_str().unwrap_or("").to_string();
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    let size = |b: u64| humansize::format_size(b, humansize::BINARY);
    println!("daemon running for {} as {}", s(&v["box"]), s(&v["device"]));
    if let Some(peers) = v["peers"].as_array() {
        if peers.is_empty() {
            println!("no peers pinned (mybox peer add ID HOST:PORT)");
        }
        for p in peers {
            println!(
                "peer {} {:<22} {:<13} to pull: {} files, {}   to push: {} files, {}",
                s(&p["short"]),
                s(&p["addr"]),
                if p["connected"].as_bool() == Some(true) {
                    "connected"
                } else {
                    "not connected"
                },
                n(&p["to_pull_files"]),
                size(n(&p["to_pull_bytes"])),
                n(&p["to_push_files"]),
                size(n(&p["to_push_bytes"])),
            );
            if p["connected"].as_bool() != Some(true) {
                if let Some(e) = p["last_error"].as_str() {
                    println!("     last error: {e}");
                }
            }
        }
    }
    // On-demand mounts: files left on the peers by design, not pending work.
    if let Some(files) = v["online_only_files"].as_u64().filter(|&f| f > 0) {
        println!(
            "online-only: {} files, {} (fetched when read)",
            files,
            size(n(&v["online_only_bytes"]))
        );
    }
    // Large files are synced on their SHA-256; the MD5 the query commands show follows.
    if let Some(files) = v["md5_pending_files"].as_u64().filter(|&f| f > 0) {
        println!(
            "MD5 still to compute: {} files, {}",
            files,
            size(n(&v["md5_pending_bytes"]))
        );
    }
    println!("conflicts: {}", n(&v["conflicts"]));
    match v["last_error"].as_str() {
        Some(e) => println!("last error: {e} (at {})", s(&v["last_error_at"])),
        None => println!("last error: none"),
    }
    if not_synced {
        anyhow::bail!("not in sync after {:?}", wait.unwrap_or_default());
    }
    Ok(())
}
