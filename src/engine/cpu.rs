//! The decoder forward pass on the CPU in plain Rust, around the kernels of [`super::kernels`]:
//! one pass for every architecture of [`super::arch`], which says what each one changes.
//!
//! f32 activations throughout (see `kernels` for why), weights used in place in their
//! stored format, the token embedding looked up row by row, and no per-op tensor
//! allocation. Layout of the KV cache: `[layer][kv_head][position][head_dim]`, allocated
//! once per sequence.

use super::arch::{Activation, RopeStyle};
use super::gguf::{GgufFile, ModelSpec};
use super::kernels::formats::{quantize_q8_0, QK};
use super::kernels::{attend, geglu, matmul_parts, swiglu, Format, QMat, Rows, SyncPtr};
use super::team::Team;
use super::EngineError;

/// `out = x · [parts]ᵀ` for the `n` rows of a step (the parts side by side in each output
/// row), of which the first `generated` are generated tokens and the rest prompt tokens:
/// each kind takes its own kernel ([`Rows`]), so a row's result depends on what it is, never
/// on what else is in the batch.
fn product(parts: &[&QMat], x: &[f32], n: usize, generated: usize, out: &mut [f32], team: &Team) {
    let cols = parts[0].cols();
    let total: usize = parts.iter().map(|p| p.rows()).sum();
    let (xg, xp) = x.split_at(generated * cols);
    let (og, op) = out.split_at_mut(generated * total);
    matmul_parts(parts, xg, generated, og, team, Rows::Generated);
    matmul_parts(parts, xp, n - generated, op, team, Rows::Prompt);
}

struct Layer {
    /// Query, key and value projections: one fused matrix (Phi-3) or three, run as one
    /// product; output rows are `[q | k | v]` either way.
    qkv: Vec<QMat>,
    /// Their biases, `[q | k | v]` (Qwen 2).
    qkv_bias: Option<Vec<f32>>,
    /// Per-head RMS norms of queries and keys (Qwen 3, Gemma 3).
    qk_norm: Option<(Vec<f32>, Vec<f32>)>,
    wo: QMat,
    /// Gate and up projections: one fused matrix (Phi-3) or two; output rows are
    /// `[gate | up]` either way.
    gate_up: Vec<QMat>,
    w_down: QMat,
    attn_norm: Vec<f32>,
    ffn_norm: Vec<f32>,
    /// Norms of the attention and FFN outputs (Gemma).
    post_norms: Option<(Vec<f32>, Vec<f32>)>,
    /// Attends within the sliding window, with the local rope (Gemma).
    sliding: bool,
}

/// The rotary embedding of one kind of layer: the angle of pair i at position p is
/// p · `inv_freq[i]`.
struct Rope {
    style: RopeStyle,
    /// Dimensions that turn (a prefix of each head; Phi-4-style partial rotary).
    dims: usize,
    inv_freq: Vec<f64>,
    /// cos and sin are multiplied by this (LongRoPE's attention factor; usually 1).
    mscale: f32,
}

/// YaRN's blend of scaled and unscaled frequencies (see [`RopeSpec::yarn`]).
#[derive(Clone, Copy)]
struct Yarn {
    /// The context the correction dimensions are measured against.
    original_context: usize,
}

impl Yarn {
    /// Pairs turning faster than `BETA_FAST` times within the original context keep their
    /// speed; slower than `BETA_SLOW`, they are scaled; llama.cpp's defaults (it reads no
    /// other values for the architectures supported here).
    const BETA_FAST: f32 = 32.0;
    const BETA_SLOW: f32 = 1.0;

    /// llama.cpp's `ggml_rope_yarn_corr_dims`: the first and last pair of the ramp.
    fn corr_dims(&self, dims: usize, base: f32) -> (f32, f32) {
        let dim = |rotations: f32| {
            dims as f32
                * (self.original_context as f32 / (rotations * 2.0 * std::f32::consts::PI)).ln()
                / (2.0 * base.ln())
        };
        let start = dim(Self::BETA_FAST).floor().max(0.0);
        let end = dim(Self::BETA_SLOW).ceil().min(dims as f32 - 1.0);
        (start, end)
    }
}

