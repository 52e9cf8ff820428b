//! Prompt kernels with 8-bit activations (AVX512_VNNI `vpdpbusd`, or AVX2 `vpmaddubsw`) for
//! Q4_K, Q5_K, Q6_K and Q4_0, and Q8_0 with AVX512_VNNI, with each block's outliers kept
//! exact.
//!
//! Why: a prompt chunk is compute-bound, and `vpdpbusd` does 64 multiply-adds an
//! instruction where `vdpbf16ps` does 32 (on Intel without AMX bf16 is no faster than f32
//! FMA). Measured on an AMD VM, Q5_K_M prompts went from 0.75× to 0.87× llama.cpp's speed:
//! not 2×, since each block of 32 still costs four vector operations of scaling beside its
//! eight products. The weights' values are small unsigned integers (0..15, 0..31, Q6_K's
//! 0..63), so they are the unsigned operand exactly as stored (Q6_K's offset of 32 is taken
//! off through the activations' sums, see [`gemm_q6k`]; Q8_0's signed bytes are stored
//! offset by 128, see [`Offset32`]). CPUs without AVX-512 run the same
//! arithmetic in AVX2 ([`gemm_avx2`], [`gemm_q6k_avx2`]), with the same results.
//!
//! Why outliers: plain 8-bit blocks are what breaks SmolLM2 in llama.cpp — one massive
//! activation in a block of 32 sets the step, and the other 31 values round to a few steps
//! of it. Here each block of 32 gets one scale (`max|x|/127`, so a normal block keeps ~1/254
//! of its largest value, finer than llama.cpp's `q8_K` with one scale per 256); in a block
//! whose largest value exceeds [`OUTLIER`] times its mean magnitude, the values above that
//! bound (at most five; one in 91% of such blocks in a Llama-shaped model's `ffn_down`
//! inputs) are kept out of the integers as f32, and the others get the step of their own
//! largest. A kernel adds an outlier's products after the integer pass: one masked column of
//! the panel times the value, in f32.
//!
//! Until 2026-12-07 such blocks got a second 8-bit level instead (their rounding error
//! rounded again, every value then within `max|x|/64516`), which costs a second pass over
//! the block's weights. `ffn_down`'s inputs (the SwiGLU products, heavy-tailed) have
//! outliers in half their blocks, so that pass took a fifth of a Q5_K_M prompt's time; the
//! exact outliers made it 154 → 222 tok/s (Sapphire Rapids VM, `--no-amx`), and SmolLM2's
//! 8-bit answers stayed those of the bf16 kernels.
//!
//! Each row's arithmetic depends only on that row (its outliers are added after its integer
//! pass, in column order), so a row's results do not depend on what shares its chunk.

use std::arch::x86_64::*;

use super::f16_to_f32;
use crate::engine::kernels::formats::{BlockQ4_0, BlockQ6K, BlockQ8_0, NibbleBlock, QK, QK_K};

/// Weight rows per panel (the 16 lanes of a vector), as for the bf16 kernels.
pub const PANEL: usize = 16;
/// Activation rows per call of the kernel: 8 integer sums + 8 accumulators + weights and
/// scales fit the 32 registers.
pub const MR: usize = 8;
/// A block whose largest magnitude exceeds this many times its mean magnitude has outliers:
/// its values above this many times the mean are kept exact, out of its 8-bit integers. A
/// block of normal (bell-shaped) values stays well below it (its largest of 32 is ~2.5–4×
/// the mean); one value ≥ ~5× the others' scale reaches it. At most five values of a block
/// can exceed it.
pub const OUTLIER: f32 = 6.0;

/// Whether a block of 32 with largest magnitude `max` and magnitudes summing to `sum_abs`
/// has outliers (see [`OUTLIER`]): then `max` exceeds [`outlier_bound`].
#[inline]
pub fn has_outliers(max: f32, sum_abs: f32) -> bool {
    max * QK as f32 > OUTLIER * sum_abs
}

/// The magnitude above which a value of a block with outliers is one: [`OUTLIER`] times the
/// block's mean magnitude.
#[inline]
pub fn outlier_bound(sum_abs: f32) -> f32 {
    OUTLIER * sum_abs / QK as f32
}

/// One activation value kept out of its block's 8-bit integers (where it counts as zero):
/// the kernels add its products exactly, in f32, after a row's integer pass.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Outlier {
    /// Its column in the row.
    pub col: u32,
    pub value: f32,
}

/// A product's activation rows as 8-bit integers, made once per product by the first band of
/// a thread that needs them.
#[derive(Default)]
pub struct Activations {
    /// The integers (an outlier's place holds 0), scales and sums, in groups of rows as the
    /// kernels read them.
    pub packed: Packed,
    /// Outliers, row by row, in column order.
    pub outliers: Vec<Outlier>,
    /// Row i's outliers are `outliers[first_outlier[i]..first_outlier[i + 1]]`.
    pub first_outlier: Vec<usize>,
    ready: bool,
}

/// A product's 8-bit activations in groups of `G` rows, the rows one call of a kernel takes
/// ([`MR`] for the AVX512_VNNI kernels, [`MR_AVX2`] for the AVX2 ones; group g holds rows
/// `g·G..g·G + G`, those past the last zero), each group's values for one column position
/// side by side, so that a kernel reaches every row of its group from one pointer with
/// constant offsets.
///
/// Why: with one pointer per row, the rows' addresses, scales and sums did not fit the
/// general registers beside the loop's own and were reloaded from the stack every block;
/// packed, 1.5 B Q5_K_M prompts went from 188–190 to 205–206 tok/s (AVX512_VNNI, Xeon
/// without AMX, 2026-12-07). The AVX2 kernels ran at the same speed either way
/// (`--no-avx512`: 103–106 tok/s); they read the same layout, so that there is one.
#[derive(Default)]
pub struct Packed {
    /// `G`: rows per group.
    pub rows: usize,
    /// `q[((g · cols/4 + c/4) · G + k) · 4 + c % 4]` = row `g·G + k`, column c: each row's
    /// four-byte group at a column, then the next row's.
    pub q: Vec<i8>,
    /// `scale[(g · nb + b) · G + k]`: block b's scale for row `g·G + k` (its values are
    /// `scale · q`, and its outliers).
    pub scale: Vec<f32>,
    /// Each block's sum of its values as the kernels see them (the rounded ones and the
    /// outliers), for the minimums' term; as `scale`.
    pub sum: Vec<f32>,
    /// `sum16[((g · nb + b) · 2 + h) · G + k]`: the sum of half h of block b's integers,
    /// where Q6_K's integer sums start (see [`gemm_q6k`]).
    pub sum16: Vec<i32>,
}

