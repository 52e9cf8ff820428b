//! `confab bench serve`: drives a running server over its public API the way chat clients
//! do — N chats at once, T turns each, every reply streamed over `/ws/chat` — and reports
//! what users feel: time to first token per turn number (so a TTFT that grows with the
//! history shows), inter-token latency, aggregate generated tokens per second, and errors.
//!
//! Times are measured at the client, from sending the message to the first token (queue
//! wait and prompt processing included). Chats are created with greedy decoding and a fixed
//! `max_tokens`, and deleted at the end.
//!
//! With `--watch-url` (cluster mode: replicas' own addresses), every chat also has a socket
//! there that only watches; the report then gives the fan-out lag, each token's arrival at
//! the watching socket minus its arrival at the chatting one, for the chats whose two
//! sockets are on different replicas.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// What to run.
#[derive(Debug, Clone)]
pub struct ServeBenchConfig {
    /// `http://HOST:PORT` of the server.
    pub url: String,
    pub api_key: String,
    pub chats: usize,
    pub turns: usize,
    pub max_tokens: u32,
    /// Bound on one reply, from sending to its end.
    pub reply_timeout: Duration,
    /// Where watching sockets connect (chat `i` on `watch_urls[i % len]`); empty: none.
    pub watch_urls: Vec<String>,
}

/// Percentiles of a set of durations, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    pub count: usize,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
}

impl Percentiles {
    fn of(mut ms: Vec<f64>) -> Option<Percentiles> {
        if ms.is_empty() {
            return None;
        }
        ms.sort_by(f64::total_cmp);
        let at = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
        Some(Percentiles {
            count: ms.len(),
            p50: at(0.50),
            p95: at(0.95),
            p99: at(0.99),
        })
    }
}

/// The report.
#[derive(Debug, Serialize)]
pub struct ServeBenchReport {
    pub chats: usize,
    pub turns: usize,
    pub max_tokens: u32,
    pub wall_seconds: f64,
    pub replies: usize,
    pub generated_tokens: u64,
    /// Generated tokens of all chats together per wall-clock second.
    pub aggregate_tokens_per_second: f64,
    /// The same while all N chats were in conversation: from the moment the last chat sent
    /// its first message to the moment the first chat got its last reply. The whole-run
    /// figure also holds the tail, where chats whose replies happened to be longer run
    /// alone; this one is what N concurrent chats get. None when that window is empty.
    pub all_active_tokens_per_second: Option<f64>,
    /// Length of that window.
    pub all_active_seconds: f64,
    /// Time to first token by turn number (index 0 = the first turn of every chat).
    pub ttft_ms_by_turn: Vec<Option<Percentiles>>,
    /// The part of the time to first token the server reports for itself (`timings` of
    /// `message_stream_ended`: waiting for a slot + reading the prompt), all turns; the
    /// rest of the client's figure is saving the message, loading the history, transport.
    pub server_ttft_ms: Option<Percentiles>,
    pub inter_token_ms: Option<Percentiles>,
    /// With watching sockets: each token's arrival there minus its arrival at the chatting
    /// socket (negative when the watcher got it first). Chats whose watching socket landed
    /// on the replica they talk to (`X-Confab-Replica`) are left out: nothing fans out.
    pub fanout_lag_ms: Option<Percentiles>,
    pub errors: usize,
    /// The first few errors, as the server described them.
    pub error_samples: Vec<String>,
}

/// One reply as the client saw it.
#[derive(Default)]
struct Reply {
    ttft: Option<Duration>,
    /// Queue + prompt time as the server reports it.
    server_ttft_ms: Option<f64>,
    gaps: Vec<Duration>,
    completion_tokens: u64,
    error: Option<String>,
}

#[derive(Default)]
struct ChatResult {
    replies: Vec<(usize, Reply)>,
    error: Option<String>,
    /// When its first message was sent.
    began: Option<Instant>,
    /// When its last reply ended (or it failed).
    ended: Option<Instant>,
    /// Arrival of each generated token: one per streamed token event, plus, at the reply's
    /// end, the tokens the server counted but sent no event of their own for (the end token,
    /// tokens merged into one piece of text).
    token_times: Vec<Instant>,
    /// Arrival of each token event by (message id, index), when a socket watches too.
    arrivals: HashMap<(String, u64), Instant>,
    /// The same at the watching socket.
    watched: HashMap<(String, u64), Instant>,
}

