//! The 16-bit integer matrix-vector kernels of [`super::int16`] in 512-bit vectors, with
//! AVX512_VNNI's `vpdpwssd`: what decodes Q4_0, Q4_1 and Q8_0 on every CPU with AVX512_VNNI,
//! and Q4_K_M / Q5_K_M files on those without AVX512_BF16 (Cascade Lake and Ice Lake Xeons and
//! their cloud VMs; any of them with `--no-bf16`).
//!
//! Why: there decoding is bound by the kernels' instructions, not by memory (two cores decode
//! twice what one does), and the 256-bit kernel spends ~24 vector operations per row on every
//! 128 values (four `vpmaddwd`, two adds, two conversions, two broadcasts and two FMAs per 64)
//! plus 14 to unpack the weights. Here one 64-byte load holds two 32-byte groups of a Q4_K
//! block — sub-blocks 4q, 4q + 1 (low and high nibbles of the first 32 bytes) and 4q + 2,
//! 4q + 3 (of the next 32) — and the same three shifts and masks as in 256 bits leave
//! sub-block 4q's values in one half of a vector and 4q + 2's in the other, so each vector
//! operation does the work of two: 7 operations unpack 128 weights, and per activation row
//! `vpmaddwd` + `vpdpwssd` make each vector's exact 32-bit sums (10 operations per 128
//! values with the conversions, scales and FMAs). The activations are laid out to match
//! ([`Quads`]); their rounding is the 256-bit kernels' (the same 16-bit integers and block
//! scales), so the error bound is theirs.
//!
//! Q4_0, Q4_1 and Q8_0 go four blocks at a time ([`four_rows`]): as [`super::int16::pair_rows`]
//! lays two blocks' bytes side by side in 256 bits, this lays four in 512, so `vpmaddwd` and
//! three `vpdpwssd` leave each block's exact sums in its own four lanes (8 operations per row
//! and four blocks, where two pairs took 22), and one conversion, scale and FMA serve all four.
//!
//! A row's arithmetic does not depend on how many rows share the pass, so batched and solo
//! replies are the same bit for bit.

use std::arch::x86_64::*;

use super::int16::prefetch;
use super::{f16_to_f32, hsum, hsum512};
use bytemuck::{Pod, Zeroable};

use crate::engine::kernels::formats::{BlockQ6K, BlockQ8_0, NibbleBlock, Nibbles32, QK, QK_K};

/// Activation rows per pass: two accumulators and one for the minimums (or offsets) per row,
/// four weight vectors, two scale vectors and temporaries fit the 32 registers.
pub const ROWS: usize = 4;

/// Activation rows as these kernels read them: each run of four blocks of 32 (a "quad": half
/// a super-block) as four vectors of 32 16-bit lanes, each vector half one block's and half
/// another's, as the weights' nibbles land when two 32-byte groups are loaded side by side:
/// even-numbered values of blocks 0 | 2, odd-numbered of 0 | 2, even of 1 | 3, odd of 1 | 3.
/// Made from [`super::int16::Activations`] (whose blocks are 16 even values, then 16 odd
/// ones), so the 16-bit values and scales are the same.
#[derive(Default)]
pub struct Quads {
    xq: Aligned,
    /// Per quad: block 0's scale in eight lanes then block 2's, then block 1's and block 3's
    /// (the lanes where each vector's sums are).
    dx: Aligned,
}

/// 64 bytes on a 64-byte boundary.
#[repr(C, align(64))]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Line([u8; 64]);

/// Activations on 64-byte boundaries, so that no 512-bit load of them splits a cache line (in
/// a `Vec<i16>`, 16-byte aligned, every one did).
#[derive(Default)]
struct Aligned(Vec<Line>);

impl Aligned {
    /// The buffer as `n` zeros of `T`.
    fn zeroed<T: Pod>(&mut self, n: usize) -> &mut [T] {
        self.0.clear();
        self.0
            .resize((n * std::mem::size_of::<T>()).div_ceil(64), Line::zeroed());
        &mut bytemuck::cast_slice_mut(&mut self.0)[..n]
    }

