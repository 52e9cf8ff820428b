//! Matrix products of quantized weights with f32 activations, for the CPU path.
//!
//! Why not candle's quantized matmul: it quantizes the activations to 8 bits per block of
//! 32 before the dot product. SmolLM2 has "massive activations" (single values in the tens
//! of thousands), and a block that holds one loses every other value in it; stacked over
//! 30 layers this turns the answer into nonsense (measured: "The capital of France is
//! Paris." with f32 activations, French gibberish with 8-bit ones). Here the weights are
//! dequantized on the fly and multiplied with activations that keep their outliers' neighbours:
//! f32, bf16 (each value its own exponent) or 16-bit integers per block of 32 (see
//! `decode::rounding`); the 8-bit prompt kernel keeps each block's outliers exact.
//!
//! Weights are read in place, in the format the file stores them (see [`formats`]): from the
//! model file's memory map, so loading is a header read and the page cache is shared with
//! any other process reading the file.
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
//! - [`activation`]: the FFN's gated activation (SwiGLU, GeGLU), vectorised or portable;
//! - [`scalar`]: the portable fallback of each product; `x86`: AVX2 and AVX-512 kernels,
//!   picked at run time.

mod activation;
mod attention;
mod decode;
pub mod formats;
mod prompt;
mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

#[cfg(test)]
use candle_core::quantized::QTensor;
use memmap2::Mmap;

use super::team::Team;
use super::EngineError;

pub use activation::{geglu, swiglu};
pub use attention::attend;
pub use formats::Format;
#[cfg(target_arch = "x86_64")]
use prompt::PanelScratch;
use prompt::PANEL;

/// Which instruction-set extensions the kernels may use, where the CPU has them
/// (`--no-avx512`, `--no-bf16`, `--no-amx`, `--no-int16`, `--no-int8`: to compare kernels,
/// or to rule one out).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Isa {
    pub avx512: bool,
    /// AVX512_BF16 dot products for the K-quant, Q4_0 and BF16 kernels and Q8_0 prompts.
    pub bf16: bool,
    /// AMX tiles for the prompt kernel of those formats (with `bf16`).
    pub amx: bool,
    /// 16-bit integer activations for the Q4_0, Q4_1 and Q8_0 decode kernels, and the K-quant
    /// ones where bf16 is missing (see `decode::rounding`).
    pub int16: bool,
    /// 8-bit activations (each block's outliers kept exact) for the prompt kernels of Q4_K,
    /// Q5_K, Q6_K and Q4_0: with AVX512_VNNI where AMX is not used, in AVX2 where neither it
    /// nor AVX512_BF16 is.
    pub int8: bool,
}

impl Default for Isa {
    fn default() -> Self {
        Isa {
            avx512: true,
            bf16: true,
            amx: true,
            int16: true,
            int8: true,
        }
    }
}

static ISA: OnceLock<Isa> = OnceLock::new();

/// Sets what the kernels may use. Once per process, before the first product: every product
/// of a run must take the same arithmetic (a sequence's tokens must not depend on
/// batching), so a later, different choice is ignored with a warning.
pub fn choose_isa(isa: Isa) {
    if ISA.set(isa).is_err() && ISA.get() != Some(&isa) {
        tracing::warn!(kept = ?ISA.get(), ignored = ?isa, "the kernels' instruction set is chosen once per process");
    }
}

/// The choice in force (everything the CPU has, unless [`choose_isa`] said otherwise).
fn isa() -> Isa {
    *ISA.get_or_init(Isa::default)
}

/// Weight rows per claimed chunk of a product: about 32 chunks per thread (enough for one
/// thread to take over a stalled one's share, and a short wait for the last), a multiple of
/// [`PANEL`] (the prompt kernel's panels stay whole) and at least 64 rows (so claiming stays
/// cheap against the work).
fn chunk_rows(rows: usize, threads: usize) -> usize {
    let per = rows.div_ceil(threads.max(1) * 32);
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
// SAFETY: see the writes in `matmul_parts` and `CpuLlama::attention`: every cell is
// written by exactly one thread.
unsafe impl Sync for SyncPtr {}

/// Where a matrix's bytes live.
enum Storage {
    /// In the model file's memory map, read in place.
    Mapped {
        map: Arc<Mmap>,
        start: usize,
        len: usize,
    },
    /// Our own copy, in 8-byte words so any format's blocks are aligned.
    Owned { words: Vec<u64>, len: usize },
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mapped { map, start, len } => &map[*start..*start + *len],
            Storage::Owned { words, len } => &bytemuck::cast_slice(words)[..*len],
        }
    }
}

