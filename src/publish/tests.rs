//! Parsing, display and the rules of published ports, and properties over all of them.

use super::*;
use proptest::prelude::*;

fn publish(published: u16, target: u16) -> Publish {
    Publish {
        published,
        target,
        protocol: PublishProtocol::Tcp,
        mode: PublishMode::Ingress,
        addr: None,
        affinity: Affinity::None,
        proxy: None,
    }
}

fn parse(spec: &str) -> Result<Publish, Refusal> {
    spec.parse()
}

#[test]
fn every_form_parses() {
    assert_eq!(parse("9200:80"), Ok(publish(9200, 80)));
    assert_eq!(parse("9200:80/tcp"), Ok(publish(9200, 80)));
    let udp = Publish {
        protocol: PublishProtocol::Udp,
        ..publish(53, 5353)
    };
    assert_eq!(parse("53:5353/udp"), Ok(udp.clone()));
    assert_eq!(parse("published=53,target=5353,protocol=udp"), Ok(udp));
    let bound = Publish {
        addr: Some(Ipv4Addr::new(198, 18, 0, 1)),
        ..publish(8080, 80)
    };
    assert_eq!(parse("198.18.0.1:8080:80/tcp"), Ok(bound));
    assert_eq!(parse("0.0.0.0:8080:80"), Ok(publish(8080, 80)));
    let host = Publish {
        mode: PublishMode::Host,
        ..publish(8080, 80)
    };
    assert_eq!(parse("mode=host,published=8080,target=80"), Ok(host));
    let sticky = Publish {
        affinity: Affinity::ClientIp,
        proxy: Some(ProxyProtocol::V2),
        ..publish(9200, 80)
    };
    assert_eq!(
        parse("9200:80,affinity=client-ip,proxy=v2"),
        Ok(sticky.clone())
    );
    assert_eq!(
        parse("published=9200,target=80,proxy=v2,affinity=client-ip"),
        Ok(sticky)
    );
}

#[test]
fn bad_specs_are_refused_naming_the_part() {
    for (spec, says) in [
        ("70000:80", "published port 70000 is out of range"),
        ("0:80", "published port 0 is out of range"),
        ("9200:0", "target port 0 is out of range"),
        (
            "99999999999999999999:1",
            "\"99999999999999999999\" is not a number",
        ),
        ("80", "\"80\" is not a port spec"),
        ("x:80", "\"x\""),
        ("8000-8010:80", "\"8000-8010\""),
        ("9200:80/sctp", "protocol=sctp"),
        ("1.2.3:80:80", "\"1.2.3\" is not an IPv4"),
        ("a:b:c:d", "not a port spec"),
        ("", "published port \"\""),
        ("9200:80,affinity=sticky", "affinity=sticky"),
        ("9200:80,color=red", "\"color\""),
        ("9200:80,proxy", "not a port spec"),
        ("9200:80/udp,proxy=v2", "9200/udp"),
        ("9200:80,protocol=udp", "protocol= is given twice"),
        (
            "published=1,published=2,target=3",
            "published= is given twice",
        ),
        ("published=9200", "target= are both needed"),
        ("published=9200,target=80,mode=local", "mode=local"),
        ("198.18.0.1:9200:80,mode=host", "198.18.0.1:9200/tcp"),
        (
            "61000:80",
            "port 61000/tcp is one of the ports containers reach the outside from",
        ),
    ] {
        let refusal = parse(spec).expect_err(spec).to_string();
        assert!(refusal.contains(says), "{spec}: {refusal}");
        assert!(!refusal.contains('\n'), "{spec}: one line: {refusal}");
    }
}

