//! Membership and replicated state over chitchat (scuttlebutt gossip + phi-accrual failure
//! detection), on a transport that signs every datagram with the cluster secret.
//!
//! chitchat itself authenticates nothing: anyone who can reach UDP 7946 could inject state.
//! [`SignedUdp`] appends a truncated HMAC-SHA256 to each datagram and drops, and counts, any
//! datagram whose tag does not verify, so only holders of the join token take part.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use chitchat::transport::{Socket, Transport};
use chitchat::{
    ChitchatConfig, ChitchatHandle, ChitchatId, ChitchatMessage, Deserializable,
    FailureDetectorConfig, Serializable,
};
use tracing::debug;

use crate::cluster::{MemberState, View};
use crate::registry::Registry;
use crate::token::{Secret, TAG_LEN};

/// Gossip rounds are frequent so that a dead node is noticed within seconds.
const GOSSIP_INTERVAL: Duration = Duration::from_millis(200);
/// chitchat's datagram budget; the tag is added on top.
const MAX_DATAGRAM: usize = 65_507;

pub struct Gossip {
    pub handle: ChitchatHandle,
    /// Datagrams dropped because their tag did not verify under the cluster secret.
    pub rejected: Arc<AtomicU64>,
}

impl Gossip {
    /// The cluster as this node's gossip state and `registry` show it now.
    pub async fn view(&self, registry: &Registry) -> View {
        self.handle
            .with_chitchat(|c| {
                let live: BTreeSet<&ChitchatId> = c.live_nodes().collect();
                let self_id = c.self_chitchat_id().clone();
                View::build(
                    c.node_states().iter().map(|(id, state)| MemberState {
                        id: &id.node_id,
                        generation: id.generation_id,
                        gossip: id.gossip_advertise_addr,
                        live: live.contains(id),
                        is_self: *id == self_id,
                        keys: state.key_values().collect(),
                    }),
                    registry,
                )
            })
            .await
    }

    /// This node's own keys.
    pub async fn own_keys(&self) -> BTreeMap<String, String> {
        self.handle
            .with_chitchat(|c| {
                c.self_node_state()
                    .key_values()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            })
            .await
    }

    /// Sets and deletes keys of this node's state in one step.
    pub async fn update(&self, set: &[(String, String)], delete: &[String]) {
        if set.is_empty() && delete.is_empty() {
            return;
        }
        self.handle
            .with_chitchat(|c| {
                let me = c.self_node_state();
                for (k, v) in set {
                    me.set(k, v);
                }
                for k in delete {
                    me.delete(k);
                }
            })
            .await
    }
}

pub async fn start(
    id: ChitchatId,
    secret: &Secret,
    listen: SocketAddr,
    seeds: Vec<String>,
    initial: Vec<(String, String)>,
) -> anyhow::Result<Gossip> {
    let config = ChitchatConfig {
        chitchat_id: id,
        cluster_id: secret.cluster_id(),
        gossip_interval: GOSSIP_INTERVAL,
        listen_addr: listen,
        seed_nodes: seeds,
        failure_detector_config: FailureDetectorConfig {
            phi_threshold: 8.0,
            sampling_window_size: 1000,
            max_interval: Duration::from_secs(10),
            initial_interval: GOSSIP_INTERVAL * 2,
            // Down nodes stay listed (as down) for a day, as `docker node ls` keeps them.
            dead_node_grace_period: Duration::from_secs(24 * 3600),
        },
        marked_for_deletion_grace_period: Duration::from_secs(3600),
        catchup_callback: None,
        extra_liveness_predicate: None,
    };
    let rejected = Arc::new(AtomicU64::new(0));
    let transport = SignedUdp {
        secret: secret.clone(),
        rejected: rejected.clone(),
    };
    let handle = chitchat::spawn_chitchat(config, initial, &transport)
        .await
        .with_context(|| format!("starting gossip on {listen}"))?;
    Ok(Gossip { handle, rejected })
}

struct SignedUdp {
    secret: Secret,
    rejected: Arc<AtomicU64>,
}

#[async_trait::async_trait]
impl Transport for SignedUdp {
    async fn open(&self, listen: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let socket = tokio::net::UdpSocket::bind(listen).await.with_context(|| {
            format!("binding gossip socket {listen}/udp (is another daemon using it?)")
        })?;
        Ok(Box::new(SignedSocket {
            socket,
            secret: self.secret.clone(),
            rejected: self.rejected.clone(),
            send_buf: Vec::with_capacity(MAX_DATAGRAM + TAG_LEN),
            recv_buf: vec![0; MAX_DATAGRAM + TAG_LEN].into_boxed_slice(),
        }))
    }
}

struct SignedSocket {
    socket: tokio::net::UdpSocket,
    secret: Secret,
    rejected: Arc<AtomicU64>,
    send_buf: Vec<u8>,
    recv_buf: Box<[u8]>,
}

/// Appends the tag over `payload`; the receiver checks it with [`open`].
fn seal(secret: &Secret, buf: &mut Vec<u8>) {
    let tag = secret.mac(&[buf]);
    buf.extend_from_slice(&tag[..TAG_LEN]);
}

