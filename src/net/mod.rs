//! Networking: TLS connections between boxes ([`tls`]), the request/response multiplexer on top
//! ([`rpc`]), and dialling/accepting helpers.

pub mod rpc;
pub mod tls;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, Context};
use tokio::net::TcpStream;

use crate::config::BoxDir;
use crate::identity::{DeviceId, Identity};
use crate::protocol::{Request, Response, PROTOCOL_VERSION};
use rpc::{Conn, Handler, PeerInfo};
use tls::{FixedPeers, PeerSet};

/// TCP connect plus TLS handshake must finish within this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const EXPORTER_LABEL: &[u8] = b"EXPORTER-mybox-udp";

/// The peers pinned in a box's config, re-read when the file changes (so `mybox peer add`
/// takes effect on a running server without a restart).
#[derive(Debug)]
pub struct ConfigPeers {
    b: BoxDir,
    cache: Mutex<(Option<SystemTime>, Vec<DeviceId>)>,
}

impl ConfigPeers {
    pub fn new(b: BoxDir) -> Arc<Self> {
        Arc::new(ConfigPeers {
            b,
            cache: Mutex::new((None, Vec::new())),
        })
    }

    pub fn current(&self) -> Vec<DeviceId> {
        let mtime = std::fs::metadata(self.b.config_path())
            .and_then(|m| m.modified())
            .ok();
        let Ok(mut cache) = self.cache.lock() else {
            return Vec::new();
        };
        if cache.0 != mtime || cache.0.is_none() {
            match self.b.load_config() {
                Ok(cfg) => *cache = (mtime, cfg.peer_ids()),
                Err(e) => tracing::warn!("cannot reload peers: {e:#}"),
            }
        }
        cache.1.clone()
    }
}

impl PeerSet for ConfigPeers {
    fn is_pinned(&self, id: &DeviceId) -> bool {
        self.current().contains(id)
    }
}

/// Dial `addr`, require the server to be `expect`, and say hello.
pub async fn connect(
    ident: &Identity,
    addr: &str,
    expect: DeviceId,
    handler: Arc<dyn Handler>,
) -> anyhow::Result<(Conn, tokio::task::JoinHandle<()>)> {
    let cfg = tls::client_config(ident, Arc::new(FixedPeers(vec![expect])))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let fut = async {
        let tcp = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        tcp.set_nodelay(true)?;
        let peer_addr = tcp.peer_addr()?;
        let name = rustls::pki_types::ServerName::try_from("mybox").map_err(|e| anyhow!("{e}"))?;
        let tls = connector.connect(name, tcp).await.map_err(|e| {
            anyhow!("TLS handshake with {addr} failed: {e} (is this box paired on the peer, and is {} the peer's ID?)", expect.short_str())
        })?;
        let (_, session) = tls.get_ref();
        let got = tls::peer_id_of(session.peer_certificates())
            .ok_or_else(|| anyhow!("peer at {addr} presented no certificate"))?;
        if got != expect {
            anyhow::bail!("peer at {addr} is {got}, expected {expect}");
        }
        let mut exporter = [0u8; 64];
        session
            .export_keying_material(&mut exporter, EXPORTER_LABEL, None)
            .map_err(|e| anyhow!("TLS exporter: {e}"))?;
        Ok::<_, anyhow::Error>((
            tokio_rustls::TlsStream::Client(tls),
            PeerInfo {
                id: got,
                addr: peer_addr,
                exporter,
            },
        ))
    };
    let (stream, info) = tokio::time::timeout(HANDSHAKE_TIMEOUT, fut)
        .await
        .map_err(|_| {
            anyhow!(
                "connecting to {addr}: no answer within {}s",
                HANDSHAKE_TIMEOUT.as_secs()
            )
        })??;
    let (conn, task) = rpc::spawn(stream, info, handler);
    if let Err(e) = hello(&conn).await {
        // In TLS 1.3 the server checks our certificate after the client thinks the handshake is
        // done, so a refusal shows up as the connection closing on the first request.
        if conn.is_closed() {
            anyhow::bail!(
                "the peer at {addr} closed the connection during the handshake: this box ({}) is \
                 probably not paired there (on the peer: mybox peer add {} ADDR)",
                ident.id.short_str(),
                ident.id
            );
        }
        return Err(e);
    }
    Ok((conn, task))
}

async fn hello(conn: &Conn) -> anyhow::Result<()> {
    let resp = conn
        .call(Request::Hello {
            version: PROTOCOL_VERSION,
            agent: agent(),
        })
        .await
        .context("protocol hello")?;
    match resp {
        Response::Hello { version, .. } if version == PROTOCOL_VERSION => Ok(()),
        Response::Hello { version, agent } => {
            anyhow::bail!(
                "peer speaks protocol {version} ({}); this box speaks {PROTOCOL_VERSION}",
                clip(&agent)
            )
        }
        other => anyhow::bail!("unexpected hello answer: {}", clip(&format!("{other:?}"))),
    }
}

/// Peer-supplied text for a log line or an error: escaped (no terminal control sequences) and
/// cut short, so a hostile peer cannot flood the logs with a 16 MiB string.
pub fn clip(s: &str) -> String {
    const MAX: usize = 200;
    let mut out: String = s
        .chars()
        .take(MAX)
        .collect::<String>()
        .escape_debug()
        .to_string();
    if s.chars().nth(MAX).is_some() {
        out.push_str(&format!("... ({} bytes)", s.len()));
    }
    out
}

pub fn agent() -> String {
    format!("mybox {}", env!("CARGO_PKG_VERSION"))
}

/// Finish the server side of a handshake on an accepted socket.
pub async fn accept(
    acceptor: &tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    peer_addr: SocketAddr,
    handler: Arc<dyn Handler>,
) -> anyhow::Result<(Conn, tokio::task::JoinHandle<()>)> {
    tcp.set_nodelay(true)?;
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
        .await
        .map_err(|_| anyhow!("handshake from {peer_addr} timed out"))?
        .map_err(|e| anyhow!("handshake from {peer_addr} failed: {e}"))?;
    let (_, session) = tls.get_ref();
    let id = tls::peer_id_of(session.peer_certificates())
        .ok_or_else(|| anyhow!("client at {peer_addr} presented no certificate"))?;
    let mut exporter = [0u8; 64];
    session
        .export_keying_material(&mut exporter, EXPORTER_LABEL, None)
        .map_err(|e| anyhow!("TLS exporter: {e}"))?;
    let info = PeerInfo {
        id,
        addr: peer_addr,
        exporter,
    };
    Ok(rpc::spawn(
        tokio_rustls::TlsStream::Server(tls),
        info,
        handler,
    ))
}