/// A weight matrix of `rows` outputs by `cols` inputs, row-major, each row whole blocks of
/// its format.
pub struct QMat {
    format: Format,
    rows: usize,
    cols: usize,
    /// Bytes of one row.
    row_bytes: usize,
    storage: Storage,
}

impl QMat {
    /// Bytes of one row of `cols` values of `format`, and of `rows` rows; an error when rows
    /// are not whole blocks.
    fn sizes(format: Format, rows: usize, cols: usize) -> Result<(usize, usize), EngineError> {
        let row_bytes = format.row_bytes(cols).ok_or_else(|| {
            EngineError::Model(format!(
                "a {} matrix with {cols} columns: rows must be whole blocks of {}",
                format.name(),
                format.block_values()
            ))
        })?;
        let len = rows
            .checked_mul(row_bytes)
            .ok_or_else(|| EngineError::Model(format!("a {rows} × {cols} matrix is too large")))?;
        Ok((row_bytes, len))
    }

    /// The `rows` × `cols` matrix of `format` stored from `start` in a memory-mapped file,
    /// read in place.
    pub fn mapped(
        format: Format,
        rows: usize,
        cols: usize,
        map: Arc<Mmap>,
        start: usize,
    ) -> Result<QMat, EngineError> {
        let (row_bytes, len) = Self::sizes(format, rows, cols)?;
        if start.checked_add(len).is_none_or(|end| end > map.len()) {
            return Err(EngineError::Model(format!(
                "tensor data at {start}..+{len} lies beyond the end of the file ({} bytes): \
                 the file is truncated",
                map.len()
            )));
        }
        // The map starts on a page; GGUF aligns tensor data (32 bytes by default). A file
        // with a smaller alignment is copied rather than read misaligned.
        if !(map.as_ptr() as usize + start).is_multiple_of(format.align()) {
            return Self::from_bytes(format, rows, cols, &map[start..start + len]);
        }
        Ok(QMat {
            format,
            rows,
            cols,
            row_bytes,
            storage: Storage::Mapped { map, start, len },
        })
    }

    /// A matrix of our own from its bytes in `format`.
    pub fn from_bytes(
        format: Format,
        rows: usize,
        cols: usize,
        bytes: &[u8],
    ) -> Result<QMat, EngineError> {
        let (row_bytes, len) = Self::sizes(format, rows, cols)?;
        if len != bytes.len() {
            return Err(EngineError::Model(format!(
                "a {rows} × {cols} {} matrix takes {len} bytes, not {}",
                format.name(),
                bytes.len()
            )));
        }
        let mut words = vec![0u64; bytes.len().div_ceil(8)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..bytes.len()].copy_from_slice(bytes);
        Ok(QMat {
            format,
            rows,
            cols,
            row_bytes,
            storage: Storage::Owned {
                words,
                len: bytes.len(),
            },
        })
    }

    /// An f32 matrix from its values.
    pub fn from_f32(rows: usize, cols: usize, values: &[f32]) -> Result<QMat, EngineError> {
        Self::from_bytes(Format::F32, rows, cols, bytemuck::cast_slice(values))
    }

    /// A copy of a candle tensor (a matrix, or a vector as one row). Formats the kernels do
    /// not read are refused. (The kernels' tests compare against candle's own products.)
    #[cfg(test)]
    pub fn from_qtensor(t: &QTensor) -> Result<QMat, EngineError> {
        let (rows, cols) = match t.shape().dims() {
            [r, c] => (*r, *c),
            [c] => (1, *c),
            dims => {
                return Err(EngineError::Model(format!(
                    "expected a matrix, got shape {dims:?}"
                )))
            }
        };
        let format = Format::from_ggml(t.dtype()).ok_or_else(|| {
            EngineError::Model(format!("weights of type {:?} are not supported", t.dtype()))
        })?;
        let bytes = t.data().map_err(|e| EngineError::Model(e.to_string()))?;
        Self::from_bytes(format, rows, cols, &bytes)
    }