impl Rope {
    /// llama.cpp's `ggml_rope_ext`: pair i turns at base^(-2i/dims) / factor_i, times
    /// `scale` — or, with YaRN, times a blend of `scale` and 1 along the ramp between the
    /// correction dimensions (and cos and sin grow by `1 + 0.1 ln(1/scale)`).
    fn new(
        style: RopeStyle,
        dims: usize,
        base: f32,
        scale: f32,
        factors: &[f32],
        mscale: f32,
        yarn: Option<Yarn>,
    ) -> Rope {
        let ramp = yarn.map(|y| y.corr_dims(dims, base));
        let inv_freq = (0..dims / 2)
            .map(|i| {
                let theta = (base as f64).powf(-2.0 * i as f64 / dims as f64);
                let extrap = theta / factors.get(i).copied().unwrap_or(1.0) as f64;
                let speed = match ramp {
                    Some((low, high)) => {
                        let y = (i as f32 - low) / (high - low).max(0.001);
                        let mix = (1.0 - y.clamp(0.0, 1.0)) as f64;
                        scale as f64 * (1.0 - mix) + mix
                    }
                    None => scale as f64,
                };
                extrap * speed
            })
            .collect();
        let mscale = match yarn {
            Some(_) => mscale * (1.0 + 0.1 * (1.0 / scale).ln()),
            None => mscale,
        };
        Rope {
            style,
            dims,
            inv_freq,
            mscale,
        }
    }

    /// cos and sin of each pair's angle at `pos`, into `cs` (dims/2 of each, cos first).
    /// Computed per step instead of held as a table: a 131 072-position table of a
    /// Llama 3 model is 33 MB, its step's rows a few hundred bytes each.
    fn angles(&self, pos: usize, cs: &mut [f32]) {
        let (cos, sin) = cs.split_at_mut(self.inv_freq.len());
        for ((c, s), f) in cos.iter_mut().zip(sin).zip(&self.inv_freq) {
            let a = pos as f64 * f;
            *c = a.cos() as f32 * self.mscale;
            *s = a.sin() as f32 * self.mscale;
        }
    }

    /// Rotates each `head_dim`-wide head of `v` by the angles of [`Rope::angles`].
    fn apply(&self, v: &mut [f32], head_dim: usize, cs: &[f32]) {
        let half = self.dims / 2;
        let (cos, sin) = cs.split_at(half);
        for head in v.chunks_exact_mut(head_dim) {
            for i in 0..half {
                let (a, b) = match self.style {
                    RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                    RopeStyle::Halves => (i, i + half),
                };
                let (x, y) = (head[a], head[b]);
                head[a] = x * cos[i] - y * sin[i];
                head[b] = x * sin[i] + y * cos[i];
            }
        }
    }
}

/// Model weights for the CPU path.
pub struct CpuLlama {
    pub spec: ModelSpec,
    embed: QMat,
    /// None: tied to the embedding.
    output: Option<QMat>,
    output_bias: Option<Vec<f32>>,
    norm: Vec<f32>,
    layers: Vec<Layer>,
    /// The rope of global layers, and of sliding-window ones.
    rope: Rope,
    local_rope: Rope,
    /// The threads the matrix products run on.
    team: Team,
}

/// One sequence's keys and values.
pub struct CpuCache {
    k: Vec<f32>,
    v: Vec<f32>,
    pub len: usize,
    pub capacity: usize,
}

/// One sequence's part of a batched step: `tokens` to run after what `cache` holds.
pub struct CpuSegment<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut CpuCache,
}

impl CpuCache {
    pub fn bytes(&self) -> usize {
        (self.k.len() + self.v.len()) * std::mem::size_of::<f32>()
    }
}

