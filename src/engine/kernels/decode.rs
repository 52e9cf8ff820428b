//! Products for generated-token rows (one per sequence): memory-bound, so each weight block is
//! read once for several rows, and each row gets exactly the arithmetic it gets alone.

use super::formats::{cast, QK, QK_K};
#[cfg(target_arch = "x86_64")]
use super::formats::{BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ8_0};
#[cfg(target_arch = "x86_64")]
use super::x86;
use super::{scalar, Band, BandScratch, Format, QMat};

/// Generated-token rows that share one read of the weights in the AVX2 matrix-vector
/// kernels (4 accumulators + 4 weight vectors + temporaries fit the 16 registers; 8 spilled
/// and measured slower than two passes of 4).
const MAX_SHARED: usize = 4;
/// The same with AVX-512, whose 32 registers hold 8 rows' accumulators.
const MAX_SHARED_512: usize = 8;
/// Bytes of activation rows one pass of the AVX-512 kernels may read: they are read once per
/// weight row, so they must stay in the L1 cache beside the streaming weights.
const SHARED_X_BYTES: usize = 24 * 1024;

/// Generated-token rows per pass of the AVX-512 kernels for a matrix of `cols` columns: 8
/// while their activations fit [`SHARED_X_BYTES`], else 4 (measured on a 2-core Xeon, batch
/// 8: one pass of 8 over the 576-wide matrices +15% against two of 4; over the 1536-wide
/// down projection two passes of 4 win, 8 rows' activations there are 48 KiB).
fn shared_512(cols: usize) -> usize {
    let fit = SHARED_X_BYTES / (cols * std::mem::size_of::<f32>()).max(1);
    fit.clamp(4, MAX_SHARED_512)
}

/// Runs `pass(i, t)` over `n` activation rows in passes of at most `group` rows (`t` rows
/// from row `i`): the kernels keep each pass's accumulators in registers.
#[cfg(target_arch = "x86_64")]
fn in_passes(n: usize, group: usize, mut pass: impl FnMut(usize, usize)) {
    let mut i = 0;
    while i < n {
        let t = (n - i).min(group);
        pass(i, t);
        i += t;
    }
}

/// How the decode kernels round a format's activations on this CPU: one rule for the
/// dispatch in [`QMat::decode_band`] and for the tests' error bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Rounding {
    /// f32 activations (the f32 vector kernels, or the portable loop).
    None,
    /// bf16 (see `x86::bf16`).
    Bf16,
    /// 16-bit integers per block of 32 (see `x86::int16`).
    Int16,
}

/// Q4_0, Q4_1 and Q8_0 take 16-bit integer activations wherever they are allowed, AVX512_BF16
/// CPUs included: there they decoded a 1.5 B Q4_0 file at 18.3 and 17.8 tok/s where the bf16
/// kernel gave 16.2 and 15.7 (alternating runs, Xeon Sapphire Rapids, 2026-12-07), and
/// SmolLM2's Q4_1 and Q8_0 products are compute-bound in f32 (54 tok/s there, 155 with 16-bit
/// integers). The K-quants take bf16 where the CPU has it (the same speed as 16-bit integers
/// on that VM; on a Zen 4 VM faster than the 512-bit 16-bit kernels: a 1.5 B Q4_K_M file at
/// 36.8–39.6 tok/s against 33.1–34.4 with `--no-bf16`, alternating runs, 2026-12-07), else
/// 16-bit integers. Where the CPU has AVX512_VNNI the 16-bit kernels run in 512 bits
/// (`x86::int16_512`).
pub(super) fn rounding(format: Format) -> Rounding {
    #[cfg(target_arch = "x86_64")]
    match format {
        Format::Q4_0 | Format::Q4_1 | Format::Q8_0 if x86::int16() => return Rounding::Int16,
        Format::Q4_0 if x86::bf16() => return Rounding::Bf16,
        Format::Q4K | Format::Q5K | Format::Q6K if x86::bf16() => return Rounding::Bf16,
        Format::Q4K | Format::Q5K | Format::Q6K if x86::int16() => return Rounding::Int16,
        _ => {}
    }
    let _ = format;
    Rounding::None
}

