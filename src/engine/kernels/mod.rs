//! Matrix products of quantized weights with f32 activations, for the CPU path.
//!
//! Why not candle's quantized matmul: it quantizes the activations to 8 bits per block of
//! 32 before the dot product. SmolLM2 has "massive activations" (single values in the tens
//! of thousands), and a block that holds one loses every other value in it; stacked over
//! 30 layers this turns the answer into nonsense (measured: "The capital of France is
//! Paris." with f32 activations, French gibberish with 8-bit ones). Here the weights are
//! dequantized on the fly and multiplied with the activations as they are.
//!
//! Speed: decoding is memory-bound, so keeping the weights 4-bit (Q4_1: 20 bytes per 32)
//! is what makes it fast; the AVX2/FMA kernels (chosen at run time, with a scalar fallback)
//! keep the arithmetic below the memory time. Prompt processing is compute-bound instead:
//! there each panel of weight rows is dequantized once to f32 and multiplied with many
//! activation rows by a register-blocked kernel. Weight rows are spread over the CPU cores
//! by the engine's thread team.
//!
//! Where things are:
//! - [`formats`]: the GGML block layouts and their scalar dequantization;
//! - [`decode`]: generated-token rows (matrix × few vectors, memory-bound);
//! - [`prompt`]: prompt chunks (matrix × matrix, compute-bound, panels of f32 weights);
//! - [`attention`]: one KV head's attention over a cache, vectorised or portable;
//! - [`scalar`]: the portable fallback of each product; `x86`: AVX2 and AVX-512 kernels,
//!   picked at run time.

mod attention;
mod decode;
pub mod formats;
mod prompt;
mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;

use super::team::Team;
use super::EngineError;

pub use attention::attend;
use formats::{quantize_q8_0, read_blocks, BlockQ4_1, BlockQ8_0};
use prompt::{PanelScratch, PANEL};

/// Values per quantization block (the 32-wide GGML formats).
pub(crate) const QK: usize = 32;

/// Weight rows per claimed chunk of a product: about eight chunks per thread (enough for one
/// thread to take over a stalled one's share), a multiple of [`PANEL`] (the prompt kernel's
/// panels stay whole) and at least 64 rows (so claiming stays cheap against the work).
fn chunk_rows(rows: usize, threads: usize) -> usize {
    let per = rows.div_ceil(threads.max(1) * 8);
    per.max(64).next_multiple_of(PANEL)
}

/// What the activation rows of a product are, which decides the arithmetic. It is chosen
/// by what a row *is*, never by how many rows share the call, so that a sequence's results
/// are the same bit for bit whether it ran alone or batched with others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rows {
    /// One generated token per sequence: memory-bound, so the matrix-vector kernels, with
    /// the weights read once for several sequences.
    Generated,
    /// Prompt chunks: compute-bound, so each panel of weights is dequantized once to f32
    /// and multiplied with many rows by a register-blocked kernel.
    Prompt,
}

/// An output buffer shared by the team; each thread writes its own disjoint cells.
pub(super) struct SyncPtr(pub(super) *mut f32);
// SAFETY: see the writes in `QMat::matmul` and `CpuLlama::attention`: every cell is
// written by exactly one thread.
unsafe impl Sync for SyncPtr {}

/// A weight matrix of `rows` outputs by `cols` inputs, row-major in blocks of 32.
pub enum QMat {
    Q4_1 {
        blocks: Vec<BlockQ4_1>,
        rows: usize,
        cols: usize,
    },
    Q8_0 {
        blocks: Vec<BlockQ8_0>,
        rows: usize,
        cols: usize,
    },
    F32 {
        data: Vec<f32>,
        rows: usize,
        cols: usize,
    },
}
/// The storage of matrices of one format, end to end (`stack` checked the formats match).
fn concat<T>(parts: Vec<QMat>, storage: impl Fn(QMat) -> Option<Vec<T>>) -> Vec<T> {
    parts.into_iter().filter_map(storage).flatten().collect()
}