/// A weight matrix of the file, read in place when the kernels read its format; other
/// formats (Q2_K, Q3_K, the IQ types, …) are dequantized and stored as Q8_0 (F32 when rows
/// are not whole blocks of 32), which costs memory and load time but runs.
fn matrix(file: &GgufFile, name: &str) -> Result<QMat, EngineError> {
    let err = |e: String| EngineError::Model(format!("tensor {name}: {e}"));
    let info = file
        .content
        .tensor_infos
        .get(name)
        .ok_or_else(|| EngineError::Model(format!("the model file has no tensor `{name}`")))?;
    let (rows, cols) = match info.shape.dims() {
        [r, c] => (*r, *c),
        [c] => (1, *c),
        dims => {
            return Err(err(format!(
                "expected a matrix or a vector, got shape {dims:?}"
            )))
        }
    };
    if let Some(format) = Format::from_ggml(info.ggml_dtype) {
        let start = (file.content.tensor_data_offset + info.offset) as usize;
        return QMat::mapped(format, rows, cols, file.map.clone(), start)
            .map_err(|e| err(e.to_string()));
    }
    tracing::warn!(
        tensor = name,
        dtype = ?info.ggml_dtype,
        "no kernel reads this format: converting it to Q8_0 at load (more memory, slower load)"
    );
    let t = file
        .content
        .tensor(
            &mut std::io::Cursor::new(&file.map[..]),
            name,
            &candle_core::Device::Cpu,
        )
        .map_err(|e| err(e.to_string()))?;
    let values: Vec<f32> = t
        .dequantize(&candle_core::Device::Cpu)
        .and_then(|x| x.flatten_all())
        .and_then(|x| x.to_vec1())
        .map_err(|e| err(e.to_string()))?;
    if cols.is_multiple_of(QK) {
        let blocks = quantize_q8_0(&values);
        QMat::from_bytes(Format::Q8_0, rows, cols, bytemuck::cast_slice(&blocks))
    } else {
        QMat::from_f32(rows, cols, &values)
    }
}

/// A vector of the file (a norm's weights), as f32.
fn vector(file: &GgufFile, name: &str) -> Result<Vec<f32>, EngineError> {
    let m = matrix(file, name)?;
    if m.rows() != 1 {
        return Err(EngineError::Model(format!(
            "tensor {name}: expected a vector, got {} × {}",
            m.rows(),
            m.cols()
        )));
    }
    let mut v = vec![0f32; m.cols()];
    m.row(0, &mut v);
    Ok(v)
}

/// 1 / the root mean square of `x` (with `eps`): what an RMS norm multiplies by.
fn rms_scale(x: &[f32], eps: f32) -> f32 {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    1.0 / (ms + eps).sqrt()
}

fn rms_norm_in_place(x: &mut [f32], w: &[f32], eps: f32) {
    let s = rms_scale(x, eps);
    for (v, &g) in x.iter_mut().zip(w) {
        *v *= s * g;
    }
}

fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let s = rms_scale(x, eps);
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = v * s * g;
    }
}

fn has(file: &GgufFile, name: &str) -> bool {
    file.content.tensor_infos.contains_key(name)
}

/// A vector of `len` values, checked.
fn vector_of(file: &GgufFile, name: &str, len: usize) -> Result<Vec<f32>, EngineError> {
    let v = vector(file, name)?;
    if v.len() != len {
        return Err(EngineError::Model(format!(
            "tensor {name}: {} values, the model needs {len}",
            v.len()
        )));
    }
    Ok(v)
}

/// A matrix of `rows` × `cols`, checked: a file whose shapes disagree with its metadata is
/// refused at load with the tensor's name, not read out of bounds later.
fn matrix_of(file: &GgufFile, name: &str, rows: usize, cols: usize) -> Result<QMat, EngineError> {
    let m = matrix(file, name)?;
    if (m.rows(), m.cols()) != (rows, cols) {
        return Err(EngineError::Model(format!(
            "tensor {name}: {} × {}, the model's metadata needs {rows} × {cols}",
            m.rows(),
            m.cols()
        )));
    }
    Ok(m)
}

