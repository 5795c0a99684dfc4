//! Requests between members over TCP (port 7946, beside gossip's UDP): the join handshake,
//! changes proposed to the Raft leader (creating networks, handing out addresses) and Raft's own
//! RPCs.
//!
//! Each exchange is challenge-response under the cluster secret: the server sends a fresh nonce,
//! the client answers with its request and HMAC(secret, nonce ‖ request), the server replies with
//! HMAC(secret, nonce ‖ "reply" ‖ reply). Neither side ever sends the secret, and a reply cannot be
//! replayed into another exchange.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio::io::BufReader;
use tokio::net::TcpStream;

use crate::api::Failure;
use crate::consensus::{Change, Rpc};
use crate::token::Secret;
use crate::wire;

const TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    /// Proves the token before a node joins; answered with the cluster id.
    Hello,
    /// A change to commit through Raft. The Raft leader commits it; another member refuses it,
    /// unless `forward` asks it to pass it on to the leader (a joining node does not know the
    /// leader yet). A forwarded proposal is not forwarded again.
    Propose { change: Change, forward: bool },
    /// Raft's own traffic between members.
    Raft(Rpc),
}

pub type Reply = Result<serde_json::Value, Failure>;

#[derive(Serialize, Deserialize)]
struct Challenge {
    nonce: String,
}

#[derive(Serialize, Deserialize)]
struct Signed {
    tag: String,
    body: String,
}

#[derive(Serialize, Deserialize)]
enum Answer {
    Signed(Signed),
    /// The request's tag did not verify: the sender does not hold this cluster's token.
    Refused,
}

const REPLY: &[u8] = b"reply";

/// Sends `request` to the member at `addr` and returns its verified reply.
pub async fn call(addr: SocketAddr, secret: &Secret, request: &Request) -> anyhow::Result<Reply> {
    tokio::time::timeout(TIMEOUT, exchange(addr, secret, request))
        .await
        .with_context(|| format!("no answer from {addr} within {TIMEOUT:?}"))?
}

async fn exchange(addr: SocketAddr, secret: &Secret, request: &Request) -> anyhow::Result<Reply> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr} (is overlayd running there?)"))?;
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let challenge: Challenge = wire::read(&mut read)
        .await
        .with_context(|| format!("handshake with {addr}"))?;
    let nonce = hex::decode(&challenge.nonce).context("malformed nonce")?;
    let body = serde_json::to_string(request)?;
    let tag = hex::encode(secret.mac(&[&nonce, body.as_bytes()]));
    wire::write(&mut write, &Signed { tag, body }).await?;
    match wire::read(&mut read)
        .await
        .with_context(|| format!("reading the reply from {addr}"))?
    {
        Answer::Refused => anyhow::bail!(
            "{addr} refused the token: it does not belong to this cluster (print the right one with `overlayd join-token` on a member)"
        ),
        Answer::Signed(reply) => {
            let tag = hex::decode(&reply.tag).context("malformed reply tag")?;
            anyhow::ensure!(
                secret.verify(&[&nonce, REPLY, reply.body.as_bytes()], &tag),
                "{addr} answered without proving it holds the cluster token; not trusting it"
            );
            Ok(serde_json::from_str(&reply.body)?)
        }
    }
}

/// Server side of one exchange: returns the verified request and a way to answer it, or `None`
/// after telling an unauthenticated client it was refused.
pub async fn accept(
    stream: TcpStream,
    secret: &Secret,
) -> anyhow::Result<Option<(Request, Responder)>> {
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let nonce: [u8; 16] = rand::random();
    wire::write(
        &mut write,
        &Challenge {
            nonce: hex::encode(nonce),
        },
    )
    .await?;
    let signed: Signed = tokio::time::timeout(TIMEOUT, wire::read(&mut read)).await??;
    let tag = hex::decode(&signed.tag).unwrap_or_default();
    if !secret.verify(&[&nonce, signed.body.as_bytes()], &tag) {
        wire::write(&mut write, &Answer::Refused).await?;
        return Ok(None);
    }
    let request = serde_json::from_str(&signed.body).context("malformed peer request")?;
    Ok(Some((
        request,
        Responder {
            write,
            nonce,
            secret: secret.clone(),
        },
    )))
}

pub struct Responder {
    write: tokio::net::tcp::OwnedWriteHalf,
    nonce: [u8; 16],
    secret: Secret,
}

impl Responder {
    pub async fn reply(mut self, reply: &Reply) -> anyhow::Result<()> {
        let body = serde_json::to_string(reply)?;
        let tag = hex::encode(self.secret.mac(&[&self.nonce, REPLY, body.as_bytes()]));
        wire::write(&mut self.write, &Answer::Signed(Signed { tag, body })).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn serve_once(secret: Secret) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            if let Some((request, responder)) = accept(stream, &secret).await.unwrap() {
                let reply: Reply = Ok(serde_json::json!(format!("{request:?}")));
                responder.reply(&reply).await.unwrap();
            }
        });
        addr
    }

    #[tokio::test]
    async fn members_get_verified_replies() {
        let secret = Secret::generate();
        let addr = serve_once(secret.clone()).await;
        let reply = call(addr, &secret, &Request::Hello).await.unwrap();
        assert_eq!(reply, Ok(serde_json::json!("Hello")));
    }

    #[tokio::test]
    async fn a_wrong_token_is_refused_by_name() {
        let addr = serve_once(Secret::generate()).await;
        let err = call(addr, &Secret::generate(), &Request::Hello)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("refused the token"), "{err}");
    }
}