    pub fn format(&self) -> Format {
        self.format
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The bytes of rows `r0..r1`.
    fn rows_data(&self, r0: usize, r1: usize) -> &[u8] {
        &self.storage.bytes()[r0 * self.row_bytes..r1 * self.row_bytes]
    }

    /// Row `r` as f32 (embedding lookup, and the prompt kernel's panels).
    pub fn row(&self, r: usize, out: &mut [f32]) {
        let (cols, data) = (self.cols, self.rows_data(r, r + 1));
        #[cfg(target_arch = "x86_64")]
        if matches!(self.format, Format::Q4_0 | Format::Q4_1) && x86::available() {
            use formats::{cast, BlockQ4_0, BlockQ4_1};
            let out = &mut out[..cols];
            // SAFETY: AVX2 and F16C are present (checked at run time); `out` holds at least
            // `cols` values (a whole row of blocks).
            unsafe {
                if self.format == Format::Q4_0 {
                    x86::avx2::q4_row::<BlockQ4_0>(cast(data), out)
                } else {
                    x86::avx2::q4_row::<BlockQ4_1>(cast(data), out)
                }
            };
            return;
        }
        self.format.dequantize(data, &mut out[..cols]);
    }

    /// `out[i][r] = Σ_c self[r][c] · x[i][c]` for `n` activation rows `x` (n × cols);
    /// `out` is n × rows. `rows_are` picks the arithmetic (see [`Rows`]).
    pub fn matmul(&self, x: &[f32], n: usize, out: &mut [f32], team: &Team, rows_are: Rows) {
        matmul_parts(&[self], x, n, out, team, rows_are);
    }
}

/// [`QMat::matmul`] for several matrices of the same input (the query, key and value
/// projections; gate and up), side by side in each output row: `out` is n × (Σ rows). One
/// round of the team for all of them, and no copy of the weights to stack them.
pub fn matmul_parts(
    parts: &[&QMat],
    x: &[f32],
    n: usize,
    out: &mut [f32],
    team: &Team,
    rows_are: Rows,
) {
    let total: usize = parts.iter().map(|p| p.rows).sum();
    let cols = parts.first().map_or(0, |p| p.cols);
    debug_assert!(parts.iter().all(|p| p.cols == cols));
    debug_assert_eq!(x.len(), n * cols);
    debug_assert_eq!(out.len(), n * total);
    if n == 0 || total == 0 {
        return;
    }
    // Threads claim chunks of weight rows (output columns), for all activation rows,
    // until none are left. Claimed, not split in fixed halves: on a busy machine (the
    // server's own runtime, a benchmark client) one team thread is sometimes taken off
    // its core, and the others then do its share instead of waiting for it. Small
    // chunks also keep a chunk's weights in cache while a second group of rows reads
    // them (`decode_band`), and make the wait for the last one short.
    //
    // Each thread first claims the chunks of its own contiguous region, in order, then
    // helps the others with theirs: memory-bound decoding reads each thread's weights as
    // one forward stream (which the kernels prefetch ahead of), where chunks handed out
    // alternately broke every thread's stream at every chunk.
    let threads = team.size();
    let chunk = chunk_rows(total, threads);
    // (part, first row, end row, the part's first output column)
    let mut work = Vec::new();
    let mut col = 0;
    for (pi, p) in parts.iter().enumerate() {
        work.extend(
            (0..p.rows)
                .step_by(chunk)
                .map(|r0| (pi, r0, (r0 + chunk).min(p.rows), col)),
        );
        col += p.rows;
    }
    let per = work.len().div_ceil(threads);
    let next: Vec<AtomicUsize> = (0..threads).map(|t| AtomicUsize::new(t * per)).collect();
    let out_ptr = SyncPtr(out.as_mut_ptr());
    team.run(&|tid| {
        let out_ptr = &out_ptr;
        // Sized by the first band that uses them; they allocate nothing before.
        #[cfg(target_arch = "x86_64")]
        let mut panels = PanelScratch::default();
        let mut band_scratch = BandScratch::default();
        // This thread's region, then the others' in turn.
        let claims = (0..threads).flat_map(|k| {
            let region = (tid + k) % threads;
            let end = ((region + 1) * per).min(work.len());
            let counter = &next[region];
            std::iter::from_fn(move || {
                let i = counter.fetch_add(1, Ordering::Relaxed);
                (i < end).then_some(i)
            })
        });
        for i in claims {
            let (pi, r0, r1, col) = work[i];
            let m = parts[pi];
            // SAFETY: `col` < total, so the pointer stays inside `out`; the band writes only
            // the columns col + r0..col + r1 of each row (stride `total`), this work item's.
            let band = Band {
                out: unsafe { out_ptr.0.add(col) },
                ld: total,
            };
            match rows_are {
                Rows::Generated => m.decode_band(r0, r1, x, n, band, &mut band_scratch),
                Rows::Prompt => {
                    #[cfg(target_arch = "x86_64")]
                    if x86::available() {
                        m.gemm_band(r0, r1, x, n, band, &mut panels);
                        continue;
                    }
                    m.tile_band(r0, r1, x, n, band, &mut band_scratch.row_f32);
                }
            }
        }
    });
}

/// One thread's buffers for the bands it takes of one product.
#[derive(Default)]
pub(super) struct BandScratch {
    /// A weight row as f32 (the portable path).
    row_f32: Vec<f32>,
    /// The activation rows for the bf16 kernels.
    #[cfg(target_arch = "x86_64")]
    bf16: x86::bf16::Activations,
    /// The activation rows for the 16-bit integer kernels.
    #[cfg(target_arch = "x86_64")]
    int16: x86::int16::Activations,
}

/// Where a band of a product writes: cell (i, r) of a matrix's output is `out + i·ld + r`.
#[derive(Clone, Copy)]
pub(super) struct Band {
    out: *mut f32,
    ld: usize,
}

impl Band {
    /// Writes cell (i, r).
    ///
    /// # Safety
    /// (i, r) must be a cell of the work item this band was made for.
    #[inline]
    unsafe fn set(self, i: usize, r: usize, v: f32) {
        *self.out.add(i * self.ld + r) = v;
    }