/// A question for turn `t`; different every turn so the history grows like a real chat's.
fn question(chat: usize, turn: usize) -> String {
    const TOPICS: [&str; 10] = [
        "the moon",
        "bread",
        "rivers",
        "bicycles",
        "volcanoes",
        "libraries",
        "owls",
        "glass",
        "tea",
        "bridges",
    ];
    let topic = TOPICS[(chat + turn) % TOPICS.len()];
    format!("Tell me one interesting fact about {topic}.")
}

/// Runs the benchmark.
pub async fn run(cfg: &ServeBenchConfig) -> anyhow::Result<ServeBenchReport> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let base = cfg.url.trim_end_matches('/').to_string();
    let ready = http
        .get(format!("{base}/readyz"))
        .send()
        .await
        .with_context(|| format!("cannot reach {base}"))?;
    if !ready.status().is_success() {
        bail!("{base}/readyz answered {}", ready.status());
    }
    let started = Instant::now();
    let gate = Arc::new(tokio::sync::Barrier::new(cfg.chats));
    let tasks: Vec<_> = (0..cfg.chats)
        .map(|i| {
            let (http, base, cfg, gate) = (http.clone(), base.clone(), cfg.clone(), gate.clone());
            tokio::spawn(async move { one_chat(&http, &base, &cfg, i, &gate).await })
        })
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap_or_else(|e| ChatResult {
            error: Some(format!("chat task failed: {e}")),
            ..Default::default()
        }));
    }
    let wall = started.elapsed().as_secs_f64();

    let (window_start, window_end) = (
        results.iter().filter_map(|r| r.began).max(),
        results.iter().filter_map(|r| r.ended).min(),
    );
    let (mut all_active_seconds, mut all_active_tokens_per_second) = (0.0, None);
    if let (Some(start), Some(end)) = (window_start, window_end) {
        if end > start {
            let inside = results
                .iter()
                .flat_map(|r| &r.token_times)
                .filter(|t| (start..=end).contains(*t))
                .count();
            all_active_seconds = (end - start).as_secs_f64();
            all_active_tokens_per_second = Some(inside as f64 / all_active_seconds);
        }
    }
    let mut by_turn = vec![Vec::new(); cfg.turns];
    let (mut gaps, mut errors, mut tokens, mut replies) = (Vec::new(), Vec::new(), 0, 0);
    let mut server_ttft = Vec::new();
    let mut lags = Vec::new();
    for r in results {
        for (key, at) in &r.watched {
            if let Some(sent) = r.arrivals.get(key) {
                let lag = if at >= sent {
                    (*at - *sent).as_secs_f64()
                } else {
                    -(*sent - *at).as_secs_f64()
                };
                lags.push(lag * 1000.0);
            }
        }
        if let Some(e) = r.error {
            errors.push(e);
        }
        for (turn, reply) in r.replies {
            replies += 1;
            tokens += reply.completion_tokens;
            if let Some(t) = reply.ttft {
                by_turn[turn].push(t.as_secs_f64() * 1000.0);
            }
            gaps.extend(reply.gaps.iter().map(|g| g.as_secs_f64() * 1000.0));
            server_ttft.extend(reply.server_ttft_ms);
            if let Some(e) = reply.error {
                errors.push(e);
            }
        }
    }
    Ok(ServeBenchReport {
        chats: cfg.chats,
        turns: cfg.turns,
        max_tokens: cfg.max_tokens,
        wall_seconds: wall,
        replies,
        generated_tokens: tokens,
        aggregate_tokens_per_second: if wall > 0.0 {
            tokens as f64 / wall
        } else {
            0.0
        },
        all_active_tokens_per_second,
        all_active_seconds,
        ttft_ms_by_turn: by_turn.into_iter().map(Percentiles::of).collect(),
        server_ttft_ms: Percentiles::of(server_ttft),
        inter_token_ms: Percentiles::of(gaps),
        fanout_lag_ms: Percentiles::of(lags),
        errors: errors.len(),
        error_samples: errors.into_iter().take(5).collect(),
    })
}