impl QMat {
    /// Weight rows `r0..r1` × `n` generated-token rows with the matrix-vector kernels:
    /// memory-bound, so each weight block is read once for up to [`MAX_SHARED`] (AVX2) or
    /// [`shared_512`] (AVX-512) activation rows, and each row gets exactly the arithmetic it
    /// gets alone. Formats without a vector kernel take the portable [`QMat::tile_band`].
    pub(super) fn decode_band(
        &self,
        r0: usize,
        r1: usize,
        x: &[f32],
        n: usize,
        out: Band,
        scratch: &mut BandScratch,
    ) {
        #[cfg(target_arch = "x86_64")]
        let rounding = rounding(self.format);
        #[cfg(target_arch = "x86_64")]
        if rounding == Rounding::Bf16 && self.format == Format::Q4_0 {
            let cols = self.cols;
            let data = self.rows_data(r0, r1);
            // SAFETY: AVX512_BF16 checked by `rounding`; `cols` is whole blocks of 32.
            let xs = unsafe { scratch.bf16.prepare(&x[..n * cols]) };
            in_passes(n, x86::bf16::ROWS, |i, t| {
                let o = out.at(i, r0);
                // SAFETY: as above; the activations hold t rows from row i, `xsum` their sums.
                unsafe {
                    x86::bf16::q4_0_rows(
                        cast(data),
                        cols / QK,
                        &xs.xb[i * cols..(i + t) * cols],
                        &xs.xsum[i * cols / QK..],
                        t,
                        o,
                        out.ld,
                    )
                }
            });
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if rounding == Rounding::Int16
            && matches!(self.format, Format::Q4_0 | Format::Q4_1 | Format::Q8_0)
        {
            let cols = self.cols;
            let nb = cols / QK;
            let data = self.rows_data(r0, r1);
            if x86::int16_512() {
                // SAFETY: AVX-512 (F, BW) and AVX512_VNNI checked by `int16_512`; `cols` is
                // whole blocks of 32.
                let xs = unsafe { scratch.int16.prepare_fours(&x[..n * cols], cols) };
                in_passes(n, x86::int16_512::ROWS, |i, t| {
                    let o = out.at(i, r0);
                    let x = xs.fours_from(i, cols);
                    use x86::int16_512::four_rows;
                    // SAFETY: as above; the activations hold t rows from row i.
                    unsafe {
                        match self.format {
                            Format::Q4_0 => four_rows::<BlockQ4_0>(cast(data), nb, x, t, o, out.ld),
                            Format::Q4_1 => four_rows::<BlockQ4_1>(cast(data), nb, x, t, o, out.ld),
                            _ => four_rows::<BlockQ8_0>(cast(data), nb, x, t, o, out.ld),
                        }
                    }
                });
                return;
            }
            // SAFETY: AVX2 checked by `rounding`; `cols` is whole blocks of 32.
            let xs = unsafe { scratch.int16.prepare_pairs(&x[..n * cols], cols) };
            in_passes(n, x86::int16::ROWS, |i, t| {
                let o = out.at(i, r0);
                let x = xs.pairs_from(i, cols);
                // SAFETY: as above; the activations hold t rows from row i.
                unsafe {
                    match self.format {
                        Format::Q4_0 => {
                            x86::int16::pair_rows::<BlockQ4_0>(cast(data), nb, x, t, o, out.ld)
                        }
                        Format::Q4_1 => {
                            x86::int16::pair_rows::<BlockQ4_1>(cast(data), nb, x, t, o, out.ld)
                        }
                        _ => x86::int16::pair_rows::<BlockQ8_0>(cast(data), nb, x, t, o, out.ld),
                    }
                }
            });
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if x86::available() && matches!(self.format, Format::Q4_0 | Format::Q4_1 | Format::Q8_0) {
            let cols = self.cols;
            let nb = cols / QK;
            let wide = x86::avx512();
            let group = if wide { shared_512(cols) } else { MAX_SHARED };
            let data = self.rows_data(r0, r1);
            in_passes(n, group, |i, t| {
                let xs = &x[i * cols..(i + t) * cols];
                let o = out.at(i, r0);
                // SAFETY: the instruction sets are present (checked at run time); `data` is
                // rows r0..r1 (whole blocks), `xs` holds t rows of `cols`, and the cells
                // written (rows i..i+t, columns r0..r1 of the band) are this work item's.
                unsafe {
                    match (self.format, wide) {
                        (Format::Q4_0, true) => {
                            x86::avx512::q4_rows_512::<BlockQ4_0>(cast(data), nb, xs, t, o, out.ld)
                        }
                        (Format::Q4_0, false) => {
                            x86::avx2::q4_rows::<BlockQ4_0>(cast(data), nb, xs, t, o, out.ld)
                        }
                        (Format::Q4_1, true) => {
                            x86::avx512::q4_rows_512::<BlockQ4_1>(cast(data), nb, xs, t, o, out.ld)
                        }
                        (Format::Q4_1, false) => {
                            x86::avx2::q4_rows::<BlockQ4_1>(cast(data), nb, xs, t, o, out.ld)
                        }
                        (_, true) => x86::avx512::q8_0_rows_512(cast(data), nb, xs, t, o, out.ld),
                        (_, false) => x86::avx2::q8_0_rows(cast(data), nb, xs, t, o, out.ld),
                    }
                }
            });
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if rounding == Rounding::Bf16 {
            let cols = self.cols;
            let nb = cols / QK_K;
            let data = self.rows_data(r0, r1);
            let x = &x[..n * cols];
            // SAFETY: AVX512_BF16 checked by `rounding` (a K-quant here); `cols` is whole
            // super-blocks.
            let xs = unsafe {
                if self.format == Format::Q6K {
                    scratch.bf16.prepare(x)
                } else {
                    scratch.bf16.prepare_q4k(x)
                }
            };
            in_passes(n, x86::bf16::ROWS, |i, t| {
                let rows = i * cols..(i + t) * cols;
                let o = out.at(i, r0);
                // SAFETY: as above; the activations hold t rows, `xsum` their sums from row
                // i on.
                unsafe {
                    let xsum = &xs.xsum[i * cols / QK..];
                    match self.format {
                        Format::Q4K => {
                            let xq = &xs.xq4[rows];
                            x86::bf16::q4k_rows::<BlockQ4K>(cast(data), nb, xq, xsum, t, o, out.ld)
                        }
                        Format::Q5K => {
                            let xq = &xs.xq4[rows];
                            x86::bf16::q4k_rows::<BlockQ5K>(cast(data), nb, xq, xsum, t, o, out.ld)
                        }
                        _ => x86::bf16::q6k_rows(cast(data), nb, &xs.xb[rows], t, o, out.ld),
                    }
                }
            });
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if rounding == Rounding::Int16 {
            let cols = self.cols;
            let nb = cols / QK_K;
            let data = self.rows_data(r0, r1);
            if x86::int16_512() {
                // SAFETY: AVX-512 (F, BW) and AVX512_VNNI checked by `int16_512`; `cols` is
                // whole super-blocks.
                let xs = unsafe { scratch.int16.prepare_quads(&x[..n * cols]) };
                in_passes(n, x86::int16_512::ROWS, |i, t| {
                    let o = out.at(i, r0);
                    let x = xs.quads_from(i, cols);
                    use x86::int16_512::{q4k_rows, q6k_rows};
                    // SAFETY: as above; the activations hold t rows from row i.
                    unsafe {
                        match self.format {
                            Format::Q4K => q4k_rows::<BlockQ4K>(cast(data), nb, x, t, o, out.ld),
                            Format::Q5K => q4k_rows::<BlockQ5K>(cast(data), nb, x, t, o, out.ld),
                            _ => q6k_rows(cast(data), nb, x, t, o, out.ld),
                        }
                    }
                });
                return;
            }
            // SAFETY: AVX2 checked by `rounding` (a K-quant here); `cols` is whole
            // super-blocks.
            let xs = unsafe { scratch.int16.prepare(&x[..n * cols]) };
            in_passes(n, x86::int16::ROWS, |i, t| {
                let o = out.at(i, r0);
                let x = xs.rows_from(i, cols);
                // SAFETY: as above; the activations hold t rows from row i.
                unsafe {
                    match self.format {
                        Format::Q4K => {
                            x86::int16::q4k_rows::<BlockQ4K>(cast(data), nb, x, t, o, out.ld)
                        }
                        Format::Q5K => {
                            x86::int16::q4k_rows::<BlockQ5K>(cast(data), nb, x, t, o, out.ld)
                        }
                        _ => x86::int16::q6k_rows(cast(data), nb, x, t, o, out.ld),
                    }
                }
            });
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if x86::available() && matches!(self.format, Format::Q4K | Format::Q5K | Format::Q6K) {
            use x86::kquants;
            let cols = self.cols;
            let nb = cols / QK_K;
            let wide = x86::avx512();
            let group = if wide {
                kquants::ROWS_512
            } else {
                kquants::ROWS_256
            };
            let data = self.rows_data(r0, r1);
            in_passes(n, group, |i, t| {
                let xs = &x[i * cols..(i + t) * cols];
                let o = out.at(i, r0);
                // SAFETY: as above.
                unsafe {
                    match (self.format, wide) {
                        (Format::Q4K, true) => {
                            kquants::q4k_rows_512::<BlockQ4K>(cast(data), nb, xs, t, o, out.ld)
                        }
                        (Format::Q4K, false) => {
                            kquants::q4k_rows_256::<BlockQ4K>(cast(data), nb, xs, t, o, out.ld)
                        }
                        (Format::Q5K, true) => {
                            kquants::q4k_rows_512::<BlockQ5K>(cast(data), nb, xs, t, o, out.ld)
                        }
                        (Format::Q5K, false) => {
                            kquants::q4k_rows_256::<BlockQ5K>(cast(data), nb, xs, t, o, out.ld)
                        }
                        (_, true) => kquants::q6k_rows_512(cast(data), nb, xs, t, o, out.ld),
                        (_, false) => kquants::q6k_rows_256(cast(data), nb, xs, t, o, out.ld),
                    }
                }
            });
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if x86::available()
            && matches!(self.format, Format::F16 | Format::BF16 | Format::F32)
            && self.cols.is_multiple_of(64)
        {
            use x86::floats::{self, BF16, F16, F32};
            use x86::kquants;
            let cols = self.cols;
            let wide = x86::avx512();
            let group = if wide {
                kquants::ROWS_512
            } else {
                kquants::ROWS_256
            };
            let data = self.rows_data(r0, r1);
            in_passes(n, group, |i, t| {
                let xs = &x[i * cols..(i + t) * cols];
                let o = out.at(i, r0);
                // SAFETY: as above; rows are a multiple of 64 values.
                unsafe {
                    match (self.format, wide) {
                        (Format::F16, true) => {
                            floats::rows_512::<F16>(data, cols, xs, t, o, out.ld)
                        }
                        (Format::F16, false) => {
                            floats::rows_256::<F16>(data, cols, xs, t, o, out.ld)
                        }
                        (Format::BF16, true) => {
                            floats::rows_512::<BF16>(data, cols, xs, t, o, out.ld)
                        }
                        (Format::BF16, false) => {
                            floats::rows_256::<BF16>(data, cols, xs, t, o, out.ld)
                        }
                        (_, true) => floats::rows_512::<F32>(data, cols, xs, t, o, out.ld),
                        (_, false) => floats::rows_256::<F32>(data, cols, xs, t, o, out.ld),
                    }
                }
            });
            return;
        }
        self.tile_band(r0, r1, x, n, out, &mut scratch.row_f32);
    }

    /// Weight rows `r0..r1` × `n` activation rows, the portable way: each weight row is
    /// dequantized once to f32 (into `row_f32`), then dotted with every activation row. A
    /// row's result does not depend on how many rows share the call.
    pub(super) fn tile_band(
        &self,
        r0: usize,
        r1: usize,
        x: &[f32],
        n: usize,
        out: Band,
        row_f32: &mut Vec<f32>,
    ) {
        let cols = self.cols;
        row_f32.resize(cols, 0.0);
        for r in r0..r1 {
            let w: &[f32] = if self.format == Format::F32 {
                cast(self.rows_data(r, r + 1))
            } else {
                self.row(r, row_f32);
                row_f32
            };
            for i in 0..n {
                // SAFETY: column r of the band is this work item's.
                unsafe { out.set(i, r, scalar::dot(w, &x[i * cols..(i + 1) * cols])) };
            }
        }
    }
}
