//! Matrix-vector kernels for the K-quants (Q4_K, Q5_K, Q6_K), Q4_0, Q4_1 and Q8_0 with 16-bit
//! integer activations, on AVX2: what decodes Q4_0, Q4_1 (SmolLM2) and Q8_0 files on every x86
//! CPU with AVX2, and Q4_K_M / Q5_K_M files on CPUs without AVX512_BF16 (every AVX2-only CPU —
//! most desktops and laptops — and AVX-512 CPUs before Cooper Lake and Zen 4); see
//! `kernels::decode::rounding`. Where the CPU has AVX512_VNNI, the same arithmetic runs in
//! 512-bit vectors ([`super::int16_512`]) on activations this module rounds.
//!
//! Why: with f32 FMAs, turning each 4-bit weight into an f32 costs a widening, a conversion
//! and a multiply before the product itself, and that made decoding compute-bound (a 1.5 B
//! Q4_K_M model at 0.36× the speed of llama.cpp's AVX2 build, same machine; 0.85× with these
//! kernels). Here the weights become 16-bit integers where they
//! lie: each 16-bit word of the packed bytes holds four values (two bytes, two nibbles
//! each), and a shift and a mask put one of them in every lane — the even-numbered values of
//! a block in one vector, the odd-numbered ones in another, matching the activations' order
//! (see [`Activations`]). `vpmaddwd` then multiplies 16 weights with 16 activations and adds
//! pairs into 32-bit sums, exactly, and each 32-value block's sums are turned into f32 and
//! scaled by the weights' sub-block scale times the activations' block scale. Q4_0, Q4_1 and
//! Q8_0 blocks are read two at a time ([`pair_rows`], with the activations in [`Pairs`]).
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
use bytemuck::Pod;

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
    /// The rows in the order [`pair_rows`] reads them (see [`Pairs`]), made when a Q4_0,
    /// Q4_1 or Q8_0 band first needs them.
    pairs: Pairs,
    pairs_ready: bool,
    /// The rows in the order the AVX-512 K-quant kernels read them (see
    /// [`super::int16_512::Quads`]), made when a band of them first needs them.
    quads: super::int16_512::Quads,
    quads_ready: bool,
    /// The rows in the order the AVX-512 Q4_0, Q4_1 and Q8_0 kernel reads them (see
    /// [`super::int16_512::Fours`]), made when a band of them first needs them.
    fours: super::int16_512::Fours,
    fours_ready: bool,
}

/// Activation rows as [`pair_rows`] reads them: blocks of 32 in pairs (a row of an odd number
/// of blocks ends in a pair whose second block is zeros), each pair's 64 values as four
/// vectors of 16-bit lanes, each vector half the one block's and half the other's, as a
/// shift and a mask leave the two blocks' nibbles when their 16 bytes are loaded side by
/// side: values 0, 2, .., 14 of both blocks; 1, 3, .., 15; 16, 18, .., 30; 17, 19, .., 31.
#[derive(Default)]
struct Pairs {
    xq: Vec<i16>,
    /// Per pair: the first block's scale `dx` in four lanes, the second's in four: the
    /// lanes where `vpmaddwd` leaves each block's sums.
    dx: Vec<f32>,
    /// Per pair: the first block's sum of rounded values in lane 0, the second's in lane 4,
    /// zeros between, for the minimums' term `m · Σx` of both blocks in one FMA.
    xsum: Vec<f32>,
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
    /// [`Self::prepare`], plus the rows in [`pair_rows`]' order (see [`Pairs`]).
    ///
    /// # Safety
    /// As [`Self::prepare`]; `cols` is the rows' width.
    pub unsafe fn prepare_pairs(&mut self, x: &[f32], cols: usize) -> &Activations {
        self.prepare(x);
        if !self.pairs_ready {
            self.pair_up(cols);
            self.pairs_ready = true;
        }
        self
    }

    /// [`Self::prepare`], plus the rows in the AVX-512 K-quant kernels' order (see
    /// [`super::int16_512::Quads`]).
    ///
    /// # Safety
    /// As [`Self::prepare`]; the rows' width a multiple of 128.
    pub unsafe fn prepare_quads(&mut self, x: &[f32]) -> &Activations {
        self.prepare(x);
        if !self.quads_ready {
            self.quads.lay_out(&self.xq, &self.dx);
            self.quads_ready = true;
        }
        self
    }

