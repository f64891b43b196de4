//! The public port's HTTP server (docs/architecture.md, "Hostile traffic"):
//! hyper's own connection builder with a Tokio timer, plus what an
//! internet-facing listener needs and `axum::serve` does not give:
//!
//! - a cap on open connections: at the cap the listener stops accepting, and
//!   new connections wait in the kernel's backlog until one closes;
//! - per-connection deadlines ([`Deadlines`]): a request head must arrive
//!   within the header timeout, counted from the connection's start or from
//!   the first byte of a later request; a kept-alive connection with no
//!   request in flight is closed after the idle timeout; a client that takes
//!   no bytes of an answer for the header timeout is dropped. Bodies have the
//!   webhook handler's own deadline;
//! - a request head of at most [`MAX_HEAD`] bytes (hyper's read buffer, so a
//!   connection stalled in its head holds at most that much);
//! - HTTP/1.1 only, unless h2c is switched on;
//! - graceful shutdown bounded by the drain timeout: connections with no
//!   request in flight are closed at once, the others finish or are dropped
//!   when the drain timeout ends.
//!
//! hyper's own `header_read_timeout` is not used: it also counts the idle time
//! of a kept-alive connection as header time, so it cannot give an idle
//! timeout longer than the header timeout (kept-alive connections from a load
//! balancer should outlive the balancer's own idle timeout).

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::Router;
use futures::task::AtomicWaker;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Largest request head (request line and headers) accepted; larger ones are
/// answered 431 by hyper. Dropbox's are well under 1 KiB.
pub const MAX_HEAD: usize = 16 * 1024;

/// How the public port treats connections.
#[derive(Clone, Debug)]
pub struct ListenerConfig {
    /// Connections open at once; more wait in the backlog.
    pub max_connections: usize,
    /// Time to send a request head (and to take an answer's bytes).
    pub header_timeout: Duration,
    /// How long a kept-alive connection may wait for its next request.
    pub idle_timeout: Duration,
    /// Also accept HTTP/2 with prior knowledge (h2c), e.g. from a proxy that
    /// speaks it to its backends.
    pub http2: bool,
    /// On shutdown, how long requests in flight may take to finish.
    pub drain_timeout: Duration,
}

/// Serves `router` on `addr` until `shutdown` is cancelled, then drains
/// (module documentation). `open` counts the open connections.
pub async fn serve(
    addr: SocketAddr,
    router: Router,
    config: ListenerConfig,
    shutdown: CancellationToken,
    open: Gauge,
) -> io::Result<()> {
    let listener = bind(addr, config.max_connections)?;
    tracing::info!(address = %listener.local_addr()?, max_connections = config.max_connections, "serving webhooks");
    raise_open_files_limit(config.max_connections);
    let builder = Arc::new(builder(&config));
    let slots = Arc::new(Semaphore::new(config.max_connections.max(1)));
    let connections = TaskTracker::new();
    let hard_stop = CancellationToken::new();
    let mut at_cap_since: Option<Instant> = None;
    loop {
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                if at_cap_since.is_none() {
                    tracing::warn!(
                        max_connections = config.max_connections,
                        "open connections at the cap; new ones wait until one closes"
                    );
                    at_cap_since = Some(Instant::now());
                }
                tokio::select! {
                    slot = slots.clone().acquire_owned() => match slot {
                        Ok(slot) => slot,
                        Err(_) => break,
                    },
                    _ = shutdown.cancelled() => break,
                }
            }
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.cancelled() => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // E.g. out of file descriptors: wait a little for some to close.
                tracing::warn!(error = %e, "could not accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        at_cap_since = None;
        let (builder, router, config) = (builder.clone(), router.clone(), config.clone());
        let (shutdown, hard_stop, open) = (shutdown.clone(), hard_stop.clone(), open.clone());
        connections.spawn(async move {
            open.inc();
            connection(stream, &builder, router, &config, &shutdown, &hard_stop).await;
            open.dec();
            drop(slot);
        });
    }
    // New connections are refused from here on.
    drop(listener);
    connections.close();
    if tokio::time::timeout(config.drain_timeout, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = connections.len(),
            "webhook requests still open at the drain timeout; closing them"
        );
        hard_stop.cancel();
        connections.wait().await;
    }
    Ok(())
}

