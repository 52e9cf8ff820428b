//! Matrix-vector kernels for the K-quants (Q4_K, Q5_K, Q6_K), Q4_0, Q4_1 and Q8_0 with 16-bit
//! integer activations, on AVX2: what decodes Q4_0, Q4_1 (SmolLM2) and Q8_0 files on every x86
//! CPU with AVX2, and Q4_K_M / Q5_K_M files on CPUs without AVX512_BF16 (every AVX2-only CPU —
//! most desktops and laptops — and AVX-512 CPUs before Cooper Lake and Zen 4); see
//! `kernels::decode::rounding`.
//!
//! Why: with f32 FMAs, turning each 4-bit weight into an f32 costs a widening, a conversion
//! and a multiply before the product itself, and that made decoding compute-bound (a 1.5 B
//! Q4_K_M model at 0.36× the speed of llama.cpp's AVX2 build, same machine; 0.85× with these
//! kernels). Here the weights become 16-bit integers where they
//! lie: each 16-bit word of the packed bytes holds four values (two bytes, two nibbles
//! each), and a shift and a mask put one of them in every lane — the even-numbered values of
//! a block in one vector, the odd-numbered ones in another, matching the activations' order
//! (see [`Activations`]). `vpmaddwd` then multiplies 16 weights with 16 activations and adds
//! pairs into 32-bit sums, exactly, and each 32-value block's sum is turned into f32 once
//! and scaled by the weights' sub-block scale times the activations' block scale.
//!
//! The activations: each block of 32 values becomes 16-bit integers with one f32 scale,
//! `x ≈ dx·q` with `dx = max|x| / 32767`: the rounding error of every value is at most
//! `max|x| / 65534` of its block. That is not the 8-bit block rounding that breaks SmolLM2
//! (llama.cpp's `q8_1`/`q8_K`: 127 levels, so one outlier in a block crushes the others):
//! here the others keep 256 times finer steps, a value 1000× smaller than its block's
//! outlier still about 5 significant bits, and every block without an outlier finer steps
//! than bf16's. Each block's sum of the rounded values (exact in integers) carries Q4_K's
//! minimums, so both terms see the same activations.
//!
//! A row's arithmetic does not depend on how many rows share the pass, so batched and solo
//! replies are the same bit for bit.

use std::arch::x86_64::*;

use super::{f16_to_f32, hsum};
use crate::engine::kernels::formats::{BlockQ6K, BlockQ8_0, NibbleBlock, Nibbles32, QK, QK_K};

/// Activation rows per pass: two accumulators per row, four weight vectors and temporaries
/// fit the 16 registers.
pub const ROWS: usize = 4;

/// A product's activation rows as these kernels read them, made once per product by the
/// first band of a thread that needs them.
#[derive(Default)]
pub struct Activations {
    /// Each 32-value block as 16-bit integers: its 16 even-numbered values, then its 16
    /// odd-numbered ones.
    pub xq: Vec<i16>,
    /// Each block's scale: the block's values are `dx · xq`.
    pub dx: Vec<f32>,
    /// Each block's sum of its rounded values, `dx · Σ xq`.
    pub xsum: Vec<f32>,
    /// The same for each half block (16 values, in their natural order): Q6_K's sub-blocks.
    pub xsum16: Vec<f32>,
    ready: bool,
}

impl Activations {
    /// Makes them from `x` (rows of f32) unless done already for this product.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be present; the rows' width a multiple of 32.
    pub unsafe fn prepare(&mut self, x: &[f32]) -> &Activations {
        if !self.ready {
            prepare(x, self);
            self.ready = true;
        }
        self
    }
}

impl Activations {
    /// The rows from row `i` on (rows of `cols` values), as the kernels take them.
    pub fn rows_from(&self, i: usize, cols: usize) -> RowsFrom<'_> {
        RowsFrom {
            xq: &self.xq[i * cols..],
            dx: &self.dx[i * cols / QK..],
            xsum: &self.xsum[i * cols / QK..],
            xsum16: &self.xsum16[i * cols / 16..],
        }
    }
}

