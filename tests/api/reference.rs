//! Every architecture against llama.cpp: tiny random-weight models of each (a few layers,
//! 64 wide, F32 weights, the real vocabulary of the matching llama.cpp vocab file, and the
//! switches that make the architecture what it is: biases, Q/K norms, post-norms,
//! soft-capping, sliding-window layers, partial rotary, fused projections), written here,
//! and llama.cpp's outputs on the same files, committed as `tests/fixtures/reference/*.json`
//! by `tests/fixtures/make-reference` (which asks [`write_models`] for the files).
//!
//! Checked: the prompt's tokens, the logits at every position (decoded one token at a time,
//! as a whole prompt, and as a prompt split into chunks) within 1e-3 of the position's logit
//! range, and the greedy continuation token for token.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use confab::engine::testing::GgufFile;
use confab::engine::testing::Model;
use confab::engine::testing::TextTokenizer;

use crate::common::run_confab as confab;
use crate::tiny::values;

/// The prompt every reference model runs (numbers, punctuation, a contraction: several
/// pre-tokenizer rules at once).
pub const PROMPT: &str = "Hello world! It's 2026, and 3 + 4 = 7.";
pub const GREEDY: usize = 8;

/// One reference model: an architecture, a vocabulary, and its shape switches.
pub struct Case {
    /// File stem of the model and of its fixture.
    pub name: &'static str,
    architecture: &'static str,
    /// A `ggml-vocab-*.gguf` of `models/llama.cpp/models`.
    vocab: &'static str,
    n_layer: usize,
    /// Head width when it is not n_embd / n_head (`attention.key_length`).
    head_dim: Option<usize>,
    /// Rotated dimensions when not the whole head (`rope.dimension_count`).
    rope_dims: Option<usize>,
    tied: bool,
    qkv_bias: bool,
    qk_norm: bool,
    post_norms: bool,
    fused: bool,
    llama3_rope: bool,
    /// `rope.scaling.type` when the extra metadata has a `rope.scaling.factor`.
    scaling: &'static str,
    /// Phi-3's LongRoPE factor tensors (short and long).
    longrope: bool,
    /// Extra metadata, `{arch}.`-relative keys.
    extra: &'static [(&'static str, f32)],
    /// Extra integer metadata.
    extra_u32: &'static [(&'static str, u32)],
}

const N_EMBD: usize = 64;
const N_HEAD: usize = 4;
const N_KV: usize = 2;
const N_FF: usize = 96;
const CONTEXT: usize = 512;
/// The context `reference-logits.cpp` gives llama.cpp (`n_ctx`): it picks Phi-3's LongRoPE
/// factors, so confab runs the models with the same.
const LLAMA_CPP_CONTEXT: usize = 256;

const BASE: Case = Case {
    name: "",
    architecture: "llama",
    vocab: "",
    n_layer: 2,
    head_dim: None,
    rope_dims: None,
    tied: true,
    qkv_bias: false,
    qk_norm: false,
    post_norms: false,
    fused: false,
    llama3_rope: false,
    scaling: "linear",
    longrope: false,
    extra: &[],
    extra_u32: &[],
};

