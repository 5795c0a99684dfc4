//! Cluster-wide choices that must never collide: subnets, VNIs and container addresses.
//!
//! Pure functions over "what is taken"; the leader (see [`crate::leader`]) calls them under one
//! lock, so two nodes asking at the same moment get different answers.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;

use crate::model::Network;

const MAX_VNI: u32 = (1 << 24) - 1;

/// VNIs below this are left to hand-made kernel VXLAN devices (Swarm starts at 4096 too).
pub const FIRST_AUTO_VNI: u32 = 4096;

/// A request that can never succeed as given; the message says what to change.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("subnet {0} has host bits set: use {1}")]
    HostBits(String, Ipv4Network),
    #[error("subnet {0} is too small: use a prefix of /29 or shorter")]
    TooSmall(Ipv4Network),
    #[error("subnet {0} overlaps network {1} ({2}): pick a disjoint subnet")]
    Overlap(Ipv4Network, String, Ipv4Network),
    #[error("network {0} already exists: pick another name or `overlayd network rm {0}` first")]
    NameTaken(String),
    #[error("VNI {0} is used by network {1}: pick another --vni or leave it out")]
    VniTaken(u32, String),
    #[error("VNI {0} is out of range: use 1 to {MAX_VNI}")]
    VniRange(u32),
    #[error(
        "network name {0:?} is not allowed: use 1 to 64 letters, digits, '-', '_' or '.', not starting with '-' or '.'"
    )]
    Name(String),
    #[error("MTU {0} is out of range: use 576 (IPv4's minimum) to 65535")]
    Mtu(u32),
    #[error("no free VNI left")]
    NoVni,
    #[error("{0} is not inside {1}: pick an address in the subnet")]
    Outside(Ipv4Addr, Ipv4Network),
    #[error("{0} is reserved in {1} (network, gateway or broadcast address): pick another")]
    Reserved(Ipv4Addr, Ipv4Network),
    #[error("{0} is already in use on network {1}: pick another --ip or leave it out")]
    AddressTaken(Ipv4Addr, String),
    #[error("network {0} has no free address left")]
    Exhausted(String),
    #[error(
        "an encrypted network cannot have --vtep: a kernel VXLAN device cannot seal or open its frames"
    )]
    EncryptedVteps,
    #[error(
        "network {0} is not encrypted: only an encrypted network has keys (`network create --encrypted`)"
    )]
    NotEncrypted(String),
}

/// A subnet a network can have: no host bits, room for a gateway and containers.
pub fn check_subnet(subnet: Ipv4Network) -> Result<(), Refusal> {
    if subnet.prefix() > 29 {
        return Err(Refusal::TooSmall(subnet));
    }
    if subnet.network() != subnet.ip() {
        let fixed = Ipv4Network::new(subnet.network(), subnet.prefix())
            .map_err(|_| Refusal::TooSmall(subnet))?;
        return Err(Refusal::HostBits(subnet.to_string(), fixed));
    }
    Ok(())
}

pub fn check_vni(vni: u32) -> Result<(), Refusal> {
    if vni == 0 || vni > MAX_VNI {
        return Err(Refusal::VniRange(vni));
    }
    Ok(())
}

/// Checks a new network against the existing ones and picks its VNI.
pub fn admit_network(
    name: &str,
    subnet: Ipv4Network,
    vni: Option<u32>,
    existing: &[Network],
) -> Result<u32, Refusal> {
    crate::model::check_name(name)?;
    check_subnet(subnet)?;
    if let Some(n) = existing.iter().find(|n| n.name == name) {
        return Err(Refusal::NameTaken(n.name.clone()));
    }
    if let Some(n) = existing.iter().find(|n| n.subnet.overlaps(subnet)) {
        return Err(Refusal::Overlap(subnet, n.name.clone(), n.subnet));
    }
    let used: BTreeSet<u32> = existing.iter().map(|n| n.vni).collect();
    match vni {
        Some(v) => {
            check_vni(v)?;
            match existing.iter().find(|n| n.vni == v) {
                Some(n) => Err(Refusal::VniTaken(v, n.name.clone())),
                None => Ok(v),
            }
        }
        None => (FIRST_AUTO_VNI..=MAX_VNI)
            .find(|v| !used.contains(v))
            .ok_or(Refusal::NoVni),
    }
}

