//! x86-64 kernels, chosen at run time by CPU feature.

use std::arch::x86_64::*;
use std::sync::OnceLock;

use crate::engine::kernels::formats::Nibbles32;

/// Calls `f::<T>(args)` for the run-time row count `t`, one arm per listed count and
/// `last` for the rest, so each kernel's accumulators are a fixed-size array in registers.
macro_rules! by_rows {
    ($t:expr, [$($n:literal),*], $last:literal, $f:ident $args:tt) => {
        match $t {
            $($n => $f::<$n> $args,)*
            _ => $f::<$last> $args,
        }
    };
    // With the kernel's block type after the row count.
    ($t:expr, [$($n:literal),*], $last:literal, $f:ident<$g:ty> $args:tt) => {
        match $t {
            $($n => $f::<$n, $g> $args,)*
            _ => $f::<$last, $g> $args,
        }
    };
}

pub mod amx;
pub mod attention512;
pub mod avx2;
pub mod avx512;
pub mod bf16;
pub mod floats;
pub mod glu;
pub mod int16;
pub mod int16_512;
pub mod int8;
pub mod kquants;

pub fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    })
}

/// AVX-512 for the matrix-vector kernels. Chosen once per process, so every product of
/// a run takes the same arithmetic (a sequence's tokens must not depend on batching).
pub fn avx512() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| available() && is_x86_feature_detected!("avx512f") && super::isa().avx512)
}

/// bf16 dot products (AVX512_BF16) for the K-quant matrix-vector kernels ([`bf16`]).
/// `--no-bf16` turns them off (the f32 kernels of [`kquants`] run instead).
pub fn bf16() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        avx512()
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512bf16")
            && super::isa().bf16
    })
}

/// AMX tiles (`tdpbf16ps`) for the prompt kernel's bf16 panels ([`amx`]), where the bf16
/// kernels run, the CPU has AMX-BF16 and the OS lets this process use the tiles. `--no-amx`
/// turns them off (the AVX512_BF16 prompt kernel runs instead).
pub fn amx() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| bf16() && super::isa().amx && amx::usable())
}

/// 16-bit integer activations ([`int16`]) for the matrix-vector kernels of Q4_0, Q4_1 and
/// Q8_0, and of the K-quants where the bf16 ones are not used (see
/// `kernels::decode::rounding`). `--no-int16` turns them off (the bf16 kernels, where the
/// CPU has them, or the f32 kernels of [`kquants`], [`avx2`] and [`avx512`] run instead).
pub fn int16() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| available() && super::isa().int16)
}

/// The AVX-512 forms of the 16-bit integer decode kernels ([`int16_512`]: `vpdpwssd`), for
/// every format those take, wherever they run on a CPU with AVX512BW and AVX512_VNNI;
/// `--no-avx512` turns them off (the 256-bit ones of [`int16`] run instead).
pub fn int16_512() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        int16()
            && avx512()
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
    })
}

/// 8-bit activations with each block's outliers kept exact ([`int8`]) for the prompt
/// kernels of Q4_K, Q5_K, Q6_K, Q4_0 and Q8_0, where the CPU has AVX512_VNNI and AMX tiles
/// are not used (they are faster still). `--no-int8` turns them off (the bf16 or f32 panels run
/// instead).
pub fn int8() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        avx512()
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
            && super::isa().int8
            && !amx()
    })
}

/// The AVX2 form of the 8-bit prompt kernel ([`int8::gemm_avx2`]: `vpmaddubsw`) where
/// neither the AVX512_VNNI one nor the bf16 kernels run: CPUs without AVX-512 (most desktops
/// and laptops), or without its VNNI and BF16 parts. `--no-int8` turns it off too (f32
/// panels then).
pub fn int8_avx2() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| available() && !int8() && !bf16() && super::isa().int8)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum(v: __m256) -> f32 {
    let lo = _mm256_castps256_ps128(v);
    let hi = _mm256_extractf128_ps(v, 1);
    let s = _mm_add_ps(lo, hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn f16_to_f32(h: half::f16) -> f32 {
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h.to_bits() as i32)))
}

/// A Q4_0 or Q4_1 block's `d` and `m` as f32: its values are `d q + m` (see
/// [`Nibbles32`]).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_dm<B: Nibbles32>(b: &B) -> (f32, f32) {
    let d = f16_to_f32(b.d());
    let m = match b.m() {
        Some(m) => f16_to_f32(m),
        None => -8.0 * d,
    };
    (d, m)
}

