//! Matrix-vector kernels for Q4_K and Q6_K with bf16 dot products (AVX512_BF16).
//!
//! Why: on f32 FMAs, turning each 4-bit weight into an f32 costs a widening, a conversion
//! and a multiply-add before the product itself, and that made decoding compute-bound (14
//! tokens/s on a 1.5 B Q4_K_M model on 2 cores, where memory allows ~30). Here a weight
//! becomes bf16 by one table lookup (its integer value is exact in bf16), and `vdpbf16ps`
//! does 32 multiply-adds per instruction with f32 accumulation.
//!
//! The activations are rounded to bf16 (8 significant bits, relative error ≤ 2⁻⁸) once per
//! product. That is not
//! the 8-bit *block* quantization that breaks SmolLM2 (one outlier in a block of 32 crushes
//! the other 31): every value keeps its own exponent, as in the bf16 the models were trained
//! in. The sub-block scales and minimums stay f32.
//!
//! A row's arithmetic does not depend on how many rows share the pass (two accumulators per
//! row, whatever the count), so batched and solo replies are the same bit for bit.

use std::arch::x86_64::*;

use super::{f16_to_f32, hsum, hsum512};
use crate::engine::kernels::formats::{BlockQ4_0, BlockQ6K, BlockQ8_0, NibbleBlock, QK, QK_K};

/// Activation rows per pass: 4 rows × 2 accumulators + the minimums' sums + weights fit.
pub const ROWS: usize = 4;

/// bf16 bit patterns of the integers `base..base + 32`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma,f16c")]
unsafe fn int_table(base: i32) -> __m512i {
    let ints = _mm512_add_epi32(
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
        _mm512_set1_epi32(base),
    );
    let lo = _mm512_cvtepi32_ps(ints);
    let hi = _mm512_cvtepi32_ps(_mm512_add_epi32(ints, _mm512_set1_epi32(16)));
    // Small integers are exact in bf16, so the conversion's rounding changes nothing.
    std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo))
}

/// A product's activation rows as the bf16 kernels read them, made once per product by the
/// first band of a thread that needs them (decode and prompt bands alike).
#[derive(Default)]
pub struct Activations {
    /// The rows as bf16.
    pub xb: Vec<u16>,
    /// Each row's sums of 32 rounded values.
    pub xsum: Vec<f32>,
    ready: bool,
    /// The rows in the order [`q4k_rows`] reads them (see [`q4k_order`]), made when a Q4_K
    /// decode band first needs them.
    pub xq4: Vec<u16>,
    q4_ready: bool,
}

impl Activations {
    /// Makes them from `x` (rows of f32) unless done already for this product.
    ///
    /// # Safety
    /// AVX512_BF16 must be present; the rows' width a multiple of 32.
    pub unsafe fn prepare(&mut self, x: &[f32]) -> &Activations {
        if !self.ready {
            prepare(x, &mut self.xb, &mut self.xsum);
            self.ready = true;
        }
        self
    }

    /// [`Self::prepare`], plus the rows in [`q4k_rows`]' order.
    ///
    /// # Safety
    /// As [`Self::prepare`]; the rows' width a multiple of 256.
    pub unsafe fn prepare_q4k(&mut self, x: &[f32]) -> &Activations {
        self.prepare(x);
        if !self.q4_ready {
            q4k_order(&self.xb, &mut self.xq4);
            self.q4_ready = true;
        }
        self
    }
}

/// `xb` reordered for [`q4k_rows`]: each 128 values (two Q4_K groups of 64, each 32 values
/// from low nibbles then 32 from high nibbles) become four vectors of 32, matching the four
/// nibbles of each 16-bit word of the 64 weight bytes that hold them: the even then the odd
/// values of both groups' low halves, then the same of their high halves.
///
/// # Safety
/// AVX512_BF16 must be present; `xb.len()` a multiple of 128.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma,f16c")]
unsafe fn q4k_order(xb: &[u16], out: &mut Vec<u16>) {
    out.resize(xb.len(), 0);
    let lanes = _mm512_set_epi16(
        62, 60, 58, 56, 54, 52, 50, 48, 46, 44, 42, 40, 38, 36, 34, 32, 30, 28, 26, 24, 22, 20, 18,
        16, 14, 12, 10, 8, 6, 4, 2, 0,
    );
    let (even, odd) = (lanes, _mm512_add_epi16(lanes, _mm512_set1_epi16(1)));
    for (src, dst) in xb.chunks_exact(128).zip(out.chunks_exact_mut(128)) {
        let v = |i: usize| _mm512_loadu_si512(src.as_ptr().add(32 * i) as *const __m512i);
        let (lo0, hi0, lo1, hi1) = (v(0), v(1), v(2), v(3));
        let d = dst.as_mut_ptr() as *mut __m512i;
        _mm512_storeu_si512(d, _mm512_permutex2var_epi16(lo0, even, lo1));
        _mm512_storeu_si512(d.add(1), _mm512_permutex2var_epi16(lo0, odd, lo1));
        _mm512_storeu_si512(d.add(2), _mm512_permutex2var_epi16(hi0, even, hi1));
        _mm512_storeu_si512(d.add(3), _mm512_permutex2var_epi16(hi0, odd, hi1));
    }
}