/// Activation rows from one row on (see [`Activations::rows_from`]).
#[derive(Clone, Copy)]
pub struct RowsFrom<'a> {
    xq: &'a [i16],
    dx: &'a [f32],
    xsum: &'a [f32],
    xsum16: &'a [f32],
}

/// Largest of the eight lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hmax(v: __m256) -> f32 {
    let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)))
}

/// Sum of the eight 32-bit lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn hsum_i32(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 1)))
}

/// `x` (rows of f32, a multiple of 32 long) as blocks of 16-bit integers (see
/// [`Activations`]).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn prepare(x: &[f32], to: &mut Activations) {
    to.xq.resize(x.len(), 0);
    to.dx.resize(x.len() / QK, 0.0);
    to.xsum.resize(x.len() / QK, 0.0);
    to.xsum16.resize(x.len() / 16, 0.0);
    let sign = _mm256_set1_ps(-0.0);
    for ((((c, q), d), s), s16) in x
        .chunks_exact(QK)
        .zip(to.xq.chunks_exact_mut(QK))
        .zip(to.dx.iter_mut())
        .zip(to.xsum.iter_mut())
        .zip(to.xsum16.chunks_exact_mut(2))
    {
        let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(c.as_ptr().add(8 * i)));
        let a = v.map(|v| _mm256_andnot_ps(sign, v));
        let amax = hmax(_mm256_max_ps(
            _mm256_max_ps(a[0], a[1]),
            _mm256_max_ps(a[2], a[3]),
        ));
        if amax == 0.0 {
            q.fill(0);
            (*d, *s) = (0.0, 0.0);
            s16.fill(0.0);
            continue;
        }
        let scale = amax / 32767.0;
        let inv = _mm256_set1_ps(32767.0 / amax);
        // Rounded to nearest (the default rounding mode); |v · inv| ≤ 32767 up to one
        // rounding of the product, so no value leaves the 16-bit range.
        let i: [__m256i; 4] = std::array::from_fn(|k| _mm256_cvtps_epi32(_mm256_mul_ps(v[k], inv)));
        // Values 0..16 and 16..32 as 16-bit lanes in order (`packs` interleaves the two
        // 128-bit halves; the permutation puts them back).
        let n0 = _mm256_permute4x64_epi64::<0xD8>(_mm256_packs_epi32(i[0], i[1]));
        let n1 = _mm256_permute4x64_epi64::<0xD8>(_mm256_packs_epi32(i[2], i[3]));
        // Each 32-bit lane holds values 2w (low half) and 2w + 1 (high half).
        let even = |n: __m256i| _mm256_srai_epi32::<16>(_mm256_slli_epi32::<16>(n));
        let odd = |n: __m256i| _mm256_srai_epi32::<16>(n);
        let e = _mm256_permute4x64_epi64::<0xD8>(_mm256_packs_epi32(even(n0), even(n1)));
        let o = _mm256_permute4x64_epi64::<0xD8>(_mm256_packs_epi32(odd(n0), odd(n1)));
        _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, e);
        _mm256_storeu_si256(q.as_mut_ptr().add(16) as *mut __m256i, o);
        let (h0, h1) = (
            hsum_i32(_mm256_add_epi32(i[0], i[1])),
            hsum_i32(_mm256_add_epi32(i[2], i[3])),
        );
        // |Σ q| ≤ 32 · 32767 < 2²⁴: exact in f32, so these round once.
        (*d, *s) = (scale, scale * (h0 + h1) as f32);
        s16[0] = scale * h0 as f32;
        s16[1] = scale * h1 as f32;
    }
}

/// Bytes ahead of the block being read that [`prefetch`] asks for.
const PREFETCH_AHEAD: usize = 4096;

/// Asks for the cache lines [`PREFETCH_AHEAD`] bytes past `p` (a block's start), as the
/// bf16 kernels do: the hardware prefetcher alone leaves each new block's first line a
/// stall.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn prefetch(p: *const u8, lines: usize) {
    let ahead = p.wrapping_add(PREFETCH_AHEAD) as *const i8;
    for l in 0..lines {
        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * l));
    }
}

