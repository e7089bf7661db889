//! inotify as a change source: every event under the store becomes a path for the scanner, which
//! debounces them (~30 ms) and scans just those subtrees.
//!
//! A watch per directory, as any inotify watcher, but `.mybox/` is never watched: the daemon's own
//! temp files, index and logs there would otherwise raise an event per write (an initial sync
//! wrote ~1,000 block writes plus four events per file into `.mybox/tmp`, all read, parsed and
//! dropped). Opens and reads raise nothing either (no `IN_OPEN`/`IN_ACCESS` in the mask), so
//! serving files to a peer is silent.

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use crate::paths::{RelPath, RootDir, META_DIR};

const MASK: u32 = libc::IN_CREATE
    | libc::IN_DELETE
    | libc::IN_MODIFY
    | libc::IN_CLOSE_WRITE
    | libc::IN_ATTRIB
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_DELETE_SELF
    | libc::IN_ONLYDIR
    | libc::IN_DONT_FOLLOW;

/// How often the watcher thread looks at its stop flag while no event comes.
const POLL_MS: i32 = 250;

/// After a read of events, a pause so that a burst (an initial sync links thousands of files)
/// is read many events at a time rather than one wake-up per event. The scanner debounces
/// for 30 ms anyway.
const COALESCE: Duration = Duration::from_millis(1);

/// How long an announced file of ours may wait for its event (its directory may not be watched
/// yet, so none may come).
const OWN_CREATE_TTL: Duration = Duration::from_secs(5);

/// Announced links kept at most (a bound on memory and on the sweep of expired ones).
const OWN_CREATES_MAX: usize = 4096;

/// Files the sync applier is about to link into the store, announced before the link, so the
/// watcher can drop the one `IN_CREATE` each link raises instead of sending the scanner a path
/// it would stat and look up in the index only to find it as recorded (an initial sync of 2,600
/// files meant 2,600 such lookups while the sync ran). An event is dropped only if the path is
/// still the inode that was linked; anything else done to the path raises events of its own.
#[derive(Default)]
pub struct OwnCreates {
    pending: Mutex<HashMap<RelPath, (u64, Instant)>>,
}

impl OwnCreates {
    /// `path` is about to become inode `ino` (a file of ours).
    pub fn expect(&self, path: &RelPath, ino: u64) {
        let Ok(mut p) = self.pending.lock() else {
            return;
        };
        if p.len() >= OWN_CREATES_MAX {
            p.retain(|_, (_, at)| at.elapsed() < OWN_CREATE_TTL);
            // Still full of young ones (the watcher is behind, or not running): forget them all
            // rather than sweep on every insert. Their events then reach the scanner, which
            // finds those files as recorded.
            if p.len() >= OWN_CREATES_MAX {
                p.clear();
            }
        }
        p.insert(path.clone(), (ino, Instant::now()));
    }

    /// The link did not happen.
    pub fn forget(&self, path: &RelPath) {
        if let Ok(mut p) = self.pending.lock() {
            p.remove(path);
        }
    }