/// `x` (rows of `cols` f32) as bf16 into `xb`, and each row's sums of 32 values into `xsum`.
///
/// # Safety
/// AVX512_BF16 must be present; `cols` a multiple of 32.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma,f16c")]
unsafe fn prepare(x: &[f32], xb: &mut Vec<u16>, xsum: &mut Vec<f32>) {
    xb.resize(x.len(), 0);
    xsum.resize(x.len() / QK, 0.0);
    for ((c, b), s) in x
        .chunks_exact(QK)
        .zip(xb.chunks_exact_mut(QK))
        .zip(xsum.iter_mut())
    {
        let (a0, a1) = (
            _mm512_loadu_ps(c.as_ptr()),
            _mm512_loadu_ps(c.as_ptr().add(16)),
        );
        let v = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(a1, a0));
        _mm512_storeu_si512(b.as_mut_ptr() as *mut __m512i, v);
        // The sum of the rounded values, so that the minimums' term and the products'
        // term see the same activations: the error is then Σ w·(x̃ − x), small where w
        // is, instead of Σ d·q·(x̃ − x).
        let back =
            |half: __m256i| _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
        let lo = back(_mm512_castsi512_si256(v));
        let hi = back(_mm512_extracti64x4_epi64(v, 1));
        *s = hsum512(_mm512_add_ps(lo, hi));
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma,f16c")]
unsafe fn bh(v: __m512i) -> __m512bh {
    std::mem::transmute::<__m512i, __m512bh>(v)
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma,f16c")]
unsafe fn load_bh(p: *const u16) -> __m512bh {
    bh(_mm512_loadu_si512(p as *const __m512i))
}

/// Q4_K weight rows × `t` (1..=[`ROWS`]) rows of activations, given as bf16 `xq` in the
/// nibbles' order and 32-value sums `xsum` (see [`Activations::prepare_q4k`]):
/// `out[k * ld + r]` = weight row r · x row k.
///
/// # Safety
/// AVX512_BF16 must be present; `xb` holds t rows of `nb · 256` values, `xsum` their sums;
/// `out` has room for the cells written.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma,f16c")]
pub unsafe fn q4k_rows<B: NibbleBlock>(
    blocks: &[B],
    nb: usize,
    xq: &[u16],
    xsum: &[f32],
    t: usize,
    out: *mut f32,
    ld: usize,
) {
    by_rows!(t, [1, 2, 3], 4, q4k_rows_t<B>(blocks, nb, xq, xsum, out, ld))
}

/// Why this shape: decoding is memory-bound only while turning weights into bf16 costs
/// less than reading them. Each 16-bit word of a 64-byte load holds four nibbles; a shift
/// and one `vpternlogd` put a nibble v into a bf16 lane as `1 + v/128` (0x3F80 | v: exact),
/// with no widening or table lookup (those run on one port, which the f32 scales' shuffles
/// also need). Σ v·x = 128·Σ(1 + v/128)·x − 128·Σx, so the scale is taken ×128 and
/// 128·d·Σx joins the minimums' term, computed once per sub-block from the same rounded
/// activations. The activations come in the nibbles' order ([`Activations::prepare_q4k`]).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma,f16c")]
unsafe fn q4k_rows_t<const T: usize, B: NibbleBlock>(
    blocks: &[B],
    nb: usize,
    xq: &[u16],
    xsum: &[f32],
    out: *mut f32,
    ld: usize,
) {
    let cols = nb * QK_K;
    let n_rows = blocks.len() / nb;
    let (xp, sp) = (xq.as_ptr(), xsum.as_ptr());
    let nibble = _mm512_set1_epi16(0x000F);
    let one = _mm512_set1_epi16(0x3F80);
    let zero = _mm512_setzero_ps();
    let k128 = _mm256_set1_ps(128.0);
    // Lanes 0..8 of a product hold one group's sub-block, lanes 8..16 the next group's:
    // (low nibbles, high nibbles) of groups (0, 1) are sub-blocks (0, 2) and (1, 3), of
    // groups (2, 3) sub-blocks (4, 6) and (5, 7).
    let pick = |a: i32, b: i32| _mm512_set_epi32(b, b, b, b, b, b, b, b, a, a, a, a, a, a, a, a);
    let picks = [[pick(0, 2), pick(1, 3)], [pick(4, 6), pick(5, 7)]];
    // Q5_K's fifth bits: word lane w of the four nibble vectors of pair p (see `w0..w3`
    // below) takes bit 2·(2p + w/16) (+1 for high nibbles, +8 for a word's odd byte) of
    // `qh` word w mod 16.
    let half_lanes = |a: i16, b: i16| {
        _mm512_set_epi16(
            b, b, b, b, b, b, b, b, b, b, b, b, b, b, b, b, a, a, a, a, a, a, a, a, a, a, a, a, a,
            a, a, a,
        )
    };
    let fifth = [0i16, 4].map(|p| {
        let lo = half_lanes(p, p + 2);
        [
            lo,
            _mm512_add_epi16(lo, _mm512_set1_epi16(8)),
            _mm512_add_epi16(lo, _mm512_set1_epi16(1)),
            _mm512_add_epi16(lo, _mm512_set1_epi16(9)),
        ]
    });
    let bit4 = _mm512_set1_epi16(0x10);
    for r in 0..n_rows {
        let row = blocks.as_ptr().add(r * nb);
        let mut acc = [[zero; 2]; T];
        let mut mins = [_mm256_setzero_ps(); T];
        for b in 0..nb {
            let blk = &*row.add(b);
            prefetch(blk as *const B as *const u8);
            if B::FIFTH_BIT {
                // Q5_K blocks are 176 bytes: a third line.
                _mm_prefetch::<_MM_HINT_T0>(
                    (blk as *const B as *const i8).wrapping_add(PREFETCH_AHEAD + 192),
                );
            }
            let (ds, ms) = super::kquants::q4k_scales(blk);
            let d = _mm256_mul_ps(_mm256_loadu_ps(ds.as_ptr()), k128);
            let corr = _mm256_add_ps(d, _mm256_loadu_ps(ms.as_ptr()));
            let d = _mm512_castps256_ps512(d);
            let qh = if B::FIFTH_BIT {
                _mm512_broadcast_i64x4(_mm256_loadu_si256(blk.qh().as_ptr() as *const __m256i))
            } else {
                _mm512_setzero_si512()
            };
            for (p, pk) in picks.iter().enumerate() {
                let v = _mm512_loadu_si512(blk.qs().as_ptr().add(64 * p) as *const __m512i);
                // bf16 `1 + v/128` with v's fifth bit (Q5_K) at bit 4: (bit << 4) | 0x3F80.
                let high = |k: usize| {
                    if B::FIFTH_BIT {
                        let b = _mm512_slli_epi16::<4>(_mm512_srlv_epi16(qh, fifth[p][k]));
                        _mm512_ternarylogic_epi32::<0xEA>(b, bit4, one)
                    } else {
                        one
                    }
                };
                let w0 = bh(_mm512_ternarylogic_epi32::<0xEA>(v, nibble, high(0)));
                let w1 = bh(_mm512_ternarylogic_epi32::<0xEA>(
                    _mm512_srli_epi16::<8>(v),
                    nibble,
                    high(1),
                ));
                let w2 = bh(_mm512_ternarylogic_epi32::<0xEA>(
                    _mm512_srli_epi16::<4>(v),
                    nibble,
                    high(2),
                ));
                let w3 = bh(_mm512_or_si512(_mm512_srli_epi16::<12>(v), high(3)));
                let (s_lo, s_hi) = (
                    _mm512_permutexvar_ps(pk[0], d),
                    _mm512_permutexvar_ps(pk[1], d),
                );
                for (k, a) in acc.iter_mut().enumerate() {
                    let x = xp.add(k * cols + b * QK_K + p * 128);
                    let lo = _mm512_dpbf16_ps(
                        _mm512_dpbf16_ps(zero, w0, load_bh(x)),
                        w1,
                        load_bh(x.add(32)),
                    );
                    let hi = _mm512_dpbf16_ps(
                        _mm512_dpbf16_ps(zero, w2, load_bh(x.add(64))),
                        w3,
                        load_bh(x.add(96)),
                    );
                    a[0] = _mm512_fmadd_ps(lo, s_lo, a[0]);
                    a[1] = _mm512_fmadd_ps(hi, s_hi, a[1]);
                }
            }
            for (k, s) in mins.iter_mut().enumerate() {
                *s = _mm256_fmadd_ps(corr, _mm256_loadu_ps(sp.add(k * cols / QK + b * 8)), *s);
            }
        }
        for k in 0..T {
            *out.add(k * ld + r) = hsum512(_mm512_add_ps(acc[k][0], acc[k][1])) - hsum(mins[k]);
        }
    }
}

/// Bytes ahead of the block being read that [`prefetch`] asks for.
const PREFETCH_AHEAD: usize = 4096;

/// Asks for the cache lines [`PREFETCH_AHEAD`] bytes past `p` (a block's start): the
/// hardware prefetcher alone left the decode kernels stalled on each new block's first line
/// (at ~22 GB/s of the ~27 the two cores can read).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma,f16c")]
unsafe fn prefetch(p: *const u8) {
    let ahead = p.wrapping_add(PREFETCH_AHEAD) as *const i8;
    _mm_prefetch::<_MM_HINT_T0>(ahead);
    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64));
    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(128));
}