    /// The address of cell (i, r), for kernels that write a row of cells from there.
    #[inline]
    fn at(self, i: usize, r: usize) -> *mut f32 {
        self.out.wrapping_add(i * self.ld + r)
    }
}

/// Test inputs shared by the kernels' tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use candle_core::quantized::GgmlDType;
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

    /// How far a product may be from [`reference`]: f32 rounding, plus, where the kernel
    /// rounds activations to bf16 (8 significant bits: relative error ≤ 2⁻⁸ each), that
    /// rounding's worst case over the terms, `2⁻⁸ Σ |w x|`, or where it rounds them to 16-bit
    /// integers per block of 32 (see `x86::int16`), half a step each, `Σ |w| · max|x| / 65534`
    /// over each block.
    pub fn tolerance(
        format: Format,
        rows_are: Rows,
        w: &[f32],
        x: &[f32],
        rows: usize,
        cols: usize,
        n: usize,
    ) -> Vec<f32> {
        let abs = |v: &[f32]| v.iter().map(|a| a.abs()).collect::<Vec<_>>();
        let magnitude = reference(&abs(w), &abs(x), rows, cols, n);
        // The 8-bit prompt kernel rounds activations per block (see `x86::int8`).
        #[cfg(target_arch = "x86_64")]
        let int8 = rows_are == Rows::Prompt
            && ((x86::int8() && prompt::int8_panels(format, cols, true))
                || (x86::int8_avx2() && prompt::int8_panels(format, cols, false)));
        #[cfg(not(target_arch = "x86_64"))]
        let int8 = false;
        // Decode rounds activations as `decode::rounding` says; the prompt panels round them
        // to bf16 for the formats of `prompt::bf16_panels` (where the 8-bit kernel does not
        // take them).
        let decode = decode::rounding(format);
        #[cfg(target_arch = "x86_64")]
        let bf16 = match rows_are {
            Rows::Generated => decode == decode::Rounding::Bf16,
            Rows::Prompt => !int8 && x86::bf16() && prompt::bf16_panels(format),
        };
        #[cfg(not(target_arch = "x86_64"))]
        let bf16 = false;
        let _ = (format, rows_are);
        // The AMX prompt kernel rounds the quantized formats' weights to bf16 too (2⁻⁸ each).
        #[cfg(target_arch = "x86_64")]
        let amx = bf16 && x86::amx() && rows_are == Rows::Prompt && format != Format::BF16;
        #[cfg(not(target_arch = "x86_64"))]
        let amx = false;
        let rel = match (bf16, amx) {
            (true, true) => 2.0 / 256.0,
            (true, false) => 1.0 / 256.0,
            _ => 1e-5,
        };
        let int16 = rows_are == Rows::Generated && decode == decode::Rounding::Int16;
        let steps = if int16 {
            int16_steps(w, x, rows, cols, n)
        } else if int8 {
            int8_steps(w, x, rows, cols, n)
        } else {
            vec![0.0; magnitude.len()]
        };
        magnitude
            .iter()
            .zip(&steps)
            .map(|(m, s)| rel * m + s + 1e-3)
            .collect()
    }