    /// The buffer as `T`s (up to 64 bytes more than asked for).
    fn get<T: Pod>(&self) -> &[T] {
        bytemuck::cast_slice(&self.0)
    }
}

impl Quads {
    /// Lays `xq` (blocks of 32: 16 even values, 16 odd) and `dx` (a scale per block) out as
    /// quads; the rows' width a multiple of 128.
    pub fn lay_out(&mut self, xq: &[i16], dx: &[f32]) {
        debug_assert!(xq.len().is_multiple_of(4 * QK));
        let to = self.xq.zeroed::<i16>(xq.len());
        for (q, to) in xq.chunks_exact(4 * QK).zip(to.chunks_exact_mut(4 * QK)) {
            // 16-value runs: block b's even values are run 2b, its odd ones 2b + 1.
            for (i, run) in [0, 4, 1, 5, 2, 6, 3, 7].into_iter().enumerate() {
                to[16 * i..16 * i + 16].copy_from_slice(&q[16 * run..16 * run + 16]);
            }
        }
        let to = self.dx.zeroed::<f32>(xq.len() / 4);
        for (d, to) in dx.chunks_exact(4).zip(to.chunks_exact_mut(32)) {
            for (i, b) in [0, 2, 1, 3].into_iter().enumerate() {
                to[8 * i..8 * i + 8].fill(d[b]);
            }
        }
    }
}

/// Activation rows from one row on, as these kernels take them (see
/// [`super::int16::Activations::quads_from`]).
#[derive(Clone, Copy)]
pub struct QuadsFrom<'a> {
    pub(super) xq: &'a [i16],
    pub(super) dx: &'a [f32],
    /// Each block's sum of its rounded values (Q4_K's minimums).
    pub(super) xsum: &'a [f32],
    /// The same per 16 values (Q6_K's sub-blocks).
    pub(super) xsum16: &'a [f32],
}

impl<'a> QuadsFrom<'a> {
    pub(super) fn new(
        quads: &'a Quads,
        xsum: &'a [f32],
        xsum16: &'a [f32],
        i: usize,
        cols: usize,
    ) -> Self {
        QuadsFrom {
            xq: &quads.xq.get()[i * cols..],
            dx: &quads.dx.get()[i * cols / 4..],
            xsum,
            xsum16,
        }
    }
}

/// Activation rows as [`four_rows`] reads them: blocks of 32 in fours (a row whose block count
/// is not a multiple of four ends in zeros), each four's 128 values as four vectors of 16-bit
/// lanes, each vector eight values of each block, as a shift and a mask leave the four blocks'
/// nibbles when their 16 bytes are loaded side by side: values 0, 2, .., 14 of each block;
/// 1, 3, .., 15; 16, 18, .., 30; 17, 19, .., 31.
#[derive(Default)]
pub struct Fours {
    xq: Aligned,
    /// Per four: each block's scale `dx` in four lanes (where `vpmaddwd` leaves its sums).
    dx: Aligned,
    /// Per four: each block's sum of rounded values in the first of its four lanes, zeros in
    /// the others, for the minimums' term `m · Σx` of all four in one FMA.
    xsum: Aligned,
}

impl Fours {
    /// Lays `xq` (blocks of 32: 16 even values, 16 odd), `dx` and `xsum` (one per block) out
    /// as fours, row by row; `cols` is the rows' width.
    pub fn lay_out(&mut self, xq: &[i16], dx: &[f32], xsum: &[f32], cols: usize) {
        let nf = (cols / QK).div_ceil(4);
        let rows = xq.len() / cols;
        super::int16::group_blocks::<4>(
            (xq, dx, xsum),
            cols,
            (
                self.xq.zeroed(rows * nf * 4 * QK),
                self.dx.zeroed(rows * nf * 16),
                self.xsum.zeroed(rows * nf * 16),
            ),
        );
    }
}

/// Activation rows in fours of blocks from one row on (see
/// [`super::int16::Activations::fours_from`]).
#[derive(Clone, Copy)]
pub struct FoursFrom<'a> {
    xq: &'a [i16],
    dx: &'a [f32],
    xsum: &'a [f32],
}