    /// [`Self::prepare`], plus the rows in the AVX-512 Q4_0, Q4_1 and Q8_0 kernel's order
    /// (see [`super::int16_512::Fours`]).
    ///
    /// # Safety
    /// As [`Self::prepare`]; `cols` is the rows' width.
    pub unsafe fn prepare_fours(&mut self, x: &[f32], cols: usize) -> &Activations {
        self.prepare(x);
        if !self.fours_ready {
            self.fours.lay_out(&self.xq, &self.dx, &self.xsum, cols);
            self.fours_ready = true;
        }
        self
    }

    /// The rows from row `i` on (rows of `cols` values) in fours of blocks, as
    /// [`super::int16_512::four_rows`] takes them; made by [`Self::prepare_fours`].
    pub fn fours_from(&self, i: usize, cols: usize) -> super::int16_512::FoursFrom<'_> {
        debug_assert!(self.fours_ready);
        super::int16_512::FoursFrom::new(&self.fours, i, cols)
    }

    /// The rows from row `i` on (rows of `cols` values) as the AVX-512 K-quant kernels take
    /// them; made by [`Self::prepare_quads`].
    pub fn quads_from(&self, i: usize, cols: usize) -> super::int16_512::QuadsFrom<'_> {
        debug_assert!(self.quads_ready);
        super::int16_512::QuadsFrom::new(
            &self.quads,
            &self.xsum[i * cols / QK..],
            &self.xsum16[i * cols / 16..],
            i,
            cols,
        )
    }

    /// Lays [`Self::xq`], `dx` and `xsum` out as [`Pairs`], row by row.
    fn pair_up(&mut self, cols: usize) {
        let np = (cols / QK).div_ceil(2);
        let rows = self.xq.len() / cols;
        let p = &mut self.pairs;
        p.xq.clear();
        p.xq.resize(rows * np * 2 * QK, 0);
        p.dx.clear();
        p.dx.resize(rows * np * 8, 0.0);
        p.xsum.clear();
        p.xsum.resize(rows * np * 8, 0.0);
        group_blocks::<2>(
            (&self.xq, &self.dx, &self.xsum),
            cols,
            (&mut p.xq, &mut p.dx, &mut p.xsum),
        );
    }

    /// The rows from row `i` on (rows of `cols` values) in pairs of blocks, as [`pair_rows`]
    /// takes them; made by [`Self::prepare_pairs`].
    pub fn pairs_from(&self, i: usize, cols: usize) -> PairsFrom<'_> {
        debug_assert!(self.pairs_ready);
        let np = (cols / QK).div_ceil(2);
        PairsFrom {
            xq: &self.pairs.xq[i * np * 2 * QK..],
            dx: &self.pairs.dx[i * np * 8..],
            xsum: &self.pairs.xsum[i * np * 8..],
        }
    }

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

/// Lays each row's blocks (`from`: their 16-bit values, 16 even then 16 odd, scales and sums;
/// rows of `cols` values) out in groups of `G` (2: [`Pairs`]; 4:
/// [`super::int16_512::Fours`]) into `to`, zeroed, with room for every row's blocks rounded up
/// to whole groups: each group's 32·G values as four vectors of 8·G lanes, vector v holding
/// eight values of each block (0, 2, .., 14; 1, 3, .., 15; 16, 18, .., 30; 17, 19, .., 31),
/// block k's in lanes 8k..8k + 8, as the blocks' nibbles land when their 16 bytes are loaded
/// side by side; each block's scale in four lanes 4k..4k + 4 of the group's 4·G, its sum in
/// the first of them.
pub(super) fn group_blocks<const G: usize>(
    from: (&[i16], &[f32], &[f32]),
    cols: usize,
    to: (&mut [i16], &mut [f32], &mut [f32]),
) {
    let ((xq, dx, xsum), (to_xq, to_dx, to_sum)) = (from, to);
    let nb = cols / QK;
    let ng = nb.div_ceil(G);
    for r in 0..xq.len() / cols {
        for b in 0..nb {
            let (at, k) = (r * ng + b / G, b % G);
            let src = &xq[(r * nb + b) * QK..][..QK];
            let dst = &mut to_xq[at * G * QK..][..G * QK];
            for (v, part) in [&src[0..8], &src[16..24], &src[8..16], &src[24..32]]
                .into_iter()
                .enumerate()
            {
                dst[8 * G * v + 8 * k..][..8].copy_from_slice(part);
            }
            to_dx[at * 4 * G + 4 * k..][..4].fill(dx[r * nb + b]);
            to_sum[at * 4 * G + 4 * k] = xsum[r * nb + b];
        }
    }
}