/// Binds `addr` with a listen backlog of at least `connections` (the kernel
/// caps it at net.core.somaxconn): a burst of connections then waits in the
/// backlog instead of having its SYNs dropped, which would delay a genuine
/// client by a whole retransmission timeout (1 s).
fn bind(addr: SocketAddr, connections: usize) -> io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(u32::try_from(connections).unwrap_or(u32::MAX).max(1024))
}

fn builder(config: &ListenerConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_buf_size(MAX_HEAD)
        .keep_alive(true);
    if config.http2 {
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_concurrent_streams(32)
            .max_header_list_size(MAX_HEAD as u32);
        builder
    } else {
        builder.http1_only()
    }
}

/// Serves one connection until it ends, or until shutdown (see the module
/// documentation).
async fn connection(
    stream: TcpStream,
    builder: &auto::Builder<TokioExecutor>,
    router: Router,
    config: &ListenerConfig,
    shutdown: &CancellationToken,
    hard_stop: &CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let activity = Arc::new(Activity::default());
    let io = TokioIo::new(Deadlines::new(stream, activity.clone(), config));
    let service = Tracked {
        inner: TowerToHyperService::new(router),
        activity: activity.clone(),
    };
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "webhook connection ended with an error");
            }
            return;
        }
        _ = shutdown.cancelled() => {}
        _ = hard_stop.cancelled() => return,
    }
    // Nothing was asked of a connection with no request in flight.
    if activity.in_flight.load(Ordering::Acquire) == 0 {
        return;
    }
    conn.as_mut().graceful_shutdown();
    tokio::select! {
        _ = conn => {}
        _ = hard_stop.cancelled() => {}
    }
}

/// Requests of one connection in flight and answered, as the service sees them.
#[derive(Default)]
struct Activity {
    in_flight: AtomicUsize,
    answered: AtomicU64,
    /// The connection's task, woken after an answer so that the idle deadline
    /// starts (hyper need not read again by itself until the client writes).
    reader: AtomicWaker,
}

/// One request in flight, from the call of the service until its answer is
/// ready (or the request is dropped).
struct InFlight(Arc<Activity>);

impl InFlight {
    fn begin(activity: &Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // `answered` first: the connection sees a new idle period once nothing is in flight.
        self.0.answered.fetch_add(1, Ordering::AcqRel);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.0.reader.wake();
    }
}

/// The router as a hyper service that keeps [`Activity`] up to date.
struct Tracked {
    inner: TowerToHyperService<Router>,
    activity: Arc<Activity>,
}

impl hyper::service::Service<hyper::Request<Incoming>> for Tracked {
    type Response = axum::response::Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, request: hyper::Request<Incoming>) -> Self::Future {
        let in_flight = InFlight::begin(&self.activity);
        let answer = self.inner.call(request);
        Box::pin(async move {
            let response = answer.await;
            drop(in_flight);
            response
        })
    }
}

/// What a connection is waiting for, which decides its read deadline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// A request head (header timeout from its first byte, or from the start).
    Head,
    /// The next request of a kept-alive connection (idle timeout).
    Idle,
    /// A request is in flight: its body has the handler's own deadline.
    Busy,
}

/// A connection's socket with the listener's deadlines (module documentation).
struct Deadlines {
    io: TcpStream,
    activity: Arc<Activity>,
    phase: Phase,
    /// `activity.answered` when the phase was last decided.
    answered: u64,
    header_timeout: Duration,
    idle_timeout: Duration,
    read_deadline: Pin<Box<Sleep>>,
    /// Set while a write waits for the client to take bytes.
    write_deadline: Option<Pin<Box<Sleep>>>,
}

fn timed_out(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, what.to_owned())
}

impl Deadlines {
    fn new(io: TcpStream, activity: Arc<Activity>, config: &ListenerConfig) -> Self {
        Deadlines {
            io,
            activity,
            phase: Phase::Head,
            answered: 0,
            header_timeout: config.header_timeout,
            idle_timeout: config.idle_timeout,
            read_deadline: Box::pin(tokio::time::sleep(config.header_timeout)),
            write_deadline: None,
        }
    }

