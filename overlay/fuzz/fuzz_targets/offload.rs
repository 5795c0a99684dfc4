//! Virtio-net header + frame as the TAP hands them over: segmentation, checksum completion
//! and coalescing (TCP, and UDP for TAPs with USO) never panic, and a coalescer with nothing
//! pending always decides (takes or refuses a frame, never defers it). The byte-for-byte
//! round trip is a property test in `overlay/src/offload/tests.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use overlay::offload::{Coalescer, Push, complete_checksum, segment};
use overlay::vnet;

fuzz_target!(|data: &[u8]| {
    let Some(vh) = vnet::Header::parse(data) else { return };
    let frame = &data[vnet::HEADER_LEN..];
    let mut out = vec![0u8; 160 * 1024];
    if let Ok(segs) = segment(frame, &vh, 8, &mut out) {
        assert!(segs.len() <= out.len());
        // With and without UDP coalescing (the TAP accepting USO or not).
        for udp in [false, true] {
            let mut c = Coalescer::new();
            for i in 0..segs.count {
                let seg = segs.frame(&out, i, 8);
                if c.push_with(seg, udp) == Push::Later {
                    let _ = c.finish();
                    assert_ne!(c.push_with(seg, udp), Push::Later, "an empty coalescer decides");
                }
            }
            let _ = c.finish();
        }
    }
    let mut f = frame.to_vec();
    let _ = complete_checksum(&mut f, usize::from(vh.csum_start), usize::from(vh.csum_offset));
});