async fn one_chat(
    http: &reqwest::Client,
    base: &str,
    cfg: &ServeBenchConfig,
    index: usize,
    gate: &tokio::sync::Barrier,
) -> ChatResult {
    let mut result = ChatResult::default();
    let user = format!("bench-{index}");
    let chat = create_chat(http, base, cfg, &user, index).await;
    let ws = match &chat {
        Ok(chat_id) => connect(base, cfg, &user, chat_id)
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(format!("create chat: {e:#}")),
    };
    let chatting_on = ws.as_ref().ok().and_then(|(_, r)| r.clone());
    let ws = ws.map(|(ws, _)| ws);
    let watcher = match (&chat, cfg.watch_urls.len()) {
        (Ok(chat_id), n) if n > 0 => {
            let url = cfg.watch_urls[index % n].trim_end_matches('/');
            match connect(url, cfg, &user, chat_id).await {
                // A watcher on the very replica the chat talks to measures no fan-out.
                Ok((_, Some(r))) if chatting_on.as_ref() == Some(&r) => None,
                Ok((w, _)) => Some(tokio::spawn(watch(w, cfg.turns))),
                Err(e) => {
                    result.error = Some(format!("watching socket on {url}: {e:#}"));
                    None
                }
            }
        }
        _ => None,
    };
    // Every chat, set up or failed, passes the gate once: the first turns start together, so
    // the window with all chats in conversation is not cut short by the slowest set-up (a
    // chat of short replies could otherwise end before the last one connects).
    gate.wait().await;
    let Ok(chat_id) = chat else {
        result.error = ws.err();
        return result;
    };
    match ws {
        Ok(ws) => {
            if let Err(e) = converse(ws, cfg, index, &mut result).await {
                result.error = Some(e.to_string());
            }
        }
        Err(e) => result.error = Some(e),
    }
    result.ended = Some(Instant::now());
    if let Some(w) = watcher {
        result.watched = w.await.unwrap_or_default();
    }
    let _ = http
        .delete(format!("{base}/api/v1/chats/{chat_id}"))
        .header("X-API-Key", &cfg.api_key)
        .send()
        .await;
    result
}

/// Creates the benchmark's chat `index` (greedy, `max_tokens` fixed) and returns its id.
async fn create_chat(
    http: &reqwest::Client,
    base: &str,
    cfg: &ServeBenchConfig,
    user: &str,
    index: usize,
) -> anyhow::Result<String> {
    let r = http
        .post(format!("{base}/api/v1/chats/"))
        .header("X-API-Key", &cfg.api_key)
        .json(&json!({
            "user_id": user,
            "title": format!("bench chat {index}"),
            "config": {"temperature": 0, "max_tokens": cfg.max_tokens},
        }))
        .send()
        .await?;
    let status = r.status();
    if !status.is_success() {
        bail!("{status} {}", r.text().await.unwrap_or_default());
    }
    let chat: Value = r.json().await?;
    chat["id"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("no id in {chat}"))
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens the chat's socket; also says which replica took it (`X-Confab-Replica`, cluster
/// mode).
async fn connect(
    base: &str,
    cfg: &ServeBenchConfig,
    user: &str,
    chat_id: &str,
) -> anyhow::Result<(Socket, Option<String>)> {
    let ws_base = base
        .replacen("http://", "ws://", 1)
        .replacen("https://", "wss://", 1);
    let query: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("api_key", &cfg.api_key)
        .append_pair("user_id", user)
        .append_pair("chat_id", chat_id)
        .finish();
    let (ws, response) = tokio_tungstenite::connect_async(format!("{ws_base}/ws/chat?{query}"))
        .await
        .context("WebSocket connect")?;
    let replica = response
        .headers()
        .get("x-confab-replica")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    Ok((ws, replica))
}

async fn converse(
    mut ws: Socket,
    cfg: &ServeBenchConfig,
    index: usize,
    result: &mut ChatResult,
) -> anyhow::Result<()> {
    for turn in 0..cfg.turns {
        let sent = Instant::now();
        result.began.get_or_insert(sent);
        let mut streamed = 0u64;
        let msg = json!({"content": question(index, turn)}).to_string();
        ws.send(Message::text(msg)).await?;
        let mut reply = Reply::default();
        let mut last: Option<Instant> = None;
        let deadline = tokio::time::Instant::now() + cfg.reply_timeout;
        loop {
            let frame = tokio::time::timeout_at(deadline, ws.next())
                .await
                .map_err(|_| anyhow!("turn {turn}: no reply end within {:?}", cfg.reply_timeout))?;
            let text = match frame {
                Some(Ok(Message::Text(t))) => t,
                Some(Ok(Message::Close(c))) => bail!("turn {turn}: the server closed: {c:?}"),
                Some(Ok(_)) => continue,
                Some(Err(e)) => bail!("turn {turn}: {e}"),
                None => bail!("turn {turn}: the connection ended"),
            };
            let ev: Value = serde_json::from_str(&text)?;
            match ev["event_type"].as_str() {
                Some("message_stream_token") => {
                    let now = Instant::now();
                    result.token_times.push(now);
                    if !cfg.watch_urls.is_empty() {
                        result.arrivals.insert(token_key(&ev), now);
                    }
                    streamed += 1;
                    match last.replace(now) {
                        None => reply.ttft = Some(now - sent),
                        Some(prev) => reply.gaps.push(now - prev),
                    }
                }
                Some("message_stream_ended") => {
                    reply.completion_tokens =
                        ev["usage"]["completion_tokens"].as_u64().unwrap_or(0);
                    let now = Instant::now();
                    // Bounded by the request's own limit: the count comes from the server.
                    let unseen = reply
                        .completion_tokens
                        .saturating_sub(streamed)
                        .min(u64::from(cfg.max_tokens));
                    result
                        .token_times
                        .extend(std::iter::repeat_n(now, unseen as usize));
                    let t = &ev["timings"];
                    if let (Some(q), Some(p)) =
                        (t["queue_ms"].as_u64(), t["time_to_first_token_ms"].as_u64())
                    {
                        reply.server_ttft_ms = Some((q + p) as f64);
                    }
                    if ev["finish_reason"] == "error" {
                        reply.error = Some(format!("turn {turn}: the reply failed"));
                    }
                    break;
                }
                Some("error") => {
                    reply.error = Some(format!(
                        "turn {turn}: {} ({})",
                        ev["code"].as_str().unwrap_or("?"),
                        ev["message"].as_str().unwrap_or("")
                    ));
                    // A refused message gets no reply; a failed reply still ends.
                    if ev["code"] != "generation_failed" {
                        break;
                    }
                }
                _ => {}
            }
        }
        result.replies.push((turn, reply));
    }
    let _ = ws.close(None).await;
    Ok(())
}

/// A token event's (message id, index).
fn token_key(ev: &Value) -> (String, u64) {
    (
        ev["message_id"].as_str().unwrap_or_default().to_string(),
        ev["index"].as_u64().unwrap_or(0),
    )
}

/// Reads a watching socket until `turns` replies have ended there (or it goes quiet for
/// 10 s): when each token event arrived.
async fn watch(mut ws: Socket, turns: usize) -> HashMap<(String, u64), Instant> {
    let mut arrivals = HashMap::new();
    let mut ended = 0;
    while ended < turns {
        let frame = match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => t,
            Ok(Some(Ok(_))) => continue,
            _ => break,
        };
        let now = Instant::now();
        let Ok(ev) = serde_json::from_str::<Value>(&frame) else {
            continue;
        };
        match ev["event_type"].as_str() {
            Some("message_stream_token") => {
                arrivals.insert(token_key(&ev), now);
            }
            Some("message_stream_ended") => ended += 1,
            _ => {}
        }
    }
    let _ = ws.close(None).await;
    arrivals
}