/// Activation rows in pairs of blocks from one row on (see [`Activations::pairs_from`]).
#[derive(Clone, Copy)]
pub struct PairsFrom<'a> {
    xq: &'a [i16],
    dx: &'a [f32],
    xsum: &'a [f32],
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
pub(super) unsafe fn prefetch(p: *const u8, lines: usize) {
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

/// Q4_0, Q4_1 or Q8_0 weight rows × `t` (1..=[`ROWS`]) activation rows `x` (from
/// [`Activations::pairs_from`]), as [`q4k_rows`]: `nb` blocks of 32 per row.
///
/// Why: the f32 kernels ([`super::avx2::q4_rows`], [`super::avx2::q8_0_rows`]) spend ~25
/// vector operations on each block (every weight widened to 32 bits and converted); they
/// decoded a 1.5 B Q4_0 file at 0.62× llama.cpp's speed on an AVX2-only AMD VM (12.2 vs 19.6
/// tok/s), and SmolLM2's Q8_0 output matrix took 16% of its decoding time. Here weights
/// become 16-bit integers where they lie and `vpmaddwd` multiplies them with the
/// activations into exact 32-bit sums. Blocks go two at a time, their bytes side by side in
/// one vector, so each vector's low half is one block's and its high half the other's (the
/// activations' [`Pairs`] order) and `vpmaddwd` leaves each block's sums in its own four
/// lanes: one conversion, one scale (the two blocks' `d · dx`) and one FMA then serve both
/// blocks, where a block alone took them all (~40 operations per pair of Q4_0 blocks
/// before, ~25 now; SmolLM2 with eight replies stepped together, `confab bench --batch 8`:
/// 303 → 369 tok/s on a Zen 4 VM).
///
/// # Safety
/// AVX2, FMA and F16C must be present; the activations hold t rows of `nb · 32` values in
/// pairs; `out` has room for the cells written.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn pair_rows<B: PairBlock>(
    blocks: &[B],
    nb: usize,
    x: PairsFrom<'_>,
    t: usize,
    out: *mut f32,
    ld: usize,
) {
    by_rows!(t, [1, 2, 3], 4, pair_rows_t<B>(blocks, nb, x, out, ld))
}

/// Per activation row: two accumulators, so that a row's FMAs form two independent chains.
type Acc<const T: usize> = [[__m256; 2]; T];

/// The blocks [`pair_rows`] reads, two at a time.
pub trait PairBlock: Pod {
    /// Blocks `b0` and `b1` (pair `p` of `np` per activation row) times `T` activation
    /// rows, added to each row's accumulators.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be present (the caller is compiled with them); `x` holds `T`
    /// rows of `np` pairs.
    unsafe fn pair<const T: usize>(
        b0: &Self,
        b1: &Self,
        p: usize,
        np: usize,
        x: PairsFrom<'_>,
        acc: &mut Acc<T>,
    );
}

/// Both blocks' first four bytes as f16 pairs, in f32: (d0, ·, d1, ·), where Q4_1's `m`
/// fills the second lane of each (the first two bytes of `qs` do in the other formats).
#[inline(always)]
unsafe fn heads<B: Pod>(b0: &B, b1: &B) -> __m256 {
    let head = |b: &B| (b as *const B as *const i32).read_unaligned();
    _mm256_castps128_ps256(_mm_cvtph_ps(_mm_insert_epi32::<1>(
        _mm_cvtsi32_si128(head(b0)),
        head(b1),
    )))
}

/// Lane `i` of `v` in lanes 0..4, lane `j` in lanes 4..8: one value per block of a pair.
#[inline(always)]
unsafe fn per_block(v: __m256, i: i32, j: i32) -> __m256 {
    _mm256_permutevar8x32_ps(v, _mm256_setr_epi32(i, i, i, i, j, j, j, j))
}

