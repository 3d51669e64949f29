//! A TCP proxy between the system under test and a real server, to cut the
//! connection and restore it: an outage of NATS or PostgreSQL as the
//! process sees it, without stopping the server other tests share.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::AbortHandle;

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
        let accept = {
            let (state, links) = (state.clone(), links.clone());
            tokio::spawn(async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    if *state.borrow() == State::Down {
                        drop(client); // refused, as a stopped server would
                        continue;
                    }
                    let upstream = upstream.clone();
                    let mut now = state.subscribe();
                    let link = tokio::spawn(async move {
                        let Ok(now) = now.wait_for(|s| *s != State::Held).await.map(|s| *s) else {
                            return;
                        };
                        if now == State::Down {
                            return;
                        }
                        if let Ok(mut server) = TcpStream::connect(&upstream).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
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
            accept,
        }
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
