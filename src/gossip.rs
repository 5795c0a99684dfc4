//! Membership and replicated state over chitchat (scuttlebutt gossip + phi-accrual failure
//! detection), on a transport that signs every datagram with the cluster secret.
//!
//! chitchat itself authenticates nothing: anyone who can reach UDP 7946 could inject state.
//! [`SignedUdp`] appends a truncated HMAC-SHA256 to each datagram and drops, and counts, any
//! datagram whose tag does not verify, so only holders of the join token take part.

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
