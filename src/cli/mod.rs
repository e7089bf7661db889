//! The `mybox` command line: clap definitions, and running each command.

pub mod output;
pub mod shell;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use clap::{Parser, Subcommand, ValueEnum};

use crate::client::{self, Session};
use crate::config::{self, BoxDir, PeerConfig};
use crate::identity::DeviceId;
use crate::paths::RelPath;
use crate::protocol::ListFilter;

#[derive(Parser, Debug)]
#[command(
    name = "mybox",
    version,
    about = "Keep a folder in sync between boxes; ask a peer about its files"
)]
pub struct Cli {
    /// The box to use (else $MYBOX_BOX, else the folder above the current one holding .mybox/).
    #[arg(long = "box", global = true, env = "MYBOX_BOX", value_name = "DIR")]
    pub box_dir: Option<PathBuf>,
    /// Print one JSON document instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    /// Answer about this box itself instead of its peer.
    #[arg(long, global = true)]
    pub local: bool,
    /// Which peer to ask when several are paired (device ID).
    #[arg(long, global = true, value_name = "ID")]
    pub peer: Option<String>,
    /// More log output on stderr (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create a box in DIR (existing files are kept) and print its device ID.
    Init { dir: PathBuf },
    /// Print this box's device ID.
    Id,
    /// Pin, list or unpin peers.
    #[command(subcommand)]
    Peer(PeerCmd),
    /// Serve this box to its peers in the foreground.
    Serve {
        /// Address to listen on (default: the config's `listen`).
        #[arg(long, value_name = "ADDR")]
        listen: Option<String>,
    },
    /// List the peer's files.
    #[command(subcommand)]
    Index(IndexCmd),
    /// Hashes of the peer's files.
    #[command(subcommand)]
    Hash(HashCmd),
    /// Fetch a file from the peer.
    Download {
        /// tcp or udp.
        #[arg(ignore_case = true)]
        transport: TransportArg,
        /// Path of the file in the peer's box.
        file: String,
        /// Where to write it (default: the file's name in the current directory).
        #[arg(short = 'o', long = "output", value_name = "PATH")]
        output: Option<PathBuf>,
    },
    /// Interactive prompt (reads commands line by line when stdin is not a terminal).
    Shell,
    /// Mount the box's namespace at MOUNTPOINT through FUSE, in the foreground.
    Mount {
        mountpoint: PathBuf,
        /// Address to serve peers on while mounted (the mount then runs the sync daemon too).
        #[arg(long, value_name = "ADDR")]
        listen: Option<String>,
        /// Pull file content only when read (placeholders until then); default: mirror.
        #[arg(long)]
        on_demand: bool,
        /// Seconds between full rescans when syncing (a safety net under inotify).
        #[arg(long, value_name = "SECS", default_value_t = 60)]
        rescan_interval: u64,
    },
    /// Unmount a mybox mount (also clears one left behind by a dead mount process).
    Umount { mountpoint: PathBuf },
    /// Serve this box and keep it in sync with its peers, in the foreground.
    Daemon {
        /// Address to listen on (default: the config's `listen`).
        #[arg(long, value_name = "ADDR")]
        listen: Option<String>,
        /// Seconds between full rescans (a safety net under inotify).
        #[arg(long, value_name = "SECS", default_value_t = 60)]
        rescan_interval: u64,
    },
    /// What the running daemon is doing: peers, what is left to sync, conflicts, last error.
    Status {
        /// Wait until this box is in sync (a peer connected, its index received, nothing left
        /// to pull), at most SECS seconds; exits non-zero if it is not by then.
        #[arg(long, value_name = "SECS", num_args = 0..=1, default_missing_value = "3600")]
        wait: Option<u64>,
    },
}

#[derive(Subcommand, Debug)]
pub enum PeerCmd {
    /// Pin a peer: its device ID and where it listens (host:port).
    Add { id: String, addr: String },
    /// List pinned peers.
    List,
    /// Unpin a peer.
    Remove { id: String },
}

#[derive(Subcommand, Debug)]
pub enum IndexCmd {
    /// Every file, directory and link with size, mtime, mode and type.
    Longlist,
    /// Entries whose mtime is within [START, END] (RFC 3339, YYYY-MM-DD, "YYYY-MM-DD HH:MM:SS", @SECONDS).
    Shortlist { start: String, end: String },
    /// Entries whose path matches PATTERN.
    Regex { pattern: String },
}

