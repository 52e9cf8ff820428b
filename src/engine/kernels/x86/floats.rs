//! Matrix-vector kernels for F16 weights (F16 GGUF files; llama.cpp's converters write F16
//! before quantizing), AVX-512 and AVX2: one conversion instruction per 16 (or 8) weights,
//! four accumulators per row as in [`super::kquants`].

use std::arch::x86_64::*;

use super::{hsum, hsum512};

/// F16 weight rows × `t` (1..=[`super::kquants::ROWS_512`]) f32 rows: 16 weights per conversion.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub unsafe fn f16_rows_512(w: &[u16], cols: usize, x: &[f32], t: usize, out: *mut f32, ld: usize) {
    by_rows!(t, [1, 2, 3], 4, f16_rows_512_t(w, cols, x, out, ld))
}

#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn f16_rows_512_t<const T: usize>(
    w: &[u16],
    cols: usize,
    x: &[f32],
    out: *mut f32,
    ld: usize,
) {
    debug_assert!(cols.is_multiple_of(64));
    let n_rows = w.len() / cols;
    let xp = x.as_ptr();
    for r in 0..n_rows {
        let row = w.as_ptr().add(r * cols);
        let mut acc = [[_mm512_setzero_ps(); 4]; T];
        for c in (0..cols).step_by(64) {
            let wv: [__m512; 4] = std::array::from_fn(|j| {
                _mm512_cvtph_ps(_mm256_loadu_si256(row.add(c + 16 * j) as *const __m256i))
            });
            for (k, a) in acc.iter_mut().enumerate() {
                let p = xp.add(k * cols + c);
                for j in 0..4 {
                    a[j] = _mm512_fmadd_ps(wv[j], _mm512_loadu_ps(p.add(16 * j)), a[j]);
                }
            }
        }
        for (k, a) in acc.iter().enumerate() {
            let s = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
            *out.add(k * ld + r) = hsum512(s);
        }
    }
}

/// F16 weight rows × `t` (1..=[`super::kquants::ROWS_256`]) f32 rows, with 256-bit vectors.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn f16_rows_256(w: &[u16], cols: usize, x: &[f32], t: usize, out: *mut f32, ld: usize) {
    by_rows!(t, [1], 2, f16_rows_256_t(w, cols, x, out, ld))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_rows_256_t<const T: usize>(
    w: &[u16],
    cols: usize,
    x: &[f32],
    out: *mut f32,
    ld: usize,
) {
    debug_assert!(cols.is_multiple_of(32));
    let n_rows = w.len() / cols;
    let xp = x.as_ptr();
    for r in 0..n_rows {
        let row = w.as_ptr().add(r * cols);
        let mut acc = [[_mm256_setzero_ps(); 4]; T];
        for c in (0..cols).step_by(32) {
            let wv: [__m256; 4] = std::array::from_fn(|j| {
                _mm256_cvtph_ps(_mm_loadu_si128(row.add(c + 8 * j) as *const __m128i))
            });
            for (k, a) in acc.iter_mut().enumerate() {
                let p = xp.add(k * cols + c);
                for j in 0..4 {
                    a[j] = _mm256_fmadd_ps(wv[j], _mm256_loadu_ps(p.add(8 * j)), a[j]);
                }
            }
        }
        for (k, a) in acc.iter().enumerate() {
            let s = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));
            *out.add(k * ld + r) = hsum(s);
        }
    }
}