/// The four 16-bit products of pair `at` (as [`Pairs`] lays it out) with weights `w`, as
/// two exact 32-bit sums per lane (each of four products, within 24 bits for 8-bit weights,
/// so each converts to f32 exactly).
#[inline(always)]
unsafe fn pair_sums(w: &[__m256i; 4], x: PairsFrom<'_>, at: usize) -> (__m256i, __m256i) {
    let xv = x.xq.as_ptr().add(at * 2 * QK) as *const __m256i;
    (
        _mm256_add_epi32(
            _mm256_madd_epi16(w[0], _mm256_loadu_si256(xv)),
            _mm256_madd_epi16(w[1], _mm256_loadu_si256(xv.add(1))),
        ),
        _mm256_add_epi32(
            _mm256_madd_epi16(w[2], _mm256_loadu_si256(xv.add(2))),
            _mm256_madd_epi16(w[3], _mm256_loadu_si256(xv.add(3))),
        ),
    )
}

/// Q4_0 and Q4_1: the values stay `q` in 0..16 (so the four products' sums add up exactly
/// too), and `m · Σx` (Q4_0's `m = -8 d`) comes from the block sums of the same rounded
/// activations, for both blocks in one more FMA.
impl<B: Nibbles32> PairBlock for B {
    #[inline(always)]
    unsafe fn pair<const T: usize>(
        b0: &Self,
        b1: &Self,
        p: usize,
        np: usize,
        x: PairsFrom<'_>,
        acc: &mut Acc<T>,
    ) {
        let v = _mm256_loadu2_m128i(
            b1.qs().as_ptr() as *const __m128i,
            b0.qs().as_ptr() as *const __m128i,
        );
        // Word w of a block's 16 bytes holds value 2w (bits 0..4), 2w + 1 (8..12), 2w + 16
        // (4..8) and 2w + 17 (12..16): the four vectors of [`Pairs`].
        let nibble = _mm256_set1_epi16(0x000F);
        let w = [
            _mm256_and_si256(v, nibble),
            _mm256_and_si256(_mm256_srli_epi16::<8>(v), nibble),
            _mm256_and_si256(_mm256_srli_epi16::<4>(v), nibble),
            _mm256_srli_epi16::<12>(v),
        ];
        let dm = heads(b0, b1);
        let d = per_block(dm, 0, 2);
        let m = match b0.m() {
            Some(_) => per_block(dm, 1, 3),
            None => _mm256_mul_ps(d, _mm256_set1_ps(-8.0)),
        };
        for (k, a) in acc.iter_mut().enumerate() {
            let at = k * np + p;
            let (s0, s1) = pair_sums(&w, x, at);
            let scale = _mm256_mul_ps(d, _mm256_loadu_ps(x.dx.as_ptr().add(at * 8)));
            a[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(s0, s1)), scale, a[0]);
            a[1] = _mm256_fmadd_ps(m, _mm256_loadu_ps(x.xsum.as_ptr().add(at * 8)), a[1]);
        }
    }
}

