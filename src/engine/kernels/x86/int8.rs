//! Prompt kernels with 8-bit activations (AVX512_VNNI `vpdpbusd`, or AVX2 `vpmaddubsw`) for
//! Q4_K, Q5_K and Q4_0, with a second 8-bit level wherever a block holds an outlier.
//!
//! Why: a prompt chunk is compute-bound, and `vpdpbusd` does 64 multiply-adds an
//! instruction where `vdpbf16ps` does 32 (on Intel without AMX bf16 is no faster than f32
//! FMA). Measured on an AMD VM, Q5_K_M prompts went from 0.75× to 0.87× llama.cpp's speed:
//! not 2×, since each block of 32 still costs four vector operations of scaling beside its
//! eight products. The weights' values are small unsigned integers (0..15, 0..31), so they
//! are the unsigned operand exactly as stored. CPUs without AVX-512 run the same arithmetic
//! in AVX2 ([`gemm_avx2`]), with the same results.
//!
//! Why a second level: plain 8-bit blocks are what breaks SmolLM2 in llama.cpp — one massive
//! activation in a block of 32 sets the step, and the other 31 values round to a few steps
//! of it. Here each block of 32 gets one scale (`max|x|/127`, so a normal block keeps ~1/254
//! of its largest value, finer than llama.cpp's `q8_K` with one scale per 256); a block whose
//! largest value exceeds [`OUTLIER`] times its mean magnitude also gets its rounding error
//! quantized the same way, which leaves every value of that block within `max|x|/64516` —
//! the outlier and its neighbours alike. Massive activations sit in a few fixed channels, so
//! few blocks pay for the second level (one more pass over that block's weights).
//!
//! Each row's arithmetic depends only on that row (the second levels are summed after its
//! main pass, in block order), so a row's results do not depend on what shares its chunk.

use std::arch::x86_64::*;

use super::f16_to_f32;
use crate::engine::kernels::formats::{BlockQ4_0, NibbleBlock, QK, QK_K};

/// Weight rows per panel (the 16 lanes of a vector), as for the bf16 kernels.
pub const PANEL: usize = 16;
/// Activation rows per call of the kernel: 8 integer sums + 8 accumulators + weights and
/// scales fit the 32 registers.
pub const MR: usize = 8;
/// A block whose largest magnitude exceeds this many times its mean magnitude gets a second
/// level. A block of normal (bell-shaped) values stays well below it (its largest of 32 is
/// ~2.5–4× the mean); one value ≥ ~5× the others' scale reaches it.
pub const OUTLIER: f32 = 6.0;

/// Whether a block of 32 with largest magnitude `max` and magnitudes summing to `sum_abs`
/// gets a second level (see [`OUTLIER`]).
#[inline]
pub fn second_level(max: f32, sum_abs: f32) -> bool {
    max * QK as f32 > OUTLIER * sum_abs
}

/// The second level of one block of one activation row: its rounding error as 8-bit
/// integers with their own scale.
#[derive(Clone, Copy)]
pub struct Extra {
    /// The block's index within its row.
    pub block: u32,
    pub scale: f32,
    pub q: [i8; QK],
}

/// A product's activation rows as 8-bit integers, made once per product by the first band of
/// a thread that needs them.
#[derive(Default)]
pub struct Activations {
    /// Row-major, as the f32 rows.
    pub q: Vec<i8>,
    /// Each block's scale: its values are `scale · q`.
    pub scale: Vec<f32>,
    /// Each block's sum of its rounded values (both levels), for the minimums' term.
    pub sum: Vec<f32>,
    /// Second levels, row by row, in block order.
    pub extra: Vec<Extra>,
    /// Row i's second levels are `extra[first_extra[i]..first_extra[i + 1]]`.
    pub first_extra: Vec<usize>,
    ready: bool,
}

impl Activations {
    /// Makes them from `x` (rows of `cols` f32) unless done already for this product.
    ///
    /// # Safety
    /// AVX-512 (F, BW) must be present; `cols` a multiple of 32.
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
    pub unsafe fn prepare(&mut self, x: &[f32], cols: usize) -> &Activations {
        self.prepare_with(x, cols)
    }

