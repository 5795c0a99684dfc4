//! Maglev consistent hashing (Eisenbud et al., "Maglev: A Fast and Reliable Software Network
//! Load Balancer", NSDI 2016, §3.4): a lookup table of prime size M in which every slot names
//! a backend, so that picking a backend for a flow is one modulo and one load.
//!
//! Each backend has a preference list of all slots, a permutation derived from a hash of its
//! key alone (`offset + j * skip mod M`, the paper's Pseudocode 1). Backends take turns
//! claiming their next still-free slot until the table is full. So:
//! - every backend ends up with either ⌊M/N⌋ or ⌈M/N⌉ slots (the turns are round-robin);
//! - removing one backend frees its slots, which the others claim; the rest of the table
//!   moves only where a survivor's claim order changes, a small fraction when M ≫ N;
//! - the table depends only on the set of keys, not on the order they were given in: keys are
//!   sorted before the turns start, and the key hash is the crate's stable hash, so every node
//!   builds the same table.
//!
//! Building allocates the table (two bytes a slot) and a few words per backend; lookups do not
//! allocate. What a key is (a task address, say) is the caller's business: the table answers
//! with the position of the key in the slice it was built from.

use crate::hash;

/// The table size the paper uses, and the default: prime, and large enough that up to a few
/// hundred backends each get within a fraction of a percent of their share of slots.
pub const DEFAULT_SIZE: Size = Size(65_537);

/// The largest supported table size: a slot holds a backend's position as a `u16`, and a
/// table larger than this would not buy balance for the backend counts a `u16` allows.
const MAX_SIZE: u32 = 1 << 20;

const SEED_OFFSET: u64 = 0x6f66_6673_6574; // "offset"
const SEED_SKIP: u64 = 0x736b_6970; // "skip"

/// A table size: a prime (so that every `skip` in `1..M` walks all the slots).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Size(u32);

impl Size {
    /// Checks that `slots` is a prime no larger than 2^20.
    pub fn new(slots: u32) -> Result<Size, Error> {
        if slots > MAX_SIZE || !is_prime(slots) {
            return Err(Error::Size(slots));
        }
        Ok(Size(slots))
    }

    pub fn get(self) -> u32 {
        self.0
    }
}

fn is_prime(n: u32) -> bool {
    n >= 2
        && (2..)
            .take_while(|d| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

/// Why a table was not built. Nothing is built in either case.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The size is not a prime, or is larger than 2^20.
    #[error("a Maglev table size must be a prime no larger than 1048576, not {0}")]
    Size(u32),
    /// More backends than slots (or than a `u16` can number): some would get no slot at all.
    #[error("{backends} backends do not fit a Maglev table of {slots} slots")]
    TooManyBackends { backends: usize, slots: u32 },
    /// Two backends have the same key, so they would claim the same slots in the same order.
    #[error("backends {0} and {1} have the same key")]
    DuplicateKey(usize, usize),
}

/// A built lookup table. Empty (every lookup `None`) when built from no backends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Table {
    /// For each slot, the position of its backend in the slice the table was built from.
    slots: Box<[u16]>,
}

