//! inotify (through the `notify` crate) as a change source: every event under the store becomes
//! a path for the scanner, which debounces them (~30 ms) and scans just those subtrees.

use std::path::{Path, PathBuf};

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc::UnboundedSender;

use crate::paths::RelPath;

/// Watch `root` recursively; keep the returned watcher alive for as long as events are wanted.
pub fn start(
    root: &Path,
    tx: UnboundedSender<RelPath>,
) -> notify::Result<notify::RecommendedWatcher> {
    let base: PathBuf = root.to_path_buf();
    let mut w = notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
        Ok(ev) => {
            if matches!(ev.kind, notify::EventKind::Access(_)) {
                return;
            }
            for p in ev.paths {
                let Ok(rel) = p.strip_prefix(&base) else {
                    continue;
                };
                // `.mybox/` (index, temp files, logs) is refused by the parser: never a change.
                if let Ok(rel) = RelPath::from_fs(rel) {
                    let _ = tx.send(rel);
                }
            }
        }
        Err(e) => {
            tracing::warn!("file watcher: {e}; the periodic rescan still catches changes");
            // An overflow loses events: ask for a full scan.
            let _ = tx.send(RelPath::root());
        }
    })?;
    w.watch(root, RecursiveMode::Recursive)?;
    Ok(w)
}
