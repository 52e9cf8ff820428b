//! The connection layer: accepts TCP connections and serves HTTP/1.1 on them (WebSocket
//! upgrades included) with the timeouts and caps that poem's own `Server` cannot set.
//!
//! What an unauthenticated client on the network can hold is bounded here, before any
//! route runs:
//! - open connections, server-wide and per source address: over either cap a connection gets
//!   a fixed 503 written without reading anything from it, and is closed;
//! - the request head must arrive in full within [`ConnectionLimits::header_read_timeout`]
//!   of the connection opening or of the previous response (hyper's header timer, which is
//!   also the idle keep-alive timeout): slowloris connections and idle ones are closed;
//! - a write that makes no progress for [`ConnectionLimits::write_stall_timeout`] fails the
//!   connection: a client that stops reading a WebSocket, an SSE stream or a large response
//!   is dropped, and its task stops waiting on it.
//!
//! Bodies are read by the middleware (`api::middleware`), with their own deadline.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::combinators::BoxBody;
use hyper_util::rt::{TokioIo, TokioTimer};
use poem::{Endpoint, EndpointExt, IntoResponse};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

/// Caps and timeouts of client connections. Every one is a flag of `confab serve`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Open connections, all clients together (WebSockets included); 0: no cap.
    pub max_connections: usize,
    /// Open connections from one IP address; 0: no cap. Behind a reverse proxy every
    /// client shares the proxy's address: raise it there.
    pub max_connections_per_ip: usize,
    /// Time to send a whole request head, from the connection's start or the end of the
    /// previous response (so also the keep-alive idle timeout).
    pub header_read_timeout: Duration,
    /// A request body must arrive within this time plus its length at
    /// `min_body_bytes_per_sec`.
    pub body_read_timeout: Duration,
    /// Slowest accepted body upload, in bytes per second (see `body_read_timeout`).
    pub min_body_bytes_per_sec: u64,
    /// A write to the client that makes no progress for this long closes the connection.
    pub write_stall_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: 4096,
            max_connections_per_ip: 256,
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(10),
            min_body_bytes_per_sec: 32 * 1024,
            write_stall_timeout: Duration::from_secs(30),
        }
    }
}

impl ConnectionLimits {
    /// How long reading a body of `bytes` may take.
    pub fn body_deadline(&self, bytes: u64) -> Duration {
        let rate = self.min_body_bytes_per_sec.max(1);
        self.body_read_timeout + Duration::from_secs_f64(bytes as f64 / rate as f64)
    }
}

/// Counts open connections per source address; a slot is given back when its
/// [`ConnectionSlot`] drops (with the connection's IO, so upgraded WebSockets keep theirs).
#[derive(Default)]
struct PerIp {
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl PerIp {
    fn try_take(self: &Arc<Self>, ip: IpAddr, cap: usize) -> Option<IpSlot> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(ip).or_insert(0);
        if cap > 0 && *n >= cap {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            owner: self.clone(),
            ip,
        })
    }
}

struct IpSlot {
    owner: Arc<PerIp>,
    ip: IpAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut open = self.owner.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// A connection's place under both caps.
struct ConnectionSlot {
    _total: Option<OwnedSemaphorePermit>,
    _ip: IpSlot,
}

/// Read buffer of a connection: the largest request head (hyper needs at least 8 KiB).
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// The answer to a connection over a cap: written once, without reading the request.
static OVER_CAP: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| {
    let body = serde_json::json!({"error": {
        "code": "too_many_connections",
        "message": "Too many open connections; try again shortly.",
        "details": {"retry_after_seconds": 1},
    }})
    .to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
});

/// A client connection: the socket, its slot under the caps, and the write-stall timer.
pub struct Guarded<S> {
    inner: S,
    stall_timeout: Duration,
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
    _slot: Option<ConnectionSlot>,
}

impl<S> Guarded<S> {
    fn new(inner: S, stall_timeout: Duration, slot: Option<ConnectionSlot>) -> Guarded<S> {
        Guarded {
            inner,
            stall_timeout,
            stall: None,
            _slot: slot,
        }
    }