    /// Follows the service: busy while a request is in flight, idle after
    /// each answer.
    fn observe(&mut self) {
        if self.activity.in_flight.load(Ordering::Acquire) > 0 {
            self.phase = Phase::Busy;
            return;
        }
        let answered = self.activity.answered.load(Ordering::Acquire);
        if answered != self.answered {
            self.answered = answered;
            self.phase = Phase::Idle;
            let deadline = Instant::now() + self.idle_timeout;
            self.read_deadline.as_mut().reset(deadline);
        }
    }

    fn poll_write_deadline(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let timeout = self.header_timeout;
        let deadline = self
            .write_deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Err(timed_out("the client did not take the answer in time")),
            Poll::Pending => Ok(()),
        }
    }

    /// Clears the write deadline after progress; on `Pending`, arms it.
    fn after_write<T>(
        &mut self,
        cx: &mut Context<'_>,
        result: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match result {
            Poll::Ready(r) => {
                self.write_deadline = None;
                Poll::Ready(r)
            }
            Poll::Pending => match self.poll_write_deadline(cx) {
                Ok(()) => Poll::Pending,
                Err(e) => Poll::Ready(Err(e)),
            },
        }
    }
}

impl AsyncRead for Deadlines {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.activity.reader.register(cx.waker());
        this.observe();
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if this.phase == Phase::Idle && buf.filled().len() > before {
                    // The first bytes of the next request: its head is due.
                    this.phase = Phase::Head;
                    let deadline = Instant::now() + this.header_timeout;
                    this.read_deadline.as_mut().reset(deadline);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending if this.phase == Phase::Busy => Poll::Pending,
            Poll::Pending => {
                ready!(this.read_deadline.as_mut().poll(cx));
                Poll::Ready(Err(timed_out(match this.phase {
                    Phase::Idle => "the kept-alive connection was idle too long",
                    _ => "the request head was not sent in time",
                })))
            }
        }
    }
}

impl AsyncWrite for Deadlines {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.io).poll_write(cx, buf);
        this.after_write(cx, result)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.after_write(cx, result)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.io).poll_flush(cx);
        this.after_write(cx, result)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.io).poll_shutdown(cx);
        this.after_write(cx, result)
    }
}

