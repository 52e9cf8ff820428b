//! The command line. Every flag has an environment variable (`CONFAB_…`, and
//! `DATABASE_URL`); the `///` docs are the `--help` text.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::api::quota::QuotaDefaults;
use crate::domain::Limits;
use crate::server::ConnectionLimits;

/// confab: a self-hosted multi-tenant chat server with an in-process language model.
#[derive(Debug, Parser)]
#[command(name = "confab", version, about)]
pub struct Cli {
    #[command(flatten)]
    pub db: DbArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Where the data lives.
#[derive(Debug, Clone, Args)]
pub struct DbArgs {
    /// Database URL: `sqlite://PATH?mode=rwc` or `postgres://USER@HOST:PORT/DB`.
    /// Default: SQLite at DATA_DIR/confab.db.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    pub database_url: Option<String>,
    /// Directory for the SQLite database and other state.
    #[arg(long, env = "CONFAB_DATA_DIR", default_value = "data", global = true)]
    pub data_dir: PathBuf,
    /// Most database connections in the pool.
    #[arg(
        long,
        env = "CONFAB_DB_MAX_CONNECTIONS",
        default_value_t = 10,
        global = true
    )]
    pub db_max_connections: u32,
    /// Seconds a request waits for a database connection before it gets 503.
    #[arg(
        long,
        env = "CONFAB_DB_ACQUIRE_TIMEOUT_SECS",
        default_value_t = 5,
        global = true
    )]
    pub db_acquire_timeout_secs: u64,
}

impl DbArgs {
    /// The URL to connect to, with the SQLite default filled in.
    pub fn url(&self) -> String {
        match &self.database_url {
            Some(u) => u.clone(),
            None => format!(
                "sqlite://{}?mode=rwc",
                self.data_dir.join("confab.db").display()
            ),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server.
    Serve(Box<ServeArgs>),
    /// Manage tenants.
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Manage tenants' API keys.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Manage admin keys (for the `/admin/v1` API).
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Print the OpenAPI document.
    Openapi,
    /// Measure the engine's speed (prompt processing, generation, time to first token).
    Bench(BenchArgs),
    /// Tokenize stdin with a model's vocabulary and print the token ids as a JSON array (works
    /// on vocab-only GGUF files such as llama.cpp's `ggml-vocab-*.gguf`).
    Tokenize(TokenizeArgs),
    /// Chat with a model in the terminal (through its chat template, streaming), or with
    /// `--raw` continue a text as is.
    Run(RunArgs),
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The text to send: one turn (or with `--raw`, the text to continue), then exit.
    /// Without it, turns are read from stdin, one per line.
    #[arg(long)]
    pub prompt: Option<String>,
    /// No chat template: the prompt is run as is (BOS as the vocabulary says) and only the
    /// generated text is printed.
    #[arg(long, requires = "prompt")]
    pub raw: bool,
    /// A system message for the conversation (chat mode).
    #[arg(long, conflicts_with = "raw")]
    pub system: Option<String>,
    /// Always the most likely token (deterministic); otherwise sampled.
    #[arg(long)]
    pub greedy: bool,
    /// Sampling temperature, 0–2 (ignored with `--greedy`; 0 is greedy too).
    #[arg(long, default_value_t = 0.7, value_parser = temperature)]
    pub temperature: f32,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Most tokens per reply.
    #[arg(long, default_value_t = 1024)]
    pub max_tokens: usize,
}

#[derive(Debug, Clone, Args)]
pub struct TokenizeArgs {
    /// The GGUF file whose vocabulary to use.
    #[arg(long, env = "CONFAB_MODEL")]
    pub model: std::path::PathBuf,
    /// Print `[{"id", "piece"}, …]` instead of the ids alone.
    #[arg(long)]
    pub show: bool,
    /// Start with the vocabulary's BOS token.
    #[arg(long)]
    pub bos: bool,
}

/// Which model to run, and how.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// The model: a local GGUF path, or `hf:OWNER/REPO/FILE.gguf` (downloaded into the
    /// Hugging Face cache; set HF_HUB_OFFLINE=1 to use only the cache).
    #[arg(
        long,
        env = "CONFAB_MODEL",
        default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
    )]
    pub model: String,
    /// `cpu`, `cuda` or `cuda:N` (CUDA needs a build with `--features cuda`).
    #[arg(long, env = "CONFAB_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Use at most this many tokens of context (default: the model's own length).
    #[arg(long, env = "CONFAB_MAX_CONTEXT")]
    pub max_context: Option<usize>,
    /// Prompt tokens processed per step, all prompts together: a joining prompt delays the
    /// running replies' next token by one such chunk at most. Cancellation is noticed
    /// between steps.
    #[arg(long, env = "CONFAB_PREFILL_CHUNK", default_value_t = 256)]
    pub prefill_chunk: usize,
    /// CPU threads for the model (default: all cores).
    #[arg(long, env = "CONFAB_THREADS")]
    pub threads: Option<usize>,
    /// Replies generated together (continuous batching: one forward pass per step for all
    /// of them). Also the number of reply slots the per-tenant queues hand out.
    #[arg(long, env = "CONFAB_MAX_BATCH", default_value_t = 8, value_parser = batch_size)]
    pub max_batch: usize,
    /// Bytes of attention state (KV cache) kept between a chat's turns, so a turn only runs
    /// its new tokens through the model; least recently used chats are evicted. 0 keeps none.
    #[arg(long, env = "CONFAB_KV_CACHE_BYTES", default_value_t = 512 * 1024 * 1024)]
    pub kv_cache_bytes: u64,
    /// Testing aid: at most one generated token per this many milliseconds (only in builds
    /// with the `test-hooks` feature, which the tests turn on).
    #[cfg(feature = "test-hooks")]
    #[arg(long, env = "CONFAB_DEBUG_TOKEN_INTERVAL_MS", hide = true)]
    pub debug_token_interval_ms: Option<u64>,
    /// Keep the CPU kernels to AVX2 even where AVX-512 is available.
    #[arg(long, env = "CONFAB_NO_AVX512")]
    pub no_avx512: bool,
    /// Do not use AVX512_BF16 dot products nor AMX tiles (K-quants then decode with 16-bit
    /// integer activations, unless `--no-int16`, as Q4_0, Q4_1 and Q8_0 always do; the
    /// BF16 format uses the f32 kernels).
    #[arg(long, env = "CONFAB_NO_BF16")]
    pub no_bf16: bool,
    /// Do not use AMX tiles for prompts (the AVX512_BF16 kernel reads them instead), where
    /// the CPU has AMX-BF16.
    #[arg(long, env = "CONFAB_NO_AMX")]
    pub no_amx: bool,
    /// Do not decode with 16-bit integer activations: Q4_0, Q4_1 and Q8_0 then take the f32
    /// kernels (Q4_0 the bf16 one where the CPU has AVX512_BF16), and K-quants the f32 ones
    /// where AVX512_BF16 is missing or off.
    #[arg(long, env = "CONFAB_NO_INT16")]
    pub no_int16: bool,
    /// Do not read prompts of Q4_K, Q5_K, Q6_K, Q4_0 and Q8_0 weights with 8-bit activations
    /// (AVX512_VNNI, or AVX2 where AVX-512 is missing, Q8_0 excepted; each block's outliers
    /// kept exact in f32); the bf16 (or f32) prompt kernels run instead.
    #[arg(long, env = "CONFAB_NO_INT8")]
    pub no_int8: bool,
}

