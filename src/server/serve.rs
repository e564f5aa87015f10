//! Serving the router the way a reverse proxy would: a cap on connections, and timeouts for
//! a client that sends its headers too slowly, sits idle between requests, or stops reading
//! an answer. A client that disappears never holds a file (and its pin) longer than the send
//! timeout, and no number of slow clients takes the descriptors the cache needs for its own
//! files.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tower_service::Service;

/// The server's limits (`imgcache serve --header-timeout ... --max-connections ...`).
///
/// The defaults are those of a reverse proxy: nginx's `client_header_timeout`,
/// `keepalive_timeout` and `send_timeout` are 60 s, 75 s and 60 s.
#[derive(Debug, Clone)]
pub struct Limits {
    header_read_timeout: Duration,
    body_read_timeout: Duration,
    idle_timeout: Duration,
    send_timeout: Duration,
    max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits::new()
    }
}

impl Limits {
    /// Time for a client to send a request's headers.
    pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
    /// Time a request's body may send nothing while the server reads it (nginx's
    /// `client_body_timeout`).
    pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(60);
    /// Time a connection may sit with no request in flight.
    pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(75);
    /// Time a client may read nothing of an answer before it is cut (and the file it was
    /// reading let go).
    pub const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(60);

    /// The defaults; at most as many connections as [`Limits::default_max_connections`].
    pub fn new() -> Limits {
        Limits {
            header_read_timeout: Self::DEFAULT_HEADER_READ_TIMEOUT,
            body_read_timeout: Self::DEFAULT_BODY_READ_TIMEOUT,
            idle_timeout: Self::DEFAULT_IDLE_TIMEOUT,
            send_timeout: Self::DEFAULT_SEND_TIMEOUT,
            max_connections: Self::default_max_connections(),
        }
    }

    /// A quarter of the descriptors this process may open, less 128 kept for the cache's
    /// own records and locks (a connection streaming a miss holds four: its socket, the
    /// origin's, the part file and the URL's lock): between 16 and 4096.
    pub fn default_max_connections() -> usize {
        let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .unwrap_or(u64::MAX);
        (soft.saturating_sub(128) / 4).clamp(16, 4096) as usize
    }

    /// Time for a client to send a request's headers, from the connection's start or the
    /// first byte of a request after the last answer.
    pub fn header_read_timeout(mut self, timeout: Duration) -> Self {
        self.header_read_timeout = timeout;
        self
    }

    /// Time a request's body may send nothing while the server reads it; then the request
    /// fails and the connection closes.
    pub fn body_read_timeout(mut self, timeout: Duration) -> Self {
        self.body_read_timeout = timeout;
        self
    }

    /// Time a keep-alive connection may sit with no request in flight.
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// Time a client may read nothing of an answer while the server has bytes for it.
    pub fn send_timeout(mut self, timeout: Duration) -> Self {
        self.send_timeout = timeout;
        self
    }

    /// Connections served at once (at least 1, at most 2^24); more wait in the kernel's
    /// queue until one closes.
    pub fn max_connections(mut self, connections: usize) -> Self {
        self.max_connections = connections.clamp(1, 1 << 24);
        self
    }
}

