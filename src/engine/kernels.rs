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

use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;

use std::sync::atomic::{AtomicUsize, Ordering};

use super::team::Team;

use super::EngineError;

const QK: usize = 32;

/// Weight rows per panel of the prompt-processing kernel (two AVX vectors).
const PANEL: usize = 16;
/// Activation rows per call of that kernel: 6 × 2 accumulators + 2 weights + 1 broadcast
/// fill 15 of the 16 AVX registers.
const MR: usize = 6;
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

/// Weight rows per claimed chunk of a product: about eight chunks per thread (enough for one
/// thread to take over a stalled one's share), a multiple of [`PANEL`] (the prompt kernel's
/// panels stay whole) and at least 64 rows (so claiming stays cheap against the work).
fn chunk_rows(rows: usize, threads: usize) -> usize {
    let per = rows.div_ceil(threads.max(1) * 8);
    per.max(64).next_multiple_of(PANEL)
}

/// Per-thread buffers of the prompt kernel, made once per product and reused for each chunk.
struct PanelScratch {
    /// A panel of weight rows as f32, column-major (`cols` × [`PANEL`]).
    panel: Vec<f32>,
    /// The same rows row-major, before they are transposed into `panel`.
    rows_f32: Vec<f32>,
}

impl PanelScratch {
    fn new(cols: usize) -> PanelScratch {
        PanelScratch {
            panel: vec![0f32; cols * PANEL],
            rows_f32: vec![0f32; PANEL * cols],
        }
    }
}

/// Attention of the `group` query heads `q` (group × 64) sharing one KV head over `len`
/// positions of `keys` and `values` (len × 64), into `out` (group × 64), with the AVX-512
/// kernel. False when that kernel does not apply (no AVX-512, head size not 64, more than
/// four heads per KV head): the caller then takes the portable loop. Whether it applies
/// depends only on the model and the machine, so every row of a run takes the same path.
#[allow(clippy::too_many_arguments)]
pub fn attend_64(
    q: &[f32],
    group: usize,
    keys: &[f32],
    values: &[f32],
    len: usize,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    if simd::avx512() && q.len() == group * 64 && out.len() == group * 64 {
        if keys.len() < len * 64 || values.len() < len * 64 {
            return false;
        }
        // SAFETY: AVX-512 is present (checked at run time); the lengths are checked above.
        unsafe {
            match group {
                1 => simd::attend_64::<1>(q, keys, values, len, scale, scores, out),
                2 => simd::attend_64::<2>(q, keys, values, len, scale, scores, out),
                3 => simd::attend_64::<3>(q, keys, values, len, scale, scores, out),
                4 => simd::attend_64::<4>(q, keys, values, len, scale, scores, out),
                _ => return false,
            }
        }
        return true;
    }
    let _ = (q, group, keys, values, len, scale, scores, out);
    false
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

/// GGML Q4_1 block: `x = d * q + m`, q in 0..16; `qs[j]` holds element j in its low
/// nibble and element j + 16 in its high nibble.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct BlockQ4_1 {
    d: f16,
    m: f16,
    qs: [u8; 16],
}

/// GGML Q8_0 block: `x = d * q`, q in -127..=127.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct BlockQ8_0 {
    d: f16,
    qs: [i8; 32],
}

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

fn read_blocks<T: Copy, const N: usize>(bytes: &[u8], decode: impl Fn(&[u8; N]) -> T) -> Vec<T> {
    bytes
        .chunks_exact(N)
        .map(|c| decode(c.try_into().expect("exact chunk")))
        .collect()
}

