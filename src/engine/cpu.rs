//! The llama forward pass on the CPU in plain Rust, around the kernels of [`super::kernels`].
//!
//! Same model as [`super::llama`] (the candle version, used on GPUs), but with f32
//! activations throughout (see `kernels` for why), 4-bit weights kept as stored, the token
//! embedding looked up row by row instead of held as a 113 MB f32 copy, and no per-op tensor
//! allocation. Layout of the KV cache: `[layer][kv_head][position][head_dim]`, allocated
//! once per sequence.

use super::gguf::{GgufFile, ModelSpec};
use super::kernels::formats::{quantize_q8_0, QK};
use super::kernels::{attend, matmul_parts, Format, QMat, Rows, SyncPtr};
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
    /// Query, key and value projections (one product of the three).
    wqkv: [QMat; 3],
    wo: QMat,
    /// Gate and up projections (one product of the two).
    w_gate_up: [QMat; 2],
    w_down: QMat,
    attn_norm: Vec<f32>,
    ffn_norm: Vec<f32>,
}

/// Model weights for the CPU path.
pub struct CpuLlama {
    pub spec: ModelSpec,
    embed: QMat,
    /// None: tied to the embedding.
    output: Option<QMat>,
    norm: Vec<f32>,
    layers: Vec<Layer>,
    /// cos/sin of position × frequency, `context_length × head_dim/2` each.
    cos: Vec<f32>,
    sin: Vec<f32>,
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

fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ms = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let s = 1.0 / (ms + eps).sqrt();
    for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
        *o = v * s * g;
    }
}

