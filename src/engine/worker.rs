//! The engine thread: loads the model, then runs queued generations, several at a time
//! ([`super::batch`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::Device;
use tokio::sync::mpsc::UnboundedSender;

use super::constraint::LazyGrammars;
use super::gguf::{md_string, GgufFile};
use super::model::{KvCache, Model};
use super::prefix::{common_prefix, PrefixCache};
use super::prompt::PromptBuilder;
use super::template::ChatTemplate;
use super::tokenizer::TextTokenizer;
use super::{CancelToken, EngineError, EngineHandle, GenerationEvent, ModelInfo, Prepared};

/// How to load and run the model.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// Use at most this much context (default: the model's).
    pub max_context: Option<usize>,
    /// Prompt tokens processed per step, all prompts together (running sequences wait for
    /// one such chunk at most); cancellation is checked between steps.
    pub prefill_chunk: usize,
    /// Requests waiting for the engine before new ones are refused.
    pub queue_capacity: usize,
    /// Sequences generated together, one batched forward pass per token
    /// ([`super::batch`]); the chat scheduler's slots.
    pub max_batch: usize,
    /// CPU threads for the model (default: all cores).
    pub threads: Option<usize>,
    /// Bytes of attention state kept between a chat's turns ([`super::prefix`]); 0 keeps
    /// none.
    pub kv_cache_bytes: u64,
    /// Which instruction-set extensions the CPU kernels may use.
    pub isa: super::kernels::Isa,
    /// Generate at most one token per this interval: a test hook (it makes a tiny test
    /// model's replies last long enough to cancel, join or kill them mid-stream), absent from
    /// builds without the `test-hooks` feature.
    #[cfg(feature = "test-hooks")]
    pub min_token_interval: Option<std::time::Duration>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            device: "cpu".into(),
            max_context: None,
            prefill_chunk: 256,
            queue_capacity: 64,
            max_batch: 8,
            threads: None,
            kv_cache_bytes: 512 * 1024 * 1024,
            isa: Default::default(),
            #[cfg(feature = "test-hooks")]
            min_token_interval: None,
        }
    }
}

/// A queued request, its prompt already built.
pub(super) struct Job {
    pub request: Prepared,
    pub events: UnboundedSender<GenerationEvent>,
    pub cancel: CancelToken,
}

/// The model, owned by the engine thread, and the tokenizer and template it shares with the
/// handle's callers (prompts are built before a request is queued).
pub struct LoadedEngine {
    pub(crate) model: Model,
    pub(crate) tokenizer: Arc<TextTokenizer>,
    pub(crate) prompts: Arc<PromptBuilder>,
    pub(crate) context_length: usize,
    pub(crate) prefill_chunk: usize,
    #[cfg(feature = "test-hooks")]
    pub(crate) min_token_interval: Option<std::time::Duration>,
    /// Chats' kept attention state.
    pub(crate) prefixes: PrefixCache,
}

/// Parses `cpu`, `cuda`, `cuda:N`.
pub fn parse_device(spec: &str) -> Result<Device, EngineError> {
    let spec = spec.trim().to_ascii_lowercase();
    if spec == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal = match spec.as_str() {
        "cuda" => 0,
        s => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => n,
            _ => {
                return Err(EngineError::Device(format!(
                    "unknown device {spec:?}: use cpu, cuda or cuda:N"
                )))
            }
        },
    };
    if !candle_core::utils::cuda_is_available() {
        return Err(EngineError::Device(
            "this build of confab has no CUDA support; rebuild with `cargo build --release --features cuda`".into(),
        ));
    }
    Device::new_cuda(ordinal).map_err(|e| EngineError::Device(format!("cuda:{ordinal}: {e}")))
}

impl LoadedEngine {
    /// The model's vocabulary.
    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    /// Turns conversations into prompts (chat template, tokenizer, fitting to the context).
    pub fn prompts(&self) -> &PromptBuilder {
        &self.prompts
    }

