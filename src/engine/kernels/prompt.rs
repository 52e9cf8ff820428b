//! Products for prompt chunks: compute-bound, so a panel of weight rows is dequantized once
//! to f32 and multiplied with many activation rows by a register-blocked kernel.

#[cfg(target_arch = "x86_64")]
use super::x86;
use super::{Band, Format, QMat};

/// Weight rows per panel of the prompt-processing kernel (two AVX vectors).
pub(super) const PANEL: usize = 16;
/// Activation rows per call of that kernel: 6 × 2 accumulators + 2 weights + 1 broadcast
/// fill 15 of the 16 AVX registers.
const MR: usize = 6;
/// Per-thread buffers of the prompt kernels, sized by the first band of a product that uses
/// them and reused for the others.
#[derive(Default)]
pub(super) struct PanelScratch {
    /// A panel of weight rows as f32, column-major (`cols` × [`PANEL`]).
    panel: Vec<f32>,
    /// The same rows row-major, before they are transposed into `panel`.
    rows_f32: Vec<f32>,
    /// The bf16 kernel's panel (Q4_K, Q6_K): exact integer values and sub-block scales,
    /// row-major as the panel builders make them (`stage`), then interleaved (`q`); the
    /// 8-bit kernel's the same way from `bytes` (two values in each element).
    stage: Vec<u16>,
    /// A panel of Q4_K, Q5_K, Q6_K or Q4_0 rows as bytes, row-major (see `byte_panel`).
    bytes: Vec<u16>,
    q: Vec<u16>,
    ds: Vec<f32>,
    ms: Vec<f32>,
    /// The activation rows for the bf16 kernel.
    #[cfg(target_arch = "x86_64")]
    bf16: x86::bf16::Activations,
    /// The activation rows for the 8-bit kernel.
    #[cfg(target_arch = "x86_64")]
    int8: x86::int8::Activations,
    /// The AMX kernel's weight panels of a band, and its last activation rows padded with
    /// zeros to a whole pair of tiles.
    amx_band: Vec<u16>,
    amx_tail: Vec<u16>,
}

/// Formats whose prompt panels hold their integer values as bytes for the 8-bit kernel (see
/// [`QMat::gemm_band_int8`]), in rows of whole 64-column pairs of blocks: the K-quants and
/// Q4_0, and Q8_0 for the AVX512_VNNI kernel (`avx512`) only (see `x86::int8::Offset32`).
pub(super) fn int8_panels(format: Format, cols: usize, avx512: bool) -> bool {
    let formats = match format {
        Format::Q4K | Format::Q5K | Format::Q6K | Format::Q4_0 => true,
        Format::Q8_0 => avx512,
        _ => false,
    };
    formats && cols.is_multiple_of(64)
}

/// Formats whose prompt panels hold exact bf16 values for `vdpbf16ps` where the CPU has
/// AVX512_BF16 (see [`QMat::gemm_band_bf16`]): the K-quants, Q4_0, Q8_0 and BF16. Q4_1
/// (SmolLM2's projections) keeps f32 panels and their tested answers.
pub(super) fn bf16_panels(format: Format) -> bool {
    matches!(
        format,
        Format::Q4K | Format::Q5K | Format::Q6K | Format::Q4_0 | Format::Q8_0 | Format::BF16
    )
}