/// Q8_0: a block's 16-bit words hold two values each, sign-extended by a shift left and an
/// arithmetic shift right (the even-numbered value) or the arithmetic shift alone (the odd
/// one); each half of the pair's products converted on its own (eight products of 8-bit
/// weights could pass 24 bits).
impl PairBlock for BlockQ8_0 {
    #[inline(always)]
    unsafe fn pair<const T: usize>(
        b0: &Self,
        b1: &Self,
        p: usize,
        np: usize,
        x: PairsFrom<'_>,
        acc: &mut Acc<T>,
    ) {
        // (No closure for the two loads: one here would not get the caller's AVX2.)
        let (q0, q1) = (
            b0.qs.as_ptr() as *const __m128i,
            b1.qs.as_ptr() as *const __m128i,
        );
        let lo = _mm256_loadu2_m128i(q1, q0);
        let hi = _mm256_loadu2_m128i(q1.add(1), q0.add(1));
        let w = [
            _mm256_srai_epi16::<8>(_mm256_slli_epi16::<8>(lo)),
            _mm256_srai_epi16::<8>(lo),
            _mm256_srai_epi16::<8>(_mm256_slli_epi16::<8>(hi)),
            _mm256_srai_epi16::<8>(hi),
        ];
        let d = per_block(heads(b0, b1), 0, 2);
        for (k, a) in acc.iter_mut().enumerate() {
            let at = k * np + p;
            let (s0, s1) = pair_sums(&w, x, at);
            let scale = _mm256_mul_ps(d, _mm256_loadu_ps(x.dx.as_ptr().add(at * 8)));
            a[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0), scale, a[0]);
            a[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1), scale, a[1]);
        }
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn pair_rows_t<const T: usize, B: PairBlock>(
    blocks: &[B],
    nb: usize,
    x: PairsFrom<'_>,
    out: *mut f32,
    ld: usize,
) {
    let np = nb.div_ceil(2);
    let n_rows = blocks.len() / nb;
    let lines = (2 * std::mem::size_of::<B>()).div_ceil(64);
    for r in 0..n_rows {
        let row = &blocks[r * nb..(r + 1) * nb];
        let mut acc = [[_mm256_setzero_ps(); 2]; T];
        let mut pairs = row.chunks_exact(2);
        for (p, pair) in pairs.by_ref().enumerate() {
            prefetch(pair.as_ptr() as *const u8, lines);
            B::pair(&pair[0], &pair[1], p, np, x, &mut acc);
        }
        // A lone last block: its own bytes stand in for the second block's, whose
        // activations (and scales, and sums) are zeros.
        if let [last] = pairs.remainder() {
            B::pair(last, last, np - 1, np, x, &mut acc);
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

    /// Runs the kernel of `dtype` over `n` rows of `x` in passes of `group` rows; the AVX-512
    /// kernels (of [`super::super::int16_512`]) where `wide`.
    fn run(
        m: &crate::engine::kernels::QMat,
        x: &[f32],
        n: usize,
        group: usize,
        wide: bool,
    ) -> Vec<f32> {
        use super::super::int16_512;
        let (rows, cols) = (m.rows(), m.cols());
        let mut xs = Activations::default();
        let kquant = matches!(
            m.format(),
            crate::engine::kernels::Format::Q4K
                | crate::engine::kernels::Format::Q5K
                | crate::engine::kernels::Format::Q6K
        );
        // SAFETY: the tests return early without AVX2; `cols` is whole blocks (of 128 for
        // the K-quants, whose quads are made only for them).
        let xs = unsafe {
            match (wide, kquant) {
                (true, true) => xs.prepare_quads(x),
                (true, false) => xs.prepare_fours(x, cols),
                (false, _) => xs.prepare_pairs(x, cols),
            }
        };
        let mut out = vec![0f32; n * rows];
        let data = m.rows_data(0, rows);
        let nb = cols / QK_K;
        let mut i = 0;
        while i < n {
            let t = (n - i).min(group);
            let (x, pairs) = (xs.rows_from(i, cols), || xs.pairs_from(i, cols));
            let o = out[i * rows..].as_mut_ptr();
            // SAFETY: as above; `x` holds t rows from row i, `out` t × rows from row i.
            unsafe {
                let quads = || xs.quads_from(i, cols);
                let fours = || xs.fours_from(i, cols);
                let nb32 = cols / QK;
                match m.format() {
                    crate::engine::kernels::Format::Q4_0 if wide => {
                        int16_512::four_rows::<BlockQ4_0>(cast(data), nb32, fours(), t, o, rows)
                    }
                    crate::engine::kernels::Format::Q4_1 if wide => {
                        int16_512::four_rows::<BlockQ4_1>(cast(data), nb32, fours(), t, o, rows)
                    }
                    crate::engine::kernels::Format::Q8_0 if wide => {
                        int16_512::four_rows::<BlockQ8_0>(cast(data), nb32, fours(), t, o, rows)
                    }
                    crate::engine::kernels::Format::Q4K if wide => {
                        int16_512::q4k_rows::<BlockQ4K>(cast(data), nb, quads(), t, o, rows)
                    }
                    crate::engine::kernels::Format::Q5K if wide => {
                        int16_512::q4k_rows::<BlockQ5K>(cast(data), nb, quads(), t, o, rows)
                    }
                    crate::engine::kernels::Format::Q6K if wide => {
                        int16_512::q6k_rows(cast(data), nb, quads(), t, o, rows)
                    }
                    crate::engine::kernels::Format::Q4K => {
                        q4k_rows::<BlockQ4K>(cast(data), nb, x, t, o, rows)
                    }
                    crate::engine::kernels::Format::Q5K => {
                        q4k_rows::<BlockQ5K>(cast(data), nb, x, t, o, rows)
                    }
                    crate::engine::kernels::Format::Q4_0 => {
                        pair_rows::<BlockQ4_0>(cast(data), cols / QK, pairs(), t, o, rows)
                    }
                    crate::engine::kernels::Format::Q4_1 => {
                        pair_rows::<BlockQ4_1>(cast(data), cols / QK, pairs(), t, o, rows)
                    }
                    crate::engine::kernels::Format::Q8_0 => {
                        pair_rows::<BlockQ8_0>(cast(data), cols / QK, pairs(), t, o, rows)
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
        // Q4_0, Q4_1 and Q8_0 also in rows of 25, 18 (SmolLM2's 576 columns) and 27 blocks
        // (the kernels take blocks in pairs, or in fours, and pad the rest).
        let small = [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0];
        for (dtype, cols) in formats.map(|d| (d, 768)).into_iter().chain(
            [800, 576, 864]
                .into_iter()
                .flat_map(|c| small.map(|d| (d, c))),
        ) {
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
            // The AVX-512 kernels too where the CPU has them (the machine picks one width per
            // process, so the other would go untested).
            let mut widths = vec![false];
            if super::super::int16_512() {
                widths.push(true);
            }
            for wide in widths {
                let all = run(&m, &x, n, ROWS, wide);
                for (i, ((a, b), t)) in all.iter().zip(&want).zip(&tol).enumerate() {
                    assert!(
                        (a - b).abs() <= *t,
                        "{dtype:?} wide={wide} cell {i}: {a} vs {b} (±{t})"
                    );
                }
                for group in [1, 2, 3] {
                    let some = run(&m, &x, n, group, wide);
                    assert_eq!(
                        some.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        all.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        "{dtype:?} wide={wide}: passes of {group} rows vs {ROWS}"
                    );
                }
            }
        }
    }

    /// [`Pairs`]: value j of block b lands where the nibbles of j leave it when two blocks'
    /// bytes are read side by side (vector `j % 2 + 2 · (j / 16)`, the block's half of it,
    /// lane `(j % 16) / 2`), with each block's scale in its four lanes and its sum in the
    /// first; a row's odd last block is paired with zeros.
    #[test]
    fn pairs_put_each_value_where_its_nibble_lands() {
        if !super::super::available() {
            return;
        }
        let (rows, cols) = (2, 96);
        let (nb, np) = (3, 2);
        let x: Vec<f32> = (0..rows * cols)
            .map(|i| (i as f32 * 0.37).sin() * (1 + i % 5) as f32)
            .collect();
        let mut a = Activations::default();
        // SAFETY: AVX2 checked above; rows of whole blocks.
        let a = unsafe { a.prepare_pairs(&x, cols) };
        let p = &a.pairs;
        assert_eq!(p.xq.len(), rows * np * 64);
        for r in 0..rows {
            for b in 0..np * 2 {
                let (at, half) = (r * np + b / 2, b % 2);
                for j in 0..QK {
                    let got = p.xq[at * 64 + 16 * (j % 2 + 2 * (j / 16)) + 8 * half + (j % 16) / 2];
                    let want = if b < nb {
                        a.xq[(r * nb + b) * QK + (j % 2) * 16 + j / 2]
                    } else {
                        0
                    };
                    assert_eq!(got, want, "row {r} block {b} value {j}");
                }
                let (dx, sum) = if b < nb {
                    (a.dx[r * nb + b], a.xsum[r * nb + b])
                } else {
                    (0.0, 0.0)
                };
                assert_eq!(p.dx[at * 8 + 4 * half..][..4], [dx; 4]);
                assert_eq!(p.xsum[at * 8 + 4 * half..][..4], [sum, 0.0, 0.0, 0.0]);
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
