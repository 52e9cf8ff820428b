//! AVX-512 matrix-vector kernels (512-bit vectors, 32 registers).

use std::arch::x86_64::*;

use super::{f16_to_f32, hsum512, q4_dm};
use crate::engine::kernels::formats::{BlockQ8_0, Nibbles32, QK};

/// [`super::avx2::q4_rows`] (Q4_0 or Q4_1) with 512-bit vectors: a block's 32 weights are dequantized once into
/// two vectors (`d q + m`) and multiplied with every activation row; with 32 registers
/// that is cheaper than the `Σx` trick of the AVX2 kernel (no scalar work per block).
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub unsafe fn q4_rows_512<B: Nibbles32>(
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
        q4_rows_512_t<B>(blocks, nb, x, out, ld)
    )
}

#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn q4_rows_512_t<const T: usize, B: Nibbles32>(
    blocks: &[B],
    nb: usize,
    x: &[f32],
    out: *mut f32,
    ld: usize,
) {
    let cols = nb * QK;
    let n_rows = blocks.len() / nb;
    let xp = x.as_ptr();
    let mask = _mm_set1_epi8(0x0F);
    for r in 0..n_rows {
        let row = blocks.as_ptr().add(r * nb);
        // Two accumulators per row (first and second half of each block), so the FMAs
        // of one row do not wait on each other.
        let mut acc = [[_mm512_setzero_ps(); 2]; T];
        for b in 0..nb {
            let blk = &*row.add(b);
            let raw = _mm_loadu_si128(blk.qs().as_ptr() as *const __m128i);
            let lo = _mm_and_si128(raw, mask);
            let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
            let (d, m) = q4_dm(blk);
            let (d, m) = (_mm512_set1_ps(d), _mm512_set1_ps(m));
            // The block's 32 weights, `d q + m`, as two vectors shared by all T rows.
            let w0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), d, m);
            let w1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), d, m);
            for (k, a) in acc.iter_mut().enumerate() {
                let p = xp.add(k * cols + b * QK);
                a[0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(p), a[0]);
                a[1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(p.add(16)), a[1]);
            }
        }
        for (k, a) in acc.iter().enumerate() {
            *out.add(k * ld + r) = hsum512(_mm512_add_ps(a[0], a[1]));
        }
    }
}

/// [`super::avx2::q8_0_rows`] with 512-bit vectors.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub unsafe fn q8_0_rows_512(
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
        q8_0_rows_512_t(blocks, nb, x, out, ld)
    )
}

#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn q8_0_rows_512_t<const T: usize>(
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
        let mut acc = [_mm512_setzero_ps(); T];
        for b in 0..nb {
            let blk = &*row.add(b);
            let q = blk.qs.as_ptr() as *const __m128i;
            let q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q)));
            let q1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q.add(1))));
            let d = _mm512_set1_ps(f16_to_f32(blk.d));
            for (k, a) in acc.iter_mut().enumerate() {
                let p = xp.add(k * cols + b * QK);
                let s = _mm512_mul_ps(q0, _mm512_loadu_ps(p));
                let s = _mm512_fmadd_ps(q1, _mm512_loadu_ps(p.add(16)), s);
                *a = _mm512_fmadd_ps(s, d, *a);
            }
        }
        for (k, a) in acc.iter().enumerate() {
            *out.add(k * ld + r) = hsum512(*a);
        }
    }
}
