//! UDP bulk transfer (issue 4).

pub mod proto;

use std::sync::Arc;

use crate::net::rpc::{Conn, Responder};
use crate::protocol::ErrorCode;
use crate::server::ServerCtx;

pub async fn serve(
    ctx: &Arc<ServerCtx>,
    _conn: &Conn,
    _req: proto::UdpRequest,
    out: Responder,
) -> String {
    let _ = ctx;
    let _ = out.error(ErrorCode::Unsupported, "udp not available").await;
    "unsupported".into()
}

/// `download udp`.
pub async fn download(
    _s: &crate::client::Session,
    _path: &crate::paths::RelPath,
    _dest: &std::path::Path,
    _progress: Option<crate::client::Progress>,
) -> anyhow::Result<crate::client::Downloaded> {
    anyhow::bail!("udp download is not available yet")
}
