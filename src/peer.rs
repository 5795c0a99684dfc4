//! Requests between members over TCP (port 7946, beside gossip's UDP): the join handshake,
//! changes proposed to the Raft leader (creating networks, handing out addresses) and Raft's own
//! RPCs.
//!
//! # Exchange
//! Challenge-response under one of two keys: a member's under the peer key ([`Purpose::Peer`],
//! never the gossip key), naming its node id; a joiner's under the key of the current join
//! secret ([`JoinSecret::key`]), which only lets it ask for the cluster secret (a `Hello`).
//! 1. server: a fresh nonce of exactly [`NONCE_LEN`] bytes;
//! 2. client: `Auth`, its claim (member `id`, or joiner) and HMAC(k, "auth" ‖ nonce ‖ id), and
//!    right behind it `Signed`, the request with HMAC(k, "request" ‖ nonce ‖ request);
//! 3. server: `Signed`, the reply with HMAC(k, "reply" ‖ nonce ‖ reply), or `Refused`.
//!
//! A member may go on with more requests on the same connection ([`Session`]: Raft's RPCs), one
//! exchange after the other; exchange n signs under the nonce with n added ([`exchange_nonce`]).
//!
//! Neither side sends the secret; a tag answers one nonce and one step only (the labels differ in
//! their third byte and the nonce has a fixed length, so no two steps sign the same bytes). The
//! client checks the nonce's length: a server choosing a longer "nonce" could otherwise make it
//! sign bytes of the server's choosing.
//!
//! # Limits
//! The port is open to anyone on the underlay. Until a client has proved the token, the server
//! reads at most [`HANDSHAKE_LIMIT`] bytes from it, for at most [`HANDSHAKE_WITHIN`], and the
//! [`Gate`] lets only a few such handshakes run at once; every refusal is counted. Only then does
//! it read a request of up to [`REQUEST_LIMIT`].

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::BufReader;
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tracing::warn;

use crate::api::Failure;
use crate::consensus::{Change, Rpc};
use crate::model::PublishProtocol;
use crate::token::{JoinSecret, Key, Purpose, Secret};
use crate::wire;

/// How long a client waits for a whole exchange (the leader may be busy deciding).
const TIMEOUT: Duration = Duration::from_secs(15);
/// Bytes of the server's challenge.
pub const NONCE_LEN: usize = 16;
/// Longest line either side reads before the other is authenticated: the challenge and the
/// client's proof are under 100 bytes.
const HANDSHAKE_LIMIT: usize = 256;
/// Longest request of an authenticated member: a Raft append of up to 64 entries or a 16 KiB
/// snapshot chunk (see [`crate::consensus`]), written as JSON inside JSON, fits with room to
/// spare. Only members holding the token can make the server buffer this much.
pub const REQUEST_LIMIT: usize = 256 << 10;
/// Longest reply a client reads (bounded: it may have dialled a stranger).
const REPLY_LIMIT: usize = 1 << 20;
/// How long a client has, from its connection, to prove the token. A member needs one round trip.
const HANDSHAKE_WITHIN: Duration = Duration::from_secs(3);
/// How long an authenticated member has to send its request (sent right behind its proof).
const REQUEST_WITHIN: Duration = Duration::from_secs(10);
/// How long a member's kept connection ([`Session`]) may sit idle before the server closes it.
/// Raft's heartbeats keep a leader's connections busy; a deposed leader's close after this.
const KEPT_IDLE: Duration = Duration::from_secs(60);
/// Unauthenticated handshakes under way at once, in all and from one address. Over these, a
/// connection is closed at once. A member's handshake lasts one round trip, so members never come
/// near them; the per-address cap keeps one flooding host from taking every slot.
const MAX_HANDSHAKES: usize = 64;
const MAX_HANDSHAKES_PER_SOURCE: usize = 8;
/// Refusals are summed up in at most one log line per period.
const REFUSALS_LOGGED_EVERY: Duration = Duration::from_secs(10);

const AUTH: &[u8] = b"auth";