impl Activations {
    /// Makes them from `x` (rows of `cols` f32) unless done already for this product.
    ///
    /// # Safety
    /// AVX-512 (F, BW) must be present; `cols` a multiple of 32.
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    pub unsafe fn prepare(&mut self, x: &[f32], cols: usize) -> &Activations {
        if !self.ready {
            self.round::<MR>(x, cols);
            self.ready = true;
        }
        self
    }

    /// [`Self::prepare`] where AVX-512 is missing (the AVX2 kernel).
    ///
    /// # Safety
    /// AVX2 must be present; `cols` a multiple of 32.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn prepare_avx2(&mut self, x: &[f32], cols: usize) -> &Activations {
        if !self.ready {
            self.round::<MR_AVX2>(x, cols);
            self.ready = true;
        }
        self
    }

    /// Row `i`'s integer at column `c`.
    #[cfg(test)]
    pub fn q_at(&self, i: usize, c: usize, cols: usize) -> i8 {
        let g = self.packed.rows;
        self.packed.q[((i / g * cols / 4 + c / 4) * g + i % g) * 4 + c % 4]
    }

    /// Row `i`'s block `b`: its scale, its sum and the integer sums of its halves.
    #[cfg(test)]
    pub fn block(&self, i: usize, b: usize, cols: usize) -> (f32, f32, [i32; 2]) {
        let (g, nb, p) = (self.packed.rows, cols / QK, &self.packed);
        let at = (i / g * nb + b) * g + i % g;
        let half = |h: usize| p.sum16[((i / g * nb + b) * 2 + h) * g + i % g];
        (p.scale[at], p.sum[at], [half(0), half(1)])
    }

    /// Row `row`'s outliers.
    #[inline]
    pub fn outliers_of(&self, row: usize) -> &[Outlier] {
        &self.outliers[self.first_outlier[row]..self.first_outlier[row + 1]]
    }

    /// The one definition of the rounding, compiled into each caller's instruction set (AVX2
    /// intrinsics, which AVX-512 CPUs have too: both give the same integers and scales).
    ///
    /// Why vectors: with scalar code this took 15% of a Q5_K_M prompt's time (Sapphire Rapids
    /// VM, `--no-amx`), each team thread rounding every row of every product.
    /// The rows go straight into [`Self::packed`], in groups of `G`.
    #[inline(always)]
    unsafe fn round<const G: usize>(&mut self, x: &[f32], cols: usize) {
        debug_assert!(cols.is_multiple_of(QK) && x.len().is_multiple_of(cols));
        let nb = cols / QK;
        let n = x.len() / cols;
        let groups = n.div_ceil(G);
        let p = &mut self.packed;
        p.rows = G;
        // Zeroed: the rows past the last of a group stay zero.
        p.q.clear();
        p.q.resize(groups * G * cols, 0);
        for v in [&mut p.scale, &mut p.sum] {
            v.clear();
            v.resize(groups * nb * G, 0.0);
        }
        p.sum16.clear();
        p.sum16.resize(groups * nb * 2 * G, 0);
        let dst = p.q.as_mut_ptr() as *mut u32;
        self.outliers.clear();
        self.first_outlier.clear();
        self.first_outlier.push(0);
        // No closures here: they would not get the caller's instruction set, and the
        // intrinsics in them would become calls.
        let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        for i in 0..n {
            for b in 0..nb {
                let at = i * cols + b * QK;
                let mut block = load_block(x.as_ptr().add(at));
                let (mut max, sum_abs) = block_magnitudes(&block);
                let mut kept = 0f32;
                if has_outliers(max, sum_abs) {
                    let bound = _mm256_set1_ps(outlier_bound(sum_abs));
                    let mut most = _mm256_setzero_ps();
                    for (k, v) in block.iter_mut().enumerate() {
                        let a = _mm256_and_ps(*v, abs);
                        let big = _mm256_cmp_ps::<_CMP_GT_OQ>(a, bound);
                        let mut bits = _mm256_movemask_ps(big) as u32;
                        while bits != 0 {
                            let c = b * QK + 8 * k + bits.trailing_zeros() as usize;
                            let value = x[i * cols + c];
                            self.outliers.push(Outlier {
                                col: c as u32,
                                value,
                            });
                            kept += value;
                            bits &= bits - 1;
                        }
                        *v = _mm256_andnot_ps(big, *v);
                        most = _mm256_max_ps(most, _mm256_andnot_ps(big, a));
                    }
                    max = hmax(most);
                }
                let mut q = [0u32; QK / 4];
                let (scale, halves) = level(&block, max, q.as_mut_ptr() as *mut i8);
                let (g, k) = (i / G, i % G);
                for (c4, four) in q.iter().enumerate() {
                    // SAFETY: group g of `packed.q` is sized above.
                    dst.add((g * cols / 4 + b * QK / 4 + c4) * G + k)
                        .write_unaligned(*four);
                }
                let p = &mut self.packed;
                let slot = (g * nb + b) * G + k;
                p.scale[slot] = scale;
                p.sum[slot] = scale * (halves[0] + halves[1]) as f32 + kept;
                for (h, half) in halves.iter().enumerate() {
                    p.sum16[((g * nb + b) * 2 + h) * G + k] = *half;
                }
            }
            self.first_outlier.push(self.outliers.len());
        }
    }
}

/// A block's largest magnitude and the sum of its magnitudes: what [`has_outliers`] is asked
/// with (the tests' error bounds use it too, so they decide alike at the threshold). In
/// eight lanes as [`block_magnitudes`] sums them in a vector (lane l: values l, 8 + l,
/// 16 + l, 24 + l, in that order), then the lanes in the order of `hsum`: bit for bit the
/// same sums.
#[cfg(test)]
pub fn magnitudes(v: &[f32; QK]) -> (f32, f32) {
    let most = v.iter().fold(0f32, |m, x| m.max(x.abs()));
    let s: [f32; 8] =
        std::array::from_fn(|l| v[l].abs() + v[8 + l].abs() + v[16 + l].abs() + v[24 + l].abs());
    let sum = ((s[0] + s[4]) + (s[2] + s[6])) + ((s[1] + s[5]) + (s[3] + s[7]));
    (most, sum)
}

