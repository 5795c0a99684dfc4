//! The userspace proxy of published TCP ports with `proxy=v2`: a PROXY protocol v2 header is
//! bytes at the start of the stream, which the packet-level mesh cannot add, so for such a
//! port the daemon listens itself.
//!
//! For each connection it picks the task the data path would pick for it
//! ([`ingress::service::Table::pick_published`]: Maglev over the healthy tasks, the client's
//! address with `affinity=client-ip`, this node's tasks with `mode=host`), connects to
//! `task:target` (from this node's address to a task on another node: the data path carries
//! that connection there and its replies back here), writes the header (the client's address
//! and port, and the address and port it connected to), then copies both ways until both sides
//! are done.
//!
//! Limits: at most [`MAX_CONNECTIONS`] relayed at once on the node, all ports together, and
//! [`CONNECT_WITHIN`] to reach the task. A client over the limit, or with no task to go to, is
//! reset at once. An idle connection is never cut: both ends decide when it ends.
//!
//! A [`Listener`] holds its port the way a reservation does (`crate::mesh_hooks`); dropping it
//! closes the port and every connection it relays.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ingress::balancer::Balancer;
use ingress::proxy_protocol;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, warn};

use crate::api;

/// Connections relayed at once on this node, over all proxied ports.
pub const MAX_CONNECTIONS: usize = 4096;
/// How long the proxy waits for a task to accept.
pub const CONNECT_WITHIN: Duration = Duration::from_secs(3);
/// Connections the kernel queues for accept.
const BACKLOG: u32 = 1024;
/// A failed accept (out of file descriptors, say) is retried after this.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// The proxy of this node: what every listener shares.
#[derive(Clone)]
pub struct Proxy(Arc<Shared>);

struct Shared {
    balancer: Arc<Balancer>,
    /// This node's underlay address: the source of the connections to tasks, and where a
    /// `mode=host` port's tasks must run.
    node: Ipv4Addr,
    /// Connections relayed at once at most, and the slots left.
    limit: usize,
    slots: Arc<Semaphore>,
    counters: Counters,
}

/// Counts since start, for `overlayd status`.
#[derive(Default)]
struct Counters {
    connections: AtomicU64,
    refused: AtomicU64,
    no_task: AtomicU64,
    failed: AtomicU64,
}

/// A proxied port: its accept loop, which owns the listening socket and the connections.
pub struct Listener(JoinHandle<()>);

impl Drop for Listener {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Proxy {
    pub fn new(balancer: Arc<Balancer>, node: Ipv4Addr) -> Proxy {
        Proxy(Arc::new(Shared {
            balancer,
            node,
            limit: MAX_CONNECTIONS,
            slots: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            counters: Counters::default(),
        }))
    }

    /// Listens on `at` and relays what it accepts; fails as binding the port fails. With
    /// `SO_REUSEADDR`, so that connections of an earlier listener in TIME_WAIT do not keep the
    /// port; a listening socket still keeps any other socket off it.
    pub fn listen(&self, at: SocketAddrV4) -> io::Result<Listener> {
        let socket = TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        socket.bind(at.into())?;
        let listener = socket.listen(BACKLOG)?;
        Ok(Listener(tokio::spawn(self.clone().serve(listener, at))))
    }

    pub fn status(&self) -> api::MeshProxy {
        let c = &self.0.counters;
        api::MeshProxy {
            connections: c.connections.load(Ordering::Relaxed),
            active: (self.0.limit - self.0.slots.available_permits()) as u64,
            refused: c.refused.load(Ordering::Relaxed),
            no_task: c.no_task.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
        }
    }