/// Quantizes f32 rows to Q8_0 (for weights stored in formats without a kernel here).
fn quantize_q8_0(data: &[f32]) -> Vec<BlockQ8_0> {
    data.chunks_exact(QK)
        .map(|c| {
            let amax = c.iter().fold(0f32, |a, &v| a.max(v.abs()));
            let d = amax / 127.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            let mut qs = [0i8; 32];
            for (q, &v) in qs.iter_mut().zip(c) {
                *q = (v * id).round() as i8;
            }
            BlockQ8_0 {
                d: f16::from_f32(d),
                qs,
            }
        })
        .collect()
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
                if simd::available() {
                    // SAFETY: AVX2 and F16C are present (checked at run time); `out` holds
                    // at least `cols` values (a whole row of blocks).
                    unsafe { simd::q4_1_row(&blocks[r * nb..(r + 1) * nb], &mut out[..cols]) };
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
                        if simd::available() {
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

    /// Weight rows `r0..r1` × `n` generated-token rows with the matrix-vector kernels:
    /// memory-bound, so each weight block is read once for up to [`MAX_SHARED`] (AVX2) or
    /// [`shared_512`] (AVX-512) activation rows, and each row gets exactly the arithmetic it
    /// gets alone.
    fn decode_band(&self, r0: usize, r1: usize, x: &[f32], n: usize, out: &SyncPtr) {
        let (rows, cols) = (self.rows(), self.cols());
        #[cfg(target_arch = "x86_64")]
        if simd::available() && !matches!(self, QMat::F32 { .. }) {
            let nb = cols / QK;
            let wide = simd::avx512();
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
                        QMat::Q4_1 { blocks, .. } if wide => {
                            simd::q4_1_rows_512(&blocks[r0 * nb..r1 * nb], nb, xs, t, o, rows)
                        }
                        QMat::Q4_1 { blocks, .. } => {
                            simd::q4_1_rows(&blocks[r0 * nb..r1 * nb], nb, xs, t, o, rows)
                        }
                        QMat::Q8_0 { blocks, .. } if wide => {
                            simd::q8_0_rows_512(&blocks[r0 * nb..r1 * nb], nb, xs, t, o, rows)
                        }
                        QMat::Q8_0 { blocks, .. } => {
                            simd::q8_0_rows(&blocks[r0 * nb..r1 * nb], nb, xs, t, o, rows)
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
    fn tile_band(&self, r0: usize, r1: usize, x: &[f32], n: usize, out: &SyncPtr) {
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

    /// Weight rows `r0..r1` × all `n` activation rows, for prompt processing: the weights
    /// are dequantized one panel of [`PANEL`] rows at a time into a column-major f32 buffer,
    /// then a register-blocked kernel multiplies it with [`MR`] activation rows at a time.
    /// Dequantizing once per panel (instead of once per four activation rows, as the tile
    /// kernel does) leaves almost only FMAs in the inner loop.
    #[cfg(target_arch = "x86_64")]
    fn gemm_band(
        &self,
        r0: usize,
        r1: usize,
        x: &[f32],
        n: usize,
        out: &SyncPtr,
        scratch: &mut PanelScratch,
    ) {
        let (rows, cols) = (self.rows(), self.cols());
        let PanelScratch { panel, rows_f32 } = scratch;
        debug_assert_eq!(panel.len(), cols * PANEL);
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
                unsafe { simd::transpose_panel(rows_f32, cols, panel) };
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
                    unsafe { simd::gemm_tile(m, panel, xs, cols, out.0.add(i * rows + p0), rows) };
                } else {
                    // SAFETY: as above, into a local buffer; only `width` columns are copied.
                    unsafe { simd::gemm_tile(m, panel, xs, cols, spill.as_mut_ptr(), PANEL) };
                    for k in 0..m {
                        for j in 0..width {
                            // SAFETY: cell (i + k, p0 + j) is in the chunk this thread claimed.
                            unsafe { *out.0.add((i + k) * rows + p0 + j) = spill[k * PANEL + j] };
                        }
                    }
                }
                i += m;
            }
            p0 += width;
        }
    }

    /// Dot products of weight row `r` with `t` (1..=4) activation rows packed in `x`.
    fn dot_tile(&self, r: usize, x: &[f32], t: usize, acc: &mut [f32; 4]) {
        let cols = self.cols();
        match self {
            QMat::Q4_1 { blocks, .. } => {
                let nb = cols / QK;
                let row = &blocks[r * nb..(r + 1) * nb];
                #[cfg(target_arch = "x86_64")]
                if simd::available() {
                    // SAFETY: the CPU supports AVX2, FMA and F16C (checked at run time), and the
                    // slices hold `t` rows of `cols` values each.
                    unsafe { simd::q4_1_tile(row, x, cols, t, acc) };
                    return;
                }
                scalar::q4_1_tile(row, x, cols, t, acc);
            }
            QMat::Q8_0 { blocks, .. } => {
                let nb = cols / QK;
                let row = &blocks[r * nb..(r + 1) * nb];
                #[cfg(target_arch = "x86_64")]
                if simd::available() {
                    // SAFETY: as above.
                    unsafe { simd::q8_0_tile(row, x, cols, t, acc) };
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

mod scalar {
    use super::{BlockQ4_1, BlockQ8_0, QK};

    pub fn q4_1_tile(row: &[BlockQ4_1], x: &[f32], cols: usize, t: usize, acc: &mut [f32; 4]) {
        for (bi, b) in row.iter().enumerate() {
            let (d, m) = (b.d.to_f32(), b.m.to_f32());
            let mut w = [0f32; 32];
            for j in 0..16 {
                w[j] = d * (b.qs[j] & 0x0F) as f32 + m;
                w[j + 16] = d * (b.qs[j] >> 4) as f32 + m;
            }
            for (k, a) in acc[..t].iter_mut().enumerate() {
                let xs = &x[k * cols + bi * QK..k * cols + (bi + 1) * QK];
                *a += w.iter().zip(xs).map(|(w, x)| w * x).sum::<f32>();
            }
        }
    }

    pub fn q8_0_tile(row: &[BlockQ8_0], x: &[f32], cols: usize, t: usize, acc: &mut [f32; 4]) {
        for (bi, b) in row.iter().enumerate() {
            let d = b.d.to_f32();
            for (k, a) in acc[..t].iter_mut().enumerate() {
                let xs = &x[k * cols + bi * QK..k * cols + (bi + 1) * QK];
                *a += d * b.qs.iter().zip(xs).map(|(&q, x)| q as f32 * x).sum::<f32>();
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;
    use std::sync::OnceLock;

    use super::{BlockQ4_1, BlockQ8_0, PANEL, QK};

    /// Calls `f::<T>(args)` for the run-time row count `t`, one arm per listed count and
    /// `last` for the rest, so each kernel's accumulators are a fixed-size array in registers.
    macro_rules! by_rows {
        ($t:expr, [$($n:literal),*], $last:literal, $f:ident $args:tt) => {
            match $t {
                $($n => $f::<$n> $args,)*
                _ => $f::<$last> $args,
            }
        };
    }

    /// Blocks per row the Q4_1 kernel keeps `Σ x` for on the stack (16384 values).
    const XSUM_BLOCKS: usize = 512;

    pub fn available() -> bool {
        static OK: OnceLock<bool> = OnceLock::new();
        *OK.get_or_init(|| {
            is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        })
    }

    /// AVX-512 for the matrix-vector kernels. Chosen once per process, so every product of
    /// a run takes the same arithmetic (a sequence's tokens must not depend on batching).
    pub fn avx512() -> bool {
        static OK: OnceLock<bool> = OnceLock::new();
        *OK.get_or_init(|| {
            available()
                && is_x86_feature_detected!("avx512f")
                && std::env::var_os("CONFAB_NO_AVX512").is_none()
        })
    }

    /// `sc[i] = exp(sc[i] - max(sc))`, sixteen at a time; returns their sum. (The scalar
    /// `exp` per score was a quarter of the attention time.)
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub unsafe fn softmax_weights_512(sc: &mut [f32]) -> f32 {
        let (p, len) = (sc.as_mut_ptr(), sc.len());
        let tail = (len % 16) as u32;
        let tail_mask: __mmask16 = ((1u32 << tail) - 1) as __mmask16;
        let mut maxv = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut i = 0;
        while i + 16 <= len {
            maxv = _mm512_max_ps(maxv, _mm512_loadu_ps(p.add(i)));
            i += 16;
        }
        if tail > 0 {
            maxv = _mm512_mask_max_ps(
                maxv,
                tail_mask,
                maxv,
                _mm512_maskz_loadu_ps(tail_mask, p.add(i)),
            );
        }
        let max = _mm512_set1_ps(_mm512_reduce_max_ps(maxv));
        let mut sum = _mm512_setzero_ps();
        let mut i = 0;
        while i + 16 <= len {
            let e = exp512(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), max));
            _mm512_storeu_ps(p.add(i), e);
            sum = _mm512_add_ps(sum, e);
            i += 16;
        }
        if tail > 0 {
            let x = _mm512_maskz_loadu_ps(tail_mask, p.add(i));
            let e = _mm512_maskz_mov_ps(tail_mask, exp512(_mm512_sub_ps(x, max)));
            _mm512_mask_storeu_ps(p.add(i), tail_mask, e);
            sum = _mm512_add_ps(sum, e);
        }
        _mm512_reduce_add_ps(sum)
    }

    /// `exp(x)` for 16 lanes (Cephes' single-precision polynomial, within 2 ulp; results
    /// below `f32`'s range flush towards 0).
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub unsafe fn exp512(x: __m512) -> __m512 {
        let x = _mm512_min_ps(
            _mm512_max_ps(x, _mm512_set1_ps(-103.0)),
            _mm512_set1_ps(88.7),
        );
        // x = n ln2 + r, |r| <= ln2 / 2; ln2 in two parts so that r is exact.
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
        let mut y = _mm512_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            0.166_666_65,
            0.5,
        ] {
            y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(c));
        }
        y = _mm512_fmadd_ps(
            y,
            _mm512_mul_ps(r, r),
            _mm512_add_ps(r, _mm512_set1_ps(1.0)),
        );
        _mm512_scalef_ps(y, n)
    }

    /// The 64 values at `p` as four vectors (one head's query, key or value row).
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn load64(p: *const f32) -> [__m512; 4] {
        [
            _mm512_loadu_ps(p),
            _mm512_loadu_ps(p.add(16)),
            _mm512_loadu_ps(p.add(32)),
            _mm512_loadu_ps(p.add(48)),
        ]
    }

    /// Lane-wise products of two 64-value rows summed into one vector (its 16 lanes add up
    /// to the dot product): the one score arithmetic for whole blocks and the tail alike.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn dot64(q: &[__m512; 4], k: &[__m512; 4]) -> __m512 {
        let mut acc = _mm512_mul_ps(q[0], k[0]);
        acc = _mm512_fmadd_ps(q[1], k[1], acc);
        acc = _mm512_fmadd_ps(q[2], k[2], acc);
        _mm512_fmadd_ps(q[3], k[3], acc)
    }

    /// Lane j of the result = the sum of the 16 lanes of `v[j]`: a transpose-and-add tree
    /// (15 shuffles and adds per level pair) instead of 16 horizontal sums.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn sum16(v: &[__m512; 16]) -> __m512 {
        // Level 1, pairs (a, b): each 128-bit lane holds [a0+a2, b0+b2, a1+a3, b1+b3].
        let mut l1 = [_mm512_setzero_ps(); 8];
        for (i, o) in l1.iter_mut().enumerate() {
            let (a, b) = (v[2 * i], v[2 * i + 1]);
            *o = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
        }
        // Level 2, four vectors (a, b, c, d): each 128-bit lane holds that lane's sums
        // [a, b, c, d].
        let mut l2 = [_mm512_setzero_ps(); 4];
        for (i, o) in l2.iter_mut().enumerate() {
            let (x, y) = (_mm512_castps_pd(l1[2 * i]), _mm512_castps_pd(l1[2 * i + 1]));
            *o = _mm512_add_ps(
                _mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)),
            );
        }
        // Level 3: lanes (0+1) and (2+3) of two groups of four, side by side.
        let mut l3 = [_mm512_setzero_ps(); 2];
        for (i, o) in l3.iter_mut().enumerate() {
            let (u, w) = (l2[2 * i], l2[2 * i + 1]);
            *o = _mm512_add_ps(
                _mm512_shuffle_f32x4::<0x88>(u, w),
                _mm512_shuffle_f32x4::<0xDD>(u, w),
            );
        }
        // Level 4: whole sums, group g (vectors 4g..4g+4) in 128-bit lane g.
        _mm512_add_ps(
            _mm512_shuffle_f32x4::<0x88>(l3[0], l3[1]),
            _mm512_shuffle_f32x4::<0xDD>(l3[0], l3[1]),
        )
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn hsum512(v: __m512) -> f32 {
        let lo = _mm512_castps512_ps256(v);
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
        hsum(_mm256_add_ps(lo, hi))
    }

    /// [`q4_1_rows`] with 512-bit vectors: a block's 32 weights are dequantized once into
    /// two vectors (`d q + m`) and multiplied with every activation row; with 32 registers
    /// that is cheaper than the `Σx` trick of the AVX2 kernel (no scalar work per block).
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub unsafe fn q4_1_rows_512(
        blocks: &[BlockQ4_1],
        nb: usize,
        x: &[f32],
        t: usize,
        out: *mut f32,
        ld: usize,
    ) {
        by_rows!(
            t,
            [1, 2, 3, 4, 5, 6, 7],
            8,
            q4_1_rows_512_t(blocks, nb, x, out, ld)
        )
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn q4_1_rows_512_t<const T: usize>(
        blocks: &[BlockQ4_1],
        nb: usize,
        x: &[f32],
        out: *mut f32,
        ld: usize,
    ) {
        let cols = nb * QK;
        let n_rows = blocks.len() / nb;
        let xp = x.as_ptr();
        let mask = _mm_set1_epi8(0x0F);
        for r in 0..n_rows {
            let row = blocks.as_ptr().add(r * nb);
            // Two accumulators per row (first and second half of each block), so the FMAs
            // of one row do not wait on each other.
            let mut acc = [[_mm512_setzero_ps(); 2]; T];
            for b in 0..nb {
                let blk = &*row.add(b);
                let raw = _mm_loadu_si128(blk.qs.as_ptr() as *const __m128i);
                let lo = _mm_and_si128(raw, mask);
                let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
                let d = _mm512_set1_ps(f16_to_f32(blk.d));
                let m = _mm512_set1_ps(f16_to_f32(blk.m));
                // The block's 32 weights, `d q + m`, as two vectors shared by all T rows.
                let w0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), d, m);
                let w1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), d, m);
                for (k, a) in acc.iter_mut().enumerate() {
                    let p = xp.add(k * cols + b * QK);
                    a[0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(p), a[0]);
                    a[1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(p.add(16)), a[1]);
                }
            }
            for (k, a) in acc.iter().enumerate() {
                *out.add(k * ld + r) = hsum512(_mm512_add_ps(a[0], a[1]));
            }
        }
    }

    /// [`q8_0_rows`] with 512-bit vectors.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub unsafe fn q8_0_rows_512(
        blocks: &[BlockQ8_0],
        nb: usize,
        x: &[f32],
        t: usize,
        out: *mut f32,
        ld: usize,
    ) {
        by_rows!(
            t,
            [1, 2, 3, 4, 5, 6, 7],
            8,
            q8_0_rows_512_t(blocks, nb, x, out, ld)
        )
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn q8_0_rows_512_t<const T: usize>(
        blocks: &[BlockQ8_0],
        nb: usize,
        x: &[f32],
        out: *mut f32,
        ld: usize,
    ) {
        let cols = nb * QK;
        let n_rows = blocks.len() / nb;
        let xp = x.as_ptr();
        for r in 0..n_rows {
            let row = blocks.as_ptr().add(r * nb);
            let mut acc = [_mm512_setzero_ps(); T];
            for b in 0..nb {
                let blk = &*row.add(b);
                let q = blk.qs.as_ptr() as *const __m128i;
                let q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q)));
                let q1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q.add(1))));
                let d = _mm512_set1_ps(f16_to_f32(blk.d));
                for (k, a) in acc.iter_mut().enumerate() {
                    let p = xp.add(k * cols + b * QK);
                    let s = _mm512_mul_ps(q0, _mm512_loadu_ps(p));
                    let s = _mm512_fmadd_ps(q1, _mm512_loadu_ps(p.add(16)), s);
                    *a = _mm512_fmadd_ps(s, d, *a);
                }
            }
            for (k, a) in acc.iter().enumerate() {
                *out.add(k * ld + r) = hsum512(*a);
            }
        }
    }

    /// Attention of `G` query heads (`q`: G × 64) that share one KV head, over `len`
    /// cached positions (`keys`, `values`: len × 64 each, contiguous), into `out` (G × 64):
    /// scores, softmax, weighted sum of the values. Each query head's 64 values sit in four
    /// registers for the whole pass, and so do its 64 outputs: every key and value row is
    /// loaded once for the G heads and nothing else goes through memory.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub unsafe fn attend_64<const G: usize>(
        q: &[f32],
        keys: &[f32],
        values: &[f32],
        len: usize,
        scale: f32,
        scores: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        debug_assert!(q.len() == G * 64 && out.len() == G * 64);
        debug_assert!(keys.len() >= len * 64 && values.len() >= len * 64);
        let (qp, kp, vp) = (q.as_ptr(), keys.as_ptr(), values.as_ptr());
        let mut qv = [[_mm512_setzero_ps(); 4]; G];
        for (g, qg) in qv.iter_mut().enumerate() {
            *qg = load64(qp.add(g * 64));
        }
        scores.clear();
        scores.resize(G * len, 0.0);
        let scale_v = _mm512_set1_ps(scale);
        // Sixteen positions at a time: their sixteen dot-product vectors are summed
        // together ([`sum16`]) instead of one horizontal sum each.
        let full = len - len % 16;
        for p in (0..full).step_by(16) {
            for (g, qg) in qv.iter().enumerate() {
                let mut accs = [_mm512_setzero_ps(); 16];
                for (j, acc) in accs.iter_mut().enumerate() {
                    *acc = dot64(qg, &load64(kp.add((p + j) * 64)));
                }
                let s = _mm512_mul_ps(sum16(&accs), scale_v);
                _mm512_storeu_ps(scores.as_mut_ptr().add(g * len + p), s);
            }
        }
        for p in full..len {
            let k = load64(kp.add(p * 64));
            for (g, qg) in qv.iter().enumerate() {
                *scores.get_unchecked_mut(g * len + p) = hsum512(dot64(qg, &k)) * scale;
            }
        }
        let mut sums = [0f32; G];
        for (sc, sum) in scores.chunks_exact_mut(len).zip(sums.iter_mut()) {
            *sum = softmax_weights_512(sc);
        }
        let mut ov = [[_mm512_setzero_ps(); 4]; G];
        for p in 0..len {
            let v = load64(vp.add(p * 64));
            for (g, og) in ov.iter_mut().enumerate() {
                let w = _mm512_set1_ps(*scores.get_unchecked(g * len + p) / sums[g]);
                for (o, vj) in og.iter_mut().zip(&v) {
                    *o = _mm512_fmadd_ps(w, *vj, *o);
                }
            }
        }
        let op = out.as_mut_ptr();
        for (g, og) in ov.iter().enumerate() {
            for (j, v) in og.iter().enumerate() {
                _mm512_storeu_ps(op.add(g * 64 + j * 16), *v);
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// `panel[c][j] = rows[j][c]` for PANEL rows of `cols` values (`cols` a multiple of 8),
    /// in 8 × 8 tiles transposed in registers.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn transpose_panel(rows: &[f32], cols: usize, panel: &mut [f32]) {
        debug_assert!(
            cols.is_multiple_of(8) && rows.len() >= PANEL * cols && panel.len() >= PANEL * cols
        );
        let (rp, pp) = (rows.as_ptr(), panel.as_mut_ptr());
        for j0 in (0..PANEL).step_by(8) {
            for c0 in (0..cols).step_by(8) {
                let r: [__m256; 8] =
                    std::array::from_fn(|k| _mm256_loadu_ps(rp.add((j0 + k) * cols + c0)));
                let t0 = _mm256_unpacklo_ps(r[0], r[1]);
                let t1 = _mm256_unpackhi_ps(r[0], r[1]);
                let t2 = _mm256_unpacklo_ps(r[2], r[3]);
                let t3 = _mm256_unpackhi_ps(r[2], r[3]);
                let t4 = _mm256_unpacklo_ps(r[4], r[5]);
                let t5 = _mm256_unpackhi_ps(r[4], r[5]);
                let t6 = _mm256_unpacklo_ps(r[6], r[7]);
                let t7 = _mm256_unpackhi_ps(r[6], r[7]);
                let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
                let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
                let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
                let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
                let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
                let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
                let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
                let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
                let cols_out = [
                    _mm256_permute2f128_ps::<0x20>(u0, u4),
                    _mm256_permute2f128_ps::<0x20>(u1, u5),
                    _mm256_permute2f128_ps::<0x20>(u2, u6),
                    _mm256_permute2f128_ps::<0x20>(u3, u7),
                    _mm256_permute2f128_ps::<0x31>(u0, u4),
                    _mm256_permute2f128_ps::<0x31>(u1, u5),
                    _mm256_permute2f128_ps::<0x31>(u2, u6),
                    _mm256_permute2f128_ps::<0x31>(u3, u7),
                ];
                for (c, v) in cols_out.into_iter().enumerate() {
                    _mm256_storeu_ps(pp.add((c0 + c) * PANEL + j0), v);
                }
            }
        }
    }

    /// One Q4_1 row as f32, `d q + m` (a multiply, then an add: the same values as the
    /// scalar code). The prompt kernel dequantizes every weight once per step this way, so
    /// for short prompt chunks this loop is most of the step.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q4_1_row(blocks: &[BlockQ4_1], out: &mut [f32]) {
        debug_assert!(out.len() >= blocks.len() * QK);
        let mask = _mm_set1_epi8(0x0F);
        let op = out.as_mut_ptr();
        for (b, blk) in blocks.iter().enumerate() {
            let raw = _mm_loadu_si128(blk.qs.as_ptr() as *const __m128i);
            let lo = _mm_and_si128(raw, mask);
            let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
            let d = _mm256_set1_ps(f16_to_f32(blk.d));
            let m = _mm256_set1_ps(f16_to_f32(blk.m));
            let o = op.add(b * QK);
            for (i, q) in [lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)]
                .into_iter()
                .enumerate()
            {
                let q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q));
                _mm256_storeu_ps(o.add(i * 8), _mm256_add_ps(_mm256_mul_ps(q, d), m));
            }
        }
    }

    /// `t` (1..=4) activation rows: dispatch to a version with the count fixed at compile
    /// time, so the accumulators live in registers.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q4_1_tile(
        row: &[BlockQ4_1],
        x: &[f32],
        cols: usize,
        t: usize,
        acc: &mut [f32; 4],
    ) {
        by_rows!(t, [1, 2, 3], 4, q4_1_t(row, x, cols, acc))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q8_0_tile(
        row: &[BlockQ8_0],
        x: &[f32],
        cols: usize,
        t: usize,
        acc: &mut [f32; 4],
    ) {
        by_rows!(t, [1, 2, 3], 4, q8_0_t(row, x, cols, acc))
    }

    /// Q4_1 weight rows × `t` (1..=MAX_SHARED) f32 rows `x`: `out[k * ld + r]` = weight row
    /// r · x row k. Dispatches to a version with `t` fixed at compile time, so the
    /// accumulators live in registers.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q4_1_rows(
        blocks: &[BlockQ4_1],
        nb: usize,
        x: &[f32],
        t: usize,
        out: *mut f32,
        ld: usize,
    ) {
        by_rows!(
            t,
            [1, 2, 3, 4, 5, 6, 7],
            8,
            q4_1_rows_t(blocks, nb, x, out, ld)
        )
    }

    /// `Σ (d q + m) x = d Σ q x + m Σ x`, with `Σ x` per block computed once for all weight
    /// rows, so the inner loop is conversions and one FMA per 8 values. The nibbles of a
    /// block are converted once and used for all T activation rows; per activation row the
    /// operations are exactly those of T = 1.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    // `b` indexes the row's blocks (by pointer) and every activation row's Σx alike.
    #[allow(clippy::needless_range_loop)]
    unsafe fn q4_1_rows_t<const T: usize>(
        blocks: &[BlockQ4_1],
        nb: usize,
        x: &[f32],
        out: *mut f32,
        ld: usize,
    ) {
        let cols = nb * QK;
        let n_rows = blocks.len() / nb;
        let xp = x.as_ptr();
        if nb > XSUM_BLOCKS {
            // Rows longer than the Σx buffer: the tile kernel, one row at a time.
            for r in 0..n_rows {
                for k in 0..T {
                    let mut acc = [0f32; 4];
                    q4_1_t::<1>(
                        &blocks[r * nb..(r + 1) * nb],
                        &x[k * cols..],
                        cols,
                        &mut acc,
                    );
                    *out.add(k * ld + r) = acc[0];
                }
            }
            return;
        }
        let mask = _mm_set1_epi8(0x0F);
        let mut xsum = [[0f32; XSUM_BLOCKS]; T];
        for (k, sums) in xsum.iter_mut().enumerate() {
            for (b, s) in sums[..nb].iter_mut().enumerate() {
                let p = xp.add(k * cols + b * QK);
                let v = _mm256_add_ps(
                    _mm256_add_ps(_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))),
                    _mm256_add_ps(_mm256_loadu_ps(p.add(16)), _mm256_loadu_ps(p.add(24))),
                );
                *s = hsum(v);
            }
        }
        for r in 0..n_rows {
            let row = blocks.as_ptr().add(r * nb);
            let mut acc = [_mm256_setzero_ps(); T];
            let mut msum = [0f32; T];
            for b in 0..nb {
                let blk = &*row.add(b);
                let raw = _mm_loadu_si128(blk.qs.as_ptr() as *const __m128i);
                let lo = _mm_and_si128(raw, mask);
                let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
                let q0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
                let q1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
                let q2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
                let q3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
                let d = _mm256_set1_ps(f16_to_f32(blk.d));
                let m = f16_to_f32(blk.m);
                for k in 0..T {
                    let p = xp.add(k * cols + b * QK);
                    let mut s = _mm256_mul_ps(q0, _mm256_loadu_ps(p));
                    s = _mm256_fmadd_ps(q1, _mm256_loadu_ps(p.add(8)), s);
                    s = _mm256_fmadd_ps(q2, _mm256_loadu_ps(p.add(16)), s);
                    s = _mm256_fmadd_ps(q3, _mm256_loadu_ps(p.add(24)), s);
                    acc[k] = _mm256_fmadd_ps(s, d, acc[k]);
                    msum[k] += m * xsum[k][b];
                }
            }
            for k in 0..T {
                *out.add(k * ld + r) = hsum(acc[k]) + msum[k];
            }
        }
    }

    /// Q8_0 weight rows × `t` (1..=MAX_SHARED) f32 rows, as [`q4_1_rows`]: `d Σ q x` per
    /// block.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn q8_0_rows(
        blocks: &[BlockQ8_0],
        nb: usize,
        x: &[f32],
        t: usize,
        out: *mut f32,
        ld: usize,
    ) {
        by_rows!(
            t,
            [1, 2, 3, 4, 5, 6, 7],
            8,
            q8_0_rows_t(blocks, nb, x, out, ld)
        )
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q8_0_rows_t<const T: usize>(
        blocks: &[BlockQ8_0],
        nb: usize,
        x: &[f32],
        out: *mut f32,
        ld: usize,
    ) {
        let cols = nb * QK;
        let n_rows = blocks.len() / nb;
        let xp = x.as_ptr();
        for r in 0..n_rows {
            let row = blocks.as_ptr().add(r * nb);
            let mut acc = [_mm256_setzero_ps(); T];
            for b in 0..nb {
                let blk = &*row.add(b);
                let q = blk.qs.as_ptr() as *const __m128i;
                let raw0 = _mm_loadu_si128(q);
                let raw1 = _mm_loadu_si128(q.add(1));
                let q0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw0));
                let q1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(raw0, 8)));
                let q2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw1));
                let q3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(raw1, 8)));
                let d = _mm256_set1_ps(f16_to_f32(blk.d));
                for (k, a) in acc.iter_mut().enumerate() {
                    let p = xp.add(k * cols + b * QK);
                    let mut s = _mm256_mul_ps(q0, _mm256_loadu_ps(p));
                    s = _mm256_fmadd_ps(q1, _mm256_loadu_ps(p.add(8)), s);
                    s = _mm256_fmadd_ps(q2, _mm256_loadu_ps(p.add(16)), s);
                    s = _mm256_fmadd_ps(q3, _mm256_loadu_ps(p.add(24)), s);
                    *a = _mm256_fmadd_ps(s, d, *a);
                }
            }
            for (k, a) in acc.iter().enumerate() {
                *out.add(k * ld + r) = hsum(*a);
            }
        }
    }

    /// `out[k][j] = Σ_c x[k][c] · panel[c][j]` for `m` (1..=MR) activation rows and the
    /// PANEL weight rows of `panel` (column-major: the PANEL values of column c together);
    /// row k of the result goes to `out + k * ld`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn gemm_tile(
        m: usize,
        panel: &[f32],
        x: &[f32],
        cols: usize,
        out: *mut f32,
        ld: usize,
    ) {
        match m {
            1 => gemm_m::<1>(panel, x, cols, out, ld),
            2 => gemm_m::<2>(panel, x, cols, out, ld),
            3 => gemm_m::<3>(panel, x, cols, out, ld),
            4 => gemm_m::<4>(panel, x, cols, out, ld),
            5 => gemm_m::<5>(panel, x, cols, out, ld),
            _ => gemm_m::<6>(panel, x, cols, out, ld),
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn gemm_m<const M: usize>(
        panel: &[f32],
        x: &[f32],
        cols: usize,
        out: *mut f32,
        ld: usize,
    ) {
        debug_assert!(panel.len() >= cols * PANEL && x.len() >= M * cols);
        let mut acc = [[_mm256_setzero_ps(); 2]; M];
        let (pp, xp) = (panel.as_ptr(), x.as_ptr());
        for c in 0..cols {
            let w0 = _mm256_loadu_ps(pp.add(c * PANEL));
            let w1 = _mm256_loadu_ps(pp.add(c * PANEL + 8));
            for (k, a) in acc.iter_mut().enumerate() {
                let b = _mm256_broadcast_ss(&*xp.add(k * cols + c));
                a[0] = _mm256_fmadd_ps(b, w0, a[0]);
                a[1] = _mm256_fmadd_ps(b, w1, a[1]);
            }
        }
        for (k, a) in acc.iter().enumerate() {
            _mm256_storeu_ps(out.add(k * ld), a[0]);
            _mm256_storeu_ps(out.add(k * ld + 8), a[1]);
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn f16_to_f32(h: half::f16) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h.to_bits() as i32)))
    }

    /// Q4_1 row × T f32 rows. The 32 weights of a block are dequantized once
    /// (`d * q + m`) into four vectors and reused for every activation row.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_1_t<const T: usize>(
        row: &[BlockQ4_1],
        x: &[f32],
        cols: usize,
        acc: &mut [f32; 4],
    ) {
        let mask = _mm_set1_epi8(0x0F);
        let mut sums = [_mm256_setzero_ps(); T];
        let xp = x.as_ptr();
        for (bi, b) in row.iter().enumerate() {
            let d = _mm256_set1_ps(f16_to_f32(b.d));
            let m = _mm256_set1_ps(f16_to_f32(b.m));
            let raw = _mm_loadu_si128(b.qs.as_ptr() as *const __m128i);
            let lo = _mm_and_si128(raw, mask);
            let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
            let q0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
            let q1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
            let q2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
            let q3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
            let w0 = _mm256_fmadd_ps(q0, d, m);
            let w1 = _mm256_fmadd_ps(q1, d, m);
            let w2 = _mm256_fmadd_ps(q2, d, m);
            let w3 = _mm256_fmadd_ps(q3, d, m);
            for (k, s) in sums.iter_mut().enumerate() {
                let p = xp.add(k * cols + bi * QK);
                *s = _mm256_fmadd_ps(w0, _mm256_loadu_ps(p), *s);
                *s = _mm256_fmadd_ps(w1, _mm256_loadu_ps(p.add(8)), *s);
                *s = _mm256_fmadd_ps(w2, _mm256_loadu_ps(p.add(16)), *s);
                *s = _mm256_fmadd_ps(w3, _mm256_loadu_ps(p.add(24)), *s);
            }
        }
        for k in 0..T {
            acc[k] = hsum(sums[k]);
        }
    }

    /// Q8_0 row × T f32 rows.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q8_0_t<const T: usize>(
        row: &[BlockQ8_0],
        x: &[f32],
        cols: usize,
        acc: &mut [f32; 4],
    ) {
        let mut sums = [_mm256_setzero_ps(); T];
        let xp = x.as_ptr();
        for (bi, b) in row.iter().enumerate() {
            let d = _mm256_set1_ps(f16_to_f32(b.d));
            let q = b.qs.as_ptr() as *const __m128i;
            let raw0 = _mm_loadu_si128(q);
            let raw1 = _mm_loadu_si128(q.add(1));
            let w0 = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw0)));
            let w1 = _mm256_mul_ps(
                d,
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(raw0, 8))),
            );
            let w2 = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw1)));
            let w3 = _mm256_mul_ps(
                d,
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(raw1, 8))),
            );
            for (k, s) in sums.iter_mut().enumerate() {
                let p = xp.add(k * cols + bi * QK);
                *s = _mm256_fmadd_ps(w0, _mm256_loadu_ps(p), *s);
                *s = _mm256_fmadd_ps(w1, _mm256_loadu_ps(p.add(8)), *s);
                *s = _mm256_fmadd_ps(w2, _mm256_loadu_ps(p.add(16)), *s);
                *s = _mm256_fmadd_ps(w3, _mm256_loadu_ps(p.add(24)), *s);
            }
        }
        for k in 0..T {
            acc[k] = hsum(sums[k]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    fn matrix(rows: usize, cols: usize, dtype: GgmlDType) -> (QMat, Vec<f32>) {
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

    fn reference(w: &[f32], x: &[f32], rows: usize, cols: usize, n: usize) -> Vec<f32> {
        let mut out = vec![0f32; n * rows];
        for i in 0..n {
            for r in 0..rows {
                out[i * rows + r] = (0..cols).map(|c| w[r * cols + c] * x[i * cols + c]).sum();
            }
        }
        out
    }

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

    /// Both vector widths of the generated-row kernels (the machine picks one per
    /// process, so the other would go untested): close to the reference, and each row's
    /// result independent of how many rows share the call.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_and_avx512_row_kernels() {
        if !simd::available() {
            return;
        }
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let (rows, cols) = (24, 96);
            let (m, w) = matrix(rows, cols, dtype);
            let n = 7;
            let x: Vec<f32> = (0..n * cols).map(|i| (i as f32 * 0.13).cos()).collect();
            let want = reference(&w, &x, rows, cols, n);
            let nb = cols / QK;
            let mut widths = vec![false];
            if simd::avx512() {
                widths.push(true);
            }
            for wide in widths {
                let run = |xs: &[f32], t: usize| {
                    let mut out = vec![0f32; t * rows];
                    // SAFETY: features checked above; `xs` holds t rows, `out` t × rows.
                    unsafe {
                        match (&m, wide) {
                            (QMat::Q4_1 { blocks, .. }, false) => {
                                simd::q4_1_rows(blocks, nb, xs, t, out.as_mut_ptr(), rows)
                            }
                            (QMat::Q4_1 { blocks, .. }, true) => {
                                simd::q4_1_rows_512(blocks, nb, xs, t, out.as_mut_ptr(), rows)
                            }
                            (QMat::Q8_0 { blocks, .. }, false) => {
                                simd::q8_0_rows(blocks, nb, xs, t, out.as_mut_ptr(), rows)
                            }
                            (QMat::Q8_0 { blocks, .. }, true) => {
                                simd::q8_0_rows_512(blocks, nb, xs, t, out.as_mut_ptr(), rows)
                            }
                            _ => unreachable!(),
                        }
                    }
                    out
                };
                let all = run(&x, n);
                for (a, b) in all.iter().zip(&want) {
                    assert!((a - b).abs() <= 1e-3 * (1.0 + b.abs()), "{dtype:?} {wide}");
                }
                for i in 0..n {
                    let one = run(&x[i * cols..(i + 1) * cols], 1);
                    assert_eq!(
                        one.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        all[i * rows..(i + 1) * rows]
                            .iter()
                            .map(|v| v.to_bits())
                            .collect::<Vec<_>>(),
                        "{dtype:?} avx512={wide}: row {i}"
                    );
                }
            }
        }
    }

    /// The vector `exp` of the attention kernel against `f32::exp`.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_exp_matches_std() {
        if !simd::avx512() {
            return;
        }
        use std::arch::x86_64::*;
        let xs: Vec<f32> = (0..4000).map(|i| -100.0 + i as f32 * 0.0471).collect();
        for chunk in xs.chunks_exact(16) {
            let mut got = [0f32; 16];
            // SAFETY: AVX-512 checked above; 16 values in, 16 out.
            unsafe {
                _mm512_storeu_ps(
                    got.as_mut_ptr(),
                    simd::exp512(_mm512_loadu_ps(chunk.as_ptr())),
                )
            };
            for (x, g) in chunk.iter().zip(got) {
                let want = x.exp();
                assert!(
                    (g - want).abs() <= want * 3e-7 + 1e-37,
                    "exp({x}) = {g}, want {want}"
                );
            }
        }
        // Softmax weights: lengths around the vector width, a tail included.
        for len in [1, 15, 16, 17, 40] {
            let mut sc: Vec<f32> = (0..len).map(|i| (i as f32 * 0.7).sin() * 5.0).collect();
            let max = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let want: Vec<f32> = sc.iter().map(|v| (v - max).exp()).collect();
            // SAFETY: AVX-512 checked above.
            let sum = unsafe { simd::softmax_weights_512(&mut sc) };
            for (g, w) in sc.iter().zip(&want) {
                assert!((g - w).abs() <= w * 1e-6, "len {len}: {g} vs {w}");
            }
            assert!((sum - want.iter().sum::<f32>()).abs() < 1e-4 * len as f32);
        }
    }

    /// The AVX-512 attention kernel against plain softmax attention.
    #[test]
    fn attention_kernel_matches_the_plain_loop() {
        // Whole blocks of 16 positions, a partial one, and fewer than 16.
        for len in [37, 1, 15, 16, 64] {
            attention_kernel_matches_the_plain_loop_at(len);
        }
    }

    fn attention_kernel_matches_the_plain_loop_at(len: usize) {
        let scale = 0.125;
        let keys: Vec<f32> = (0..len * 64).map(|i| (i as f32 * 0.011).sin()).collect();
        let values: Vec<f32> = (0..len * 64).map(|i| (i as f32 * 0.007).cos()).collect();
        for group in 1..=4 {
            let q: Vec<f32> = (0..group * 64)
                .map(|i| (i as f32 * 0.03).sin() * 2.0)
                .collect();
            let mut out = vec![0f32; group * 64];
            if !attend_64(
                &q,
                group,
                &keys,
                &values,
                len,
                scale,
                &mut Vec::new(),
                &mut out,
            ) {
                return; // no AVX-512 here: the portable loop is what runs
            }
            for g in 0..group {
                let qh = &q[g * 64..(g + 1) * 64];
                let sc: Vec<f32> = (0..len)
                    .map(|p| {
                        let k = &keys[p * 64..(p + 1) * 64];
                        qh.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() * scale
                    })
                    .collect();
                let max = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = sc.iter().map(|v| (v - max).exp()).collect();
                let sum: f32 = e.iter().sum();
                for j in 0..64 {
                    let want: f32 = (0..len).map(|p| e[p] / sum * values[p * 64 + j]).sum();
                    let got = out[g * 64 + j];
                    assert!(
                        (got - want).abs() < 1e-4,
                        "group {group} head {g} [{j}]: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn simd_and_scalar_agree() {
        let (m, _) = matrix(8, 64, GgmlDType::Q4_1);
        let x: Vec<f32> = (0..4 * 64).map(|i| (i as f32).sin()).collect();
        if let QMat::Q4_1 { blocks, .. } = &m {
            let mut a = [0f32; 4];
            scalar::q4_1_tile(&blocks[0..2], &x, 64, 4, &mut a);
            let mut b = [0f32; 4];
            b.copy_from_slice(&[0.0; 4]);
            m.dot_tile(0, &x, 4, &mut b);
            for (p, q) in a.iter().zip(&b) {
                assert!((p - q).abs() < 1e-4, "{p} vs {q}");
            }
        }
    }
}