#[test]
fn removals_name_a_port_an_address_and_a_target() {
    let rm = |spec: &str| spec.parse::<Unpublish>();
    let bound: Publish = parse("198.18.0.1:8080:80").unwrap();
    let any: Publish = parse("8080:81").unwrap();
    let udp: Publish = parse("8080:80/udp").unwrap();
    for (spec, matches) in [
        ("8080", [true, true, false]),
        ("8080/udp", [false, false, true]),
        ("198.18.0.1:8080", [true, false, false]),
        ("198.18.0.1:8080:80", [true, false, false]),
        ("8080:81", [false, true, false]),
        (
            "published=8080,target=80,protocol=udp",
            [false, false, true],
        ),
    ] {
        let rm = rm(spec).unwrap();
        let got = [&bound, &any, &udp].map(|p| rm.matches(p));
        assert_eq!(got, matches, "{spec}");
    }
    assert!(rm("0").is_err());
    assert!(rm("8080/icmp").is_err());
    assert_eq!(rm("8080:81").unwrap().to_string(), "*:8080->81/tcp");
    assert_eq!(
        rm("198.18.0.1:8080").unwrap().to_string(),
        "198.18.0.1:8080/tcp"
    );
}

#[test]
fn ports_show_as_docker_shows_them() {
    let show = |spec: &str| parse(spec).unwrap().to_string();
    assert_eq!(show("9200:80"), "*:9200->80/tcp");
    assert_eq!(show("198.18.0.1:8080:80/udp"), "198.18.0.1:8080->80/udp");
    assert_eq!(
        show("published=8080,target=80,mode=host"),
        "*:8080->80/tcp (host)"
    );
}

fn service(name: &str, specs: &[&str]) -> (String, Service) {
    let service = Service {
        name: name.into(),
        network_id: "net".into(),
        mode: crate::model::Mode::Vip,
        vip: None,
        health: None,
        publish: specs.iter().map(|s| parse(s).unwrap()).collect(),
    };
    (name.to_string(), service)
}

#[test]
fn a_port_is_published_once_per_address_and_protocol() {
    let services: BTreeMap<String, Service> = [
        service("web", &["80:8080", "198.18.0.1:443:8443"]),
        service("dns", &["53:53/udp"]),
    ]
    .into();
    let add = |specs: &[&str]| {
        let add: Vec<Publish> = specs.iter().map(|s| parse(s).unwrap()).collect();
        admit(&services, "new", &[], &add, &[])
    };
    for (specs, why) in [
        (
            &["80:80"][..],
            "port 80/tcp is already published by service web",
        ),
        (
            &["198.18.0.2:80:80"],
            "80/tcp is already published by service web",
        ),
        (&["443:443"], "443/tcp is already published by service web"),
        (
            &["198.18.0.1:443:1"],
            "198.18.0.1:443/tcp is already published by service web",
        ),
        (
            &["mode=host,published=53,target=1,protocol=udp"],
            "by service dns",
        ),
        (&["9000:1", "9000:2"], "port 9000/tcp is given twice"),
        (&["9000:1", "198.18.0.3:9000:2"], "given twice"),
    ] {
        let refusal = add(specs).expect_err(why).to_string();
        assert!(refusal.contains(why), "{specs:?}: {refusal}");
    }
    for specs in [
        &["53:53"][..],
        &["80:80/udp"],
        &["198.18.0.2:443:443"],
        &["9000:1", "9000:1/udp", "9001:1"],
    ] {
        assert!(add(specs).is_ok(), "{specs:?}");
    }
}

#[test]
fn an_update_removes_first_then_adds() {
    let (_, web) = service("web", &["80:8080", "81:8081"]);
    let services = BTreeMap::from([("web".to_string(), web.clone())]);
    let rm = |s: &str| s.parse::<Unpublish>().unwrap();
    let moved = admit(
        &services,
        "web",
        &web.publish,
        &[parse("80:9090").unwrap()],
        &[rm("80")],
    )
    .unwrap();
    assert_eq!(
        moved,
        [parse("81:8081").unwrap(), parse("80:9090").unwrap()]
    );
    for (add, remove, why) in [
        (vec!["80:1"], vec![], "already published by service web"),
        (vec![], vec!["82"], "service web does not publish 82/tcp"),
        (vec![], vec!["80/udp"], "does not publish 80/udp"),
        (vec![], vec!["80:1"], "does not publish *:80->1/tcp"),
        (vec![], vec!["80", "80"], "80/tcp is given twice"),
    ] {
        let add: Vec<Publish> = add.iter().map(|s| parse(s).unwrap()).collect();
        let remove: Vec<Unpublish> = remove.iter().map(|s| rm(s)).collect();
        let refusal = admit(&services, "web", &web.publish, &add, &remove)
            .expect_err(why)
            .to_string();
        assert!(refusal.contains(why), "{refusal}");
    }
}

