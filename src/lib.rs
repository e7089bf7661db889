//! mybox keeps a folder in sync between boxes and answers questions about a peer's files.
//!
//! Map of the modules (one direction of dependency, top to bottom):
//! - [`cli`]: clap commands, output (tables, `--json`, progress), the interactive shell.
//! - [`client`]: opening a connection to a peer (or to this box itself for `--local`) and the
//!   query and download calls made over it.
//! - [`server`]: the accept loop and the request handler of a box; [`sync`] and [`udp`] plug
//!   their requests into it.
//! - [`net`]: mutual TLS with pinned device IDs ([`net::tls`]) and the request multiplexer
//!   ([`net::rpc`]).
//! - [`protocol`]: wire messages and framing (length-prefixed bincode with a hard cap).
//! - [`query`]: answers to the seven commands from a box's own index and store.
//! - [`scan`], [`hashing`], [`index`]: walking the store, hashing (MD5, SHA-256, blocks), and the
//!   SQLite index with its hash cache.
//! - [`locks`]: per-file locks shared by senders, the sync applier and FUSE writers.
//! - [`paths`]: the one validation of every untrusted path.
//! - [`vfs`]: the mounted namespace as a plain API (testable without a kernel); [`fuse`] is the
//!   thin fuser adapter over it and [`mount`] mounts, unmounts and clears stale mounts.
//! - [`identity`], [`config`], [`history`], [`timeparse`], [`model`]: the box on disk, device
//!   IDs, the request log, time parsing, and the plain data types.

pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
pub mod fuse;
pub mod hashing;
pub mod history;
pub mod identity;
pub mod index;
pub mod locks;
pub mod model;
pub mod mount;
pub mod net;
pub mod paths;
pub mod protocol;
pub mod query;
pub mod scan;
pub mod server;
pub mod sync;
pub mod timeparse;
pub mod udp;
pub mod vfs;
