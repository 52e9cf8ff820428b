//! Matrix-vector kernels for the K-quants of Q4_K_M / Q5_K_M files (Q4_K, Q5_K and Q6_K),
//! AVX-512 and AVX2.
//!
//! Each 256-value super-block is dequantized in registers, 16 (AVX-512) or 8 (AVX2) values
//! at a time, into f32 weights (`d·sc · q − dmin·m` for Q4_K, `d·sc · (q − 32)` for Q6_K),
//! which are multiplied with every activation row of the pass: the activations stay f32, so
//! outliers survive. Each row keeps four accumulators, whatever the number of rows in the
//! pass, so that one row's FMAs do not wait on each other *and* a row's result is the same
//! bit for bit alone or batched.

use std::arch::x86_64::*;

use super::{f16_to_f32, hsum, hsum512};
use crate::engine::kernels::formats::{BlockQ6K, NibbleBlock, QK_K};

/// Activation rows per pass of the AVX-512 kernels: 4 rows × 4 accumulators + 4 weight
/// vectors + temporaries fit the 32 registers.
pub const ROWS_512: usize = 4;
/// The same for AVX2's 16 registers: 2 rows × 4 accumulators + 4 weight vectors + masks.
pub const ROWS_256: usize = 2;

/// A Q4_K (or Q5_K) super-block's eight `d·sc` and `dmin·m`, rounded to f32 as ggml rounds
/// them.
///
/// The 6-bit scales and mins are unpacked with whole-word masks (as ggml's own kernels do)
/// and converted eight at a time: done one by one, the compiler's code moved every value
/// between vector and general registers and this was a third of the kernel's time.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q4k_scales<B: NibbleBlock>(b: &B) -> ([f32; 8], [f32; 8]) {
    const KMASK1: u32 = 0x3f3f_3f3f;
    const KMASK2: u32 = 0x0f0f_0f0f;
    const KMASK3: u32 = 0x0303_0303;
    let u = |i: usize| u32::from_le_bytes(b.packed()[4 * i..4 * i + 4].try_into().unwrap());
    let (u0, u1, u2) = (u(0), u(1), u(2));
    // Bytes of `sc`: scales 0..8; bytes of `m`: mins 0..8 (see `scale_min_k4`).
    let sc = [u0 & KMASK1, (u2 & KMASK2) | (((u0 >> 6) & KMASK3) << 4)];
    let m = [
        u1 & KMASK1,
        ((u2 >> 4) & KMASK2) | (((u1 >> 6) & KMASK3) << 4),
    ];
    let widen = |w: [u32; 2]| {
        let v = _mm_cvtsi64_si128(((w[1] as u64) << 32 | w[0] as u64) as i64);
        _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v))
    };
    let mut ds = [0f32; 8];
    let mut ms = [0f32; 8];
    _mm256_storeu_ps(
        ds.as_mut_ptr(),
        _mm256_mul_ps(_mm256_set1_ps(f16_to_f32(b.d())), widen(sc)),
    );
    _mm256_storeu_ps(
        ms.as_mut_ptr(),
        _mm256_mul_ps(_mm256_set1_ps(f16_to_f32(b.dmin())), widen(m)),
    );
    (ds, ms)
}

/// The 64 values of group `g` of a Q4_K or Q5_K block (values 64g..64g + 64) as bytes:
/// sub-block 2g from the low nibbles, 2g + 1 from the high ones, each with its fifth bit
/// from `qh` for Q5_K (bit 2g, resp. 2g + 1, of `qh[l]`, moved to bit 4).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn group_values<B: NibbleBlock>(blk: &B, g: usize) -> (__m256i, __m256i) {
    let mask = _mm256_set1_epi8(0x0F);
    let raw = _mm256_loadu_si256(blk.qs().as_ptr().add(g * 32) as *const __m256i);
    let lo = _mm256_and_si256(raw, mask);
    let hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask);
    if !B::FIFTH_BIT {
        return (lo, hi);
    }
    let qh = _mm256_loadu_si256(blk.qh().as_ptr() as *const __m256i);
    let fifth = _mm256_set1_epi8(0x10);
    let bit = |j: usize| _mm256_and_si256(bit_to_4(qh, j), fifth);
    (
        _mm256_or_si256(lo, bit(2 * g)),
        _mm256_or_si256(hi, bit(2 * g + 1)),
    )
}