#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    /// Answered with a [`Welcome`]: a joiner proves the join token with it and gets the
    /// cluster secret; a restarted member learns whether it is still one.
    Hello,
    /// A change to commit through Raft. The Raft leader commits it; another member refuses it,
    /// unless `forward` asks it to pass it on to the leader (a joining node does not know the
    /// leader yet). A forwarded proposal is not forwarded again.
    Propose { change: Change, forward: bool },
    /// Raft's own traffic between members.
    Raft(Rpc),
    /// What a member that is no voter lacks of the registry, whose last applied entry is
    /// `after`: answered with a [`crate::consensus::Catchup`].
    Registry { after: Option<u64> },
    /// Whether this node could bind each port now, asked before a service publishes them;
    /// refused with a message naming the first one taken. Binds nothing that outlives the
    /// answer.
    Bindable { ports: Vec<Bind> },
}

/// A port a node is asked to bind: on all its addresses (`0.0.0.0`) or on one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bind {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub protocol: PublishProtocol,
}

pub type Reply = Result<serde_json::Value, Failure>;

/// The answer to a `Hello`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Welcome {
    pub cluster_id: String,
    /// For a joiner: the cluster secret sealed under the join secret ([`JoinSecret::seal`]).
    pub sealed: Option<String>,
}

/// Who a client says it is; the key it proves this with depends on it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Caller {
    /// A member, by node id, holding the cluster secret.
    Member(String),
    /// A node joining with the join token.
    Joiner,
}

impl Request {
    /// Whether `caller` may make this request; `member` tells a member of the cluster. A
    /// joiner proved only the current join token: it may say `Hello` and ask to join. Every
    /// node that ever was a member holds the cluster secret, a removed one too, so that secret
    /// alone adds no node: a member's `Join` is one a member of the group forwards for a joiner
    /// (`node rm` rotates the join token, so an evicted node cannot be that joiner either).
    pub fn permitted(&self, caller: &Caller, member: impl Fn(&str) -> bool) -> Result<(), Failure> {
        match (caller, self) {
            (
                Caller::Joiner,
                Request::Hello
                | Request::Propose {
                    change: Change::Join { .. },
                    forward: true,
                },
            ) => Ok(()),
            (Caller::Joiner, _) => Err(Failure::usage(
                "a join token only lets a node join: prove it with a `Hello` first",
            )),
            (
                Caller::Member(node),
                Request::Propose {
                    change: Change::Join { .. },
                    ..
                },
            ) if !member(node) => Err(Failure::usage(format!(
                "node {node} is no member: only the current join token adds a node \
                 (`overlayd join-token` on a member)"
            ))),
            // The registry holds the join secret since the last rotation, which `node rm` makes
            // so that a removed node (under any id it makes up) cannot join again.
            (Caller::Member(node), Request::Registry { .. }) if !member(node) => {
                Err(Failure::usage(format!(
                    "node {node} is no member (yet): only members copy the registry"
                )))
            }
            (Caller::Member(_), _) => Ok(()),
        }
    }
}

/// What a client proves itself with.
#[derive(Clone)]
pub enum Credential {
    Member { secret: Secret, node: String },
    Joiner(JoinSecret),
}

impl Credential {
    fn key(&self) -> Key {
        match self {
            Credential::Member { secret, .. } => secret.key(Purpose::Peer),
            Credential::Joiner(join) => join.key(),
        }
    }

    fn caller(&self) -> Caller {
        match self {
            Credential::Member { node, .. } => Caller::Member(node.clone()),
            Credential::Joiner(_) => Caller::Joiner,
        }
    }
}

impl Caller {
    /// The bytes the proof binds the claim with.
    fn id(&self) -> &[u8] {
        match self {
            Caller::Member(node) => node.as_bytes(),
            Caller::Joiner => b"",
        }
    }
}

/// The keys a server checks proofs with.
pub struct Keys {
    /// The peer key of the cluster secret.
    pub member: Key,
    /// The key of the current join secret.
    pub join: Key,
}

#[derive(Serialize, Deserialize)]
pub struct Challenge {
    pub nonce: String,
}

#[derive(Serialize, Deserialize)]
struct Auth {
    caller: Caller,
    tag: String,
}

