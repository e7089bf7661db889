//! Per-file locks shared by everything in one process that reads or writes store files: senders
//! take a shared lock for the whole transfer, the sync applier and FUSE writers an exclusive one,
//! so a transfer never ships a half-written file and a sync never replaces a file under its
//! writer. Entries vanish when nobody holds or waits for them.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::paths::RelPath;

#[derive(Default, Debug)]
struct State {
    readers: usize,
    writer: bool,
    waiting: usize,
}

#[derive(Default)]
pub struct LockManager {
    table: Mutex<HashMap<RelPath, State>>,
    changed: Condvar,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Shared,
    Exclusive,
}

/// A held lock; released on drop.
pub struct Guard {
    mgr: Arc<LockManager>,
    path: RelPath,
    mode: Mode,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Guard({}, {:?})", self.path, self.mode)
    }
}

impl LockManager {
    pub fn new() -> Arc<Self> {
        Arc::new(LockManager::default())
    }

    fn can_take(st: &State, mode: Mode) -> bool {
        match mode {
            Mode::Shared => !st.writer,
            Mode::Exclusive => !st.writer && st.readers == 0,
        }
    }

    fn take(st: &mut State, mode: Mode) {
        match mode {
            Mode::Shared => st.readers += 1,
            Mode::Exclusive => st.writer = true,
        }
    }

    /// Take the lock, waiting at most `timeout`; `None` if it stayed busy.
    pub fn lock(self: &Arc<Self>, path: &RelPath, mode: Mode, timeout: Duration) -> Option<Guard> {
        let deadline = Instant::now() + timeout;
        let mut table = self.table.lock().ok()?;
        loop {
            let st = table.entry(path.clone()).or_default();
            if Self::can_take(st, mode) {
                Self::take(st, mode);
                return Some(Guard {
                    mgr: self.clone(),
                    path: path.clone(),
                    mode,
                });
            }
            let now = Instant::now();
            if now >= deadline {
                Self::gc(&mut table, path);
                return None;
            }
            st.waiting += 1;
            let (t, _) = self.changed.wait_timeout(table, deadline - now).ok()?;
            table = t;
            if let Some(st) = table.get_mut(path) {
                st.waiting = st.waiting.saturating_sub(1);
            }
        }
    }

    pub fn try_lock(self: &Arc<Self>, path: &RelPath, mode: Mode) -> Option<Guard> {
        self.lock(path, mode, Duration::ZERO)
    }

    /// Async form: waits without blocking the runtime.
    pub async fn lock_async(
        self: &Arc<Self>,
        path: &RelPath,
        mode: Mode,
        timeout: Duration,
    ) -> Option<Guard> {
        let me = self.clone();
        let p = path.clone();
        tokio::task::spawn_blocking(move || me.lock(&p, mode, timeout))
            .await
            .ok()
            .flatten()
    }

    /// Is anyone writing `path` right now?
    pub fn is_write_locked(&self, path: &RelPath) -> bool {
        self.table
            .lock()
            .map(|t| t.get(path).map(|s| s.writer).unwrap_or(false))
            .unwrap_or(false)
    }

    fn gc(table: &mut HashMap<RelPath, State>, path: &RelPath) {
        if let Some(st) = table.get(path) {
            if st.readers == 0 && !st.writer && st.waiting == 0 {
                table.remove(path);
            }
        }
    }

    fn release(&self, path: &RelPath, mode: Mode) {
        if let Ok(mut table) = self.table.lock() {
            if let Some(st) = table.get_mut(path) {
                match mode {
                    Mode::Shared => st.readers = st.readers.saturating_sub(1),
                    Mode::Exclusive => st.writer = false,
                }
            }
            Self::gc(&mut table, path);
        }
        self.changed.notify_all();
    }

    /// Number of paths with a lock entry (for tests: entries must not leak).
    pub fn len(&self) -> usize {
        self.table.lock().map(|t| t.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.mgr.release(&self.path, self.mode);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_and_exclusive() {
        let m = LockManager::new();
        let p = RelPath::parse("a").unwrap();
        let r1 = m.try_lock(&p, Mode::Shared).unwrap();
        let r2 = m.try_lock(&p, Mode::Shared).unwrap();
        assert!(m.try_lock(&p, Mode::Exclusive).is_none());
        drop(r1);
        drop(r2);
        let w = m.try_lock(&p, Mode::Exclusive).unwrap();
        assert!(m.is_write_locked(&p));
        assert!(m.try_lock(&p, Mode::Shared).is_none());
        // Another path is independent.
        assert!(m
            .try_lock(&RelPath::parse("b").unwrap(), Mode::Exclusive)
            .is_some());
        drop(w);
        assert!(m.is_empty());
    }

    #[test]
    fn waiter_wakes_on_release() {
        let m = LockManager::new();
        let p = RelPath::parse("a").unwrap();
        let w = m.try_lock(&p, Mode::Exclusive).unwrap();
        let m2 = m.clone();
        let p2 = p.clone();
        let t = std::thread::spawn(move || {
            m2.lock(&p2, Mode::Shared, Duration::from_secs(5)).is_some()
        });
        std::thread::sleep(Duration::from_millis(50));
        drop(w);
        assert!(t.join().unwrap());
        assert!(m.is_empty());
    }
}
