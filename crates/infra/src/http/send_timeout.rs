//! A send timeout per HTTP connection, for responses the server streams for
//! as long as the client stays (the SSE live feed): once set, a connection
//! whose client takes no bytes for that long is closed, so a client that
//! stops reading cannot hold what its response holds (a live-feed slot, a
//! task, buffers) until TCP gives up.
//!
//! The timeout belongs to the connection, not to a response: while the
//! socket is full, hyper stops polling the response body, so nothing inside
//! the body can notice the stall. [`serve`] wraps every accepted socket in a
//! [`TimedIo`], whose writes fail once they have made no progress for the
//! connection's timeout, and hands each request the connection's
//! [`SendTimeout`] (and its peer address as `ConnectInfo<SocketAddr>`). A
//! connection has none until a handler sets it.

use std::convert::Infallible;
use std::future::{Future, Ready, ready};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::response::Response;
use axum::serve::{IncomingStream, Serve};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;

/// Serves `router` on `listener`, each connection with a [`SendTimeout`]
/// its handlers may set, and its peer address as `ConnectInfo<SocketAddr>`.
pub fn serve(listener: TcpListener, router: Router) -> Serve<Listener, MakeConnection, Connection> {
    axum::serve(Listener(listener), MakeConnection(router))
}

/// How long a connection's writes may make no progress before it is
/// closed. Shared by the connection's socket and its requests; none until
/// set. A request served without [`serve`] (a test calling the router
/// directly) gets one that nothing reads.
#[derive(Debug, Clone, Default)]
pub struct SendTimeout(Arc<AtomicU64>);

impl SendTimeout {
    /// From now on, and for the rest of the connection, a write that makes
    /// no progress for `limit` closes it. It stays set after the response:
    /// the last bytes of a streamed response are still being written when
    /// its body ends.
    pub fn set(&self, limit: Duration) {
        let millis = u64::try_from(limit.as_millis()).unwrap_or(u64::MAX).max(1);
        self.0.store(millis, Ordering::Relaxed);
    }

    fn get(&self) -> Option<Duration> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            millis => Some(Duration::from_millis(millis)),
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for SendTimeout {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<SendTimeout>()
            .cloned()
            .unwrap_or_default())
    }
}

/// A socket whose writes fail with `TimedOut` once they have made no
/// progress for its connection's [`SendTimeout`].
#[derive(Debug)]
pub struct TimedIo<T> {
    io: T,
    timeout: SendTimeout,
    /// Running while a write waits for the client to take bytes.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<T> TimedIo<T> {
    fn new(io: T) -> Self {
        TimedIo {
            io,
            timeout: SendTimeout::default(),
            stalled: None,
        }
    }

    /// What a write that made progress (`Ready`) or did not (`Pending`)
    /// comes to: `Pending` until the stall has lasted the timeout, then an
    /// error that ends the connection.
    fn progress<R>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        if poll.is_ready() {
            self.stalled = None;
            return poll;
        }
        let Some(limit) = self.timeout.get() else {
            return Poll::Pending;
        };
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client took no bytes within the send timeout",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for TimedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for TimedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_write(cx, buf);
        this.progress(cx, poll)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.progress(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.io).poll_flush(cx);
        this.progress(cx, poll)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// A TCP listener whose connections are [`TimedIo`]s.
#[derive(Debug)]
pub struct Listener(TcpListener);

impl axum::serve::Listener for Listener {
    type Io = TimedIo<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (io, addr) = axum::serve::Listener::accept(&mut self.0).await;
        (TimedIo::new(io), addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

/// Makes each accepted connection's service: the router, with the
/// connection's [`SendTimeout`] and peer address.
#[derive(Debug, Clone)]
pub struct MakeConnection(Router);

impl tower::Service<IncomingStream<'_, Listener>> for MakeConnection {
    type Response = Connection;
    type Error = Infallible;
    type Future = Ready<Result<Connection, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, incoming: IncomingStream<'_, Listener>) -> Self::Future {
        ready(Ok(Connection {
            router: self.0.clone(),
            peer: *incoming.remote_addr(),
            send_timeout: incoming.io().timeout.clone(),
        }))
    }
}

/// The router as one connection serves it.
#[derive(Debug, Clone)]
pub struct Connection {
    router: Router,
    peer: SocketAddr,
    send_timeout: SendTimeout,
}

impl tower::Service<Request> for Connection {
    type Response = Response;
    type Error = Infallible;
    type Future = <Router as tower::Service<Request>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        tower::Service::<Request>::poll_ready(&mut self.router, cx)
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        let extensions = request.extensions_mut();
        extensions.insert(ConnectInfo(self.peer));
        extensions.insert(self.send_timeout.clone());
        tower::Service::call(&mut self.router, request)
    }
}