impl CpuLlama {
    pub fn load(file: &GgufFile, threads: usize) -> Result<CpuLlama, EngineError> {
        let spec = file.spec.clone();
        let embed = matrix(file, "token_embd.weight")?;
        let output = if file.content.tensor_infos.contains_key("output.weight") {
            Some(matrix(file, "output.weight")?)
        } else {
            None
        };
        let norm = vector(file, "output_norm.weight")?;
        let mut layers = Vec::with_capacity(spec.n_layer);
        for i in 0..spec.n_layer {
            let p = |n: &str| format!("blk.{i}.{n}.weight");
            layers.push(Layer {
                wqkv: [
                    matrix(file, &p("attn_q"))?,
                    matrix(file, &p("attn_k"))?,
                    matrix(file, &p("attn_v"))?,
                ],
                wo: matrix(file, &p("attn_output"))?,
                w_gate_up: [matrix(file, &p("ffn_gate"))?, matrix(file, &p("ffn_up"))?],
                w_down: matrix(file, &p("ffn_down"))?,
                attn_norm: vector(file, &p("attn_norm"))?,
                ffn_norm: vector(file, &p("ffn_norm"))?,
            });
        }
        let half = spec.head_dim / 2;
        // Llama 3.1+ rope scaling: `rope_freqs` divides each frequency (llama.cpp's
        // `freq_factors`); long-wavelength pairs turn slower, so the long context works.
        let factors = if file.content.tensor_infos.contains_key("rope_freqs.weight") {
            let f = vector(file, "rope_freqs.weight")?;
            if f.len() != half {
                return Err(EngineError::Model(format!(
                    "rope_freqs.weight has {} values, the heads need {half}",
                    f.len()
                )));
            }
            f
        } else {
            vec![1.0; half]
        };
        let mut cos = Vec::with_capacity(spec.context_length * half);
        let mut sin = Vec::with_capacity(spec.context_length * half);
        for pos in 0..spec.context_length {
            for (i, &factor) in factors.iter().enumerate() {
                let theta =
                    1.0 / (spec.rope_freq_base as f64).powf(2.0 * i as f64 / spec.head_dim as f64);
                let a = pos as f64 * theta / factor as f64;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Ok(CpuLlama {
            spec,
            embed,
            output,
            norm,
            layers,
            cos,
            sin,
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
        let (d, hd) = (s.n_embd, s.head_dim);
        let kv_dim = s.n_kv_head * hd;
        let eps = s.rms_norm_eps as f32;
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
        let mut h = vec![0f32; n * d];
        let qkv_w = d + 2 * kv_dim;
        let mut qkv = vec![0f32; n * qkv_w];
        let mut q = vec![0f32; n * d];
        let mut att = vec![0f32; n * d];
        let mut tmp = vec![0f32; n * d];
        let mut gate_up = vec![0f32; n * 2 * s.n_ff];
        let mut act = vec![0f32; n * s.n_ff];
        for (l, layer) in self.layers.iter().enumerate() {
            for (xi, hi) in x.chunks_exact(d).zip(h.chunks_exact_mut(d)) {
                rms_norm(xi, &layer.attn_norm, eps, hi);
            }
            let [wq, wk, wv] = &layer.wqkv;
            product(&[wq, wk, wv], &h, n, generated, &mut qkv, &self.team);
            for (i, &(si, pos)) in rows.iter().enumerate() {
                let row = &mut qkv[i * qkv_w..(i + 1) * qkv_w];
                let (qr, kv) = row.split_at_mut(d);
                let (kr, vr) = kv.split_at_mut(kv_dim);
                self.rope(qr, pos);
                self.rope(kr, pos);
                q[i * d..(i + 1) * d].copy_from_slice(qr);
                let cache = &mut *segs[si].cache;
                let layer_stride = s.n_kv_head * cache.capacity * hd;
                for kvh in 0..s.n_kv_head {
                    let at = l * layer_stride + (kvh * cache.capacity + pos) * hd;
                    cache.k[at..at + hd].copy_from_slice(&kr[kvh * hd..(kvh + 1) * hd]);
                    cache.v[at..at + hd].copy_from_slice(&vr[kvh * hd..(kvh + 1) * hd]);
                }
            }
            let caches: Vec<&CpuCache> = segs.iter().map(|g| &*g.cache).collect();
            self.attention(l, &caches, &rows, &q, &mut att);
            product(&[&layer.wo], &att, n, generated, &mut tmp, &self.team);
            x.iter_mut().zip(&tmp).for_each(|(a, b)| *a += b);
            for (xi, hi) in x.chunks_exact(d).zip(h.chunks_exact_mut(d)) {
                rms_norm(xi, &layer.ffn_norm, eps, hi);
            }
            let [wg, wu] = &layer.w_gate_up;
            product(&[wg, wu], &h, n, generated, &mut gate_up, &self.team);
            for (a, gu) in act
                .chunks_exact_mut(s.n_ff)
                .zip(gate_up.chunks_exact(2 * s.n_ff))
            {
                let (g, u) = gu.split_at(s.n_ff);
                for ((o, &g), &u) in a.iter_mut().zip(g).zip(u) {
                    *o = g / (1.0 + (-g).exp()) * u;
                }
            }
            product(&[&layer.w_down], &act, n, generated, &mut tmp, &self.team);
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
        Ok(logits
            .chunks_exact(out.rows())
            .map(<[f32]>::to_vec)
            .collect())
    }

    /// Rotates each head's consecutive pairs (GGUF llama layout) by the position's angles.
    fn rope(&self, v: &mut [f32], pos: usize) {
        let half = self.spec.head_dim / 2;
        let (cos, sin) = (
            &self.cos[pos * half..(pos + 1) * half],
            &self.sin[pos * half..(pos + 1) * half],
        );
        for head in v.chunks_exact_mut(self.spec.head_dim) {
            for i in 0..half {
                let (a, b) = (head[2 * i], head[2 * i + 1]);
                head[2 * i] = a * cos[i] - b * sin[i];
                head[2 * i + 1] = a * sin[i] + b * cos[i];
            }
        }
    }

    /// Causal attention of each row's query (row r: sequence `rows[r].0` at position
    /// `rows[r].1`) over its own sequence's cache, into `out`.
    fn attention(
        &self,
        l: usize,
        caches: &[&CpuCache],
        rows: &[(usize, usize)],
        q: &[f32],
        out: &mut [f32],
    ) {
        let s = &self.spec;
        let (d, hd) = (s.n_embd, s.head_dim);
        let group = s.n_head / s.n_kv_head;
        let scale = 1.0 / (hd as f32).sqrt();
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
                let len = pos + 1;
                let first = kvh * group;
                let qs = &q[i * d + first * hd..i * d + (first + group) * hd];
                // SAFETY: item `idx` owns the `group` heads of row i that read KV head
                // `kvh`: cells (i·n_head + first)·hd .. +group·hd of `out`, which outlives
                // `team.run`; no other item writes them.
                let o = unsafe {
                    std::slice::from_raw_parts_mut(
                        out_ptr.0.add((i * s.n_head + first) * hd),
                        group * hd,
                    )
                };
                let keys = &cache.k[base..base + len * hd];
                let values = &cache.v[base..base + len * hd];
                attend(qs, group, hd, keys, values, len, scale, &mut scores, o);
            }
        });
    }
}
