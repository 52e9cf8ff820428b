//! Products for generated-token rows (one per sequence): memory-bound, so each weight block is
//! read once for several rows, and each row gets exactly the arithmetic it gets alone.

#[cfg(target_arch = "x86_64")]
use super::x86;
use super::{scalar, QMat, SyncPtr, QK};

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

impl QMat {
    /// Weight rows `r0..r1` × `n` generated-token rows with the matrix-vector kernels:
    /// memory-bound, so each weight block is read once for up to [`MAX_SHARED`] (AVX2) or
    /// [`shared_512`] (AVX-512) activation rows, and each row gets exactly the arithmetic it
    /// gets alone.
    pub(super) fn decode_band(&self, r0: usize, r1: usize, x: &[f32], n: usize, out: &SyncPtr) {
        let (rows, cols) = (self.rows(), self.cols());
        #[cfg(target_arch = "x86_64")]
        if x86::available() && !matches!(self, QMat::F32 { .. }) {
            let nb = cols / QK;
            let wide = x86::avx512();
            let group = if wide { shared_512(cols) } else { MAX_SHARED };
            let mut i = 0;
            while i < n {
                let t = (n - i).min(group);
                let xs = &x[i * cols..(i + t) * cols];
                // SAFETY: the instruction sets are present (checked at run time); the
                // blocks are rows r0..r1, `xs` holds t rows of `cols`, and the cells written
                // (rows i..i+t, columns r0..r1 of `out`) are in the chunk this thread claimed.
                unsafe {
                    let o = out.0.add(i * rows + r0);
                    match self {
                        QMat::Q4_1 { blocks, .. } if wide => x86::avx512::q4_1_rows_512(
                            &blocks[r0 * nb..r1 * nb],
                            nb,
                            xs,
                            t,
                            o,
                            rows,
                        ),
                        QMat::Q4_1 { blocks, .. } => {
                            x86::avx2::q4_1_rows(&blocks[r0 * nb..r1 * nb], nb, xs, t, o, rows)
                        }
                        QMat::Q8_0 { blocks, .. } if wide => x86::avx512::q8_0_rows_512(
                            &blocks[r0 * nb..r1 * nb],
                            nb,
                            xs,
                            t,
                            o,
                            rows,
                        ),
                        QMat::Q8_0 { blocks, .. } => {
                            x86::avx2::q8_0_rows(&blocks[r0 * nb..r1 * nb], nb, xs, t, o, rows)
                        }
                        QMat::F32 { .. } => unreachable!("F32 takes the tile kernel"),
                    }
                }
                i += t;
            }
            return;
        }
        self.tile_band(r0, r1, x, n, out);
    }

    /// Weight rows `r0..r1` × `n` activation rows, four at a time (so each weight row is
    /// dequantized once per four); the portable path, and F32 weights' only one. A row's
    /// result does not depend on how many share its tile.
    pub(super) fn tile_band(&self, r0: usize, r1: usize, x: &[f32], n: usize, out: &SyncPtr) {
        let (rows, cols) = (self.rows(), self.cols());
        let mut i = 0;
        while i < n {
            let t = (n - i).min(4);
            for r in r0..r1 {
                let mut acc = [0f32; 4];
                self.dot_tile(r, &x[i * cols..(i + t) * cols], t, &mut acc);
                for (k, a) in acc[..t].iter().enumerate() {
                    // SAFETY: column r belongs to the chunk this thread claimed.
                    unsafe { *out.0.add((i + k) * rows + r) = *a };
                }
            }
            i += t;
        }
    }

    /// Dot products of weight row `r` with `t` (1..=4) activation rows packed in `x`.
    pub(super) fn dot_tile(&self, r: usize, x: &[f32], t: usize, acc: &mut [f32; 4]) {
        let cols = self.cols();
        match self {
            QMat::Q4_1 { blocks, .. } => {
                let nb = cols / QK;
                let row = &blocks[r * nb..(r + 1) * nb];
                #[cfg(target_arch = "x86_64")]
                if x86::available() {
                    // SAFETY: the CPU supports AVX2, FMA and F16C (checked at run time), and the
                    // slices hold `t` rows of `cols` values each.
                    unsafe { x86::avx2::q4_1_tile(row, x, cols, t, acc) };
                    return;
                }
                scalar::q4_1_tile(row, x, cols, t, acc);
            }
            QMat::Q8_0 { blocks, .. } => {
                let nb = cols / QK;
                let row = &blocks[r * nb..(r + 1) * nb];
                #[cfg(target_arch = "x86_64")]
                if x86::available() {
                    // SAFETY: as above.
                    unsafe { x86::avx2::q8_0_tile(row, x, cols, t, acc) };
                    return;
                }
                scalar::q8_0_tile(row, x, cols, t, acc);
            }
            QMat::F32 { data, .. } => {
                let w = &data[r * cols..(r + 1) * cols];
                for (k, a) in acc[..t].iter_mut().enumerate() {
                    *a = w
                        .iter()
                        .zip(&x[k * cols..(k + 1) * cols])
                        .map(|(a, b)| a * b)
                        .sum();
                }
            }
        }
    }
}
