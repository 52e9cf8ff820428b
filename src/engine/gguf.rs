//! Reading a GGUF file's header: the model's shape, its tokenizer data and chat template.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, Value};
use memmap2::Mmap;

use super::EngineError;

use super::arch::{self, Family};

/// The hyper-parameters of a model, from its `{architecture}.*` metadata keys, read as
/// llama.cpp reads them (`llama_model::load_hparams`).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub architecture: String,
    /// What the architecture changes in the forward pass.
    pub family: &'static Family,
    /// A human name from `general.name`, when present.
    pub name: Option<String>,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    /// Width of one head (`attention.key_length`; n_embd / n_head unless the file says):
    /// Gemma and Qwen 3 heads are wider than n_embd / n_head.
    pub head_dim: usize,
    pub n_ff: usize,
    /// Longest sequence the model was trained for.
    pub context_length: usize,
    pub rope: RopeSpec,
    pub rms_norm_eps: f64,
    /// The window of the sliding-window layers (those marked in `sliding_layers`).
    pub sliding_window: Option<usize>,
    /// Per layer: whether it attends within `sliding_window` only.
    pub sliding_layers: Vec<bool>,
    /// Attention scores are multiplied by this (1/√head_dim, or Gemma's rule).
    pub query_scale: f32,
    /// `cap·tanh(s/cap)` on attention scores (Gemma 2).
    pub attn_softcap: Option<f32>,
    /// `cap·tanh(l/cap)` on the final logits (Gemma 2, some Gemma 3).
    pub final_softcap: Option<f32>,
    pub vocab_size: usize,
    /// Values in all the file's tensors.
    pub parameters: u64,
    /// The file's quantization as llama.cpp names it (`Q4_K_M`, `Q8_0`, …): from
    /// `general.file_type`, else the format most of the weight bytes are in.
    pub quantization: String,
}

/// The rotary embedding: which dimensions turn, how fast.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeSpec {
    pub style: arch::RopeStyle,
    /// Dimensions of each head that turn (`rope.dimension_count`); the rest pass through.
    pub dims: usize,
    pub freq_base: f32,
    /// Positions are multiplied by this: 1 / the linear scaling factor.
    pub freq_scale: f32,
    /// cos and sin are multiplied by this (`rope.scaling.attn_factor`, LongRoPE files).
    pub attn_factor: f32,
    /// Base and scale of the sliding-window layers (Gemma 3 turns them at 10 000 with no
    /// scaling while its global layers use 1 000 000 and a linear factor).
    pub local_freq_base: f32,
    pub local_freq_scale: f32,
    /// The context the model had before its rope was scaled
    /// (`rope.scaling.original_context_length`), where the file says.
    pub original_context: Option<usize>,
    /// YaRN scaling (`rope.scaling.type = yarn`): instead of every frequency slowing by
    /// `freq_scale`, the fast ones (many turns within the original context) keep their
    /// speed, the slow ones are scaled, and a ramp blends those between; cos and sin grow
    /// by `1 + 0.1 ln(1 / freq_scale)`. As llama.cpp's `ggml_rope_yarn`.
    pub yarn: bool,
}

impl RopeSpec {
    /// The context YaRN's correction dimensions and Phi-3's choice of LongRoPE factors are
    /// measured against: the original one, else the trained one.
    pub fn original_context_or(&self, trained: usize) -> usize {
        self.original_context.unwrap_or(trained)
    }
}

impl ModelSpec {
    /// Width of all query heads together (n_head × head_dim; not always n_embd).
    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }

    /// Width of all key (or value) heads together.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_head * self.head_dim
    }
}

/// The parsed header of a GGUF file, and the whole file mapped into memory.
pub struct GgufFile {
    pub content: Content,
    pub spec: ModelSpec,
    /// The file's bytes: the CPU path reads its weights here, in place (see
    /// `kernels::QMat::mapped`), so they share the page cache and loading copies nothing.
    pub map: Arc<Mmap>,
}

fn get<'a>(md: &'a HashMap<String, Value>, key: &str) -> Result<&'a Value, EngineError> {
    md.get(key)
        .ok_or_else(|| EngineError::Model(format!("GGUF metadata has no `{key}`")))
}

fn get_usize(md: &HashMap<String, Value>, key: &str) -> Result<usize, EngineError> {
    value_usize(get(md, key)?)
        .ok_or_else(|| EngineError::Model(format!("GGUF `{key}`: not a non-negative integer")))
}

/// An integer metadata value of any width (converters differ: u32, i32, u64).
fn value_usize(v: &Value) -> Option<usize> {
    match *v {
        Value::U8(n) => Some(n as usize),
        Value::U16(n) => Some(n as usize),
        Value::U32(n) => Some(n as usize),
        Value::U64(n) => usize::try_from(n).ok(),
        Value::I8(n) => usize::try_from(n).ok(),
        Value::I16(n) => usize::try_from(n).ok(),
        Value::I32(n) => usize::try_from(n).ok(),
        Value::I64(n) => usize::try_from(n).ok(),
        _ => None,
    }
}