impl QMat {
    /// Weight rows `r0..r1` × all `n` activation rows, for prompt processing: the weights
    /// are dequantized one panel of [`PANEL`] rows at a time into a column-major f32 buffer,
    /// then a register-blocked kernel multiplies it with [`MR`] activation rows at a time.
    /// Dequantizing once per panel (instead of once per four activation rows, as the tile
    /// kernel does) leaves almost only FMAs in the inner loop. Where the CPU allows, faster
    /// kernels take the formats they know: AMX tiles, else the 8-bit kernel with AVX512_VNNI,
    /// else AVX512_BF16, else the 8-bit kernel in AVX2 (see each).
    #[cfg(target_arch = "x86_64")]
    pub(super) fn gemm_band(
        &self,
        r0: usize,
        r1: usize,
        x: &[f32],
        n: usize,
        out: Band,
        scratch: &mut PanelScratch,
    ) {
        if x86::int8() && int8_panels(self.format(), self.cols(), true) {
            return self.gemm_band_int8(r0, r1, x, n, out, scratch, true);
        }
        if x86::bf16() && bf16_panels(self.format()) && self.cols().is_multiple_of(32) {
            return self.gemm_band_bf16(r0, r1, x, n, out, scratch);
        }
        if x86::int8_avx2() && int8_panels(self.format(), self.cols(), false) {
            return self.gemm_band_int8(r0, r1, x, n, out, scratch, false);
        }
        let cols = self.cols();
        let PanelScratch {
            panel, rows_f32, ..
        } = scratch;
        panel.resize(cols * PANEL, 0.0);
        rows_f32.resize(PANEL * cols, 0.0);
        let mut spill = [0f32; MR * PANEL];
        let mut p0 = r0;
        while p0 < r1 {
            let width = (r1 - p0).min(PANEL);
            for (j, row) in rows_f32.chunks_exact_mut(cols).enumerate() {
                if j < width {
                    self.row(p0 + j, row);
                } else {
                    row.fill(0.0);
                }
            }
            if cols.is_multiple_of(8) {
                // SAFETY: AVX2 checked by the caller; both buffers hold PANEL × cols values.
                unsafe { x86::avx2::transpose_panel(rows_f32, cols, panel) };
            } else {
                for (j, row) in rows_f32.chunks_exact(cols).enumerate() {
                    for (c, v) in row.iter().enumerate() {
                        panel[c * PANEL + j] = *v;
                    }
                }
            }
            let mut i = 0;
            while i < n {
                let m = (n - i).min(MR);
                let xs = &x[i * cols..(i + m) * cols];
                if width == PANEL {
                    // SAFETY: AVX2/FMA checked by the caller; `xs` holds m rows of `cols`,
                    // `panel` cols × PANEL values; the m × PANEL cells written (rows i..i+m,
                    // columns p0..p0+PANEL of `out`) lie inside `out` and in the chunk this
                    // thread claimed.
                    unsafe { x86::avx2::gemm_tile(m, panel, xs, cols, out.at(i, p0), out.ld) };
                } else {
                    // SAFETY: as above, into a local buffer; only `width` columns are copied.
                    unsafe { x86::avx2::gemm_tile(m, panel, xs, cols, spill.as_mut_ptr(), PANEL) };
                    for k in 0..m {
                        for j in 0..width {
                            // SAFETY: cell (i + k, p0 + j) is in the chunk this thread claimed.
                            unsafe { out.set(i + k, p0 + j, spill[k * PANEL + j]) };
                        }
                    }
                }
                i += m;
            }
            p0 += width;
        }
    }

    /// [`QMat::gemm_band`] for the formats of [`bf16_panels`] with bf16 dot products
    /// (AVX512_BF16): each panel keeps the weights' values exactly in bf16 (the integers of
    /// the quantized formats with their f32 block scales, BF16's own values), the activations
    /// are rounded to bf16 once per product, and `vdpbf16ps` does 32 multiply-adds an
    /// instruction — twice f32 FMA's — with f32 sums. Where AMX tiles are usable, the same
    /// panels go through `tdpbf16ps` instead (see [`x86::amx`]).
    #[cfg(target_arch = "x86_64")]
    fn gemm_band_bf16(
        &self,
        r0: usize,
        r1: usize,
        x: &[f32],
        n: usize,
        out: Band,
        scratch: &mut PanelScratch,
    ) {
        let cols = self.cols();
        // SAFETY: AVX512_BF16 checked by the caller; rows are whole blocks of 32.
        unsafe { scratch.bf16.prepare(&x[..n * cols]) };
        // SAFETY (both): the activations prepared; AMX checked where it is used.
        unsafe {
            if x86::amx() {
                self.gemm_band_amx(r0, r1, n, out, scratch)
            } else {
                self.gemm_band_dpbf16(r0, r1, n, out, scratch)
            }
        }
    }