/// A panel's rows (16 rows of `cols` bf16 values, row-major, as the panel builders leave
/// them in their staging buffer) in the layout the prompt kernels read: one column pair of
/// all 16 rows per 64 bytes, `q[(c/2)·32 + 2j + c%2]` = row j, column c. A 16 × 16
/// transpose of 32-bit pairs per 32 columns.
///
/// # Safety
/// AVX-512 must be present; `rows` holds 16 × `cols` values, `q` at least as many; `cols` a
/// multiple of 32.
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
pub unsafe fn interleave(rows: &[u16], cols: usize, q: &mut [u16]) {
    assert!(rows.len() >= PANEL * cols && q.len() >= PANEL * cols);
    for c0 in (0..cols).step_by(32) {
        let r: [__m512i; 16] = std::array::from_fn(|j| {
            _mm512_loadu_si512(rows.as_ptr().add(j * cols + c0) as *const __m512i)
        });
        // Within each 128-bit lane: 2 × 2, then 4 × 4 blocks of pairs transposed, so that
        // u[4g + c] holds column c of the lane's four columns for rows 4g..4g + 4.
        let t: [__m512i; 16] = std::array::from_fn(|k| {
            let (a, b) = (r[k & !1], r[k | 1]);
            if k % 2 == 0 {
                _mm512_unpacklo_epi32(a, b)
            } else {
                _mm512_unpackhi_epi32(a, b)
            }
        });
        let u: [__m512i; 16] = std::array::from_fn(|k| {
            let (g, c) = (k / 4, k % 4);
            let (a, b) = (t[4 * g + c / 2], t[4 * g + 2 + c / 2]);
            if c % 2 == 0 {
                _mm512_unpacklo_epi64(a, b)
            } else {
                _mm512_unpackhi_epi64(a, b)
            }
        });
        // Then the lanes: output pair 4L + c gathers lane L of u[c], u[4 + c], u[8 + c],
        // u[12 + c].
        let dst = q.as_mut_ptr().add(c0 * PANEL) as *mut __m512i;
        for c in 0..4 {
            let v0 = _mm512_shuffle_i32x4::<0x88>(u[c], u[4 + c]);
            let v1 = _mm512_shuffle_i32x4::<0xDD>(u[c], u[4 + c]);
            let w0 = _mm512_shuffle_i32x4::<0x88>(u[8 + c], u[12 + c]);
            let w1 = _mm512_shuffle_i32x4::<0xDD>(u[8 + c], u[12 + c]);
            _mm512_storeu_si512(dst.add(c), _mm512_shuffle_i32x4::<0x88>(v0, w0));
            _mm512_storeu_si512(dst.add(4 + c), _mm512_shuffle_i32x4::<0x88>(v1, w1));
            _mm512_storeu_si512(dst.add(8 + c), _mm512_shuffle_i32x4::<0xDD>(v0, w0));
            _mm512_storeu_si512(dst.add(12 + c), _mm512_shuffle_i32x4::<0xDD>(v1, w1));
        }
    }
}

