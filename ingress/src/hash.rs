//! The one stable hash of the crate: every node must compute the same value for the same
//! bytes (a backend's place in a Maglev table, a flow's backend), so it cannot be std's
//! `DefaultHasher`, whose algorithm is unspecified and may change between Rust releases.
//!
//! FNV-1a over the bytes, then MurmurHash3's 64-bit finaliser so that inputs differing in one
//! bit (neighbouring addresses, ports) land far apart. Not keyed: it is not for tables an
//! attacker can fill (conntrack's index uses std's randomly keyed hasher).

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// Hashes `bytes`; `seed` gives independent hash functions over the same bytes.
pub(crate) fn stable(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = FNV_OFFSET ^ seed;
    for &b in bytes {
        h = (h ^ u64::from(b)).wrapping_mul(FNV_PRIME);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_values_so_every_node_agrees() {
        // Pinned outputs: a change here changes which task every existing flow maps to on a
        // node running the new binary, so it must be deliberate.
        assert_eq!(stable(0, b""), 0xefd0_1f60_ba99_2926);
        assert_eq!(stable(1, &[198, 19, 0, 5]), 0x6448_0599_564c_23ea);
    }

    #[test]
    fn seeds_and_single_bits_differ() {
        let a = [198, 19, 0, 5];
        let b = [198, 19, 0, 4];
        assert_ne!(stable(0, &a), stable(1, &a));
        assert_ne!(stable(0, &a), stable(0, &b));
        // Avalanche: one input bit flips about half of the output bits.
        let flipped = (stable(0, &a) ^ stable(0, &b)).count_ones();
        assert!((16..=48).contains(&flipped), "{flipped} bits flipped");
    }
}