    /// Is this creation of `path` (under the directory `root`) the one announced?
    fn is_own(&self, root: &RootDir, path: &RelPath) -> bool {
        let Some((ino, at)) = self.pending.lock().ok().and_then(|mut p| p.remove(path)) else {
            return false;
        };
        if at.elapsed() >= OWN_CREATE_TTL {
            return false;
        }
        let Ok(rel) = CString::new(path.as_str()) else {
            return false;
        };
        // Looked up from the store's root descriptor: a walk of the relative path only.
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: a valid directory descriptor, a NUL-terminated path and a stat buffer we own.
        let r = unsafe {
            libc::fstatat(
                root.as_raw_fd(),
                rel.as_ptr(),
                st.as_mut_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if r != 0 {
            return false;
        }
        // SAFETY: fstatat succeeded, so it filled the buffer.
        let st = unsafe { st.assume_init() };
        st.st_mode & libc::S_IFMT == libc::S_IFREG && st.st_ino == ino
    }
}

/// Watching a store; dropping it stops the watcher thread (within [`POLL_MS`]).
pub struct Watcher {
    stop: Arc<AtomicBool>,
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The watched directories, by watch descriptor and by path.
struct Watches {
    fd: OwnedFd,
    root: PathBuf,
    /// The store's root, opened once, to look up paths relative to it.
    root_dir: RootDir,
    by_wd: HashMap<i32, RelPath>,
    full_warned: bool,
}

impl Watches {
    /// Watch `dir` and every directory below it (but never `.mybox/`).
    fn add_tree(&mut self, dir: &RelPath) {
        let mut stack = vec![dir.clone()];
        while let Some(d) = stack.pop() {
            if !self.add(&d) {
                continue;
            }
            let full = if d.is_root() {
                self.root.clone()
            } else {
                self.root.join(d.as_str())
            };
            let Ok(rd) = std::fs::read_dir(&full) else {
                continue;
            };
            for ent in rd.flatten() {
                if !ent.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let name = ent.file_name();
                if d.is_root() && name == OsStr::new(META_DIR) {
                    continue;
                }
                let Some(name) = name.to_str() else { continue };
                if let Ok(child) = d.join(name) {
                    stack.push(child);
                }
            }
        }
    }

    fn add(&mut self, dir: &RelPath) -> bool {
        let full = if dir.is_root() {
            self.root.clone()
        } else {
            self.root.join(dir.as_str())
        };
        let Ok(c) = CString::new(full.as_os_str().as_bytes()) else {
            return false;
        };
        // SAFETY: a valid inotify descriptor and a NUL-terminated path.
        let wd = unsafe { libc::inotify_add_watch(self.fd.as_raw_fd(), c.as_ptr(), MASK) };
        if wd < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENOSPC) && !self.full_warned {
                self.full_warned = true;
                tracing::warn!(
                    "file watcher: out of inotify watches (fs.inotify.max_user_watches); \
                     directories past the limit are caught by the periodic rescan"
                );
            }
            return false;
        }
        // The same directory watched again (moved within the store) keeps its descriptor.
        self.by_wd.insert(wd, dir.clone());
        true
    }
}

/// Watch `root` recursively; keep the returned watcher alive for as long as events are wanted.
pub fn start(
    root: &Path,
    tx: UnboundedSender<RelPath>,
    own: Arc<OwnCreates>,
) -> std::io::Result<Watcher> {
    // SAFETY: plain syscall; the descriptor is owned below.
    let raw = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let root_dir = RootDir::open(root)?;
    let mut w = Watches {
        fd,
        root: root.to_path_buf(),
        root_dir,
        by_wd: HashMap::new(),
        full_warned: false,
    };
    if !w.add(&RelPath::root()) {
        return Err(std::io::Error::last_os_error());
    }
    w.add_tree(&RelPath::root());
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    std::thread::Builder::new()
        .name("watcher".into())
        .spawn(move || run(w, tx, flag, own))?;
    Ok(Watcher { stop })
}

fn run(mut w: Watches, tx: UnboundedSender<RelPath>, stop: Arc<AtomicBool>, own: Arc<OwnCreates>) {
    let mut buf = vec![0u8; 64 * 1024];
    let header = std::mem::size_of::<libc::inotify_event>();
    while !stop.load(Ordering::Relaxed) {
        let mut pfd = libc::pollfd {
            fd: w.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, POLL_MS) };
        if r <= 0 {
            continue;
        }
        // SAFETY: reading into a buffer we own, within its length.
        let n = unsafe { libc::read(w.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            continue;
        }
        let n = n as usize;
        let mut off = 0;
        while off + header <= n {
            // SAFETY: the kernel wrote whole events; read_unaligned copes with the byte buffer.
            let ev: libc::inotify_event =
                unsafe { std::ptr::read_unaligned(buf[off..].as_ptr().cast()) };
            let name_end = (off + header + ev.len as usize).min(n);
            let raw_name = &buf[off + header..name_end];
            off = name_end;
            let name = &raw_name[..raw_name
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(raw_name.len())];
            if ev.mask & libc::IN_Q_OVERFLOW != 0 {
                tracing::warn!("file watcher: events lost (queue overflow); rescanning the store");
                let _ = tx.send(RelPath::root());
                continue;
            }
            if ev.mask & libc::IN_IGNORED != 0 {
                w.by_wd.remove(&ev.wd);
                continue;
            }
            let Some(dir) = w.by_wd.get(&ev.wd).cloned() else {
                continue;
            };
            if ev.mask & libc::IN_DELETE_SELF != 0 {
                let _ = tx.send(dir);
                continue;
            }
            if name.is_empty() {
                continue;
            }
            let Some(name) = std::str::from_utf8(name).ok() else {
                continue;
            };
            if dir.is_root() && name == META_DIR {
                continue;
            }
            let Ok(path) = dir.join(name) else { continue };
            let is_dir = ev.mask & libc::IN_ISDIR != 0;
            if is_dir && ev.mask & (libc::IN_CREATE | libc::IN_MOVED_TO) != 0 {
                // Watched from now on; whatever was made inside before that is found by the
                // scan of this path.
                w.add_tree(&path);
            }
            if !is_dir && ev.mask & libc::IN_CREATE != 0 && own.is_own(&w.root_dir, &path) {
                continue;
            }
            let _ = tx.send(path);
        }
        std::thread::sleep(COALESCE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// Paths received until `want` shows up (or 5 s pass), then a little longer for stragglers.
    fn collect(rx: &mut tokio::sync::mpsc::UnboundedReceiver<RelPath>, want: &str) -> Vec<String> {
        let mut got = Vec::new();
        let end = Instant::now() + Duration::from_secs(5);
        let mut seen_at = None;
        while Instant::now() < end
            && seen_at.is_none_or(|t: Instant| t.elapsed() < Duration::from_millis(300))
        {
            match rx.try_recv() {
                Ok(p) => {
                    if p.as_str() == want && seen_at.is_none() {
                        seen_at = Some(Instant::now());
                    }
                    got.push(p.as_str().to_string());
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        got
    }

    #[test]
    fn new_subtrees_are_watched_and_the_meta_dir_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join(META_DIR).join("tmp")).unwrap();
        std::fs::create_dir(root.join("old")).unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let w = start(root, tx, Arc::default()).unwrap();

        // A directory made after the start, a file deep inside it made right after: the file is
        // reported (by its own event, or by the scan of the new directory's path).
        std::fs::create_dir_all(root.join("new/a/b")).unwrap();
        std::fs::write(root.join("new/a/b/f.txt"), b"x").unwrap();
        std::fs::write(root.join(META_DIR).join("tmp/part"), b"temp").unwrap();
        std::fs::write(root.join("old/g.txt"), b"y").unwrap();
        let got = collect(&mut rx, "old/g.txt");
        assert!(got.iter().any(|p| p == "old/g.txt"), "{got:?}");
        assert!(got.iter().any(|p| p == "new"), "{got:?}");
        assert!(got.iter().all(|p| !p.starts_with(META_DIR)), "{got:?}");

        // Once the new subtree is watched, a change deep inside it is reported by its own path.
        std::thread::sleep(Duration::from_millis(100));
        std::fs::write(root.join("new/a/b/h.txt"), b"z").unwrap();
        let got = collect(&mut rx, "new/a/b/h.txt");
        assert!(got.iter().any(|p| p == "new/a/b/h.txt"), "{got:?}");

        // Reading a file raises nothing.
        let _ = std::fs::read(root.join("old/g.txt")).unwrap();
        std::thread::sleep(Duration::from_millis(150));
        assert!(rx.try_recv().is_err());
        drop(w);
    }

    #[test]
    fn announcements_nobody_consumes_stay_bounded() {
        let own = OwnCreates::default();
        for i in 0..3 * OWN_CREATES_MAX {
            own.expect(&RelPath::parse(&format!("f{i}")).unwrap(), i as u64);
            assert!(own.pending.lock().unwrap().len() <= OWN_CREATES_MAX);
        }
    }

    #[test]
    fn announced_links_raise_nothing_and_anything_else_at_the_path_does() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join(META_DIR)).unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let own = Arc::new(OwnCreates::default());
        let w = start(root, tx, own.clone()).unwrap();

        // A file of ours, linked in after being announced with its inode: no event.
        let tmp = root.join(META_DIR).join("built");
        std::fs::write(&tmp, b"received").unwrap();
        let ours = RelPath::parse("ours.txt").unwrap();
        own.expect(&ours, std::fs::metadata(&tmp).unwrap().ino());
        std::fs::hard_link(&tmp, root.join("ours.txt")).unwrap();
        std::fs::write(root.join("marker1"), b"").unwrap();
        let got = collect(&mut rx, "marker1");
        assert!(got.iter().all(|p| p != "ours.txt"), "{got:?}");

        // Announced, but a symlink took the path: reported (a link raises only IN_CREATE).
        let link = RelPath::parse("link").unwrap();
        own.expect(&link, std::fs::metadata(&tmp).unwrap().ino());
        std::os::unix::fs::symlink("ours.txt", root.join("link")).unwrap();
        let got = collect(&mut rx, "link");
        assert!(got.iter().any(|p| p == "link"), "{got:?}");

        // Announced, then forgotten (the link failed): someone else's link there is reported.
        let other = RelPath::parse("other").unwrap();
        own.expect(&other, std::fs::metadata(&tmp).unwrap().ino());
        own.forget(&other);
        std::fs::hard_link(&tmp, root.join("other")).unwrap();
        let got = collect(&mut rx, "other");
        assert!(got.iter().any(|p| p == "other"), "{got:?}");
        drop(w);
    }
}