/// A sampling temperature from 0 to 2.
fn temperature(s: &str) -> Result<f32, String> {
    match s.trim().parse::<f32>() {
        Ok(t) if (0.0..=2.0).contains(&t) => Ok(t),
        _ => Err(format!(
            "{s:?} is not a temperature: use a number from 0 to 2"
        )),
    }
}

/// 1–256 sequences.
fn batch_size(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if (1..=256).contains(&n) => Ok(n),
        _ => Err(format!(
            "{s:?} is not a batch size: use a whole number from 1 to 256"
        )),
    }
}

impl ModelArgs {
    pub fn engine_options(&self) -> crate::engine::EngineOptions {
        crate::engine::EngineOptions {
            device: self.device.clone(),
            max_context: self.max_context,
            prefill_chunk: self.prefill_chunk,
            threads: self.threads,
            max_batch: self.max_batch,
            kv_cache_bytes: self.kv_cache_bytes,
            isa: crate::engine::kernels::Isa {
                avx512: !self.no_avx512,
                bf16: !self.no_bf16,
                amx: !self.no_amx,
                int16: !self.no_int16,
                int8: !self.no_int8,
            },
            #[cfg(feature = "test-hooks")]
            min_token_interval: self
                .debug_token_interval_ms
                .map(std::time::Duration::from_millis),
            ..Default::default()
        }
    }
}

#[derive(Debug, Clone, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    /// `serve`: benchmark a running server end to end instead of the engine alone.
    #[command(subcommand)]
    pub target: Option<BenchTarget>,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt length for prompt processing (pp) and time to first token.
    #[arg(long, default_value_t = 512)]
    pub prompt_tokens: usize,
    /// Tokens to generate for the generation figure (tg).
    #[arg(long, default_value_t = 128)]
    pub gen_tokens: usize,
    /// Timed repetitions (after one warm-up).
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    /// Also measure generation with this many sequences stepped together (continuous
    /// batching), aggregate tokens/s; comma-separated, e.g. `2,4,8`.
    #[arg(long, value_delimiter = ',', default_value = "8")]
    pub batch: Vec<usize>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Subcommand)]