impl<'a> FoursFrom<'a> {
    pub(super) fn new(fours: &'a Fours, i: usize, cols: usize) -> Self {
        let nf = (cols / QK).div_ceil(4);
        FoursFrom {
            xq: &fours.xq.get()[i * nf * 4 * QK..],
            dx: &fours.dx.get()[i * nf * 16..],
            xsum: &fours.xsum.get()[i * nf * 16..],
        }
    }
}

/// `lo` in the four 64-bit lanes of the low 256 bits, `hi` in those of the high ones: per-half
/// shift counts.
#[inline(always)]
unsafe fn halves(lo: i64, hi: i64) -> __m512i {
    _mm512_set_epi64(hi, hi, hi, hi, lo, lo, lo, lo)
}

/// Lanes `a` (four times), `b`, `c`, `d` (four times each): which of 16 scales each 32-bit sum
/// takes.
#[inline(always)]
unsafe fn pick(a: i32, b: i32, c: i32, d: i32) -> __m512i {
    _mm512_set_epi32(d, d, d, d, c, c, c, c, b, b, b, b, a, a, a, a)
}

/// The 128 values of quad `q` (0, 1) of a Q4_K or Q5_K block as 16-bit lanes, in
/// [`Quads`]' order: sub-blocks 4q | 4q + 2 even-numbered values, odd-numbered; then
/// 4q + 1 | 4q + 3 even, odd.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
unsafe fn q4k_quad<B: NibbleBlock>(blk: &B, q: usize) -> [__m512i; 4] {
    let nibble = _mm512_set1_epi16(0x000F);
    let raw = _mm512_loadu_si512(blk.qs().as_ptr().add(64 * q) as *const _);
    let lo = [
        _mm512_and_si512(raw, nibble),
        _mm512_and_si512(_mm512_srli_epi16::<8>(raw), nibble),
        _mm512_and_si512(_mm512_srli_epi16::<4>(raw), nibble),
        _mm512_srli_epi16::<12>(raw),
    ];
    if !B::FIFTH_BIT {
        return lo;
    }
    // Value l of sub-block j has its fifth bit at bit j of `qh[l]`: shifted right by 4q
    // (4q + 2 in the high half), bit 0 of each byte is the low nibble's sub-block's, bit 1 the
    // high nibble's; each then moved to bit 4 of its 16-bit lane.
    let qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(blk.qh().as_ptr() as *const __m256i));
    let q = q as i64;
    let sh = _mm512_srlv_epi64(qh, halves(4 * q, 4 * q + 2));
    let fifth = _mm512_set1_epi16(0x0010);
    // (hi & fifth) | lo.
    let with = |lo: __m512i, hi: __m512i| _mm512_ternarylogic_epi32::<0xEA>(hi, fifth, lo);
    [
        with(lo[0], _mm512_slli_epi16::<4>(sh)),
        with(lo[1], _mm512_srli_epi16::<4>(sh)),
        with(lo[2], _mm512_slli_epi16::<3>(sh)),
        with(lo[3], _mm512_srli_epi16::<5>(sh)),
    ]
}

/// Adds weight row `w` (one quad, as [`q4k_quad`] or [`q6k_quad`] leave it) times quad `at`
/// of the activations to `acc`: `sa`, `sb` are the weights' scales for each 32-bit lane of
/// the two sums.
#[inline(always)]
unsafe fn quad_product(
    w: &[__m512i; 4],
    sa: __m512,
    sb: __m512,
    x: QuadsFrom<'_>,
    at: usize,
    acc: &mut [__m512; 2],
) {
    let xv = x.xq.as_ptr().add(at) as *const __m512i;
    // Four products per 32-bit lane: within 24 bits for 6-bit weights (4 · 63 · 32767), so
    // each sum converts to f32 exactly.
    let sum_a = _mm512_dpwssd_epi32(
        _mm512_madd_epi16(w[0], _mm512_loadu_si512(xv as *const _)),
        w[1],
        _mm512_loadu_si512(xv.add(1) as *const _),
    );
    let sum_b = _mm512_dpwssd_epi32(
        _mm512_madd_epi16(w[2], _mm512_loadu_si512(xv.add(2) as *const _)),
        w[3],
        _mm512_loadu_si512(xv.add(3) as *const _),
    );
    let dx = x.dx.as_ptr().add(at / 4);
    let scale_a = _mm512_mul_ps(sa, _mm512_loadu_ps(dx));
    let scale_b = _mm512_mul_ps(sb, _mm512_loadu_ps(dx.add(16)));
    acc[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum_a), scale_a, acc[0]);
    acc[1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum_b), scale_b, acc[1]);
}