/// A metadata string, if present and a string.
pub fn md_string<'a>(md: &'a HashMap<String, Value>, key: &str) -> Option<&'a str> {
    md.get(key)
        .and_then(|v| v.to_string().ok())
        .map(String::as_str)
}

/// A metadata unsigned integer, if present.
pub fn md_u32(md: &HashMap<String, Value>, key: &str) -> Option<u32> {
    md.get(key).and_then(|v| v.to_u32().ok())
}

impl GgufFile {
    /// Reads the header (not the tensor data) and checks the architecture.
    pub fn open(path: &Path) -> Result<(GgufFile, BufReader<File>), EngineError> {
        let file = File::open(path).map_err(|e| {
            EngineError::Model(format!("cannot open model file {}: {e}", path.display()))
        })?;
        // SAFETY: the map is read-only; like every program that maps a model (llama.cpp
        // does the same), confab relies on the file not being truncated or rewritten while
        // it serves from it (a replaced file — a new inode — is fine).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| {
            EngineError::Model(format!("cannot map model file {}: {e}", path.display()))
        })?;
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader).map_err(|e| {
            EngineError::Model(format!(
                "{} is not a readable GGUF file: {e}",
                path.display()
            ))
        })?;
        let mut spec = ModelSpec::from_metadata(&content.metadata)?;
        spec.parameters = content
            .tensor_infos
            .values()
            .map(|t| t.shape.elem_count() as u64)
            .sum();
        spec.quantization = quantization(&content);
        Ok((
            GgufFile {
                content,
                spec,
                map: Arc::new(map),
            },
            reader,
        ))
    }
}

/// llama.cpp's names of `general.file_type` values (its `llama_ftype`).
fn file_type_name(t: u32) -> Option<&'static str> {
    Some(match t {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        32 => "BF16",
        _ => return None,
    })
}

/// The file's quantization: its declared file type, else the tensor type with the most
/// bytes.
fn quantization(content: &Content) -> String {
    if let Some(name) = md_u32(&content.metadata, "general.file_type").and_then(file_type_name) {
        return name.to_string();
    }
    let mut bytes: HashMap<String, usize> = HashMap::new();
    for t in content.tensor_infos.values() {
        let n = t.shape.elem_count() / t.ggml_dtype.block_size() * t.ggml_dtype.type_size();
        *bytes
            .entry(format!("{:?}", t.ggml_dtype).to_uppercase())
            .or_default() += n;
    }
    bytes
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .map_or_else(|| "unknown".into(), |(name, _)| name)
}

fn get_f32(md: &HashMap<String, Value>, key: &str) -> Option<f32> {
    md.get(key).and_then(|v| {
        v.to_f32()
            .ok()
            .or_else(|| v.to_f64().ok().map(|x| x as f32))
    })
}