pub const CASES: &[Case] = &[
    // Llama 3.x: BPE vocabulary, rope_freqs, untied output.
    Case {
        name: "llama3",
        vocab: "llama-bpe",
        tied: false,
        llama3_rope: true,
        extra: &[("rope.freq_base", 500_000.0)],
        ..BASE
    },
    // Llama 2 / Mistral: SentencePiece vocabulary, tied output.
    Case {
        name: "llama-spm",
        vocab: "llama-spm",
        ..BASE
    },
    Case {
        name: "qwen2",
        architecture: "qwen2",
        vocab: "qwen2",
        qkv_bias: true,
        extra: &[("rope.freq_base", 1_000_000.0)],
        ..BASE
    },
    // Qwen 2.5 with YaRN (as its long-context configurations set it): the ramp between the
    // correction dimensions (pairs 0..3 of 8 with this base and original context) is inside
    // the head.
    Case {
        name: "qwen2-yarn",
        architecture: "qwen2",
        vocab: "qwen2",
        qkv_bias: true,
        scaling: "yarn",
        extra: &[("rope.freq_base", 10_000.0), ("rope.scaling.factor", 4.0)],
        extra_u32: &[("rope.scaling.original_context_length", 128)],
        ..BASE
    },
    // Qwen 3: heads wider than n_embd / n_head, Q/K norms.
    Case {
        name: "qwen3",
        architecture: "qwen3",
        vocab: "qwen2",
        head_dim: Some(32),
        qk_norm: true,
        tied: false,
        ..BASE
    },
    // Gemma 2: alternating sliding-window layers (window 4 < the prompt), soft-capping
    // strong enough to matter on random weights.
    Case {
        name: "gemma2",
        architecture: "gemma2",
        vocab: "llama-spm",
        n_layer: 4,
        head_dim: Some(32),
        post_norms: true,
        extra: &[
            ("attn_logit_softcapping", 1.5),
            ("final_logit_softcapping", 15.0),
        ],
        extra_u32: &[("attention.sliding_window", 4)],
        ..BASE
    },
    // Gemma 3: five local layers (own rope base) per global one (linear rope scaling).
    Case {
        name: "gemma3",
        architecture: "gemma3",
        vocab: "llama-spm",
        n_layer: 6,
        head_dim: Some(32),
        qk_norm: true,
        post_norms: true,
        extra: &[
            ("rope.freq_base", 1_000_000.0),
            ("rope.freq_base_swa", 10_000.0),
            ("rope.scaling.factor", 8.0),
        ],
        extra_u32: &[("attention.sliding_window", 4)],
        ..BASE
    },
    // Phi-3: fused QKV and gate/up, partial rotary.
    Case {
        name: "phi3",
        architecture: "phi3",
        vocab: "phi-3",
        rope_dims: Some(8),
        fused: true,
        tied: false,
        ..BASE
    },
    // Phi-3.5 / Phi-4-mini: LongRoPE factors and attention factor. The context served (256)
    // is longer than the original one (64): the long factors.
    Case {
        name: "phi3-long",
        architecture: "phi3",
        vocab: "phi-3",
        rope_dims: Some(8),
        fused: true,
        tied: false,
        longrope: true,
        // √(1 + ln(512/64) / ln 64), as convert_hf_to_gguf.py computes it.
        extra: &[("rope.scaling.attn_factor", 1.224_744_9)],
        extra_u32: &[("rope.scaling.original_context_length", 64)],
        ..BASE
    },
    // The same within the original context (256 of 256): the short factors.
    Case {
        name: "phi3-short",
        architecture: "phi3",
        vocab: "phi-3",
        rope_dims: Some(8),
        fused: true,
        tied: false,
        longrope: true,
        // √(1 + ln(512/256) / ln 256).
        extra: &[("rope.scaling.attn_factor", 1.060_66)],
        extra_u32: &[("rope.scaling.original_context_length", 256)],
        ..BASE
    },
];

fn llama_cpp_models() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/llama.cpp/models")
}

fn f32_tensor(data: Vec<f32>, shape: &[usize]) -> QTensor {
    let t = Tensor::from_vec(data, shape, &Device::Cpu).expect("tensor");
    QTensor::quantize(&t, GgmlDType::F32).expect("f32")
}