    async fn serve(self, listener: TcpListener, at: SocketAddrV4) {
        let mut relays = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((client, peer)) => {
                        let Ok(permit) = self.0.slots.clone().try_acquire_owned() else {
                            self.0.counters.refused.fetch_add(1, Ordering::Relaxed);
                            reset(client);
                            continue;
                        };
                        self.0.counters.connections.fetch_add(1, Ordering::Relaxed);
                        relays.spawn(self.clone().relay(client, peer, permit));
                    }
                    Err(err) => {
                        self.0.counters.failed.fetch_add(1, Ordering::Relaxed);
                        warn!(port = %at, %err, "proxied port: accept failed; retrying");
                        tokio::time::sleep(ACCEPT_RETRY).await;
                    }
                },
                Some(_) = relays.join_next(), if !relays.is_empty() => {}
            }
        }
    }

    /// One client's connection, from pick to close; `_permit` is its slot.
    async fn relay(self, client: TcpStream, peer: SocketAddr, _permit: OwnedSemaphorePermit) {
        let counters = &self.0.counters;
        let (SocketAddr::V4(source), Ok(SocketAddr::V4(destination))) = (peer, client.local_addr())
        else {
            counters.failed.fetch_add(1, Ordering::Relaxed);
            return reset(client);
        };
        let services = self.0.balancer.services();
        let picked =
            services.pick_published(ingress::Protocol::Tcp, destination, source, self.0.node);
        let Some((task, target)) = picked else {
            counters.no_task.fetch_add(1, Ordering::Relaxed);
            return reset(client);
        };
        // A task here is reached from the gateway's address, as any from the node's stack:
        // the host may know the task's own MAC and send straight to it, past the data path,
        // and the reply, to an address on the task's subnet, comes straight back. A task on
        // another node is reached from the node's address, which the data path tracks.
        let from = if task.node == self.0.node {
            Ipv4Addr::UNSPECIFIED
        } else {
            self.0.node
        };
        let task = SocketAddrV4::new(task.addr, target);
        let header = proxy_protocol::Repr {
            source,
            destination,
        }
        .emit();
        let mut upstream = match connect(from, task, &header).await {
            Ok(upstream) => upstream,
            Err(err) => {
                counters.failed.fetch_add(1, Ordering::Relaxed);
                debug!(client = %source, %task, %err, "proxied port: task not reached");
                return reset(client);
            }
        };
        let mut client = client;
        if let Err(err) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
            // One side broke off: the other learns it the same way.
            debug!(client = %source, %task, %err, "proxied connection cut");
            reset(client);
            reset(upstream);
        }
    }
}

/// A connection to `task` from address `from` (any port), with `header` sent.
async fn connect(from: Ipv4Addr, task: SocketAddrV4, header: &[u8]) -> io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddrV4::new(from, 0).into())?;
    let mut stream = tokio::time::timeout(CONNECT_WITHIN, socket.connect(task.into()))
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
    stream.set_nodelay(true)?;
    stream.write_all(header).await?;
    Ok(stream)
}

/// Closes `stream` with a reset (`SO_LINGER` 0), so the peer knows at once.
fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
}

#[cfg(test)]
mod tests {
    use super::*;
    use ingress::service::{Backend, Health, Port, Spec, Table};
    use std::time::Instant;
    use tokio::io::AsyncReadExt;

    const NODE: Ipv4Addr = Ipv4Addr::LOCALHOST;
    /// The task: another loopback address, as if on another node.
    const TASK: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

    /// Service `api` publishing `published` -> `target` over one task at [`TASK`].
    fn table(published: u16, target: u16, health: Health) -> Table {
        let spec = Spec {
            name: "api".into(),
            vip: ingress::Vip(Ipv4Addr::new(198, 19, 255, 1).into()),
            backends: vec![Backend {
                addr: TASK,
                node: Ipv4Addr::new(198, 18, 0, 2),
                health,
            }],
            ports: vec![Port {
                protocol: ingress::Protocol::Tcp,
                published,
                target,
                addr: None,
                client_affinity: false,
                local_only: false,
            }],
        };
        Table::build(ingress::maglev::Size::new(251).unwrap(), [spec]).unwrap()
    }

    /// A port nothing holds right now.
    fn free_port() -> u16 {
        let held = std::net::TcpListener::bind((NODE, 0)).unwrap();
        held.local_addr().unwrap().port()
    }