#[derive(Subcommand, Debug)]
pub enum HashCmd {
    /// MD5, SHA-256 and mtime of one file.
    Verify { file: String },
    /// The same for every file.
    Checkall,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransportArg {
    Tcp,
    Udp,
}

/// Entry point: run, print a one-line error on failure, return the exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return code;
        }
    };
    if matches!(cli.command, Command::Daemon { .. } | Command::Mount { .. }) {
        crate::daemon::init_logging(cli.box_dir.as_ref(), cli.verbose);
    } else {
        init_logging(cli.verbose, matches!(cli.command, Command::Serve { .. }));
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mybox: error: cannot start runtime: {e}");
            return 1;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("mybox: error: {}", one_line(&e));
            1
        }
    }
}

/// An error chain on one line.
pub fn one_line(e: &anyhow::Error) -> String {
    format!("{e:#}").replace('\n', " ")
}

fn init_logging(verbose: u8, serving: bool) {
    let default = match (verbose, serving) {
        (0, false) => "error",
        (0, true) => "info",
        (1, _) => "info,mybox=debug",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("MYBOX_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(stderr_is_terminal())
        .with_target(false)
        .try_init();
}

pub fn find_box(cli_box: Option<&PathBuf>) -> anyhow::Result<BoxDir> {
    let cwd = std::env::current_dir().context("current directory")?;
    BoxDir::discover(cli_box.map(|p| p.as_path()), &cwd)
}

/// Options every query shares.
pub struct QueryOpts {
    pub json: bool,
    pub local: bool,
    pub peer: Option<String>,
}

pub async fn run(cli: Cli) -> anyhow::Result<()> {
    let opts = QueryOpts {
        json: cli.json,
        local: cli.local,
        peer: cli.peer.clone(),
    };
    match cli.command {
        Command::Init { dir } => {
            let (b, ident) = BoxDir::init(&dir)?;
            if cli.json {
                println!(
                    "{}",
                    serde_json::json!({"box": b.root, "id": ident.id.to_string()})
                );
            } else {
                println!("{}", ident.id);
                eprintln!(
                    "created box {} (pair it on the peer with: mybox peer add {} HOST:PORT)",
                    b.root.display(),
                    ident.id
                );
            }
            Ok(())
        }
        Command::Id => {
            let b = find_box(cli.box_dir.as_ref())?;
            println!("{}", b.identity()?.id);
            Ok(())
        }
        Command::Peer(p) => peer_cmd(&find_box(cli.box_dir.as_ref())?, p, cli.json),
        Command::Serve { listen } => serve(&find_box(cli.box_dir.as_ref())?, listen).await,
        Command::Shell => {
            let b = find_box(cli.box_dir.as_ref())?;
            shell::run(b, opts).await
        }
        Command::Mount {
            mountpoint,
            listen,
            on_demand,
            rescan_interval,
        } => {
            let b = find_box(cli.box_dir.as_ref())?;
            let daemon = crate::mount::wants_daemon(&b, &listen, on_demand)
                .then_some((listen, rescan_interval));
            crate::mount::run_foreground(b, mountpoint, daemon, on_demand).await
        }
        Command::Umount { mountpoint } => crate::mount::umount(&mountpoint),
        Command::Daemon {
            listen,
            rescan_interval,
        } => crate::daemon::run(&find_box(cli.box_dir.as_ref())?, listen, rescan_interval).await,
        Command::Status { wait } => crate::daemon::status(
            &find_box(cli.box_dir.as_ref())?,
            cli.json,
            wait.map(std::time::Duration::from_secs),
        ),
        cmd @ (Command::Index(_) | Command::Hash(_) | Command::Download { .. }) => {
            let b = find_box(cli.box_dir.as_ref())?;
            let session = open_session(&b, &opts).await?;
            run_query(&session, cmd, &opts).await
        }
    }
}

pub async fn open_session(b: &BoxDir, opts: &QueryOpts) -> anyhow::Result<Session> {
    if opts.local {
        Session::local(b).await
    } else {
        Session::remote(b, opts.peer.as_deref()).await
    }
}

/// Run one query command on an open session (shared by the command line and the shell).
pub async fn run_query(s: &Session, cmd: Command, opts: &QueryOpts) -> anyhow::Result<()> {
    match cmd {
        Command::Index(IndexCmd::Longlist) => {
            let e = s.list(ListFilter::All, "index longlist").await?;
            output::print_entries(&e, opts.json, false)
        }
        Command::Index(IndexCmd::Shortlist { start, end }) => {
            let (start_ns, end_ns) = crate::timeparse::parse_range(&start, &end)?;
            let e = s
                .list(
                    ListFilter::MtimeRange { start_ns, end_ns },
                    &format!("index shortlist {start} {end}"),
                )
                .await?;
            output::print_entries(&e, opts.json, false)
        }
        Command::Index(IndexCmd::Regex { pattern }) => {
            // Checked here too so a bad pattern never leaves the box.
            crate::query::compile_regex(&pattern).map_err(|e| anyhow!(e.message))?;
            let e = s
                .list(
                    ListFilter::Regex(pattern.clone()),
                    &format!("index regex {pattern}"),
                )
                .await?;
            output::print_entries(&e, opts.json, false)
        }
        Command::Hash(HashCmd::Verify { file }) => {
            let p = RelPath::parse(&file).map_err(|e| anyhow!("{file:?}: {e}"))?;
            let e = s
                .hash(ListFilter::Path(p), &format!("hash verify {file}"))
                .await?;
            output::print_entries(&e, opts.json, true)
        }
        Command::Hash(HashCmd::Checkall) => {
            let e = s.hash(ListFilter::All, "hash checkall").await?;
            output::print_entries(&e, opts.json, true)
        }
        Command::Download {
            transport,
            file,
            output: out,
        } => {
            let p = RelPath::parse(&file).map_err(|e| anyhow!("{file:?}: {e}"))?;
            let dest = match out {
                Some(o) if o.is_dir() => o.join(p.file_name()),
                Some(o) => o,
                None => PathBuf::from(p.file_name()),
            };
            let bar = output::progress_bar(&file);
            let progress: Option<client::Progress> = bar.clone().map(|b| {
                Arc::new(move |done: u64, total: u64| {
                    b.set_length(total);
                    b.set_position(done);
                }) as client::Progress
            });
            let res = match transport {
                TransportArg::Tcp => client::download_tcp(s, &p, &dest, progress).await,
                TransportArg::Udp => crate::udp::download(s, &p, &dest, progress).await,
            };
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            let d = res?;
            output::print_download(&d, opts.json)
        }
        other => bail!("not a query command: {other:?}"),
    }
}

fn peer_cmd(b: &BoxDir, cmd: PeerCmd, json: bool) -> anyhow::Result<()> {
    let mut cfg = b.load_config()?;
    match cmd {
        PeerCmd::Add { id, addr } => {
            let id: DeviceId = id
                .parse()
                .map_err(|e| anyhow!("malformed device ID {id:?}: {e}"))?;
            config::validate_addr(&addr)?;
            if id == b.identity()?.id {
                bail!("that is this box's own ID; pair the other box's ID (run `mybox id` there)");
            }
            cfg.peers
                .retain(|p| p.id.parse::<DeviceId>().ok() != Some(id));
            cfg.peers.push(PeerConfig {
                id: id.to_string(),
                addr: addr.clone(),
            });
            b.save_config(&cfg)?;
            eprintln!("paired {} at {addr}", id.short_str());
        }
        PeerCmd::Remove { id } => {
            let id: DeviceId = id
                .parse()
                .map_err(|e| anyhow!("malformed device ID {id:?}: {e}"))?;
            let before = cfg.peers.len();
            cfg.peers
                .retain(|p| p.id.parse::<DeviceId>().ok() != Some(id));
            if cfg.peers.len() == before {
                bail!("peer {} is not paired", id.short_str());
            }
            b.save_config(&cfg)?;
            eprintln!("unpaired {}", id.short_str());
        }
        PeerCmd::List => {
            if json {
                let v: Vec<_> = cfg
                    .peers
                    .iter()
                    .map(|p| serde_json::json!({"id": p.id, "addr": p.addr}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                for p in &cfg.peers {
                    println!("{}  {}", p.id, p.addr);
                }
            }
        }
    }
    Ok(())
}

async fn serve(b: &BoxDir, listen: Option<String>) -> anyhow::Result<()> {
    let cfg = b.load_config()?;
    let addr = listen.unwrap_or(cfg.listen.clone());
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .with_context(|| format!("listening on {addr}"))?;
    let local = Arc::new(crate::query::LocalBox::open(b.clone())?);
    let ctx = crate::server::ServerCtx::new(local, crate::locks::LockManager::new())?;
    let actual = listener.local_addr()?;
    println!(
        "mybox {} serving {} on {}",
        ctx.ident.id,
        b.root.display(),
        actual
    );
    use std::io::Write;
    let _ = std::io::stdout().flush();
    tracing::info!(
        "serving {} as {} on {actual}",
        b.root.display(),
        ctx.ident.id.short_str()
    );
    crate::server::run_listener(ctx, listener, shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => {},
                _ = i.recv() => {},
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

pub fn stderr_is_terminal() -> bool {
    std::io::stderr().is_terminal()
}
