//! A tiny llama GGUF written by the tests themselves: random weights, a byte-level vocabulary
//! of 256 byte tokens, two merges and three special tokens. Small enough to load in
//! milliseconds, real enough to exercise the engine's loading, tokenizer, template, sampling,
//! stopping and cancellation code.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

pub const N_EMBD: usize = 64;
pub const N_LAYER: usize = 2;
pub const CONTEXT: usize = 256;
pub const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// GPT-2's byte-to-character table: printable bytes stand for themselves, the rest are
/// shifted above 255.
fn byte_tokens() -> Vec<String> {
    let mut printable: Vec<u32> = (33..=126).chain(161..=172).chain(174..=255).collect();
    let mut extra = 0;
    let mut map = vec![0u32; 256];
    for b in 0..256u32 {
        if printable.contains(&b) {
            map[b as usize] = b;
        } else {
            map[b as usize] = 256 + extra;
            extra += 1;
        }
    }
    printable.clear();
    map.iter()
        .map(|&c| char::from_u32(c).expect("valid char").to_string())
        .collect()
}

/// `n` deterministic values uniform in ±`scale` from a small LCG: weights without pulling in
/// an RNG (the reference models of `reference.rs` use them too, so their fixtures depend on
/// this exact sequence).
pub fn values(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 2.0 * scale
        })
        .collect()
}

fn tensor(seed: u64, rows: usize, cols: usize, dtype: GgmlDType, scale: f32) -> QTensor {
    let data = values(seed, rows * cols, scale);
    let t = Tensor::from_vec(data, (rows, cols), &Device::Cpu).expect("tensor");
    QTensor::quantize(&t, dtype).expect("quantize")
}

/// Writes the tiny model to `dir/tiny.gguf` (or with another architecture name) and returns
/// its path.
pub fn write(dir: &Path, architecture: &str) -> PathBuf {
    write_with_context(dir, architecture, CONTEXT)
}

/// [`write`] with another context length (tool prompts spelled in byte tokens need more).
pub fn write_with_context(dir: &Path, architecture: &str, context: usize) -> PathBuf {
    let mut tokens = byte_tokens();
    let merges = ["Ġ t", "h e"];
    for m in merges {
        tokens.push(m.replace(' ', ""));
    }
    let first_special = tokens.len() as u32;
    tokens.extend(SPECIALS.iter().map(|s| s.to_string()));
    let vocab = tokens.len();
    let mut types = vec![Value::I32(1); vocab];
    for t in types.iter_mut().skip(first_special as usize) {
        *t = Value::I32(3);
    }
    let a = architecture;
    let md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(a.into())),
        ("general.name".into(), Value::String("tiny-test".into())),
        (format!("{a}.embedding_length"), Value::U32(N_EMBD as u32)),
        (format!("{a}.attention.head_count"), Value::U32(4)),
        (format!("{a}.attention.head_count_kv"), Value::U32(2)),
        (format!("{a}.block_count"), Value::U32(N_LAYER as u32)),
        (format!("{a}.feed_forward_length"), Value::U32(128)),
        (format!("{a}.context_length"), Value::U32(context as u32)),
        (format!("{a}.rope.freq_base"), Value::F32(10000.0)),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(1e-5),
        ),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.iter().map(|t| Value::String(t.clone())).collect()),
        ),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(
                merges
                    .iter()
                    .map(|m| Value::String(m.to_string()))
                    .collect(),
            ),
        ),
        (
            "tokenizer.ggml.bos_token_id".into(),
            Value::U32(first_special + 1),
        ),
        (
            "tokenizer.ggml.eos_token_id".into(),
            Value::U32(first_special + 2),
        ),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
    ];
    // Special tokens get zero embeddings, so (tied) their logits are 0 while ordinary tokens
    // reach positive values: greedy decoding never ends early by chance.
    let embed = {
        let t = tensor(1, vocab, N_EMBD, GgmlDType::F32, 1.0)
            .dequantize(&Device::Cpu)
            .expect("deq");
        let mut rows: Vec<f32> = t.flatten_all().and_then(|x| x.to_vec1()).expect("vec");
        for r in first_special as usize..vocab {
            rows[r * N_EMBD..(r + 1) * N_EMBD].fill(0.0);
        }
        let t = Tensor::from_vec(rows, (vocab, N_EMBD), &Device::Cpu).expect("tensor");
        QTensor::quantize(&t, GgmlDType::Q8_0).expect("q8")
    };
    let mut tensors: Vec<(String, QTensor)> = vec![
        ("token_embd.weight".into(), embed),
        (
            "output_norm.weight".into(),
            tensor(2, 1, N_EMBD, GgmlDType::F32, 1.0),
        ),
    ];
    for l in 0..N_LAYER {
        let s = 100 * (l as u64 + 1);
        let q4 = GgmlDType::Q4_1;
        tensors.push((
            format!("blk.{l}.attn_q.weight"),
            tensor(s + 1, 64, 64, q4, 0.2),
        ));
        tensors.push((
            format!("blk.{l}.attn_k.weight"),
            tensor(s + 2, 32, 64, q4, 0.2),
        ));
        tensors.push((
            format!("blk.{l}.attn_v.weight"),
            tensor(s + 3, 32, 64, q4, 0.2),
        ));
        tensors.push((
            format!("blk.{l}.attn_output.weight"),
            tensor(s + 4, 64, 64, q4, 0.2),
        ));
        tensors.push((
            format!("blk.{l}.ffn_gate.weight"),
            tensor(s + 5, 128, 64, q4, 0.2),
        ));
        tensors.push((
            format!("blk.{l}.ffn_up.weight"),
            tensor(s + 6, 128, 64, q4, 0.2),
        ));
        tensors.push((
            format!("blk.{l}.ffn_down.weight"),
            tensor(s + 7, 64, 128, q4, 0.2),
        ));
        tensors.push((
            format!("blk.{l}.attn_norm.weight"),
            tensor(s + 8, 1, 64, GgmlDType::F32, 1.0),
        ));
        tensors.push((
            format!("blk.{l}.ffn_norm.weight"),
            tensor(s + 9, 1, 64, GgmlDType::F32, 1.0),
        ));
    }
    // Norm weights are vectors in GGUF.
    let tensors: Vec<(String, QTensor)> = tensors
        .into_iter()
        .map(|(n, t)| {
            if n.ends_with("norm.weight") {
                let v = t
                    .dequantize(&Device::Cpu)
                    .and_then(|x| x.flatten_all())
                    .expect("flat");
                let v = (v.abs().expect("abs") + 0.5).expect("shift");
                (n, QTensor::quantize(&v, GgmlDType::F32).expect("f32"))
            } else {
                (n, t)
            }
        })
        .collect();
    let path = dir.join(format!("tiny-{a}.gguf"));
    let mut f = std::fs::File::create(&path).expect("create gguf");
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut f, &md_refs, &t_refs).expect("write gguf");
    path
}