    /// Reads a GGUF file: header check first (so an unsupported architecture is refused
    /// before any tensor is read), then tokenizer, template and weights.
    pub fn open(path: &Path, opts: &EngineOptions) -> Result<LoadedEngine, EngineError> {
        super::kernels::choose_isa(opts.isa);
        let device = parse_device(&opts.device)?;
        let (file, mut reader) = GgufFile::open(path)?;
        let md = &file.content.metadata;
        let tokenizer = TextTokenizer::load(path, md)?;
        let bos = tokenizer
            .bos
            .as_ref()
            .map(|(_, t)| t.as_str())
            .unwrap_or("");
        let eos = tokenizer
            .eos
            .as_ref()
            .map(|(_, t)| t.as_str())
            .unwrap_or("");
        let template = ChatTemplate::new(md_string(md, "tokenizer.chat_template"), bos, eos)?;
        let model = Model::load(
            &file,
            &mut reader,
            &device,
            thread_count(opts.threads),
            opts.max_context,
        )?;
        let context_length = opts.max_context.map_or(model.spec().context_length, |m| {
            m.clamp(1, model.spec().context_length)
        });
        let tokenizer = Arc::new(tokenizer);
        Ok(LoadedEngine {
            model,
            prompts: Arc::new(PromptBuilder {
                tokenizer: tokenizer.clone(),
                template,
                context_length,
            }),
            tokenizer,
            context_length,
            prefill_chunk: opts.prefill_chunk.max(1),
            #[cfg(feature = "test-hooks")]
            min_token_interval: opts.min_token_interval,
            prefixes: PrefixCache::new(opts.kv_cache_bytes),
        })
    }

    /// A cache for `prompt` with room for `capacity` positions, and how many of the
    /// prompt's tokens it already holds: the chat's kept state cut to the common prefix
    /// (at least the last prompt token is run again, its logits start the reply), or an
    /// empty cache.
    pub(super) fn cache_for(
        &self,
        chat: Option<uuid::Uuid>,
        prompt: &[u32],
        capacity: usize,
    ) -> Result<(KvCache, usize), EngineError> {
        let m = crate::metrics::metrics();
        if let Some(chat) = chat {
            match self.prefixes.take(&chat) {
                Some(entry) => {
                    let keep =
                        common_prefix(&entry.tokens, prompt).min(prompt.len().saturating_sub(1));
                    if keep > 0 {
                        if let Some(cache) = self.model.reuse_cache(entry.cache, keep, capacity) {
                            m.kv_cache_lookups.with_label_values(&["hit"]).inc();
                            m.kv_cache_reused_tokens.inc_by(keep as u64);
                            return Ok((cache, keep));
                        }
                    }
                    m.kv_cache_lookups.with_label_values(&["mismatch"]).inc();
                }
                None => m.kv_cache_lookups.with_label_values(&["miss"]).inc(),
            }
        }
        Ok((self.model.new_cache(capacity)?, 0))
    }
}

/// `threads`, or one per core.
pub fn thread_count(threads: Option<usize>) -> usize {
    threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1)
}

/// Loads the model on a new thread and starts the engine loop there. Returns once the
/// model is loaded (or failed to load).
pub fn load(path: PathBuf, opts: EngineOptions) -> Result<EngineHandle, EngineError> {
    let max_batch = opts.max_batch.max(1);
    // Room for a whole batch at least: the scheduler hands out `max_batch` slots at once.
    let capacity = opts.queue_capacity.max(opts.max_batch).max(1);
    let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(capacity);
    type Ready = (ModelInfo, PrefixCache, Arc<PromptBuilder>, LazyGrammars);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<Ready, EngineError>>();
    std::thread::Builder::new()
        .name("confab-engine".into())
        .spawn(move || {
            // The matrix products and attention run on this thread and the model's thread
            // team (`team.rs`), which the model starts when it loads.
            let t0 = Instant::now();
            let engine = match LoadedEngine::open(&path, &opts) {
                Ok(e) => e,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let stem = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let name = engine
                .model
                .spec()
                .name
                .clone()
                .unwrap_or_else(|| stem.clone());
            let info = ModelInfo {
                // The file is what an operator chose and knows by name; the GGUF's own
                // `general.name` is often a training-run label.
                id: super::model_id(if stem.is_empty() { &name } else { &stem }),
                name,
                loaded_at: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
                architecture: engine.model.spec().architecture.clone(),
                quantization: engine.model.spec().quantization.clone(),
                parameters: engine.model.spec().parameters,
                context_length: engine.context_length,
                load_time: t0.elapsed(),
                device: opts.device.clone(),
            };
            let grammars =
                LazyGrammars::new(engine.tokenizer.clone(), engine.model.spec().vocab_size);
            let _ = ready_tx.send(Ok((
                info,
                engine.prefixes.clone(),
                engine.prompts.clone(),
                grammars,
            )));
            // Runs until every handle is dropped.
            engine.serve(rx, opts.max_batch);
        })
        .map_err(|e| EngineError::Model(format!("cannot start the engine thread: {e}")))?;
    let (info, prefixes, prompts, grammars) =
        ready_rx.recv().map_err(|_| EngineError::Stopped)??;
    Ok(EngineHandle {
        tx,
        info: Arc::new(info),
        max_batch,
        prefixes,
        prompts,
        grammars,
    })
}