/// Q4_0 weight rows × `t` (1..=[`ROWS`]) rows of bf16 activations `xb` (in their own order)
/// and their 32-value sums `xsum` (see [`Activations::prepare`]).
///
/// As in [`q4k_rows_t`], a nibble q becomes the bf16 `1 + q/128` with one `vpternlogd`
/// (0x3F80 | q: exact), so Σ (q − 8)·x = 128·Σ(1 + q/128)·x − 136·Σx: the block's scale is
/// taken ×128 on the products, and `d·Σx` is summed apart and taken ×136 once per row.
///
/// # Safety
/// AVX512_BF16 must be present; `xb` holds t rows of `nb · 32` values, `xsum` their sums;
/// `out` has room for the cells written.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma,f16c")]
pub unsafe fn q4_0_rows(
    blocks: &[BlockQ4_0],
    nb: usize,
    xb: &[u16],
    xsum: &[f32],
    t: usize,
    out: *mut f32,
    ld: usize,
) {
    by_rows!(t, [1, 2, 3], 4, q4_0_rows_t(blocks, nb, xb, xsum, out, ld))
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma,f16c")]
unsafe fn q4_0_rows_t<const T: usize>(
    blocks: &[BlockQ4_0],
    nb: usize,
    xb: &[u16],
    xsum: &[f32],
    out: *mut f32,
    ld: usize,
) {
    let cols = nb * QK;
    let n_rows = blocks.len() / nb;
    let (xp, sp) = (xb.as_ptr(), xsum.as_ptr());
    let nibble = _mm512_set1_epi16(0x000F);
    let one = _mm512_set1_epi16(0x3F80);
    let zero = _mm512_setzero_ps();
    for r in 0..n_rows {
        let row = blocks.as_ptr().add(r * nb);
        let mut acc = [zero; T];
        let mut dx = [0f32; T];
        for b in 0..nb {
            let blk = &*row.add(b);
            // Four 18-byte blocks span 72 bytes: the two lines [`prefetch`] asks for (of
            // three) every fourth block keep ahead without an instruction per block.
            if b % 4 == 0 {
                let ahead = (blk as *const BlockQ4_0 as *const i8).wrapping_add(PREFETCH_AHEAD);
                _mm_prefetch::<_MM_HINT_T0>(ahead);
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64));
            }
            // The 16 bytes as words, then the same shifted by 4: lanes 0..16 hold values
            // 0..16 in their low nibble, lanes 16..32 values 16..32.
            let bytes = _mm256_cvtepu8_epi16(_mm_loadu_si128(blk.qs.as_ptr() as *const __m128i));
            let both = _mm512_inserti64x4::<1>(
                _mm512_castsi256_si512(bytes),
                _mm256_srli_epi16::<4>(bytes),
            );
            // (both & 0x000F) | 0x3F80
            let w = bh(_mm512_ternarylogic_epi32::<0xEA>(both, nibble, one));
            let d = f16_to_f32(blk.d);
            let d128 = _mm512_set1_ps(d * 128.0);
            for k in 0..T {
                let x = load_bh(xp.add(k * cols + b * QK));
                let p = _mm512_dpbf16_ps(zero, w, x);
                acc[k] = _mm512_fmadd_ps(p, d128, acc[k]);
                dx[k] += d * *sp.add(k * nb + b);
            }
        }
        for k in 0..T {
            *out.add(k * ld + r) = hsum512(acc[k]) - 136.0 * dx[k];
        }
    }
}

