//! The egress allow-list (`--allow-cidr`, `TIDINGS_ALLOW_CIDRS`) and the guard it configures:
//! any text is a list or names its bad entry; a list reads back from its own display; and no
//! allow-list can open metadata or link-local addresses except an entry that narrowly names them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use proptest::prelude::*;
use tidings_core::egress::{AddressClass, EgressPolicy, classify, parse_cidr_list};

use crate::{config, text};

fn ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<u32>().prop_map(|n| IpAddr::V4(Ipv4Addr::from(n))),
        any::<u128>().prop_map(|n| IpAddr::V6(Ipv6Addr::from(n))),
        // IPv4-mapped, and the sensitive neighbourhoods.
        any::<u32>().prop_map(|n| IpAddr::V6(Ipv4Addr::from(n).to_ipv6_mapped())),
        (0u8..=255, 0u8..=255).prop_map(|(c, d)| IpAddr::V4(Ipv4Addr::new(169, 254, c, d))),
        any::<u16>().prop_map(|n| IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, n))),
    ]
}

fn net() -> impl Strategy<Value = IpNet> {
    (ip(), any::<u8>()).prop_map(|(ip, len)| {
        let max = if ip.is_ipv4() { 32 } else { 128 };
        IpNet::new(ip, len % (max + 1)).unwrap()
    })
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn any_text_is_a_list_or_names_its_bad_entry(s in prop_oneof![
        text(60),
        "[0-9./: ,a-f]{0,40}",
        proptest::collection::vec(net(), 0..4).prop_map(|n| n.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")),
    ]) {
        match parse_cidr_list(&s) {
            Ok(nets) => {
                for net in &nets {
                    prop_assert_eq!(net.trunc(), *net, "entries are networks");
                }
                let shown: Vec<String> = nets.iter().map(ToString::to_string).collect();
                prop_assert_eq!(parse_cidr_list(&shown.join(", ")), Ok(nets));
            }
            Err(e) => {
                prop_assert!(s.split(',').any(|entry| entry.trim() == e.entry), "{:?} from {:?}", e, s);
            }
        }
    }

    #[test]
    fn lists_parse_as_written_with_spaces_and_empty_entries(
        nets in proptest::collection::vec(net(), 0..6),
        pad in "[ \t]{0,2}",
        empties in any::<bool>(),
    ) {
        let sep = if empties { format!("{pad},{pad},") } else { format!("{pad},") };
        let text = nets.iter().map(ToString::to_string).collect::<Vec<_>>().join(&sep);
        let expected: Vec<IpNet> = nets.iter().map(IpNet::trunc).collect();
        prop_assert_eq!(parse_cidr_list(&format!("{pad}{text}{pad}")), Ok(expected));
    }

    #[test]
    fn mapped_addresses_are_what_they_carry(n in any::<u32>()) {
        let v4 = Ipv4Addr::from(n);
        prop_assert_eq!(classify(IpAddr::V6(v4.to_ipv6_mapped())), classify(IpAddr::V4(v4)));
    }

    #[test]
    fn only_narrow_entries_open_credentials_addresses(
        address in ip(),
        allow in proptest::collection::vec(net(), 0..4),
    ) {
        let class = classify(address);
        prop_assert_eq!(EgressPolicy::strict().check(address).is_ok(), class == AddressClass::Public);
        let allowed = EgressPolicy::new(allow.clone()).check(address).is_ok();
        if class == AddressClass::Public {
            prop_assert!(allowed);
        } else if matches!(class, AddressClass::LinkLocal | AddressClass::Metadata) {
            // Opened only by an entry of at least /16 (IPv4) or /10 (IPv6) covering it.
            let narrow = |net: &IpNet| match net {
                IpNet::V4(n) => n.prefix_len() >= 16,
                IpNet::V6(n) => n.prefix_len() >= 10,
            };
            if allowed {
                prop_assert!(allow.iter().any(narrow), "{} opened by {:?}", address, allow);
            }
            let catch_all = vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()];
            prop_assert!(EgressPolicy::new(catch_all).check(address).is_err(), "{}", address);
        } else if allow.iter().any(|net| net.contains(&address)) {
            prop_assert!(allowed, "{} in {:?}", address, allow);
        }
    }
}