/// A request or a reply with its tag: HMAC(k, step ‖ nonce ‖ body).
#[derive(Debug, Serialize, Deserialize)]
pub struct Signed {
    pub tag: String,
    pub body: String,
}

/// Which step of the exchange a [`Signed`] message is: its label in the tag, so that neither
/// side's tag is valid as the other's.
#[derive(Clone, Copy, Debug)]
pub enum Step {
    Request,
    Reply,
}

impl Step {
    fn label(self) -> &'static [u8] {
        match self {
            Step::Request => b"request",
            Step::Reply => b"reply",
        }
    }
}

impl Signed {
    /// Signs `body` as `step` of the exchange that `nonce` opened.
    pub fn seal(key: &Key, step: Step, nonce: &[u8; NONCE_LEN], body: String) -> Signed {
        let tag = hex::encode(key.mac(&[step.label(), nonce, body.as_bytes()]));
        Signed { tag, body }
    }

    /// The body as `step` of the exchange that `nonce` opened, if its tag verifies and it parses:
    /// how both sides read what came off the wire.
    pub fn open<T: DeserializeOwned>(
        &self,
        key: &Key,
        step: Step,
        nonce: &[u8; NONCE_LEN],
    ) -> anyhow::Result<T> {
        let tag = hex::decode(&self.tag).context("malformed tag")?;
        anyhow::ensure!(
            key.verify(&[step.label(), nonce, self.body.as_bytes()], &tag),
            "the tag does not verify"
        );
        serde_json::from_str(&self.body).context("malformed body")
    }
}

#[derive(Serialize, Deserialize)]
enum Answer {
    Signed(Signed),
    /// The client's proof did not verify: it does not hold this cluster's token.
    Refused,
}

/// Sends `request` to the member at `addr` and returns its verified reply.
pub async fn call(
    addr: SocketAddr,
    credential: &Credential,
    request: &Request,
) -> anyhow::Result<Reply> {
    Session::new(addr, credential.clone()).call(request).await
}

/// A member's requests to one peer over one kept connection, so that frequent ones (Raft's,
/// several a second to every voter) cost one handshake, not one each. Only for requests that
/// may arrive twice: a kept connection that the peer closed meanwhile shows only when used, and
/// the request then goes again on a new one.
pub struct Session {
    addr: SocketAddr,
    credential: Credential,
    /// Taken out for each exchange and put back only after a whole one, so that an exchange
    /// cut short (by a caller's timeout) never leaves its reply for the next to read.
    kept: Option<Connection>,
}

impl Session {
    pub fn new(addr: SocketAddr, credential: Credential) -> Session {
        Session {
            addr,
            credential,
            kept: None,
        }
    }

    /// Like [`call`], on the kept connection if there is one.
    pub async fn call(&mut self, request: &Request) -> anyhow::Result<Reply> {
        let addr = self.addr;
        tokio::time::timeout(TIMEOUT, self.exchange(request))
            .await
            .with_context(|| format!("no answer from {addr} within {TIMEOUT:?}"))?
    }

    async fn exchange(&mut self, request: &Request) -> anyhow::Result<Reply> {
        if let Some(mut kept) = self.kept.take()
            && let Ok(reply) = kept.ask(request).await
        {
            self.kept = Some(kept);
            return Ok(reply);
        }
        let mut fresh = Connection::open(self.addr, &self.credential).await?;
        let reply = fresh.ask(request).await?;
        self.kept = Some(fresh);
        Ok(reply)
    }
}

/// A client's connection past the handshake: the challenge read and the proof sent.
struct Connection {
    addr: SocketAddr,
    read: BufReader<OwnedReadHalf>,
    write: OwnedWriteHalf,
    key: Key,
    nonce: [u8; NONCE_LEN],
    /// Exchanges made on it so far.
    exchanges: u64,
}