pub enum BenchTarget {
    /// Drive a running server over its API like chat clients do: N chats at once, T turns
    /// each, replies streamed over /ws/chat; reports time to first token per turn,
    /// inter-token latency, aggregate tokens/s and errors.
    Serve(ServeBenchArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ServeBenchArgs {
    /// The server.
    #[arg(long, env = "CONFAB_URL", default_value = "http://127.0.0.1:8000")]
    pub url: String,
    /// A tenant API key (the benchmark's REST calls are one chat creation and deletion
    /// per chat; its WebSocket messages count against the per-connection rate).
    #[arg(long, env = "CONFAB_API_KEY")]
    pub api_key: String,
    /// Chats running at the same time.
    #[arg(long, default_value_t = 8)]
    pub chats: usize,
    /// Turns per chat.
    #[arg(long, default_value_t = 10)]
    pub turns: usize,
    /// Most tokens per reply (greedy decoding).
    #[arg(long, default_value_t = 64)]
    pub max_tokens: u32,
    /// Give up on a reply after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub reply_timeout_secs: u64,
    /// Also watch every chat from a socket here (repeatable; chats take them in turn): in
    /// cluster mode another replica's address, to measure the fan-out lag.
    #[arg(long = "watch-url", value_name = "URL")]
    pub watch_urls: Vec<String>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// A tenant's own limits on the command line (a number, or `default` for the server-wide
/// value); absent: unchanged.
#[derive(Debug, Clone, Default, Args)]
pub struct TenantLimitArgs {
    /// REST requests per minute.
    #[arg(long)]
    pub requests_per_minute: Option<LimitValue>,
    /// WebSocket messages per second per connection.
    #[arg(long)]
    pub ws_messages_per_second: Option<LimitValue>,
    /// Open WebSocket connections.
    #[arg(long)]
    pub max_connections: Option<LimitValue>,
}

impl TenantLimitArgs {
    pub fn patch(&self) -> crate::domain::TenantLimitsPatch {
        crate::domain::TenantLimitsPatch {
            requests_per_minute: LimitValue::patch(self.requests_per_minute),
            ws_messages_per_second: LimitValue::patch(self.ws_messages_per_second),
            max_connections: LimitValue::patch(self.max_connections),
        }
    }
}

/// A tenant's token budgets on the command line (a number of tokens, or `none`); absent:
/// unchanged.
#[derive(Debug, Clone, Default, Args)]
pub struct BudgetArgs {
    /// Prompt plus generated tokens of the whole tenant per UTC day.
    #[arg(long)]
    pub tokens_per_day: Option<BudgetValue>,
    /// ... per calendar month (UTC).
    #[arg(long)]
    pub tokens_per_month: Option<BudgetValue>,
    /// ... of each user of the tenant per UTC day.
    #[arg(long)]
    pub user_tokens_per_day: Option<BudgetValue>,
    /// ... of each user per calendar month (UTC).
    #[arg(long)]
    pub user_tokens_per_month: Option<BudgetValue>,
}

impl BudgetArgs {
    pub fn patch(&self) -> crate::domain::TokenBudgetsPatch {
        crate::domain::TokenBudgetsPatch {
            tokens_per_day: BudgetValue::patch(self.tokens_per_day),
            tokens_per_month: BudgetValue::patch(self.tokens_per_month),
            user_tokens_per_day: BudgetValue::patch(self.user_tokens_per_day),
            user_tokens_per_month: BudgetValue::patch(self.user_tokens_per_month),
        }
    }
}

/// A budget on the command line: a number of tokens (1 to 10^15), or `none`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetValue {
    None,
    Tokens(u64),
}

/// The largest budget accepted (the API's bound too).
pub const MAX_BUDGET: u64 = 1_000_000_000_000_000;

impl std::str::FromStr for BudgetValue {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("none") {
            return Ok(BudgetValue::None);
        }
        match s.parse::<u64>() {
            Ok(n) if (1..=MAX_BUDGET).contains(&n) => Ok(BudgetValue::Tokens(n)),
            _ => Err(format!(
                "{s:?} is not a budget: use a number of tokens from 1 to {MAX_BUDGET}, or `none`"
            )),
        }
    }
}

impl BudgetValue {
    pub fn patch(v: Option<BudgetValue>) -> crate::domain::Patch<u64> {
        match v {
            None => crate::domain::Patch::Keep,
            Some(BudgetValue::None) => crate::domain::Patch::Clear,
            Some(BudgetValue::Tokens(n)) => crate::domain::Patch::Set(n),
        }
    }
}

/// The operator's commands. With `--json` each prints what the matching `/admin/v1`
/// operation answers.
#[derive(Debug, Subcommand)]
pub enum TenantCommand {
    /// Create a tenant and print its first API key (shown once).
    Create {
        /// Tenant name: 1 to 64 characters from A-Z, a-z, 0-9, '-', '_', '.'.
        name: String,
        #[command(flatten)]
        limits: TenantLimitArgs,
        #[command(flatten)]
        budgets: BudgetArgs,
        /// Print `{"tenant": …, "key": …, "api_key": …}`.
        #[arg(long)]
        json: bool,
    },
    /// List tenants (with `--json`, one page: `--offset`, `--limit`).
    List {
        #[arg(long, default_value_t = 0)]
        offset: u64,
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=200))]
        limit: u64,
        #[arg(long)]
        json: bool,
    },
    /// Show one tenant.
    Show {
        /// Tenant name or id.
        tenant: String,
        #[arg(long)]
        json: bool,
    },
    /// Give a tenant another name (its id, keys and data stay).
    Rename {
        /// Tenant name or id.
        tenant: String,
        new_name: String,
        #[arg(long)]
        json: bool,
    },
    /// Set a tenant's own limits (a number, or `default` for the server-wide value).
    SetLimits {
        /// Tenant name or id.
        tenant: String,
        #[command(flatten)]
        limits: TenantLimitArgs,
        #[arg(long)]
        json: bool,
    },
    /// Set a tenant's token budgets (a number of tokens, or `none`): a reply that could
    /// overrun one is refused with `quota_exceeded` before it starts.
    SetBudgets {
        /// Tenant name or id.
        tenant: String,
        #[command(flatten)]
        budgets: BudgetArgs,
        #[arg(long)]
        json: bool,
    },
    /// Disable a tenant: its keys answer 403 `tenant_disabled`, its sockets are closed
    /// (within the server's --tenant-check-secs); its data stays.
    Disable {
        /// Tenant name or id.
        tenant: String,
        #[arg(long)]
        json: bool,
    },
    /// Enable a disabled tenant again.
    Enable {
        /// Tenant name or id.
        tenant: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete a tenant with all its data (keys, users, chats, messages, usage).
    Delete {
        /// Tenant name or id.
        tenant: String,
        /// Confirms the deletion (it cannot be undone).
        #[arg(long)]
        yes: bool,
    },
}