/// Bit `j` (0..8) of every byte of `v` at bit 4 of that byte, by one shift of 16-bit lanes
/// by a constant: the bits that cross into the neighbouring byte are not bit 4 of it, so
/// masking with `0x10` per byte keeps exactly the moved bits. (A shift by a count in a
/// register was two operations more per group, in the Q5_K decode kernel's inner loop.)
#[inline(always)]
unsafe fn bit_to_4(v: __m256i, j: usize) -> __m256i {
    match j {
        0 => _mm256_slli_epi16::<4>(v),
        1 => _mm256_slli_epi16::<3>(v),
        2 => _mm256_slli_epi16::<2>(v),
        3 => _mm256_slli_epi16::<1>(v),
        4 => v,
        5 => _mm256_srli_epi16::<1>(v),
        6 => _mm256_srli_epi16::<2>(v),
        _ => _mm256_srli_epi16::<3>(v),
    }
}

/// Q4_K or Q5_K weight rows × `t` (1..=[`ROWS_512`]) f32 rows `x`: `out[k * ld + r]` =
/// weight row r · x row k; `nb` super-blocks per row.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub unsafe fn q4k_rows_512<B: NibbleBlock>(
    blocks: &[B],
    nb: usize,
    x: &[f32],
    t: usize,
    out: *mut f32,
    ld: usize,
) {
    by_rows!(t, [1, 2, 3], 4, q4k_rows_512_t<B>(blocks, nb, x, out, ld))
}

#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn q4k_rows_512_t<const T: usize, B: NibbleBlock>(
    blocks: &[B],
    nb: usize,
    x: &[f32],
    out: *mut f32,
    ld: usize,
) {
    let cols = nb * QK_K;
    let n_rows = blocks.len() / nb;
    let xp = x.as_ptr();
    for r in 0..n_rows {
        let row = blocks.as_ptr().add(r * nb);
        let mut acc = [[_mm512_setzero_ps(); 4]; T];
        for b in 0..nb {
            let blk = &*row.add(b);
            let (ds, ms) = q4k_scales(blk);
            for g in 0..4 {
                // 64 values: sub-block 2g, then 2g + 1.
                let (lo, hi) = group_values(blk, g);
                let (d0, m0) = (_mm512_set1_ps(ds[2 * g]), _mm512_set1_ps(ms[2 * g]));
                let (d1, m1) = (_mm512_set1_ps(ds[2 * g + 1]), _mm512_set1_ps(ms[2 * g + 1]));
                let q = |v: __m128i| _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v));
                let w = [
                    _mm512_fmsub_ps(q(_mm256_castsi256_si128(lo)), d0, m0),
                    _mm512_fmsub_ps(q(_mm256_extracti128_si256(lo, 1)), d0, m0),
                    _mm512_fmsub_ps(q(_mm256_castsi256_si128(hi)), d1, m1),
                    _mm512_fmsub_ps(q(_mm256_extracti128_si256(hi, 1)), d1, m1),
                ];
                for (k, a) in acc.iter_mut().enumerate() {
                    let p = xp.add(k * cols + b * QK_K + g * 64);
                    for j in 0..4 {
                        a[j] = _mm512_fmadd_ps(w[j], _mm512_loadu_ps(p.add(16 * j)), a[j]);
                    }
                }
            }
        }
        for (k, a) in acc.iter().enumerate() {
            let s = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
            *out.add(k * ld + r) = hsum512(s);
        }
    }
}

/// Q4_K or Q5_K weight rows × `t` (1..=[`ROWS_256`]) f32 rows, with 256-bit vectors.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn q4k_rows_256<B: NibbleBlock>(
    blocks: &[B],
    nb: usize,
    x: &[f32],
    t: usize,
    out: *mut f32,
    ld: usize,
) {
    by_rows!(t, [1], 2, q4k_rows_256_t<B>(blocks, nb, x, out, ld))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4k_rows_256_t<const T: usize, B: NibbleBlock>(
    blocks: &[B],
    nb: usize,
    x: &[f32],
    out: *mut f32,
    ld: usize,
) {
    let cols = nb * QK_K;
    let n_rows = blocks.len() / nb;
    let xp = x.as_ptr();
    for r in 0..n_rows {
        let row = blocks.as_ptr().add(r * nb);
        let mut acc = [[_mm256_setzero_ps(); 4]; T];
        for b in 0..nb {
            let blk = &*row.add(b);
            let (ds, ms) = q4k_scales(blk);
            for g in 0..4 {
                let (lo32, hi32) = group_values(blk, g);
                for half in 0..2 {
                    // Values 16·half.. of sub-blocks 2g (lo) and 2g + 1 (hi).
                    let (lo, hi) = if half == 0 {
                        (_mm256_castsi256_si128(lo32), _mm256_castsi256_si128(hi32))
                    } else {
                        (
                            _mm256_extracti128_si256::<1>(lo32),
                            _mm256_extracti128_si256::<1>(hi32),
                        )
                    };
                    let (d0, m0) = (_mm256_set1_ps(ds[2 * g]), _mm256_set1_ps(ms[2 * g]));
                    let (d1, m1) = (_mm256_set1_ps(ds[2 * g + 1]), _mm256_set1_ps(ms[2 * g + 1]));
                    let q = |v: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
                    let w = [
                        _mm256_fmsub_ps(q(lo), d0, m0),
                        _mm256_fmsub_ps(q(_mm_srli_si128(lo, 8)), d0, m0),
                        _mm256_fmsub_ps(q(hi), d1, m1),
                        _mm256_fmsub_ps(q(_mm_srli_si128(hi, 8)), d1, m1),
                    ];
                    let base = b * QK_K + g * 64 + half * 16;
                    for (k, a) in acc.iter_mut().enumerate() {
                        let p = xp.add(k * cols + base);
                        a[0] = _mm256_fmadd_ps(w[0], _mm256_loadu_ps(p), a[0]);
                        a[1] = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(p.add(8)), a[1]);
                        a[2] = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(p.add(32)), a[2]);
                        a[3] = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(p.add(40)), a[3]);
                    }
                }
            }
        }
        for (k, a) in acc.iter().enumerate() {
            let s = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
            *out.add(k * ld + r) = hsum(s);
        }
    }
}

