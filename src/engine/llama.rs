//! The llama model on candle, used on GPUs (the CPU uses [`super::cpu`]): a fork of
//! candle-transformers' `quantized_llama`, reshaped for a chat server.
//!
//! What differs from the shipped model, and why:
//! - Weights and per-sequence state are separate: [`Llama`] is immutable and [`KvCache`]
//!   belongs to one sequence, so many sequences (and, later, cached chats) share one model.
//! - The KV cache is allocated once per sequence at the size it will need and written in
//!   place, instead of a `Tensor::cat` (a full copy) per token; `len == 0` starts fresh rather
//!   than silently dropping state.
//! - The whole trained context (8192 for SmolLM2) is usable; RoPE tables cover it.
//! - Attention masks are built per call; there is no cache that grows without bound.
//! - Grouped-query attention folds the query heads of one KV head into rows instead of
//!   copying the keys and values `n_head / n_kv_head` times.
//! - Tied embeddings: without `output.weight` the token embedding doubles as output layer.

use std::io::{Read, Seek};

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};
use candle_transformers::quantized_nn::RmsNorm;

use super::gguf::{GgufFile, ModelSpec};
use super::EngineError;

struct Layer {
    wq: QMatMul,
    wk: QMatMul,
    wv: QMatMul,
    wo: QMatMul,
    w_gate: QMatMul,
    w_up: QMatMul,
    w_down: QMatMul,
    attn_norm: RmsNorm,
    ffn_norm: RmsNorm,
}

/// The model weights; shared by every sequence.
pub struct Llama {
    pub spec: ModelSpec,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: RmsNorm,
    output: QMatMul,
    cos: Tensor,
    sin: Tensor,
    device: Device,
}

/// One sequence's keys and values, allocated up front for `capacity` positions.
pub struct KvCache {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    len: usize,
    capacity: usize,
}

impl KvCache {
    /// Positions filled so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn bytes(&self) -> usize {
        self.k
            .iter()
            .chain(&self.v)
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }
}

fn model_err(e: candle_core::Error) -> EngineError {
    EngineError::Model(e.to_string())
}

fn rope_tables(spec: &ModelSpec, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
    let half = spec.head_dim / 2;
    let theta: Vec<f32> = (0..half)
        .map(|i| {
            1f32 / spec
                .rope
                .freq_base
                .powf(2.0 * i as f32 / spec.head_dim as f32)
        })
        .collect();
    let n = spec.context_length;
    let mut angles = Vec::with_capacity(n * half);
    for p in 0..n {
        for t in &theta {
            angles.push(p as f32 * t);
        }
    }
    let angles = Tensor::from_vec(angles, (n, half), device)?;
    Ok((angles.cos()?, angles.sin()?))
}

impl Llama {
    /// Loads all tensors of a llama GGUF onto `device`.
    pub fn load<R: Read + Seek>(
        file: &GgufFile,
        reader: &mut R,
        device: &Device,
    ) -> Result<Llama, EngineError> {
        let ct = &file.content;
        let spec = file.spec.clone();
        // The candle path is Llama's pass as it was before architectures became data; the
        // GPU issue brings it to the CPU path's families.
        if spec.family.name != "llama"
            || spec.head_dim * spec.n_head != spec.n_embd
            || spec.rope.yarn
        {
            return Err(EngineError::Device(format!(
                "the GPU path runs llama-architecture models without YaRN only; run this {} \
                 model on the CPU (--device cpu)",
                spec.architecture
            )));
        }
        let mut get = |name: &str| -> Result<QTensor, EngineError> {
            ct.tensor(reader, name, device)
                .map_err(|e| EngineError::Model(format!("tensor {name}: {e}")))
        };
        let eps = spec.rms_norm_eps;
        let embed_q = get("token_embd.weight")?;
        let embed = embed_q.dequantize(device).map_err(model_err)?;
        let output = match get("output.weight") {
            Ok(t) => t,
            Err(_) => embed_q,
        };
        let norm = RmsNorm::from_qtensor(get("output_norm.weight")?, eps).map_err(model_err)?;
        let mut layers = Vec::with_capacity(spec.n_layer);
        for i in 0..spec.n_layer {
            let mut lin = |n: &str| -> Result<QMatMul, EngineError> {
                let t = get(&format!("blk.{i}.{n}.weight"))?;
                QMatMul::from_qtensor(t).map_err(model_err)
            };
            let layer = Layer {
                wq: lin("attn_q")?,
                wk: lin("attn_k")?,
                wv: lin("attn_v")?,
                wo: lin("attn_output")?,
                w_gate: lin("ffn_gate")?,
                w_up: lin("ffn_up")?,
                w_down: lin("ffn_down")?,
                attn_norm: RmsNorm::from_qtensor(get(&format!("blk.{i}.attn_norm.weight"))?, eps)
                    .map_err(model_err)?,
                ffn_norm: RmsNorm::from_qtensor(get(&format!("blk.{i}.ffn_norm.weight"))?, eps)
                    .map_err(model_err)?,
            };
            layers.push(layer);
        }
        let output = QMatMul::from_qtensor(output).map_err(model_err)?;
        let (cos, sin) = rope_tables(&spec, device).map_err(model_err)?;
        Ok(Llama {
            spec,
            embed,
            layers,
            norm,
            output,
            cos,
            sin,
            device: device.clone(),
        })
    }