impl Layer {
    fn load(file: &GgufFile, spec: &ModelSpec, i: usize) -> Result<Layer, EngineError> {
        let p = |n: &str| format!("blk.{i}.{n}");
        let (d, q, kv, ff) = (spec.n_embd, spec.q_dim(), spec.kv_dim(), spec.n_ff);
        let fam = spec.family;
        let qkv = if has(file, &p("attn_qkv.weight")) {
            vec![matrix_of(file, &p("attn_qkv.weight"), q + 2 * kv, d)?]
        } else {
            vec![
                matrix_of(file, &p("attn_q.weight"), q, d)?,
                matrix_of(file, &p("attn_k.weight"), kv, d)?,
                matrix_of(file, &p("attn_v.weight"), kv, d)?,
            ]
        };
        // Biases: fused, or per projection (any of them; a missing one is zero).
        let qkv_bias = if has(file, &p("attn_qkv.bias")) {
            Some(vector_of(file, &p("attn_qkv.bias"), q + 2 * kv)?)
        } else if ["attn_q.bias", "attn_k.bias", "attn_v.bias"]
            .iter()
            .any(|n| has(file, &p(n)))
        {
            let mut b = Vec::with_capacity(q + 2 * kv);
            for (n, len) in [("attn_q.bias", q), ("attn_k.bias", kv), ("attn_v.bias", kv)] {
                if has(file, &p(n)) {
                    b.extend(vector_of(file, &p(n), len)?);
                } else {
                    b.extend(std::iter::repeat_n(0.0, len));
                }
            }
            Some(b)
        } else {
            None
        };
        let qk_norm = if fam.qk_norm {
            let hd = spec.head_dim;
            Some((
                vector_of(file, &p("attn_q_norm.weight"), hd)?,
                vector_of(file, &p("attn_k_norm.weight"), hd)?,
            ))
        } else {
            None
        };
        let gate_up = if has(file, &p("ffn_gate.weight")) {
            vec![
                matrix_of(file, &p("ffn_gate.weight"), ff, d)?,
                matrix_of(file, &p("ffn_up.weight"), ff, d)?,
            ]
        } else {
            // Phi-3: gate and up in one matrix, gate first.
            vec![matrix_of(file, &p("ffn_up.weight"), 2 * ff, d)?]
        };
        let post_norms = if fam.post_norms {
            Some((
                vector_of(file, &p("post_attention_norm.weight"), d)?,
                vector_of(file, &p("post_ffw_norm.weight"), d)?,
            ))
        } else {
            None
        };
        Ok(Layer {
            qkv,
            qkv_bias,
            qk_norm,
            wo: matrix_of(file, &p("attn_output.weight"), d, q)?,
            gate_up,
            w_down: matrix_of(file, &p("ffn_down.weight"), d, ff)?,
            attn_norm: vector_of(file, &p("attn_norm.weight"), d)?,
            ffn_norm: vector_of(file, &p("ffn_norm.weight"), d)?,
            post_norms,
            sliding: spec.sliding_layers[i],
        })
    }
}

impl CpuLlama {
    /// `context`: the most positions a sequence will hold, when less than the model's own
    /// length (it picks Phi-3's LongRoPE factors).
    pub fn load(
        file: &GgufFile,
        threads: usize,
        context: Option<usize>,
    ) -> Result<CpuLlama, EngineError> {
        let spec = file.spec.clone();
        let d = spec.n_embd;
        let embed = matrix(file, "token_embd.weight")?;
        if embed.cols() != d || embed.rows() < spec.vocab_size {
            return Err(EngineError::Model(format!(
                "token_embd.weight is {} × {}, the model needs {} × {d}",
                embed.rows(),
                embed.cols(),
                spec.vocab_size
            )));
        }
        let output = if has(file, "output.weight") {
            Some(matrix_of(file, "output.weight", embed.rows(), d)?)
        } else {
            None
        };
        let output_bias = if has(file, "output.bias") {
            Some(vector_of(file, "output.bias", embed.rows())?)
        } else {
            None
        };
        let norm = vector_of(file, "output_norm.weight", d)?;
        let layers = (0..spec.n_layer)
            .map(|i| Layer::load(file, &spec, i))
            .collect::<Result<Vec<_>, _>>()?;
        let r = spec.rope.clone();
        let half = r.dims / 2;
        let original = r.original_context_or(spec.context_length);
        let context = context.map_or(spec.context_length, |c| c.min(spec.context_length));
        // Frequency factors divide each pair's frequency (llama.cpp's `freq_factors`):
        // Llama 3.1+'s `rope_freqs` (long wavelengths turn slower, so the long context
        // works) and Phi-3's LongRoPE factors: the short ones when the context served fits
        // the original one, else the long ones, for every position (as llama.cpp chooses).
        let factors = if has(file, "rope_freqs.weight") {
            vector_of(file, "rope_freqs.weight", half)?
        } else if has(file, "rope_factors_short.weight") {
            let long = context > original && has(file, "rope_factors_long.weight");
            let name = if long {
                "rope_factors_long.weight"
            } else {
                "rope_factors_short.weight"
            };
            tracing::debug!(context, original, factors = name, "LongRoPE");
            vector_of(file, name, half)?
        } else {
            Vec::new()
        };
        let yarn = r.yarn.then_some(Yarn {
            original_context: original,
        });
        let rope_of = |base: f32, scale: f32| {
            Rope::new(r.style, r.dims, base, scale, &factors, r.attn_factor, yarn)
        };
        let rope = rope_of(r.freq_base, r.freq_scale);
        let local_rope = rope_of(r.local_freq_base, r.local_freq_scale);
        Ok(CpuLlama {
            spec,
            embed,
            output,
            output_bias,
            norm,
            layers,
            rope,
            local_rope,
            team: Team::new(threads),
        })
    }

