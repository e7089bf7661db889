#![no_main]
//! The path validator: whatever it accepts is relative, free of `..`, NUL and backslashes, not
//! under `.mybox`, and stable under re-validation.
use libfuzzer_sys::fuzz_target;
use mybox::paths::RelPath;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(p) = RelPath::parse(s) {
        let t = p.as_str();
        assert!(!t.is_empty() && !t.starts_with('/') && !t.contains('\0') && !t.contains('\\'));
        assert!(t.split('/').all(|c| !c.is_empty() && c != "." && c != ".."));
        assert!(t.split('/').next() != Some(".mybox"));
        assert_eq!(RelPath::parse(t).ok().as_ref(), Some(&p));
        let root = std::path::Path::new("/store");
        assert!(p.to_fs(root).starts_with(root));
    }
    // What the wire decoder uses (the root allowed): same guarantees for anything but the root.
    if let Ok(p) = RelPath::parse_or_root(s) {
        if !p.is_root() {
            assert_eq!(RelPath::parse(s).ok().as_ref(), Some(&p));
        }
    }
});