/// Picks a container address: `wanted` if it is free, else the lowest free host address.
pub fn allocate(
    network: &Network,
    wanted: Option<Ipv4Addr>,
    taken: &BTreeSet<Ipv4Addr>,
) -> Result<Ipv4Addr, Refusal> {
    let subnet = network.subnet;
    let reserved = [subnet.network(), network.gateway(), subnet.broadcast()];
    match wanted {
        Some(ip) if !subnet.contains(ip) => Err(Refusal::Outside(ip, subnet)),
        Some(ip) if reserved.contains(&ip) => Err(Refusal::Reserved(ip, subnet)),
        Some(ip) if taken.contains(&ip) => Err(Refusal::AddressTaken(ip, network.name.clone())),
        Some(ip) => Ok(ip),
        None => subnet
            .iter()
            .find(|ip| !reserved.contains(ip) && !taken.contains(ip))
            .ok_or_else(|| Refusal::Exhausted(network.name.clone())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn net(name: &str, subnet: &str, vni: u32) -> Network {
        Network {
            id: name.into(),
            name: name.into(),
            subnet: subnet.parse().unwrap(),
            vni,
            mtu: 1450,
            vteps: vec![],
            internal: false,
            encrypted: false,
            key_epoch: 0,
        }
    }

    #[test]
    fn vni_is_the_lowest_free_from_4096() {
        let existing = [
            net("a", "198.19.0.0/24", 4096),
            net("b", "198.19.1.0/24", 4098),
        ];
        assert_eq!(
            admit_network("c", "198.19.2.0/24".parse().unwrap(), None, &existing),
            Ok(4097)
        );
        assert_eq!(
            admit_network("c", "198.19.2.0/24".parse().unwrap(), Some(42), &existing),
            Ok(42)
        );
    }

    #[test]
    fn bad_networks_are_refused_with_the_fix() {
        let existing = [net("a", "198.19.0.0/24", 4096)];
        let admit =
            |name, subnet: &str, vni| admit_network(name, subnet.parse().unwrap(), vni, &existing);
        assert_eq!(
            admit("b", "198.19.1.7/24", None),
            Err(Refusal::HostBits(
                "198.19.1.7/24".into(),
                "198.19.1.0/24".parse().unwrap()
            ))
        );
        assert!(matches!(
            admit("b", "198.19.0.128/25", None),
            Err(Refusal::Overlap(..))
        ));
        assert!(matches!(
            admit("b", "198.19.0.0/16", None),
            Err(Refusal::Overlap(..))
        ));
        assert!(matches!(
            admit("a", "198.19.9.0/24", None),
            Err(Refusal::NameTaken(_))
        ));
        assert!(matches!(
            admit("b", "198.19.1.0/24", Some(4096)),
            Err(Refusal::VniTaken(4096, _))
        ));
        assert!(matches!(
            admit("b", "198.19.1.0/24", Some(1 << 24)),
            Err(Refusal::VniRange(_))
        ));
        assert!(matches!(
            admit("b", "198.19.1.0/30", None),
            Err(Refusal::TooSmall(_))
        ));
    }

    #[test]
    fn addresses_skip_reserved_and_taken() {
        let n = net("a", "198.19.0.0/29", 4096);
        let taken: BTreeSet<_> = ["198.19.0.2".parse().unwrap()].into();
        assert_eq!(
            allocate(&n, None, &taken),
            Ok("198.19.0.3".parse().unwrap())
        );
        let ip = |s: &str| Some(s.parse().unwrap());
        assert!(matches!(
            allocate(&n, ip("198.19.0.2"), &taken),
            Err(Refusal::AddressTaken(..))
        ));
        assert!(matches!(
            allocate(&n, ip("198.19.0.1"), &taken),
            Err(Refusal::Reserved(..))
        ));
        assert!(matches!(
            allocate(&n, ip("198.19.0.7"), &taken),
            Err(Refusal::Reserved(..))
        ));
        assert!(matches!(
            allocate(&n, ip("198.19.1.2"), &taken),
            Err(Refusal::Outside(..))
        ));
        let full: BTreeSet<_> = (2..=6).map(|i| Ipv4Addr::new(198, 19, 0, i)).collect();
        assert!(matches!(
            allocate(&n, None, &full),
            Err(Refusal::Exhausted(_))
        ));
    }

    proptest! {
        /// Allocating repeatedly never hands out an address twice nor a reserved one.
        #[test]
        fn allocation_is_unique(prefix in 24u8..=29, pre_taken in proptest::collection::btree_set(0u32..256, 0..40)) {
            let n = net("p", &format!("198.19.0.0/{prefix}"), 4096);
            let mut taken: BTreeSet<Ipv4Addr> = pre_taken.iter().filter_map(|i| n.subnet.nth(*i)).collect();
            let before = taken.len();
            while let Ok(ip) = allocate(&n, None, &taken) {
                prop_assert!(n.subnet.contains(ip));
                prop_assert!(ip != n.gateway() && ip != n.subnet.network() && ip != n.subnet.broadcast());
                prop_assert!(taken.insert(ip));
            }
            let reserved_in_taken = [n.subnet.network(), n.gateway(), n.subnet.broadcast()]
                .iter().filter(|ip| taken.contains(ip)).count();
            prop_assert_eq!(taken.len() - reserved_in_taken + 3, n.subnet.size() as usize);
            prop_assert!(taken.len() >= before);
        }
    }
}