/// Q4_K or Q5_K weight rows × `t` (1..=[`ROWS`]) activation rows `x`: `out[k * ld + r]` =
/// weight row r · activation row k; `nb` super-blocks per row.
///
/// # Safety
/// AVX2, FMA and F16C must be present; the activations hold t rows of `nb · 256` values;
/// `out` has room for the cells written.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn q4k_rows<B: NibbleBlock>(
    blocks: &[B],
    nb: usize,
    x: RowsFrom<'_>,
    t: usize,
    out: *mut f32,
    ld: usize,
) {
    by_rows!(t, [1, 2, 3], 4, q4k_rows_t<B>(blocks, nb, x, out, ld))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4k_rows_t<const T: usize, B: NibbleBlock>(
    blocks: &[B],
    nb: usize,
    x: RowsFrom<'_>,
    out: *mut f32,
    ld: usize,
) {
    let cols = nb * QK_K;
    let nblk = cols / QK;
    let n_rows = blocks.len() / nb;
    let (xp, dp, sp) = (x.xq.as_ptr(), x.dx.as_ptr(), x.xsum.as_ptr());
    let nibble = _mm256_set1_epi16(0x000F);
    let lines = std::mem::size_of::<B>().div_ceil(64);
    for r in 0..n_rows {
        let row = blocks.as_ptr().add(r * nb);
        // Two accumulators per row (sub-blocks 2g and 2g + 1), so that a row's FMAs do not
        // wait on each other.
        let mut acc = [[_mm256_setzero_ps(); 2]; T];
        // Per row: the eight sub-blocks' weight scale × activation scale, in memory, so that
        // each is put in every lane by a broadcast load rather than a shuffle (the shuffle
        // port is the busiest).
        let mut scale = [[0f32; 8]; T];
        for b in 0..nb {
            let blk = &*row.add(b);
            prefetch(blk as *const B as *const u8, lines);
            let (ds, ms) = super::kquants::q4k_scales(blk);
            let (ds, ms) = (_mm256_loadu_ps(ds.as_ptr()), _mm256_loadu_ps(ms.as_ptr()));
            // The minimums' term −Σ dmin·m · Σx.
            for (k, (s, a)) in scale.iter_mut().zip(acc.iter_mut()).enumerate() {
                let at = k * nblk + b * 8;
                _mm256_storeu_ps(
                    s.as_mut_ptr(),
                    _mm256_mul_ps(ds, _mm256_loadu_ps(dp.add(at))),
                );
                a[0] = _mm256_fnmadd_ps(ms, _mm256_loadu_ps(sp.add(at)), a[0]);
            }
            for g in 0..4 {
                // Word w of the group's 32 bytes holds values 2w and 2w + 1 of sub-block 2g
                // (low nibbles) and of sub-block 2g + 1 (high nibbles).
                let w = if B::FIFTH_BIT {
                    // The values as bytes with their fifth bits (sub-block 2g in `lo`, 2g + 1
                    // in `hi`), each word's two bytes then apart: 13 operations a group where
                    // moving each fifth bit to its word lane took 20.
                    let (lo, hi) = super::kquants::group_values(blk, g);
                    let byte = _mm256_set1_epi16(0x00FF);
                    [
                        _mm256_and_si256(lo, byte),
                        _mm256_srli_epi16::<8>(lo),
                        _mm256_and_si256(hi, byte),
                        _mm256_srli_epi16::<8>(hi),
                    ]
                } else {
                    let v = _mm256_loadu_si256(blk.qs().as_ptr().add(32 * g) as *const __m256i);
                    [
                        _mm256_and_si256(v, nibble),
                        _mm256_and_si256(_mm256_srli_epi16::<8>(v), nibble),
                        _mm256_and_si256(_mm256_srli_epi16::<4>(v), nibble),
                        _mm256_srli_epi16::<12>(v),
                    ]
                };
                for (k, a) in acc.iter_mut().enumerate() {
                    let x = xp.add(k * cols + b * QK_K + g * 64) as *const __m256i;
                    let s0 = _mm256_add_epi32(
                        _mm256_madd_epi16(w[0], _mm256_loadu_si256(x)),
                        _mm256_madd_epi16(w[1], _mm256_loadu_si256(x.add(1))),
                    );
                    let s1 = _mm256_add_epi32(
                        _mm256_madd_epi16(w[2], _mm256_loadu_si256(x.add(2))),
                        _mm256_madd_epi16(w[3], _mm256_loadu_si256(x.add(3))),
                    );
                    let (d0, d1) = (
                        _mm256_broadcast_ss(&scale[k][2 * g]),
                        _mm256_broadcast_ss(&scale[k][2 * g + 1]),
                    );
                    a[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0), d0, a[0]);
                    a[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1), d1, a[1]);
                }
            }
        }
        for (k, a) in acc.iter().enumerate() {
            *out.add(k * ld + r) = hsum(_mm256_add_ps(a[0], a[1]));
        }
    }
}