/// The four 32-value groups of half `h` of a Q6_K block as unsigned bytes `q` (0..64):
/// group k holds values h·128 + 32k + l, l in 0..32 (see `BlockQ6K::quad`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q6k_groups(blk: &BlockQ6K, h: usize) -> [__m256i; 4] {
    let (m4, m2) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(3));
    let ql = blk.ql.as_ptr().add(h * 64);
    let qla = _mm256_loadu_si256(ql as *const __m256i);
    let qlb = _mm256_loadu_si256(ql.add(32) as *const __m256i);
    let qh = _mm256_loadu_si256(blk.qh.as_ptr().add(h * 32) as *const __m256i);
    // Two high bits of group k: bits 2k..2k+2 of qh, moved to bits 4..6 (they stay inside
    // their byte: the value is at most 3 << 4).
    let high = |v: __m256i| _mm256_slli_epi16(_mm256_and_si256(v, m2), 4);
    [
        _mm256_or_si256(_mm256_and_si256(qla, m4), high(qh)),
        _mm256_or_si256(_mm256_and_si256(qlb, m4), high(_mm256_srli_epi16(qh, 2))),
        _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16(qla, 4), m4),
            high(_mm256_srli_epi16(qh, 4)),
        ),
        _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16(qlb, 4), m4),
            high(_mm256_srli_epi16(qh, 6)),
        ),
    ]
}

/// The four 32-value groups of half `h` of a Q6_K block, as signed bytes `q − 32`, for the
/// 16 values `l0..l0 + 16` of each group (`l0` 0 or 16): group k holds values
/// h·128 + 32k + l.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6k_groups_128(b: &BlockQ6K, h: usize, l0: usize) -> [__m128i; 4] {
    let ql = b.ql.as_ptr().add(h * 64 + l0);
    let qla = _mm_loadu_si128(ql as *const __m128i);
    let qlb = _mm_loadu_si128(ql.add(32) as *const __m128i);
    let qh = _mm_loadu_si128(b.qh.as_ptr().add(h * 32 + l0) as *const __m128i);
    let (m4, m2, off) = (_mm_set1_epi8(0x0F), _mm_set1_epi8(3), _mm_set1_epi8(32));
    // Two high bits of group k: bits 2k..2k+2 of qh, moved to bits 4..6 (they stay inside
    // their byte: the value is at most 3 << 4).
    let high = |shift: i32| {
        let v = match shift {
            0 => qh,
            2 => _mm_srli_epi16(qh, 2),
            4 => _mm_srli_epi16(qh, 4),
            _ => _mm_srli_epi16(qh, 6),
        };
        _mm_slli_epi16(_mm_and_si128(v, m2), 4)
    };
    [
        _mm_sub_epi8(_mm_or_si128(_mm_and_si128(qla, m4), high(0)), off),
        _mm_sub_epi8(_mm_or_si128(_mm_and_si128(qlb, m4), high(2)), off),
        _mm_sub_epi8(
            _mm_or_si128(_mm_and_si128(_mm_srli_epi16(qla, 4), m4), high(4)),
            off,
        ),
        _mm_sub_epi8(
            _mm_or_si128(_mm_and_si128(_mm_srli_epi16(qlb, 4), m4), high(6)),
            off,
        ),
    ]
}

/// Q6_K weight rows × `t` (1..=[`ROWS_512`]) f32 rows.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub unsafe fn q6k_rows_512(
    blocks: &[BlockQ6K],
    nb: usize,
    x: &[f32],
    t: usize,
    out: *mut f32,
    ld: usize,
) {
    by_rows!(t, [1, 2, 3], 4, q6k_rows_512_t(blocks, nb, x, out, ld))
}

