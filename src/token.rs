//! The cluster secret, the root of every key members use, and the join secret, the only thing
//! a join token holds.
//!
//! The cluster secret is 32 random bytes made by `init`, kept in each member's state dir
//! (`OVL1-` and hex). It signs nothing itself: each purpose gets its own key, derived with
//! HKDF-SHA256 (RFC 5869) under its own label, so a tag made for one purpose is never valid for
//! another (WireGuard and Noise give each key one job).
//!
//! A join token is `OVL2-` and a [`JoinSecret`] in hex. It proves a joiner may join, and the
//! member it joins through hands it the cluster secret sealed under the join secret
//! (ChaCha20-Poly1305). It is not the cluster secret, so it can be rotated (`join-token
//! --rotate`, replicated through the registry) without re-keying the members.

use chacha20poly1305::ChaCha20Poly1305;
use chacha20poly1305::aead::{Aead, Payload};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// The stored cluster secret.
const PREFIX: &str = "OVL1-";
/// A join token.
const JOIN_PREFIX: &str = "OVL2-";
/// Bytes of every tag: the whole HMAC-SHA256, checked at exactly this length.
pub const TAG_LEN: usize = 32;

#[derive(Clone, PartialEq, Eq)]
pub struct Secret([u8; 32]);

/// What a key is for. Adding a purpose is one variant and its label.
#[derive(Clone, Copy, Debug)]
pub enum Purpose {
    /// Signs every gossip datagram.
    Gossip,
    /// Challenge-response of requests between members over TCP.
    Peer,
}

impl Purpose {
    /// The HKDF `info`: distinct per purpose, versioned so a new scheme gets new keys.
    fn label(self) -> &'static [u8] {
        match self {
            Purpose::Gossip => b"overlayd gossip v1",
            Purpose::Peer => b"overlayd peer v1",
        }
    }
}

/// An HMAC-SHA256 key for one [`Purpose`].
#[derive(Clone)]
pub struct Key([u8; 32]);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "malformed join token: expected `{JOIN_PREFIX}` and 64 hex digits (copy it from `overlayd join-token` on a member)"
)]
pub struct MalformedToken;

/// What a join token holds: the credential of joiners, replaced by `join-token --rotate`.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct JoinSecret([u8; 32]);

/// Labels of the join secret's two keys (see [`Purpose::label`]).
const JOIN_AUTH: &[u8] = b"overlayd join auth v1";
const JOIN_SEAL: &[u8] = b"overlayd join seal v1";
/// Label of the join secret a new cluster starts with, derived from its cluster secret.
const FIRST_JOIN: &[u8] = b"overlayd first join secret v1";
/// Bytes of the ChaCha20-Poly1305 nonce that leads a sealed cluster secret.
const SEAL_NONCE_LEN: usize = 12;

/// 32 bytes of HKDF-SHA256 output from `ikm` under `label`. The inputs are 32 uniformly random
/// bytes, so the extract step needs no salt (RFC 5869 §3.1).
fn derive(ikm: &[u8; 32], label: &[u8]) -> [u8; 32] {
    let mut out = [0; 32];
    Hkdf::<Sha256>::new(None, ikm)
        .expand(label, &mut out)
        .expect("32 bytes is far below HKDF-SHA256's output limit");
    out
}
impl Secret {
    pub fn generate() -> Secret {
        Secret(rand::random())
    }

    pub fn from_token(token: &str) -> Result<Secret, MalformedToken> {
        let hex_part = token.trim().strip_prefix(PREFIX).ok_or(MalformedToken)?;
        let bytes = hex::decode(hex_part).map_err(|_| MalformedToken)?;
        Ok(Secret(bytes.try_into().map_err(|_| MalformedToken)?))
    }

    pub fn token(&self) -> String {
        format!("{PREFIX}{}", hex::encode(self.0))
    }

    /// The chitchat cluster id: names the cluster without revealing the secret.
    pub fn cluster_id(&self) -> String {
        let digest = Sha256::digest(self.0);
        format!("overlayd-{}", hex::encode(&digest[..8]))
    }

    /// The key for `purpose`.
    pub fn key(&self, purpose: Purpose) -> Key {
        Key(derive(&self.0, purpose.label()))
    }

    /// The join secret of a cluster whose token was never rotated: derived, so `init` needs no
    /// Raft entry before it prints a token, and it reveals nothing of the cluster secret.
    pub fn first_join(&self) -> JoinSecret {
        JoinSecret(derive(&self.0, FIRST_JOIN))
    }
}