/// A limit on the command line: a positive number, or `default`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitValue {
    Default,
    Value(u32),
}

impl std::str::FromStr for LimitValue {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("default") {
            return Ok(LimitValue::Default);
        }
        match s.parse::<u32>() {
            Ok(n) if n >= 1 => Ok(LimitValue::Value(n)),
            _ => Err(format!(
                "{s:?} is not a limit: use a whole number from 1 to {} or `default`",
                u32::MAX
            )),
        }
    }
}

impl LimitValue {
    pub fn patch(v: Option<LimitValue>) -> crate::domain::Patch<u32> {
        match v {
            None => crate::domain::Patch::Keep,
            Some(LimitValue::Default) => crate::domain::Patch::Clear,
            Some(LimitValue::Value(n)) => crate::domain::Patch::Set(n),
        }
    }
}

/// `--expires-at`, `--since`, `--until`: RFC 3339, or a day meaning its start in UTC.
fn parse_instant(s: &str) -> Result<chrono::DateTime<chrono::Utc>, String> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&chrono::Utc));
    }
    chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc())
        .ok_or_else(|| {
            format!("{s:?} is neither RFC 3339 (2027-01-31T18:00:00Z) nor a day (2027-01-31)")
        })
}

/// A new key's name and expiry.
#[derive(Debug, Clone, Args)]
pub struct KeySpecArgs {
    /// What the key is for (1–100 characters), shown in key lists.
    #[arg(long)]
    pub name: Option<String>,
    /// When the key stops working (it then answers 401 `api_key_expired`): RFC 3339
    /// (`2027-01-31T18:00:00Z`) or a day (`2027-01-31`, its start in UTC).
    #[arg(long, value_parser = parse_instant)]
    pub expires_at: Option<chrono::DateTime<chrono::Utc>>,
}