    /// [`QMat::gemm_band_bf16`] with `vdpbf16ps`.
    ///
    /// # Safety
    /// AVX512_BF16 present; `scratch.bf16` prepared with the `n` activation rows.
    #[cfg(target_arch = "x86_64")]
    unsafe fn gemm_band_dpbf16(
        &self,
        r0: usize,
        r1: usize,
        n: usize,
        out: Band,
        scratch: &mut PanelScratch,
    ) {
        use super::formats::QK;
        let cols = self.cols();
        let kind = self.panel_kind();
        let build = |p0: usize, width: usize, s: &mut PanelScratch| {
            self.bf16_panel(p0, width, s);
            s.q.resize(cols * PANEL, 0);
            // SAFETY: AVX-512 checked by the caller; `stage` holds 16 rows of `cols`.
            unsafe { x86::bf16::interleave(&s.stage, cols, &mut s.q) };
        };
        let kernel = |s: &PanelScratch, i: usize, m: usize, o: *mut f32, ld: usize| {
            let xb = &s.bf16.xb[i * cols..(i + m) * cols];
            let xsum = &s.bf16.xsum[i * cols / QK..(i + m) * cols / QK];
            // SAFETY: as above; `o` has room for m rows of 16 at stride `ld`.
            unsafe { x86::bf16::gemm(kind, m, &s.q, &s.ds, &s.ms, xb, xsum, cols, o, ld) }
        };
        by_panels(r0, r1, n, x86::bf16::MR, out, scratch, build, kernel);
    }

    /// [`QMat::gemm_band`] for the formats of [`int8_panels`] with 8-bit activations
    /// (AVX512_VNNI, see [`x86::int8`]): each panel holds the weights' integers as bytes
    /// with their f32 block scales and minimums, and `vpdpbusd` does 64 multiply-adds an
    /// instruction with exact 32-bit sums; a block's outlier activations are kept out of its
    /// integers and added exactly in f32. `avx512`: the AVX512_VNNI kernel, else its AVX2
    /// form (the same results bit for bit, at half the width).
    #[cfg(target_arch = "x86_64")]
    #[allow(clippy::too_many_arguments)]
    fn gemm_band_int8(
        &self,
        r0: usize,
        r1: usize,
        x: &[f32],
        n: usize,
        out: Band,
        scratch: &mut PanelScratch,
        avx512: bool,
    ) {
        let cols = self.cols();
        debug_assert!(int8_panels(self.format(), cols, avx512));
        let x = &x[..n * cols];
        // SAFETY: AVX-512 (resp. AVX2) checked by the caller; rows are whole blocks of 32.
        unsafe {
            if avx512 {
                scratch.int8.prepare(x, cols);
            } else {
                scratch.int8.prepare_avx2(x, cols);
            }
        }
        let build = |p0: usize, width: usize, s: &mut PanelScratch| {
            self.byte_panel(p0, width, s);
            s.q.resize(cols * PANEL / 2, 0);
            // SAFETY: AVX-512 checked by the caller where used; `bytes` holds 16 rows of
            // `cols` bytes, read as `cols / 2` pairs (a multiple of 32: `int8_panels`).
            unsafe {
                if avx512 {
                    x86::bf16::interleave(&s.bytes, cols / 2, &mut s.q)
                } else {
                    x86::int8::interleave_bytes(&s.bytes, cols, &mut s.q)
                }
            };
        };
        let q6k = self.format() == Format::Q6K;
        let kernel = |s: &PanelScratch, i: usize, m: usize, o: *mut f32, ld: usize| {
            let (q, ds, ms, a) = (&s.q, &s.ds, &s.ms, &s.int8);
            // SAFETY: AVX512_VNNI (resp. AVX2) checked by the caller; `int8` holds the n
            // rows; `o` has room for m rows of 16 at stride `ld`; `ds` holds the scales
            // `byte_panel` made for this format.
            unsafe {
                match (avx512, q6k) {
                    (true, false) => x86::int8::gemm(m, q, ds, ms, a, i, cols, o, ld),
                    (false, false) => x86::int8::gemm_avx2(m, q, ds, ms, a, i, cols, o, ld),
                    (true, true) => x86::int8::gemm_q6k(m, q, ds, a, i, cols, o, ld),
                    (false, true) => x86::int8::gemm_q6k_avx2(m, q, ds, a, i, cols, o, ld),
                }
            }
        };
        let mr = if avx512 {
            x86::int8::MR
        } else {
            x86::int8::MR_AVX2
        };
        by_panels(r0, r1, n, mr, out, scratch, build, kernel);
    }

    /// What this matrix's bf16 panels hold.
    #[cfg(target_arch = "x86_64")]
    fn panel_kind(&self) -> x86::bf16::Panel {
        match self.format() {
            // Values with a minimum per block (Q4_0's is 8·d).
            Format::Q4K | Format::Q5K | Format::Q4_0 => x86::bf16::Panel::Mins32,
            Format::BF16 | Format::Q8_0 => x86::bf16::Panel::Plain32,
            _ => x86::bf16::Panel::Plain16,
        }
    }

