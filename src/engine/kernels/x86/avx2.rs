//! AVX2 + FMA + F16C kernels (256-bit vectors, 16 registers).

use std::arch::x86_64::*;

use super::q4_dm;
use super::{f16_to_f32, hsum};
use crate::engine::kernels::formats::{BlockQ8_0, Nibbles32, QK};
use crate::engine::kernels::prompt::PANEL;

/// Blocks per row the Q4_1 kernel keeps `Σ x` for on the stack (16384 values).
const XSUM_BLOCKS: usize = 512;

/// `panel[c][j] = rows[j][c]` for PANEL rows of `cols` values (`cols` a multiple of 8),
/// in 8 × 8 tiles transposed in registers.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn transpose_panel(rows: &[f32], cols: usize, panel: &mut [f32]) {
    debug_assert!(
        cols.is_multiple_of(8) && rows.len() >= PANEL * cols && panel.len() >= PANEL * cols
    );
    let (rp, pp) = (rows.as_ptr(), panel.as_mut_ptr());
    for j0 in (0..PANEL).step_by(8) {
        for c0 in (0..cols).step_by(8) {
            let r: [__m256; 8] =
                std::array::from_fn(|k| _mm256_loadu_ps(rp.add((j0 + k) * cols + c0)));
            let t0 = _mm256_unpacklo_ps(r[0], r[1]);
            let t1 = _mm256_unpackhi_ps(r[0], r[1]);
            let t2 = _mm256_unpacklo_ps(r[2], r[3]);
            let t3 = _mm256_unpackhi_ps(r[2], r[3]);
            let t4 = _mm256_unpacklo_ps(r[4], r[5]);
            let t5 = _mm256_unpackhi_ps(r[4], r[5]);
            let t6 = _mm256_unpacklo_ps(r[6], r[7]);
            let t7 = _mm256_unpackhi_ps(r[6], r[7]);
            let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
            let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
            let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
            let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
            let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
            let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
            let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
            let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
            let cols_out = [
                _mm256_permute2f128_ps::<0x20>(u0, u4),
                _mm256_permute2f128_ps::<0x20>(u1, u5),
                _mm256_permute2f128_ps::<0x20>(u2, u6),
                _mm256_permute2f128_ps::<0x20>(u3, u7),
                _mm256_permute2f128_ps::<0x31>(u0, u4),
                _mm256_permute2f128_ps::<0x31>(u1, u5),
                _mm256_permute2f128_ps::<0x31>(u2, u6),
                _mm256_permute2f128_ps::<0x31>(u3, u7),
            ];
            for (c, v) in cols_out.into_iter().enumerate() {
                _mm256_storeu_ps(pp.add((c0 + c) * PANEL + j0), v);
            }
        }
    }
}

/// One Q4_0 or Q4_1 row as f32, with the scalar code's rounding (Q4_1: `d q + m`, a multiply
/// then an add; Q4_0: `d (q - 8)`, one rounding, which a fused multiply-add with `m = -8 d`
/// gives). The prompt kernel dequantizes every weight once per step this way, so for short
/// prompt chunks this loop is most of the step.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn q4_row<B: Nibbles32>(blocks: &[B], out: &mut [f32]) {
    debug_assert!(out.len() >= blocks.len() * QK);
    let mask = _mm_set1_epi8(0x0F);
    let op = out.as_mut_ptr();
    for (b, blk) in blocks.iter().enumerate() {
        let raw = _mm_loadu_si128(blk.qs().as_ptr() as *const __m128i);
        let lo = _mm_and_si128(raw, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
        let (d, m) = q4_dm(blk);
        let (d, m) = (_mm256_set1_ps(d), _mm256_set1_ps(m));
        let o = op.add(b * QK);
        for (i, q) in [lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)]
            .into_iter()
            .enumerate()
        {
            let q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q));
            let w = if blk.m().is_some() {
                _mm256_add_ps(_mm256_mul_ps(q, d), m)
            } else {
                _mm256_fmadd_ps(q, d, m)
            };
            _mm256_storeu_ps(o.add(i * 8), w);
        }
    }
}

/// Q4_0 or Q4_1 weight rows × `t` (1..=MAX_SHARED) f32 rows `x`: `out[k * ld + r]` = weight row
/// r · x row k. Dispatches to a version with `t` fixed at compile time, so the
/// accumulators live in registers.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn q4_rows<B: Nibbles32>(
    blocks: &[B],
    nb: usize,
    x: &[f32],
    t: usize,
    out: *mut f32,
    ld: usize,
) {
    by_rows!(
        t,
        [1, 2, 3, 4, 5, 6, 7],
        8,
        q4_rows_t<B>(blocks, nb, x, out, ld)
    )
}