impl KeySpecArgs {
    pub fn spec(&self) -> crate::store::KeySpec {
        crate::store::KeySpec {
            name: self.name.clone(),
            expires_at: self.expires_at,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Create an API key for a tenant (name or id) and print it (shown once).
    Create {
        tenant: String,
        #[command(flatten)]
        spec: KeySpecArgs,
        #[arg(long)]
        json: bool,
    },
    /// List a tenant's keys (prefixes only).
    List {
        tenant: String,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key, by id or by prefix (as shown by `key list`); it stops working within
    /// the server's key-cache TTL.
    Revoke {
        key: String,
        /// Only if the key is this tenant's (name or id).
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

/// Operators' own keys, and usage across tenants.
#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Admin keys: the `/admin/v1` API's credentials.
    #[command(subcommand)]
    Key(AdminKeyCommand),
    /// Token usage of all tenants (or one) over UTC days, as `GET /admin/v1/usage`.
    Usage {
        /// Only this tenant (name or id).
        #[arg(long)]
        tenant: Option<String>,
        /// First day, YYYY-MM-DD (default: 29 days before --to).
        #[arg(long)]
        from: Option<chrono::NaiveDate>,
        /// Last day, YYYY-MM-DD (default: today, UTC).
        #[arg(long)]
        to: Option<chrono::NaiveDate>,
        /// One row per tenant, or per tenant and user, key or day.
        #[arg(long, value_enum, default_value_t = UsageGroupArg::Tenant)]
        group_by: UsageGroupArg,
        #[arg(long)]
        json: bool,
    },
    /// The audit log, newest first, as `GET /admin/v1/audit`.
    Audit {
        /// Only this tenant's records (name or id; a deleted tenant by its last name).
        #[arg(long)]
        tenant: Option<String>,
        /// Only this action (tenant.disable) or family (tenant, key, admin_key, auth, budget).
        #[arg(long)]
        action: Option<String>,
        /// Only records at or after this time (RFC 3339, or a day: its start in UTC).
        #[arg(long, value_parser = parse_instant)]
        since: Option<chrono::DateTime<chrono::Utc>>,
        /// Only records before this time.
        #[arg(long, value_parser = parse_instant)]
        until: Option<chrono::DateTime<chrono::Utc>>,
        /// Records to skip.
        #[arg(long, default_value_t = 0)]
        offset: u64,
        /// Records to show (1 to 200).
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=200))]
        limit: u64,
        #[arg(long)]
        json: bool,
    },
}

/// `--group-by` of `confab admin usage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum UsageGroupArg {
    Tenant,
    User,
    Key,
    Day,
}

#[derive(Debug, Subcommand)]
pub enum AdminKeyCommand {
    /// Create an admin key and print it (shown once).
    Create {
        #[command(flatten)]
        spec: KeySpecArgs,
        #[arg(long)]
        json: bool,
    },
    /// List the admin keys (prefixes only).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke an admin key, by id or by prefix.
    Revoke {
        key: String,
        #[arg(long)]
        json: bool,
    },
}

/// A secret from the environment: shown as `***` in debug output.
#[derive(Clone)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_string()))
    }
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "CONFAB_BIND", default_value = "127.0.0.1:8000")]
    pub bind: SocketAddr,
    /// On first start (no tenant yet), tenant `default` gets this API key instead of a random
    /// one (24 to 256 printable ASCII characters).
    #[arg(long, env = "CONFAB_BOOTSTRAP_API_KEY", hide_env_values = true)]
    pub bootstrap_api_key: Option<Secret>,
    /// While no admin key works yet, this one is added (24 to 256 printable ASCII
    /// characters; a random one comes from `confab admin key create`).
    #[arg(long, env = "CONFAB_BOOTSTRAP_ADMIN_KEY", hide_env_values = true)]
    pub bootstrap_admin_key: Option<Secret>,
    /// Seconds an API-key lookup is cached; a revoked key works at most this long.
    #[arg(long, env = "CONFAB_AUTH_CACHE_TTL_SECS", default_value_t = 5)]
    pub auth_cache_ttl_secs: u64,
    /// REST requests per minute per tenant (a tenant may have its own: `tenant set-limits`).
    #[arg(long, env = "CONFAB_REQUESTS_PER_MINUTE", default_value_t = QuotaDefaults::default().requests_per_minute)]
    pub requests_per_minute: u32,
    /// Browser origins allowed to call the API, comma-separated (CORS); none: CORS off.
    #[arg(long, env = "CONFAB_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,
    /// When set, `GET /metrics` needs `Authorization: Bearer <token>`. Without it, metrics
    /// are served only on a loopback `--bind` (else 403), unless `--metrics-public`.
    #[arg(long, env = "CONFAB_METRICS_TOKEN", hide_env_values = true)]
    pub metrics_token: Option<Secret>,
    /// Serve `GET /metrics` without a token on any address (it shows tenant ids and their
    /// queue depths: only behind a network you trust).
    #[arg(long, env = "CONFAB_METRICS_PUBLIC")]
    pub metrics_public: bool,
    #[command(flatten)]
    pub limits: LimitArgs,
    #[command(flatten)]
    pub connections: ConnectionArgs,
    #[command(flatten)]
    pub chat: ChatArgs,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    #[command(flatten)]
    pub audit: AuditArgs,
    #[command(flatten)]
    pub model: ModelArgs,
}

