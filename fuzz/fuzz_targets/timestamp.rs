#![no_main]
//! `index shortlist` times: any input gives a value or a clear error, never a panic.
use libfuzzer_sys::fuzz_target;
use mybox::timeparse::{parse_range, parse_time, Bound};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let _ = parse_time(s, Bound::Start);
    let _ = parse_time(s, Bound::End);
    if let Some((a, b)) = s.split_once('|') {
        if let Ok((x, y)) = parse_range(a, b) {
            assert!(x <= y);
        }
    }
});