/// Q6_K weight rows × `t` (1..=[`ROWS`]) rows of activations given as [`Activations`] holds them.
///
/// # Safety
/// As [`q4k_rows`].
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma,f16c")]
pub unsafe fn q6k_rows(
    blocks: &[BlockQ6K],
    nb: usize,
    xb: &[u16],
    t: usize,
    out: *mut f32,
    ld: usize,
) {
    by_rows!(t, [1, 2, 3], 4, q6k_rows_t(blocks, nb, xb, out, ld))
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma,f16c")]
unsafe fn q6k_rows_t<const T: usize>(
    blocks: &[BlockQ6K],
    nb: usize,
    xb: &[u16],
    out: *mut f32,
    ld: usize,
) {
    let cols = nb * QK_K;
    let n_rows = blocks.len() / nb;
    let xp = xb.as_ptr();
    // bf16 of q − 32 for q in 0..64.
    let (t_lo, t_hi) = (int_table(-32), int_table(0));
    // Lanes 0..8 of a dot product hold values 0..16 of 32 (sub-block 2k), lanes 8..16 the
    // next 16 (sub-block 2k + 1): the scale vector repeats each of the two eight times.
    let pick = |k: usize| {
        _mm512_set_epi32(
            2 * k as i32 + 1,
            2 * k as i32 + 1,
            2 * k as i32 + 1,
            2 * k as i32 + 1,
            2 * k as i32 + 1,
            2 * k as i32 + 1,
            2 * k as i32 + 1,
            2 * k as i32 + 1,
            2 * k as i32,
            2 * k as i32,
            2 * k as i32,
            2 * k as i32,
            2 * k as i32,
            2 * k as i32,
            2 * k as i32,
            2 * k as i32,
        )
    };
    let picks = [pick(0), pick(1), pick(2), pick(3)];
    let zero = _mm512_setzero_ps();
    for r in 0..n_rows {
        let row = blocks.as_ptr().add(r * nb);
        let mut acc = [[zero; 2]; T];
        for b in 0..nb {
            let blk = &*row.add(b);
            prefetch(blk as *const BlockQ6K as *const u8);
            _mm_prefetch::<_MM_HINT_T0>(
                (blk as *const BlockQ6K as *const i8).wrapping_add(PREFETCH_AHEAD + 192),
            );
            let d = _mm512_set1_ps(f16_to_f32(blk.d));
            // d · sc for the 16 sub-blocks, as ggml rounds it.
            let sc16 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                blk.scales.as_ptr() as *const __m128i,
            )));
            let scales = _mm512_mul_ps(d, sc16);
            for h in 0..2 {
                let groups = super::kquants::q6k_groups(blk, h);
                // The half's eight sub-block scales start at 8h.
                let half_scales = if h == 0 {
                    scales
                } else {
                    _mm512_shuffle_f32x4::<0b1110_1110>(scales, scales)
                };
                for (k, &q) in groups.iter().enumerate() {
                    let w = bh(_mm512_permutex2var_epi16(
                        t_lo,
                        _mm512_cvtepu8_epi16(q),
                        t_hi,
                    ));
                    let s = _mm512_permutexvar_ps(picks[k], half_scales);
                    for (i, a) in acc.iter_mut().enumerate() {
                        let p = xp.add(i * cols + b * QK_K + h * 128 + 32 * k);
                        a[k % 2] =
                            _mm512_fmadd_ps(_mm512_dpbf16_ps(zero, w, load_bh(p)), s, a[k % 2]);
                    }
                }
            }
        }
        for (k, a) in acc.iter().enumerate() {
            *out.add(k * ld + r) = hsum512(_mm512_add_ps(a[0], a[1]));
        }
    }
}

