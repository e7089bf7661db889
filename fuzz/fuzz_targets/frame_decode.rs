#![no_main]
//! Any bytes fed to the frame decoder: never a panic, never an allocation past the cap, and
//! whatever decodes re-encodes to a frame that decodes to the same value.
use libfuzzer_sys::fuzz_target;
use mybox::protocol::{decode_prefixed, encode};

fuzz_target!(|data: &[u8]| {
    let mut buf = data;
    while let Ok(Some((frame, used))) = decode_prefixed(buf) {
        let again = encode(&frame).expect("a decoded frame re-encodes");
        let (back, _) = decode_prefixed(&again).expect("re-encoded frame decodes").expect("whole");
        assert_eq!(back, frame);
        buf = &buf[used..];
    }
});