impl QMat {
    /// Takes a GGUF tensor as is when a kernel exists for its format (Q4_1, Q8_0, F32),
    /// else converts it to Q8_0 (or F32 when its rows are not whole blocks).
    pub fn from_qtensor(t: &QTensor) -> Result<QMat, EngineError> {
        let dims = t.shape().dims();
        let (rows, cols) = match dims {
            [r, c] => (*r, *c),
            [c] => (1, *c),
            _ => {
                return Err(EngineError::Model(format!(
                    "expected a matrix, got shape {dims:?}"
                )))
            }
        };
        let err = |e: candle_core::Error| EngineError::Model(e.to_string());
        match t.dtype() {
            GgmlDType::Q4_1 => {
                let bytes = t.data().map_err(err)?;
                let blocks = read_blocks::<_, 20>(&bytes, |b| BlockQ4_1 {
                    d: f16::from_le_bytes([b[0], b[1]]),
                    m: f16::from_le_bytes([b[2], b[3]]),
                    qs: b[4..20].try_into().expect("16 bytes"),
                });
                Ok(QMat::Q4_1 { blocks, rows, cols })
            }
            GgmlDType::Q8_0 => {
                let bytes = t.data().map_err(err)?;
                let blocks = read_blocks::<_, 34>(&bytes, |b| BlockQ8_0 {
                    d: f16::from_le_bytes([b[0], b[1]]),
                    qs: std::array::from_fn(|i| b[2 + i] as i8),
                });
                Ok(QMat::Q8_0 { blocks, rows, cols })
            }
            _ => {
                let data: Vec<f32> = t
                    .dequantize(&candle_core::Device::Cpu)
                    .and_then(|x| x.flatten_all())
                    .and_then(|x| x.to_vec1())
                    .map_err(err)?;
                if cols % QK == 0 && t.dtype() != GgmlDType::F32 {
                    Ok(QMat::Q8_0 {
                        blocks: quantize_q8_0(&data),
                        rows,
                        cols,
                    })
                } else {
                    Ok(QMat::F32 { data, rows, cols })
                }
            }
        }
    }

    /// Stacks matrices with the same input width and format into one, so that several
    /// projections of the same input cost one pass (and one round of thread wake-ups).
    pub fn stack(parts: Vec<QMat>) -> Result<QMat, Vec<QMat>> {
        let cols = parts.first().map(QMat::cols).unwrap_or(0);
        let same_format =
            |a: &QMat, b: &QMat| std::mem::discriminant(a) == std::mem::discriminant(b);
        if parts.is_empty()
            || parts
                .iter()
                .any(|p| p.cols() != cols || !same_format(p, &parts[0]))
        {
            return Err(parts);
        }
        let rows = parts.iter().map(QMat::rows).sum();
        Ok(match &parts[0] {
            QMat::Q4_1 { .. } => QMat::Q4_1 {
                blocks: concat(parts, |p| match p {
                    QMat::Q4_1 { blocks, .. } => Some(blocks),
                    _ => None,
                }),
                rows,
                cols,
            },
            QMat::Q8_0 { .. } => QMat::Q8_0 {
                blocks: concat(parts, |p| match p {
                    QMat::Q8_0 { blocks, .. } => Some(blocks),
                    _ => None,
                }),
                rows,
                cols,
            },
            QMat::F32 { .. } => QMat::F32 {
                data: concat(parts, |p| match p {
                    QMat::F32 { data, .. } => Some(data),
                    _ => None,
                }),
                rows,
                cols,
            },
        })
    }

    pub fn rows(&self) -> usize {
        match self {
            QMat::Q4_1 { rows, .. } | QMat::Q8_0 { rows, .. } | QMat::F32 { rows, .. } => *rows,
        }
    }

    pub fn cols(&self) -> usize {
        match self {
            QMat::Q4_1 { cols, .. } | QMat::Q8_0 { cols, .. } | QMat::F32 { cols, .. } => *cols,
        }
    }