    /// A fresh cache for a sequence of at most `capacity` tokens (clamped to the context).
    pub fn new_cache(&self, capacity: usize) -> Result<KvCache, EngineError> {
        let capacity = capacity.clamp(1, self.spec.context_length);
        let shape = (1, self.spec.n_kv_head, capacity, self.spec.head_dim);
        let mut k = Vec::with_capacity(self.layers.len());
        let mut v = Vec::with_capacity(self.layers.len());
        for _ in &self.layers {
            k.push(Tensor::zeros(shape, DType::F32, &self.device).map_err(model_err)?);
            v.push(Tensor::zeros(shape, DType::F32, &self.device).map_err(model_err)?);
        }
        Ok(KvCache {
            k,
            v,
            len: 0,
            capacity,
        })
    }

    /// Runs `tokens` (appended after what the cache holds) and returns the logits of the
    /// last one. Reached through `Model::forward`, which checks the chunk is non-empty and fits.
    pub(super) fn forward(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
    ) -> Result<Vec<f32>, EngineError> {
        self.forward_inner(tokens, cache).map_err(model_err)
    }

    fn forward_inner(&self, tokens: &[u32], cache: &mut KvCache) -> candle_core::Result<Vec<f32>> {
        let s = &self.spec;
        let seq = tokens.len();
        let pos = cache.len;
        let kv_len = pos + seq;
        let group = s.n_head / s.n_kv_head;
        let ids = Tensor::new(tokens, &self.device)?;
        let mut x = self.embed.index_select(&ids, 0)?.unsqueeze(0)?;
        let cos = self.cos.narrow(0, pos, seq)?;
        let sin = self.sin.narrow(0, pos, seq)?;
        let mask = if seq > 1 {
            Some(self.mask(seq, pos, group)?)
        } else {
            None
        };
        let scale = 1.0 / (s.head_dim as f64).sqrt();
        for (l, layer) in self.layers.iter().enumerate() {
            let h = layer.attn_norm.forward(&x)?;
            let q = layer
                .wq
                .forward(&h)?
                .reshape((1, seq, s.n_head, s.head_dim))?
                .transpose(1, 2)?
                .contiguous()?;
            let k = layer
                .wk
                .forward(&h)?
                .reshape((1, seq, s.n_kv_head, s.head_dim))?
                .transpose(1, 2)?
                .contiguous()?;
            let v = layer
                .wv
                .forward(&h)?
                .reshape((1, seq, s.n_kv_head, s.head_dim))?
                .transpose(1, 2)?
                .contiguous()?;
            let q = candle_nn::rotary_emb::rope_i(&q, &cos, &sin)?;
            let k = candle_nn::rotary_emb::rope_i(&k, &cos, &sin)?;
            cache.k[l].slice_set(&k, 2, pos)?;
            cache.v[l].slice_set(&v, 2, pos)?;
            let keys = cache.k[l].narrow(2, 0, kv_len)?;
            let values = cache.v[l].narrow(2, 0, kv_len)?;
            // The query heads that share a KV head become rows of one matrix.
            let q = q.reshape((1, s.n_kv_head, group * seq, s.head_dim))?;
            let att = (q.matmul(&keys.t()?)? * scale)?;
            let att = match &mask {
                Some(m) => att.broadcast_add(m)?,
                None => att,
            };
            let att = candle_nn::ops::softmax_last_dim(&att)?;
            let y = att.matmul(&values)?;
            let y = y
                .reshape((1, s.n_head, seq, s.head_dim))?
                .transpose(1, 2)?
                .reshape((1, seq, s.n_embd))?;
            x = (layer.wo.forward(&y)? + x)?;
            let h = layer.ffn_norm.forward(&x)?;
            let gate = candle_nn::ops::silu(&layer.w_gate.forward(&h)?)?;
            let up = layer.w_up.forward(&h)?;
            x = (layer.w_down.forward(&(gate * up)?)? + x)?;
        }
        cache.len = kv_len;
        let last = x.narrow(1, seq - 1, 1)?.contiguous()?;
        let logits = self.output.forward(&self.norm.forward(&last)?)?;
        logits.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()
    }

    /// Additive causal mask for `seq` new queries at `pos`, with the `group` query heads
    /// of a KV head stacked as rows: row `r` is query `pos + r % seq`.
    fn mask(&self, seq: usize, pos: usize, group: usize) -> candle_core::Result<Tensor> {
        let kv_len = pos + seq;
        let mut m = vec![0f32; group * seq * kv_len];
        for r in 0..group * seq {
            let q = pos + r % seq;
            for j in (q + 1)..kv_len {
                m[r * kv_len + j] = f32::NEG_INFINITY;
            }
        }
        Tensor::from_vec(m, (group * seq, kv_len), &self.device)
    }
}