    pub fn new_cache(&self, capacity: usize) -> CpuCache {
        let capacity = capacity.clamp(1, self.spec.context_length);
        let n = self.spec.n_layer * self.spec.n_kv_head * capacity * self.spec.head_dim;
        CpuCache {
            k: vec![0.0; n],
            v: vec![0.0; n],
            len: 0,
            capacity,
        }
    }

    /// The first `keep` positions of `old` in a cache of at least `capacity` positions:
    /// `old` itself, cut to `keep`, when it is big enough; else a copy into a bigger one.
    ///
    /// A copy grows the cache by half at least, as a `Vec` does: each turn of a chat asks
    /// for its prompt + `max_tokens`, which outgrows the last turn's cache almost every time,
    /// and the copy (46 KB a position for SmolLM2, into freshly faulted pages) grew with the
    /// conversation (~10 ms at 600 positions on a 2-core VM). With the headroom, a chat's
    /// cache is copied a few times over a conversation instead of at every turn.
    pub fn reuse_cache(&self, mut old: CpuCache, keep: usize, capacity: usize) -> CpuCache {
        let keep = keep.min(old.len);
        if old.capacity >= capacity.min(self.spec.context_length) {
            old.len = keep;
            return old;
        }
        let grown = capacity.max(keep).max(old.capacity + old.capacity / 2);
        let mut new = self.new_cache(grown);
        let hd = self.spec.head_dim;
        // Layout: [layer][kv head][position][dim], so each (layer, head) row of positions
        // is one contiguous run.
        for row in 0..self.spec.n_layer * self.spec.n_kv_head {
            let (src, dst) = (row * old.capacity * hd, row * new.capacity * hd);
            new.k[dst..dst + keep * hd].copy_from_slice(&old.k[src..src + keep * hd]);
            new.v[dst..dst + keep * hd].copy_from_slice(&old.v[src..src + keep * hd]);
        }
        new.len = keep;
        new
    }