    /// Bytes the weights take.
    pub fn bytes(&self) -> usize {
        match self {
            QMat::Q4_1 { blocks, .. } => blocks.len() * 20,
            QMat::Q8_0 { blocks, .. } => blocks.len() * 34,
            QMat::F32 { data, .. } => data.len() * 4,
        }
    }

    /// Row `r` as f32 (embedding lookup).
    pub fn row(&self, r: usize, out: &mut [f32]) {
        let cols = self.cols();
        match self {
            QMat::Q4_1 { blocks, .. } => {
                let nb = cols / QK;
                #[cfg(target_arch = "x86_64")]
                if x86::available() {
                    // SAFETY: AVX2 and F16C are present (checked at run time); `out` holds
                    // at least `cols` values (a whole row of blocks).
                    unsafe { x86::avx2::q4_1_row(&blocks[r * nb..(r + 1) * nb], &mut out[..cols]) };
                    return;
                }
                for (b, o) in blocks[r * nb..(r + 1) * nb]
                    .iter()
                    .zip(out.chunks_exact_mut(QK))
                {
                    let (d, m) = (b.d.to_f32(), b.m.to_f32());
                    for j in 0..16 {
                        o[j] = d * (b.qs[j] & 0x0F) as f32 + m;
                        o[j + 16] = d * (b.qs[j] >> 4) as f32 + m;
                    }
                }
            }
            QMat::Q8_0 { blocks, .. } => {
                let nb = cols / QK;
                for (b, o) in blocks[r * nb..(r + 1) * nb]
                    .iter()
                    .zip(out.chunks_exact_mut(QK))
                {
                    let d = b.d.to_f32();
                    for (v, &q) in o.iter_mut().zip(&b.qs) {
                        *v = d * q as f32;
                    }
                }
            }
            QMat::F32 { data, .. } => out[..cols].copy_from_slice(&data[r * cols..(r + 1) * cols]),
        }
    }

    /// `out[i][r] = Σ_c self[r][c] · x[i][c]` for `n` activation rows `x` (n × cols);
    /// `out` is n × rows. `rows_are` picks the arithmetic (see [`Rows`]).
    pub fn matmul(&self, x: &[f32], n: usize, out: &mut [f32], team: &Team, rows_are: Rows) {
        let (rows, cols) = (self.rows(), self.cols());
        debug_assert_eq!(x.len(), n * cols);
        debug_assert_eq!(out.len(), n * rows);
        if n == 0 {
            return;
        }
        // Threads claim chunks of weight rows (output columns), for all activation rows,
        // until none are left. Claimed, not split in fixed halves: on a busy machine (the
        // server's own runtime, a benchmark client) one team thread is sometimes taken off
        // its core, and the others then do its share instead of waiting for it. Small
        // chunks also keep a chunk's weights in cache while a second group of rows reads
        // them (`decode_band`).
        let chunk = chunk_rows(rows, team.size());
        let next = AtomicUsize::new(0);
        let out_ptr = SyncPtr(out.as_mut_ptr());
        team.run(&|_| {
            let mut scratch: Option<PanelScratch> = None;
            loop {
                let r0 = next.fetch_add(chunk, Ordering::Relaxed);
                if r0 >= rows {
                    return;
                }
                let r1 = (r0 + chunk).min(rows);
                match rows_are {
                    Rows::Generated => self.decode_band(r0, r1, x, n, &out_ptr),
                    Rows::Prompt => {
                        #[cfg(target_arch = "x86_64")]
                        if x86::available() {
                            let s = scratch.get_or_insert_with(|| PanelScratch::new(cols));
                            self.gemm_band(r0, r1, x, n, &out_ptr, s);
                            continue;
                        }
                        let _ = &mut scratch; // only the x86-64 kernel has a panel
                        self.tile_band(r0, r1, x, n, &out_ptr);
                    }
                }
            }
        });
    }
}

