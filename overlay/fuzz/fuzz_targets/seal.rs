//! The opener of encrypted networks on untrusted input: arbitrary datagrams never open and
//! never panic; a genuine datagram opens once, and with any one byte changed not at all;
//! the replay window takes each counter at most once.
#![no_main]

use libfuzzer_sys::fuzz_target;
use overlay::Vni;
use overlay::seal::{self, Header, Key, Opener, Sealer, Window};

const KEY: Key = Key([0x42; 32]);

fuzz_target!(|data: &[u8]| {
    let opener = Opener::new(&KEY);
    let mut garbage = data.to_vec();
    if let Ok(header) = Header::parse(&garbage) {
        assert!(opener.open(&header, &mut garbage).is_err(), "forged without the key");
    }

    // A frame and a counter from the input, sealed, then one byte flipped where it says.
    let Some((&[a, b, c, d], frame)) = data.split_first_chunk::<4>() else {
        return;
    };
    let counter = u64::from(u32::from_be_bytes([a, b, c, d]));
    let mut genuine = vec![0u8; seal::HEADER_LEN + frame.len() + seal::TAG_LEN];
    genuine[seal::HEADER_LEN..seal::HEADER_LEN + frame.len()].copy_from_slice(frame);
    Sealer::new(&KEY, a, counter).seal(Vni::new(u32::from(b)).unwrap(), &mut genuine);
    let mut flipped = genuine.clone();
    let at = usize::from(c) * 256 + usize::from(d);
    flipped[at % genuine.len()] ^= 1 << (b % 8);
    if let Ok(header) = Header::parse(&flipped) {
        assert!(opener.open(&header, &mut flipped).is_err(), "a changed byte opened");
    }
    let header = Header::parse(&genuine).unwrap();
    let mut first = genuine.clone();
    let at = opener.open(&header, &mut first).expect("a genuine datagram opens");
    assert_eq!(&first[at], frame);
    assert!(opener.open(&header, &mut genuine.clone()).is_err(), "a replay opened");

    // Counters from the input, taken at most once each.
    let mut window = Window::default();
    let mut taken = std::collections::HashSet::new();
    for chunk in data.chunks_exact(2) {
        let counter = u64::from(u16::from_be_bytes([chunk[0], chunk[1]]));
        if window.take(counter) {
            assert!(taken.insert(counter), "counter {counter} taken twice");
        }
    }
});