    /// [`Self::prepare`] where AVX-512 is missing (the AVX2 kernel).
    ///
    /// # Safety
    /// AVX2 must be present; `cols` a multiple of 32.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn prepare_avx2(&mut self, x: &[f32], cols: usize) -> &Activations {
        self.prepare_with(x, cols)
    }

    /// The one definition of the rounding, compiled into each caller's instruction set.
    #[inline(always)]
    fn prepare_with(&mut self, x: &[f32], cols: usize) -> &Activations {
        if self.ready {
            return self;
        }
        let nb = cols / QK;
        let n = x.len() / cols;
        self.q.resize(x.len(), 0);
        self.scale.resize(n * nb, 0.0);
        self.sum.resize(n * nb, 0.0);
        self.extra.clear();
        self.first_extra.clear();
        self.first_extra.push(0);
        for i in 0..n {
            for b in 0..nb {
                let at = i * cols + b * QK;
                let block: &[f32; QK] = x[at..at + QK].try_into().expect("a block");
                let mut q = [0i8; QK];
                let (first, residual) = level(block, &mut q);
                self.q[at..at + QK].copy_from_slice(&q);
                self.scale[i * nb + b] = first.scale;
                let mut sum = first.scale * first.qsum as f32;
                if second_level(first.max, first.sum_abs) {
                    let mut extra = Extra {
                        block: b as u32,
                        scale: 0.0,
                        q: [0; QK],
                    };
                    let (second, _) = level(&residual, &mut extra.q);
                    extra.scale = second.scale;
                    sum += second.scale * second.qsum as f32;
                    self.extra.push(extra);
                }
                self.sum[i * nb + b] = sum;
            }
            self.first_extra.push(self.extra.len());
        }
        self.ready = true;
        self
    }
}

/// A block's largest magnitude and the sum of its magnitudes, in eight lanes as a vector
/// holds them (so both reductions vectorize): what [`second_level`] is asked with (the
/// tests' error bounds use it too, so they decide alike at the threshold).
#[inline(always)]
pub fn magnitudes(v: &[f32; QK]) -> (f32, f32) {
    let (mut most, mut sums) = ([0f32; 8], [0f32; 8]);
    for chunk in v.chunks_exact(8) {
        for ((m, s), x) in most.iter_mut().zip(sums.iter_mut()).zip(chunk) {
            *m = m.max(x.abs());
            *s += x.abs();
        }
    }
    (most.iter().fold(0f32, |m, x| m.max(*x)), sums.iter().sum())
}

/// One level of a block: its scale, the sum of its integers, and the block's largest and
/// summed magnitudes.
struct Level {
    scale: f32,
    qsum: i32,
    max: f32,
    sum_abs: f32,
}

/// Rounds 32 values to `scale · q` with |q| ≤ 127, `scale = max|x|/127`, into `q`; returns
/// the level and what it leaves (`x − scale·q`).
#[inline(always)]
fn level(v: &[f32; QK], q: &mut [i8; QK]) -> (Level, [f32; QK]) {
    let (max, sum_abs) = magnitudes(v);
    if max == 0.0 {
        *q = [0; QK];
        let level = Level {
            scale: 0.0,
            qsum: 0,
            max,
            sum_abs,
        };
        return (level, *v);
    }
    let scale = max / 127.0;
    let inv = 127.0 / max;
    let mut residual = [0f32; QK];
    let mut qsum = 0i32;
    for ((x, q), r) in v.iter().zip(q.iter_mut()).zip(residual.iter_mut()) {
        // Round to nearest, ties to even (as `vcvtps2dq`); the largest lands on 127.
        let n = (x * inv).round_ties_even().clamp(-127.0, 127.0);
        *q = n as i8;
        qsum += n as i32;
        *r = x - scale * n;
    }
    let level = Level {
        scale,
        qsum,
        max,
        sum_abs,
    };
    (level, residual)
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

/// A panel of [`PANEL`] Q4_0 weight rows for [`gemm`], as [`q4k_panel`] makes them: the
/// nibbles q as bytes, each block's `d` as the scale and `8·d` as the minimum.
///
/// # Safety
/// As [`q4k_panel`], with `nb` blocks of 32 per row.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn q4_0_panel(
    rows: &[BlockQ4_0],
    nb: usize,
    width: usize,
    bytes: &mut Vec<u16>,
    ds: &mut Vec<f32>,
    ms: &mut Vec<f32>,
) {
    let cols = nb * QK;
    let out = zeroed(bytes, ds, ms, cols);
    let mask = _mm_set1_epi8(0x0F);
    for j in 0..width {
        for b in 0..nb {
            let blk = &rows[j * nb + b];
            let d = f16_to_f32(blk.d);
            ds[b * PANEL + j] = d;
            ms[b * PANEL + j] = 8.0 * d;
            let raw = _mm_loadu_si128(blk.qs.as_ptr() as *const __m128i);
            let p = out.add(j * cols + b * QK);
            _mm_storeu_si128(p as *mut __m128i, _mm_and_si128(raw, mask));
            _mm_storeu_si128(
                p.add(16) as *mut __m128i,
                _mm_and_si128(_mm_srli_epi16::<4>(raw), mask),
            );
        }
    }
}

