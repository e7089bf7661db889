//! Continuous two-way sync (issue 3). Placeholder wiring until the engine lands: a box that runs
//! no engine answers sync requests with `Unsupported`.

pub mod proto;

use std::sync::Arc;

use crate::net::rpc::{Conn, Responder};
use crate::protocol::ErrorCode;
use crate::server::ServerCtx;

/// The sync engine of a running daemon.
pub struct Engine;

impl Engine {
    pub fn on_incoming(&self, _conn: Conn) {}
}

pub async fn serve(
    ctx: &Arc<ServerCtx>,
    _conn: &Conn,
    _req: proto::SyncRequest,
    out: Responder,
) -> String {
    let _ = ctx;
    let _ = out
        .error(
            ErrorCode::Unsupported,
            "this box is not running the sync engine (mybox daemon)",
        )
        .await;
    "unsupported".into()
}
