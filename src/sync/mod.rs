//! Continuous two-way sync (issue 3), Syncthing-style: every box keeps its own index with version
//! vectors and sequence numbers, pulls its peers' indexes incrementally, and pulls the content it
//! lacks block by block, reusing local blocks with the same hash.
//!
//! - [`proto`]: the wire messages.
//! - [`planner`]: the pure decision (what to do about one path), property-tested.
//! - [`apply`]: the file system side (temp file, fsync, checked rename, index record).
//! - [`store`]: the engine's tables (peers' indexes, cursors, local block locations).
//! - [`engine`]: sessions, scanner loop, puller; [`watch`]: inotify.

pub mod apply;
pub mod engine;
pub mod planner;
pub mod proto;
pub mod store;
pub mod watch;

use std::sync::Arc;

pub use engine::Engine;

use crate::net::rpc::{Conn, Responder};
use crate::protocol::ErrorCode;
use crate::server::ServerCtx;

/// Answer a peer's sync request (a box that runs no engine refuses them).
pub async fn serve(
    ctx: &Arc<ServerCtx>,
    conn: &Conn,
    req: proto::SyncRequest,
    out: Responder,
) -> String {
    match ctx.sync.get() {
        Some(engine) => engine.serve(conn, req, out).await,
        None => {
            let _ = out
                .error(
                    ErrorCode::Unsupported,
                    "this box is not running the sync engine (mybox daemon)",
                )
                .await;
            "unsupported".into()
        }
    }
}
