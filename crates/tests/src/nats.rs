//! A NATS server of one test's own, which the test can pause (`SIGSTOP`)
//! and resume (`SIGCONT`): a server that stops answering while every
//! connection to it stays open, so what was sent before the pause is stored
//! when it resumes, after the writer gave up waiting for the ack. The shared
//! server cannot be paused without stalling every other test.
//!
//! The binary is `YMERA_TEST_NATS_BIN` (set by `scripts/test.sh`), else the
//! one `scripts/setup.sh` installs in `<workspace>/.data/venv/bin`.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use uuid::Uuid;

use crate::eventually;
use crate::proxy::Proxy;

/// A running `nats-server -js`, killed (and its storage removed) on drop.
#[derive(Debug)]
pub struct PrivateNats {
    pub url: String,
    /// The server's name (`-n`), unique to it.
    name: String,
    child: Child,
    dir: PathBuf,
}

/// The `nats-server` binary tests run.
pub fn binary() -> PathBuf {
    match std::env::var_os("YMERA_TEST_NATS_BIN") {
        Some(bin) => PathBuf::from(bin),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.data/venv/bin/nats-server"),
    }
}

impl PrivateNats {
    /// Starts a server with JetStream on a free port and waits until it
    /// accepts connections.
    ///
    /// A port found free can be taken by another test's server before ours
    /// binds it (ours then exits, and a client would reach theirs), so each
    /// server gets a unique name, and it is ready only once a client reaches
    /// a server of that name; else it is started again on another port.
    pub async fn start() -> PrivateNats {
        for _ in 0..5 {
            let server = PrivateNats::spawn();
            let name = server.name.clone();
            let url = server.url.clone();
            let reached = eventually(Duration::from_secs(10), "the private NATS server", || {
                let url = url.clone();
                async move {
                    let client = async_nats::connect(url).await.ok()?;
                    Some(client.server_info().server_name)
                }
            })
            .await;
            if reached == name {
                return server;
            }
        }
        panic!("no free port for a private NATS server after 5 tries");
    }

    fn spawn() -> PrivateNats {
        PrivateNats::launch(free_port(), |_| Vec::new())
    }

    /// Starts `nats-server -js` on `port` with a name and a storage
    /// directory of its own, and the further arguments `extra` makes from
    /// that directory.
    fn launch(port: u16, extra: impl FnOnce(&Path) -> Vec<String>) -> PrivateNats {
        let id = Uuid::now_v7().simple().to_string();
        let name = format!("ymera-test-{id}");
        let dir = std::env::temp_dir().join(format!("ymera-nats-{id}"));
        std::fs::create_dir_all(&dir).expect("NATS storage dir");
        let bin = binary();
        let child = Command::new(&bin)
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-n",
                &name,
                "-sd",
            ])
            .arg(&dir)
            .args(extra(&dir))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
        PrivateNats {
            url: format!("nats://127.0.0.1:{port}"),
            name,
            child,
            dir,
        }
    }

    /// The server's name, as `server_info` and a stream's cluster info
    /// give it.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {signal} the private NATS server");
    }

    /// Freezes the server: connections stay open, nothing is answered.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets it run again: it serves what was sent while it was paused.
    pub fn resume(&self) {
        self.signal("-CONT");
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        // A paused server must run again to die of SIGKILL promptly on
        // every platform; CONT first costs nothing.
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A port nobody listens on now.
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().expect("port").port()
}

/// Three private servers as one JetStream cluster, every route between two
/// of them through a [`Proxy`] of its own (one for each direction a route
/// may be dialled in), so that a test can cut one node off from the others
/// while its own clients still reach it: a node that falls behind the
/// cluster without knowing it.
///
/// Each server dials the others through the proxies (its `routes`), and
/// advertises a cluster address nobody listens on, so that no route is
/// ever made past a proxy from what the servers tell each other (a route
/// so learned is given up at the first refusal).
#[derive(Debug)]
pub struct PrivateCluster {
    pub nodes: Vec<PrivateNats>,
    /// `(from, to, proxy)`: the proxy node `from` dials to reach `to`.
    links: Vec<(usize, usize, Proxy)>,
}

/// The nodes of a [`PrivateCluster`].
const NODES: usize = 3;