/// The audit log (`GET /admin/v1/audit`, `confab admin audit`).
#[derive(Debug, Clone, Args)]
pub struct AuditArgs {
    /// Days audit records are kept; older ones are deleted. 0: kept forever.
    #[arg(long, env = "CONFAB_AUDIT_RETENTION_DAYS", default_value_t = 180, value_parser = clap::value_parser!(u32).range(0..=36500))]
    pub audit_retention_days: u32,
    /// Seconds over which failed authentications (per address and reason) and budget
    /// refusals (per tenant, user and budget) are counted into one record; also how often
    /// key expiries are looked for.
    #[arg(long, env = "CONFAB_AUDIT_FLUSH_SECS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub audit_flush_secs: u64,
}

impl From<&AuditArgs> for crate::audit::AuditSettings {
    fn from(a: &AuditArgs) -> Self {
        crate::audit::AuditSettings {
            retention: (a.audit_retention_days > 0)
                .then(|| chrono::Duration::days(a.audit_retention_days.into())),
            flush_interval: std::time::Duration::from_secs(a.audit_flush_secs),
            ..Default::default()
        }
    }
}

/// Cluster mode: several replicas on one PostgreSQL database (see `cluster`).
#[derive(Debug, Clone, Args)]
pub struct ClusterArgs {
    /// Redis for what the replicas share (`redis://HOST:6379`); turns cluster mode on, which
    /// needs PostgreSQL.
    #[arg(long, env = "CONFAB_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<Secret>,
    /// This replica's id (default: the host name and a random suffix). Keep it across
    /// restarts and a restarting replica recovers its own unfinished replies at once.
    #[arg(long, env = "CONFAB_REPLICA_ID", value_parser = replica_id)]
    pub replica_id: Option<String>,
    /// Seconds a replica stays alive without renewing its lease; after that the others
    /// mark its unfinished replies `interrupted`.
    #[arg(long, env = "CONFAB_REPLICA_LEASE_SECS", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=30))]
    pub replica_lease_secs: u64,
    /// Prefix of the Redis keys (several clusters can share one Redis).
    #[arg(long, env = "CONFAB_REDIS_PREFIX", default_value = "confab")]
    pub redis_prefix: String,
}

/// 1–64 characters: letters, digits, `-`, `_`, `.`.
fn replica_id(s: &str) -> Result<String, String> {
    let ok = (1..=64).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} is not a replica id: use 1 to 64 letters, digits, '-', '_' or '.'"
        ))
    }
}

impl ClusterArgs {
    /// The cluster settings, or `None` without `--redis-url`.
    pub fn settings(&self) -> Option<crate::cluster::ClusterSettings> {
        let url = self.redis_url.as_ref()?;
        Some(crate::cluster::ClusterSettings {
            redis_url: url.0.clone(),
            replica_id: self
                .replica_id
                .clone()
                .unwrap_or_else(crate::cluster::default_replica_id),
            lease: std::time::Duration::from_secs(self.replica_lease_secs),
            key_prefix: self.redis_prefix.clone(),
        })
    }
}