/// Raises this process's soft limit of open files to its hard limit (as Go
/// programs do at start; container runtimes often set a soft limit of 1024),
/// and warns when even that is too low for `connections` open connections.
fn raise_open_files_limit(connections: usize) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    let soft = unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
        limit.rlim_cur
    };
    // Kubernetes API watches, callbacks and Dropbox take some files too.
    let needed = connections as u64 + 256;
    if soft < needed {
        tracing::warn!(
            open_files_limit = soft,
            max_connections = connections,
            "the open-files limit is below the connection cap; connections beyond it are refused"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn config() -> ListenerConfig {
        ListenerConfig {
            max_connections: 4,
            header_timeout: Duration::from_millis(300),
            idle_timeout: Duration::from_millis(900),
            http2: false,
            drain_timeout: Duration::from_millis(500),
        }
    }

    async fn start(config: ListenerConfig) -> (SocketAddr, CancellationToken, Gauge) {
        let router = Router::new().route("/", get(|| async { "ok" }));
        let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = probe.local_addr().expect("addr");
        drop(probe);
        let shutdown = CancellationToken::new();
        let open = Gauge::default();
        tokio::spawn(serve(addr, router, config, shutdown.clone(), open.clone()));
        for _ in 0..50 {
            if TcpStream::connect(addr).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (addr, shutdown, open)
    }

    /// Reads until EOF (or `within`); whether the server closed the connection.
    async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
        let mut buf = [0u8; 1024];
        let deadline = Instant::now() + within;
        loop {
            match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }

    const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";

    #[tokio::test]
    async fn a_stalled_head_is_closed_at_the_header_timeout() {
        let (addr, _shutdown, _) = start(config()).await;
        let mut silent = TcpStream::connect(addr).await.expect("connect");
        let mut partial = TcpStream::connect(addr).await.expect("connect");
        partial
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .await
            .expect("write");
        assert!(!closed_within(&mut partial, Duration::from_millis(150)).await);
        assert!(closed_within(&mut partial, Duration::from_millis(600)).await);
        assert!(closed_within(&mut silent, Duration::from_millis(100)).await);
    }

    #[tokio::test]
    async fn a_kept_alive_connection_waits_the_idle_timeout_then_closes() {
        let (addr, _shutdown, _) = start(config()).await;
        let mut conn = TcpStream::connect(addr).await.expect("connect");
        let mut buf = vec![0u8; 1024];
        for _ in 0..2 {
            conn.write_all(GET).await.expect("write");
            let n = conn.read(&mut buf).await.expect("read");
            assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
            // Longer than the header timeout, shorter than the idle timeout.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        // The next request's head, once begun, is due within the header timeout.
        conn.write_all(b"GET / HTTP/1.1\r\n").await.expect("write");
        assert!(closed_within(&mut conn, Duration::from_millis(600)).await);

        let mut idle = TcpStream::connect(addr).await.expect("connect");
        idle.write_all(GET).await.expect("write");
        let _ = idle.read(&mut buf).await.expect("read");
        assert!(!closed_within(&mut idle, Duration::from_millis(600)).await);
        assert!(closed_within(&mut idle, Duration::from_millis(700)).await);
    }

    #[tokio::test]
    async fn connections_over_the_cap_wait_for_a_slot() {
        let (addr, _shutdown, open) = start(config()).await;
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(TcpStream::connect(addr).await.expect("connect"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(open.get(), 4);
        let mut fifth = TcpStream::connect(addr).await.expect("connect (backlog)");
        fifth.write_all(GET).await.expect("write");
        let mut buf = vec![0u8; 1024];
        assert!(
            tokio::time::timeout(Duration::from_millis(150), fifth.read(&mut buf))
                .await
                .is_err(),
            "served over the cap"
        );
        drop(held);
        let n = tokio::time::timeout(Duration::from_secs(2), fifth.read(&mut buf))
            .await
            .expect("served once a slot was free")
            .expect("read");
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    }

    #[tokio::test]
    async fn h2c_is_refused_unless_enabled() {
        const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        let (addr, _shutdown, _) = start(config()).await;
        let mut conn = TcpStream::connect(addr).await.expect("connect");
        conn.write_all(PREFACE).await.expect("write");
        let mut buf = vec![0u8; 64];
        let n = conn.read(&mut buf).await.unwrap_or(0);
        // hyper's HTTP/1 parser refuses the preface (400 or a close), never an h2 SETTINGS frame.
        assert!(
            n == 0 || buf[..n].starts_with(b"HTTP/1.1 4"),
            "{:?}",
            &buf[..n]
        );

        let (addr, _shutdown, _) = start(ListenerConfig {
            http2: true,
            ..config()
        })
        .await;
        let mut conn = TcpStream::connect(addr).await.expect("connect");
        conn.write_all(PREFACE).await.expect("write");
        conn.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0])
            .await
            .expect("settings");
        let n = conn.read(&mut buf).await.expect("read");
        // A SETTINGS frame (type 4) from the server.
        assert!(n >= 9 && buf[3] == 4, "{:?}", &buf[..n]);
    }

    #[tokio::test]
    async fn shutdown_closes_waiting_connections_and_is_bounded_by_the_drain_timeout() {
        let (addr, shutdown, open) = start(ListenerConfig {
            header_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(30),
            ..config()
        })
        .await;
        let mut stalled = TcpStream::connect(addr).await.expect("connect");
        stalled
            .write_all(b"GET / HTTP/1.1\r\n")
            .await
            .expect("write");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(open.get(), 1);
        shutdown.cancel();
        assert!(closed_within(&mut stalled, Duration::from_millis(300)).await);
        assert!(TcpStream::connect(addr).await.is_err(), "still accepting");
    }
}
