//! The cluster secret: printed as the join token, keys every gossip datagram and peer request.
//!
//! A token is `OVL1-` followed by 32 random bytes in hex. Everything that proves membership is an
//! HMAC-SHA256 under that secret, so the secret itself never travels after `init` prints it.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

const PREFIX: &str = "OVL1-";
/// Bytes of the HMAC kept on gossip datagrams (truncation per RFC 2104 §5; 128 bits).
pub const TAG_LEN: usize = 16;

#[derive(Clone, PartialEq, Eq)]
pub struct Secret([u8; 32]);

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

    /// HMAC over the concatenation of `parts`.
    pub fn mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut mac = self.hmac();
        for part in parts {
            mac.update(part);
        }
        mac.finalize().into_bytes().into()
    }

    /// Constant-time check of a (possibly truncated, at least [`TAG_LEN`]) tag over `parts`.
    pub fn verify(&self, parts: &[&[u8]], tag: &[u8]) -> bool {
        if tag.len() < TAG_LEN {
            return false;
        }
        let mut mac = self.hmac();
        for part in parts {
            mac.update(part);
        }
        mac.verify_truncated_left(tag).is_ok()
    }

    fn hmac(&self) -> HmacSha256 {
        HmacSha256::new_from_slice(&self.0).expect("HMAC takes keys of any length")
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
    fn tags_verify_only_under_the_same_secret() {
        let (a, b) = (Secret::generate(), Secret::generate());
        let tag = a.mac(&[b"nonce", b"body"]);
        assert!(a.verify(&[b"nonce", b"body"], &tag[..TAG_LEN]));
        assert!(
            a.verify(&[b"nonceb", b"ody"], &tag),
            "parts are concatenated"
        );
        assert!(!b.verify(&[b"nonce", b"body"], &tag));
        assert!(!a.verify(&[b"nonce", b"bodY"], &tag));
        assert!(
            !a.verify(&[b"nonce", b"body"], &tag[..4]),
            "too short a tag proves nothing"
        );
        assert_ne!(a.cluster_id(), b.cluster_id());
    }
}
