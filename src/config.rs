//! A box on disk: the store directory, its `.mybox/` metadata folder, and the config file in it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use crate::identity::{DeviceId, Identity};
use crate::paths::META_DIR;

/// Listen address used when neither `--listen` nor the config says otherwise.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:22100";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    #[default]
    Tcp,
    Udp,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeerConfig {
    /// Printed device ID (validated on load).
    pub id: String,
    /// host:port where the peer listens.
    pub addr: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Config {
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Bulk data path for sync ("tcp" or "udp").
    #[serde(default)]
    pub transport: Transport,
    /// UDP datagram payload in bytes; 1200 keeps clear of fragmentation on real links.
    #[serde(default = "default_udp_payload")]
    pub udp_payload: usize,
    #[serde(default, rename = "peer")]
    pub peers: Vec<PeerConfig>,
}

fn default_listen() -> String {
    DEFAULT_LISTEN.to_string()
}

fn default_udp_payload() -> usize {
    1200
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: default_listen(),
            transport: Transport::Tcp,
            udp_payload: default_udp_payload(),
            peers: Vec::new(),
        }
    }
}

/// A box: the store directory and everything kept in its `.mybox/`.
#[derive(Clone, Debug)]
pub struct BoxDir {
    pub root: PathBuf,
}

impl BoxDir {
    pub fn meta(&self) -> PathBuf {
        self.root.join(META_DIR)
    }
    pub fn config_path(&self) -> PathBuf {
        self.meta().join("config.toml")
    }
    pub fn cert_path(&self) -> PathBuf {
        self.meta().join("cert.pem")
    }
    pub fn key_path(&self) -> PathBuf {
        self.meta().join("key.pem")
    }
    pub fn index_path(&self) -> PathBuf {
        self.meta().join("index.db")
    }
    pub fn history_path(&self) -> PathBuf {
        self.meta().join("history.log")
    }
    /// Where partial downloads and received files are staged before their rename.
    pub fn tmp_dir(&self) -> PathBuf {
        self.meta().join("tmp")
    }
    pub fn control_socket(&self) -> PathBuf {
        self.meta().join("control.sock")
    }

    /// Create a box at `root` (the folder may exist and hold files; they are kept).
    pub fn init(root: &Path) -> anyhow::Result<(BoxDir, Identity)> {
        std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
        let root = root
            .canonicalize()
            .with_context(|| format!("resolving {}", root.display()))?;
        let b = BoxDir { root };
        if b.cert_path().exists() || b.key_path().exists() {
            bail!(
                "{} already holds a box identity (device {}); refusing to overwrite it",
                b.root.display(),
                Identity::load(&b.cert_path(), &b.key_path())
                    .map(|i| i.id.to_string())
                    .unwrap_or_else(|_| "unreadable".into())
            );
        }
        std::fs::create_dir_all(b.meta())?;
        std::fs::create_dir_all(b.tmp_dir())?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(b.meta(), std::fs::Permissions::from_mode(0o700))?;
        let ident = Identity::generate()?;
        ident.save(&b.cert_path(), &b.key_path())?;
        if !b.config_path().exists() {
            b.save_config(&Config::default())?;
        }
        // Create the index now so a fresh box is complete on disk.
        crate::index::Index::open(&b)?;
        Ok((b, ident))
    }

    /// Open an existing box at `root`.
    pub fn open(root: &Path) -> anyhow::Result<BoxDir> {
        let root = root
            .canonicalize()
            .with_context(|| format!("no box at {}", root.display()))?;
        let b = BoxDir { root };
        if !b.cert_path().exists() {
            bail!(
                "{} is not a box (no {}/cert.pem); run `mybox init DIR` first",
                b.root.display(),
                META_DIR
            );
        }
        std::fs::create_dir_all(b.tmp_dir())?;
        Ok(b)
    }

    /// Find the box: an explicit dir, else walk up from `start` to a folder holding `.mybox/`.
    pub fn discover(explicit: Option<&Path>, start: &Path) -> anyhow::Result<BoxDir> {
        if let Some(p) = explicit {
            return BoxDir::open(p);
        }
        let mut cur = Some(start);
        while let Some(dir) = cur {
            if dir.join(META_DIR).join("cert.pem").exists() {
                return BoxDir::open(dir);
            }
            // Inside a mybox mount: its virtual `.mybox/mount` names the store.
            if let Ok(store) = std::fs::read_to_string(dir.join(META_DIR).join("mount")) {
                return BoxDir::open(Path::new(store.trim_end_matches('\n')));
            }
            cur = dir.parent();
        }
        bail!(
            "no box found from {} upwards; pass --box DIR, set MYBOX_BOX, or run `mybox init DIR`",
            start.display()
        )
    }

    pub fn identity(&self) -> anyhow::Result<Identity> {
        Identity::load(&self.cert_path(), &self.key_path())
    }

    pub fn load_config(&self) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(self.config_path())
            .with_context(|| format!("reading {}", self.config_path().display()))?;
        let cfg: Config = toml::from_str(&text)
            .with_context(|| format!("parsing {}", self.config_path().display()))?;
        for p in &cfg.peers {
            p.id.parse::<DeviceId>().with_context(|| {
                format!("bad peer id {:?} in {}", p.id, self.config_path().display())
            })?;
        }
        Ok(cfg)
    }

    /// Write the config atomically (temp file + rename), so a crash never leaves half a file.
    pub fn save_config(&self, cfg: &Config) -> anyhow::Result<()> {
        let text = toml::to_string_pretty(cfg)?;
        let tmp = self.meta().join("config.toml.tmp");
        std::fs::write(&tmp, text)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, self.config_path())?;
        Ok(())
    }
}

impl Config {
    /// The pinned peers, parsed.
    pub fn peer_ids(&self) -> Vec<DeviceId> {
        self.peers
            .iter()
            .filter_map(|p| p.id.parse().ok())
            .collect()
    }

    pub fn find_peer(&self, id: &DeviceId) -> Option<&PeerConfig> {
        self.peers
            .iter()
            .find(|p| p.id.parse::<DeviceId>().ok().as_ref() == Some(id))
    }
}

/// Check a `host:port` string (a name is allowed; it is resolved when dialled).
pub fn validate_addr(addr: &str) -> anyhow::Result<()> {
    if addr.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    match addr.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(()),
        _ => bail!("address {addr:?} is not host:port"),
    }
}