/// Q4_0 or Q4_1 weight rows × `t` (1..=[`ROWS`]) activation rows `x`, as [`q4k_rows`]:
/// `nb` blocks of 32 per row.
///
/// Why: the f32 kernel ([`super::avx2::q4_rows`]) spends ~25 vector operations on each
/// block (every nibble widened to 32 bits and converted); it decoded a 1.5 B Q4_0 file at
/// 0.62× llama.cpp's speed on an AVX2-only AMD VM (12.2 vs 19.6 tok/s), compute-bound where
/// the K-quant kernels here read memory as fast as llama.cpp. Here a block is ~15: its 16
/// bytes are loaded into both halves of a vector, `vpsrlvd` shifts each half's 16-bit words
/// by its own amount (bits that cross into the next word are masked off), and the values
/// (minus 8 for Q4_0, in signed 16-bit lanes, so no minimum term) meet the activations in
/// two `vpmaddwd`. Q4_1's minimum `m` adds `m · Σx` per block, from the block sums of the
/// same rounded activations, in a scalar per row.
///
/// # Safety
/// As [`q4k_rows`], with `nb · 32` values per activation row.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn q4_rows<B: Nibbles32>(
    blocks: &[B],
    nb: usize,
    x: RowsFrom<'_>,
    t: usize,
    out: *mut f32,
    ld: usize,
) {
    by_rows!(t, [1, 2, 3], 4, q4_rows_t<B>(blocks, nb, x, out, ld))
}

/// `a` plus a 32-value block's weights (16-bit integers: the even-numbered values in `e`,
/// the odd-numbered ones in `o`, as the activations hold them) times block `b` of activation
/// row `k`, scaled by the weights' `d` times the activations' `dx`: two `vpmaddwd` into
/// exact 32-bit sums, one conversion, one FMA.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn add_block(
    e: __m256i,
    o: __m256i,
    d: __m256,
    x: RowsFrom<'_>,
    k: usize,
    b: usize,
    cols: usize,
    a: __m256,
) -> __m256 {
    let xv = x.xq.as_ptr().add(k * cols + b * QK) as *const __m256i;
    let s = _mm256_add_epi32(
        _mm256_madd_epi16(e, _mm256_loadu_si256(xv)),
        _mm256_madd_epi16(o, _mm256_loadu_si256(xv.add(1))),
    );
    let scale = _mm256_mul_ps(d, _mm256_broadcast_ss(&x.dx[k * (cols / QK) + b]));
    _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, a)
}

/// Per activation row: two accumulators (even and odd blocks, so that a row's additions
/// do not wait on each other) of the products and of Q4_1's minimums' term.
struct Acc<const T: usize> {
    v: [[__m256; 2]; T],
    mins: [[f32; 2]; T],
}