    /// The worst error of a product from rounding the activations to 8-bit integers per
    /// block of 32 (see `x86::int8`): half a step each (`x86::int8::half_steps`: `max|x| /
    /// 254`, the outliers of a block that has them exact and its other values at the step of
    /// their own largest); `Σ |w| · half step` (with 1% to spare).
    pub fn int8_steps(w: &[f32], x: &[f32], rows: usize, cols: usize, n: usize) -> Vec<f32> {
        #[cfg(target_arch = "x86_64")]
        let half_step: Vec<f32> = x
            .chunks(formats::QK)
            .flat_map(|c| x86::int8::half_steps(c.try_into().expect("a block")))
            .collect();
        #[cfg(not(target_arch = "x86_64"))]
        let half_step = vec![0f32; x.len()];
        let abs: Vec<f32> = w.iter().map(|a| a.abs()).collect();
        let steps = reference(&abs, &half_step, rows, cols, n);
        steps.iter().map(|s| 1.01 * s).collect()
    }

    /// The worst error of a product from rounding the activations to 16-bit integers per
    /// block of 32 (see `x86::int16`): each value moves by at most half its block's step,
    /// `Σ |w| · max|x| / 65534` (with 1% to spare for the f32 arithmetic on it).
    pub fn int16_steps(w: &[f32], x: &[f32], rows: usize, cols: usize, n: usize) -> Vec<f32> {
        let half_step: Vec<f32> = x
            .chunks(formats::QK)
            .flat_map(|c| {
                let m = c.iter().fold(0f32, |m, v| m.max(v.abs()));
                std::iter::repeat_n(m / 65534.0, c.len())
            })
            .collect();
        let abs: Vec<f32> = w.iter().map(|a| a.abs()).collect();
        let steps = reference(&abs, &half_step, rows, cols, n);
        steps.iter().map(|s| 1.01 * s).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{matrix, reference, tolerance};
    use super::*;
    use candle_core::quantized::GgmlDType;

    /// Every format through every path (the vector kernels where the machine has them,
    /// the panels of the prompt kernel, the portable loop) against plain f32 arithmetic on
    /// the dequantized weights.
    #[test]
    fn kernels_match_dequantized_reference() {
        for (dtype, cols) in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q5_1,
            GgmlDType::Q8_0,
            GgmlDType::Q4K,
            GgmlDType::Q5K,
            GgmlDType::Q6K,
            GgmlDType::F16,
            GgmlDType::BF16,
            GgmlDType::F32,
        ]
        .into_iter()
        .map(|d| (d, 512))
        // Rows of 4.5 super-blocks (Gemma 3 1B's 1152) in the formats of 32-value blocks.
        .chain([GgmlDType::Q4_0, GgmlDType::Q8_0, GgmlDType::BF16].map(|d| (d, 1152)))
        {
            // Three chunks of rows (the last partial), rows of two K-quant super-blocks.
            let rows = 150;
            let (m, w) = matrix(rows, cols, dtype);
            assert_eq!(Some(m.format()), Format::from_ggml(dtype));
            for n in [1, 3, 4, 9, 17] {
                // Activations with a "massive" outlier, as the model has.
                let mut x: Vec<f32> = (0..n * cols)
                    .map(|i| ((i * 31 % 17) as f32 - 8.0) * 0.1)
                    .collect();
                x[5] = 3000.0;
                let want = reference(&w, &x, rows, cols, n);
                let close = |got: &[f32], kind: Rows, how: &str| {
                    let tol = tolerance(m.format(), kind, &w, &x, rows, cols, n);
                    for ((a, b), t) in got.iter().zip(&want).zip(&tol) {
                        assert!((a - b).abs() <= *t, "{dtype:?} {how} n={n}: {a} vs {b}");
                    }
                };
                for kind in [Rows::Generated, Rows::Prompt] {
                    let mut out = vec![0f32; n * rows];
                    m.matmul(&x, n, &mut out, &Team::new(2), kind);
                    close(&out, kind, &format!("{kind:?}"));
                }
                let mut out = vec![0f32; n * rows];
                let band = Band {
                    out: out.as_mut_ptr(),
                    ld: rows,
                };
                m.tile_band(0, rows, &x, n, band, &mut Vec::new());
                close(&out, Rows::Prompt, "portable");
            }
            let mut row = vec![0f32; cols];
            m.row(3, &mut row);
            assert_eq!(row, w[3 * cols..4 * cols], "{dtype:?}");
        }
    }