    /// Connects to `at`, sends `hello`, closes its sending side and reads to the end.
    async fn ask(at: SocketAddrV4) -> (SocketAddrV4, io::Result<Vec<u8>>) {
        let mut stream = TcpStream::connect(at).await.unwrap();
        let SocketAddr::V4(me) = stream.local_addr().unwrap() else {
            unreachable!("an IPv4 connection")
        };
        stream.write_all(b"hello").await.unwrap();
        stream.shutdown().await.unwrap();
        let mut answer = Vec::new();
        let read = stream.read_to_end(&mut answer).await.map(|_| answer);
        (me, read)
    }

    #[tokio::test]
    async fn a_task_reads_the_header_then_the_clients_bytes_and_both_ends_close() {
        // The task echoes all it read once the client is done sending.
        let task = TcpListener::bind((TASK, 0)).await.unwrap();
        let target = task.local_addr().unwrap().port();
        let echo = tokio::spawn(async move {
            let (mut stream, from) = task.accept().await.unwrap();
            let mut read = Vec::new();
            stream.read_to_end(&mut read).await.unwrap();
            stream.write_all(&read).await.unwrap();
            from
        });
        let balancer = Arc::new(Balancer::new(64, Default::default(), |_| [0; 6], NODE).unwrap());
        let published = free_port();
        balancer.publish(table(published, target, Health::Healthy), Instant::now());
        let proxy = Proxy::new(balancer.clone(), NODE);
        let at = SocketAddrV4::new(NODE, published);
        let listener = proxy.listen(at).unwrap();

        let (me, answer) = ask(at).await;
        let mut want = proxy_protocol::Repr {
            source: me,
            destination: at,
        }
        .emit()
        .to_vec();
        want.extend_from_slice(b"hello");
        assert_eq!(answer.unwrap(), want);
        let from = echo.await.unwrap();
        assert_eq!(
            from.ip(),
            std::net::IpAddr::from(NODE),
            "from the node's address"
        );
        let status = proxy.status();
        assert_eq!(
            (status.connections, status.no_task, status.failed),
            (1, 0, 0)
        );

        // No healthy task: reset at once.
        balancer.publish(table(published, target, Health::Unhealthy), Instant::now());
        let (_, answer) = ask(at).await;
        assert_eq!(
            answer.map_err(|e| e.kind()),
            Err(io::ErrorKind::ConnectionReset)
        );
        assert_eq!(proxy.status().no_task, 1);

        // Dropped: the port closes.
        drop(listener);
        let deadline = Instant::now() + Duration::from_secs(2);
        while TcpStream::connect(at).await.is_ok() {
            assert!(Instant::now() < deadline, "{at} still accepts");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(proxy.status().active, 0);
    }

    #[tokio::test]
    async fn a_client_over_the_limit_is_reset_and_counted() {
        // A task that takes connections and never answers.
        let task = TcpListener::bind((TASK, 0)).await.unwrap();
        let target = task.local_addr().unwrap().port();
        let _silent = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = task.accept().await {
                held.push(stream);
            }
        });
        let balancer = Arc::new(Balancer::new(64, Default::default(), |_| [0; 6], NODE).unwrap());
        let published = free_port();
        balancer.publish(table(published, target, Health::Healthy), Instant::now());
        let proxy = Proxy(Arc::new(Shared {
            balancer,
            node: NODE,
            limit: 1,
            slots: Arc::new(Semaphore::new(1)),
            counters: Counters::default(),
        }));
        let at = SocketAddrV4::new(NODE, published);
        let _listener = proxy.listen(at).unwrap();
        let _first = TcpStream::connect(at).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(2);
        while proxy.0.slots.available_permits() > 0 {
            assert!(
                Instant::now() < deadline,
                "the first connection is never relayed"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (_, answer) = ask(at).await;
        assert_eq!(
            answer.map_err(|e| e.kind()),
            Err(io::ErrorKind::ConnectionReset)
        );
        let status = proxy.status();
        assert_eq!(
            (status.connections, status.refused, status.active),
            (1, 1, 1)
        );
    }
}
