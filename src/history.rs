//! `.mybox/history.log`: one line per request a box served or made (time, peer, request,
//! outcome), as the assignment asks. Appends are single `write` calls on an O_APPEND file, so
//! lines from concurrent processes never interleave.

use std::io::Write;
use std::path::PathBuf;

use crate::config::BoxDir;

#[derive(Clone, Debug)]
pub struct History {
    path: PathBuf,
}

#[derive(Clone, Copy, Debug)]
pub enum Direction {
    Served,
    Made,
}

impl History {
    pub fn new(b: &BoxDir) -> Self {
        History {
            path: b.history_path(),
        }
    }

    pub fn record(&self, dir: Direction, peer: &str, request: &str, outcome: &str) {
        let line = format!(
            "{}\t{}\tpeer={}\t{}\t{}\n",
            chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            match dir {
                Direction::Served => "served",
                Direction::Made => "made",
            },
            peer,
            request.replace(['\n', '\t'], " "),
            outcome.replace(['\n', '\t'], " "),
        );
        let res = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = res {
            tracing::warn!("cannot append to {}: {e}", self.path.display());
        }
    }
}
