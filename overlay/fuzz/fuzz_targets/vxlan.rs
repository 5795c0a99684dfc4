//! VXLAN header parsing: never panics, and a parsed header re-emits to the same VNI.
#![no_main]

use libfuzzer_sys::fuzz_target;
use overlay::vxlan::{HEADER_LEN, Header, Repr};

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = Header::new_checked(data) {
        let repr = Repr::parse(&h);
        let mut out = [0u8; HEADER_LEN];
        repr.emit(&mut out);
        assert_eq!(Repr::parse(&Header::new_checked(&out[..]).unwrap()), repr);
        assert_eq!(h.inner().len(), data.len() - HEADER_LEN);
    }
});
