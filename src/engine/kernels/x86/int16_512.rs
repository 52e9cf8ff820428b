//! The 16-bit integer K-quant matrix-vector kernels of [`super::int16`] in 512-bit vectors,
//! with AVX512_VNNI's `vpdpwssd`: what decodes Q4_K_M / Q5_K_M files on AVX-512 CPUs without
//! AVX512_BF16 (Skylake-SP to Ice Lake and their cloud VMs), and on any AVX-512 CPU with
//! `--no-bf16`.
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
//! A row's arithmetic does not depend on how many rows share the pass, so batched and solo
//! replies are the same bit for bit.

use std::arch::x86_64::*;

use super::int16::prefetch;
use super::{f16_to_f32, hsum, hsum512};
use crate::engine::kernels::formats::{BlockQ6K, NibbleBlock, QK, QK_K};

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
    xq: Vec<i16>,
    /// Per quad: block 0's scale in eight lanes then block 2's, then block 1's and block 3's
    /// (the lanes where each vector's sums are).
    dx: Vec<f32>,
}

impl Quads {
    /// Lays `xq` (blocks of 32: 16 even values, 16 odd) and `dx` (a scale per block) out as
    /// quads; the rows' width a multiple of 128.
    pub fn lay_out(&mut self, xq: &[i16], dx: &[f32]) {
        debug_assert!(xq.len().is_multiple_of(4 * QK));
        self.xq.clear();
        self.xq.reserve(xq.len());
        self.dx.clear();
        self.dx.reserve(xq.len() / 4);
        for (q, d) in xq.chunks_exact(4 * QK).zip(dx.chunks_exact(4)) {
            // 16-value runs: block b's even values are run 2b, its odd ones 2b + 1.
            for run in [0, 4, 1, 5, 2, 6, 3, 7] {
                self.xq.extend_from_slice(&q[16 * run..16 * run + 16]);
            }
            for b in [0, 2, 1, 3] {
                self.dx.extend_from_slice(&[d[b]; 8]);
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
            xq: &quads.xq[i * cols..],
            dx: &quads.dx[i * cols / 4..],
            xsum,
            xsum16,
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
        assert_eq!(q.xq.len(), xq.len());
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
                let got = &q.xq[quad * 128 + 16 * run..][..16];
                let from = block(b) * QK + 16 * odd;
                assert_eq!(got, &xq[from..from + 16], "quad {quad} run {run}");
            }
            let d = &q.dx[quad * 32..][..32];
            for (v, b) in [0, 2, 1, 3].into_iter().enumerate() {
                assert_eq!(
                    d[8 * v..8 * v + 8],
                    [dx[block(b)]; 8],
                    "quad {quad} vector {v}"
                );
            }
        }
    }
}