    /// The products on gguf-py's own blocks (the fixture of each format, as a matrix of
    /// 256-wide rows) against f32 arithmetic on gguf-py's dequantized values.
    #[test]
    fn products_on_gguf_py_blocks() {
        let team = Team::new(2);
        for (format, blocks, values) in formats::fixtures::all() {
            let cols = 256;
            let rows = values.len() / cols;
            let m = QMat::from_bytes(format, rows, cols, &blocks).unwrap();
            let n = 5;
            let x: Vec<f32> = (0..n * cols).map(|i| (i as f32 * 0.37).sin()).collect();
            let want = reference(&values, &x, rows, cols, n);
            for kind in [Rows::Generated, Rows::Prompt] {
                let mut out = vec![0f32; n * rows];
                m.matmul(&x, n, &mut out, &team, kind);
                let tol = tolerance(format, kind, &values, &x, rows, cols, n);
                for ((a, b), t) in out.iter().zip(&want).zip(&tol) {
                    assert!((a - b).abs() <= *t, "{format:?} {kind:?}: {a} vs {b}");
                }
            }
        }
    }

    /// Several matrices in one product land side by side, each as it would alone.
    #[test]
    fn parts_land_side_by_side() {
        let (a, _) = matrix(70, 256, GgmlDType::Q4K);
        let (b, _) = matrix(20, 256, GgmlDType::Q8_0);
        let (c, _) = matrix(130, 256, GgmlDType::Q6K);
        let n = 5;
        let x: Vec<f32> = (0..n * 256).map(|i| (i as f32 * 0.05).sin()).collect();
        let team = Team::new(2);
        for kind in [Rows::Generated, Rows::Prompt] {
            let mut all = vec![0f32; n * 220];
            matmul_parts(&[&a, &b, &c], &x, n, &mut all, &team, kind);
            let mut at = 0;
            for m in [&a, &b, &c] {
                let mut alone = vec![0f32; n * m.rows()];
                m.matmul(&x, n, &mut alone, &team, kind);
                for i in 0..n {
                    assert_eq!(
                        &all[i * 220 + at..i * 220 + at + m.rows()],
                        &alone[i * m.rows()..(i + 1) * m.rows()],
                        "{kind:?} row {i}"
                    );
                }
                at += m.rows();
            }
        }
    }

    /// A row's result must not depend on how many rows share the call (continuous
    /// batching relies on it: a sequence decodes the same alone or batched), bit for bit.
    #[test]
    fn a_rows_result_does_not_depend_on_its_batch() {
        for dtype in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q8_0,
            GgmlDType::Q4K,
            GgmlDType::Q6K,
            GgmlDType::BF16,
            GgmlDType::F32,
        ] {
            let (rows, cols) = (40, 256);
            let (m, _) = matrix(rows, cols, dtype);
            // More than one AMX tile of rows (16), so a row is seen in a whole tile and in
            // the zero-padded last one.
            let n = 21;
            let mut x: Vec<f32> = (0..n * cols).map(|i| (i as f32 * 0.37).sin()).collect();
            x[7] = 2500.0;
            for kind in [Rows::Generated, Rows::Prompt] {
                let mut all = vec![0f32; n * rows];
                m.matmul(&x, n, &mut all, &Team::new(2), kind);
                for i in 0..n {
                    for take in [1, 2, 5, 16] {
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