/// Q4_K or Q5_K weight rows × `t` (1..=[`ROWS`]) activation rows `x`: `out[k * ld + r]` =
/// weight row r · activation row k; `nb` super-blocks per row.
///
/// # Safety
/// AVX-512 (F, BW), AVX512_VNNI, AVX2, FMA and F16C must be present; the activations hold t
/// rows of `nb · 256` values; `out` has room for the cells written.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub unsafe fn q4k_rows<B: NibbleBlock>(
    blocks: &[B],
    nb: usize,
    x: QuadsFrom<'_>,
    t: usize,
    out: *mut f32,
    ld: usize,
) {
    by_rows!(t, [1, 2, 3], 4, q4k_rows_t<B>(blocks, nb, x, out, ld))
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn q4k_rows_t<const T: usize, B: NibbleBlock>(
    blocks: &[B],
    nb: usize,
    x: QuadsFrom<'_>,
    out: *mut f32,
    ld: usize,
) {
    let cols = nb * QK_K;
    let nblk = cols / QK;
    let n_rows = blocks.len() / nb;
    let lines = std::mem::size_of::<B>().div_ceil(64);
    // The eight sub-block scales to the lanes of each quad's two sums.
    let picks = [
        pick(0, 0, 2, 2),
        pick(1, 1, 3, 3),
        pick(4, 4, 6, 6),
        pick(5, 5, 7, 7),
    ];
    for r in 0..n_rows {
        let row = blocks.as_ptr().add(r * nb);
        let mut acc = [[_mm512_setzero_ps(); 2]; T];
        let mut mins = [_mm256_setzero_ps(); T];
        for b in 0..nb {
            let blk = &*row.add(b);
            prefetch(blk as *const B as *const u8, lines);
            let (ds, ms) = super::kquants::q4k_scales(blk);
            let ds = _mm512_castps256_ps512(_mm256_loadu_ps(ds.as_ptr()));
            let ms = _mm256_loadu_ps(ms.as_ptr());
            // The minimums' term −Σ dmin·m · Σx.
            for (k, m) in mins.iter_mut().enumerate() {
                let s = _mm256_loadu_ps(x.xsum.as_ptr().add(k * nblk + b * 8));
                *m = _mm256_fnmadd_ps(ms, s, *m);
            }
            for q in 0..2 {
                let w = q4k_quad(blk, q);
                let sa = _mm512_permutexvar_ps(picks[2 * q], ds);
                let sb = _mm512_permutexvar_ps(picks[2 * q + 1], ds);
                for (k, a) in acc.iter_mut().enumerate() {
                    quad_product(&w, sa, sb, x, k * cols + b * QK_K + q * 128, a);
                }
            }
        }
        for (k, (a, m)) in acc.iter().zip(&mins).enumerate() {
            *out.add(k * ld + r) = hsum512(_mm512_add_ps(a[0], a[1])) + hsum(*m);
        }
    }
}

/// The 128 values of half `h` of a Q6_K block (0..64: the offset of 32 is taken apart) as
/// 16-bit lanes in [`Quads`]' order: its 32-value groups 0 | 2 even-numbered values,
/// odd-numbered; then 1 | 3 even, odd (see `BlockQ6K::quad`).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
unsafe fn q6k_quad(blk: &BlockQ6K, h: usize) -> [__m512i; 4] {
    let bcast = |p: *const u8| _mm512_broadcast_i64x4(_mm256_loadu_si256(p as *const __m256i));
    let ql = blk.ql.as_ptr().add(64 * h);
    // Groups 0 and 2 take the low and high nibbles of the first 32 bytes, 1 and 3 those of
    // the next 32: each 32 bytes in both halves, shifted by 4 more in the high half.
    let (qla, qlb) = (bcast(ql), bcast(ql.add(32)));
    let qh = bcast(blk.qh.as_ptr().add(32 * h));
    let qh4 = _mm512_slli_epi64::<4>(qh);
    let nibble = _mm512_set1_epi16(0x000F);
    let two = _mm512_set1_epi16(0x0030);
    let low = |v: __m512i, lo: i64, hi: i64| {
        _mm512_and_si512(_mm512_srlv_epi64(v, halves(lo, hi)), nibble)
    };
    // Group k's two high bits are bits 2k, 2k + 1 of each byte of `qh`: moved to bits 4, 5
    // of the 16-bit lane (from bits 2k + 8.. for the odd-numbered value), (hi & 0x30) | lo.
    let high = |v: __m512i, lo: i64, hi: i64| _mm512_srlv_epi64(v, halves(lo, hi));
    let with = |lo: __m512i, hi: __m512i| _mm512_ternarylogic_epi32::<0xEA>(hi, two, lo);
    [
        with(low(qla, 0, 4), high(qh4, 0, 4)),
        with(low(qla, 8, 12), high(qh, 4, 8)),
        with(low(qlb, 0, 4), high(qh4, 2, 6)),
        with(low(qlb, 8, 12), high(qh, 6, 10)),
    ]
}

/// Q6_K weight rows × `t` (1..=[`ROWS`]) activation rows `x`.
///
/// # Safety
/// As [`q4k_rows`].
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub unsafe fn q6k_rows(
    blocks: &[BlockQ6K],
    nb: usize,
    x: QuadsFrom<'_>,
    t: usize,
    out: *mut f32,
    ld: usize,
) {
    by_rows!(t, [1, 2, 3], 4, q6k_rows_t(blocks, nb, x, out, ld))
}

/// As the 256-bit kernel: `Σ (q − 32)·x = Σ q·x − 32·Σ x`, the second sum per 16-value
/// sub-block one FMA per super-block and row (`xsum16` × the scales).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn q6k_rows_t<const T: usize>(
    blocks: &[BlockQ6K],
    nb: usize,
    x: QuadsFrom<'_>,
    out: *mut f32,
    ld: usize,
) {
    let cols = nb * QK_K;
    let n_rows = blocks.len() / nb;
    let lines = std::mem::size_of::<BlockQ6K>().div_ceil(64);
    // Each 32-bit sum covers four consecutive values, so a group's first 16 values (its
    // sub-block 2k of the half) fill four lanes and its next 16 (2k + 1) the next four.
    let picks = [
        pick(0, 1, 4, 5),
        pick(2, 3, 6, 7),
        pick(8, 9, 12, 13),
        pick(10, 11, 14, 15),
    ];
    for r in 0..n_rows {
        let row = blocks.as_ptr().add(r * nb);
        let mut acc = [[_mm512_setzero_ps(); 2]; T];
        let mut offsets = [_mm512_setzero_ps(); T];
        for b in 0..nb {
            let blk = &*row.add(b);
            prefetch(blk as *const BlockQ6K as *const u8, lines);
            // d · the sixteen 8-bit sub-block scales.
            let sc = _mm_loadu_si128(blk.scales.as_ptr() as *const __m128i);
            let scales = _mm512_mul_ps(
                _mm512_set1_ps(f16_to_f32(blk.d)),
                _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(sc)),
            );
            for (k, o) in offsets.iter_mut().enumerate() {
                let s = _mm512_loadu_ps(x.xsum16.as_ptr().add(k * cols / 16 + b * 16));
                *o = _mm512_fmadd_ps(scales, s, *o);
            }
            for h in 0..2 {
                let w = q6k_quad(blk, h);
                let sa = _mm512_permutexvar_ps(picks[2 * h], scales);
                let sb = _mm512_permutexvar_ps(picks[2 * h + 1], scales);
                for (k, a) in acc.iter_mut().enumerate() {
                    quad_product(&w, sa, sb, x, k * cols + b * QK_K + h * 128, a);
                }
            }
        }
        for (k, (a, o)) in acc.iter().zip(&offsets).enumerate() {
            *out.add(k * ld + r) = hsum512(_mm512_add_ps(a[0], a[1])) - 32.0 * hsum512(*o);
        }
    }
}