/// The report as a table.
pub fn print(r: &ServeBenchReport) {
    println!(
        "{} chats × {} turns, max_tokens {}: {} replies, {} tokens in {:.1} s",
        r.chats, r.turns, r.max_tokens, r.replies, r.generated_tokens, r.wall_seconds
    );
    println!(
        "aggregate generation   {:.1} tokens/s",
        r.aggregate_tokens_per_second
    );
    if let Some(tps) = r.all_active_tokens_per_second {
        println!(
            "  while all {} chats were active ({:.1} s of the run): {:.1} tokens/s",
            r.chats, r.all_active_seconds, tps
        );
    }
    if let Some(p) = &r.inter_token_ms {
        println!(
            "inter-token latency    p50 {:.1} ms  p99 {:.1} ms",
            p.p50, p.p99
        );
    }
    if let Some(p) = &r.fanout_lag_ms {
        println!(
            "fan-out lag            p50 {:.2} ms  p99 {:.2} ms  ({} tokens, watching socket vs chatting one)",
            p.p50, p.p99, p.count
        );
    }
    println!("time to first token by turn (ms):");
    println!("  turn      p50      p95      p99");
    for (turn, p) in r.ttft_ms_by_turn.iter().enumerate() {
        match p {
            Some(p) => println!(
                "  {:>4} {:>8.0} {:>8.0} {:>8.0}",
                turn + 1,
                p.p50,
                p.p95,
                p.p99
            ),
            None => println!("  {:>4}        -", turn + 1),
        }
    }
    if let Some(p) = &r.server_ttft_ms {
        println!(
            "  of which in the server's queue and prompt: p50 {:.0} ms  p99 {:.0} ms",
            p.p50, p.p99
        );
    }
    println!("errors                 {}", r.errors);
    for e in &r.error_samples {
        println!("  {e}");
    }
}