/// Weight rows per panel of the bf16 prompt kernel: one 512-bit vector holds a column pair
/// of all of them.
pub const PANEL: usize = 16;
/// Activation rows per call of the bf16 prompt kernel: 8 sums + 8 accumulators + weights,
/// scales and a broadcast fit the 32 registers.
pub const MR: usize = 8;

/// A byte panel of Q4_K, Q5_K or Q4_0 weight rows (16 rows × `cols` small unsigned
/// integers, row-major, as [`super::int8::q4k_panel`] and [`super::int8::offset32_panel`] make
/// them with their scales and minimums) as exact bf16 values, row-major in `q` for
/// [`interleave`]: the bf16 and AMX prompt kernels read the same panels as the 8-bit one.
///
/// # Safety
/// AVX512_BF16 must be present; `bytes` holds 16 × `cols` bytes of values below 32; `cols` a
/// multiple of 32.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma,f16c")]
pub unsafe fn widen(bytes: &[u16], cols: usize, q: &mut Vec<u16>) {
    assert!(bytes.len() * 2 >= cols * PANEL);
    q.clear();
    q.resize(cols * PANEL, 0);
    let table = int_table(0);
    let src = bytes.as_ptr() as *const u8;
    for i in (0..cols * PANEL).step_by(32) {
        let v = _mm256_loadu_si256(src.add(i) as *const __m256i);
        let w = _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(v), table);
        _mm512_storeu_si512(q.as_mut_ptr().add(i) as *mut __m512i, w);
    }
}

/// A panel of [`PANEL`] BF16 weight rows for [`gemm`]: the values as they are, row-major as
/// [`widen`] leaves the others, with a scale of 1 per 32-column block. Rows past `width` are
/// zero.
///
/// # Safety
/// AVX512_BF16 must be present; `rows` holds `width` (≤ 16) rows of `cols` (a multiple of
/// 32) bf16 values; the buffers are resized here.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma,f16c")]
pub unsafe fn bf16_panel(
    rows: &[u16],
    cols: usize,
    width: usize,
    q: &mut Vec<u16>,
    ds: &mut Vec<f32>,
) {
    q.clear();
    q.resize(cols * PANEL, 0);
    ds.clear();
    ds.resize(cols / QK * PANEL, 1.0);
    q[..width * cols].copy_from_slice(&rows[..width * cols]);
}