/// The 32 values from `p` in four vectors.
#[inline(always)]
unsafe fn load_block(p: *const f32) -> [__m256; 4] {
    [
        _mm256_loadu_ps(p),
        _mm256_loadu_ps(p.add(8)),
        _mm256_loadu_ps(p.add(16)),
        _mm256_loadu_ps(p.add(24)),
    ]
}

/// [`magnitudes`] of a block in four vectors.
#[inline(always)]
unsafe fn block_magnitudes(x: &[__m256; 4]) -> (f32, f32) {
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let mut a = *x;
    for v in &mut a {
        *v = _mm256_and_ps(*v, abs);
    }
    let most = _mm256_max_ps(_mm256_max_ps(a[0], a[1]), _mm256_max_ps(a[2], a[3]));
    let sums = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), a[2]), a[3]);
    (hmax(most), super::hsum(sums))
}

/// The largest of a vector's eight lanes.
#[inline(always)]
unsafe fn hmax(v: __m256) -> f32 {
    let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps::<1>(m, m)))
}

/// Rounds a block's 32 values, whose largest magnitude is `max`, to `scale · q` with
/// |q| ≤ 127, `scale = max/127`, round to nearest, ties to even (the largest lands on 127),
/// writing the 32 `q` to `out`; returns the scale and the sums of the two halves' `q`.
#[inline(always)]
unsafe fn level(x: &[__m256; 4], max: f32, out: *mut i8) -> (f32, [i32; 2]) {
    if max == 0.0 {
        std::ptr::write_bytes(out, 0, QK);
        return (0.0, [0; 2]);
    }
    let scale = max / 127.0;
    let (inv, lim) = (_mm256_set1_ps(127.0 / max), _mm256_set1_ps(127.0));
    let low = _mm256_sub_ps(_mm256_setzero_ps(), lim);
    let mut n = *x;
    let mut i = [_mm256_setzero_si256(); 4];
    for (v, i) in n.iter_mut().zip(&mut i) {
        let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(*v, inv),
        );
        *v = _mm256_min_ps(_mm256_max_ps(r, low), lim);
        *i = _mm256_cvtps_epi32(*v);
    }
    // Packing works within 128-bit lanes: dwords come out as 0, 4, 1, 5, 2, 6, 3, 7.
    let bytes = _mm256_packs_epi16(
        _mm256_packs_epi32(i[0], i[1]),
        _mm256_packs_epi32(i[2], i[3]),
    );
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    _mm256_storeu_si256(
        out as *mut __m256i,
        _mm256_permutevar8x32_epi32(bytes, order),
    );
    // Sums of integers below 2²⁴: exact in f32.
    let halves = [
        super::hsum(_mm256_add_ps(n[0], n[1])) as i32,
        super::hsum(_mm256_add_ps(n[2], n[3])) as i32,
    ];
    (scale, halves)
}

/// The 16 integers of a byte panel at column `c` (byte `c % 4` of each row's four-byte
/// group, see [`gemm`]'s layout), as 32-bit lanes.
#[inline(always)]
unsafe fn column_512(qp: *const u8, c: usize) -> __m512i {
    let v = _mm512_loadu_si512(qp.add(c / 4 * 64) as *const __m512i);
    let shift = _mm512_set1_epi32(8 * (c % 4) as i32);
    _mm512_and_si512(_mm512_srlv_epi32(v, shift), _mm512_set1_epi32(0xFF))
}

/// [`column_512`] for rows 0..8 (`half` 0) or 8..16 (1) in AVX2.
#[inline(always)]
unsafe fn column_avx2(qp: *const u8, c: usize, half: usize) -> __m256i {
    let v = _mm256_loadu_si256(qp.add(c / 4 * 64 + 32 * half) as *const __m256i);
    let shift = _mm256_set1_epi32(8 * (c % 4) as i32);
    _mm256_and_si256(_mm256_srlv_epi32(v, shift), _mm256_set1_epi32(0xFF))
}

/// The outliers of activation rows `i0..i0 + M` times the panel's weights at their columns,
/// added to the rows' sums in column order, after their integer pass (so a row's sums come
/// in the same order whatever shares the call). `Q6`: a Q6_K panel (weights `d·sc · (q − 32)`,
/// a scale per 16 columns), else one of weights `d · q` (their minimums are in the integer
/// pass's term, whose sums include the outliers) with a scale per 32.
#[inline(always)]
unsafe fn outliers_512<const M: usize, const Q6: bool>(
    qp: *const u8,
    ds: &[f32],
    a: &Activations,
    i0: usize,
    acc: &mut [__m512; M],
) {
    for (k, acc) in acc.iter_mut().enumerate() {
        for o in a.outliers_of(i0 + k) {
            let c = o.col as usize;
            let mut w = _mm512_cvtepi32_ps(column_512(qp, c));
            let group = if Q6 {
                w = _mm512_sub_ps(w, _mm512_set1_ps(32.0));
                c / 16
            } else {
                c / QK
            };
            let d = _mm512_loadu_ps(ds.as_ptr().add(group * PANEL));
            *acc = _mm512_fmadd_ps(_mm512_mul_ps(w, d), _mm512_set1_ps(o.value), *acc);
        }
    }
}

/// [`outliers_512`] in AVX2, the same arithmetic in two halves of eight rows.
#[inline(always)]
unsafe fn outliers_avx2<const M: usize, const Q6: bool>(
    qp: *const u8,
    ds: &[f32],
    a: &Activations,
    i0: usize,
    acc: &mut [[__m256; 2]; M],
) {
    for (k, acc) in acc.iter_mut().enumerate() {
        for o in a.outliers_of(i0 + k) {
            let c = o.col as usize;
            let group = if Q6 { c / 16 } else { c / QK };
            for (half, acc) in acc.iter_mut().enumerate() {
                let mut w = _mm256_cvtepi32_ps(column_avx2(qp, c, half));
                if Q6 {
                    w = _mm256_sub_ps(w, _mm256_set1_ps(32.0));
                }
                let d = _mm256_loadu_ps(ds.as_ptr().add(group * PANEL + 8 * half));
                *acc = _mm256_fmadd_ps(_mm256_mul_ps(w, d), _mm256_set1_ps(o.value), *acc);
            }
        }
    }
}