/// Serves `app` on `listener` under `limits` until `shutdown` completes; then stops
/// accepting, lets the requests in flight finish, and returns when every connection has
/// closed (a caller that cannot wait bounds this with a timeout). Connections have
/// `TCP_NODELAY` set.
///
/// ```no_run
/// # async fn run(cache: imgcache::ImageCache) -> std::io::Result<()> {
/// use imgcache::server::{Limits, router, serve};
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:8787").await?;
/// serve(listener, router(cache), Limits::new(), std::future::pending()).await
/// # }
/// ```
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send,
) -> io::Result<()> {
    let stop = CancellationToken::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut http = hyper::server::conn::http1::Builder::new();
    // The header timer is the connection's own (see `Watched`): hyper's also runs while a
    // keep-alive connection is idle, which would cut it at the header timeout instead of
    // the idle one.
    http.timer(TokioTimer::new())
        .header_read_timeout(None)
        .keep_alive(true);
    let mut shutdown = std::pin::pin!(shutdown);
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => slot.map_err(io::Error::other)?,
            () = &mut shutdown => break,
        };
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of descriptors, or a connection reset before it was accepted: the
                    // loop goes on after a pause rather than spin.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        let active = Arc::new(Requesting::new());
        let idle = idle_for(Arc::clone(&active), limits.idle_timeout);
        let io = TokioIo::new(Watched::new(stream, &limits, Arc::clone(&active)));
        let service = Requests {
            app: app.clone(),
            active,
            body_read_timeout: limits.body_read_timeout,
        };
        let connection = http.serve_connection(io, service);
        let stop = stop.clone();
        connections.spawn(async move {
            let mut connection = std::pin::pin!(connection);
            let ended = tokio::select! {
                ended = connection.as_mut() => ended,
                () = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
                // Idle: closed (hyper does not poll an idle keep-alive connection's socket,
                // so the socket's own clocks cannot tell).
                () = idle => Ok(()),
            };
            if let Err(e) = ended {
                tracing::debug!(error = %e, "connection ended");
            }
            drop(slot);
        });
    }
    stop.cancel();
    connections.close();
    connections.wait().await;
    Ok(())
}

/// The router as hyper's service, counting the requests in flight on one connection (their
/// answers' bodies included): the idle timeout runs only while there are none.
#[derive(Clone)]
struct Requests {
    app: Router,
    active: Arc<Requesting>,
    body_read_timeout: Duration,
}

/// One connection's requests, as its service and its socket both see them.
struct Requesting {
    /// In flight, their answers' bodies included.
    active: AtomicUsize,
    /// Started since the connection opened.
    started: AtomicUsize,
    /// When the connection opened, and the last byte moved on it since (in ms).
    born: Instant,
    moved_ms: std::sync::atomic::AtomicU64,
}