    /// Called when a write returned `Pending`: starts the stall timer, or fails once it ran
    /// out. Polling the timer registers the task to be woken when it does.
    fn stalled(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let timeout = self.stall_timeout;
        let sleep = self
            .stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client stopped reading",
            )),
            Poll::Pending => Poll::Pending,
        }
    }

    fn progress<T>(&mut self, r: Poll<io::Result<T>>, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        match r {
            Poll::Ready(r) => {
                self.stall = None;
                Poll::Ready(r)
            }
            Poll::Pending => self.stalled(cx).map(Err),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.progress(r, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.progress(r, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.progress(r, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.progress(r, cx)
    }
}

/// Serves `ep` on `listener` until `shutdown` completes; then stops accepting, lets open
/// requests finish (HTTP/1 graceful shutdown), and returns once every connection has
/// closed or `drain` has passed.
pub async fn serve<E>(
    listener: TcpListener,
    ep: E,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()> + Send,
    drain: Duration,
) -> io::Result<()>
where
    E: Endpoint + 'static,
{
    let ep: Arc<dyn poem::endpoint::DynEndpoint<Output = poem::Response>> =
        Arc::new(poem::endpoint::ToDynEndpoint(ep.map_to_response()));
    let local = listener.local_addr()?;
    let total =
        (limits.max_connections > 0).then(|| Arc::new(Semaphore::new(limits.max_connections)));
    let per_ip = Arc::new(PerIp::default());
    // Every connection task holds a receiver; `closed()` on the sender resolves when all
    // of them are gone.
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let (socket, remote) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors, usually: wait a moment instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let slot = take_slot(&total, &per_ip, remote.ip(), &limits);
        let Some(slot) = slot else {
            refuse(socket, remote);
            continue;
        };
        // Replies stream as many small writes; Nagle would hold each behind an ACK.
        let _ = socket.set_nodelay(true);
        let io = Guarded::new(socket, limits.write_stall_timeout, Some(slot));
        tokio::spawn(serve_connection(
            io,
            local,
            remote,
            ep.clone(),
            limits,
            stop_rx.clone(),
        ));
    }
    drop(listener);
    let _ = stop_tx.send(true);
    drop(stop_rx);
    if tokio::time::timeout(drain, stop_tx.closed()).await.is_err() {
        tracing::warn!("connections still open after the shutdown grace; closing them");
    }
    Ok(())
}

fn take_slot(
    total: &Option<Arc<Semaphore>>,
    per_ip: &Arc<PerIp>,
    ip: IpAddr,
    limits: &ConnectionLimits,
) -> Option<ConnectionSlot> {
    let permit = match total {
        Some(s) => Some(s.clone().try_acquire_owned().ok()?),
        None => None,
    };
    let ip = per_ip.try_take(ip, limits.max_connections_per_ip)?;
    Some(ConnectionSlot {
        _total: permit,
        _ip: ip,
    })
}

/// Answers a connection over a cap with [`OVER_CAP`] if the socket takes it at once, and
/// closes it: no task, no read, no buffer.
fn refuse(socket: TcpStream, remote: SocketAddr) {
    let _ = socket.try_write(&OVER_CAP);
    crate::metrics::metrics().connections_refused.inc();
    tracing::debug!(%remote, "connection refused: over the connection cap");
}

async fn serve_connection(
    io: Guarded<TcpStream>,
    local: SocketAddr,
    remote: SocketAddr,
    ep: Arc<dyn poem::endpoint::DynEndpoint<Output = poem::Response>>,
    limits: ConnectionLimits,
    mut stop: watch::Receiver<bool>,
) {
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let ep = ep.clone();
        async move {
            let req = poem::Request::from((
                req,
                poem::web::LocalAddr(poem::Addr::SocketAddr(local)),
                poem::web::RemoteAddr(poem::Addr::SocketAddr(remote)),
                poem::http::uri::Scheme::HTTP,
            ));
            let resp = ep.get_response(req).await.into_response();
            Ok::<_, std::convert::Infallible>(
                hyper::Response::<BoxBody<bytes::Bytes, io::Error>>::from(resp),
            )
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // A request head that grows past this (checked between reads, so by at most one
        // more read) gets 431; hyper's default (~400 KiB) would let each connection hold
        // that much while it trickles in.
        .max_buf_size(MAX_HEAD_BYTES)
        .keep_alive(true);
    let conn = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(%remote, error = %e, "connection ended with an error");
            }
            return;
        }
        _ = stop.wait_for(|s| *s) => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test(start_paused = true)]
    async fn a_write_that_makes_no_progress_fails_after_the_stall_timeout() {
        // The peer never reads: a 64-byte pipe fills up and the next write waits.
        let (a, _b) = tokio::io::duplex(64);
        let mut io = Guarded::new(a, Duration::from_secs(30), None);
        io.write_all(&[0u8; 64]).await.unwrap();
        let started = tokio::time::Instant::now();
        let err = io.write_all(&[0u8; 1]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(30) && waited < Duration::from_secs(31),
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_that_keeps_up_is_not_cut_off() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut io = Guarded::new(a, Duration::from_secs(30), None);
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            let mut got = 0;
            while got < 64 * 20 {
                tokio::time::sleep(Duration::from_secs(10)).await;
                got += tokio::io::AsyncReadExt::read(&mut b, &mut buf)
                    .await
                    .unwrap();
            }
            got
        });
        // Each write waits up to 10 s for the reader: never 30 s without progress.
        for _ in 0..20 {
            io.write_all(&[1u8; 64]).await.unwrap();
        }
        drop(io);
        assert!(reader.await.unwrap() >= 64 * 20);
    }

    #[test]
    fn per_ip_slots_are_given_back() {
        let per_ip = Arc::new(PerIp::default());
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let a = per_ip.try_take(ip, 2).unwrap();
        let _b = per_ip.try_take(ip, 2).unwrap();
        assert!(per_ip.try_take(ip, 2).is_none());
        assert!(per_ip.try_take("127.0.0.2".parse().unwrap(), 2).is_some());
        drop(a);
        assert!(per_ip.try_take(ip, 2).is_some());
        assert!(per_ip.try_take(ip, 0).is_some(), "0 is no cap");
    }

    #[test]
    fn body_deadline_grows_with_size() {
        let l = ConnectionLimits {
            body_read_timeout: Duration::from_secs(10),
            min_body_bytes_per_sec: 1024,
            ..ConnectionLimits::default()
        };
        assert_eq!(l.body_deadline(0), Duration::from_secs(10));
        assert_eq!(l.body_deadline(10 * 1024), Duration::from_secs(20));
    }
}
