//! SHA-256 of two messages at once. One SHA-NI stream waits on the latency of each
//! `sha256rnds2`; two independent streams interleaved fill those gaps (the same idea as the
//! kernel's two-message SHA-NI path for dm-verity), so verifying received blocks in pairs costs
//! well under twice the time of one. Without SHA-NI this is two calls of `sha2`.

use sha2::{Digest, Sha256};

/// The SHA-256 digests of `a` and `b`.
pub fn sha256_pair(a: &[u8], b: &[u8]) -> ([u8; 32], [u8; 32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if shani_available() {
            // SAFETY: the CPU has the features `x86::digest_pair` is compiled for.
            return unsafe { x86::digest_pair(a, b) };
        }
    }
    (Sha256::digest(a).into(), Sha256::digest(b).into())
}

/// The SHA-256 digests of `msgs`, in order, hashed two at a time.
pub fn sha256_each(msgs: &[&[u8]]) -> Vec<[u8; 32]> {
    let mut out = Vec::with_capacity(msgs.len());
    for pair in msgs.chunks(2) {
        match pair {
            [a, b] => {
                let (x, y) = sha256_pair(a, b);
                out.push(x);
                out.push(y);
            }
            [a] => out.push(Sha256::digest(a).into()),
            _ => {}
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
fn shani_available() -> bool {
    use std::sync::OnceLock;
    static HAVE: OnceLock<bool> = OnceLock::new();
    *HAVE.get_or_init(|| {
        std::arch::is_x86_feature_detected!("sha")
            && std::arch::is_x86_feature_detected!("sse4.1")
            && std::arch::is_x86_feature_detected!("ssse3")
    })
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    const IV: [u32; 8] = [
        0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab,
        0x5be0cd19,
    ];

    const K: [u32; 64] = [
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
        0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
        0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
        0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
        0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
        0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
        0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
        0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
        0xc67178f2,
    ];

    /// A hash state in the register layout `sha256rnds2` works on: (ABEF, CDGH).
    #[derive(Clone, Copy)]
    struct State(__m128i, __m128i);

    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    unsafe fn load(h: &[u32; 8]) -> State {
        let dcba = _mm_loadu_si128(h.as_ptr().cast());
        let hgfe = _mm_loadu_si128(h.as_ptr().add(4).cast());
        let cdab = _mm_shuffle_epi32(dcba, 0xB1);
        let efgh = _mm_shuffle_epi32(hgfe, 0x1B);
        State(
            _mm_alignr_epi8(cdab, efgh, 8),
            _mm_blend_epi16(efgh, cdab, 0xF0),
        )
    }

    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    unsafe fn store(s: State) -> [u8; 32] {
        let feba = _mm_shuffle_epi32(s.0, 0x1B);
        let dchg = _mm_shuffle_epi32(s.1, 0xB1);
        let dcba = _mm_blend_epi16(feba, dchg, 0xF0);
        let hgfe = _mm_alignr_epi8(dchg, feba, 8);
        let mut words = [0u32; 8];
        _mm_storeu_si128(words.as_mut_ptr().cast(), dcba);
        _mm_storeu_si128(words.as_mut_ptr().add(4).cast(), hgfe);
        let mut out = [0u8; 32];
        for (o, w) in out.chunks_exact_mut(4).zip(words) {
            o.copy_from_slice(&w.to_be_bytes());
        }
        out
    }

    /// The 16 four-word groups of the message schedule of one 64-byte block.
    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    #[inline]
    unsafe fn schedule_start(block: &[u8; 64]) -> [__m128i; 4] {
        let swap = _mm_set_epi64x(0x0c0d0e0f08090a0b, 0x0405060700010203);
        let p = block.as_ptr();
        [
            _mm_shuffle_epi8(_mm_loadu_si128(p.cast()), swap),
            _mm_shuffle_epi8(_mm_loadu_si128(p.add(16).cast()), swap),
            _mm_shuffle_epi8(_mm_loadu_si128(p.add(32).cast()), swap),
            _mm_shuffle_epi8(_mm_loadu_si128(p.add(48).cast()), swap),
        ]
    }

    /// Four rounds with message group `w` (already including nothing of K).
    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    #[inline]
    unsafe fn rounds4(s: &mut State, w: __m128i, g: usize) {
        let msg = _mm_add_epi32(w, _mm_loadu_si128(K.as_ptr().add(4 * g).cast()));
        s.1 = _mm_sha256rnds2_epu32(s.1, s.0, msg);
        s.0 = _mm_sha256rnds2_epu32(s.0, s.1, _mm_shuffle_epi32(msg, 0x0E));
    }

    /// Next schedule group from the previous four (W[t-16..t-1]).
    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    #[inline]
    unsafe fn next_group(w: &[__m128i; 4]) -> __m128i {
        let t = _mm_sha256msg1_epu32(w[0], w[1]);
        let t = _mm_add_epi32(t, _mm_alignr_epi8(w[3], w[2], 4));
        _mm_sha256msg2_epu32(t, w[3])
    }

    /// One block into each of two states, their instructions interleaved.
    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    unsafe fn compress2(sa: &mut State, sb: &mut State, ba: &[u8; 64], bb: &[u8; 64]) {
        let (save_a, save_b) = (*sa, *sb);
        let mut wa = schedule_start(ba);
        let mut wb = schedule_start(bb);
        for g in 0..16 {
            let (xa, xb) = if g < 4 {
                (wa[g], wb[g])
            } else {
                let (na, nb) = (next_group(&wa), next_group(&wb));
                wa = [wa[1], wa[2], wa[3], na];
                wb = [wb[1], wb[2], wb[3], nb];
                (na, nb)
            };
            rounds4(sa, xa, g);
            rounds4(sb, xb, g);
        }
        sa.0 = _mm_add_epi32(sa.0, save_a.0);
        sa.1 = _mm_add_epi32(sa.1, save_a.1);
        sb.0 = _mm_add_epi32(sb.0, save_b.0);
        sb.1 = _mm_add_epi32(sb.1, save_b.1);
    }

    /// One block into one state.
    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    unsafe fn compress1(s: &mut State, b: &[u8; 64]) {
        let save = *s;
        let mut w = schedule_start(b);
        for g in 0..16 {
            let x = if g < 4 {
                w[g]
            } else {
                let n = next_group(&w);
                w = [w[1], w[2], w[3], n];
                n
            };
            rounds4(s, x, g);
        }
        s.0 = _mm_add_epi32(s.0, save.0);
        s.1 = _mm_add_epi32(s.1, save.1);
    }

    /// The padded tail of `msg` (what follows its whole 64-byte blocks): one or two blocks.
    fn tail(msg: &[u8]) -> ([u8; 128], usize) {
        let rest = &msg[msg.len() / 64 * 64..];
        let mut t = [0u8; 128];
        t[..rest.len()].copy_from_slice(rest);
        t[rest.len()] = 0x80;
        let n = if rest.len() < 56 { 64 } else { 128 };
        t[n - 8..n].copy_from_slice(&((msg.len() as u64) * 8).to_be_bytes());
        (t, n)
    }

    fn block(b: &[u8]) -> &[u8; 64] {
        b.try_into().expect("64-byte chunk")
    }

    /// # Safety
    /// The CPU must support SHA-NI, SSSE3 and SSE4.1.
    #[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
    pub unsafe fn digest_pair(a: &[u8], b: &[u8]) -> ([u8; 32], [u8; 32]) {
        let (mut sa, mut sb) = (load(&IV), load(&IV));
        let (ta, na) = tail(a);
        let (tb, nb) = tail(b);
        // Each message as its whole blocks followed by its padded tail.
        let blocks_a = a.chunks_exact(64).chain(ta[..na].chunks_exact(64));
        let blocks_b = b.chunks_exact(64).chain(tb[..nb].chunks_exact(64));
        let (mut ia, mut ib) = (blocks_a.peekable(), blocks_b.peekable());
        loop {
            match (ia.next(), ib.next()) {
                (Some(x), Some(y)) => compress2(&mut sa, &mut sb, block(x), block(y)),
                (Some(x), None) => compress1(&mut sa, block(x)),
                (None, Some(y)) => compress1(&mut sb, block(y)),
                (None, None) => break,
            }
        }
        (store(sa), store(sb))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(m: &[u8]) -> [u8; 32] {
        Sha256::digest(m).into()
    }

    #[test]
    fn pairs_agree_with_sha2_at_every_tail_length() {
        let data: Vec<u8> = (0..300u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        for la in 0..=200 {
            for lb in [0, 1, 55, 56, 63, 64, 65, 119, 120, 128, 200, 300] {
                let (a, b) = (&data[..la], &data[300 - lb..]);
                assert_eq!(sha256_pair(a, b), (reference(a), reference(b)), "{la} {lb}");
            }
        }
    }

    #[test]
    fn pairs_of_blocks_agree_with_sha2() {
        let a: Vec<u8> = (0..128 * 1024u32).map(|i| (i % 251) as u8).collect();
        let b: Vec<u8> = (0..128 * 1024u32 - 7).map(|i| (i % 241) as u8).collect();
        assert_eq!(sha256_pair(&a, &b), (reference(&a), reference(&b)));
        assert_eq!(sha256_pair(&b, &a), (reference(&b), reference(&a)));
        assert_eq!(sha256_pair(&a, &a), (reference(&a), reference(&a)));
        assert_eq!(reference(b"abc")[..4], [0xba, 0x78, 0x16, 0xbf]);
    }

    #[test]
    fn each_agrees_with_sha2_for_odd_and_even_counts() {
        let msgs: Vec<Vec<u8>> = (0..7u8).map(|k| vec![k; 1000 * k as usize + 3]).collect();
        for n in 0..=msgs.len() {
            let refs: Vec<&[u8]> = msgs[..n].iter().map(|m| &m[..]).collect();
            let want: Vec<[u8; 32]> = refs.iter().map(|m| reference(m)).collect();
            assert_eq!(sha256_each(&refs), want);
        }
    }
}