/// Per activation row: two accumulators, so that a row's FMAs form two independent chains.
type Acc<const T: usize> = [[__m512; 2]; T];

/// The blocks [`four_rows`] reads, four at a time.
pub trait FourBlock: Pod {
    /// Blocks `b` (four `f` of `nf` per activation row) times `T` activation rows, added to
    /// each row's accumulators.
    ///
    /// # Safety
    /// AVX-512 (F, BW), AVX512_VNNI, AVX2, FMA and F16C must be present (the caller is
    /// compiled with them); `x` holds `T` rows of `nf` fours.
    unsafe fn four<const T: usize>(
        b: [&Self; 4],
        f: usize,
        nf: usize,
        x: FoursFrom<'_>,
        acc: &mut Acc<T>,
    );
}

/// The 16 bytes at each of `p` in the four 128-bit lanes, in order.
#[inline(always)]
unsafe fn lanes4(p: [*const __m128i; 4]) -> __m512i {
    let v = _mm512_castsi128_si512(_mm_loadu_si128(p[0]));
    let v = _mm512_inserti32x4::<1>(v, _mm_loadu_si128(p[1]));
    let v = _mm512_inserti32x4::<2>(v, _mm_loadu_si128(p[2]));
    _mm512_inserti32x4::<3>(v, _mm_loadu_si128(p[3]))
}