impl PrivateCluster {
    /// Starts the three servers and waits until every one of them answers
    /// as part of one JetStream cluster.
    pub async fn start() -> PrivateCluster {
        let cluster_ports: Vec<u16> = (0..NODES).map(|_| free_port()).collect();
        let mut links = Vec::new();
        for from in 0..NODES {
            for to in (0..NODES).filter(|to| *to != from) {
                let proxy = Proxy::start(format!("127.0.0.1:{}", cluster_ports[to])).await;
                links.push((from, to, proxy));
            }
        }
        let cluster_name = format!("ymera-test-{}", Uuid::now_v7().simple());
        let nodes = (0..NODES)
            .map(|node| {
                let routes: Vec<String> = links
                    .iter()
                    .filter(|(from, _, _)| *from == node)
                    .map(|(_, _, proxy)| format!("nats://{}", proxy.addr))
                    .collect();
                let listen = format!("127.0.0.1:{}", cluster_ports[node]);
                let advertise = format!("127.0.0.1:{}", free_port());
                PrivateNats::launch(free_port(), |dir| {
                    let conf = dir.join("cluster.conf");
                    std::fs::write(
                        &conf,
                        format!(
                            "cluster {{\n  name: \"{cluster_name}\"\n  listen: \"{listen}\"\n  \
                             advertise: \"{advertise}\"\n  routes: [{}]\n}}\n",
                            routes
                                .iter()
                                .map(|r| format!("\"{r}\""))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    )
                    .expect("the node's configuration");
                    vec!["-c".into(), conf.display().to_string()]
                })
            })
            .collect();
        let cluster = PrivateCluster { nodes, links };
        for node in &cluster.nodes {
            let (url, name) = (node.url.clone(), node.name.clone());
            eventually(
                Duration::from_secs(30),
                "a node of the private cluster",
                || {
                    let (url, name) = (url.clone(), name.clone());
                    async move {
                        let client = async_nats::connect(url).await.ok()?;
                        if client.server_info().server_name != name {
                            return None;
                        }
                        async_nats::jetstream::new(client)
                            .query_account()
                            .await
                            .ok()
                            .map(drop)
                    }
                },
            )
            .await;
        }
        cluster
    }

    /// Every node's client URL, comma-separated, but those of `without`.
    pub fn urls_without(&self, without: &[usize]) -> String {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(n, _)| !without.contains(n))
            .map(|(_, node)| node.url.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Which node leads `stream` now, as node `asking` sees it.
    pub async fn stream_leader(&self, asking: usize, stream: &str) -> Option<usize> {
        let client = async_nats::connect(&self.nodes[asking].url).await.ok()?;
        let mut stream = async_nats::jetstream::new(client)
            .get_stream(stream)
            .await
            .ok()?;
        let leader = stream.info().await.ok()?.cluster.as_ref()?.leader.clone()?;
        self.nodes.iter().position(|n| n.name == leader)
    }

    /// Waits until every replica of `stream` holds all it has, as its
    /// leader sees it (asked through node `asking`).
    pub async fn replicas_current(&self, asking: usize, stream: &str) {
        let url = self.nodes[asking].url.clone();
        eventually(Duration::from_secs(30), "every replica current", || {
            let url = url.clone();
            async move {
                let client = async_nats::connect(url).await.ok()?;
                let mut stream = async_nats::jetstream::new(client)
                    .get_stream(stream)
                    .await
                    .ok()?;
                let info = stream.info().await.ok()?;
                let replicas = &info.cluster.as_ref()?.replicas;
                (replicas.len() == NODES - 1
                    && replicas
                        .iter()
                        .all(|r| r.current && r.lag.unwrap_or(0) == 0))
                .then_some(())
            }
        })
        .await;
    }

    /// Cuts every route to and from `node` (and refuses new ones): it goes
    /// on serving its own clients, cut off from the cluster.
    pub fn isolate(&self, node: usize) {
        for (_, _, proxy) in self.links_of(node) {
            proxy.down();
        }
    }

    /// Lets `node`'s routes through again, at full speed: it rejoins and
    /// catches up.
    pub fn rejoin(&self, node: usize) {
        for (_, _, proxy) in self.links_of(node) {
            proxy.delay(Duration::ZERO);
            proxy.up();
        }
    }

    /// Delays everything on the routes to and from `node` by `latency`:
    /// it stays in the cluster, a follower that learns of each append
    /// that much later than the others.
    pub fn slow(&self, node: usize, latency: Duration) {
        for (_, _, proxy) in self.links_of(node) {
            proxy.delay(latency);
        }
    }

    fn links_of(&self, node: usize) -> impl Iterator<Item = &(usize, usize, Proxy)> {
        self.links
            .iter()
            .filter(move |(from, to, _)| *from == node || *to == node)
    }
}