    /// One step for a batch of sequences: each segment's tokens run after what its own
    /// cache holds, and the logits of each segment's last token come back, in order.
    ///
    /// Why one pass for all of them: decoding one token is memory-bound (every weight is
    /// read for one row of activations), so stacking the sequences' rows makes each weight
    /// read serve them all. Only attention is per sequence, on its own cache and positions.
    /// A prompt chunk is just a segment of many tokens, so prompts and decodes mix freely.
    /// Reached through `Model::forward_batch`, which checks each segment is non-empty and fits.
    pub(super) fn forward_batch(
        &self,
        segs: &mut [CpuSegment<'_>],
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        let s = &self.spec;
        let vocab = self.embed.rows();
        if let Some(&bad) = segs
            .iter()
            .flat_map(|g| g.tokens)
            .find(|&&t| t as usize >= vocab)
        {
            return Err(EngineError::Model(format!(
                "token id {bad} is outside the vocabulary ({vocab})"
            )));
        }
        let (d, hd, qd, kvd, ff) = (s.n_embd, s.head_dim, s.q_dim(), s.kv_dim(), s.n_ff);
        let eps = s.rms_norm_eps as f32;
        let fam = s.family;
        // One-token segments (generated tokens) first, then prompt chunks: see `product`.
        // A prompt's last token alone is a one-token segment too, alone or batched alike.
        let (singles, chunks): (Vec<usize>, Vec<usize>) =
            (0..segs.len()).partition(|&si| segs[si].tokens.len() == 1);
        let generated = singles.len();
        // Row r of the step is sequence `rows[r].0` at position `rows[r].1`.
        let mut rows: Vec<(usize, usize)> = Vec::new();
        let mut last_row = vec![0; segs.len()];
        for &si in singles.iter().chain(&chunks) {
            let g = &segs[si];
            rows.extend((0..g.tokens.len()).map(|i| (si, g.cache.len + i)));
            last_row[si] = rows.len() - 1;
        }
        let n = rows.len();
        let mut x = vec![0f32; n * d];
        for (&(si, pos), row) in rows.iter().zip(x.chunks_exact_mut(d)) {
            let g = &segs[si];
            self.embed.row(g.tokens[pos - g.cache.len] as usize, row);
        }
        if fam.embed_scale {
            let scale = (d as f32).sqrt();
            x.iter_mut().for_each(|v| *v *= scale);
        }
        // Each row's rope angles, per kind of layer, computed once for all layers.
        let half = self.rope.dims / 2;
        let angles = |rope: &Rope| {
            let mut cs = vec![0f32; n * 2 * half];
            for (&(_, pos), c) in rows.iter().zip(cs.chunks_exact_mut(2 * half)) {
                rope.angles(pos, c);
            }
            cs
        };
        let global_cs = angles(&self.rope);
        let local_cs = if s.sliding_window.is_some() {
            angles(&self.local_rope)
        } else {
            Vec::new()
        };
        let mut h = vec![0f32; n * d];
        let qkv_w = qd + 2 * kvd;
        let mut qkv = vec![0f32; n * qkv_w];
        let mut q = vec![0f32; n * qd];
        let mut att = vec![0f32; n * qd];
        let mut tmp = vec![0f32; n * d];
        let mut gate_up = vec![0f32; n * 2 * ff];
        let mut act = vec![0f32; n * ff];
        for (l, layer) in self.layers.iter().enumerate() {
            for (xi, hi) in x.chunks_exact(d).zip(h.chunks_exact_mut(d)) {
                rms_norm(xi, &layer.attn_norm, eps, hi);
            }
            let parts: Vec<&QMat> = layer.qkv.iter().collect();
            product(&parts, &h, n, generated, &mut qkv, &self.team);
            let (rope, cs, window) = if layer.sliding {
                (&self.local_rope, &local_cs, s.sliding_window)
            } else {
                (&self.rope, &global_cs, None)
            };
            for (i, &(si, pos)) in rows.iter().enumerate() {
                let row = &mut qkv[i * qkv_w..(i + 1) * qkv_w];
                if let Some(b) = &layer.qkv_bias {
                    row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
                }
                let (qr, kv) = row.split_at_mut(qd);
                let (kr, vr) = kv.split_at_mut(kvd);
                if let Some((qn, kn)) = &layer.qk_norm {
                    for head in qr.chunks_exact_mut(hd) {
                        rms_norm_in_place(head, qn, eps);
                    }
                    for head in kr.chunks_exact_mut(hd) {
                        rms_norm_in_place(head, kn, eps);
                    }
                }
                let c = &cs[i * 2 * half..(i + 1) * 2 * half];
                rope.apply(qr, hd, c);
                rope.apply(kr, hd, c);
                q[i * qd..(i + 1) * qd].copy_from_slice(qr);
                let cache = &mut *segs[si].cache;
                let layer_stride = s.n_kv_head * cache.capacity * hd;
                for kvh in 0..s.n_kv_head {
                    let at = l * layer_stride + (kvh * cache.capacity + pos) * hd;
                    cache.k[at..at + hd].copy_from_slice(&kr[kvh * hd..(kvh + 1) * hd]);
                    cache.v[at..at + hd].copy_from_slice(&vr[kvh * hd..(kvh + 1) * hd]);
                }
            }
            let caches: Vec<&CpuCache> = segs.iter().map(|g| &*g.cache).collect();
            self.attention(l, &caches, &rows, &q, window, &mut att);
            product(&[&layer.wo], &att, n, generated, &mut tmp, &self.team);
            if let Some((post, _)) = &layer.post_norms {
                tmp.chunks_exact_mut(d)
                    .for_each(|t| rms_norm_in_place(t, post, eps));
            }
            x.iter_mut().zip(&tmp).for_each(|(a, b)| *a += b);
            for (xi, hi) in x.chunks_exact(d).zip(h.chunks_exact_mut(d)) {
                rms_norm(xi, &layer.ffn_norm, eps, hi);
            }
            let parts: Vec<&QMat> = layer.gate_up.iter().collect();
            product(&parts, &h, n, generated, &mut gate_up, &self.team);
            for (a, gu) in act.chunks_exact_mut(ff).zip(gate_up.chunks_exact(2 * ff)) {
                let (g, u) = gu.split_at(ff);
                match fam.activation {
                    Activation::Silu => swiglu(g, u, a),
                    Activation::GeluTanh => geglu(g, u, a),
                }
            }
            product(&[&layer.w_down], &act, n, generated, &mut tmp, &self.team);
            if let Some((_, post)) = &layer.post_norms {
                tmp.chunks_exact_mut(d)
                    .for_each(|t| rms_norm_in_place(t, post, eps));
            }
            x.iter_mut().zip(&tmp).for_each(|(a, b)| *a += b);
        }
        // Each segment's last row, normalised, then one product with the output layer
        // (as generated rows for everyone: the same kernel alone or batched).
        let mut last = vec![0f32; segs.len() * d];
        for ((g, out), &r) in segs.iter_mut().zip(last.chunks_exact_mut(d)).zip(&last_row) {
            g.cache.len += g.tokens.len();
            rms_norm(&x[r * d..(r + 1) * d], &self.norm, eps, out);
        }
        let out = self.output.as_ref().unwrap_or(&self.embed);
        let mut logits = vec![0f32; segs.len() * out.rows()];
        out.matmul(&last, segs.len(), &mut logits, &self.team, Rows::Generated);
        for row in logits.chunks_exact_mut(out.rows()) {
            if let Some(b) = &self.output_bias {
                row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
            }
            if let Some(cap) = s.final_softcap {
                row.iter_mut().for_each(|v| *v = cap * (*v / cap).tanh());
            }
        }
        Ok(logits
            .chunks_exact(out.rows())
            .map(<[f32]>::to_vec)
            .collect())
    }

    /// Causal attention of each row's query (row r: sequence `rows[r].0` at position
    /// `rows[r].1`) over its own sequence's cache, into `out`.
    fn attention(
        &self,
        l: usize,
        caches: &[&CpuCache],
        rows: &[(usize, usize)],
        q: &[f32],
        window: Option<usize>,
        out: &mut [f32],
    ) {
        let s = &self.spec;
        let (qd, hd) = (s.q_dim(), s.head_dim);
        let group = s.n_head / s.n_kv_head;
        let scale = s.query_scale;
        let items = rows.len() * s.n_kv_head;
        debug_assert_eq!(out.len(), rows.len() * s.n_head * hd);
        let out_ptr = SyncPtr(out.as_mut_ptr());
        // One item per (row, KV head), covering the `group` query heads that share it, so
        // each cached key and value is read once for all of them. Thread `tid` takes every
        // `size`-th item, which spreads long and short contexts evenly; the team's helpers
        // are awake from the products around.
        let size = self.team.size();
        self.team.run(&|tid| {
            // The whole wrapper, not its field: only the wrapper is `Sync`.
            let out_ptr = &out_ptr;
            let mut scores = Vec::new();
            for idx in (tid..items).step_by(size) {
                let (i, kvh) = (idx / s.n_kv_head, idx % s.n_kv_head);
                let (si, pos) = rows[i];
                let cache = caches[si];
                let base = l * s.n_kv_head * cache.capacity * hd + kvh * cache.capacity * hd;
                // A sliding-window layer sees the last `window` positions (llama.cpp
                // masks p0 when p1 - p0 >= window).
                let start = window.map_or(0, |w| (pos + 1).saturating_sub(w));
                let len = pos + 1 - start;
                let first = kvh * group;
                let qs = &q[i * qd + first * hd..i * qd + (first + group) * hd];
                // SAFETY: item `idx` owns the `group` heads of row i that read KV head
                // `kvh`: cells (i·n_head + first)·hd .. +group·hd of `out`, which outlives
                // `team.run`; no other item writes them.
                let o = unsafe {
                    std::slice::from_raw_parts_mut(
                        out_ptr.0.add((i * s.n_head + first) * hd),
                        group * hd,
                    )
                };
                let span = base + start * hd..base + (start + len) * hd;
                let (keys, values) = (&cache.k[span.clone()], &cache.v[span]);
                attend(
                    qs,
                    group,
                    hd,
                    keys,
                    values,
                    len,
                    scale,
                    s.attn_softcap,
                    &mut scores,
                    o,
                );
            }
        });
    }
}