/// The four blocks' first four bytes as f16 pairs, in f32: (d0, ·, d1, ·, d2, ·, d3, ·), where
/// Q4_1's `m` fills the second lane of each (the first two bytes of `qs` do in the other
/// formats).
#[inline(always)]
unsafe fn heads4<B: Pod>(b: [&B; 4]) -> __m512 {
    let head = |b: &B| (b as *const B as *const i32).read_unaligned();
    _mm512_castps256_ps512(_mm256_cvtph_ps(_mm_setr_epi32(
        head(b[0]),
        head(b[1]),
        head(b[2]),
        head(b[3]),
    )))
}

/// Q4_0 and Q4_1: as [`super::int16::PairBlock`]'s, the values stay `q` in 0..16 (eight
/// products a lane, within 24 bits, so the four blocks' sums add up exactly), and `m · Σx`
/// comes from the block sums of the same rounded activations.
impl<B: Nibbles32> FourBlock for B {
    #[inline(always)]
    unsafe fn four<const T: usize>(
        b: [&Self; 4],
        f: usize,
        nf: usize,
        x: FoursFrom<'_>,
        acc: &mut Acc<T>,
    ) {
        let v = lanes4(b.map(|b| b.qs().as_ptr() as *const __m128i));
        // Word w of a block's 16 bytes holds value 2w (bits 0..4), 2w + 1 (8..12), 2w + 16
        // (4..8) and 2w + 17 (12..16): the four vectors of [`Fours`].
        let nibble = _mm512_set1_epi16(0x000F);
        let w = [
            _mm512_and_si512(v, nibble),
            _mm512_and_si512(_mm512_srli_epi16::<8>(v), nibble),
            _mm512_and_si512(_mm512_srli_epi16::<4>(v), nibble),
            _mm512_srli_epi16::<12>(v),
        ];
        let dm = heads4(b);
        let d = _mm512_permutexvar_ps(pick(0, 2, 4, 6), dm);
        let m = match b[0].m() {
            Some(_) => _mm512_permutexvar_ps(pick(1, 3, 5, 7), dm),
            None => _mm512_mul_ps(d, _mm512_set1_ps(-8.0)),
        };
        for (k, a) in acc.iter_mut().enumerate() {
            let at = k * nf + f;
            let xv = x.xq.as_ptr().add(at * 4 * QK) as *const __m512i;
            let ld = |i: usize| _mm512_loadu_si512(xv.add(i) as *const _);
            let s = _mm512_madd_epi16(w[0], ld(0));
            let s = _mm512_dpwssd_epi32(s, w[1], ld(1));
            let s = _mm512_dpwssd_epi32(s, w[2], ld(2));
            let s = _mm512_dpwssd_epi32(s, w[3], ld(3));
            let scale = _mm512_mul_ps(d, _mm512_loadu_ps(x.dx.as_ptr().add(at * 16)));
            a[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, a[0]);
            a[1] = _mm512_fmadd_ps(m, _mm512_loadu_ps(x.xsum.as_ptr().add(at * 16)), a[1]);
        }
    }
}