/// `Σ (d q + m) x = d Σ q x + m Σ x`, with `Σ x` per block computed once for all weight
/// rows, so the inner loop is conversions and one FMA per 8 values. The nibbles of a
/// block are converted once and used for all T activation rows; per activation row the
/// operations are exactly those of T = 1.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
// `b` indexes the row's blocks (by pointer) and every activation row's Σx alike.
#[allow(clippy::needless_range_loop)]
unsafe fn q4_rows_t<const T: usize, B: Nibbles32>(
    blocks: &[B],
    nb: usize,
    x: &[f32],
    out: *mut f32,
    ld: usize,
) {
    let cols = nb * QK;
    let n_rows = blocks.len() / nb;
    let xp = x.as_ptr();
    if nb > XSUM_BLOCKS {
        // Rows longer than the Σx buffer: the tile kernel, one row at a time.
        for r in 0..n_rows {
            for k in 0..T {
                let mut acc = [0f32; 4];
                q4_t::<1, B>(
                    &blocks[r * nb..(r + 1) * nb],
                    &x[k * cols..],
                    cols,
                    &mut acc,
                );
                *out.add(k * ld + r) = acc[0];
            }
        }
        return;
    }
    let mask = _mm_set1_epi8(0x0F);
    let mut xsum = [[0f32; XSUM_BLOCKS]; T];
    for (k, sums) in xsum.iter_mut().enumerate() {
        for (b, s) in sums[..nb].iter_mut().enumerate() {
            let p = xp.add(k * cols + b * QK);
            let v = _mm256_add_ps(
                _mm256_add_ps(_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))),
                _mm256_add_ps(_mm256_loadu_ps(p.add(16)), _mm256_loadu_ps(p.add(24))),
            );
            *s = hsum(v);
        }
    }
    for r in 0..n_rows {
        let row = blocks.as_ptr().add(r * nb);
        let mut acc = [_mm256_setzero_ps(); T];
        let mut msum = [0f32; T];
        for b in 0..nb {
            let blk = &*row.add(b);
            let raw = _mm_loadu_si128(blk.qs().as_ptr() as *const __m128i);
            let lo = _mm_and_si128(raw, mask);
            let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
            let q0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
            let q1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
            let q2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
            let q3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
            let (d, m) = q4_dm(blk);
            let d = _mm256_set1_ps(d);
            for k in 0..T {
                let p = xp.add(k * cols + b * QK);
                let mut s = _mm256_mul_ps(q0, _mm256_loadu_ps(p));
                s = _mm256_fmadd_ps(q1, _mm256_loadu_ps(p.add(8)), s);
                s = _mm256_fmadd_ps(q2, _mm256_loadu_ps(p.add(16)), s);
                s = _mm256_fmadd_ps(q3, _mm256_loadu_ps(p.add(24)), s);
                acc[k] = _mm256_fmadd_ps(s, d, acc[k]);
                msum[k] += m * xsum[k][b];
            }
        }
        for k in 0..T {
            *out.add(k * ld + r) = hsum(acc[k]) + msum[k];
        }
    }
}

/// Q8_0 weight rows × `t` (1..=MAX_SHARED) f32 rows, as [`q4_rows`]: `d Σ q x` per
/// block.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn q8_0_rows(
    blocks: &[BlockQ8_0],
    nb: usize,
    x: &[f32],
    t: usize,
    out: *mut f32,
    ld: usize,
) {
    by_rows!(
        t,
        [1, 2, 3, 4, 5, 6, 7],
        8,
        q8_0_rows_t(blocks, nb, x, out, ld)
    )
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0_rows_t<const T: usize>(
    blocks: &[BlockQ8_0],
    nb: usize,
    x: &[f32],
    out: *mut f32,
    ld: usize,
) {
    let cols = nb * QK;
    let n_rows = blocks.len() / nb;
    let xp = x.as_ptr();
    for r in 0..n_rows {
        let row = blocks.as_ptr().add(r * nb);
        let mut acc = [_mm256_setzero_ps(); T];
        for b in 0..nb {
            let blk = &*row.add(b);
            let q = blk.qs.as_ptr() as *const __m128i;
            let raw0 = _mm_loadu_si128(q);
            let raw1 = _mm_loadu_si128(q.add(1));
            let q0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw0));
            let q1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(raw0, 8)));
            let q2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw1));
            let q3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(raw1, 8)));
            let d = _mm256_set1_ps(f16_to_f32(blk.d));
            for (k, a) in acc.iter_mut().enumerate() {
                let p = xp.add(k * cols + b * QK);
                let mut s = _mm256_mul_ps(q0, _mm256_loadu_ps(p));
                s = _mm256_fmadd_ps(q1, _mm256_loadu_ps(p.add(8)), s);
                s = _mm256_fmadd_ps(q2, _mm256_loadu_ps(p.add(16)), s);
                s = _mm256_fmadd_ps(q3, _mm256_loadu_ps(p.add(24)), s);
                *a = _mm256_fmadd_ps(s, d, *a);
            }
        }
        for (k, a) in acc.iter().enumerate() {
            *out.add(k * ld + r) = hsum(*a);
        }
    }
}

