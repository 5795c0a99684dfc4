use std::collections::BTreeSet;

use proptest::prelude::*;

use super::*;

const KEY: Key = Key([7; 32]);

fn vni(n: u32) -> Vni {
    Vni::new(n).unwrap()
}

/// `frame` sealed under `KEY` with `counter`.
fn sealed(frame: &[u8], counter: u64) -> Vec<u8> {
    let mut d = vec![0u8; HEADER_LEN + frame.len() + TAG_LEN];
    d[HEADER_LEN..HEADER_LEN + frame.len()].copy_from_slice(frame);
    Sealer::new(&KEY, 3, counter).seal(vni(4096), &mut d);
    d
}

fn open(opener: &Opener, datagram: &[u8]) -> Result<Vec<u8>, Refused> {
    let mut d = datagram.to_vec();
    let header = Header::parse(&d)?;
    let at = opener.open(&header, &mut d)?;
    Ok(d[at].to_vec())
}

#[test]
fn header_bytes_are_as_documented() {
    let d = sealed(b"frame", 0x0102_0304_0506_0708);
    assert_eq!(
        &d[..HEADER_LEN],
        &[0x02, 3, 0, 0, 0, 0x10, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]
    );
    assert_eq!(d.len(), HEADER_LEN + 5 + TAG_LEN);
    assert!(
        !d.windows(5).any(|w| w == b"frame"),
        "the frame is encrypted"
    );
    assert_eq!(
        Header::parse(&d),
        Ok(Header {
            key_id: 3,
            vni: vni(4096),
            counter: 0x0102_0304_0506_0708
        })
    );
    assert_eq!(OVERHEAD, 24);
}

#[test]
fn plain_vxlan_is_not_sealed() {
    let mut plain = [0u8; 64];
    vxlan::Repr { vni: vni(4096) }.emit(&mut plain);
    assert!(!is_sealed(&plain));
    assert_eq!(Header::parse(&plain), Err(Refused::Malformed));
    // The S bit with the I flag is a plain header with a reserved bit set.
    plain[0] |= FLAG_SEALED;
    assert!(!is_sealed(&plain));
    assert!(!is_sealed(&[]));
}

#[test]
fn a_replayed_datagram_is_refused_and_so_is_one_older_than_the_window() {
    let opener = Opener::new(&KEY);
    let base = 1_000_000;
    let first = sealed(b"one", base);
    assert_eq!(open(&opener, &first), Ok(b"one".to_vec()));
    assert_eq!(open(&opener, &first), Err(Refused::Replay));
    // Reordered but within the window: taken once.
    let late = sealed(b"late", base - 5);
    let newer = sealed(b"newer", base + WINDOW + 10);
    assert_eq!(open(&opener, &newer), Ok(b"newer".to_vec()));
    assert_eq!(open(&opener, &late), Err(Refused::Replay), "too old now");
    let within = sealed(b"in", base + 100);
    assert_eq!(open(&opener, &within), Ok(b"in".to_vec()));
    assert_eq!(open(&opener, &within), Err(Refused::Replay));
}

#[test]
fn a_forged_datagram_does_not_move_the_window() {
    let opener = Opener::new(&KEY);
    let mut forged = sealed(b"frame", 50);
    // A forger raises the counter (it is in the associated data, so the tag fails).
    forged[8] = 0x7f;
    assert_eq!(open(&opener, &forged), Err(Refused::Forged));
    assert_eq!(open(&opener, &sealed(b"frame", 50)), Ok(b"frame".to_vec()));
    let other = Opener::new(&Key([8; 32]));
    assert_eq!(open(&other, &sealed(b"frame", 51)), Err(Refused::Forged));
}

#[test]
fn counter_max_is_never_taken() {
    let mut w = Window::default();
    assert!(!w.take(u64::MAX));
    assert!(w.take(u64::MAX - 1));
    assert!(!w.take(u64::MAX - 1));
}

/// What the window should do: take a counter not taken before and not more than `WINDOW`
/// below the highest taken.
#[derive(Default)]
struct Model {
    taken: BTreeSet<u64>,
}

impl Model {
    fn take(&mut self, c: u64) -> bool {
        let highest = self.taken.last().copied();
        let fresh = !self.taken.contains(&c)
            && highest.is_none_or(|h| c > h || h - c < WINDOW)
            && c != u64::MAX;
        if fresh {
            self.taken.insert(c);
        }
        fresh
    }
}

proptest! {
    #[test]
    fn seal_open_round_trip(
        frame in proptest::collection::vec(any::<u8>(), 0..1600),
        counter in 0u64..u64::MAX - 1,
        n in 0u32..=Vni::MAX,
        key_id in any::<u8>(),
    ) {
        let mut d = vec![0u8; HEADER_LEN + frame.len() + TAG_LEN];
        d[HEADER_LEN..HEADER_LEN + frame.len()].copy_from_slice(&frame);
        Sealer::new(&KEY, key_id, counter).seal(vni(n), &mut d);
        let header = Header::parse(&d).unwrap();
        prop_assert_eq!(header, Header { key_id, vni: vni(n), counter });
        let opener = Opener::new(&KEY);
        let at = opener.open(&header, &mut d).unwrap();
        prop_assert_eq!(&d[at], &frame[..]);
    }

    /// Any one changed bit anywhere (header, ciphertext, tag) is refused.
    #[test]
    fn tampering_with_any_byte_is_refused(
        frame in proptest::collection::vec(any::<u8>(), 0..200),
        at in any::<prop::sample::Index>(),
        bit in 0u8..8,
    ) {
        let mut d = sealed(&frame, 77);
        let i = at.index(d.len());
        d[i] ^= 1 << bit;
        let opener = Opener::new(&KEY);
        prop_assert!(open(&opener, &d).is_err(), "byte {} bit {} accepted", i, bit);
    }

    /// Truncated or arbitrary bytes never open and never panic.
    #[test]
    fn garbage_is_refused(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
        prop_assert!(open(&Opener::new(&KEY), &bytes).is_err());
    }

    #[test]
    fn the_window_matches_its_model(
        start in 0u64..u64::MAX / 2,
        steps in proptest::collection::vec((0u64..5000, any::<bool>()), 1..300),
    ) {
        let (mut window, mut model) = (Window::default(), Model::default());
        let mut c = start;
        for (delta, back) in steps {
            c = if back { c.saturating_sub(delta) } else { c + delta };
            prop_assert_eq!(window.take(c), model.take(c), "counter {}", c);
        }
    }
}