/// `out[k][j] = Σ_c x[k][c] · w[j][c]` for activation rows `i0..i0 + m` (m in 1..=[`MR`]) of
/// `a` and the 16 rows of a panel: `q` their bytes interleaved (`q[(c/4)·64 + 4j + c%4]` =
/// row j, column c), `ds`/`ms` each 32-column block's scale and minimum per row. Row k of
/// the result goes to `out + k · ld` (16 values).
///
/// # Safety
/// AVX512_VNNI (and F, BW) must be present; `a` prepared with rows of `cols`, holding rows
/// `i0..i0 + m`; `q` holds 16 × `cols` bytes; `out` has room for m rows of 16 at stride `ld`.
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
    debug_assert!(a.q.len() >= (i0 + m) * cols);
    let qp = q.as_ptr() as *const u8;
    by_rows!(
        m,
        [1, 2, 3, 4, 5, 6, 7],
        8,
        gemm_m(qp, ds, ms, a, i0, cols, out, ld)
    );
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
    let xp = a.q.as_ptr().add(i0 * cols);
    let (scale, sum) = (a.scale.as_ptr().add(i0 * nb), a.sum.as_ptr().add(i0 * nb));
    // Four bytes of row k from column c, broadcast to every lane.
    let x4 = |k: usize, c: usize| {
        _mm512_set1_epi32((xp.add(k * cols + c) as *const i32).read_unaligned())
    };
    for b in 0..nb {
        let mut t = [_mm512_setzero_si512(); M];
        for p in 0..QK / 4 {
            let w = _mm512_loadu_si512(qp.add((b * QK / 4 + p) * 64) as *const __m512i);
            for (k, tk) in t.iter_mut().enumerate() {
                *tk = _mm512_dpbusd_epi32(*tk, w, x4(k, b * QK + 4 * p));
            }
        }
        let d = _mm512_loadu_ps(ds.as_ptr().add(b * PANEL));
        let mn = _mm512_loadu_ps(ms.as_ptr().add(b * PANEL));
        for (k, a) in acc.iter_mut().enumerate() {
            let dk = _mm512_mul_ps(d, _mm512_set1_ps(*scale.add(k * nb + b)));
            *a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t[k]), dk, *a);
            *a = _mm512_fnmadd_ps(mn, _mm512_set1_ps(*sum.add(k * nb + b)), *a);
        }
    }
    // The second levels, after the row's main pass (so the order of its sums is the same
    // whatever shares the call).
    for (k, acc) in acc.iter_mut().enumerate() {
        let row = i0 + k;
        for e in &a.extra[a.first_extra[row]..a.first_extra[row + 1]] {
            let b = e.block as usize;
            let mut t = _mm512_setzero_si512();
            for p in 0..QK / 4 {
                let w = _mm512_loadu_si512(qp.add((b * QK / 4 + p) * 64) as *const __m512i);
                let x = _mm512_set1_epi32((e.q.as_ptr().add(4 * p) as *const i32).read_unaligned());
                t = _mm512_dpbusd_epi32(t, w, x);
            }
            let d = _mm512_loadu_ps(ds.as_ptr().add(b * PANEL));
            let dk = _mm512_mul_ps(d, _mm512_set1_ps(e.scale));
            *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), dk, *acc);
        }
    }
    for (k, a) in acc.iter().enumerate() {
        _mm512_storeu_ps(out.add(k * ld), *a);
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
/// AVX2 and FMA must be present; otherwise as [`gemm`].
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
    debug_assert!(a.q.len() >= (i0 + m) * cols);
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
    let xp = a.q.as_ptr().add(i0 * cols);
    let (scale, sum) = (a.scale.as_ptr().add(i0 * nb), a.sum.as_ptr().add(i0 * nb));
    let x4 = |k: usize, c: usize| {
        _mm256_set1_epi32((xp.add(k * cols + c) as *const i32).read_unaligned())
    };
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
        let x = |k: usize, p: usize| x4(k, b * QK + 4 * p);
        dot_avx2(qp, b, 0..4, x, &mut t);
        dot_avx2(qp, b, 4..8, x, &mut t);
        for (k, acc) in acc.iter_mut().enumerate() {
            scaled(acc, &t[k], b, *scale.add(k * nb + b));
            for (h, a) in acc.iter_mut().enumerate() {
                let mn = _mm256_loadu_ps(ms.as_ptr().add(b * PANEL + 8 * h));
                *a = _mm256_fnmadd_ps(mn, _mm256_set1_ps(*sum.add(k * nb + b)), *a);
            }
        }
    }
    for (k, acc) in acc.iter_mut().enumerate() {
        let row = i0 + k;
        for e in &a.extra[a.first_extra[row]..a.first_extra[row + 1]] {
            let b = e.block as usize;
            let x = |_: usize, p: usize| {
                _mm256_set1_epi32((e.q.as_ptr().add(4 * p) as *const i32).read_unaligned())
            };
            let mut t = [[_mm256_setzero_si256(); 2]; 1];
            dot_avx2(qp, b, 0..4, x, &mut t);
            dot_avx2(qp, b, 4..8, x, &mut t);
            scaled(acc, &t[0], b, e.scale);
        }
    }
    for (k, a) in acc.iter().enumerate() {
        _mm256_storeu_ps(out.add(k * ld), a[0]);
        _mm256_storeu_ps(out.add(k * ld + 8), a[1]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vnni() -> bool {
        super::super::avx512()
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vnni")
    }

    /// Every value within half a step of its level: `max|x|/254` in a plain block, and in a
    /// block with an outlier within `max|x|/64516` (the second level); the sums are of the
    /// rounded values; only the outlier blocks have a second level.
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
        x[cols + 70] = -45.0; // row 1, block 2
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
        assert_eq!(a.q, b.q);
        assert_eq!((&a.scale, &a.sum), (&b.scale, &b.sum));
        assert_eq!(a.first_extra, b.first_extra);
        for (e, f) in a.extra.iter().zip(&b.extra) {
            assert_eq!((e.block, e.scale, e.q), (f.block, f.scale, f.q));
        }
        let blocks: Vec<(usize, u32)> = (0..3)
            .flat_map(|i| {
                a.extra[a.first_extra[i]..a.first_extra[i + 1]]
                    .iter()
                    .map(move |e| (i, e.block))
            })
            .collect();
        assert_eq!(blocks, vec![(0, 0), (1, 2)]);
        let nb = cols / QK;
        for i in 0..3 {
            for b in 0..nb {
                let block = &x[i * cols + b * QK..][..QK];
                let max = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                let extra = a.extra[a.first_extra[i]..a.first_extra[i + 1]]
                    .iter()
                    .find(|e| e.block as usize == b);
                let mut sum = 0f64;
                for (c, &v) in block.iter().enumerate() {
                    let mut got = a.scale[i * nb + b] as f64 * a.q[i * cols + b * QK + c] as f64;
                    if let Some(e) = extra {
                        got += e.scale as f64 * e.q[c] as f64;
                    }
                    sum += got;
                    let bound = if extra.is_some() {
                        max as f64 / 64516.0
                    } else {
                        max as f64 / 254.0
                    };
                    assert!(
                        (got - v as f64).abs() <= bound * 1.001 + 1e-12,
                        "row {i} block {b} value {c}: {got} for {v}"
                    );
                }
                let want = a.sum[i * nb + b] as f64;
                assert!(
                    (sum - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "sum {sum} vs {want}"
                );
            }
        }
    }
}
