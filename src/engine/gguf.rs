//! Reading a GGUF file's header: the model's shape, its tokenizer data and chat template.

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, Value};
use memmap2::Mmap;

use super::EngineError;

/// Architectures whose tensors and hyper-parameters the engine's llama code understands.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama"];

/// The hyper-parameters of a llama-family model, from `llama.*` metadata keys.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub architecture: String,
    /// A human name from `general.name`, when present.
    pub name: Option<String>,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub n_ff: usize,
    /// Longest sequence the model was trained for.
    pub context_length: usize,
    pub rope_freq_base: f32,
    pub rms_norm_eps: f64,
    pub vocab_size: usize,
    /// Values in all the file's tensors.
    pub parameters: u64,
    /// The file's quantization as llama.cpp names it (`Q4_K_M`, `Q8_0`, …): from
    /// `general.file_type`, else the format most of the weight bytes are in.
    pub quantization: String,
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
    let v = get(md, key)?;
    v.to_u32()
        .map(|n| n as usize)
        .or_else(|_| v.to_u64().map(|n| n as usize))
        .map_err(|e| EngineError::Model(format!("GGUF `{key}`: {e}")))
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

impl ModelSpec {
    pub fn from_metadata(md: &HashMap<String, Value>) -> Result<ModelSpec, EngineError> {
        let architecture = md_string(md, "general.architecture")
            .ok_or_else(|| {
                EngineError::Model("GGUF metadata has no `general.architecture`".into())
            })?
            .to_string();
        if !SUPPORTED_ARCHITECTURES.contains(&architecture.as_str()) {
            return Err(EngineError::UnsupportedArchitecture(architecture));
        }
        let a = &architecture;
        let n_embd = get_usize(md, &format!("{a}.embedding_length"))?;
        let n_head = get_usize(md, &format!("{a}.attention.head_count"))?;
        let n_kv_head = get_usize(md, &format!("{a}.attention.head_count_kv")).unwrap_or(n_head);
        if n_head == 0 || n_embd % n_head != 0 || n_kv_head == 0 || n_head % n_kv_head != 0 {
            return Err(EngineError::Model(format!(
                "inconsistent attention shape: {n_embd} wide, {n_head} heads, {n_kv_head} KV heads"
            )));
        }
        let vocab_size = match md
            .get("tokenizer.ggml.tokens")
            .and_then(|v| v.to_vec().ok())
        {
            Some(tokens) => tokens.len(),
            None => get_usize(md, &format!("{a}.vocab_size"))?,
        };
        Ok(ModelSpec {
            name: md_string(md, "general.name").map(str::to_string),
            n_layer: get_usize(md, &format!("{a}.block_count"))?,
            n_embd,
            n_head,
            n_kv_head,
            head_dim: n_embd / n_head,
            n_ff: get_usize(md, &format!("{a}.feed_forward_length"))?,
            context_length: get_usize(md, &format!("{a}.context_length"))?,
            rope_freq_base: md
                .get(&format!("{a}.rope.freq_base"))
                .and_then(|v| v.to_f32().ok())
                .unwrap_or(10_000.0),
            rms_norm_eps: md
                .get(&format!("{a}.attention.layer_norm_rms_epsilon"))
                .and_then(|v| v.to_f32().ok())
                .unwrap_or(1e-5) as f64,
            vocab_size,
            architecture,
            parameters: 0,
            quantization: String::new(),
        })
    }
}