/// Live chat (WebSocket) settings.
#[derive(Debug, Clone, Args)]
pub struct ChatArgs {
    /// Replies a tenant may have waiting for the model; more get `queue_full`.
    #[arg(long, env = "CONFAB_QUEUE_PER_TENANT", default_value_t = 16)]
    pub queue_per_tenant: usize,
    /// Replies waiting for the model, all tenants together; more get `server_busy`.
    #[arg(long, env = "CONFAB_MAX_WAITING_TOTAL", default_value_t = 256)]
    pub max_waiting_total: usize,
    /// Share of the model's reply slots one tenant may hold (0–1; at least one slot): a hard
    /// cap, off at 1 (a tenant alone uses every idle slot; when others wait, each freed slot
    /// goes to the tenant served least recently).
    #[arg(long, env = "CONFAB_TENANT_SLOT_SHARE", default_value_t = 1.0)]
    pub tenant_slot_share: f64,
    /// Open WebSocket connections per tenant; more are closed with 4429.
    #[arg(long, env = "CONFAB_MAX_CONNECTIONS_PER_TENANT", default_value_t = QuotaDefaults::default().max_connections)]
    pub max_connections_per_tenant: u32,
    /// Messages per second per connection (token bucket; the burst is the same number).
    #[arg(long, env = "CONFAB_WS_MESSAGES_PER_SECOND", default_value_t = QuotaDefaults::default().ws_messages_per_second)]
    pub ws_messages_per_second: u32,
    /// Largest WebSocket text frame in bytes.
    #[arg(long, env = "CONFAB_WS_MAX_FRAME_BYTES", default_value_t = 64 * 1024)]
    pub ws_max_frame_bytes: usize,
    /// Longest message `content` in characters.
    #[arg(long, env = "CONFAB_MAX_CONTENT_CHARS", default_value_t = 16 * 1024)]
    pub max_content_chars: usize,
    /// `max_tokens` of chats that set none.
    #[arg(long, env = "CONFAB_DEFAULT_MAX_TOKENS", default_value_t = 512)]
    pub default_max_tokens: u32,
    /// Most stored messages a prompt is built from.
    #[arg(long, env = "CONFAB_HISTORY_MESSAGES", default_value_t = 200)]
    pub history_messages: u64,
    /// Milliseconds between saves of a reply's growing text.
    #[arg(long, env = "CONFAB_SAVE_INTERVAL_MS", default_value_t = 1000)]
    pub save_interval_ms: u64,
    /// Seconds of silence before the server pings a socket; three times that and it is dropped.
    #[arg(long, env = "CONFAB_WS_PING_SECS", default_value_t = 30)]
    pub ws_ping_secs: u64,
    /// On shutdown, seconds the accepted replies (running or queued) get to finish.
    #[arg(long, env = "CONFAB_SHUTDOWN_GRACE_SECS", default_value_t = 10)]
    pub shutdown_grace_secs: u64,
    /// Seconds between checks that the tenants with open sockets are still enabled: how
    /// soon a tenant disabled or deleted from the command line loses its sockets (through
    /// the admin API it is at once).
    #[arg(long, env = "CONFAB_TENANT_CHECK_SECS", default_value_t = 5)]
    pub tenant_check_secs: u64,
    /// Do not title chats: by default a chat created without a title gets one written by
    /// the model after its first reply (in the background, never ahead of a reply; a
    /// `chat_updated` event tells its sockets).
    #[arg(long, env = "CONFAB_NO_AUTO_TITLES")]
    pub no_auto_titles: bool,
    /// Most tokens a generated title may take.
    #[arg(long, env = "CONFAB_TITLE_MAX_TOKENS", default_value_t = 16)]
    pub title_max_tokens: u32,
}

impl ChatArgs {
    pub fn settings(&self, limits: Limits) -> crate::chat::ChatSettings {
        use std::time::Duration;
        let d = crate::chat::ChatSettings::default();
        crate::chat::ChatSettings {
            queue_per_tenant: self.queue_per_tenant,
            max_waiting_total: self.max_waiting_total,
            tenant_slot_share: self.tenant_slot_share,
            messages: crate::chat::protocol::MessageLimits {
                max_frame_bytes: self.ws_max_frame_bytes,
                max_content_chars: self.max_content_chars,
                fields: limits,
            },
            default_max_tokens: self.default_max_tokens,
            history_messages: self.history_messages,
            save_interval: Duration::from_millis(self.save_interval_ms),
            ping_interval: Duration::from_secs(self.ws_ping_secs.max(1)),
            idle_timeout: Duration::from_secs(self.ws_ping_secs.max(1) * 3),
            shutdown_grace: Duration::from_secs(self.shutdown_grace_secs),
            tenant_check_interval: Duration::from_secs(self.tenant_check_secs.max(1)),
            auto_titles: !self.no_auto_titles,
            title_max_tokens: self.title_max_tokens.max(1),
            ..d
        }
    }
}

