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
    /// The bf16 kernel's panel (Q4_K, Q6_K): exact integer values and sub-block scales.
    q: Vec<u16>,
    ds: Vec<f32>,
    ms: Vec<f32>,
    /// The activation rows for the bf16 kernel.
    #[cfg(target_arch = "x86_64")]
    bf16: x86::bf16::Activations,
}

/// Formats whose prompt panels hold exact bf16 values for `vdpbf16ps` where the CPU has
/// AVX512_BF16 (see [`QMat::gemm_band_bf16`]): the K-quants, Q4_0 and BF16. Q4_1 and Q8_0
/// (SmolLM2's file) keep f32 panels and their tested answers.
pub(super) fn bf16_panels(format: Format) -> bool {
    matches!(
        format,
        Format::Q4K | Format::Q5K | Format::Q6K | Format::Q4_0 | Format::BF16
    )
}

impl QMat {
    /// Weight rows `r0..r1` × all `n` activation rows, for prompt processing: the weights
    /// are dequantized one panel of [`PANEL`] rows at a time into a column-major f32 buffer,
    /// then a register-blocked kernel multiplies it with [`MR`] activation rows at a time.
    /// Dequantizing once per panel (instead of once per four activation rows, as the tile
    /// kernel does) leaves almost only FMAs in the inner loop.
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
        if x86::bf16() && bf16_panels(self.format()) && self.cols().is_multiple_of(32) {
            return self.gemm_band_bf16(r0, r1, x, n, out, scratch);
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
    /// instruction — twice f32 FMA's — with f32 sums.
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
        use super::formats::{cast, BlockQ4K, BlockQ5K, QK, QK_K};
        use x86::bf16::{MR as BMR, PANEL as BPANEL};
        let cols = self.cols();
        let nk = cols / QK_K;
        // SAFETY: AVX512_BF16 checked by the caller; rows are whole blocks of 32.
        let xs = unsafe { scratch.bf16.prepare(&x[..n * cols]) };
        let panel = match self.format() {
            // Values with a minimum per block (Q4_0's is 8·d).
            Format::Q4K | Format::Q5K | Format::Q4_0 => x86::bf16::Panel::Mins32,
            Format::BF16 => x86::bf16::Panel::Plain32,
            _ => x86::bf16::Panel::Plain16,
        };
        let mut spill = [0f32; BMR * BPANEL];
        let mut p0 = r0;
        while p0 < r1 {
            let width = (r1 - p0).min(BPANEL);
            let rows = self.rows_data(p0, p0 + width);
            let (q, ds, ms) = (&mut scratch.q, &mut scratch.ds, &mut scratch.ms);
            // SAFETY: as above; `rows` holds `width` whole rows.
            unsafe {
                match self.format() {
                    Format::Q4K => {
                        x86::bf16::q4k_panel::<BlockQ4K>(cast(rows), nk, width, q, ds, ms)
                    }
                    Format::Q5K => {
                        x86::bf16::q4k_panel::<BlockQ5K>(cast(rows), nk, width, q, ds, ms)
                    }
                    Format::Q4_0 => x86::bf16::q4_0_panel(cast(rows), cols / QK, width, q, ds, ms),
                    Format::BF16 => x86::bf16::bf16_panel(cast(rows), cols, width, q, ds),
                    _ => x86::bf16::q6k_panel(cast(rows), nk, width, q, ds),
                }
            };
            let mut i = 0;
            while i < n {
                let m = (n - i).min(BMR);
                let xb = &xs.xb[i * cols..(i + m) * cols];
                let xsum = &xs.xsum[i * cols / QK..(i + m) * cols / QK];
                let (q, ds, ms) = (&scratch.q, &scratch.ds, &scratch.ms);
                let kernel = |o: *mut f32, ld: usize| {
                    // SAFETY: as above; `o` has room for m rows of 16 at stride `ld`.
                    unsafe { x86::bf16::gemm(panel, m, q, ds, ms, xb, xsum, cols, o, ld) }
                };
                if width == BPANEL {
                    // The m × 16 cells (rows i..i+m, columns p0..p0+16 of the band) are this
                    // work item's.
                    kernel(out.at(i, p0), out.ld);
                } else {
                    // Into a local buffer; only `width` columns are copied.
                    kernel(spill.as_mut_ptr(), BPANEL);
                    for k in 0..m {
                        for j in 0..width {
                            // SAFETY: cell (i + k, p0 + j) is this work item's.
                            unsafe { out.set(i + k, p0 + j, spill[k * BPANEL + j]) };
                        }
                    }
                }
                i += m;
            }
            p0 += width;
        }
    }
}