/// A panel of [`PANEL`] Q8_0 weight rows for [`gemm`] (kind [`Panel::Plain32`]): their
/// integers as exact bf16 (|q| ≤ 128 needs 8 significant bits at most), row-major, and each
/// block's `d` per row (`ds[b·16 + j]`). Rows past `width` are zero.
///
/// Why: with f32 panels a 1.5 B Q8_0 file read prompts at 0.91× llama.cpp's speed
/// (Sapphire Rapids VM, 2026-12-07), where the other formats' bf16 panels (and AMX tiles)
/// ran 1.6–2.7×.
///
/// # Safety
/// AVX512_BF16 must be present; `rows` holds `width` (≤ 16) rows of `nb` blocks; the buffers
/// are resized here.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma,f16c")]
pub unsafe fn q8_0_panel(
    rows: &[BlockQ8_0],
    nb: usize,
    width: usize,
    q: &mut Vec<u16>,
    ds: &mut Vec<f32>,
) {
    let cols = nb * QK;
    q.clear();
    q.resize(cols * PANEL, 0);
    ds.clear();
    ds.resize(nb * PANEL, 0.0);
    for j in 0..width {
        for b in 0..nb {
            let blk = &rows[j * nb + b];
            ds[b * PANEL + j] = f16_to_f32(blk.d);
            let half = |h: usize| {
                let v = _mm_loadu_si128(blk.qs.as_ptr().add(16 * h) as *const __m128i);
                _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v))
            };
            // Exact: every integer of 8 significant bits or fewer is a bf16.
            let w: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(half(1), half(0)));
            _mm512_storeu_si512(q.as_mut_ptr().add(j * cols + b * QK) as *mut __m512i, w);
        }
    }
}

/// A byte panel of Q6_K weight rows (as [`super::int8::q6k_panel`] makes it: values `q`
/// below 64, a scale per 16 columns) as the exact bf16 values `q − 32`, row-major in `q` for
/// [`interleave`], as [`widen`] does for the other formats' byte panels.
///
/// # Safety
/// AVX512_BF16 must be present; `bytes` holds 16 × `cols` bytes of values below 64; `cols` a
/// multiple of 32.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma,f16c")]
pub unsafe fn widen_q6k(bytes: &[u16], cols: usize, q: &mut Vec<u16>) {
    assert!(bytes.len() * 2 >= cols * PANEL);
    q.clear();
    q.resize(cols * PANEL, 0);
    let (t_lo, t_hi) = (int_table(-32), int_table(0));
    let src = bytes.as_ptr() as *const u8;
    for i in (0..cols * PANEL).step_by(32) {
        let v = _mm256_loadu_si256(src.add(i) as *const __m256i);
        let w = _mm512_permutex2var_epi16(t_lo, _mm512_cvtepu8_epi16(v), t_hi);
        _mm512_storeu_si512(q.as_mut_ptr().add(i) as *mut __m512i, w);
    }
}

/// What a panel's blocks hold, which picks the prompt kernel's block width and whether it
/// subtracts minimums.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Panel {
    /// 32-column blocks with a scale and a minimum ([`widen`]ed byte panels).
    Mins32,
    /// 32-column blocks with a scale ([`bf16_panel`], [`q8_0_panel`]).
    Plain32,
    /// 16-column blocks with a scale ([`widen_q6k`]).
    Plain16,
}

/// `out[k][j] = Σ_c x[k][c] · w[j][c]` for `m` (1..=[`MR`]) activation rows (bf16 `xb`, with
/// their 32-value sums `xsum`, as [`Activations`] holds them) and the 16 rows of a panel of
/// kind `panel` (`ms` unused without minimums); row k of the result goes to `out + k · ld`
/// (16 values).
///
/// # Safety
/// AVX512_BF16 must be present; `xb` holds m rows of `cols`, `xsum` their sums; `out` has
/// room for m rows of 16 at stride `ld`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma,f16c")]
pub unsafe fn gemm(
    panel: Panel,
    m: usize,
    q: &[u16],
    ds: &[f32],
    ms: &[f32],
    xb: &[u16],
    xsum: &[f32],
    cols: usize,
    out: *mut f32,
    ld: usize,
) {
    let args = (q, ds, ms, xb, xsum, cols, out, ld);
    match panel {
        Panel::Mins32 => gemm_rows::<32, true>(m, args),
        Panel::Plain32 => gemm_rows::<32, false>(m, args),
        Panel::Plain16 => gemm_rows::<16, false>(m, args),
    }
}

