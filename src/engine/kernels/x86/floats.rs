//! Matrix-vector kernels for unquantized weights, AVX-512 and AVX2: F16 (llama.cpp's
//! converters write F16 before quantizing), BF16 (the format most models are trained and
//! published in) and F32. One load (and for F16/BF16 one conversion) per 16 (or 8) weights,
//! four accumulators per row as in [`super::kquants`]. Decoding is memory-bound, so the
//! weights stay in their 2 (or 4) bytes and the activations in f32.

use std::arch::x86_64::*;

use super::{hsum, hsum512};

/// The weights' element type, a const parameter of the kernels (one monomorphized copy each).
pub const F16: u8 = 0;
pub const BF16: u8 = 1;
pub const F32: u8 = 2;

/// Bytes of one weight of kind `K`.
pub const fn width(kind: u8) -> usize {
    if kind == F32 {
        4
    } else {
        2
    }
}

/// How far ahead of the weights being read the kernels ask for cache lines: as the K-quant
/// kernels (`super::bf16`), the hardware prefetcher alone leaves each new stretch's first
/// lines stalled.
const PREFETCH_AHEAD: usize = 2048;

/// Asks for the cache lines holding `bytes` bytes from `PREFETCH_AHEAD` past `p`.
#[inline(always)]
unsafe fn prefetch(p: *const u8, bytes: usize) {
    for off in (0..bytes).step_by(64) {
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH_AHEAD + off) as *const i8);
    }
}

/// 16 weights of kind `K` from `w` (bytes) at element `i`, as f32.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn load16<const K: u8>(w: *const u8, i: usize) -> __m512 {
    match K {
        F16 => _mm512_cvtph_ps(_mm256_loadu_si256(w.cast::<u16>().add(i).cast())),
        // bf16 is the top half of an f32: widen and shift.
        BF16 => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
            _mm256_loadu_si256(w.cast::<u16>().add(i).cast()),
        ))),
        _ => _mm512_loadu_ps(w.cast::<f32>().add(i)),
    }
}

/// 8 weights of kind `K` from `w` (bytes) at element `i`, as f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load8<const K: u8>(w: *const u8, i: usize) -> __m256 {
    match K {
        F16 => _mm256_cvtph_ps(_mm_loadu_si128(w.cast::<u16>().add(i).cast())),
        BF16 => _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(
            _mm_loadu_si128(w.cast::<u16>().add(i).cast()),
        ))),
        _ => _mm256_loadu_ps(w.cast::<f32>().add(i)),
    }
}

/// Weight rows of kind `K` (`w`: whole rows of `cols` values, `cols` a multiple of 64) ×
/// `t` (1..=[`super::kquants::ROWS_512`]) f32 rows.
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub unsafe fn rows_512<const K: u8>(
    w: &[u8],
    cols: usize,
    x: &[f32],
    t: usize,
    out: *mut f32,
    ld: usize,
) {
    match t {
        1 => rows_512_t::<1, K>(w, cols, x, out, ld),
        2 => rows_512_t::<2, K>(w, cols, x, out, ld),
        3 => rows_512_t::<3, K>(w, cols, x, out, ld),
        _ => rows_512_t::<4, K>(w, cols, x, out, ld),
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
unsafe fn rows_512_t<const T: usize, const K: u8>(
    w: &[u8],
    cols: usize,
    x: &[f32],
    out: *mut f32,
    ld: usize,
) {
    debug_assert!(cols.is_multiple_of(64));
    let row_bytes = cols * width(K);
    let n_rows = w.len() / row_bytes;
    let xp = x.as_ptr();
    for r in 0..n_rows {
        let row = w.as_ptr().add(r * row_bytes);
        let mut acc = [[_mm512_setzero_ps(); 4]; T];
        for c in (0..cols).step_by(64) {
            prefetch(row.add(c * width(K)), 64 * width(K));
            let wv: [__m512; 4] = std::array::from_fn(|j| load16::<K>(row, c + 16 * j));
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

/// Weight rows of kind `K` × `t` (1..=[`super::kquants::ROWS_256`]) f32 rows, with 256-bit
/// vectors (`cols` a multiple of 32).
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn rows_256<const K: u8>(
    w: &[u8],
    cols: usize,
    x: &[f32],
    t: usize,
    out: *mut f32,
    ld: usize,
) {
    match t {
        1 => rows_256_t::<1, K>(w, cols, x, out, ld),
        _ => rows_256_t::<2, K>(w, cols, x, out, ld),
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_256_t<const T: usize, const K: u8>(
    w: &[u8],
    cols: usize,
    x: &[f32],
    out: *mut f32,
    ld: usize,
) {
    debug_assert!(cols.is_multiple_of(32));
    let row_bytes = cols * width(K);
    let n_rows = w.len() / row_bytes;
    let xp = x.as_ptr();
    for r in 0..n_rows {
        let row = w.as_ptr().add(r * row_bytes);
        let mut acc = [[_mm256_setzero_ps(); 4]; T];
        for c in (0..cols).step_by(32) {
            prefetch(row.add(c * width(K)), 32 * width(K));
            let wv: [__m256; 4] = std::array::from_fn(|j| load8::<K>(row, c + 8 * j));
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