impl JoinSecret {
    pub fn generate() -> JoinSecret {
        JoinSecret(rand::random())
    }

    pub fn from_token(token: &str) -> Result<JoinSecret, MalformedToken> {
        let hex_part = token
            .trim()
            .strip_prefix(JOIN_PREFIX)
            .ok_or(MalformedToken)?;
        let bytes = hex::decode(hex_part).map_err(|_| MalformedToken)?;
        Ok(JoinSecret(bytes.try_into().map_err(|_| MalformedToken)?))
    }

    pub fn token(&self) -> String {
        format!("{JOIN_PREFIX}{}", hex::encode(self.0))
    }

    /// The key a joiner proves the token with, in the peer handshake.
    pub fn key(&self) -> Key {
        Key(derive(&self.0, JOIN_AUTH))
    }

    fn cipher(&self) -> ChaCha20Poly1305 {
        <ChaCha20Poly1305 as chacha20poly1305::KeyInit>::new(&derive(&self.0, JOIN_SEAL).into())
    }

    /// `secret` sealed for a joiner holding this join secret: a fresh random nonce, then the
    /// ciphertext and tag, in hex. Bound to the cluster id, so it opens for no other cluster.
    pub fn seal(&self, secret: &Secret) -> String {
        let nonce: [u8; SEAL_NONCE_LEN] = rand::random();
        let aad = secret.cluster_id();
        let sealed = self
            .cipher()
            .encrypt(
                &nonce.into(),
                Payload {
                    msg: &secret.0,
                    aad: aad.as_bytes(),
                },
            )
            .expect("ChaCha20-Poly1305 seals 32 bytes");
        hex::encode([&nonce[..], &sealed].concat())
    }

    /// The cluster secret in `sealed`, if it was sealed under this join secret for a cluster
    /// whose id is `cluster_id`.
    pub fn open(&self, sealed: &str, cluster_id: &str) -> Option<Secret> {
        let bytes = hex::decode(sealed).ok()?;
        let (nonce, sealed) = bytes.split_first_chunk::<SEAL_NONCE_LEN>()?;
        let plain = self
            .cipher()
            .decrypt(
                &(*nonce).into(),
                Payload {
                    msg: sealed,
                    aad: cluster_id.as_bytes(),
                },
            )
            .ok()?;
        let secret = Secret(plain.try_into().ok()?);
        (secret.cluster_id() == cluster_id).then_some(secret)
    }
}

impl TryFrom<String> for JoinSecret {
    type Error = MalformedToken;

    fn try_from(token: String) -> Result<JoinSecret, MalformedToken> {
        JoinSecret::from_token(&token)
    }
}

impl From<JoinSecret> for String {
    fn from(join: JoinSecret) -> String {
        join.token()
    }
}

impl std::fmt::Debug for JoinSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JoinSecret(..)")
    }
}

/// The HKDF `info` prefix of the keys that seal encrypted networks' frames.
const VXLAN_LABEL: &[u8] = b"overlayd vxlan v1";

impl Secret {
    /// The key that seals frames from node `sender` to node `receiver` on the network with
    /// `vni` in key epoch `epoch` (`overlay::seal`). One key per direction, so each sender's
    /// counters are its own and no two senders ever use one nonce under one key; ids are
    /// length-prefixed so no two tuples give the same `info`.
    pub fn vxlan_key(&self, sender: &str, receiver: &str, vni: u32, epoch: u32) -> [u8; 32] {
        let mut info = Vec::with_capacity(VXLAN_LABEL.len() + sender.len() + receiver.len() + 12);
        info.extend_from_slice(VXLAN_LABEL);
        for id in [sender, receiver] {
            info.extend_from_slice(&(id.len() as u16).to_be_bytes());
            info.extend_from_slice(id.as_bytes());
        }
        info.extend_from_slice(&vni.to_be_bytes());
        info.extend_from_slice(&epoch.to_be_bytes());
        let mut key = [0; 32];
        Hkdf::<Sha256>::new(None, &self.0)
            .expand(&info, &mut key)
            .expect("32 bytes is far below HKDF-SHA256's output limit");
        key
    }
}

impl Key {
    /// HMAC over the concatenation of `parts`.
    pub fn mac(&self, parts: &[&[u8]]) -> [u8; TAG_LEN] {
        self.hmac(parts).finalize().into_bytes().into()
    }

