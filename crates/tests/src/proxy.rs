//! A TCP proxy between the system under test and a real server, to cut the
//! connection and restore it, or slow it down: an outage of NATS or
//! PostgreSQL as the process sees it, without stopping the server other
//! tests share.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;
use tokio::time::Instant;

/// What the proxy does with a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Forwards it.
    Up,
    /// Refuses it.
    Down,
    /// Keeps it open without an answer until the proxy is up (or down).
    Held,
}

/// A proxy to one upstream address.
#[derive(Debug)]
pub struct Proxy {
    pub addr: SocketAddr,
    state: Arc<watch::Sender<State>>,
    links: Arc<Mutex<Vec<AbortHandle>>>,
    /// Milliseconds each chunk is held before it is passed on.
    latency: Arc<AtomicU64>,
    accept: AbortHandle,
}

impl Proxy {
    /// Starts forwarding connections on a free port to `upstream`
    /// (`host:port`).
    pub async fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let state = Arc::new(watch::Sender::new(State::Up));
        let links: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let latency = Arc::new(AtomicU64::new(0));
        let accept = {
            let (state, links, latency) = (state.clone(), links.clone(), latency.clone());
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    if *state.borrow() == State::Down {
                        drop(client); // refused, as a stopped server would
                        continue;
                    }
                    let (upstream, latency) = (upstream.clone(), latency.clone());
                    let mut now = state.subscribe();
                    let link = tokio::spawn(async move {
                        let Ok(now) = now.wait_for(|s| *s != State::Held).await.map(|s| *s) else {
                            return;
                        };
                        if now == State::Down {
                            return;
                        }
                        if let Ok(server) = TcpStream::connect(&upstream).await {
                            let (from_client, to_client) = client.into_split();
                            let (from_server, to_server) = server.into_split();
                            tokio::join!(
                                pump(from_client, to_server, latency.clone()),
                                pump(from_server, to_client, latency),
                            );
                        }
                    });
                    links.lock().expect("links").push(link.abort_handle());
                }
            })
            .abort_handle()
        };
        Proxy {
            addr,
            state,
            links,
            latency,
            accept,
        }
    }

    /// Delays everything sent through the proxy from now on by `latency`,
    /// both ways, on the open connections too (zero: none): a slow
    /// network, where nothing is lost.
    pub fn delay(&self, latency: Duration) {
        self.latency
            .store(latency.as_millis() as u64, Ordering::SeqCst);
    }

    /// The outage: every open connection is cut and new ones are refused.
    pub fn down(&self) {
        self.state.send_replace(State::Down);
        self.cut();
    }

    /// Every open connection is cut, and new ones are held without an
    /// answer until [`Proxy::up`]: a connection dropped by the network
    /// while the server itself is still there, and slow to answer.
    pub fn hold(&self) {
        self.state.send_replace(State::Held);
        self.cut();
    }

    /// The server is back; held connections go through.
    pub fn up(&self) {
        self.state.send_replace(State::Up);
    }

    fn cut(&self) {
        for link in self.links.lock().expect("links").drain(..) {
            link.abort();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// Chunks read and not yet passed on, per direction of a connection.
const IN_FLIGHT: usize = 64;

/// Passes what `from` reads on to `to`, each chunk once the latency in
/// effect when it was read has passed, until either side closes.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, latency: Arc<AtomicU64>) {
    let (chunks, mut due) = mpsc::channel::<(Instant, Bytes)>(IN_FLIGHT);
    let read = async move {
        let mut buf = vec![0; 16 * 1024];
        while let Ok(n @ 1..) = from.read(&mut buf).await {
            let at = Instant::now() + Duration::from_millis(latency.load(Ordering::SeqCst));
            if chunks
                .send((at, Bytes::copy_from_slice(&buf[..n])))
                .await
                .is_err()
            {
                return;
            }
        }
    };
    let write = async move {
        while let Some((at, chunk)) = due.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(read, write);
}

/// `host:port` of a URL like `scheme://user:pass@host:port/path`.
pub fn host_port(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    rest.split(['/', '?']).next().unwrap_or(rest).to_owned()
}

/// The URL with its `host:port` replaced.
pub fn with_host_port(url: &str, addr: SocketAddr) -> String {
    url.replacen(&host_port(url), &addr.to_string(), 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            host_port("postgres://u:p@127.0.0.1:5432/db?x=1"),
            "127.0.0.1:5432"
        );
        assert_eq!(host_port("nats://127.0.0.1:4222"), "127.0.0.1:4222");
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap_or_else(|_| unreachable!());
        assert_eq!(
            with_host_port("postgres://u:p@127.0.0.1:5432/db", addr),
            "postgres://u:p@127.0.0.1:9/db"
        );
    }
}