/// A byte panel's buffers emptied and sized for rows of `cols` values (scales and minimums
/// per block of 32), all zero, so rows past the panel's width stay zero; where its bytes go.
fn zeroed(bytes: &mut Vec<u16>, ds: &mut Vec<f32>, ms: &mut Vec<f32>, cols: usize) -> *mut u8 {
    for v in [&mut *ds, &mut *ms] {
        v.clear();
        v.resize(cols / QK * PANEL, 0.0);
    }
    bytes.clear();
    bytes.resize(cols * PANEL / 2, 0);
    bytes.as_mut_ptr() as *mut u8
}

/// A panel of [`PANEL`] Q4_K (or Q5_K) weight rows for [`gemm`]: their 4-bit (5-bit)
/// values as bytes, row-major in `bytes` (16 × cols bytes; [`super::bf16::interleave`] on
/// them as 16-bit pairs puts them in this kernel's layout, [`super::bf16::widen`] makes the
/// bf16 kernels' panel of them), and each 32-column sub-block's `d·sc` and `dmin·m` per row
/// (`ds[s·16 + j]`, `ms[s·16 + j]`). Rows past `width` are zero.
///
/// # Safety
/// AVX2 must be present; `rows` holds `width` (≤ 16) rows of `nb` blocks; the buffers are
/// resized here.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn q4k_panel<B: NibbleBlock>(
    rows: &[B],
    nb: usize,
    width: usize,
    bytes: &mut Vec<u16>,
    ds: &mut Vec<f32>,
    ms: &mut Vec<f32>,
) {
    let cols = nb * QK_K;
    let out = zeroed(bytes, ds, ms, cols);
    for j in 0..width {
        for b in 0..nb {
            let blk = &rows[j * nb + b];
            let (d, m) = super::kquants::q4k_scales(blk);
            for s in 0..8 {
                ds[(b * 8 + s) * PANEL + j] = d[s];
                ms[(b * 8 + s) * PANEL + j] = m[s];
            }
            for g in 0..4 {
                let (lo, hi) = super::kquants::group_values(blk, g);
                let p = out.add(j * cols + b * QK_K + g * 64);
                _mm256_storeu_si256(p as *mut __m256i, lo);
                _mm256_storeu_si256(p.add(32) as *mut __m256i, hi);
            }
        }
    }
}

/// A format of 32-value blocks with one scale `d`, whose values the byte panels hold as
/// unsigned integers `u` with the weights `d · (u − OFFSET)`: the minimums' term of [`gemm`]
/// takes `OFFSET · d` off.
pub trait Offset32 {
    /// What the bytes are above the values.
    const OFFSET: f32;
    fn d(&self) -> half::f16;
    /// Writes the block's 32 bytes `u` to `p`.
    ///
    /// # Safety
    /// AVX2 must be present (inlined into [`offset32_panel`]); `p` has room for 32 bytes.
    unsafe fn store(&self, p: *mut u8);
}

impl Offset32 for BlockQ4_0 {
    /// Q4_0's nibbles are its bytes; its weights are `d · (q − 8)`.
    const OFFSET: f32 = 8.0;
    fn d(&self) -> half::f16 {
        self.d
    }
    #[inline(always)]
    unsafe fn store(&self, p: *mut u8) {
        let mask = _mm_set1_epi8(0x0F);
        let raw = _mm_loadu_si128(self.qs.as_ptr() as *const __m128i);
        _mm_storeu_si128(p as *mut __m128i, _mm_and_si128(raw, mask));
        _mm_storeu_si128(
            p.add(16) as *mut __m128i,
            _mm_and_si128(_mm_srli_epi16::<4>(raw), mask),
        );
    }
}

impl Offset32 for BlockQ8_0 {
    /// Q8_0's signed values `q` (−127..127) as the unsigned bytes `q + 128` (the sign bit
    /// flipped), the operand `vpdpbusd` wants: for the AVX512_VNNI kernel only, since the
    /// AVX2 form's `vpmaddubsw` sums two products in 16 bits, and 2 · 255 · 127 saturates
    /// there.
    const OFFSET: f32 = 128.0;
    fn d(&self) -> half::f16 {
        self.d
    }
    #[inline(always)]
    unsafe fn store(&self, p: *mut u8) {
        let q = _mm256_loadu_si256(self.qs.as_ptr() as *const __m256i);
        _mm256_storeu_si256(
            p as *mut __m256i,
            _mm256_xor_si256(q, _mm256_set1_epi8(i8::MIN)),
        );
    }
}

/// A panel of [`PANEL`] Q4_0 or Q8_0 weight rows for [`gemm`], as [`q4k_panel`] makes them:
/// the values as bytes (see [`Offset32`]), each block's `d` as the scale and `OFFSET · d` as
/// the minimum.
///
/// # Safety
/// As [`q4k_panel`], with `nb` blocks of 32 per row.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn offset32_panel<B: Offset32>(
    rows: &[B],
    nb: usize,
    width: usize,
    bytes: &mut Vec<u16>,
    ds: &mut Vec<f32>,
    ms: &mut Vec<f32>,
) {
    let cols = nb * QK;
    let out = zeroed(bytes, ds, ms, cols);
    for j in 0..width {
        for b in 0..nb {
            let blk = &rows[j * nb + b];
            let d = f16_to_f32(blk.d());
            ds[b * PANEL + j] = d;
            ms[b * PANEL + j] = B::OFFSET * d;
            blk.store(out.add(j * cols + b * QK));
        }
    }
}

/// A panel of [`PANEL`] Q6_K weight rows for [`gemm_q6k`]: their values `q` (0..64, the
/// weights being `d·sc · (q − 32)`) as bytes, row-major in `bytes` (16 × cols, as
/// [`q4k_panel`] lays them out), and each 16-column sub-block's `d·sc` per row
/// (`ds[s·16 + j]`). Rows past `width` are zero.
///
/// # Safety
/// AVX2 must be present; `rows` holds `width` (≤ 16) rows of `nb` blocks; the buffers are
/// resized here.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn q6k_panel(
    rows: &[BlockQ6K],
    nb: usize,
    width: usize,
    bytes: &mut Vec<u16>,
    ds: &mut Vec<f32>,
) {
    let cols = nb * QK_K;
    ds.clear();
    ds.resize(cols / 16 * PANEL, 0.0);
    bytes.clear();
    bytes.resize(cols * PANEL / 2, 0);
    let out = bytes.as_mut_ptr() as *mut u8;
    for j in 0..width {
        for b in 0..nb {
            let blk = &rows[j * nb + b];
            let d = f16_to_f32(blk.d);
            for (s, &sc) in blk.scales.iter().enumerate() {
                ds[(b * 16 + s) * PANEL + j] = d * sc as f32;
            }
            for h in 0..2 {
                let groups = super::kquants::q6k_groups(blk, h);
                for (k, g) in groups.iter().enumerate() {
                    let p = out.add(j * cols + b * QK_K + h * 128 + 32 * k);
                    _mm256_storeu_si256(p as *mut __m256i, *g);
                }
            }
        }
    }
}