/// Q8_0: as [`super::int16::PairBlock`]'s, each 16-bit word's two values sign-extended by
/// shifts, and each half of the products converted on its own (four products of 8-bit weights
/// a lane stay within 24 bits, eight could not).
impl FourBlock for BlockQ8_0 {
    #[inline(always)]
    unsafe fn four<const T: usize>(
        b: [&Self; 4],
        f: usize,
        nf: usize,
        x: FoursFrom<'_>,
        acc: &mut Acc<T>,
    ) {
        let q = b.map(|b| b.qs.as_ptr() as *const __m128i);
        let lo = lanes4(q);
        let hi = lanes4(q.map(|p| p.add(1)));
        let w = [
            _mm512_srai_epi16::<8>(_mm512_slli_epi16::<8>(lo)),
            _mm512_srai_epi16::<8>(lo),
            _mm512_srai_epi16::<8>(_mm512_slli_epi16::<8>(hi)),
            _mm512_srai_epi16::<8>(hi),
        ];
        let d = _mm512_permutexvar_ps(pick(0, 2, 4, 6), heads4(b));
        for (k, a) in acc.iter_mut().enumerate() {
            let at = k * nf + f;
            let xv = x.xq.as_ptr().add(at * 4 * QK) as *const __m512i;
            let ld = |i: usize| _mm512_loadu_si512(xv.add(i) as *const _);
            let s0 = _mm512_dpwssd_epi32(_mm512_madd_epi16(w[0], ld(0)), w[1], ld(1));
            let s1 = _mm512_dpwssd_epi32(_mm512_madd_epi16(w[2], ld(2)), w[3], ld(3));
            let scale = _mm512_mul_ps(d, _mm512_loadu_ps(x.dx.as_ptr().add(at * 16)));
            a[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s0), scale, a[0]);
            a[1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s1), scale, a[1]);
        }
    }
}