impl Table {
    /// Builds the table for the backends named by `keys`. Equal sets of keys build equal
    /// tables whatever their order; the answers of [`Table::lookup`] are positions in `keys`.
    pub fn build<K: AsRef<[u8]>>(size: Size, keys: &[K]) -> Result<Table, Error> {
        let m = size.0;
        if keys.len() > m as usize || keys.len() > usize::from(u16::MAX) + 1 {
            return Err(Error::TooManyBackends {
                backends: keys.len(),
                slots: m,
            });
        }
        if keys.is_empty() {
            return Ok(Table {
                slots: Box::new([]),
            });
        }
        // Canonical turn order: by key bytes, so that the caller's order does not matter.
        let mut order: Vec<usize> = (0..keys.len()).collect();
        order.sort_by(|&a, &b| keys[a].as_ref().cmp(keys[b].as_ref()));
        if let Some(w) = order
            .windows(2)
            .find(|w| keys[w[0]].as_ref() == keys[w[1]].as_ref())
        {
            return Err(Error::DuplicateKey(w[0].min(w[1]), w[0].max(w[1])));
        }
        let m64 = u64::from(m);
        // Per backend, in turn order: (its position in `keys`, its next slot, skip). The next
        // slot starts at the offset and advances by `skip`, so it is always
        // `offset + j * skip mod M`, the permutation never materialised.
        let mut walkers: Vec<(u16, u64, u64)> = order
            .iter()
            .map(|&i| {
                let key = keys[i].as_ref();
                let offset = hash::stable(SEED_OFFSET, key) % m64;
                let skip = hash::stable(SEED_SKIP, key) % (m64 - 1) + 1;
                // `i` fits: the length check above bounds it by u16::MAX.
                (i as u16, offset, skip)
            })
            .collect();
        // Every u16 is a valid position (65536 backends), so "taken" is tracked beside.
        let mut taken = vec![false; m as usize];
        let mut slots = vec![0u16; m as usize].into_boxed_slice();
        let mut filled = 0u32;
        'fill: loop {
            for (backend, next, skip) in &mut walkers {
                // Each backend has at least one free slot left in its permutation while the
                // table is not full (the permutation covers every slot), so this ends.
                while taken[*next as usize] {
                    *next = (*next + *skip) % m64;
                }
                taken[*next as usize] = true;
                slots[*next as usize] = *backend;
                *next = (*next + *skip) % m64;
                filled += 1;
                if filled == m {
                    break 'fill;
                }
            }
        }
        Ok(Table { slots })
    }

    /// The backend (its position in the keys the table was built from) for a flow hash, or
    /// `None` if the table has no backends. O(1), no allocation.
    pub fn lookup(&self, flow_hash: u64) -> Option<usize> {
        let len = self.slots.len() as u64;
        if len == 0 {
            return None;
        }
        // In range by construction; `get` keeps the lookup total regardless.
        self.slots
            .get((flow_hash % len) as usize)
            .map(|&b| usize::from(b))
    }

    /// The table size (0 for a table without backends).
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::Ipv4Addr;

    fn task(i: usize) -> [u8; 4] {
        // Overlay task addresses, 198.19.0.0/16 as the project's tests use.
        Ipv4Addr::new(198, 19, (i >> 8) as u8, i as u8).octets()
    }

    fn tasks(n: usize) -> Vec<[u8; 4]> {
        (1..=n).map(task).collect()
    }

    /// How many slots each backend holds, by position in the keys.
    fn slot_counts(table: &Table, backends: usize) -> Vec<usize> {
        let mut counts = vec![0; backends];
        for h in 0..table.len() as u64 {
            counts[table.lookup(h).unwrap()] += 1;
        }
        counts
    }

    /// The key each slot maps to, so tables built from differently ordered keys compare.
    fn keyed(table: &Table, keys: &[[u8; 4]]) -> Vec<[u8; 4]> {
        (0..table.len() as u64)
            .map(|h| keys[table.lookup(h).unwrap()])
            .collect()
    }

    /// Fraction of slots whose key differs between two tables of the same size, and the
    /// fraction of slots that moved although their old key is still present.
    fn moved(before: &[[u8; 4]], after: &[[u8; 4]], survivors: &[[u8; 4]]) -> (f64, f64) {
        let m = before.len() as f64;
        let changed = before.iter().zip(after).filter(|(a, b)| a != b);
        let total = changed.clone().count() as f64 / m;
        let collateral = changed.filter(|(a, _)| survivors.contains(a)).count() as f64 / m;
        (total, collateral)
    }

    #[test]
    fn sizes_must_be_prime() {
        assert_eq!(Size::new(65_537).map(Size::get), Ok(65_537));
        assert_eq!(Size::new(251).map(Size::get), Ok(251));
        for bad in [0, 1, 4, 65_536, 65_535, MAX_SIZE + 1] {
            assert_eq!(Size::new(bad), Err(Error::Size(bad)));
        }
    }

    #[test]
    fn no_backends_no_answer() {
        let t = Table::build::<[u8; 4]>(DEFAULT_SIZE, &[]).unwrap();
        assert!(t.is_empty());
        assert_eq!(t.lookup(42), None);
    }

    #[test]
    fn one_backend_takes_every_slot() {
        let t = Table::build(Size::new(7).unwrap(), &tasks(1)).unwrap();
        assert_eq!(slot_counts(&t, 1), vec![7]);
        assert_eq!(t.lookup(u64::MAX), Some(0));
    }

    #[test]
    fn too_many_and_duplicate_backends_are_refused() {
        let small = Size::new(5).unwrap();
        assert_eq!(
            Table::build(small, &tasks(6)),
            Err(Error::TooManyBackends {
                backends: 6,
                slots: 5
            })
        );
        let mut keys = tasks(4);
        keys.push(task(2));
        assert_eq!(
            Table::build(DEFAULT_SIZE, &keys),
            Err(Error::DuplicateKey(1, 4))
        );
    }

    #[test]
    fn as_many_backends_as_slots_each_get_one() {
        let size = Size::new(13).unwrap();
        let t = Table::build(size, &tasks(13)).unwrap();
        assert_eq!(slot_counts(&t, 13), vec![1; 13]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Every node builds the same table: only the set of keys matters, not its order.
        #[test]
        fn same_set_same_table_in_any_order(n in 1usize..40, seed in any::<u64>()) {
            let keys = tasks(n);
            let mut shuffled = keys.clone();
            // A deterministic shuffle driven by the seed (Fisher-Yates with an LCG).
            let mut s = seed;
            for i in (1..n).rev() {
                s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                shuffled.swap(i, (s >> 33) as usize % (i + 1));
            }
            let size = Size::new(4099).unwrap();
            let a = Table::build(size, &keys).unwrap();
            let b = Table::build(size, &shuffled).unwrap();
            prop_assert_eq!(keyed(&a, &keys), keyed(&b, &shuffled));
        }

        /// Slots are balanced to within one (round-robin turns), and flow hashes spread over
        /// the backends within a few percent of an equal share.
        #[test]
        fn balanced(n in 2usize..64, flows_seed in any::<u64>()) {
            let keys = tasks(n);
            let t = Table::build(DEFAULT_SIZE, &keys).unwrap();
            let counts = slot_counts(&t, n);
            let (lo, hi) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
            prop_assert!(hi - lo <= 1, "slots per backend {lo}..{hi}");

            let flows = 200_000u64;
            let mut per = vec![0u64; n];
            for f in 0..flows {
                per[t.lookup(hash::stable(flows_seed, &f.to_le_bytes())).unwrap()] += 1;
            }
            let share = flows as f64 / n as f64;
            let spread = per.iter().map(|&c| (c as f64 - share).abs() / share).fold(0.0, f64::max);
            // Binomial noise alone is about 1/sqrt(share): 1.8% at n = 63. The worst of n
            // backends passed 4 sigma in about 4% of runs (seen at n = 27); 5 sigma is a real
            // imbalance, not noise.
            let allowed = 5.0 / share.sqrt();
            prop_assert!(spread < allowed, "worst backend {:.2}% off its share (allowed {:.2}%)",
                spread * 100.0, allowed * 100.0);
        }

        /// Removing one of N backends moves every slot of that backend and little else: under
        /// 1.5/N of all slots in total.
        #[test]
        fn removal_moves_about_one_nth(n in 2usize..64, gone in any::<prop::sample::Index>()) {
            let keys = tasks(n);
            let gone = gone.index(n);
            let mut survivors = keys.clone();
            let removed = survivors.remove(gone);
            let before = keyed(&Table::build(DEFAULT_SIZE, &keys).unwrap(), &keys);
            let after = keyed(&Table::build(DEFAULT_SIZE, &survivors).unwrap(), &survivors);
            prop_assert!(!after.contains(&removed));
            let (total, collateral) = moved(&before, &after, &survivors);
            let share = 1.0 / n as f64;
            prop_assert!(total < 1.5 * share, "moved {:.4} of slots, 1/N = {:.4}", total, share);
            prop_assert!(total >= share * 0.95, "the removed backend's slots moved: {total}");
            prop_assert!(collateral < 0.5 * share, "collateral {collateral}");
        }
    }

    /// Prints the figures the property tests bound, for the record
    /// (`cargo test -p ingress maglev::tests::figures -- --nocapture`).
    #[test]
    fn figures() {
        for n in [3usize, 10, 50] {
            let keys = tasks(n);
            let t = Table::build(DEFAULT_SIZE, &keys).unwrap();
            let flows = 1_000_000u64;
            let mut per = vec![0u64; n];
            for f in 0..flows {
                per[t.lookup(hash::stable(7, &f.to_le_bytes())).unwrap()] += 1;
            }
            let share = flows as f64 / n as f64;
            let spread = per
                .iter()
                .map(|&c| (c as f64 - share).abs() / share)
                .fold(0.0, f64::max);
            let mut survivors = keys.clone();
            survivors.remove(n / 2);
            let before = keyed(&t, &keys);
            let after = keyed(&Table::build(DEFAULT_SIZE, &survivors).unwrap(), &survivors);
            let (total, collateral) = moved(&before, &after, &survivors);
            println!(
                "N={n} M=65537: worst flow share {:.2}% off; remove 1: moved {:.4} (1/N = {:.4}), \
                 of which survivors' {:.4}",
                spread * 100.0,
                total,
                1.0 / n as f64,
                collateral
            );
            assert!(spread < 0.05 && total < 1.5 / n as f64);
        }
    }
}