/// The spec a user would type for `p`.
fn spec(p: &Publish) -> String {
    let mut spec = match (p.mode, p.addr) {
        (PublishMode::Host, _) => format!(
            "mode=host,published={},target={},protocol={}",
            p.published, p.target, p.protocol
        ),
        (PublishMode::Ingress, addr) => format!(
            "{}{}:{}/{}",
            addr.map_or(String::new(), |a| format!("{a}:")),
            p.published,
            p.target,
            p.protocol
        ),
    };
    if p.affinity == Affinity::ClientIp {
        spec.push_str(",affinity=client-ip");
    }
    if p.proxy.is_some() {
        spec.push_str(",proxy=v2");
    }
    spec
}

fn any_publish() -> impl Strategy<Value = Publish> {
    (
        1u16..*EGRESS_PORTS.start(),
        1u16..,
        any::<bool>(),
        any::<bool>(),
        proptest::option::of(1u32..u32::MAX),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(published, target, udp, host, addr, sticky, proxy)| {
            let protocol = if udp {
                PublishProtocol::Udp
            } else {
                PublishProtocol::Tcp
            };
            Publish {
                published,
                target,
                protocol,
                mode: if host {
                    PublishMode::Host
                } else {
                    PublishMode::Ingress
                },
                addr: addr.filter(|_| !host).map(Ipv4Addr::from),
                affinity: if sticky {
                    Affinity::ClientIp
                } else {
                    Affinity::None
                },
                proxy: (proxy && !udp).then_some(ProxyProtocol::V2),
            }
        })
}

proptest! {
    /// Every publish the rules allow can be typed, and reads back as itself.
    #[test]
    fn specs_read_back(p in any_publish()) {
        prop_assert_eq!(parse(&spec(&p)), Ok(p.clone()));
        let rm: Unpublish = p.port().parse().unwrap();
        prop_assert!(rm.matches(&p));
    }

    /// Parsing never panics, and what it accepts obeys the rules.
    #[test]
    fn any_text_parses_or_is_refused(text in "[0-9a-z.:/,=-]{0,40}") {
        if let Ok(p) = parse(&text) {
            prop_assert!(p.check().is_ok());
        }
        let _ = text.parse::<Unpublish>();
    }

    /// Whatever is admitted leaves no two overlapping ports in the cluster.
    #[test]
    fn admitted_ports_never_overlap(
        held in proptest::collection::vec(any_publish(), 0..6),
        add in proptest::collection::vec(any_publish(), 0..4),
    ) {
        let held: Vec<Publish> = held
            .into_iter()
            .map(|p| Publish { published: p.published % 4 + 1, ..p })
            .collect();
        let add: Vec<Publish> = add
            .into_iter()
            .map(|p| Publish { published: p.published % 4 + 1, ..p })
            .collect();
        let mut services = BTreeMap::new();
        for (i, p) in held.into_iter().enumerate() {
            let (name, mut s) = service(&format!("s{i}"), &[]);
            if admit(&services, &name, &[], std::slice::from_ref(&p), &[]).is_ok() {
                s.publish.push(p);
                services.insert(name, s);
            }
        }
        if let Ok(got) = admit(&services, "new", &[], &add, &[]) {
            let (name, mut s) = service("new", &[]);
            s.publish = got;
            services.insert(name, s);
        }
        let all: Vec<&Publish> = services.values().flat_map(|s| &s.publish).collect();
        for (i, a) in all.iter().enumerate() {
            for b in &all[..i] {
                prop_assert!(!a.overlaps(b), "{a} and {b}");
            }
        }
    }
}
