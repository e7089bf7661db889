#![no_main]
//! Any bytes fed to the frame decoder: never a panic, never an allocation past the cap, and
//! whatever decodes re-encodes to a frame that decodes to the same value. Half the inputs are
//! raw streams of frames; the other half start from an encoded sample of one message variant
//! (every request, response, sync and UDP message; see `protocol::sample_frames`) and overwrite,
//! insert or cut bytes in it, so every variant's decoder is reached on every run. The decoder
//! the connections use (`decode_shared`, data as views into the frame buffer) must agree with
//! the copying one on every input.
use libfuzzer_sys::fuzz_target;
use mybox::protocol::{decode, decode_prefixed, decode_shared, encode, sample_frames, Frame};

fn check(frame: &Frame) {
    let again = encode(frame).expect("a decoded frame re-encodes");
    let (back, used) = decode_prefixed(&again)
        .expect("re-encoded frame decodes")
        .expect("whole");
    assert_eq!(used, again.len());
    assert_eq!(&back, frame);
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        let mut buf = rest;
        while let Ok(Some((frame, used))) = decode_prefixed(buf) {
            check(&frame);
            buf = &buf[used..];
        }
        return;
    }
    let samples = sample_frames();
    let Some((&pick, mut edits)) = rest.split_first() else {
        return;
    };
    let sample = &samples[pick as usize % samples.len()];
    let mut body = encode(sample).expect("samples encode")[4..].to_vec();
    // Edits: (op, position, byte); position is taken modulo the current length.
    while edits.len() >= 3 {
        let (op, pos, b) = (edits[0], edits[1] as usize, edits[2]);
        edits = &edits[3..];
        let at = if body.is_empty() { 0 } else { pos % body.len() };
        match op % 4 {
            0 if !body.is_empty() => body[at] = b,
            1 => body.insert(at, b),
            2 if !body.is_empty() => {
                body.remove(at);
            }
            _ => body.truncate(at),
        }
    }
    let shared = decode_shared(body.clone().into());
    match decode(&body) {
        Ok(frame) => {
            assert_eq!(shared.ok().as_ref(), Some(&frame));
            check(&frame);
        }
        Err(_) => assert!(shared.is_err()),
    }
});