/// `out[k][j] = Σ_c x[k][c] · w[j][c]` for activation rows `i0..i0 + m` (m in 1..=[`MR`]) of
/// `a` and the 16 rows of a panel: `q` their bytes interleaved (`q[(c/4)·64 + 4j + c%4]` =
/// row j, column c), `ds`/`ms` each 32-column block's scale and minimum per row. Row k of
/// the result goes to `out + k · ld` (16 values).
///
/// # Safety
/// AVX512_VNNI (and F, BW) must be present; `a` made by [`Activations::prepare`] from rows
/// of `cols`, holding rows `i0..i0 + m`, `i0` a multiple of [`MR`]; `q` holds 16 × `cols`
/// bytes; `out` has room for m rows of 16 at stride `ld`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub unsafe fn gemm(
    m: usize,
    q: &[u16],
    ds: &[f32],
    ms: &[f32],
    a: &Activations,
    i0: usize,
    cols: usize,
    out: *mut f32,
    ld: usize,
) {
    debug_assert!(q.len() * 2 >= PANEL * cols && ds.len() >= cols / QK * PANEL);
    debug_assert!(a.packed.q.len() >= (i0 + m) * cols);
    let qp = q.as_ptr() as *const u8;
    by_rows!(
        m,
        [1, 2, 3, 4, 5, 6, 7],
        8,
        gemm_m(qp, ds, ms, a, i0, cols, out, ld)
    );
}

/// Where a kernel reads activation rows `i0..` (a multiple of the group size `G`): the
/// group's integers, scales, block sums and half-block integer sums in
/// [`Activations::packed`].
#[inline(always)]
unsafe fn group<const G: usize>(a: &Activations, i0: usize, cols: usize) -> Group {
    let p = &a.packed;
    debug_assert!(p.rows == G && i0.is_multiple_of(G) && p.q.len() >= (i0 / G + 1) * G * cols);
    let (g, nb) = (i0 / G, cols / QK);
    Group {
        q: p.q.as_ptr().add(g * G * cols),
        scale: p.scale.as_ptr().add(g * nb * G),
        sum: p.sum.as_ptr().add(g * nb * G),
        sum16: p.sum16.as_ptr().add(g * nb * 2 * G),
    }
}

/// One group of packed activation rows (see [`group`]).
struct Group {
    q: *const i8,
    scale: *const f32,
    sum: *const f32,
    sum16: *const i32,
}

/// Row k's four bytes at four-byte column group `c4` of a packed group of `G` rows, as an
/// integer.
#[inline(always)]
unsafe fn four<const G: usize>(xp: *const i8, c4: usize, k: usize) -> i32 {
    (xp.add((c4 * G + k) * 4) as *const i32).read_unaligned()
}

/// [`gemm`] with the row count fixed at compile time, so the sums live in registers.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn gemm_m<const M: usize>(
    qp: *const u8,
    ds: &[f32],
    ms: &[f32],
    a: &Activations,
    i0: usize,
    cols: usize,
    out: *mut f32,
    ld: usize,
) {
    let nb = cols / QK;
    let zero = _mm512_setzero_ps();
    let mut acc = [zero; M];
    let Group {
        q: xp, scale, sum, ..
    } = group::<MR>(a, i0, cols);
    for b in 0..nb {
        let mut t = [_mm512_setzero_si512(); M];
        for p in 0..QK / 4 {
            let w = _mm512_loadu_si512(qp.add((b * QK / 4 + p) * 64) as *const __m512i);
            for (k, tk) in t.iter_mut().enumerate() {
                let x = _mm512_set1_epi32(four::<MR>(xp, b * QK / 4 + p, k));
                *tk = _mm512_dpbusd_epi32(*tk, w, x);
            }
        }
        let d = _mm512_loadu_ps(ds.as_ptr().add(b * PANEL));
        let mn = _mm512_loadu_ps(ms.as_ptr().add(b * PANEL));
        for (k, a) in acc.iter_mut().enumerate() {
            let dk = _mm512_mul_ps(d, _mm512_set1_ps(*scale.add(b * MR + k)));
            *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t[k]), dk, *a);
            *a = _mm512_fnmadd_ps(mn, _mm512_set1_ps(*sum.add(b * MR + k)), *a);
        }
    }
    outliers_512::<M, false>(qp, ds, a, i0, &mut acc);
    for (k, a) in acc.iter().enumerate() {
        _mm512_storeu_ps(out.add(k * ld), *a);
    }
}

/// [`gemm`] for a panel of Q6_K rows ([`q6k_panel`]: bytes `q`, weights `d·sc · (q − 32)`,
/// `ds` each 16-column sub-block's `d·sc`). Each sub-block's `vpdpbusd` sums start from
/// `−32 ·` the activations' integer sum over it, so they are `Σ (q − 32) · x` exactly; the
/// two sub-blocks' sums of a block are scaled by their `d·sc` and then by the activation
/// block's scale. The outliers come after, as in [`gemm`].
///
/// Why: Q6_K (the `ffn_down` and `attn_v` of half the layers in Q4_K_M and Q5_K_M files)
/// went through bf16 panels (AVX512_BF16: 32 multiply-adds an instruction) or f32 ones.
///
/// # Safety
/// As [`gemm`], with `ds` holding `cols / 16 × 16` scales.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub unsafe fn gemm_q6k(
    m: usize,
    q: &[u16],
    ds: &[f32],
    a: &Activations,
    i0: usize,
    cols: usize,
    out: *mut f32,
    ld: usize,
) {
    debug_assert!(q.len() * 2 >= PANEL * cols && ds.len() >= cols / 16 * PANEL);
    debug_assert!(a.packed.q.len() >= (i0 + m) * cols);
    let qp = q.as_ptr() as *const u8;
    by_rows!(
        m,
        [1, 2, 3, 4, 5, 6, 7],
        8,
        gemm_q6k_m(qp, ds, a, i0, cols, out, ld)
    );
}