/// `out[k][j] = Σ_c x[k][c] · panel[c][j]` for `m` (1..=MR) activation rows and the
/// PANEL weight rows of `panel` (column-major: the PANEL values of column c together);
/// row k of the result goes to `out + k * ld`.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn gemm_tile(m: usize, panel: &[f32], x: &[f32], cols: usize, out: *mut f32, ld: usize) {
    match m {
        1 => gemm_m::<1>(panel, x, cols, out, ld),
        2 => gemm_m::<2>(panel, x, cols, out, ld),
        3 => gemm_m::<3>(panel, x, cols, out, ld),
        4 => gemm_m::<4>(panel, x, cols, out, ld),
        5 => gemm_m::<5>(panel, x, cols, out, ld),
        _ => gemm_m::<6>(panel, x, cols, out, ld),
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemm_m<const M: usize>(panel: &[f32], x: &[f32], cols: usize, out: *mut f32, ld: usize) {
    debug_assert!(panel.len() >= cols * PANEL && x.len() >= M * cols);
    let mut acc = [[_mm256_setzero_ps(); 2]; M];
    let (pp, xp) = (panel.as_ptr(), x.as_ptr());
    for c in 0..cols {
        let w0 = _mm256_loadu_ps(pp.add(c * PANEL));
        let w1 = _mm256_loadu_ps(pp.add(c * PANEL + 8));
        for (k, a) in acc.iter_mut().enumerate() {
            let b = _mm256_broadcast_ss(&*xp.add(k * cols + c));
            a[0] = _mm256_fmadd_ps(b, w0, a[0]);
            a[1] = _mm256_fmadd_ps(b, w1, a[1]);
        }
    }
    for (k, a) in acc.iter().enumerate() {
        _mm256_storeu_ps(out.add(k * ld), a[0]);
        _mm256_storeu_ps(out.add(k * ld + 8), a[1]);
    }
}

/// Q4_0 or Q4_1 row × T f32 rows. The 32 weights of a block are dequantized once
/// (`d * q + m`) into four vectors and reused for every activation row.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_t<const T: usize, B: Nibbles32>(
    row: &[B],
    x: &[f32],
    cols: usize,
    acc: &mut [f32; 4],
) {
    let mask = _mm_set1_epi8(0x0F);
    let mut sums = [_mm256_setzero_ps(); T];
    let xp = x.as_ptr();
    for (bi, b) in row.iter().enumerate() {
        let (d, m) = q4_dm(b);
        let (d, m) = (_mm256_set1_ps(d), _mm256_set1_ps(m));
        let raw = _mm_loadu_si128(b.qs().as_ptr() as *const __m128i);
        let lo = _mm_and_si128(raw, mask);
        let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
        let q0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
        let q1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
        let q2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
        let q3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
        let w0 = _mm256_fmadd_ps(q0, d, m);
        let w1 = _mm256_fmadd_ps(q1, d, m);
        let w2 = _mm256_fmadd_ps(q2, d, m);
        let w3 = _mm256_fmadd_ps(q3, d, m);
        for (k, s) in sums.iter_mut().enumerate() {
            let p = xp.add(k * cols + bi * QK);
            *s = _mm256_fmadd_ps(w0, _mm256_loadu_ps(p), *s);
            *s = _mm256_fmadd_ps(w1, _mm256_loadu_ps(p.add(8)), *s);
            *s = _mm256_fmadd_ps(w2, _mm256_loadu_ps(p.add(16)), *s);
            *s = _mm256_fmadd_ps(w3, _mm256_loadu_ps(p.add(24)), *s);
        }
    }
    for k in 0..T {
        acc[k] = hsum(sums[k]);
    }
}