/// [`gemm`]'s arguments after the row count.
type GemmArgs<'a> = (
    &'a [u16],
    &'a [f32],
    &'a [f32],
    &'a [u16],
    &'a [f32],
    usize,
    *mut f32,
    usize,
);

/// [`gemm_m`] with the row count `m` fixed at compile time, so the accumulators live in
/// registers.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma,f16c")]
unsafe fn gemm_rows<const G: usize, const MINS: bool>(m: usize, a: GemmArgs) {
    let (q, ds, ms, xb, xsum, cols, out, ld) = a;
    match m {
        1 => gemm_m::<1, G, MINS>(q, ds, ms, xb, xsum, cols, out, ld),
        2 => gemm_m::<2, G, MINS>(q, ds, ms, xb, xsum, cols, out, ld),
        3 => gemm_m::<3, G, MINS>(q, ds, ms, xb, xsum, cols, out, ld),
        4 => gemm_m::<4, G, MINS>(q, ds, ms, xb, xsum, cols, out, ld),
        5 => gemm_m::<5, G, MINS>(q, ds, ms, xb, xsum, cols, out, ld),
        6 => gemm_m::<6, G, MINS>(q, ds, ms, xb, xsum, cols, out, ld),
        7 => gemm_m::<7, G, MINS>(q, ds, ms, xb, xsum, cols, out, ld),
        _ => gemm_m::<8, G, MINS>(q, ds, ms, xb, xsum, cols, out, ld),
    }
}

/// The prompt kernel: per sub-block of `G` columns, `vdpbf16ps` sums of the panel's exact
/// values against M activation rows, scaled by the rows' `d·sc` (and, with `MINS`, less
/// `dmin·m · Σx`) into f32 accumulators.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx2,fma,f16c")]
unsafe fn gemm_m<const M: usize, const G: usize, const MINS: bool>(
    q: &[u16],
    ds: &[f32],
    ms: &[f32],
    xb: &[u16],
    xsum: &[f32],
    cols: usize,
    out: *mut f32,
    ld: usize,
) {
    let zero = _mm512_setzero_ps();
    let mut acc = [zero; M];
    let (qp, xp) = (q.as_ptr(), xb.as_ptr() as *const i32);
    let subs = cols / G;
    for s in 0..subs {
        let mut t = [zero; M];
        for p in 0..G / 2 {
            let at = (s * G / 2 + p) * 2 * PANEL;
            let w = bh(_mm512_loadu_si512(qp.add(at) as *const __m512i));
            for (k, tk) in t.iter_mut().enumerate() {
                let xpair = _mm512_set1_epi32(*xp.add((k * cols) / 2 + s * G / 2 + p));
                *tk = _mm512_dpbf16_ps(*tk, w, bh(xpair));
            }
        }
        let d = _mm512_loadu_ps(ds.as_ptr().add(s * PANEL));
        for (k, a) in acc.iter_mut().enumerate() {
            *a = _mm512_fmadd_ps(t[k], d, *a);
        }
        if MINS {
            let mn = _mm512_loadu_ps(ms.as_ptr().add(s * PANEL));
            for (k, a) in acc.iter_mut().enumerate() {
                *a = _mm512_fnmadd_ps(mn, _mm512_set1_ps(xsum[k * subs + s]), *a);
            }
        }
    }
    for (k, a) in acc.iter().enumerate() {
        _mm512_storeu_ps(out.add(k * ld), *a);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`interleave`]'s transposes put every value where the kernels read it:
    /// `q[(c/2)·32 + 2j + c%2]` = row j, column c.
    #[test]
    fn interleave_puts_column_pairs_of_all_rows_together() {
        if !super::super::avx512() {
            return;
        }
        let cols = 96;
        let rows: Vec<u16> = (0..PANEL * cols).map(|i| i as u16).collect();
        let mut q = vec![0u16; PANEL * cols];
        // SAFETY: AVX-512 checked above; both buffers hold 16 × cols values.
        unsafe { interleave(&rows, cols, &mut q) };
        for j in 0..PANEL {
            for c in 0..cols {
                assert_eq!(
                    q[(c / 2) * 32 + 2 * j + c % 2],
                    rows[j * cols + c],
                    "({j}, {c})"
                );
            }
        }
    }
}