impl Connection {
    async fn open(addr: SocketAddr, credential: &Credential) -> anyhow::Result<Connection> {
        let (key, caller) = (credential.key(), credential.caller());
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr} (is overlayd running there?)"))?;
        // Small requests and replies, each waited for: Nagle's algorithm would hold the request
        // behind the proof until the server's delayed ACK.
        stream.set_nodelay(true)?;
        let (read, mut write) = stream.into_split();
        let mut read = BufReader::new(read);
        let challenge: Challenge = wire::read(&mut read, HANDSHAKE_LIMIT)
            .await
            .map_err(|err| match err.downcast::<wire::Closed>() {
                Ok(_) => Busy(addr).into(),
                Err(err) => err,
            })
            .with_context(|| format!("handshake with {addr}"))?;
        let nonce = nonce_of(&challenge).with_context(|| {
            format!(
                "{addr} is not an overlayd member (a wrong address?): not answering its challenge"
            )
        })?;
        let auth = Auth {
            tag: hex::encode(key.mac(&[AUTH, &nonce, caller.id()])),
            caller,
        };
        // The server checks this small proof before it reads the request.
        wire::write(&mut write, &auth).await?;
        Ok(Connection {
            addr,
            read,
            write,
            key,
            nonce,
            exchanges: 0,
        })
    }

    async fn ask(&mut self, request: &Request) -> anyhow::Result<Reply> {
        let (addr, nonce) = (self.addr, exchange_nonce(&self.nonce, self.exchanges));
        let signed = Signed::seal(
            &self.key,
            Step::Request,
            &nonce,
            serde_json::to_string(request)?,
        );
        wire::write(&mut self.write, &signed).await?;
        let answer = wire::read(&mut self.read, REPLY_LIMIT)
            .await
            .with_context(|| format!("reading the reply from {addr}"))?;
        self.exchanges += 1;
        match answer {
            Answer::Refused => anyhow::bail!(
                "{addr} refused the token: it is not this cluster's current join token (it was rotated, or belongs to another cluster); print the current one with `overlayd join-token` on a member"
            ),
            Answer::Signed(reply) => reply.open(&self.key, Step::Reply, &nonce).with_context(|| {
                format!("{addr} answered without proving it holds the cluster token; not trusting it")
            }),
        }
    }
}

/// The nonce that exchange `n` on a connection signs under: the connection's, with `n` added
/// into its last eight bytes. The first exchange uses the challenge's own; no two exchanges on
/// one connection share one, so a request or reply cannot be replayed as another.
fn exchange_nonce(nonce: &[u8; NONCE_LEN], n: u64) -> [u8; NONCE_LEN] {
    let (mut stepped, mut low) = (*nonce, [0; 8]);
    low.copy_from_slice(&nonce[NONCE_LEN - 8..]);
    let low = u64::from_be_bytes(low).wrapping_add(n);
    stepped[NONCE_LEN - 8..].copy_from_slice(&low.to_be_bytes());
    stepped
}

/// The member at `addr` closed the connection before its challenge: its [`Gate`] was full (more
/// handshakes under way than it takes at once), or it is stopping. Asking again later may work.
#[derive(Debug, thiserror::Error)]
#[error("{0} closed the connection before its challenge (too busy, or stopping)")]
pub struct Busy(pub SocketAddr);

/// Whether `err` (from [`call`]) says the member was too busy to answer, rather than that it is
/// not there or refused: a joiner asks again.
pub fn is_busy(err: &anyhow::Error) -> bool {
    err.downcast_ref::<Busy>().is_some()
}

/// The challenge's nonce, refused unless it is exactly [`NONCE_LEN`] bytes.
pub fn nonce_of(challenge: &Challenge) -> anyhow::Result<[u8; NONCE_LEN]> {
    let bytes = hex::decode(&challenge.nonce).context("its challenge is not hex")?;
    let len = bytes.len();
    bytes.try_into().map_err(|_| {
        anyhow::anyhow!("its challenge has {len} bytes, where members send {NONCE_LEN}")
    })
}

