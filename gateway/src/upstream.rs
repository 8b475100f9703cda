//! Connections to upstreams: opened on demand, kept alive between requests, and pooled per
//! worker thread.
//!
//! Each worker thread runs its own single-threaded runtime, so its pool is a plain list that
//! no other thread touches: taking or returning a connection costs no lock, no task and no
//! wake-up. A pooled connection is checked when it is taken, not watched while it idles: a
//! connection the upstream closed, or one with unexpected bytes waiting, is dropped then.
//! This module owns connections only; what is sent over them is the proxy's business.

use std::cell::RefCell;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use pingora::protocols::http::v1::client::HttpSession;
use pingora::protocols::l4::stream::Stream as TcpStream;
use pingora::protocols::Stream;
use pingora::{Error, ErrorType, OrErr, Result};
use tokio::io::AsyncReadExt;

/// Longest wait for an upstream to accept a new connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest wait for the next bytes of an upstream's response, as nginx's
/// `proxy_read_timeout`; then the client gets 504.
// Limitation: fixed for every route; an app that streams with longer pauses (server-sent
// events with rare messages) is cut off.
pub const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Idle connections kept per worker thread, over all upstreams; one more is closed.
const MAX_IDLE_PER_THREAD: usize = 256;

/// An idle connection older than this is closed rather than reused: most servers close
/// theirs after a minute or so, and a request should not be the one to find out.
const MAX_IDLE_TIME: Duration = Duration::from_secs(30);

struct Idle {
    upstream: SocketAddr,
    stream: Stream,
    since: Instant,
}

thread_local! {
    static POOL: RefCell<Vec<Idle>> = const { RefCell::new(Vec::new()) };
}

/// An HTTP/1.1 client session to one upstream, and whether its connection served before.
pub struct Connection {
    pub session: HttpSession,
    pub upstream: SocketAddr,
    /// A reused connection may have been closed by the upstream just before the request was
    /// written; the caller may retry a request it can replay on a fresh one.
    pub reused: bool,
}

/// A connection to `upstream`: an idle one of this thread's pool when one is alive, else a
/// new one.
pub async fn connect(upstream: SocketAddr) -> Result<Connection> {
    if let Some(stream) = take_idle(upstream) {
        return Ok(Connection::new(stream, upstream, true));
    }
    connect_fresh(upstream).await
}

/// A new connection to `upstream`, never one from the pool.
pub async fn connect_fresh(upstream: SocketAddr) -> Result<Connection> {
    let connecting = tokio::net::TcpStream::connect(upstream);
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .or_err(ErrorType::ConnectTimedout, "connecting to the upstream")?
        .or_err(ErrorType::ConnectRefused, "connecting to the upstream")?;
    tcp.set_nodelay(true)
        .or_err(ErrorType::ConnectError, "setting TCP_NODELAY")?;
    Ok(Connection::new(
        Box::new(TcpStream::from(tcp)),
        upstream,
        false,
    ))
}

impl Connection {
    fn new(stream: Stream, upstream: SocketAddr, reused: bool) -> Self {
        let mut session = HttpSession::new(stream);
        session.read_timeout = Some(READ_TIMEOUT);
        Self {
            session,
            upstream,
            reused,
        }
    }

    /// Returns the connection to this thread's pool when the exchange on it ended cleanly
    /// and both sides allow keep-alive; otherwise it is closed.
    pub async fn release(mut self) {
        self.session.respect_keepalive();
        let Some(stream) = self.session.reuse().await else {
            return;
        };
        POOL.with(|pool| {
            let mut pool = pool.borrow_mut();
            if pool.len() >= MAX_IDLE_PER_THREAD {
                pool.remove(0);
            }
            pool.push(Idle {
                upstream: self.upstream,
                stream,
                since: Instant::now(),
            });
        });
    }
}

/// The most recently pooled live connection to `upstream`; dead and stale ones met on the
/// way are closed.
fn take_idle(upstream: SocketAddr) -> Option<Stream> {
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        let now = Instant::now();
        pool.retain(|idle| now.duration_since(idle.since) < MAX_IDLE_TIME);
        while let Some(index) = pool.iter().rposition(|idle| idle.upstream == upstream) {
            let mut idle = pool.swap_remove(index);
            if is_quiet(&mut idle.stream) {
                return Some(idle.stream);
            }
        }
        None
    })
}

/// Whether an idle connection is still open with nothing unread: a read that would block.
/// End of stream, an error or stray bytes (a response nobody asked for) all rule it out.
/// Uses the runtime's readiness, so a quiet socket usually costs no system call.
fn is_quiet(stream: &mut Stream) -> bool {
    let mut probe = [0u8; 1];
    // Unconstrained: an exhausted task budget must not pass for a quiet socket.
    let read = pin!(tokio::task::unconstrained(stream.read(&mut probe)));
    let mut context = Context::from_waker(Waker::noop());
    matches!(read.poll(&mut context), Poll::Pending)
}

/// An upstream error: marks `error` as the upstream's, so it maps to 502.
pub fn upstream_error(mut error: Box<Error>) -> Box<Error> {
    error.as_up();
    error
}