/// Writes `case`'s model into `dir` and returns its path.
pub fn write(case: &Case, dir: &Path) -> PathBuf {
    let vocab_path = llama_cpp_models().join(format!("ggml-vocab-{}.gguf", case.vocab));
    let mut f = std::fs::File::open(&vocab_path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run ./models/fetch-llama-cpp)",
            vocab_path.display()
        )
    });
    let vocab = Content::read(&mut f).expect("vocab gguf");
    let n_vocab = vocab.metadata["tokenizer.ggml.tokens"]
        .to_vec()
        .expect("tokens")
        .len();
    let a = case.architecture;
    let hd = case.head_dim.unwrap_or(N_EMBD / N_HEAD);
    let (q, kv) = (N_HEAD * hd, N_KV * hd);
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(a.into())),
        (
            "general.name".into(),
            Value::String(format!("reference {}", case.name)),
        ),
        (format!("{a}.embedding_length"), Value::U32(N_EMBD as u32)),
        (
            format!("{a}.attention.head_count"),
            Value::U32(N_HEAD as u32),
        ),
        (
            format!("{a}.attention.head_count_kv"),
            Value::U32(N_KV as u32),
        ),
        (format!("{a}.block_count"), Value::U32(case.n_layer as u32)),
        (format!("{a}.feed_forward_length"), Value::U32(N_FF as u32)),
        (format!("{a}.context_length"), Value::U32(CONTEXT as u32)),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(1e-6),
        ),
    ];
    if let Some(hd) = case.head_dim {
        md.push((format!("{a}.attention.key_length"), Value::U32(hd as u32)));
        md.push((format!("{a}.attention.value_length"), Value::U32(hd as u32)));
    }
    if let Some(r) = case.rope_dims {
        md.push((format!("{a}.rope.dimension_count"), Value::U32(r as u32)));
    }
    for (k, v) in case.extra {
        md.push((format!("{a}.{k}"), Value::F32(*v)));
    }
    if case.extra.iter().any(|(k, _)| *k == "rope.scaling.factor") {
        md.push((
            format!("{a}.rope.scaling.type"),
            Value::String(case.scaling.into()),
        ));
    }
    for (k, v) in case.extra_u32 {
        md.push((format!("{a}.{k}"), Value::U32(*v)));
    }
    let mut keys: Vec<&String> = vocab
        .metadata
        .keys()
        .filter(|k| k.starts_with("tokenizer."))
        .collect();
    keys.sort();
    for k in keys {
        md.push((k.clone(), vocab.metadata[k].clone()));
    }

    let mut seed = 0u64;
    let mut next = |n: usize, scale: f32| {
        seed += 1;
        values(seed, n, scale)
    };
    // Norm weights around 1, as trained models have them.
    let norm = |v: Vec<f32>| v.into_iter().map(|x| 1.0 + x).collect::<Vec<f32>>();
    let mut tensors: Vec<(String, QTensor)> = vec![
        (
            "token_embd.weight".into(),
            f32_tensor(next(n_vocab * N_EMBD, 1.0), &[n_vocab, N_EMBD]),
        ),
        (
            "output_norm.weight".into(),
            f32_tensor(norm(next(N_EMBD, 0.2)), &[N_EMBD]),
        ),
    ];
    if !case.tied {
        tensors.push((
            "output.weight".into(),
            f32_tensor(next(n_vocab * N_EMBD, 0.3), &[n_vocab, N_EMBD]),
        ));
    }
    if case.llama3_rope {
        // The factors convert_hf_to_gguf.py writes for Llama 3.1 (8192 original context,
        // factor 32): short wavelengths 1, long ones 32, smooth between.
        let half = hd / 2;
        let base = 500_000f64;
        let factors: Vec<f32> = (0..half)
            .map(|i| {
                let freq = base.powf(-((2 * i) as f64) / hd as f64);
                let wavelen = 2.0 * std::f64::consts::PI / freq;
                if wavelen < 8192.0 / 4.0 {
                    1.0
                } else if wavelen > 8192.0 {
                    32.0
                } else {
                    let smooth = (8192.0 / wavelen - 1.0) / 3.0;
                    (1.0 / ((1.0 - smooth) / 32.0 + smooth)) as f32
                }
            })
            .collect();
        tensors.push(("rope_freqs.weight".into(), f32_tensor(factors, &[half])));
    }
    if case.longrope {
        // Short factors near 1, long ones growing with the wavelength, as Phi-3.5's are.
        let half = case.rope_dims.unwrap_or(hd) / 2;
        let short = (0..half).map(|i| 1.0 + 0.05 * i as f32).collect();
        let long = (0..half).map(|i| 1.0 + 3.0 * i as f32).collect();
        tensors.push((
            "rope_factors_short.weight".into(),
            f32_tensor(short, &[half]),
        ));
        tensors.push(("rope_factors_long.weight".into(), f32_tensor(long, &[half])));
    }
    for l in 0..case.n_layer {
        let p = |n: &str| format!("blk.{l}.{n}");
        let w = 0.25;
        tensors.push((
            p("attn_norm.weight"),
            f32_tensor(norm(next(N_EMBD, 0.2)), &[N_EMBD]),
        ));
        if case.fused {
            tensors.push((
                p("attn_qkv.weight"),
                f32_tensor(next((q + 2 * kv) * N_EMBD, w), &[q + 2 * kv, N_EMBD]),
            ));
        } else {
            for (n, rows) in [("attn_q", q), ("attn_k", kv), ("attn_v", kv)] {
                tensors.push((
                    p(&format!("{n}.weight")),
                    f32_tensor(next(rows * N_EMBD, w), &[rows, N_EMBD]),
                ));
            }
        }
        if case.qkv_bias {
            for (n, rows) in [("attn_q", q), ("attn_k", kv), ("attn_v", kv)] {
                tensors.push((
                    p(&format!("{n}.bias")),
                    f32_tensor(next(rows, 0.5), &[rows]),
                ));
            }
        }
        if case.qk_norm {
            for n in ["attn_q_norm", "attn_k_norm"] {
                tensors.push((
                    p(&format!("{n}.weight")),
                    f32_tensor(norm(next(hd, 0.2)), &[hd]),
                ));
            }
        }
        tensors.push((
            p("attn_output.weight"),
            f32_tensor(next(N_EMBD * q, w), &[N_EMBD, q]),
        ));
        tensors.push((
            p("ffn_norm.weight"),
            f32_tensor(norm(next(N_EMBD, 0.2)), &[N_EMBD]),
        ));
        if case.fused {
            tensors.push((
                p("ffn_up.weight"),
                f32_tensor(next(2 * N_FF * N_EMBD, w), &[2 * N_FF, N_EMBD]),
            ));
        } else {
            for n in ["ffn_gate", "ffn_up"] {
                tensors.push((
                    p(&format!("{n}.weight")),
                    f32_tensor(next(N_FF * N_EMBD, w), &[N_FF, N_EMBD]),
                ));
            }
        }
        tensors.push((
            p("ffn_down.weight"),
            f32_tensor(next(N_EMBD * N_FF, w), &[N_EMBD, N_FF]),
        ));
        if case.post_norms {
            for n in ["post_attention_norm", "post_ffw_norm"] {
                tensors.push((
                    p(&format!("{n}.weight")),
                    f32_tensor(norm(next(N_EMBD, 0.2)), &[N_EMBD]),
                ));
            }
        }
    }
    let path = dir.join(format!("{}.gguf", case.name));
    let mut out = std::io::BufWriter::new(std::fs::File::create(&path).expect("create"));
    let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut out, &md_refs, &t_refs).expect("write gguf");
    path
}