/// Server side of a connection the [`Gate`] admitted: who called, once it proved the token, and
/// its requests ([`Incoming::next`]); or `None` when the client was refused (counted, and told
/// when its token was wrong). An error means an authenticated client's exchange failed.
pub async fn accept(
    stream: TcpStream,
    keys: &Keys,
    slot: Slot,
) -> anyhow::Result<Option<Incoming>> {
    stream.set_nodelay(true)?;
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    let nonce: [u8; NONCE_LEN] = rand::random();
    let challenge = Challenge {
        nonce: hex::encode(nonce),
    };
    let proof = tokio::time::timeout(HANDSHAKE_WITHIN, async {
        wire::write(&mut write, &challenge).await?;
        wire::read::<Auth, _>(&mut read, HANDSHAKE_LIMIT).await
    })
    .await;
    let auth = match proof {
        Ok(Ok(auth)) => auth,
        Ok(Err(_)) => return Ok(slot.refuse(Refusal::Malformed)),
        Err(_) => return Ok(slot.refuse(Refusal::Slow)),
    };
    let tag = hex::decode(&auth.tag).unwrap_or_default();
    let key = match auth.caller {
        Caller::Member(_) => keys.member.clone(),
        Caller::Joiner => keys.join.clone(),
    };
    if !key.verify(&[AUTH, &nonce, auth.caller.id()], &tag) {
        wire::write(&mut write, &Answer::Refused).await?;
        return Ok(slot.refuse(Refusal::WrongToken));
    }
    // Authenticated: the slot is for strangers' handshakes.
    drop(slot);
    Ok(Some(Incoming {
        caller: auth.caller,
        read,
        write,
        key,
        nonce,
        exchanges: 0,
    }))
}

/// An authenticated client's connection: a joiner makes one exchange on it, a member as many
/// as it likes ([`Session`]), one after the other.
pub struct Incoming {
    pub caller: Caller,
    read: BufReader<OwnedReadHalf>,
    write: OwnedWriteHalf,
    key: Key,
    nonce: [u8; NONCE_LEN],
    exchanges: u64,
}

impl Incoming {
    /// The client's next verified request, to be answered with [`Incoming::reply`] before the
    /// next is asked for. The first must come within [`REQUEST_WITHIN`] of the proof. `None`
    /// once a joiner's exchange is done, or when a member closes its connection or leaves it
    /// idle for [`KEPT_IDLE`].
    pub async fn next(&mut self) -> anyhow::Result<Option<Request>> {
        let first = self.exchanges == 0;
        if !first && self.caller == Caller::Joiner {
            return Ok(None);
        }
        let within = if first { REQUEST_WITHIN } else { KEPT_IDLE };
        let signed: Signed =
            match tokio::time::timeout(within, wire::read(&mut self.read, REQUEST_LIMIT)).await {
                Ok(Ok(signed)) => signed,
                Ok(Err(err)) if !first && err.is::<wire::Closed>() => return Ok(None),
                Ok(Err(err)) => return Err(err),
                Err(_) if !first => return Ok(None),
                Err(_) => anyhow::bail!("no request within {REQUEST_WITHIN:?} of the proof"),
            };
        let nonce = exchange_nonce(&self.nonce, self.exchanges);
        signed
            .open(&self.key, Step::Request, &nonce)
            .context("the member's request")
            .map(Some)
    }

    pub async fn reply(&mut self, reply: &Reply) -> anyhow::Result<()> {
        let body = serde_json::to_string(reply)?;
        let nonce = exchange_nonce(&self.nonce, self.exchanges);
        self.exchanges += 1;
        let signed = Signed::seal(&self.key, Step::Reply, &nonce, body);
        wire::write(&mut self.write, &Answer::Signed(signed)).await
    }
}

/// Why a connection was closed before its client proved the token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Refusal {
    /// Too many handshakes under way (in all, or from its address).
    Busy,
    /// No proof within [`HANDSHAKE_WITHIN`].
    Slow,
    /// Closed early, or sent something other than a proof of at most [`HANDSHAKE_LIMIT`] bytes.
    Malformed,
    /// A proof under another token.
    WrongToken,
    /// A member that left or was removed, proving the cluster secret under its old id.
    Departed,
}

impl Refusal {
    fn name(self) -> &'static str {
        match self {
            Refusal::Busy => "busy",
            Refusal::Slow => "slow",
            Refusal::Malformed => "malformed",
            Refusal::WrongToken => "wrong_token",
            Refusal::Departed => "departed",
        }
    }
}