    /// Weight rows `p0..p0 + width` (≤ 16) of Q4_K, Q5_K, Q6_K, Q4_0 or Q8_0 as a byte panel
    /// in `scratch` (their integer values row-major in `bytes`, scales and minimums in `ds`
    /// and `ms`; Q6_K's scales per 16 columns, no minimums): what the 8-bit kernel reads, and
    /// what the bf16 panels of the first four are widened from.
    #[cfg(target_arch = "x86_64")]
    fn byte_panel(&self, p0: usize, width: usize, scratch: &mut PanelScratch) {
        use super::formats::{cast, BlockQ4K, BlockQ4_0, BlockQ5K, BlockQ8_0, QK, QK_K};
        let cols = self.cols();
        let (nk, nq) = (cols / QK_K, cols / QK);
        let rows = self.rows_data(p0, p0 + width);
        let (b, ds, ms) = (&mut scratch.bytes, &mut scratch.ds, &mut scratch.ms);
        // SAFETY: AVX2 checked by the callers; `rows` holds `width` whole rows.
        unsafe {
            match self.format() {
                Format::Q4K => x86::int8::q4k_panel::<BlockQ4K>(cast(rows), nk, width, b, ds, ms),
                Format::Q5K => x86::int8::q4k_panel::<BlockQ5K>(cast(rows), nk, width, b, ds, ms),
                Format::Q6K => x86::int8::q6k_panel(cast(rows), nk, width, b, ds),
                Format::Q8_0 => {
                    x86::int8::offset32_panel::<BlockQ8_0>(cast(rows), nq, width, b, ds, ms)
                }
                _ => x86::int8::offset32_panel::<BlockQ4_0>(cast(rows), nq, width, b, ds, ms),
            }
        }
    }

    /// Weight rows `p0..p0 + width` (≤ 16) as a bf16 panel in `scratch` (row-major in
    /// `stage`, with their scales in `ds` and `ms`).
    #[cfg(target_arch = "x86_64")]
    fn bf16_panel(&self, p0: usize, width: usize, scratch: &mut PanelScratch) {
        use super::formats::{cast, QK};
        let cols = self.cols();
        // SAFETY (all three): AVX512_BF16 checked by the callers; `rows` holds `width`
        // whole rows; the byte panel holds 16 rows of `cols`.
        match self.format() {
            Format::Q4K | Format::Q5K | Format::Q4_0 => {
                self.byte_panel(p0, width, scratch);
                unsafe { x86::bf16::widen(&scratch.bytes, cols, &mut scratch.stage) }
            }
            Format::Q6K => {
                self.byte_panel(p0, width, scratch);
                unsafe { x86::bf16::widen_q6k(&scratch.bytes, cols, &mut scratch.stage) }
            }
            Format::BF16 => {
                let rows = self.rows_data(p0, p0 + width);
                let (q, ds) = (&mut scratch.stage, &mut scratch.ds);
                unsafe { x86::bf16::bf16_panel(cast(rows), cols, width, q, ds) }
            }
            Format::Q8_0 => {
                let rows = self.rows_data(p0, p0 + width);
                let (q, ds) = (&mut scratch.stage, &mut scratch.ds);
                unsafe { x86::bf16::q8_0_panel(cast(rows), cols / QK, width, q, ds) }
            }
            _ => unreachable!("no bf16 panels for {:?}", self.format()),
        }
    }

