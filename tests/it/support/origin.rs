//! A scriptable HTTP/1.1 origin on 127.0.0.1 (port 0) for tests, benchmarks and the demo.
//!
//! Each path has a [`Route`]: the body, the status, optional validators, a bandwidth limit, a
//! gate that holds the body until the test opens it, and a [`Fault`] to misbehave on purpose.
//! It counts requests per path and shuts down when dropped.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// How a route misbehaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Behaves.
    None,
    /// Sends the full Content-Length header, then only this many body bytes, then closes.
    CloseAfter(usize),
    /// Like `CloseAfter`, but resets the connection (RST) instead of closing it.
    ResetAfter(usize),
    /// Sends the body chunked and never sends the terminating chunk.
    ChunkedNoEnd,
    /// Sends the body chunked, properly terminated (no Content-Length).
    Chunked,
    /// Sends the headers, then nothing, keeping the connection open.
    StallAfterHeaders,
    /// Accepts the connection and closes it without answering.
    CloseImmediately,
}

/// What one path serves.
#[derive(Debug, Clone)]
pub struct Route {
    pub status: u16,
    pub body: Arc<Vec<u8>>,
    pub fault: Fault,
    pub etag: Option<String>,
    pub extra_headers: Vec<(String, String)>,
    /// Bytes per second, or unlimited.
    pub rate: Option<u64>,
    /// When set, the response waits for one permit.
    pub gate: Option<Arc<Semaphore>>,
    /// Whether the gate holds only the body (the headers are sent first).
    pub gate_body_only: bool,
    /// Whether `Range` requests are honoured (206), as most servers do.
    pub ranges: bool,
    /// `Last-Modified` to send and to match against `If-Modified-Since` and `If-Range`.
    pub last_modified: Option<String>,
    /// Bytes written at a time (with `rate`, the trickle's step).
    pub piece: usize,
    /// After this many body bytes, the response waits for one permit.
    pub pause_at: Option<(usize, Arc<Semaphore>)>,
}

impl Route {
    pub fn ok(body: Vec<u8>) -> Route {
        Route {
            status: 200,
            body: Arc::new(body),
            fault: Fault::None,
            etag: None,
            extra_headers: Vec::new(),
            rate: None,
            gate: None,
            pause_at: None,
            gate_body_only: false,
            ranges: true,
            last_modified: None,
            piece: 64 * 1024,
        }
    }

    pub fn status(status: u16) -> Route {
        let mut r = Route::ok(format!("status {status}").into_bytes());
        r.status = status;
        r
    }

    pub fn fault(mut self, fault: Fault) -> Route {
        self.fault = fault;
        self
    }

    pub fn etag(mut self, etag: &str) -> Route {
        self.etag = Some(etag.to_owned());
        self
    }

    pub fn last_modified(mut self, date: &str) -> Route {
        self.last_modified = Some(date.to_owned());
        self
    }

    /// Answers `Range` requests with the whole body (200), as some servers do.
    pub fn ignore_range(mut self) -> Route {
        self.ranges = false;
        self
    }

