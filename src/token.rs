//! The cluster secret: printed as the join token, and the root of every key the cluster uses.
//!
//! A token is `OVL1-` followed by 32 random bytes in hex. The secret itself signs nothing: each
//! purpose gets its own key, derived with HKDF-SHA256 (RFC 5869) under its own label, so a tag
//! made for one purpose is never valid for another (WireGuard and Noise give each key one job).
//! Before this, a joining member answered a fake peer's "nonce" with a tag that was also a valid
//! gossip tag. The secret never travels after `init` prints it.

use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

const PREFIX: &str = "OVL1-";
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
    "malformed join token: expected `{PREFIX}` and 64 hex digits (copy it from `overlayd join-token` on a member)"
)]
pub struct MalformedToken;

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

    /// The key for `purpose`. The secret is 32 uniformly random bytes, so HKDF's extract step
    /// needs no salt (RFC 5869 §3.1).
    pub fn key(&self, purpose: Purpose) -> Key {
        let mut key = [0; 32];
        Hkdf::<Sha256>::new(None, &self.0)
            .expand(purpose.label(), &mut key)
            .expect("32 bytes is far below HKDF-SHA256's output limit");
        Key(key)
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
            "OVL1-",
            "OVL1-zz",
            "SWMTKN-1-abc",
            &format!("OVL1-{}", "ab".repeat(31)),
        ] {
            assert_eq!(Secret::from_token(bad), Err(MalformedToken), "{bad}");
        }
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