/// Q4_0, Q4_1 or Q8_0 weight rows × `t` (1..=[`ROWS`]) activation rows `x` (from
/// [`super::int16::Activations::fours_from`]): `out[k * ld + r]` = weight row r · activation
/// row k; `nb` blocks of 32 per row.
///
/// # Safety
/// As [`q4k_rows`]; the activations hold t rows of `nb · 32` values in fours.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
pub unsafe fn four_rows<B: FourBlock>(
    blocks: &[B],
    nb: usize,
    x: FoursFrom<'_>,
    t: usize,
    out: *mut f32,
    ld: usize,
) {
    by_rows!(t, [1, 2, 3], 4, four_rows_t<B>(blocks, nb, x, out, ld))
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
unsafe fn four_rows_t<const T: usize, B: FourBlock>(
    blocks: &[B],
    nb: usize,
    x: FoursFrom<'_>,
    out: *mut f32,
    ld: usize,
) {
    let nf = nb.div_ceil(4);
    let n_rows = blocks.len() / nb;
    let lines = (4 * std::mem::size_of::<B>()).div_ceil(64);
    for r in 0..n_rows {
        let row = &blocks[r * nb..(r + 1) * nb];
        let mut acc = [[_mm512_setzero_ps(); 2]; T];
        let mut fours = row.chunks_exact(4);
        for (f, four) in fours.by_ref().enumerate() {
            prefetch(four.as_ptr() as *const u8, lines);
            B::four([&four[0], &four[1], &four[2], &four[3]], f, nf, x, &mut acc);
        }
        // The row's last one to three blocks: the last one's bytes stand in for the missing
        // ones, whose activations (and scales, and sums) are zeros.
        let rest = fours.remainder();
        if let Some(last) = rest.last() {
            let at = |k: usize| rest.get(k).unwrap_or(last);
            B::four([at(0), at(1), at(2), at(3)], nf - 1, nf, x, &mut acc);
        }
        for (k, a) in acc.iter().enumerate() {
            *out.add(k * ld + r) = hsum512(_mm512_add_ps(a[0], a[1]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`Quads`]: the 16-bit values of blocks 0 | 2 even, odd, then 1 | 3 even, odd; each
    /// vector's scales those of the blocks whose values it holds, eight lanes each.
    #[test]
    fn quads_pair_blocks_0_2_and_1_3() {
        // Two quads of blocks in `Activations`' layout, each value its own index.
        let xq: Vec<i16> = (0..8 * QK).map(|i| i as i16).collect();
        let dx: Vec<f32> = (0..8).map(|b| b as f32 + 0.5).collect();
        let mut q = Quads::default();
        q.lay_out(&xq, &dx);
        let (qxq, qdx) = (q.xq.get::<i16>(), q.dx.get::<f32>());
        assert!(qxq.len() >= xq.len());
        for quad in 0..2 {
            let block = |b: usize| 4 * quad + b;
            // (block, even (0) or odd (1)) of each 16-value run, in order.
            let order = [
                (0, 0),
                (2, 0),
                (0, 1),
                (2, 1),
                (1, 0),
                (3, 0),
                (1, 1),
                (3, 1),
            ];
            for (run, &(b, odd)) in order.iter().enumerate() {
                let got = &qxq[quad * 128 + 16 * run..][..16];
                let from = block(b) * QK + 16 * odd;
                assert_eq!(got, &xq[from..from + 16], "quad {quad} run {run}");
            }
            let d = &qdx[quad * 32..][..32];
            for (v, b) in [0, 2, 1, 3].into_iter().enumerate() {
                assert_eq!(
                    d[8 * v..8 * v + 8],
                    [dx[block(b)]; 8],
                    "quad {quad} vector {v}"
                );
            }
        }
    }

    /// [`Fours`]: value j of block b lands where the nibbles of j leave it when four blocks'
    /// bytes are read side by side (vector `j % 2 + 2 · (j / 16)`, the block's quarter of it,
    /// lane `(j % 16) / 2`), with each block's scale in its four lanes and its sum in the
    /// first; a row's last blocks padded with zeros to a four.
    #[test]
    fn fours_put_each_value_where_its_nibble_lands() {
        let (rows, cols) = (2, 6 * QK);
        let (nb, nf) = (6, 2);
        let xq: Vec<i16> = (0..rows * cols).map(|i| i as i16 + 1).collect();
        let dx: Vec<f32> = (0..rows * nb).map(|b| b as f32 + 0.5).collect();
        let xsum: Vec<f32> = (0..rows * nb).map(|b| -(b as f32)).collect();
        let mut f = Fours::default();
        f.lay_out(&xq, &dx, &xsum, cols);
        let (fxq, fdx, fsum) = (f.xq.get::<i16>(), f.dx.get::<f32>(), f.xsum.get::<f32>());
        assert!(fxq.len() >= rows * nf * 128);
        for r in 0..rows {
            for b in 0..nf * 4 {
                let (at, slot) = (r * nf + b / 4, b % 4);
                for j in 0..QK {
                    let got = fxq[at * 128 + 32 * (j % 2 + 2 * (j / 16)) + 8 * slot + (j % 16) / 2];
                    let want = if b < nb {
                        xq[(r * nb + b) * QK + (j % 2) * 16 + j / 2]
                    } else {
                        0
                    };
                    assert_eq!(got, want, "row {r} block {b} value {j}");
                }
                let (d, sum) = if b < nb {
                    (dx[r * nb + b], xsum[r * nb + b])
                } else {
                    (0.0, 0.0)
                };
                assert_eq!(fdx[at * 16 + 4 * slot..][..4], [d; 4]);
                assert_eq!(fsum[at * 16 + 4 * slot..][..4], [sum, 0.0, 0.0, 0.0]);
            }
        }
    }
}