/// For `tests/fixtures/make-reference`: writes every case's model into
/// `$CONFAB_REFERENCE_MODELS`.
#[test]
#[ignore = "run by tests/fixtures/make-reference"]
fn write_models() {
    let dir = PathBuf::from(
        std::env::var("CONFAB_REFERENCE_MODELS").expect("set CONFAB_REFERENCE_MODELS"),
    );
    std::fs::create_dir_all(&dir).expect("mkdir");
    for case in CASES {
        println!("{}", write(case, &dir).display());
    }
}

#[derive(serde::Deserialize)]
struct Digest {
    max: f32,
    min: f32,
    top: Vec<(u32, f32)>,
    sample: Vec<f32>,
}

#[derive(serde::Deserialize)]
struct Fixture {
    prompt: String,
    tokens: Vec<u32>,
    positions: Vec<Digest>,
    greedy: Vec<u32>,
}

/// `logits` against llama.cpp's digest of the same position: every compared logit within
/// 1e-3 of the position's range.
fn check(case: &str, what: &str, pos: usize, logits: &[f32], want: &Digest) {
    let range = want.max - want.min;
    let tol = 1e-3 * range;
    let mut worst = 0f32;
    let mut compare = |id: usize, want: f32| {
        let d = (logits[id] - want).abs();
        worst = worst.max(d);
        assert!(
            d <= tol,
            "{case} ({what}), position {pos}, token {id}: {} vs llama.cpp {want} \
             (tolerance {tol})",
            logits[id]
        );
    };
    for &(id, v) in &want.top {
        compare(id as usize, v);
    }
    let stride = (logits.len() / 64).max(1);
    assert_eq!(want.sample.len(), logits.len().div_ceil(stride).min(64));
    for (i, &v) in want.sample.iter().enumerate() {
        compare(i * stride, v);
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let min = logits.iter().copied().fold(f32::INFINITY, f32::min);
    assert!(
        (max - want.max).abs() <= tol,
        "{case} ({what}) max {max} vs {}",
        want.max
    );
    assert!(
        (min - want.min).abs() <= tol,
        "{case} ({what}) min {min} vs {}",
        want.min
    );
}

fn argmax(v: &[f32]) -> u32 {
    v.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &x)| {
            if x > bv {
                (i, x)
            } else {
                (bi, bv)
            }
        })
        .0 as u32
}