/// The sum of a 512-bit vector's 16 lanes.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
pub unsafe fn hsum512(v: __m512) -> f32 {
    let lo = _mm512_castps512_ps256(v);
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    hsum(_mm256_add_ps(lo, hi))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::kernels::formats::{
        cast, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, QK, QK_K,
    };
    use crate::engine::kernels::testing::{matrix, reference};
    use candle_core::quantized::GgmlDType;

    /// Both vector widths of the generated-row kernels (the machine picks one per
    /// process, so the other would go untested): close to the reference, and each row's
    /// result independent of how many rows share the call.
    #[test]
    fn avx2_and_avx512_row_kernels() {
        if !available() {
            return;
        }
        for dtype in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q8_0,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
            GgmlDType::F16,
            GgmlDType::BF16,
            GgmlDType::F32,
        ] {
            let (rows, cols) = (24, 512);
            let (m, w) = matrix(rows, cols, dtype);
            let n = 7;
            let x: Vec<f32> = (0..n * cols).map(|i| (i as f32 * 0.13).cos()).collect();
            let want = reference(&w, &x, rows, cols, n);
            let mut widths = vec![false];
            if avx512() {
                widths.push(true);
            }
            for wide in widths {
                // Rows of x in passes of the kernel's most rows, as `decode_band` runs them.
                let run = |xs: &[f32], t: usize| {
                    let mut out = vec![0f32; t * rows];
                    let data = m.rows_data(0, rows);
                    let most = match (dtype, wide) {
                        (GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q8_0, _) => 8,
                        (_, true) => kquants::ROWS_512,
                        (_, false) => kquants::ROWS_256,
                    };
                    let mut i = 0;
                    while i < t {
                        let p = (t - i).min(most);
                        let xs = &xs[i * cols..(i + p) * cols];
                        let o = out[i * rows..].as_mut_ptr();
                        let (nb, nk) = (cols / QK, cols / QK_K);
                        // SAFETY: features checked above; `xs` holds p rows, `out` from row
                        // i on holds p × rows.
                        unsafe {
                            match (dtype, wide) {
                                (GgmlDType::Q4_0, false) => {
                                    avx2::q4_rows::<BlockQ4_0>(cast(data), nb, xs, p, o, rows)
                                }
                                (GgmlDType::Q4_0, true) => {
                                    avx512::q4_rows_512::<BlockQ4_0>(cast(data), nb, xs, p, o, rows)
                                }
                                (GgmlDType::Q4_1, false) => {
                                    avx2::q4_rows::<BlockQ4_1>(cast(data), nb, xs, p, o, rows)
                                }
                                (GgmlDType::Q4_1, true) => {
                                    avx512::q4_rows_512::<BlockQ4_1>(cast(data), nb, xs, p, o, rows)
                                }
                                (GgmlDType::Q8_0, false) => {
                                    avx2::q8_0_rows(cast(data), nb, xs, p, o, rows)
                                }
                                (GgmlDType::Q8_0, true) => {
                                    avx512::q8_0_rows_512(cast(data), nb, xs, p, o, rows)
                                }
                                (GgmlDType::Q4K, false) => kquants::q4k_rows_256::<BlockQ4K>(
                                    cast(data),
                                    nk,
                                    xs,
                                    p,
                                    o,
                                    rows,
                                ),
                                (GgmlDType::Q4K, true) => kquants::q4k_rows_512::<BlockQ4K>(
                                    cast(data),
                                    nk,
                                    xs,
                                    p,
                                    o,
                                    rows,
                                ),
                                (GgmlDType::Q5K, false) => kquants::q4k_rows_256::<BlockQ5K>(
                                    cast(data),
                                    nk,
                                    xs,
                                    p,
                                    o,
                                    rows,
                                ),
                                (GgmlDType::Q5K, true) => kquants::q4k_rows_512::<BlockQ5K>(
                                    cast(data),
                                    nk,
                                    xs,
                                    p,
                                    o,
                                    rows,
                                ),
                                (GgmlDType::F16, false) => {
                                    floats::rows_256::<{ floats::F16 }>(data, cols, xs, p, o, rows)
                                }
                                (GgmlDType::F16, true) => {
                                    floats::rows_512::<{ floats::F16 }>(data, cols, xs, p, o, rows)
                                }
                                (GgmlDType::BF16, false) => {
                                    floats::rows_256::<{ floats::BF16 }>(data, cols, xs, p, o, rows)
                                }
                                (GgmlDType::BF16, true) => {
                                    floats::rows_512::<{ floats::BF16 }>(data, cols, xs, p, o, rows)
                                }
                                (GgmlDType::F32, false) => {
                                    floats::rows_256::<{ floats::F32 }>(data, cols, xs, p, o, rows)
                                }
                                (GgmlDType::F32, true) => {
                                    floats::rows_512::<{ floats::F32 }>(data, cols, xs, p, o, rows)
                                }
                                (_, false) => kquants::q6k_rows_256(cast(data), nk, xs, p, o, rows),
                                (_, true) => kquants::q6k_rows_512(cast(data), nk, xs, p, o, rows),
                            }
                        }
                        i += p;
                    }
                    out
                };
                let all = run(&x, n);
                for (a, b) in all.iter().zip(&want) {
                    assert!(
                        (a - b).abs() <= 1e-3 * (1.0 + b.abs()),
                        "{dtype:?} {wide}: {a} vs {b}"
                    );
                }
                for i in 0..n {
                    let one = run(&x[i * cols..(i + 1) * cols], 1);
                    assert_eq!(
                        one.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        all[i * rows..(i + 1) * rows]
                            .iter()
                            .map(|v| v.to_bits())
                            .collect::<Vec<_>>(),
                        "{dtype:?} avx512={wide}: row {i}"
                    );
                }
            }
        }
    }
}