#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn q6k_rows_512_t<const T: usize>(
    blocks: &[BlockQ6K],
    nb: usize,
    x: &[f32],
    out: *mut f32,
    ld: usize,
) {
    let cols = nb * QK_K;
    let n_rows = blocks.len() / nb;
    let xp = x.as_ptr();
    for r in 0..n_rows {
        let row = blocks.as_ptr().add(r * nb);
        let mut acc = [[_mm512_setzero_ps(); 4]; T];
        for b in 0..nb {
            let blk = &*row.add(b);
            let d = f16_to_f32(blk.d);
            for h in 0..2 {
                for l0 in [0, 16] {
                    // 16 values of each group, all in one sub-block of 16: scale index
                    // h·8 + 2k + l0/16.
                    let groups = q6k_groups_128(blk, h, l0);
                    let w: [__m512; 4] = std::array::from_fn(|k| {
                        let sc = blk.scales[h * 8 + 2 * k + l0 / 16] as f32;
                        _mm512_mul_ps(
                            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(groups[k])),
                            _mm512_set1_ps(d * sc),
                        )
                    });
                    let base = b * QK_K + h * 128 + l0;
                    for (k, a) in acc.iter_mut().enumerate() {
                        let p = xp.add(k * cols + base);
                        for j in 0..4 {
                            a[j] = _mm512_fmadd_ps(w[j], _mm512_loadu_ps(p.add(32 * j)), a[j]);
                        }
                    }
                }
            }
        }
        for (k, a) in acc.iter().enumerate() {
            let s = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
            *out.add(k * ld + r) = hsum512(s);
        }
    }
}

/// Q6_K weight rows × `t` (1..=[`ROWS_256`]) f32 rows, with 256-bit vectors.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn q6k_rows_256(
    blocks: &[BlockQ6K],
    nb: usize,
    x: &[f32],
    t: usize,
    out: *mut f32,
    ld: usize,
) {
    by_rows!(t, [1], 2, q6k_rows_256_t(blocks, nb, x, out, ld))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6k_rows_256_t<const T: usize>(
    blocks: &[BlockQ6K],
    nb: usize,
    x: &[f32],
    out: *mut f32,
    ld: usize,
) {
    let cols = nb * QK_K;
    let n_rows = blocks.len() / nb;
    let xp = x.as_ptr();
    for r in 0..n_rows {
        let row = blocks.as_ptr().add(r * nb);
        let mut acc = [[_mm256_setzero_ps(); 4]; T];
        for b in 0..nb {
            let blk = &*row.add(b);
            let d = f16_to_f32(blk.d);
            for h in 0..2 {
                for l0 in [0, 16] {
                    let groups = q6k_groups_128(blk, h, l0);
                    let base = b * QK_K + h * 128 + l0;
                    for (k, &gk) in groups.iter().enumerate() {
                        let sc = _mm256_set1_ps(d * blk.scales[h * 8 + 2 * k + l0 / 16] as f32);
                        let q = |v: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
                        let w0 = _mm256_mul_ps(q(gk), sc);
                        let w1 = _mm256_mul_ps(q(_mm_srli_si128(gk, 8)), sc);
                        for (i, a) in acc.iter_mut().enumerate() {
                            let p = xp.add(i * cols + base + 32 * k);
                            // Group k feeds accumulators 2(k % 2) and 2(k % 2) + 1.
                            let j = 2 * (k % 2);
                            a[j] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(p), a[j]);
                            a[j + 1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(p.add(8)), a[j + 1]);
                        }
                    }
                }
            }
        }
        for (k, a) in acc.iter().enumerate() {
            let s = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
            *out.add(k * ld + r) = hsum(s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::kernels::formats::BlockQ4K;

    /// The word-wise unpacking against ggml's byte-wise `get_scale_min_k4`, on every value
    /// of each scale byte position.
    #[test]
    fn q4k_scales_match_ggml() {
        if !super::super::available() {
            return;
        }
        for seed in 0..200u32 {
            let mut b = BlockQ4K {
                d: half::f16::from_f32(0.5 + seed as f32 * 0.01),
                dmin: half::f16::from_f32(0.25),
                scales: [0; 12],
                qs: [0; 128],
            };
            for (i, s) in b.scales.iter_mut().enumerate() {
                *s = (seed.wrapping_mul(2654435761).rotate_left(i as u32 * 3) >> 7) as u8;
            }
            let (want_d, want_m) = b.scales();
            // SAFETY: AVX2 checked above.
            let (d, m) = unsafe { q4k_scales(&b) };
            assert_eq!(d, want_d, "seed {seed}");
            assert_eq!(m, want_m, "seed {seed}");
        }
    }
}