#[test]
fn every_architecture_matches_llama_cpp() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reference");
    for case in CASES {
        let json = std::fs::read_to_string(fixtures.join(format!("{}.json", case.name)))
            .unwrap_or_else(|e| panic!("fixture {}: {e}", case.name));
        let want: Fixture = serde_json::from_str(&json).expect("fixture json");
        assert_eq!(
            want.prompt, PROMPT,
            "{}: fixture made for another prompt",
            case.name
        );
        let path = write(case, dir.path());
        let tok = TextTokenizer::from_file(&path).expect("tokenizer");
        let tokens = tok.tokenize(PROMPT, tok.add_bos).expect("tokenize");
        assert_eq!(tokens, want.tokens, "{}: tokens", case.name);
        let (file, mut reader) = GgufFile::open(&path).expect("open");
        let model = Model::load(&file, &mut reader, &Device::Cpu, 2, Some(LLAMA_CPP_CONTEXT))
            .expect("load");
        assert_eq!(model.spec().architecture, case.architecture);
        let n = tokens.len();
        // One token at a time: every position's logits.
        let mut cache = model.new_cache(64).expect("cache");
        for (pos, t) in tokens.iter().enumerate() {
            let logits = model.forward(&[*t], &mut cache).expect("forward");
            check(case.name, "decoded", pos, &logits, &want.positions[pos]);
        }
        // The whole prompt at once, and in two chunks: the last position.
        let mut cache = model.new_cache(64).expect("cache");
        let logits = model.forward(&tokens, &mut cache).expect("forward");
        check(case.name, "prompt", n - 1, &logits, &want.positions[n - 1]);
        let mut split = model.new_cache(64).expect("cache");
        model
            .forward(&tokens[..n / 2], &mut split)
            .expect("forward");
        let logits2 = model
            .forward(&tokens[n / 2..], &mut split)
            .expect("forward");
        check(case.name, "chunks", n - 1, &logits2, &want.positions[n - 1]);
        // Greedy continuation.
        let mut next = argmax(&logits);
        let mut got = Vec::new();
        for _ in 0..GREEDY {
            got.push(next);
            next = argmax(&model.forward(&[next], &mut cache).expect("forward"));
        }
        assert_eq!(got, want.greedy, "{}: greedy continuation", case.name);
    }
}

/// `confab run --raw --greedy` continues a text as llama.cpp does: on the Llama 3 reference
/// model it prints exactly the text of llama.cpp's greedy tokens.
#[test]
fn run_raw_prints_llama_cpp_s_continuation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let case = CASES.iter().find(|c| c.name == "llama3").unwrap();
    let path = write(case, dir.path());
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/reference");
    let want: Fixture =
        serde_json::from_str(&std::fs::read_to_string(fixtures.join("llama3.json")).unwrap())
            .unwrap();
    let tok = TextTokenizer::from_file(&path).unwrap();
    let text = tok.decode(&want.greedy).unwrap();
    let model = path.to_str().unwrap();
    let n = GREEDY.to_string();
    let (ok, out, err) = confab(
        &[
            "run",
            "--model",
            model,
            "--raw",
            "--greedy",
            "--max-tokens",
            &n,
            "--prompt",
            PROMPT,
        ],
        "",
    );
    assert!(ok, "{err}");
    assert_eq!(out, format!("{text}\n"));
}

/// `confab run` chats through the template: `--prompt` is one turn; lines of stdin are
/// turns of one conversation (its first reply the same as the single turn's, greedy).
#[test]
fn run_chats_through_the_template() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = super::tiny::write(dir.path(), "llama");
    let model = path.to_str().unwrap();
    let args = ["run", "--model", model, "--greedy", "--max-tokens", "6"];
    let (ok, one, err) = confab(&[&args[..], &["--prompt", "hello"]].concat(), "");
    assert!(ok, "{err}");
    assert!(one.len() > 1, "no reply: {one:?}");
    let (ok, two, err) = confab(&args, "hello\nand again\n");
    assert!(ok, "{err}");
    assert!(
        two.starts_with(&one) && two.len() > one.len(),
        "{one:?} / {two:?}"
    );
    // `--raw` needs a prompt; a temperature out of range and a missing model file are named.
    let (ok, _, err) = confab(&["run", "--model", model, "--temperature=-1"], "");
    assert!(!ok && err.contains("not a temperature"), "{err}");
    let (ok, _, err) = confab(&["run", "--model", model, "--raw"], "");
    assert!(!ok && err.contains("--prompt"), "{err}");
    let (ok, _, err) = confab(
        &["run", "--model", "/nonexistent.gguf", "--prompt", "x"],
        "",
    );
    assert!(!ok && err.contains("/nonexistent.gguf"), "{err}");
}

/// A rope scaling this engine does not implement is refused by name when the file is opened,
/// never run with other angles than the model was trained with.
#[test]
fn an_unknown_rope_scaling_is_refused_by_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let case = Case {
        name: "dynamic",
        architecture: "qwen2",
        vocab: "qwen2",
        qkv_bias: true,
        scaling: "dynamic",
        extra: &[("rope.scaling.factor", 2.0)],
        ..BASE
    };
    let path = write(&case, dir.path());
    let err = GgufFile::open(&path).err().expect("refused").to_string();
    assert!(
        err.contains("rope scaling `dynamic` is not supported") && err.contains("yarn"),
        "{err}"
    );
}
