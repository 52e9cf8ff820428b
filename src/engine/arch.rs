//! Architectures as data: what each GGUF `general.architecture` the engine runs changes in
//! the one forward pass of [`super::cpu`].
//!
//! Why data and not a forward pass per architecture: the families people run (Llama, Qwen,
//! Gemma, Phi-3, Mistral) are all the same decoder — RMS norm, rotary attention with grouped
//! KV heads, a gated FFN — and differ by a handful of named switches. A copy of the pass per
//! family would copy its batching, caching and kernel choices too, and every later change
//! (a kernel, a cache layout) would have to be made six times. Here a family is a row of
//! [`FAMILIES`]; what a file may or may not carry (biases, a fused QKV matrix, an untied output
//! layer) is read from its tensors, as llama.cpp does.
//!
//! The switches follow llama.cpp's graph builders (`src/models/*.cpp` of the vendored
//! source), which the reference fixtures of `tests/api/reference.rs` check against.

/// How a head's dimensions are paired for the rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Consecutive pairs (2i, 2i+1): the layout llama's GGUF conversion writes
    /// (llama.cpp's `LLAMA_ROPE_TYPE_NORM`).
    Interleaved,
    /// The two halves (i, i + n/2): GPT-NeoX's layout, kept by Qwen, Gemma and Phi-3
    /// (`LLAMA_ROPE_TYPE_NEOX`).
    Halves,
}

/// The FFN's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SiLU (SwiGLU): Llama, Qwen, Phi-3.
    Silu,
    /// GELU, tanh approximation (GeGLU): Gemma.
    GeluTanh,
}

/// Sliding-window attention layers, as a family has them by default (metadata overrides).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sliding {
    /// Every `pattern`-th layer (the last of each group) attends globally, the others within
    /// the window (llama.cpp's `set_swa_pattern`): Gemma 2 alternates (2), Gemma 3 has five
    /// local layers per global one (6).
    pub pattern: usize,
    /// The window when the file does not say (`{arch}.attention.sliding_window`); `None`: no
    /// sliding layers unless the file gives a window.
    pub default_window: Option<usize>,
}

/// One architecture: its differences from Llama's forward pass.
#[derive(Debug, PartialEq)]
pub struct Family {
    /// `general.architecture`.
    pub name: &'static str,
    pub rope: RopeStyle,
    pub activation: Activation,
    /// Embeddings multiplied by √n_embd (Gemma).
    pub embed_scale: bool,
    /// Queries and keys RMS-normed per head before the rotation (`attn_q_norm`,
    /// `attn_k_norm`): Qwen 3, Gemma 3.
    pub qk_norm: bool,
    /// RMS norms on the attention and FFN outputs before each residual add
    /// (`attn_post_norm`, `ffn_post_norm`): Gemma 2 and 3.
    pub post_norms: bool,
    pub sliding: Option<Sliding>,
    /// Soft-capping of attention scores, `cap·tanh(s/cap)`, by default (Gemma 2: 50);
    /// `{arch}.attn_logit_softcapping` overrides.
    pub attn_softcap: Option<f32>,
    /// Soft-capping of the final logits by default (Gemma 2: 30);
    /// `{arch}.final_logit_softcapping` overrides (Gemma 3 has none unless the file says).
    pub final_softcap: Option<f32>,
    /// Gemma's query scale: the 27 B models (this many layers) scale queries by
    /// 1/√(n_embd/n_head), the others by 1/√head_dim (Gemma's `query_pre_attn_scalar`).
    pub wide_query_scale_layers: Option<usize>,
    /// Reads sliding-window metadata at all: llama.cpp ignores Phi-3's window (its
    /// converter writes one the model does not use as written) and Llama's (Mistral 7B v0.1).
    pub reads_window: bool,
}

const LLAMA: Family = Family {
    name: "llama",
    rope: RopeStyle::Interleaved,
    activation: Activation::Silu,
    embed_scale: false,
    qk_norm: false,
    post_norms: false,
    sliding: None,
    attn_softcap: None,
    final_softcap: None,
    wide_query_scale_layers: None,
    reads_window: false,
};

/// Every architecture the engine runs. Llama covers Llama 2/3.x, Mistral 7B, SmolLM and
/// the other files converted as `llama`; Qwen 2 adds Q/K/V biases (read from the file,
/// like any bias), Qwen 3 Q/K norms.
pub const FAMILIES: &[Family] = &[
    LLAMA,
    Family {
        name: "qwen2",
        rope: RopeStyle::Halves,
        ..LLAMA
    },
    Family {
        name: "qwen3",
        rope: RopeStyle::Halves,
        qk_norm: true,
        ..LLAMA
    },
    Family {
        name: "gemma2",
        rope: RopeStyle::Halves,
        activation: Activation::GeluTanh,
        embed_scale: true,
        post_norms: true,
        sliding: Some(Sliding {
            pattern: 2,
            default_window: Some(4096),
        }),
        attn_softcap: Some(50.0),
        final_softcap: Some(30.0),
        wide_query_scale_layers: Some(46),
        reads_window: true,
        ..LLAMA
    },
    Family {
        name: "gemma3",
        rope: RopeStyle::Halves,
        activation: Activation::GeluTanh,
        embed_scale: true,
        qk_norm: true,
        post_norms: true,
        sliding: Some(Sliding {
            pattern: 6,
            default_window: None,
        }),
        wide_query_scale_layers: Some(62),
        reads_window: true,
        ..LLAMA
    },
    Family {
        name: "phi3",
        rope: RopeStyle::Halves,
        ..LLAMA
    },
];

/// The family of `general.architecture`, if the engine runs it.
pub fn family(architecture: &str) -> Option<&'static Family> {
    FAMILIES.iter().find(|f| f.name == architecture)
}

/// The names of every supported architecture, for messages.
pub fn supported() -> String {
    FAMILIES
        .iter()
        .map(|f| f.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Which layers attend within a window: layer `il` of `n_layer` is local unless it is the
/// last of its group of `pattern` (llama.cpp's `set_swa_pattern` without `dense_first`).
pub fn sliding_layers(n_layer: usize, pattern: usize) -> Vec<bool> {
    (0..n_layer)
        .map(|il| pattern == 0 || il % pattern < pattern - 1)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemma_patterns_match_llama_cpp() {
        // Gemma 2: even layers local, odd global. Gemma 3: five local, then one global.
        assert_eq!(sliding_layers(4, 2), [true, false, true, false]);
        assert_eq!(
            sliding_layers(7, 6),
            [true, true, true, true, true, false, true]
        );
    }

    #[test]
    fn every_family_has_a_unique_name() {
        for (i, f) in FAMILIES.iter().enumerate() {
            assert!(FAMILIES[i + 1..].iter().all(|g| g.name != f.name));
            assert_eq!(family(f.name), Some(f));
        }
        assert!(family("mamba").is_none());
        assert_eq!(supported(), "llama, qwen2, qwen3, gemma2, gemma3, phi3");
    }
}