/// Test inputs shared by the kernels' tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use candle_core::{Device, Tensor};

    /// A `rows` × `cols` matrix of `dtype` with smooth pseudo-random values, and its
    /// dequantized values.
    pub fn matrix(rows: usize, cols: usize, dtype: GgmlDType) -> (QMat, Vec<f32>) {
        let data: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.3)
            .collect();
        let t = Tensor::from_vec(data, (rows, cols), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, dtype).unwrap();
        let deq: Vec<f32> = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        (QMat::from_qtensor(&q).unwrap(), deq)
    }

    /// `x · wᵀ` in plain f32 arithmetic.
    pub fn reference(w: &[f32], x: &[f32], rows: usize, cols: usize, n: usize) -> Vec<f32> {
        let mut out = vec![0f32; n * rows];
        for i in 0..n {
            for r in 0..rows {
                out[i * rows + r] = (0..cols).map(|c| w[r * cols + c] * x[i * cols + c]).sum();
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{matrix, reference};
    use super::*;

    #[test]
    fn kernels_match_dequantized_reference() {
        for dtype in [
            GgmlDType::Q4_1,
            GgmlDType::Q8_0,
            GgmlDType::Q4_0,
            GgmlDType::F32,
        ] {
            let (rows, cols) = (150, 96); // three chunks of rows, the last partial
            let (m, w) = matrix(rows, cols, dtype);
            for n in [1, 3, 4, 9, 17] {
                // Activations with a "massive" outlier, as the model has.
                let mut x: Vec<f32> = (0..n * cols)
                    .map(|i| ((i * 31 % 17) as f32 - 8.0) * 0.1)
                    .collect();
                x[5] = 3000.0;
                let want = reference(&w, &x, rows, cols, n);
                for kind in [Rows::Generated, Rows::Prompt] {
                    let mut out = vec![0f32; n * rows];
                    m.matmul(&x, n, &mut out, &Team::new(2), kind);
                    for (a, b) in out.iter().zip(&want) {
                        // Q4_0 is converted to Q8_0, close to but not exactly the source.
                        let tol = if dtype == GgmlDType::Q4_0 { 20.0 } else { 1e-2 };
                        assert!(
                            (a - b).abs() <= tol * (1.0 + b.abs() * 1e-3),
                            "{dtype:?} {kind:?} n={n}: {a} vs {b}"
                        );
                    }
                }
            }
            let mut row = vec![0f32; cols];
            m.row(3, &mut row);
            if dtype != GgmlDType::Q4_0 {
                assert_eq!(row, w[3 * cols..4 * cols]);
            }
        }
    }

    /// A row's result must not depend on how many rows share the call (continuous
    /// batching relies on it: a sequence decodes the same alone or batched), bit for bit.
    #[test]
    fn a_rows_result_does_not_depend_on_its_batch() {
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::F32] {
            let (rows, cols) = (40, 128);
            let (m, _) = matrix(rows, cols, dtype);
            let n = 13;
            let mut x: Vec<f32> = (0..n * cols).map(|i| (i as f32 * 0.37).sin()).collect();
            x[7] = 2500.0;
            for kind in [Rows::Generated, Rows::Prompt] {
                let mut all = vec![0f32; n * rows];
                m.matmul(&x, n, &mut all, &Team::new(2), kind);
                for i in 0..n {
                    for take in [1, 2, 5] {
                        let k = take.min(n - i);
                        let mut some = vec![0f32; k * rows];
                        m.matmul(
                            &x[i * cols..(i + k) * cols],
                            k,
                            &mut some,
                            &Team::new(1),
                            kind,
                        );
                        assert_eq!(
                            some[..rows].iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                            all[i * rows..(i + 1) * rows]
                                .iter()
                                .map(|v| v.to_bits())
                                .collect::<Vec<_>>(),
                            "{dtype:?} {kind:?}: row {i} alone vs in {n} rows"
                        );
                    }
                }
            }
        }
    }
}