    /// [`QMat::gemm_band_bf16`] on AMX tiles: the band's weight rows as bf16 panels of
    /// weights (see [`x86::amx`]), made once, then 32 activation rows × 32 weight rows at a
    /// time (the last activation rows from a zero-padded copy, a missing 16th panel zero).
    ///
    /// # Safety
    /// AMX usable; `scratch.bf16` prepared with the `n` activation rows.
    #[cfg(target_arch = "x86_64")]
    unsafe fn gemm_band_amx(
        &self,
        r0: usize,
        r1: usize,
        n: usize,
        out: Band,
        scratch: &mut PanelScratch,
    ) {
        use x86::amx::ROWS;
        use x86::bf16::Panel;
        let cols = self.cols();
        let panel_len = cols * PANEL;
        let panels = (r1 - r0).div_ceil(PANEL).next_multiple_of(2);
        let mut band = std::mem::take(&mut scratch.amx_band);
        band.clear();
        band.resize(panels * panel_len, 0);
        let kind = self.panel_kind();
        for (k, panel) in band.chunks_exact_mut(panel_len).enumerate() {
            let p0 = r0 + k * PANEL;
            if p0 >= r1 {
                break;
            }
            self.bf16_panel(p0, (r1 - p0).min(PANEL), scratch);
            x86::bf16::interleave(&scratch.stage, cols, panel);
            let (ds, ms) = (&scratch.ds, &scratch.ms);
            match kind {
                Panel::Mins32 => x86::amx::weights_in_place::<32, true>(panel, ds, ms, cols),
                Panel::Plain16 => x86::amx::weights_in_place::<16, false>(panel, ds, ms, cols),
                // BF16 weights are the values themselves (their scales are 1).
                Panel::Plain32 if self.format() == Format::BF16 => {}
                Panel::Plain32 => x86::amx::weights_in_place::<32, false>(panel, ds, ms, cols),
            }
        }
        // The rows past the last whole pair of tiles, and zeros to fill it.
        let full = n / (2 * ROWS) * (2 * ROWS);
        let xb = &scratch.bf16.xb;
        let mut tail = std::mem::take(&mut scratch.amx_tail);
        if full < n {
            tail.clear();
            tail.extend_from_slice(&xb[full * cols..n * cols]);
            tail.resize(2 * ROWS * cols, 0);
        }
        let tiles = x86::amx::Tiles::configure();
        let mut sums = Box::new([0f32; 1024]);
        for i in (0..n).step_by(2 * ROWS) {
            let x = if i < full { &xb[i * cols..] } else { &tail[..] };
            let m = (n - i).min(2 * ROWS);
            for pair in 0..panels / 2 {
                let w = &band[2 * pair * panel_len..];
                // SAFETY: AMX configured; `x` holds 32 rows of `cols` from row i (or the
                // padded copy), `w` two panels.
                x86::amx::gemm32(
                    &tiles,
                    x.as_ptr(),
                    x.as_ptr().add(ROWS * cols),
                    w.as_ptr(),
                    w.as_ptr().add(panel_len),
                    cols,
                    &mut sums,
                );
                for b in 0..2 {
                    let p0 = r0 + (2 * pair + b) * PANEL;
                    if p0 >= r1 {
                        continue;
                    }
                    let width = (r1 - p0).min(PANEL);
                    for k in 0..m {
                        let block = &sums[((k / ROWS) * 2 + b) * 256 + (k % ROWS) * 16..][..width];
                        // SAFETY: cells (i + k, p0..p0 + width) are this work item's.
                        std::ptr::copy_nonoverlapping(block.as_ptr(), out.at(i + k, p0), width);
                    }
                }
            }
        }
        scratch.amx_band = band;
        scratch.amx_tail = tail;
    }
}

/// The loop of the panel kernels over a band of weight rows `r0..r1`: `build` makes each
/// panel of [`PANEL`] rows (from `p0`, `width` of them) in `scratch`, then `kernel` multiplies
/// it with activation rows `i..i + m`, `m` ≤ `mr` at a time, into `out` (through
/// [`write_panel`]).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn by_panels(
    r0: usize,
    r1: usize,
    n: usize,
    mr: usize,
    out: Band,
    scratch: &mut PanelScratch,
    mut build: impl FnMut(usize, usize, &mut PanelScratch),
    kernel: impl Fn(&PanelScratch, usize, usize, *mut f32, usize),
) {
    let mut p0 = r0;
    while p0 < r1 {
        let width = (r1 - p0).min(PANEL);
        build(p0, width, scratch);
        let mut i = 0;
        while i < n {
            let m = (n - i).min(mr);
            write_panel(out, i, p0, m, width, |o, ld| kernel(scratch, i, m, o, ld));
            i += m;
        }
        p0 += width;
    }
}

