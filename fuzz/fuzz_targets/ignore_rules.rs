#![no_main]
//! `.myboxignore` parsing and matching on arbitrary text: never a panic.
use libfuzzer_sys::fuzz_target;
use mybox::paths::RelPath;
use mybox::scan::IgnoreRules;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let (rules, _errors) = IgnoreRules::parse(std::path::Path::new("/store"), s);
    for line in s.lines().take(8) {
        if let Ok(p) = RelPath::parse(line) {
            let _ = rules.is_ignored(&p, false);
            let _ = rules.is_ignored(&p, true);
        }
    }
});