/// [`gemm_q6k`] with the row count fixed at compile time.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn gemm_q6k_m<const M: usize>(
    qp: *const u8,
    ds: &[f32],
    a: &Activations,
    i0: usize,
    cols: usize,
    out: *mut f32,
    ld: usize,
) {
    let nb = cols / QK;
    let mut acc = [_mm512_setzero_ps(); M];
    let Group {
        q: xp,
        scale,
        sum16,
        ..
    } = group::<MR>(a, i0, cols);
    for b in 0..nb {
        let mut f = [_mm512_setzero_ps(); M];
        let bytes = |k: usize, p: usize| _mm512_set1_epi32(four::<MR>(xp, b * QK / 4 + p, k));
        for h in 0..2 {
            let start = |k: usize| *sum16.add((2 * b + h) * MR + k);
            q6k_sub_512(qp, ds, b, h, start, bytes, &mut f);
        }
        for (k, a) in acc.iter_mut().enumerate() {
            *a = _mm512_fmadd_ps(f[k], _mm512_set1_ps(*scale.add(b * MR + k)), *a);
        }
    }
    outliers_512::<M, true>(qp, ds, a, i0, &mut acc);
    for (k, a) in acc.iter().enumerate() {
        _mm512_storeu_ps(out.add(k * ld), *a);
    }
}

/// Sub-block `h` (0, 1) of block `b` of a Q6_K panel times `R` activation rows: `vpdpbusd`
/// sums of its four-byte groups `p` against the rows' broadcast bytes `x4(k, p)`, each
/// starting from `−32 · start(k)` (`start`: the row's integers summed over the sub-block),
/// converted and scaled by the sub-block's `d·sc` into `f`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn q6k_sub_512<const R: usize>(
    qp: *const u8,
    ds: &[f32],
    b: usize,
    h: usize,
    start: impl Fn(usize) -> i32,
    x4: impl Fn(usize, usize) -> __m512i,
    f: &mut [__m512; R],
) {
    let mut t = [_mm512_setzero_si512(); R];
    for (k, tk) in t.iter_mut().enumerate() {
        *tk = _mm512_set1_epi32(-32 * start(k));
    }
    for p in 4 * h..4 * h + 4 {
        let w = _mm512_loadu_si512(qp.add((b * QK / 4 + p) * 64) as *const __m512i);
        for (k, tk) in t.iter_mut().enumerate() {
            *tk = _mm512_dpbusd_epi32(*tk, w, x4(k, p));
        }
    }
    let d = _mm512_loadu_ps(ds.as_ptr().add((2 * b + h) * PANEL));
    for (fk, tk) in f.iter_mut().zip(&t) {
        *fk = _mm512_fmadd_ps(_mm512_cvtepi32_ps(*tk), d, *fk);
    }
}

/// Activation rows per call of the AVX2 kernel. A panel's weights (16 rows × the row width)
/// come from L2 for wide matrices, so each weight vector must serve several rows: measured
/// on Q4_K_M prompts (`--no-avx512`), 2 rows 92 tok/s, 4 rows 97–104, 6 rows 108, 8 rows
/// 105–107 (the 16 registers no longer hold the partial sums).
pub const MR_AVX2: usize = 6;

/// A byte panel (16 rows × `cols` bytes, row-major in `bytes`) in the kernels' layout,
/// `q[(c/4)·64 + 4j + c%4]` = row j, column c: what [`super::bf16::interleave`] does with
/// AVX-512, one 4-byte group at a time, for CPUs without it.
///
/// # Safety
/// `bytes` holds 16 × `cols` bytes; `cols` a multiple of 4.
pub unsafe fn interleave_bytes(bytes: &[u16], cols: usize, q: &mut Vec<u16>) {
    assert!(bytes.len() * 2 >= PANEL * cols && cols.is_multiple_of(4));
    q.clear();
    q.resize(cols * PANEL / 2, 0);
    let (src, dst) = (bytes.as_ptr() as *const u32, q.as_mut_ptr() as *mut u32);
    for g in 0..cols / 4 {
        for j in 0..PANEL {
            let v = src.add(j * cols / 4 + g).read_unaligned();
            dst.add(g * PANEL + j).write_unaligned(v);
        }
    }
}

/// [`gemm`] with AVX2 only: `vpmaddubsw` multiplies the weights' bytes with the activations'
/// in pairs into 16-bit sums (at most 2·31·127 each, so four groups' sums still fit: exact),
/// `vpmaddwd` widens them to 32 bits. The integer sums are the same as `vpdpbusd`'s and
/// every f32 step the same, so the results are those of [`gemm`] bit for bit. `m` in
/// 1..=[`MR_AVX2`].
///
/// # Safety
/// AVX2 and FMA must be present; `a` made by [`Activations::prepare_avx2`], `i0` a multiple
/// of [`MR_AVX2`]; otherwise as [`gemm`].
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn gemm_avx2(
    m: usize,
    q: &[u16],
    ds: &[f32],
    ms: &[f32],
    a: &Activations,
    i0: usize,
    cols: usize,
    out: *mut f32,
    ld: usize,
) {
    debug_assert!(q.len() * 2 >= PANEL * cols && ds.len() >= cols / QK * PANEL);
    debug_assert!(a.packed.q.len() >= (i0 + m) * cols);
    let qp = q.as_ptr() as *const u8;
    by_rows!(
        m,
        [1, 2, 3, 4, 5],
        6,
        gemm_avx2_m(qp, ds, ms, a, i0, cols, out, ld)
    );
}

/// Σ over the four-byte groups `groups` (at most four: their 16-bit sums stay exact) of
/// block `b` of a panel's two halves (rows 0..8, 8..16) times `R` activation rows' broadcast
/// groups `x(k, p)`, added to the rows' 32-bit sums `t`. Each weight vector is loaded once
/// for all `R` rows.
#[inline(always)]
unsafe fn dot_avx2<const R: usize>(
    qp: *const u8,
    b: usize,
    groups: std::ops::Range<usize>,
    x: impl Fn(usize, usize) -> __m256i,
    t: &mut [[__m256i; 2]; R],
) {
    let ones = _mm256_set1_epi16(1);
    let mut s = [[_mm256_setzero_si256(); 2]; R];
    for p in groups {
        let base = qp.add((b * QK / 4 + p) * 64);
        let w = [
            _mm256_loadu_si256(base as *const __m256i),
            _mm256_loadu_si256(base.add(32) as *const __m256i),
        ];
        for (k, sk) in s.iter_mut().enumerate() {
            let xv = x(k, p);
            for h in 0..2 {
                sk[h] = _mm256_add_epi16(sk[h], _mm256_maddubs_epi16(w[h], xv));
            }
        }
    }
    for (tk, sk) in t.iter_mut().zip(&s) {
        for h in 0..2 {
            tk[h] = _mm256_add_epi32(tk[h], _mm256_madd_epi16(sk[h], ones));
        }
    }
}

