//! Prometheus metrics, served at `GET /metrics` in the text exposition format.
//!
//! One process-wide registry (a server is one process); every series has the `confab_`
//! prefix. Route labels are route templates (`api::middleware::RouteTable`), never raw paths, so a client cannot grow the
//! series count by inventing URLs; tenant labels are tenant ids (bounded by the operator).

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric of the server.
pub struct Metrics {
    registry: Registry,
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    pub ws_connections: IntGauge,
    pub queue_depth: IntGaugeVec,
    pub running_generations: IntGauge,
    pub generated_tokens: IntCounter,
    pub prompt_tokens: IntCounter,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub model_load_seconds: Gauge,
    pub rate_limited: IntCounterVec,
    pub kv_cache_lookups: IntCounterVec,
    pub kv_cache_reused_tokens: IntCounter,
    pub batch_size: Histogram,
    pub connections_refused: IntCounter,
    /// Cluster mode: a streamed token's time from the replica generating it to this one
    /// (publish to delivery to the room, by the two replicas' clocks).
    pub cluster_fanout: Histogram,
}

fn build() -> Result<Metrics, prometheus::Error> {
    let registry = Registry::new_custom(Some("confab".into()), None)?;
    let latency = vec![
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ];
    let m = Metrics {
        http_requests: IntCounterVec::new(
            Opts::new(
                "http_requests_total",
                "HTTP requests by route, method and status",
            ),
            &["route", "method", "status"],
        )?,
        http_duration: HistogramVec::new(
            HistogramOpts::new("http_request_duration_seconds", "HTTP request latency")
                .buckets(latency.clone()),
            &["route"],
        )?,
        ws_connections: IntGauge::new("websocket_connections", "Open WebSocket connections")?,
        queue_depth: IntGaugeVec::new(
            Opts::new("queue_depth", "Replies waiting for the model, by tenant"),
            &["tenant"],
        )?,
        running_generations: IntGauge::new("running_generations", "Replies being generated")?,
        generated_tokens: IntCounter::new("generated_tokens_total", "Tokens generated")?,
        prompt_tokens: IntCounter::new("prompt_tokens_total", "Prompt tokens processed")?,
        cluster_fanout: Histogram::with_opts(
            HistogramOpts::new(
                "cluster_fanout_seconds",
                "Time of a streamed token from the replica generating it to a replica relaying \
                 it to its sockets (cluster mode)",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
            ]),
        )?,
        time_to_first_token: Histogram::with_opts(
            HistogramOpts::new("time_to_first_token_seconds", "Time to first token")
                .buckets(latency.clone()),
        )?,
        inter_token_latency: Histogram::with_opts(
            HistogramOpts::new(
                "inter_token_latency_seconds",
                "Time between streamed tokens",
            )
            .buckets(vec![
                0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0,
            ]),
        )?,
        model_load_seconds: Gauge::new("model_load_seconds", "Time the model took to load")?,
        rate_limited: IntCounterVec::new(
            Opts::new(
                "rate_limited_total",
                "Requests and messages refused by a rate limit",
            ),
            &["kind"],
        )?,
        kv_cache_lookups: IntCounterVec::new(
            Opts::new(
                "kv_cache_lookups_total",
                "Chat turns by what the kept attention state gave: hit, mismatch (nothing shared), miss (none kept)",
            ),
            &["result"],
        )?,
        kv_cache_reused_tokens: IntCounter::new(
            "kv_cache_reused_tokens_total",
            "Prompt tokens not run again thanks to a chat's kept attention state",
        )?,
        batch_size: Histogram::with_opts(
            HistogramOpts::new(
                "engine_batch_size",
                "Sequences run together per engine step (continuous batching)",
            )
            .buckets(vec![1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0]),
        )?,
        connections_refused: IntCounter::new(
            "connections_refused_total",
            "Connections closed at once because a connection cap was reached",
        )?,
        registry,
    };
    m.registry.register(Box::new(m.http_requests.clone()))?;
    m.registry.register(Box::new(m.http_duration.clone()))?;
    m.registry.register(Box::new(m.ws_connections.clone()))?;
    m.registry.register(Box::new(m.queue_depth.clone()))?;
    m.registry
        .register(Box::new(m.running_generations.clone()))?;
    m.registry.register(Box::new(m.generated_tokens.clone()))?;
    m.registry.register(Box::new(m.prompt_tokens.clone()))?;
    m.registry
        .register(Box::new(m.time_to_first_token.clone()))?;
    m.registry.register(Box::new(m.cluster_fanout.clone()))?;
    m.registry
        .register(Box::new(m.inter_token_latency.clone()))?;
    m.registry
        .register(Box::new(m.model_load_seconds.clone()))?;
    m.registry.register(Box::new(m.rate_limited.clone()))?;
    m.registry.register(Box::new(m.kv_cache_lookups.clone()))?;
    m.registry
        .register(Box::new(m.kv_cache_reused_tokens.clone()))?;
    m.registry.register(Box::new(m.batch_size.clone()))?;
    m.registry
        .register(Box::new(m.connections_refused.clone()))?;
    Ok(m)
}

/// Times the gaps between a stream's tokens into `inter_token_latency`.
#[derive(Debug, Default)]
pub struct TokenGaps(Option<Instant>);

impl TokenGaps {
    /// A token was streamed now.
    pub fn tick(&mut self) {
        let now = Instant::now();
        if let Some(prev) = self.0.replace(now) {
            metrics()
                .inter_token_latency
                .observe((now - prev).as_secs_f64());
        }
    }
}

/// The server's metrics.
pub fn metrics() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    // The names and labels above are fixed and valid: building cannot fail.
    M.get_or_init(|| build().expect("metric definitions are valid"))
}

impl Metrics {
    /// The exposition text.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }

    pub fn observe_http(&self, route: &str, method: &str, status: u16, took: Duration) {
        self.http_requests
            .with_label_values(&[route, method, &status.to_string()])
            .inc();
        self.http_duration
            .with_label_values(&[route])
            .observe(took.as_secs_f64());
    }
}