/// Admission to the peer port: caps the handshakes under way, counts refusals, and logs them
/// at most once per [`REFUSALS_LOGGED_EVERY`].
#[derive(Default)]
pub struct Gate {
    state: Mutex<GateState>,
}

#[derive(Default)]
struct GateState {
    handshakes: usize,
    by_source: HashMap<IpAddr, usize>,
    refused: BTreeMap<Refusal, u64>,
    /// Refusals not yet in a log line, and when the last line was written.
    unlogged: u64,
    logged_at: Option<Instant>,
}

impl GateState {
    fn take(&mut self, from: IpAddr) -> bool {
        let mine = self.by_source.get(&from).copied().unwrap_or_default();
        if self.handshakes >= MAX_HANDSHAKES || mine >= MAX_HANDSHAKES_PER_SOURCE {
            return false;
        }
        self.by_source.insert(from, mine + 1);
        self.handshakes += 1;
        true
    }

    fn give_back(&mut self, from: IpAddr) {
        self.handshakes = self.handshakes.saturating_sub(1);
        if let Some(mine) = self.by_source.get_mut(&from) {
            *mine = mine.saturating_sub(1);
            if *mine == 0 {
                self.by_source.remove(&from);
            }
        }
    }

    /// Counts a refusal; returns how many to report if a log line is due at `now`.
    fn refuse(&mut self, why: Refusal, now: Instant) -> Option<u64> {
        *self.refused.entry(why).or_default() += 1;
        self.unlogged += 1;
        let due = self
            .logged_at
            .is_none_or(|at| now.duration_since(at) >= REFUSALS_LOGGED_EVERY);
        due.then(|| {
            self.logged_at = Some(now);
            std::mem::take(&mut self.unlogged)
        })
    }
}

impl Gate {
    /// A slot for one handshake from `from`, or `None` (counted) when too many are under way:
    /// the caller closes the connection at once.
    pub fn admit(self: &Arc<Gate>, from: SocketAddr) -> Option<Slot> {
        let taken = self.lock().take(from.ip());
        if !taken {
            self.refuse(Refusal::Busy, from.ip());
            return None;
        }
        Some(Slot {
            gate: self.clone(),
            from: from.ip(),
        })
    }

    /// Refusals so far, by reason.
    pub fn refused(&self) -> BTreeMap<String, u64> {
        self.lock()
            .refused
            .iter()
            .map(|(why, n)| (why.name().to_owned(), *n))
            .collect()
    }