/// Runs a prompt kernel for activation rows `i..i + m` and the panel of weight rows
/// `p0..p0 + width`: straight into the band when the panel is whole, else into a local
/// buffer of which only `width` columns are copied.
#[cfg(target_arch = "x86_64")]
fn write_panel(
    out: Band,
    i: usize,
    p0: usize,
    m: usize,
    width: usize,
    kernel: impl FnOnce(*mut f32, usize),
) {
    const MOST: usize = 16;
    debug_assert!(m <= MOST);
    if width == PANEL {
        // The m × 16 cells (rows i..i+m, columns p0..p0+16 of the band) are this work
        // item's.
        kernel(out.at(i, p0), out.ld);
    } else {
        let mut spill = [0f32; MOST * PANEL];
        kernel(spill.as_mut_ptr(), PANEL);
        for k in 0..m {
            for j in 0..width {
                // SAFETY: cell (i + k, p0 + j) is this work item's.
                unsafe { out.set(i + k, p0 + j, spill[k * PANEL + j]) };
            }
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use crate::engine::kernels::testing::{matrix, reference};
    use crate::engine::kernels::Rows;
    use crate::engine::kernels::Team;
    use candle_core::quantized::GgmlDType;

    fn bf16_to_f32(b: u16) -> f64 {
        f32::from_bits((b as u32) << 16) as f64
    }

    /// `n` activation rows of `cols` small values with one outlier (3000.0) in the first
    /// row's second block: what the prompt kernels' tests multiply.
    fn outlier_rows(n: usize, cols: usize) -> Vec<f32> {
        let mut x: Vec<f32> = (0..n * cols)
            .map(|i| ((i * 31 % 17) as f32 - 8.0) * 0.1)
            .collect();
        x[40] = 3000.0;
        x
    }

    /// What `band` writes into an `n` × `rows` output, the band being all of it.
    fn into_band(n: usize, rows: usize, band: impl FnOnce(Band)) -> Vec<f32> {
        let mut got = vec![0f32; n * rows];
        band(Band {
            out: got.as_mut_ptr(),
            ld: rows,
        });
        got
    }

    /// The AVX2 form of the 8-bit prompt kernel (what CPUs without AVX-512 run): within the
    /// 8-bit rounding bound of plain f32 arithmetic (a partial panel; an outlier, kept exact),
    /// and, where the CPU has AVX512_VNNI (AMX machines too), equal to that kernel's
    /// bit for bit. Q8_0, which only the AVX512_VNNI kernel takes, is checked against the
    /// bound there.
    #[test]
    fn int8_kernels_match_the_reference_and_each_other() {
        use crate::engine::kernels::testing::int8_steps;
        if !x86::available() {
            return;
        }
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        for dtype in [
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
            GgmlDType::Q4_0,
            GgmlDType::Q8_0,
        ] {
            let (rows, cols, n) = (40, 512, 11);
            let (m, w) = matrix(rows, cols, dtype);
            let x = outlier_rows(n, cols);
            let run = |avx512: bool| {
                into_band(n, rows, |out| {
                    m.gemm_band_int8(0, rows, &x, n, out, &mut PanelScratch::default(), avx512)
                })
            };
            let want = reference(&w, &x, rows, cols, n);
            let steps = int8_steps(&w, &x, rows, cols, n);
            let check = |got: &[f32]| {
                for (k, (g, want)) in got.iter().zip(&want).enumerate() {
                    let bound = steps[k] + 1e-5 * want.abs() + 1e-3;
                    assert!(
                        (g - want).abs() <= bound,
                        "{dtype:?} cell {k}: {g} vs {want}"
                    );
                }
            };
            let vnni = x86::int8::vnni().then(|| run(true));
            if dtype == GgmlDType::Q8_0 {
                assert!(!int8_panels(m.format(), cols, false));
                if let Some(vnni) = vnni {
                    check(&vnni);
                }
                continue;
            }
            let avx2 = run(false);
            check(&avx2);
            if let Some(vnni) = vnni {
                assert_eq!(bits(&avx2), bits(&vnni), "{dtype:?}");
            }
        }
    }

    /// The AVX512_BF16 prompt kernel called directly, for every format it reads: where the
    /// 8-bit kernel takes the prompts of Q4_K, Q5_K, Q6_K, Q4_0 and Q8_0 (AVX512_VNNI), or AMX
    /// tiles take them all, dispatch never reaches it, yet `--no-int8` or `--no-amx` does.
    /// Within the bf16 rounding of the activations (2⁻⁸ of each term) of plain f32
    /// arithmetic; a partial panel; an outlier.
    #[test]
    fn bf16_panels_match_the_reference() {
        if !x86::bf16() {
            eprintln!("no AVX512_BF16 here: the bf16 prompt kernel is not tested");
            return;
        }
        for dtype in [
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
            GgmlDType::Q4_0,
            GgmlDType::Q8_0,
            GgmlDType::BF16,
        ] {
            let (rows, cols, n) = (40, 512, 11);
            let (m, w) = matrix(rows, cols, dtype);
            let x = outlier_rows(n, cols);
            // Past AMX tiles, where the CPU has them.
            let mut scratch = PanelScratch::default();
            // SAFETY: AVX512_BF16 checked above; rows are whole blocks of 32.
            unsafe { scratch.bf16.prepare(&x) };
            let got = into_band(n, rows, |out| unsafe {
                m.gemm_band_dpbf16(0, rows, n, out, &mut scratch)
            });
            let want = reference(&w, &x, rows, cols, n);
            let abs = |v: &[f32]| v.iter().map(|a| a.abs()).collect::<Vec<_>>();
            let magnitude = reference(&abs(&w), &abs(&x), rows, cols, n);
            for (k, (g, want)) in got.iter().zip(&want).enumerate() {
                let bound = magnitude[k] / 256.0 + 1e-3;
                assert!(
                    (g - want).abs() <= bound,
                    "{dtype:?} cell {k}: {g} vs {want}"
                );
            }
        }
    }

    /// The AMX path: each weight of its panels is the dequantized weight rounded to bf16
    /// (within 2⁻⁸ of it: 8 significant bits, rounded to nearest), and each product equals
    /// the exact sum of those weights times the bf16 activations up to f32 rounding (a wrong
    /// tile shape, layout or panel would be off by whole terms). Two bands of weight rows
    /// (the second short: a missing panel), 37 activation rows (a partial pair of tiles).
    #[test]
    fn amx_tiles_multiply_the_bf16_rounded_weights() {
        if !x86::amx() {
            eprintln!("no usable AMX-BF16 on this machine: the tile kernel is not tested here");
            return;
        }
        for dtype in [
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
            GgmlDType::Q4_0,
            GgmlDType::Q8_0,
            GgmlDType::BF16,
        ] {
            let (rows, cols, n) = (100, 768, 37);
            let (m, w) = matrix(rows, cols, dtype);
            let x = outlier_rows(n, cols);
            let mut scratch = PanelScratch::default();
            // SAFETY: AMX (and so AVX512_BF16) checked above; rows are whole blocks.
            unsafe { scratch.bf16.prepare(&x) };
            // The weights as the tiles see them, read back from a band's panels.
            // SAFETY: as above; nothing is written (a band of no activation rows).
            let out = Band {
                out: std::ptr::null_mut(),
                ld: rows,
            };
            unsafe { m.gemm_band_amx(0, rows, 0, out, &mut scratch) };
            let panel_len = cols * PANEL;
            let weight = |r: usize, c: usize| {
                let panel = &scratch.amx_band[r / PANEL * panel_len..];
                bf16_to_f32(panel[(c / 2) * 2 * PANEL + 2 * (r % PANEL) + c % 2])
            };
            for r in 0..rows {
                for c in 0..cols {
                    let (got, exact) = (weight(r, c), w[r * cols + c] as f64);
                    assert!(
                        (got - exact).abs() <= exact.abs() * 1.0001 / 256.0 + 1e-30,
                        "{dtype:?} weight ({r}, {c}): {got} for {exact}"
                    );
                }
            }
            let xb: Vec<f64> = scratch.bf16.xb.iter().map(|&b| bf16_to_f32(b)).collect();
            let mut got = vec![0f32; n * rows];
            m.matmul(&x, n, &mut got, &Team::new(2), Rows::Prompt);
            for i in 0..n {
                for r in 0..rows {
                    let terms = (0..cols).map(|c| weight(r, c) * xb[i * cols + c]);
                    let (want, magnitude) =
                        terms.fold((0.0, 0.0), |(s, a), t: f64| (s + t, a + t.abs()));
                    let got = got[i * rows + r] as f64;
                    assert!(
                        (got - want).abs() <= 1e-6 * magnitude + 1e-6,
                        "{dtype:?} row {i} col {r}: {got} vs {want}"
                    );
                }
            }
        }
    }
}