/// [`gemm_avx2`] with the row count fixed at compile time.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemm_avx2_m<const M: usize>(
    qp: *const u8,
    ds: &[f32],
    ms: &[f32],
    a: &Activations,
    i0: usize,
    cols: usize,
    out: *mut f32,
    ld: usize,
) {
    let nb = cols / QK;
    let mut acc = [[_mm256_setzero_ps(); 2]; M];
    let Group {
        q: xp, scale, sum, ..
    } = group::<MR_AVX2>(a, i0, cols);
    // Each block's sub-block scale times the row's block scale, then the integer sum; less
    // the minimums' term: the steps (and their order) of `gemm_m`.
    let scaled = |acc: &mut [__m256; 2], t: &[__m256i; 2], b: usize, xs: f32| {
        for h in 0..2 {
            let d = _mm256_loadu_ps(ds.as_ptr().add(b * PANEL + 8 * h));
            let dk = _mm256_mul_ps(d, _mm256_set1_ps(xs));
            acc[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t[h]), dk, acc[h]);
        }
    };
    for b in 0..nb {
        let mut t = [[_mm256_setzero_si256(); 2]; M];
        let x = |k: usize, p: usize| _mm256_set1_epi32(four::<MR_AVX2>(xp, b * QK / 4 + p, k));
        dot_avx2(qp, b, 0..4, x, &mut t);
        dot_avx2(qp, b, 4..8, x, &mut t);
        for (k, acc) in acc.iter_mut().enumerate() {
            scaled(acc, &t[k], b, *scale.add(b * MR_AVX2 + k));
            for (h, a) in acc.iter_mut().enumerate() {
                let mn = _mm256_loadu_ps(ms.as_ptr().add(b * PANEL + 8 * h));
                *a = _mm256_fnmadd_ps(mn, _mm256_set1_ps(*sum.add(b * MR_AVX2 + k)), *a);
            }
        }
    }
    outliers_avx2::<M, false>(qp, ds, a, i0, &mut acc);
    for (k, a) in acc.iter().enumerate() {
        _mm256_storeu_ps(out.add(k * ld), a[0]);
        _mm256_storeu_ps(out.add(k * ld + 8), a[1]);
    }
}

/// [`gemm_q6k`] with AVX2 only, as [`gemm_avx2`] is [`gemm`]'s: two four-byte groups'
/// `vpmaddubsw` sums at a time in 16 bits (at most 2 · 2·63·127 = 32004: exact), then
/// `vpmaddwd` to 32 bits; the same integer sums and f32 steps as [`gemm_q6k`], so the same
/// results bit for bit. `m` in 1..=[`MR_AVX2`].
///
/// # Safety
/// AVX2 and FMA must be present; `a` and `i0` as for [`gemm_avx2`]; otherwise as
/// [`gemm_q6k`].
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn gemm_q6k_avx2(
    m: usize,
    q: &[u16],
    ds: &[f32],
    a: &Activations,
    i0: usize,
    cols: usize,
    out: *mut f32,
    ld: usize,
) {
    debug_assert!(q.len() * 2 >= PANEL * cols && ds.len() >= cols / 16 * PANEL);
    debug_assert!(a.packed.q.len() >= (i0 + m) * cols);
    let qp = q.as_ptr() as *const u8;
    by_rows!(
        m,
        [1, 2, 3, 4, 5],
        6,
        gemm_q6k_avx2_m(qp, ds, a, i0, cols, out, ld)
    );
}

/// [`q6k_sub_512`] in AVX2: the panel's two halves (rows 0..8, 8..16) in two vectors.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn q6k_sub_avx2<const R: usize>(
    qp: *const u8,
    ds: &[f32],
    b: usize,
    h: usize,
    start: impl Fn(usize) -> i32,
    x4: impl Fn(usize, usize) -> __m256i,
    f: &mut [[__m256; 2]; R],
) {
    let mut t = [[_mm256_setzero_si256(); 2]; R];
    for (k, tk) in t.iter_mut().enumerate() {
        *tk = [_mm256_set1_epi32(-32 * start(k)); 2];
    }
    dot_avx2(qp, b, 4 * h..4 * h + 2, &x4, &mut t);
    dot_avx2(qp, b, 4 * h + 2..4 * h + 4, &x4, &mut t);
    for half in 0..2 {
        let d = _mm256_loadu_ps(ds.as_ptr().add((2 * b + h) * PANEL + 8 * half));
        for (fk, tk) in f.iter_mut().zip(&t) {
            fk[half] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(tk[half]), d, fk[half]);
        }
    }
}

/// [`gemm_q6k_avx2`] with the row count fixed at compile time.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemm_q6k_avx2_m<const M: usize>(
    qp: *const u8,
    ds: &[f32],
    a: &Activations,
    i0: usize,
    cols: usize,
    out: *mut f32,
    ld: usize,
) {
    let nb = cols / QK;
    let zero = _mm256_setzero_ps();
    let mut acc = [[zero; 2]; M];
    let Group {
        q: xp,
        scale,
        sum16,
        ..
    } = group::<MR_AVX2>(a, i0, cols);
    let scaled = |acc: &mut [__m256; 2], f: &[__m256; 2], xs: f32| {
        for (a, f) in acc.iter_mut().zip(f) {
            *a = _mm256_fmadd_ps(*f, _mm256_set1_ps(xs), *a);
        }
    };
    for b in 0..nb {
        let mut f = [[zero; 2]; M];
        let x4 = |k: usize, p: usize| _mm256_set1_epi32(four::<MR_AVX2>(xp, b * QK / 4 + p, k));
        for h in 0..2 {
            let start = |k: usize| *sum16.add((2 * b + h) * MR_AVX2 + k);
            q6k_sub_avx2(qp, ds, b, h, start, x4, &mut f);
        }
        for (k, acc) in acc.iter_mut().enumerate() {
            scaled(acc, &f[k], *scale.add(b * MR_AVX2 + k));
        }
    }
    outliers_avx2::<M, true>(qp, ds, a, i0, &mut acc);
    for (k, a) in acc.iter().enumerate() {
        _mm256_storeu_ps(out.add(k * ld), a[0]);
        _mm256_storeu_ps(out.add(k * ld + 8), a[1]);
    }
}

