//! Shared teardown for tests that run `mybox mount`: never leave a mount behind, even when the
//! test failed or the mount process died.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `mybox umount`, wait up to `grace` for the process to exit, kill it otherwise, then detach
/// whatever is still mounted. Prints the mount log if it shows a panic (or the test panicked).
pub fn teardown(
    bin: &str,
    mnt: &Path,
    child: Option<Child>,
    grace: Duration,
    log: &str,
    label: &str,
) {
    let _ = Command::new(bin)
        .arg("umount")
        .arg(mnt)
        .stderr(Stdio::null())
        .status();
    if let Some(mut c) = child {
        let end = Instant::now() + grace;
        while Instant::now() < end {
            if let Ok(Some(_)) = c.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
    if mybox::mount::is_mountpoint(mnt) {
        if let Some(c) = mnt.to_str().and_then(|s| std::ffi::CString::new(s).ok()) {
            // SAFETY: c is a valid C string.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
    if log.contains("panicked") || std::thread::panicking() {
        eprintln!("mount log of {label}:\n{log}");
    }
}