impl ModelSpec {
    pub fn from_metadata(md: &HashMap<String, Value>) -> Result<ModelSpec, EngineError> {
        let architecture = md_string(md, "general.architecture")
            .ok_or_else(|| {
                EngineError::Model("GGUF metadata has no `general.architecture`".into())
            })?
            .to_string();
        let family = arch::family(&architecture)
            .ok_or_else(|| EngineError::UnsupportedArchitecture(architecture.clone()))?;
        let a = &architecture;
        let key = |k: &str| format!("{a}.{k}");
        let bad = |m: String| Err(EngineError::Model(m));
        let n_embd = get_usize(md, &key("embedding_length"))?;
        let n_layer = get_usize(md, &key("block_count"))?;
        let n_head = get_usize(md, &key("attention.head_count"))?;
        let n_kv_head = get_usize(md, &key("attention.head_count_kv")).unwrap_or(n_head);
        if n_head == 0 || n_kv_head == 0 || n_head % n_kv_head != 0 {
            return bad(format!(
                "inconsistent attention shape: {n_head} heads, {n_kv_head} KV heads"
            ));
        }
        let head_dim = match get_usize(md, &key("attention.key_length")) {
            Ok(k) => k,
            Err(_) if n_embd % n_head == 0 => n_embd / n_head,
            Err(_) => {
                return bad(format!(
                    "{n_embd} wide with {n_head} heads and no `{a}.attention.key_length`"
                ))
            }
        };
        if let Ok(v) = get_usize(md, &key("attention.value_length")) {
            if v != head_dim {
                return bad(format!(
                    "keys {head_dim} and values {v} wide: heads of two widths are not supported"
                ));
            }
        }
        let dims = get_usize(md, &key("rope.dimension_count")).unwrap_or(head_dim);
        if dims == 0 || dims > head_dim || !dims.is_multiple_of(2) || !head_dim.is_multiple_of(2) {
            return bad(format!(
                "rope turns {dims} dimensions of {head_dim}-wide heads"
            ));
        }
        let context_length = get_usize(md, &key("context_length"))?;
        // Linear, YaRN and LongRoPE (Phi-3: the factors are tensors) scaling; anything else
        // is refused rather than run wrong.
        let scaling = md_string(md, &key("rope.scaling.type")).unwrap_or("linear");
        let factor = get_f32(md, &key("rope.scaling.factor"))
            .or_else(|| get_f32(md, &key("rope.scale_linear")))
            .filter(|f| *f != 0.0);
        let freq_scale = match scaling {
            "none" => 1.0,
            "linear" | "longrope" | "yarn" => factor.map_or(1.0, |f| 1.0 / f),
            other => {
                return bad(format!(
                    "rope scaling `{other}` is not supported (supported: none, linear, yarn, \
                     and Phi-3's LongRoPE factors)"
                ))
            }
        };
        if md.contains_key(&key("rope.scaling.yarn_log_multiplier")) {
            return bad(
                "YaRN with `rope.scaling.yarn_log_multiplier` (DeepSeek's attention scaling) \
                 is not supported"
                    .into(),
            );
        }
        let freq_base = get_f32(md, &key("rope.freq_base")).unwrap_or(10_000.0);
        let (local_freq_base, local_freq_scale) = match family.sliding {
            // Gemma 3: local layers turn at their own base (10 000 unless the file says),
            // unscaled. Gemma 2: as the global ones.
            Some(s) if s.default_window.is_none() => (
                get_f32(md, &key("rope.freq_base_swa")).unwrap_or(10_000.0),
                1.0,
            ),
            _ => (
                get_f32(md, &key("rope.freq_base_swa")).unwrap_or(freq_base),
                freq_scale,
            ),
        };
        let rope = RopeSpec {
            style: family.rope,
            dims,
            freq_base,
            freq_scale,
            attn_factor: get_f32(md, &key("rope.scaling.attn_factor")).unwrap_or(1.0),
            local_freq_base,
            local_freq_scale,
            original_context: get_usize(md, &key("rope.scaling.original_context_length")).ok(),
            yarn: scaling == "yarn",
        };
        let (sliding_window, sliding_layers) = sliding(md, family, &key, n_layer)?;
        let query_scale = match family.wide_query_scale_layers {
            Some(n) if n == n_layer => 1.0 / ((n_embd / n_head) as f32).sqrt(),
            _ => 1.0 / (head_dim as f32).sqrt(),
        };
        let softcap =
            |k: &str, default: Option<f32>| get_f32(md, &key(k)).or(default).filter(|c| *c > 0.0);
        let vocab_size = match md
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.to_vec().ok())
        {
            Some(tokens) => tokens.len(),
            None => get_usize(md, &key("vocab_size"))?,
        };
        Ok(ModelSpec {
            name: md_string(md, "general.name").map(str::to_string),
            family,
            n_layer,
            n_embd,
            n_head,
            n_kv_head,
            head_dim,
            n_ff: get_usize(md, &key("feed_forward_length"))?,
            context_length,
            rope,
            rms_norm_eps: get_f32(md, &key("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5)
                as f64,
            sliding_window,
            sliding_layers,
            query_scale,
            attn_softcap: family
                .attn_softcap
                .and_then(|d| softcap("attn_logit_softcapping", Some(d))),
            final_softcap: softcap("final_logit_softcapping", family.final_softcap),
            vocab_size,
            architecture,
            parameters: 0,
            quantization: String::new(),
        })
    }
}

/// The sliding window and which layers use it, as llama.cpp reads them: a family's default
/// pattern unless `attention.sliding_window_pattern` gives a period or a per-layer list.
fn sliding(
    md: &HashMap<String, Value>,
    family: &Family,
    key: &dyn Fn(&str) -> String,
    n_layer: usize,
) -> Result<(Option<usize>, Vec<bool>), EngineError> {
    let none = (None, vec![false; n_layer]);
    let Some(defaults) = family.sliding.filter(|_| family.reads_window) else {
        return Ok(none);
    };
    let window = match get_usize(md, &key("attention.sliding_window")) {
        Ok(0) => return Ok(none),
        Ok(w) => w,
        Err(_) => match defaults.default_window {
            Some(w) => w,
            None => return Ok(none),
        },
    };
    let layers = match md.get(&key("attention.sliding_window_pattern")) {
        Some(Value::Array(flags)) => {
            let flags: Vec<bool> = flags.iter().filter_map(|v| v.to_bool().ok()).collect();
            if flags.len() != n_layer {
                return Err(EngineError::Model(format!(
                    "`{}` lists {} layers, the model has {n_layer}",
                    key("attention.sliding_window_pattern"),
                    flags.len()
                )));
            }
            flags
        }
        Some(v) => arch::sliding_layers(n_layer, value_usize(v).unwrap_or(defaults.pattern)),
        None => arch::sliding_layers(n_layer, defaults.pattern),
    };
    Ok((Some(window), layers))
}