/// Whether this CPU runs the AVX512_VNNI kernels, whether or not dispatch picks them (AMX
/// tiles take their place where usable): the tests run them wherever they can.
#[cfg(test)]
pub fn vnni() -> bool {
    super::avx512()
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vnni")
}

/// Half the rounding step of each value of a block, as [`Activations`] rounds it: 0 for an
/// outlier (kept exact), else half the step set by the block's largest other magnitude
/// (`max/254`). What the tests' error bounds are made of.
#[cfg(test)]
pub fn half_steps(v: &[f32; QK]) -> [f32; QK] {
    let (max, sum_abs) = magnitudes(v);
    if !has_outliers(max, sum_abs) {
        return [max / 254.0; QK];
    }
    let bound = outlier_bound(sum_abs);
    let rest = v
        .iter()
        .filter(|x| x.abs() <= bound)
        .fold(0f32, |m, x| m.max(x.abs()));
    v.map(|x| if x.abs() > bound { 0.0 } else { rest / 254.0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The largest magnitude and sum that [`has_outliers`] is asked with in the rounding are
    /// those of [`magnitudes`] (what the tests' error bounds decide with) bit for bit, on
    /// blocks of many scales and shapes.
    #[test]
    fn magnitudes_are_the_roundings_own() {
        if !super::super::available() {
            return;
        }
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn vector(v: &[f32; QK]) -> (u32, u32) {
            let (max, sum) = block_magnitudes(&load_block(v.as_ptr()));
            (max.to_bits(), sum.to_bits())
        }
        for seed in 0..500u32 {
            let v: [f32; QK] = std::array::from_fn(|c| {
                let h = (seed.wrapping_mul(2654435761) ^ (c as u32).wrapping_mul(40503)) % 10007;
                let x = (h as f32 / 5003.0 - 1.0) * 10f32.powi((seed % 7) as i32 - 3);
                if c as u32 == seed % 41 {
                    x * 300.0
                } else {
                    x
                }
            });
            let (max, sum) = magnitudes(&v);
            // SAFETY: AVX2 checked above.
            assert_eq!(
                unsafe { vector(&v) },
                (max.to_bits(), sum.to_bits()),
                "seed {seed}"
            );
        }
    }

    /// Outliers kept exact and only they (the massive activation, and one value of a block
    /// with two large ones where only it exceeds the bound); every other value within half
    /// a step of its block's largest other magnitude (`max/254`); the sums (per block, with
    /// the outliers; per 16 values, of the integers); the AVX2 build the same as AVX-512's.
    #[test]
    fn activations_keep_every_value_within_half_a_step() {
        if !vnni() {
            return;
        }
        let cols = 128;
        let mut x: Vec<f32> = (0..3 * cols)
            .map(|i| ((i * 37 % 101) as f32 / 50.0 - 1.0) * 0.7)
            .collect();
        x[5] = 300.0; // row 0, block 0: a massive activation
        x[cols + 70] = -45.0; // row 1, block 2: an outlier...
        x[cols + 71] = 2.5; // ...beside a value above the others but below the bound
        for v in &mut x[2 * cols + 32..2 * cols + 64] {
            *v = 0.0; // row 2, block 1: all zero
        }
        let mut a = Activations::default();
        // SAFETY: AVX-512 checked above; rows of whole blocks.
        unsafe { a.prepare(&x, cols) };
        // The AVX2 build of the same rounding gives the same integers, scales and sums.
        let mut b = Activations::default();
        // SAFETY: AVX2 comes with AVX-512.
        unsafe { b.prepare_avx2(&x, cols) };
        let nb = cols / QK;
        for i in 0..3 {
            for c in 0..cols {
                assert_eq!(a.q_at(i, c, cols), b.q_at(i, c, cols), "row {i} column {c}");
            }
            for blk in 0..nb {
                assert_eq!(
                    a.block(i, blk, cols),
                    b.block(i, blk, cols),
                    "row {i} block {blk}"
                );
            }
        }
        assert_eq!(
            (&a.outliers, &a.first_outlier),
            (&b.outliers, &b.first_outlier)
        );
        let outlier = |col: u32, value: f32| Outlier { col, value };
        assert_eq!(a.outliers_of(0), &[outlier(5, 300.0)]);
        assert_eq!(a.outliers_of(1), &[outlier(70, -45.0)]);
        assert_eq!(a.outliers_of(2), &[]);
        for i in 0..3 {
            for b in 0..nb {
                let block: &[f32; QK] = x[i * cols + b * QK..][..QK].try_into().unwrap();
                let steps = half_steps(block);
                let (scale, block_sum, sum16) = a.block(i, b, cols);
                let mut sum = 0f64;
                for (c, &v) in block.iter().enumerate() {
                    let col = (b * QK + c) as u32;
                    let q = a.q_at(i, b * QK + c, cols);
                    let got = match a.outliers_of(i).iter().find(|o| o.col == col) {
                        Some(o) => {
                            assert_eq!(q, 0, "row {i} column {col}: an outlier's integer");
                            o.value as f64
                        }
                        None => scale as f64 * q as f64,
                    };
                    sum += got;
                    assert!(
                        (got - v as f64).abs() <= steps[c] as f64 * 1.001 + 1e-12,
                        "row {i} block {b} value {c}: {got} for {v}"
                    );
                }
                for (h, got) in sum16.iter().enumerate() {
                    let half = (16 * h..16 * h + 16).map(|c| a.q_at(i, b * QK + c, cols));
                    let want: i32 = half.map(|v| v as i32).sum();
                    assert_eq!(*got, want, "row {i} block {b}");
                }
                let want = block_sum as f64;
                assert!(
                    (sum - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "sum {sum} vs {want}"
                );
            }
        }
        // The block with the outlier keeps its other values at the step of its own: the
        // 2.5 sets it, not the 45.
        assert!((a.block(1, 2, cols).0 - 2.5 / 127.0).abs() < 1e-7);
    }
}