impl Requesting {
    fn new() -> Requesting {
        Requesting {
            active: AtomicUsize::new(0),
            started: AtomicUsize::new(0),
            born: Instant::now(),
            moved_ms: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn moved(&self) {
        let ms = self.born.elapsed().as_millis() as u64;
        self.moved_ms.store(ms, Ordering::Relaxed);
    }

    /// Time since the last byte moved.
    fn still_for(&self) -> Duration {
        let moved = Duration::from_millis(self.moved_ms.load(Ordering::Relaxed));
        self.born.elapsed().saturating_sub(moved)
    }
}

/// Ends once the connection has had no request in flight and no byte moving for `idle`.
async fn idle_for(requests: Arc<Requesting>, idle: Duration) {
    loop {
        let still = requests.still_for();
        if requests.active.load(Ordering::Acquire) == 0 && still >= idle {
            return;
        }
        let left = idle.saturating_sub(still).max(Duration::from_millis(10));
        tokio::time::sleep(left).await;
    }
}

impl hyper::service::Service<hyper::Request<Incoming>> for Requests {
    type Response = hyper::Response<Body>;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn call(&self, request: hyper::Request<Incoming>) -> Self::Future {
        let guard = InFlight::enter(&self.active);
        let mut app = self.app.clone();
        let timeout = self.body_read_timeout;
        Box::pin(async move {
            let request = request.map(|body| {
                Body::new(Sending {
                    body,
                    timeout,
                    waiting: None,
                })
            });
            // A Router is always ready.
            let response = app.call(request).await?;
            Ok(response.map(|body| {
                Body::new(Answer {
                    body,
                    _guard: guard,
                })
            }))
        })
    }
}

/// One request in flight, until its answer's body is dropped.
struct InFlight(Arc<Requesting>);

impl InFlight {
    fn enter(requests: &Arc<Requesting>) -> InFlight {
        requests.active.fetch_add(1, Ordering::AcqRel);
        requests.started.fetch_add(1, Ordering::AcqRel);
        InFlight(Arc::clone(requests))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A request's body, read with a timeout between its frames: a client that announces a body
/// and sends none of it is not waited for forever.
struct Sending {
    body: Incoming,
    timeout: Duration,
    waiting: Option<Pin<Box<Sleep>>>,
}

impl http_body::Body for Sending {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.waiting = None;
                Poll::Ready(frame.map(|f| f.map_err(io::Error::other)))
            }
            Poll::Pending => timed_out(
                &mut this.waiting,
                this.timeout,
                cx,
                "the client sent nothing of its request's body for the body timeout",
            )
            .map(Some),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A wait that has a clock: `clock` starts at the first call (`after` from then) and stays
/// until the caller clears it when the wait ends; once it has run out, the error `why`.
fn timed_out<T>(
    clock: &mut Option<Pin<Box<Sleep>>>,
    after: Duration,
    cx: &mut Context<'_>,
    why: &'static str,
) -> Poll<io::Result<T>> {
    let clock = clock.get_or_insert_with(|| Box::pin(tokio::time::sleep(after)));
    match clock.as_mut().poll(cx) {
        Poll::Ready(()) => Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, why))),
        Poll::Pending => Poll::Pending,
    }
}

/// An answer's body, holding its request in flight.
struct Answer {
    body: Body,
    _guard: InFlight,
}

impl http_body::Body for Answer {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A connection's socket with two clocks: one cuts a client that takes longer than the
/// header timeout to send a request's head (from the connection's start, or from the first
/// byte after the last answer), one a client that reads nothing while the server has bytes
/// for it (`send_timeout`). An error from either closes the connection, and with it the
/// answer and the file it held. It also says when bytes last moved, for the idle timeout
/// (see `idle_for`).
struct Watched {
    io: TcpStream,
    header_timeout: Duration,
    send_timeout: Duration,
    /// Since when a write has waited for the client, if one does.
    stalled: Option<Pin<Box<Sleep>>>,
    /// The deadline of the head being received, while one is, and how many requests had
    /// started when it was set (one more, and the head is in).
    head: Option<(Pin<Box<Sleep>>, usize)>,
    requests: Arc<Requesting>,
}

impl Watched {
    fn new(io: TcpStream, limits: &Limits, requests: Arc<Requesting>) -> Watched {
        Watched {
            io,
            header_timeout: limits.header_read_timeout,
            send_timeout: limits.send_timeout,
            stalled: None,
            // The first request's head is due from the connection's start.
            head: Some((Box::pin(tokio::time::sleep(limits.header_read_timeout)), 0)),
            requests,
        }
    }

    fn moved(&mut self) {
        self.stalled = None;
        self.requests.moved();
    }

    /// A write that waits for the client: an error once it has waited `send_timeout`.
    fn poll_stalled<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        timed_out(
            &mut self.stalled,
            self.send_timeout,
            cx,
            "the client read nothing for the send timeout",
        )
    }

    fn wrote<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match polled {
            Poll::Ready(done) => {
                self.moved();
                Poll::Ready(done)
            }
            Poll::Pending => self.poll_stalled(cx),
        }
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let started = this.requests.started.load(Ordering::Acquire);
        if this.head.as_ref().is_some_and(|(_, at)| *at != started) {
            // A request started since: its head is in.
            this.head = None;
        }
        let between_requests = this.requests.active.load(Ordering::Acquire) == 0;
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(done) => {
                if buf.filled().len() > before {
                    this.moved();
                    if between_requests && this.head.is_none() {
                        // The first byte of the next request: its head is due.
                        let timeout = this.header_timeout;
                        this.head = Some((Box::pin(tokio::time::sleep(timeout)), started));
                    }
                }
                Poll::Ready(done)
            }
            Poll::Pending if between_requests => {
                let late = match this.head.as_mut() {
                    Some((head, _)) => head.as_mut().poll(cx).is_ready(),
                    None => false,
                };
                if late {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client took longer than the header timeout to send a request",
                    )));
                }
                Poll::Pending
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        this.wrote(cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.wrote(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_flush(cx);
        this.wrote(cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