    /// Counts (and logs, at most once per period) a refusal made after the handshake.
    pub fn refuse(&self, why: Refusal, from: IpAddr) {
        let due = self.lock().refuse(why, Instant::now());
        if let Some(refused) = due {
            warn!(
                refused,
                last = %from,
                reason = why.name(),
                "peer connections refused before proving the token (strangers, or a wrong token); \
                 `overlayd status` counts them by reason"
            );
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One admitted handshake; gives its place back when dropped.
pub struct Slot {
    gate: Arc<Gate>,
    from: IpAddr,
}

impl Slot {
    fn refuse<T>(self, why: Refusal) -> Option<T> {
        self.gate.refuse(why, self.from);
        None
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.gate.lock().give_back(self.from);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_join_token_or_a_member_forwarding_it_adds_a_node_and_only_members_copy() {
        let join = |forward| Request::Propose {
            change: Change::Join {
                node: "0123456789ab".into(),
                addr: "198.18.0.9:7946".parse().unwrap(),
            },
            forward,
        };
        let member = |node: &str| node == "aaaaaaaaaaaa";
        let (joiner, known) = (Caller::Joiner, Caller::Member("aaaaaaaaaaaa".into()));
        // A removed node holds the cluster secret and can prove it under a made-up id.
        let stranger = Caller::Member("bbbbbbbbbbbb".into());
        assert!(Request::Hello.permitted(&joiner, member).is_ok());
        assert!(join(true).permitted(&joiner, member).is_ok());
        assert!(
            join(false).permitted(&joiner, member).is_err(),
            "straight to the leader"
        );
        assert!(join(false).permitted(&known, member).is_ok(), "forwarded");
        for forward in [true, false] {
            let refused = join(forward).permitted(&stranger, member).unwrap_err();
            assert!(
                refused.usage && refused.message.contains("join token"),
                "{refused:?}"
            );
        }
        assert!(Request::Hello.permitted(&stranger, member).is_ok());
        let copy = Request::Registry { after: None };
        assert!(copy.permitted(&known, member).is_ok());
        for refused in [&joiner, &stranger] {
            assert!(copy.permitted(refused, member).is_err(), "{refused:?}");
        }
        let bindable = Request::Bindable { ports: vec![] };
        assert!(bindable.permitted(&joiner, member).is_err());
        assert!(bindable.permitted(&known, member).is_ok());
    }

    /// Serves one exchange under `secret` and join secret `join`, answering with the caller
    /// and the request.
    async fn serve_once(secret: &Secret, join: &JoinSecret) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let gate = Arc::new(Gate::default());
        let keys = Keys {
            member: secret.key(Purpose::Peer),
            join: join.key(),
        };
        tokio::spawn(async move {
            let (stream, from) = listener.accept().await.unwrap();
            let slot = gate.admit(from).unwrap();
            if let Some(mut incoming) = accept(stream, &keys, slot).await.unwrap() {
                let request = incoming.next().await.unwrap().unwrap();
                let caller = &incoming.caller;
                let reply: Reply = Ok(serde_json::json!(format!("{caller:?} {request:?}")));
                incoming.reply(&reply).await.unwrap();
            }
        });
        addr
    }

    fn member(secret: &Secret) -> Credential {
        Credential::Member {
            secret: secret.clone(),
            node: "0a0b0c0d0e0f".into(),
        }
    }

    #[tokio::test]
    async fn members_and_joiners_get_verified_replies_naming_who_they_are() {
        let (secret, join) = (Secret::generate(), JoinSecret::generate());
        let addr = serve_once(&secret, &join).await;
        let reply = call(addr, &member(&secret), &Request::Hello).await.unwrap();
        assert_eq!(
            reply,
            Ok(serde_json::json!("Member(\"0a0b0c0d0e0f\") Hello"))
        );
        let addr = serve_once(&secret, &join).await;
        let reply = call(addr, &Credential::Joiner(join), &Request::Hello)
            .await
            .unwrap();
        assert_eq!(reply, Ok(serde_json::json!("Joiner Hello")));
    }

    /// Serves connections, each for at most `per_connection` exchanges, answering each request
    /// with its connection's number and its exchange's; returns the address.
    async fn serve_kept(secret: &Secret, per_connection: usize) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let gate = Arc::new(Gate::default());
        let keys = Keys {
            member: secret.key(Purpose::Peer),
            join: JoinSecret::generate().key(),
        };
        tokio::spawn(async move {
            for connection in 0.. {
                let (stream, from) = listener.accept().await.unwrap();
                let slot = gate.admit(from).unwrap();
                let mut incoming = accept(stream, &keys, slot).await.unwrap().unwrap();
                for exchange in 0..per_connection {
                    let Some(_) = incoming.next().await.unwrap() else {
                        break;
                    };
                    let reply: Reply = Ok(serde_json::json!([connection, exchange]));
                    incoming.reply(&reply).await.unwrap();
                }
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_session_keeps_its_connection_and_opens_another_when_the_peer_closed_it() {
        let secret = Secret::generate();
        let addr = serve_kept(&secret, 3).await;
        let mut session = Session::new(addr, member(&secret));
        let mut answers = Vec::new();
        for _ in 0..5 {
            answers.push(session.call(&Request::Hello).await.unwrap().unwrap());
        }
        let expected: Vec<serde_json::Value> = [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1]]
            .iter()
            .map(|pair| serde_json::json!(pair))
            .collect();
        assert_eq!(
            answers, expected,
            "three exchanges on the first connection, then a new one"
        );
    }

    #[test]
    fn every_exchange_on_a_connection_signs_under_its_own_nonce() {
        let nonce = [0xff; NONCE_LEN];
        assert_eq!(
            exchange_nonce(&nonce, 0),
            nonce,
            "the first is the challenge's"
        );
        let nonces: std::collections::BTreeSet<_> =
            (0..1000).map(|n| exchange_nonce(&nonce, n)).collect();
        assert_eq!(nonces.len(), 1000);
        // A reply signed for one exchange does not open as another's.
        let key = Secret::generate().key(Purpose::Peer);
        let reply = Signed::seal(&key, Step::Reply, &exchange_nonce(&nonce, 1), "1".into());
        assert!(
            reply
                .open::<u32>(&key, Step::Reply, &exchange_nonce(&nonce, 1))
                .is_ok()
        );
        assert!(
            reply
                .open::<u32>(&key, Step::Reply, &exchange_nonce(&nonce, 2))
                .is_err()
        );
    }

    #[tokio::test]
    async fn a_connection_closed_before_the_challenge_reads_as_busy() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // What the server does over its handshake cap: closes at once.
        tokio::spawn(async move { drop(listener.accept().await.unwrap()) });
        let err = call(addr, &member(&Secret::generate()), &Request::Hello)
            .await
            .unwrap_err();
        assert!(is_busy(&err), "{err:#}");
        // Nothing listening is not busy: the address is wrong, or overlayd is not running.
        let err = call(addr, &member(&Secret::generate()), &Request::Hello)
            .await
            .unwrap_err();
        assert!(!is_busy(&err), "{err:#}");
    }

    #[tokio::test]
    async fn a_wrong_token_is_refused_by_name() {
        let (secret, join) = (Secret::generate(), JoinSecret::generate());
        for wrong in [
            member(&Secret::generate()),
            Credential::Joiner(JoinSecret::generate()),
            // The join secret is no member's key, nor the cluster secret a joiner's.
            Credential::Joiner(secret.first_join()),
        ] {
            let addr = serve_once(&secret, &join).await;
            let err = call(addr, &wrong, &Request::Hello).await.unwrap_err();
            assert!(err.to_string().contains("refused the token"), "{err}");
        }
    }

    #[test]
    fn nonces_of_any_other_length_are_refused() {
        for len in [0, 15, 17, 64] {
            let challenge = Challenge {
                nonce: hex::encode(vec![7; len]),
            };
            let err = nonce_of(&challenge).unwrap_err();
            assert!(err.to_string().contains("16"), "{len}: {err}");
        }
        let good = Challenge {
            nonce: hex::encode([7; NONCE_LEN]),
        };
        assert_eq!(nonce_of(&good).unwrap(), [7; NONCE_LEN]);
    }

    #[test]
    fn handshakes_are_capped_in_all_and_per_source_and_given_back() {
        let mut gate = GateState::default();
        let one: IpAddr = [198, 18, 0, 9].into();
        for _ in 0..MAX_HANDSHAKES_PER_SOURCE {
            assert!(gate.take(one));
        }
        assert!(!gate.take(one), "one host holds every slot it may");
        let mut others = (0..=255u8).map(|i| IpAddr::from([198, 18, 1, i]));
        while gate.handshakes < MAX_HANDSHAKES {
            assert!(gate.take(others.next().unwrap()));
        }
        assert!(!gate.take(others.next().unwrap()), "the total is capped");
        gate.give_back(one);
        assert!(gate.take(one), "a finished handshake frees its slot");
        assert!(
            gate.by_source.len() <= MAX_HANDSHAKES,
            "refusals leave no entries behind"
        );
    }

    #[test]
    fn refusals_are_all_counted_but_logged_at_most_once_per_period() {
        let mut gate = GateState::default();
        let t0 = Instant::now();
        assert_eq!(gate.refuse(Refusal::Busy, t0), Some(1), "the first is told");
        for i in 1..100 {
            let now = t0 + Duration::from_millis(i * 50);
            assert_eq!(gate.refuse(Refusal::Slow, now), None);
        }
        let later = t0 + REFUSALS_LOGGED_EVERY;
        assert_eq!(gate.refuse(Refusal::WrongToken, later), Some(100));
        assert_eq!(gate.refused[&Refusal::Busy], 1);
        assert_eq!(gate.refused[&Refusal::Slow], 99);
        assert_eq!(gate.refused[&Refusal::WrongToken], 1);
    }
}