/// Caps and timeouts of client connections ([`crate::server`]).
#[derive(Debug, Clone, Args)]
pub struct ConnectionArgs {
    /// Open connections, all clients together (WebSockets included); more are answered 503
    /// `too_many_connections` and closed. 0: no cap.
    #[arg(long, env = "CONFAB_MAX_CONNECTIONS", default_value_t = ConnectionLimits::default().max_connections)]
    pub max_connections: usize,
    /// Open connections from one IP address. Behind a reverse proxy all clients share its
    /// address: raise this there (or set 0: no cap) and cap clients at the proxy.
    #[arg(long, env = "CONFAB_MAX_CONNECTIONS_PER_IP", default_value_t = ConnectionLimits::default().max_connections_per_ip)]
    pub max_connections_per_ip: usize,
    /// Seconds a client has to send a whole request head, from connecting or from the end of
    /// the previous response (so also the keep-alive idle timeout).
    #[arg(long, env = "CONFAB_HEADER_READ_TIMEOUT_SECS", default_value_t = ConnectionLimits::default().header_read_timeout.as_secs())]
    pub header_read_timeout_secs: u64,
    /// Seconds a request body may take, plus its length at `--min-body-bytes-per-sec`; a
    /// slower upload gets 408 `request_timeout`.
    #[arg(long, env = "CONFAB_BODY_READ_TIMEOUT_SECS", default_value_t = ConnectionLimits::default().body_read_timeout.as_secs())]
    pub body_read_timeout_secs: u64,
    /// Slowest accepted upload, in bytes per second.
    #[arg(long, env = "CONFAB_MIN_BODY_BYTES_PER_SEC", default_value_t = ConnectionLimits::default().min_body_bytes_per_sec)]
    pub min_body_bytes_per_sec: u64,
    /// Seconds a write to a client may make no progress before the connection is dropped (a
    /// client that stopped reading a stream or socket).
    #[arg(long, env = "CONFAB_WRITE_STALL_TIMEOUT_SECS", default_value_t = ConnectionLimits::default().write_stall_timeout.as_secs())]
    pub write_stall_timeout_secs: u64,
}

impl From<&ConnectionArgs> for ConnectionLimits {
    fn from(a: &ConnectionArgs) -> Self {
        use std::time::Duration;
        ConnectionLimits {
            max_connections: a.max_connections,
            max_connections_per_ip: a.max_connections_per_ip,
            header_read_timeout: Duration::from_secs(a.header_read_timeout_secs.max(1)),
            body_read_timeout: Duration::from_secs(a.body_read_timeout_secs.max(1)),
            min_body_bytes_per_sec: a.min_body_bytes_per_sec.max(1),
            write_stall_timeout: Duration::from_secs(a.write_stall_timeout_secs.max(1)),
        }
    }
}

/// Input limits.
#[derive(Debug, Clone, Args)]
pub struct LimitArgs {
    /// Largest request body in bytes.
    #[arg(long, env = "CONFAB_MAX_BODY_BYTES", default_value_t = Limits::default().max_body_bytes)]
    pub max_body_bytes: usize,
    /// Largest `metadata` object in bytes of JSON.
    #[arg(long, env = "CONFAB_MAX_METADATA_BYTES", default_value_t = Limits::default().max_metadata_bytes)]
    pub max_metadata_bytes: usize,
    /// Deepest nesting inside `metadata`.
    #[arg(long, env = "CONFAB_MAX_METADATA_DEPTH", default_value_t = Limits::default().max_metadata_depth)]
    pub max_metadata_depth: usize,
    /// Longest system prompt in characters.
    #[arg(long, env = "CONFAB_MAX_SYSTEM_PROMPT_CHARS", default_value_t = Limits::default().max_system_prompt_chars)]
    pub max_system_prompt_chars: usize,
    /// Most messages in one `/v1/chat/completions` request.
    #[arg(long, env = "CONFAB_MAX_REQUEST_MESSAGES", default_value_t = Limits::default().max_request_messages)]
    pub max_request_messages: usize,
    /// Longest life of a user-scoped token, in seconds (`ttl_seconds` of `POST /api/v1/tokens`).
    #[arg(long, env = "CONFAB_MAX_TOKEN_TTL_SECS", default_value_t = Limits::default().max_token_ttl_secs)]
    pub max_token_ttl_secs: u64,
    /// Largest body of `POST /api/v1/chats/import` in bytes (in place of --max-body-bytes).
    #[arg(long, env = "CONFAB_MAX_IMPORT_BYTES", default_value_t = Limits::default().max_import_bytes)]
    pub max_import_bytes: usize,
    /// Most messages in one imported chat.
    #[arg(long, env = "CONFAB_MAX_IMPORT_MESSAGES", default_value_t = Limits::default().max_import_messages)]
    pub max_import_messages: usize,
}

impl From<&LimitArgs> for Limits {
    fn from(a: &LimitArgs) -> Self {
        Limits {
            max_body_bytes: a.max_body_bytes,
            max_metadata_bytes: a.max_metadata_bytes,
            max_metadata_depth: a.max_metadata_depth,
            max_system_prompt_chars: a.max_system_prompt_chars,
            max_request_messages: a.max_request_messages.max(1),
            max_token_ttl_secs: a.max_token_ttl_secs.max(1),
            max_import_bytes: a.max_import_bytes,
            max_import_messages: a.max_import_messages,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn secrets_are_redacted() {
        assert_eq!(format!("{:?}", Secret("hunter2".into())), "***");
    }
}