/// Block `b` of a Q4_0 or Q4_1 row times `T` activation rows, added to accumulator `h` of
/// each row.
#[inline(always)]
unsafe fn q4_block<const T: usize, B: Nibbles32>(
    blk: &B,
    b: usize,
    h: usize,
    x: RowsFrom<'_>,
    cols: usize,
    acc: &mut Acc<T>,
) {
    let nb = cols / QK;
    // Word w of the 16 bytes holds value 2w (bits 0..4), 2w + 16 (4..8), 2w + 1 (8..12)
    // and 2w + 17 (12..16). The activations' even vector is values 0, 2, .., 30: the low
    // half's words shifted by 0, the high half's by 4; the odd vector by 8 and 12.
    let w = _mm256_broadcastsi128_si256(_mm_loadu_si128(blk.qs().as_ptr() as *const __m128i));
    let nibble = _mm256_set1_epi16(0x000F);
    let m = blk.m().map(|m| f16_to_f32(m));
    let value = |shift: __m256i| {
        let v = _mm256_and_si256(_mm256_srlv_epi32(w, shift), nibble);
        match m {
            Some(_) => v,
            None => _mm256_sub_epi16(v, _mm256_set1_epi16(8)),
        }
    };
    let e = value(_mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4));
    let o = value(_mm256_setr_epi32(8, 8, 8, 8, 12, 12, 12, 12));
    let d = _mm256_set1_ps(f16_to_f32(blk.d()));
    for k in 0..T {
        acc.v[k][h] = add_block(e, o, d, x, k, b, cols, acc.v[k][h]);
        if let Some(m) = m {
            acc.mins[k][h] += m * x.xsum[k * nb + b];
        }
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4_rows_t<const T: usize, B: Nibbles32>(
    blocks: &[B],
    nb: usize,
    x: RowsFrom<'_>,
    out: *mut f32,
    ld: usize,
) {
    let cols = nb * QK;
    let n_rows = blocks.len() / nb;
    let lines = (2 * std::mem::size_of::<B>()).div_ceil(64);
    for r in 0..n_rows {
        let row = &blocks[r * nb..(r + 1) * nb];
        let mut acc = Acc {
            v: [[_mm256_setzero_ps(); 2]; T],
            mins: [[0.0; 2]; T],
        };
        let mut pairs = row.chunks_exact(2);
        for (p, pair) in pairs.by_ref().enumerate() {
            prefetch(pair.as_ptr() as *const u8, lines);
            q4_block(&pair[0], 2 * p, 0, x, cols, &mut acc);
            q4_block(&pair[1], 2 * p + 1, 1, x, cols, &mut acc);
        }
        if let [last] = pairs.remainder() {
            q4_block(last, nb - 1, 0, x, cols, &mut acc);
        }
        for (k, (a, m)) in acc.v.iter().zip(acc.mins).enumerate() {
            *out.add(k * ld + r) = hsum(_mm256_add_ps(a[0], a[1])) + (m[0] + m[1]);
        }
    }
}

/// Q8_0 weight rows × `t` (1..=[`ROWS`]) activation rows `x`, as [`q4k_rows`]: `nb`
/// blocks of 32 per row.
///
/// Why: the f32 kernel ([`super::avx2::q8_0_rows`]) widens every weight to 32 bits and
/// converts it; SmolLM2's output matrix (Q8_0, 49152 × 576) took 16% of its decoding time
/// that way. Here a block's 32 bytes, read as 16-bit words, give the even-numbered values
/// by a shift left and an arithmetic shift right of 8 (sign-extended low bytes) and the
/// odd-numbered ones by the arithmetic shift alone: the activations' order (see
/// [`Activations`]), three operations a block.
///
/// # Safety
/// As [`q4k_rows`], with `nb · 32` values per activation row.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn q8_0_rows(
    blocks: &[BlockQ8_0],
    nb: usize,
    x: RowsFrom<'_>,
    t: usize,
    out: *mut f32,
    ld: usize,
) {
    by_rows!(t, [1, 2, 3], 4, q8_0_rows_t(blocks, nb, x, out, ld))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q8_0_rows_t<const T: usize>(
    blocks: &[BlockQ8_0],
    nb: usize,
    x: RowsFrom<'_>,
    out: *mut f32,
    ld: usize,
) {
    let cols = nb * QK;
    let n_rows = blocks.len() / nb;
    for r in 0..n_rows {
        let row = &blocks[r * nb..(r + 1) * nb];
        // Two accumulators per row (even and odd blocks), as in [`q4_rows`].
        let mut acc = [[_mm256_setzero_ps(); 2]; T];
        for (b, blk) in row.iter().enumerate() {
            // 34-byte blocks: a new line every other block, about.
            if b % 2 == 0 {
                prefetch(blk as *const BlockQ8_0 as *const u8, 2);
            }
            let w = _mm256_loadu_si256(blk.qs.as_ptr() as *const __m256i);
            let e = _mm256_srai_epi16::<8>(_mm256_slli_epi16::<8>(w));
            let o = _mm256_srai_epi16::<8>(w);
            let d = _mm256_set1_ps(f16_to_f32(blk.d));
            for (k, a) in acc.iter_mut().enumerate() {
                a[b % 2] = add_block(e, o, d, x, k, b, cols, a[b % 2]);
            }
        }
        for (k, a) in acc.iter().enumerate() {
            *out.add(k * ld + r) = hsum(_mm256_add_ps(a[0], a[1]));
        }
    }
}

/// The 6-bit values of group `k` (0..4) of one half of a Q6_K block (0..64, the offset of
/// 32 is taken apart), as 16-bit lanes: (even-numbered values, odd-numbered ones). `qla`/`qlb` are the half's two 32-byte
/// runs of low bits, `qh` its 32 bytes of high bits (see `BlockQ6K::quad`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6k_group(qla: __m256i, qlb: __m256i, qh: __m256i, k: usize) -> (__m256i, __m256i) {
    let nibble = _mm256_set1_epi16(0x000F);
    let two = _mm256_set1_epi16(0x0030);
    let src = if k.is_multiple_of(2) { qla } else { qlb };
    // Low four bits: groups 0 and 1 from the low nibbles, 2 and 3 from the high ones.
    let (lo_e, lo_o) = if k < 2 {
        (
            _mm256_and_si256(src, nibble),
            _mm256_and_si256(_mm256_srli_epi16::<8>(src), nibble),
        )
    } else {
        (
            _mm256_and_si256(_mm256_srli_epi16::<4>(src), nibble),
            _mm256_srli_epi16::<12>(src),
        )
    };
    // High two bits: bits 2k..2k + 2 of each byte of `qh`, to bits 4..6 (+8 for the odd
    // byte of each word).
    let (hi_e, hi_o) = match k {
        0 => (_mm256_slli_epi16::<4>(qh), _mm256_srli_epi16::<4>(qh)),
        1 => (_mm256_slli_epi16::<2>(qh), _mm256_srli_epi16::<6>(qh)),
        2 => (qh, _mm256_srli_epi16::<8>(qh)),
        _ => (_mm256_srli_epi16::<2>(qh), _mm256_srli_epi16::<10>(qh)),
    };
    let value = |lo: __m256i, hi: __m256i| _mm256_or_si256(lo, _mm256_and_si256(hi, two));
    (value(lo_e, hi_e), value(lo_o, hi_o))
}