/// Returns the payload if the trailing tag verifies.
fn open<'a>(secret: &Secret, datagram: &'a [u8]) -> Option<&'a [u8]> {
    let split = datagram.len().checked_sub(TAG_LEN)?;
    let (payload, tag) = datagram.split_at(split);
    secret.verify(&[payload], tag).then_some(payload)
}

#[async_trait::async_trait]
impl Socket for SignedSocket {
    async fn send(&mut self, to: SocketAddr, message: ChitchatMessage) -> anyhow::Result<()> {
        self.send_buf.clear();
        message.serialize(&mut self.send_buf);
        seal(&self.secret, &mut self.send_buf);
        // A peer that is down makes sends fail transiently; chitchat retries next round.
        if let Err(err) = self.socket.send_to(&self.send_buf, to).await {
            debug!(peer = %to, %err, "gossip send failed");
        }
        Ok(())
    }

    async fn recv(&mut self) -> anyhow::Result<(SocketAddr, ChitchatMessage)> {
        loop {
            let (len, from_addr) = match self.socket.recv_from(&mut self.recv_buf).await {
                Ok(got) => got,
                Err(err) => {
                    debug!(%err, "gossip recv failed");
                    continue;
                }
            };
            let Some(mut payload) = open(&self.secret, &self.recv_buf[..len]) else {
                self.rejected.fetch_add(1, Ordering::Relaxed);
                debug!(peer = %from_addr, "gossip datagram without a valid tag dropped");
                continue;
            };
            match ChitchatMessage::deserialize(&mut payload) {
                Ok(message) => return Ok((from_addr, message)),
                Err(err) => debug!(peer = %from_addr, %err, "undecodable gossip datagram dropped"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::NodeState;

    async fn node(name: &str, secret: &Secret, seeds: &[SocketAddr]) -> (Gossip, SocketAddr) {
        let addr = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let id = ChitchatId::new(name.to_string(), 1, addr);
        let seeds = seeds.iter().map(|s| s.to_string()).collect();
        (start(id, secret, addr, seeds, vec![]).await.unwrap(), addr)
    }

    /// Polls `done` over the views of `nodes` until it holds for all, for at most 15 s.
    async fn converge(nodes: &[&Gossip], what: &str, done: impl Fn(&View) -> bool) {
        for _ in 0..300 {
            let mut all = true;
            for node in nodes {
                all &= done(&node.view(&Registry::default()).await);
            }
            if all {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("not converged within 15 s: {what}");
    }

    fn states(view: &View) -> Vec<(String, NodeState)> {
        view.members
            .iter()
            .map(|m| (m.node.id.clone(), m.node.state))
            .collect()
    }

    /// Three members on loopback: state spreads to all, a stranger with another secret never
    /// gets in, and a stopped member is seen down by the others.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn members_converge_strangers_stay_out_and_failures_are_seen() {
        let secret = Secret::generate();
        let (a, a_addr) = node("a", &secret, &[]).await;
        let (b, _) = node("b", &secret, &[a_addr]).await;
        let (c, _) = node("c", &secret, &[a_addr]).await;
        let (stranger, _) = node("x", &Secret::generate(), &[a_addr]).await;

        b.update(&[("up/web".into(), String::new())], &[]).await;
        let all_ready = |v: &View| {
            states(v)
                == [
                    ("a".into(), NodeState::Ready),
                    ("b".into(), NodeState::Ready),
                    ("c".into(), NodeState::Ready),
                ]
        };
        converge(&[&a, &b, &c], "three ready members", all_ready).await;
        let on_a = a
            .handle
            .with_chitchat(|ch| {
                ch.node_states()
                    .keys()
                    .map(|id| id.node_id.to_string())
                    .collect::<Vec<_>>()
            })
            .await;
        assert!(
            on_a.iter().all(|id| id != "x"),
            "the stranger's state reached a member: {on_a:?}"
        );
        assert!(
            a.rejected.load(Ordering::Relaxed) > 0,
            "the stranger's datagrams were not counted"
        );
        assert!(
            stranger.view(&Registry::default()).await.members.len() == 1,
            "the stranger learnt of members"
        );

        c.handle.initiate_shutdown().unwrap();
        converge(&[&a, &b], "c seen down", |v| {
            states(v).contains(&("c".into(), NodeState::Down))
        })
        .await;
    }

    #[test]
    fn sealed_datagrams_open_only_under_the_same_secret() {
        let (a, b) = (Secret::generate(), Secret::generate());
        let mut buf = b"chitchat syn".to_vec();
        seal(&a, &mut buf);
        assert_eq!(open(&a, &buf), Some(&b"chitchat syn"[..]));
        assert_eq!(open(&b, &buf), None);
        let mut flipped = buf.clone();
        flipped[0] ^= 1;
        assert_eq!(open(&a, &flipped), None);
        assert_eq!(open(&a, &buf[..TAG_LEN - 1]), None);
    }
}
