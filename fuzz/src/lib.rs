//! What the fuzz targets of the daemon's parsers share.

use overlayd::registry::{Command, Registry};

/// A registry holding network `web` (198.19.0.0/24, id `w`), with no VTEPs of its own.
pub fn registry_with_web() -> Registry {
    let mut r = Registry::default();
    r.apply(Command::CreateNetwork {
        id: "w".into(),
        name: "web".into(),
        subnet: "198.19.0.0/24".parse().unwrap(),
        vni: None,
        mtu: 1450,
        vteps: vec![],
        internal: false,
        encrypted: false,
    })
    .expect("network web applies");
    r
}
