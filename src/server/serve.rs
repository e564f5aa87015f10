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
    /// Time a connection may sit with no request in flight.
    pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(75);
    /// Time a client may read nothing of an answer before it is cut (and the file it was
    /// reading let go).
    pub const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(60);

    /// The defaults; at most as many connections as [`Limits::default_max_connections`].
    pub fn new() -> Limits {
        Limits {
            header_read_timeout: Self::DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: Self::DEFAULT_IDLE_TIMEOUT,
            send_timeout: Self::DEFAULT_SEND_TIMEOUT,
            max_connections: Self::default_max_connections(),
        }
    }

    /// Half of the descriptors this process may open, less 128 kept for the cache's own
    /// files, records and locks (each connection may hold a socket and a file): between 16
    /// and 4096.
    pub fn default_max_connections() -> usize {
        let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .unwrap_or(u64::MAX);
        (soft.saturating_sub(128) / 2).clamp(16, 4096) as usize
    }

    /// Time for a client to send a request's headers, from the first byte of the request
    /// (or the connection).
    pub fn header_read_timeout(mut self, timeout: Duration) -> Self {
        self.header_read_timeout = timeout;
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

    /// Connections served at once; more wait in the kernel's queue until one closes.
    pub fn max_connections(mut self, connections: usize) -> Self {
        self.max_connections = connections.max(1);
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
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
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
        let active = Arc::new(AtomicUsize::new(0));
        let io = TokioIo::new(Watched::new(stream, &limits, Arc::clone(&active)));
        let service = Requests {
            app: app.clone(),
            active,
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
    active: Arc<AtomicUsize>,
}

impl hyper::service::Service<hyper::Request<Incoming>> for Requests {
    type Response = hyper::Response<Body>;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn call(&self, request: hyper::Request<Incoming>) -> Self::Future {
        let guard = InFlight::enter(&self.active);
        let mut app = self.app.clone();
        Box::pin(async move {
            // A Router is always ready.
            let response = app.call(request.map(Body::new)).await?;
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
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn enter(active: &Arc<AtomicUsize>) -> InFlight {
        active.fetch_add(1, Ordering::AcqRel);
        InFlight(Arc::clone(active))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
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

/// A connection's socket with two clocks: one cuts a client that reads nothing while the
/// server has bytes for it (`send_timeout`), one a connection idle with no request in flight
/// (`idle_timeout`). An error from either closes the connection, and with it the answer and
/// the file it held.
struct Watched {
    io: TcpStream,
    send_timeout: Duration,
    idle_timeout: Duration,
    /// Since when a write has waited for the client, if one does.
    stalled: Option<Pin<Box<Sleep>>>,
    /// The deadline of an idle connection, moved on by every byte read or written.
    idle: Pin<Box<Sleep>>,
    active: Arc<AtomicUsize>,
}

impl Watched {
    fn new(io: TcpStream, limits: &Limits, active: Arc<AtomicUsize>) -> Watched {
        Watched {
            io,
            send_timeout: limits.send_timeout,
            idle_timeout: limits.idle_timeout,
            stalled: None,
            idle: Box::pin(tokio::time::sleep(limits.idle_timeout)),
            active,
        }
    }

    fn moved(&mut self) {
        self.stalled = None;
        let deadline = Instant::now() + self.idle_timeout;
        self.idle.as_mut().reset(deadline);
    }

    /// A write that waits for the client: an error once it has waited `send_timeout`.
    fn poll_stalled<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let send_timeout = self.send_timeout;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(send_timeout)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client read nothing for the send timeout",
            ))),
            Poll::Pending => Poll::Pending,
        }
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
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(done) => {
                if buf.filled().len() > before {
                    this.moved();
                }
                Poll::Ready(done)
            }
            Poll::Pending => {
                if this.active.load(Ordering::Acquire) == 0
                    && this.idle.as_mut().poll(cx).is_ready()
                {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the connection was idle for the idle timeout",
                    )));
                }
                Poll::Pending
            }
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