    /// Sends `bytes` at a time.
    pub fn piece(mut self, bytes: usize) -> Route {
        self.piece = bytes.max(1);
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Route {
        self.extra_headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn rate(mut self, bytes_per_sec: u64) -> Route {
        self.rate = Some(bytes_per_sec);
        self
    }

    /// Holds the whole response until a permit is added to the returned semaphore.
    pub fn gated(mut self) -> (Route, Arc<Semaphore>) {
        let gate = Arc::new(Semaphore::new(0));
        self.gate = Some(Arc::clone(&gate));
        (self, gate)
    }

    /// Sends the headers and the first `bytes` of the body, then holds the rest until a
    /// permit is added.
    pub fn pause_at(mut self, bytes: usize) -> (Route, Arc<Semaphore>) {
        let gate = Arc::new(Semaphore::new(0));
        self.pause_at = Some((bytes, Arc::clone(&gate)));
        (self, gate)
    }

    /// Sends the headers at once and holds the body until a permit is added.
    pub fn gated_body(self) -> (Route, Arc<Semaphore>) {
        let (mut route, gate) = self.gated();
        route.gate_body_only = true;
        (route, gate)
    }
}

/// A request as the origin saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Default)]
struct Shared {
    /// Per path, the routes still to serve in order; the last one repeats.
    routes: Mutex<HashMap<String, Vec<Route>>>,
    hits: Mutex<HashMap<String, usize>>,
    seen: Mutex<Vec<Seen>>,
    total: AtomicUsize,
    open_connections: AtomicUsize,
    /// Body bytes written to sockets, over every request.
    body_bytes: AtomicUsize,
}

/// The origin; stops accepting and drops its connections when dropped.
pub struct Origin {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Origin {
    pub async fn start() -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared::default());
        let state = Arc::clone(&shared);
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let state = Arc::clone(&state);
                        connections.spawn(async move {
                            state.open_connections.fetch_add(1, Ordering::SeqCst);
                            let _ = serve(stream, &state).await;
                            state.open_connections.fetch_sub(1, Ordering::SeqCst);
                        });
                    }
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
            }
        });
        Origin { addr, shared, task }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT/` followed by `path` (without its leading slash).
    pub fn url(&self, path: &str) -> String {
        format!("http://{}/{}", self.addr, path.trim_start_matches('/'))
    }

    pub fn base(&self) -> String {
        format!("http://{}/", self.addr)
    }

    pub fn route(&self, path: &str, route: Route) {
        self.route_seq(path, vec![route]);
    }

    /// Serves `routes` to successive requests for `path`; the last one repeats.
    pub fn route_seq(&self, path: &str, routes: Vec<Route>) {
        assert!(!routes.is_empty());
        let path = format!("/{}", path.trim_start_matches('/'));
        self.shared.routes.lock().unwrap().insert(path, routes);
    }

    /// Connections being served now.
    pub fn open_connections(&self) -> usize {
        self.shared.open_connections.load(Ordering::SeqCst)
    }

    /// Requests received for `path` (its leading slash optional).
    pub fn hits(&self, path: &str) -> usize {
        let path = format!("/{}", path.trim_start_matches('/'));
        *self.shared.hits.lock().unwrap().get(&path).unwrap_or(&0)
    }

    /// Body bytes sent so far, over every request.
    pub fn body_bytes(&self) -> usize {
        self.shared.body_bytes.load(Ordering::Relaxed)
    }

    pub fn total_hits(&self) -> usize {
        self.shared.total.load(Ordering::SeqCst)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.shared.seen.lock().unwrap().clone()
    }

    /// Waits (polling briefly) until `path` has received `n` requests.
    pub async fn wait_for_hits(&self, path: &str, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.hits(path) < n {
            assert!(
                Instant::now() < deadline,
                "origin never saw {n} requests for {path}"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

async fn serve(mut stream: TcpStream, state: &Shared) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(4096);
    loop {
        // One request per connection: read the head.
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
        if buf.len() > 64 * 1024 {
            return Ok(());
        }
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or("").split(' ');
    let method = first.next().unwrap_or("").to_owned();
    let path = first.next().unwrap_or("/").to_owned();
    let headers: Vec<(String, String)> = lines
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let route_path = path.split('?').next().unwrap_or("/").to_owned();
    state.total.fetch_add(1, Ordering::SeqCst);
    *state
        .hits
        .lock()
        .unwrap()
        .entry(route_path.clone())
        .or_insert(0) += 1;
    let seen = Seen {
        method: method.clone(),
        path: path.clone(),
        headers,
    };
    state.seen.lock().unwrap().push(seen.clone());
    let route = {
        let mut routes = state.routes.lock().unwrap();
        match routes.get_mut(&route_path) {
            Some(seq) if seq.len() > 1 => Some(seq.remove(0)),
            Some(seq) => seq.first().cloned(),
            None => None,
        }
    };
    let route = route.unwrap_or_else(|| Route::status(404));
    if route.fault == Fault::CloseImmediately {
        return Ok(());
    }
    if let Some(gate) = route.gate.as_ref().filter(|_| !route.gate_body_only) {
        gate.acquire().await.expect("gate closed").forget();
    }
    let validator_matches = |value: &str| {
        route.etag.as_deref() == Some(value) || route.last_modified.as_deref() == Some(value)
    };
    let len = route.body.len();
    let mut status = route.status;
    let mut start = 0usize;
    let mut content_range = None;
    if status == 200 {
        let not_modified = seen
            .header("if-none-match")
            .map(|v| route.etag.as_deref() == Some(v))
            .or_else(|| {
                seen.header("if-modified-since")
                    .map(|v| route.last_modified.as_deref() == Some(v))
            })
            .unwrap_or(false);
        let range_start = seen
            .header("range")
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.strip_suffix('-'))
            .and_then(|n| n.parse::<usize>().ok());
        let if_range_ok = seen.header("if-range").is_none_or(validator_matches);
        if not_modified {
            status = 304;
        } else if let (Some(n), true, true) = (range_start, route.ranges, if_range_ok) {
            if n >= len {
                status = 416;
                content_range = Some(format!("bytes */{len}"));
            } else {
                status = 206;
                start = n;
                content_range = Some(format!("bytes {n}-{}/{len}", len - 1));
            }
        }
    }
    let body: &[u8] = match status {
        304 | 416 => &[],
        _ => &route.body[start..],
    };
    let chunked = matches!(route.fault, Fault::Chunked | Fault::ChunkedNoEnd) && status != 304;
    let mut response = format!(
        "HTTP/1.1 {} {}\r\nConnection: close\r\nAccept-Ranges: bytes\r\n",
        status,
        reason(status)
    );
    if chunked {
        response.push_str("Transfer-Encoding: chunked\r\n");
    } else if status != 304 {
        response.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    if let Some(range) = &content_range {
        response.push_str(&format!("Content-Range: {range}\r\n"));
    }
    if let Some(etag) = &route.etag {
        response.push_str(&format!("ETag: {etag}\r\n"));
    }
    if let Some(lm) = &route.last_modified {
        response.push_str(&format!("Last-Modified: {lm}\r\n"));
    }
    for (k, v) in &route.extra_headers {
        response.push_str(&format!("{k}: {v}\r\n"));
    }
    response.push_str("\r\n");
    stream.write_all(response.as_bytes()).await?;
    if method == "HEAD" || body.is_empty() {
        stream.flush().await?;
        return Ok(());
    }
    if route.fault == Fault::StallAfterHeaders {
        stream.flush().await?;
        // Silence until the client gives up and closes (a read then returns 0).
        let mut sink = [0u8; 64];
        while stream.read(&mut sink).await? > 0 {}
        return Ok(());
    }
    if let Some(gate) = route.gate.as_ref().filter(|_| route.gate_body_only) {
        stream.flush().await?;
        gate.acquire().await.expect("gate closed").forget();
    }
    let limit = match route.fault {
        Fault::CloseAfter(n) | Fault::ResetAfter(n) => n.min(body.len()),
        _ => body.len(),
    };
    let started = Instant::now();
    let mut sent = 0usize;
    let mut paused = false;
    while sent < limit {
        if let Some((at, gate)) = &route.pause_at
            && !paused
            && sent >= *at
        {
            stream.flush().await?;
            gate.acquire().await.expect("gate closed").forget();
            paused = true;
        }
        let mut end = (sent + route.piece).min(limit);
        if let Some((at, _)) = &route.pause_at
            && !paused
            && sent < *at
        {
            end = end.min(*at);
        }
        let piece = &body[sent..end];
        if chunked {
            stream
                .write_all(format!("{:x}\r\n", piece.len()).as_bytes())
                .await?;
            stream.write_all(piece).await?;
            stream.write_all(b"\r\n").await?;
        } else {
            stream.write_all(piece).await?;
        }
        state.body_bytes.fetch_add(piece.len(), Ordering::Relaxed);
        sent = end;
        if let Some(rate) = route.rate {
            stream.flush().await?;
            let due = Duration::from_secs_f64(sent as f64 / rate as f64);
            let elapsed = started.elapsed();
            if due > elapsed {
                tokio::time::sleep(due - elapsed).await;
            }
        }
    }
    match route.fault {
        Fault::Chunked => stream.write_all(b"0\r\n\r\n").await?,
        Fault::ResetAfter(_) => {
            stream.flush().await?;
            // SO_LINGER 0: closing sends RST instead of FIN.
            let std = stream.into_std()?;
            socket_linger_zero(&std);
            drop(std);
            return Ok(());
        }
        Fault::ChunkedNoEnd => {
            stream.flush().await?;
            // Keep the connection open briefly, then drop it without the last chunk.
            tokio::time::sleep(Duration::from_millis(50)).await;
            return Ok(());
        }
        _ => {}
    }
    stream.flush().await?;
    stream.shutdown().await?;
    Ok(())
}

fn socket_linger_zero(stream: &std::net::TcpStream) {
    let sock = socket2::SockRef::from(stream);
    let _ = sock.set_linger(Some(Duration::ZERO));
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        304 => "Not Modified",
        404 => "Not Found",
        416 => "Range Not Satisfiable",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// Deterministic bytes that look like a gzip-compressed volume: the gzip magic, then
/// pseudo-random data from `seed`.
pub fn volume(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    if len >= 2 {
        out[0] = 0x1f;
        out[1] = 0x8b;
    }
    out
}

/// Hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(bytes))
}