    /// Constant-time check of a full-length tag over `parts`; any other length fails.
    pub fn verify(&self, parts: &[&[u8]], tag: &[u8]) -> bool {
        self.hmac(parts).verify_slice(tag).is_ok()
    }

    fn hmac(&self, parts: &[&[u8]]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        for part in parts {
            mac.update(part);
        }
        mac
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_round_trips() {
        let secret = Secret::generate();
        assert_eq!(Secret::from_token(&secret.token()), Ok(secret));
    }

    #[test]
    fn malformed_tokens_are_refused() {
        for bad in [
            "",
            "OVL2-",
            "OVL2-zz",
            "SWMTKN-1-abc",
            &format!("OVL2-{}", "ab".repeat(31)),
            // The stored cluster secret is not a join token.
            &Secret::generate().token(),
        ] {
            assert_eq!(JoinSecret::from_token(bad), Err(MalformedToken), "{bad}");
        }
        let join = JoinSecret::generate();
        assert_eq!(JoinSecret::from_token(&join.token()), Ok(join));
    }

    #[test]
    fn the_cluster_secret_opens_only_under_its_join_secret_and_cluster_id() {
        let secret = Secret::generate();
        let join = secret.first_join();
        let sealed = join.seal(&secret);
        let id = secret.cluster_id();
        assert_eq!(join.open(&sealed, &id), Some(secret.clone()));
        assert_ne!(join.seal(&secret), sealed, "a fresh nonce each time");
        assert_eq!(
            JoinSecret::generate().open(&sealed, &id),
            None,
            "a rotated-out token"
        );
        assert_eq!(join.open(&sealed, "overlayd-0000000000000000"), None);
        let mut flipped = hex::decode(&sealed).unwrap();
        flipped[20] ^= 1;
        assert_eq!(join.open(&hex::encode(flipped), &id), None, "tampered");
        assert_eq!(join.open(&sealed[..40], &id), None, "truncated");
        assert!(!sealed.contains(&hex::encode(secret.0)), "not in the clear");
        assert_ne!(join.0, secret.0);
        assert_ne!(join.key().0, secret.key(Purpose::Peer).0);
    }

    #[test]
    fn tags_verify_only_under_the_same_key_and_at_full_length() {
        let (a, b) = (Secret::generate(), Secret::generate());
        let key = a.key(Purpose::Peer);
        let tag = key.mac(&[b"nonce", b"body"]);
        assert!(key.verify(&[b"nonce", b"body"], &tag));
        assert!(
            key.verify(&[b"nonceb", b"ody"], &tag),
            "parts are concatenated"
        );
        assert!(!b.key(Purpose::Peer).verify(&[b"nonce", b"body"], &tag));
        assert!(!key.verify(&[b"nonce", b"bodY"], &tag));
        assert!(
            !key.verify(&[b"nonce", b"body"], &tag[..16]),
            "a truncated tag proves nothing"
        );
        assert_ne!(a.cluster_id(), b.cluster_id());
    }

    #[test]
    fn vxlan_keys_differ_by_direction_network_and_epoch() {
        let secret = Secret::generate();
        let k = |s: &str, r: &str, vni, epoch| secret.vxlan_key(s, r, vni, epoch);
        let base = k("a", "b", 4096, 0);
        assert_eq!(
            base,
            k("a", "b", 4096, 0),
            "every node derives the same key"
        );
        for other in [
            k("b", "a", 4096, 0),
            k("a", "b", 4097, 0),
            k("a", "b", 4096, 1),
            k("ab", "", 4096, 0),
            Secret::generate().vxlan_key("a", "b", 4096, 0),
        ] {
            assert_ne!(base, other);
        }
        assert!(base != secret.0 && secret.key(Purpose::Gossip).0 != base);
    }

    #[test]
    fn each_purpose_has_its_own_key_and_none_is_the_secret() {
        let secret = Secret::generate();
        let gossip = secret.key(Purpose::Gossip);
        let peer = secret.key(Purpose::Peer);
        let tag = peer.mac(&[b"same bytes"]);
        assert!(!gossip.verify(&[b"same bytes"], &tag));
        assert!(gossip.0 != secret.0 && peer.0 != secret.0);
        // Deterministic: every member derives the same keys from the same token.
        assert!(
            secret
                .key(Purpose::Gossip)
                .verify(&[b"x"], &gossip.mac(&[b"x"]))
        );
    }
}