/// Q6_K weight rows × `t` (1..=[`ROWS`]) activation rows `x`.
///
/// # Safety
/// As [`q4k_rows`].
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn q6k_rows(
    blocks: &[BlockQ6K],
    nb: usize,
    x: RowsFrom<'_>,
    t: usize,
    out: *mut f32,
    ld: usize,
) {
    by_rows!(t, [1, 2, 3], 4, q6k_rows_t(blocks, nb, x, out, ld))
}

/// Why the offset apart: `Σ (q − 32)·x = Σ q·x − 32·Σ x`, and the second sum per 16-value
/// sub-block is two FMAs per super-block and row (`xsum16` × the scales), where subtracting
/// 32 from every weight cost an instruction per 16 values.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6k_rows_t<const T: usize>(
    blocks: &[BlockQ6K],
    nb: usize,
    x: RowsFrom<'_>,
    out: *mut f32,
    ld: usize,
) {
    let cols = nb * QK_K;
    let nblk = cols / QK;
    let n_rows = blocks.len() / nb;
    let (xp, dp, sp) = (x.xq.as_ptr(), x.dx.as_ptr(), x.xsum16.as_ptr());
    let lines = std::mem::size_of::<BlockQ6K>().div_ceil(64);
    // Lanes 0..4 of a block's sums come from its first 16 values (sub-block 2k of the
    // half), lanes 4..8 from the next 16 (sub-block 2k + 1): `vpmaddwd` adds lanes 2i and
    // 2i + 1, and lane i of the even (odd) vector is value 2i (2i + 1).
    let pick: [__m256i; 4] = std::array::from_fn(|k| {
        let (a, b) = (2 * k as i32, 2 * k as i32 + 1);
        _mm256_setr_epi32(a, a, a, a, b, b, b, b)
    });
    for r in 0..n_rows {
        let row = blocks.as_ptr().add(r * nb);
        let mut acc = [[_mm256_setzero_ps(); 2]; T];
        let mut offsets = [_mm256_setzero_ps(); T];
        for b in 0..nb {
            let blk = &*row.add(b);
            prefetch(blk as *const BlockQ6K as *const u8, lines);
            let d = _mm256_set1_ps(f16_to_f32(blk.d));
            // d · the sixteen 8-bit sub-block scales, eight per half.
            let scales: [__m256; 2] = std::array::from_fn(|h| {
                let sc8 = _mm_loadl_epi64(blk.scales.as_ptr().add(8 * h) as *const __m128i);
                _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc8)))
            });
            for (k, o) in offsets.iter_mut().enumerate() {
                let s = sp.add(k * cols / 16 + b * 16);
                *o = _mm256_fmadd_ps(scales[0], _mm256_loadu_ps(s), *o);
                *o = _mm256_fmadd_ps(scales[1], _mm256_loadu_ps(s.add(8)), *o);
            }
            for (h, &sc) in scales.iter().enumerate() {
                let ql = blk.ql.as_ptr().add(64 * h) as *const __m256i;
                let qla = _mm256_loadu_si256(ql);
                let qlb = _mm256_loadu_si256(ql.add(1));
                let qh = _mm256_loadu_si256(blk.qh.as_ptr().add(32 * h) as *const __m256i);
                for (k, pk) in pick.iter().enumerate() {
                    let (e, o) = q6k_group(qla, qlb, qh, k);
                    let s = _mm256_permutevar8x32_ps(sc, *pk);
                    let blk_idx = b * 8 + h * 4 + k;
                    for (kk, a) in acc.iter_mut().enumerate() {
                        let x = xp.add(kk * cols + blk_idx * QK) as *const __m256i;
                        let sum = _mm256_add_epi32(
                            _mm256_madd_epi16(e, _mm256_loadu_si256(x)),
                            _mm256_madd_epi16(o, _mm256_loadu_si256(x.add(1))),
                        );
                        let scale =
                            _mm256_mul_ps(s, _mm256_broadcast_ss(&*dp.add(kk * nblk + blk_idx)));
                        a[k % 2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), scale, a[k % 2]);
                    }
                }
            }
        }
        for (k, (a, o)) in acc.iter().zip(&offsets).enumerate() {
            *out.add(k * ld + r) = hsum(_mm256_add_ps(a[0], a[1])) - 32.0 * hsum(*o);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::kernels::formats::{cast, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K};
    use crate::engine::kernels::testing::{int16_steps, matrix, reference};
    use candle_core::quantized::GgmlDType;

    /// The bound on a product's error: the activations' rounding, plus f32 rounding.
    fn bound(w: &[f32], x: &[f32], rows: usize, cols: usize, n: usize) -> Vec<f32> {
        let abs = |v: &[f32]| v.iter().map(|a| a.abs()).collect::<Vec<_>>();
        let magnitude = reference(&abs(w), &abs(x), rows, cols, n);
        int16_steps(w, x, rows, cols, n)
            .iter()
            .zip(&magnitude)
            .map(|(s, m)| s + 1e-5 * m + 1e-3)
            .collect()
    }

    /// Runs the kernel of `dtype` over `n` rows of `x` in passes of `group` rows.
    fn run(m: &crate::engine::kernels::QMat, x: &[f32], n: usize, group: usize) -> Vec<f32> {
        let (rows, cols) = (m.rows(), m.cols());
        let mut xs = Activations::default();
        // SAFETY: the tests return early without AVX2; `cols` is whole super-blocks.
        let xs = unsafe { xs.prepare(x) };
        let mut out = vec![0f32; n * rows];
        let data = m.rows_data(0, rows);
        let nb = cols / QK_K;
        let mut i = 0;
        while i < n {
            let t = (n - i).min(group);
            let x = xs.rows_from(i, cols);
            let o = out[i * rows..].as_mut_ptr();
            // SAFETY: as above; `x` holds t rows from row i, `out` t × rows from row i.
            unsafe {
                match m.format() {
                    crate::engine::kernels::Format::Q4K => {
                        q4k_rows::<BlockQ4K>(cast(data), nb, x, t, o, rows)
                    }
                    crate::engine::kernels::Format::Q5K => {
                        q4k_rows::<BlockQ5K>(cast(data), nb, x, t, o, rows)
                    }
                    crate::engine::kernels::Format::Q4_0 => {
                        q4_rows::<BlockQ4_0>(cast(data), cols / QK, x, t, o, rows)
                    }
                    crate::engine::kernels::Format::Q4_1 => {
                        q4_rows::<BlockQ4_1>(cast(data), cols / QK, x, t, o, rows)
                    }
                    crate::engine::kernels::Format::Q8_0 => {
                        q8_0_rows(cast(data), cols / QK, x, t, o, rows)
                    }
                    _ => q6k_rows(cast(data), nb, x, t, o, rows),
                }
            }
            i += t;
        }
        out
    }

    /// Every format of these kernels against f32 arithmetic on the dequantized weights,
    /// within the activations' rounding; and each row's result the same bit for bit whatever
    /// the number of rows in its pass.
    #[test]
    fn rows_match_the_reference_and_do_not_depend_on_the_batch() {
        if !super::super::available() {
            return;
        }
        let formats = [
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q8_0,
        ];
        // Q4_0 and Q4_1 also in rows of an odd number of blocks (the kernel takes blocks in
        // pairs).
        for (dtype, cols) in formats
            .map(|d| (d, 768))
            .into_iter()
            .chain([(GgmlDType::Q4_0, 800), (GgmlDType::Q4_1, 800)])
        {
            let rows = 37;
            let (m, w) = matrix(rows, cols, dtype);
            let n = 7;
            let mut x: Vec<f32> = (0..n * cols)
                .map(|i| ((i * 31 % 17) as f32 - 8.0) * 0.1 + (i as f32 * 0.37).sin())
                .collect();
            // A "massive" activation, as the models have, and a block of zeros.
            x[5] = 3000.0;
            x[cols + 64..cols + 96].fill(0.0);
            let want = reference(&w, &x, rows, cols, n);
            let tol = bound(&w, &x, rows, cols, n);
            let all = run(&m, &x, n, ROWS);
            for (i, ((a, b), t)) in all.iter().zip(&want).zip(&tol).enumerate() {
                assert!((a - b).abs() <= *t, "{dtype:?} cell {i}: {a} vs {b} (±{t})");
            }
            for group in [1, 2, 3] {
                let some = run(&m, &x, n, group);
                assert_eq!(
                    some.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    all.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "{dtype:?}: passes of {group} rows vs {ROWS}"
                );
            }
        }
    }

    /// The activations' blocks: even then odd values, each within half a step of the
    /// original, the sums (of blocks and of half blocks) those of the rounded values.
    #[test]
    fn activations_keep_every_value_within_half_a_step() {
        if !super::super::available() {
            return;
        }
        let mut x: Vec<f32> = (0..256).map(|i| (i as f32 * 0.71).cos() * 3.0).collect();
        x[40] = -5000.0;
        x[96..128].fill(0.0);
        let mut a = Activations::default();
        // SAFETY: AVX2 checked above; 256 values.
        let a = unsafe { a.prepare(&x) };
        for (blk, c) in x.chunks_exact(QK).enumerate() {
            let dx = a.dx[blk];
            let m = c.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert_eq!(dx, m / 32767.0);
            let q = &a.xq[blk * QK..(blk + 1) * QK];
            let mut halves = [0i32; 2];
            for (i, &v) in c.iter().enumerate() {
                let qi = q[(i % 2) * 16 + i / 2];
                halves[i / 16] += qi as i32;
                assert!(
                    (qi as f32 * dx - v).abs() <= dx * 0.5001,
                    "block {blk} value {i}"
                );
            }
            assert_eq!(a.xsum[blk], dx * (halves[0] + halves[1]) as f32);
            assert_eq!(a.xsum16[2 * blk], dx * halves[0] as f32);
            assert_eq!(a.xsum16[2 * blk + 1], dx * halves[1] as f32);
        }
    }
}
