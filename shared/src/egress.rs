//! The SSRF guard: which IP addresses a delivery may connect to.
//!
//! Pure and synchronous. The sender resolves a callback host, runs every address through
//! [`EgressPolicy::check`] and connects only to the ones that pass, so the address that was vetted is
//! the address that is dialled (no DNS rebinding).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// What kind of address an IP is, as far as egress is concerned. Only [`AddressClass::Public`] is
/// reachable without an allow-list entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddressClass {
    /// Globally routable unicast.
    Public,
    /// 127.0.0.0/8, ::1.
    Loopback,
    /// RFC 1918 (10/8, 172.16/12, 192.168/16), unique local fc00::/7 and deprecated site-local
    /// fec0::/10.
    Private,
    /// 169.254.0.0/16, fe80::/10.
    LinkLocal,
    /// Carrier-grade NAT shared space, 100.64.0.0/10.
    Cgnat,
    /// 224.0.0.0/4, ff00::/8.
    Multicast,
    /// Cloud instance metadata endpoints (AWS, GCP, Azure, Oracle: 169.254.169.254; AWS IPv6:
    /// fd00:ec2::254; ECS/EKS credential agents: 169.254.170.2, 169.254.170.23, fd00:ec2::23;
    /// Alibaba: 100.100.100.200).
    Metadata,
    /// 0.0.0.0/8 ("this network"; Linux routes 0.0.0.0 to the local host) and ::.
    Unspecified,
    /// 255.255.255.255.
    Broadcast,
    /// 192.0.2/24, 198.51.100/24, 203.0.113/24, 2001:db8::/32, 3fff::/20.
    Documentation,
    /// Anything else that is not globally routable: 192.0.0/24, 198.18/15 (benchmarking), 240/4,
    /// 100::/64 (discard), 2001::/32 (Teredo), 2001:2::/48 (benchmarking), 64:ff9b:1::/48 (local
    /// NAT64), 5f00::/16 (SRv6) and IPv6 outside 2000::/3.
    Reserved,
}

impl fmt::Display for AddressClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Public => "public",
            Self::Loopback => "loopback",
            Self::Private => "private",
            Self::LinkLocal => "link-local",
            Self::Cgnat => "carrier-grade NAT",
            Self::Multicast => "multicast",
            Self::Metadata => "a cloud metadata endpoint",
            Self::Unspecified => "unspecified",
            Self::Broadcast => "broadcast",
            Self::Documentation => "a documentation address",
            Self::Reserved => "reserved",
        })
    }
}

/// Classifies an address. IPv6 forms that carry an IPv4 address the network will deliver to
/// (IPv4-mapped, IPv4-compatible, NAT64 64:ff9b::/96, 6to4 2002::/16) are classified by that IPv4
/// address, so `::ffff:127.0.0.1` is loopback.
pub fn classify(ip: IpAddr) -> AddressClass {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => match embedded_v4(v6) {
            Some(v4) => classify_v4(v4),
            None => classify_v6(v6),
        },
    }
}

fn classify_v4(ip: Ipv4Addr) -> AddressClass {
    use AddressClass::*;
    // AWS, Azure, GCP, Oracle and others; ECS task credentials; EKS pod identity; Alibaba;
    // Oracle Cloud Classic; Scaleway.
    const METADATA: [Ipv4Addr; 6] = [
        Ipv4Addr::new(169, 254, 169, 254),
        Ipv4Addr::new(169, 254, 170, 2),
        Ipv4Addr::new(169, 254, 170, 23),
        Ipv4Addr::new(100, 100, 100, 200),
        Ipv4Addr::new(192, 0, 0, 192),
        Ipv4Addr::new(169, 254, 42, 42),
    ];
    let [a, b, c, _] = ip.octets();
    if METADATA.contains(&ip) {
        return Metadata;
    }
    match (a, b, c) {
        (0, ..) => Unspecified,
        (127, ..) => Loopback,
        (10, ..) | (172, 16..=31, _) | (192, 168, _) => Private,
        (169, 254, _) => LinkLocal,
        (100, 64..=127, _) => Cgnat,
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => Documentation,
        (192, 0, 0) | (198, 18..=19, _) => Reserved,
        (224..=239, ..) => Multicast,
        _ if ip == Ipv4Addr::BROADCAST => Broadcast,
        (240..=255, ..) => Reserved,
        _ => Public,
    }
}

fn classify_v6(ip: Ipv6Addr) -> AddressClass {
    use AddressClass::*;
    // AWS IMDS and EKS pod identity, GCP, Scaleway.
    const METADATA: [Ipv6Addr; 4] = [
        Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254),
        Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x23),
        Ipv6Addr::new(0xfd20, 0xce, 0, 0, 0, 0, 0, 0x254),
        Ipv6Addr::new(0xfd00, 0x42, 0, 0, 0, 0, 0, 0x42),
    ];
    if METADATA.contains(&ip) {
        return Metadata;
    }
    if ip.is_unspecified() {
        return Unspecified;
    }
    if ip.is_loopback() {
        return Loopback;
    }
    let s = ip.segments();
    match s {
        [0xff00..=0xffff, ..] => Multicast,
        [0xfe80..=0xfebf, ..] => LinkLocal,
        [0xfc00..=0xfdff, ..] | [0xfec0..=0xfeff, ..] => Private,
        [0x2001, 0xdb8, ..] | [0x3fff, 0..=0x0fff, ..] => Documentation,
        // Teredo and benchmarking; Teredo's embedded address is obfuscated, so refuse it outright.
        [0x2001, 0, ..] | [0x2001, 2, 0, ..] => Reserved,
        // Only 2000::/3 is allocated as global unicast; the rest (100::/64, 64:ff9b:1::/48,
        // 5f00::/16, unassigned space) is reserved.
        [0x2000..=0x3fff, ..] => Public,
        _ => Reserved,
    }
}

/// The IPv4 address an IPv6 address delivers to, for the forms that embed one.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let low = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    match s {
        // :: and ::1 are IPv6's own unspecified and loopback, not IPv4-compatible 0.0.0.0/0.0.0.1.
        [0, 0, 0, 0, 0, 0, 0, 0 | 1] => None,
        // IPv4-compatible (::a.b.c.d) and IPv4-mapped (::ffff:a.b.c.d).
        [0, 0, 0, 0, 0, 0 | 0xffff, hi, lo] => Some(low(hi, lo)),
        // NAT64 well-known prefix (RFC 6052).
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => Some(low(hi, lo)),
        // 6to4 (RFC 3056): 2002:AABB:CCDD::/48.
        [0x2002, hi, lo, ..] => Some(low(hi, lo)),
        _ => None,
    }
}

/// The address to compare against allow-list entries: the embedded IPv4 address when there is one.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => embedded_v4(v6).map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

/// Why an address was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("callback address {ip} is {class} and not in the allow-list")]
pub struct EgressRefusal {
    pub ip: IpAddr,
    pub class: AddressClass,
}

/// Which addresses deliveries may reach: every public address, plus non-public ones covered by the
/// allow-list.
///
/// Link-local and metadata addresses hand out cloud credentials, so a broad entry such as
/// `0.0.0.0/0` or `fc00::/7` does not unlock them: a link-local address needs an entry of at
/// least /16 (IPv4) or /10 (IPv6) that covers it, and a metadata address an entry that names it
/// exactly (`169.254.169.254` or `169.254.169.254/32`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EgressPolicy {
    allow: Vec<IpNet>,
}

/// Evaluated at compile time, so a malformed entry fails the build rather than a request.
const LOCAL_DEVELOPMENT: [IpNet; 2] = [
    IpNet::V4(Ipv4Net::new_assert(Ipv4Addr::new(127, 0, 0, 0), 8)),
    IpNet::V6(Ipv6Net::new_assert(Ipv6Addr::LOCALHOST, 128)),
];

/// Shortest prefix that may unlock link-local or metadata addresses, per family.
const MIN_SENSITIVE_PREFIX_V4: u8 = 16;
const MIN_SENSITIVE_PREFIX_V6: u8 = 10;

impl EgressPolicy {
    /// Public addresses only: the production setting.
    pub fn strict() -> Self {
        Self { allow: Vec::new() }
    }

    pub fn new(allow: Vec<IpNet>) -> Self {
        Self { allow }
    }

    /// Loopback only, for a receiver on the developer's own machine (`tidings listen`). Every
    /// tenant of a local deployment could otherwise make it POST to the services of its network
    /// and read their answers in the attempt log: private ranges need an explicit entry.
    pub fn local_development() -> Self {
        Self {
            allow: LOCAL_DEVELOPMENT.to_vec(),
        }
    }

    pub fn allow_list(&self) -> &[IpNet] {
        &self.allow
    }

    pub fn check(&self, ip: IpAddr) -> Result<(), EgressRefusal> {
        let class = classify(ip);
        if class == AddressClass::Public {
            return Ok(());
        }
        let canonical = canonical(ip);
        let allowed = if class == AddressClass::Metadata {
            // Only an entry naming it, in its own family: `::/0` covering
            // `::ffff:169.254.169.254` is still a catch-all.
            self.allow
                .iter()
                .any(|net| net.contains(&canonical) && net.prefix_len() == net.max_prefix_len())
        } else if class == AddressClass::LinkLocal {
            // Only a narrow entry in the address's own family counts.
            self.allow.iter().any(|net| {
                net.contains(&canonical)
                    && match net {
                        IpNet::V4(n) => n.prefix_len() >= MIN_SENSITIVE_PREFIX_V4,
                        IpNet::V6(n) => n.prefix_len() >= MIN_SENSITIVE_PREFIX_V6,
                    }
            })
        } else {
            self.allow
                .iter()
                .any(|net| net.contains(&ip) || net.contains(&canonical))
        };
        if allowed {
            Ok(())
        } else {
            Err(EgressRefusal { ip, class })
        }
    }
}

/// An allow-list entry that is neither an IP address nor a CIDR.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid allow-list entry `{entry}`: expected an IP address or CIDR such as 10.0.0.0/8")]
pub struct CidrListError {
    pub entry: String,
}

/// Parses a comma-separated list such as `127.0.0.0/8, ::1/128`. A bare address means a single
/// host (/32 or /128); empty entries are skipped, so an empty string is an empty list.
pub fn parse_cidr_list(s: &str) -> Result<Vec<IpNet>, CidrListError> {
    s.split(',')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            entry
                .parse::<IpNet>()
                .map(|net| net.trunc())
                .or_else(|_| entry.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| CidrListError {
                    entry: entry.to_owned(),
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use AddressClass::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn nets(s: &str) -> Vec<IpNet> {
        parse_cidr_list(s).unwrap()
    }

    #[test]
    fn classifies_every_class_in_both_families() {
        let table = [
            // Public
            ("8.8.8.8", Public),
            ("1.1.1.1", Public),
            ("172.32.0.1", Public),
            ("100.128.0.1", Public),
            ("169.255.0.1", Public),
            ("223.255.255.255", Public),
            ("2606:4700:4700::1111", Public),
            ("2a00:1450:4001::1", Public),
            ("::ffff:8.8.8.8", Public),
            ("64:ff9b::808:808", Public),
            ("2002:808:808::1", Public),
            // Loopback
            ("127.0.0.1", Loopback),
            ("127.255.255.254", Loopback),
            ("::1", Loopback),
            ("::ffff:127.0.0.1", Loopback),
            ("::127.0.0.1", Loopback),
            ("64:ff9b::7f00:1", Loopback),
            ("2002:7f00:1::", Loopback),
            // Private
            ("10.0.0.1", Private),
            ("172.16.0.1", Private),
            ("172.31.255.255", Private),
            ("192.168.1.1", Private),
            ("fc00::1", Private),
            ("fd12:3456::1", Private),
            ("fec0::1", Private),
            ("::ffff:10.0.0.1", Private),
            ("::ffff:192.168.0.1", Private),
            ("2002:c0a8:1::1", Private),
            // Link-local
            ("169.254.0.1", LinkLocal),
            ("169.254.169.253", LinkLocal),
            ("fe80::1", LinkLocal),
            ("febf::1", LinkLocal),
            ("::ffff:169.254.1.1", LinkLocal),
            // CGNAT
            ("100.64.0.1", Cgnat),
            ("100.127.255.255", Cgnat),
            ("::ffff:100.64.0.1", Cgnat),
            // Multicast
            ("224.0.0.1", Multicast),
            ("239.255.255.250", Multicast),
            ("ff02::1", Multicast),
            ("ff0e::1", Multicast),
            ("::ffff:224.0.0.1", Multicast),
            // Metadata
            ("169.254.169.254", Metadata),
            ("169.254.170.2", Metadata),
            ("100.100.100.200", Metadata),
            ("fd00:ec2::254", Metadata),
            ("::ffff:169.254.169.254", Metadata),
            ("::169.254.169.254", Metadata),
            ("64:ff9b::a9fe:a9fe", Metadata),
            ("2002:a9fe:a9fe::", Metadata),
            // Unspecified
            ("0.0.0.0", Unspecified),
            ("0.1.2.3", Unspecified),
            ("::", Unspecified),
            ("::ffff:0.0.0.0", Unspecified),
            // Broadcast
            ("255.255.255.255", Broadcast),
            ("::ffff:255.255.255.255", Broadcast),
            // Documentation
            ("192.0.2.1", Documentation),
            ("198.51.100.1", Documentation),
            ("203.0.113.1", Documentation),
            ("2001:db8::1", Documentation),
            ("3fff::1", Documentation),
            // Reserved
            ("192.0.0.1", Reserved),
            ("198.18.0.1", Reserved),
            ("198.19.255.255", Reserved),
            ("240.0.0.1", Reserved),
            ("255.255.255.254", Reserved),
            ("100::1", Reserved),
            ("2001::1", Reserved),
            ("2001:2::1", Reserved),
            ("64:ff9b:1::1", Reserved),
            ("4000::1", Reserved),
            ("5f00::1", Reserved),
            ("::ffff:198.18.0.1", Reserved),
        ];
        for (addr, want) in table {
            assert_eq!(classify(ip(addr)), want, "{addr}");
        }
    }

    #[test]
    fn url_normalised_hosts_classify_as_their_address() {
        // The sender relies on the url crate turning these shorthand forms into IP literals.
        for (raw, want) in [
            ("http://127.1/", Loopback),
            ("http://0x7f000001/", Loopback),
            ("http://2130706433/", Loopback),
            ("http://[::ffff:127.0.0.1]/", Loopback),
            ("http://[::ffff:a9fe:a9fe]/", Metadata),
        ] {
            let url = url::Url::parse(raw).unwrap();
            let host = match url.host().unwrap() {
                url::Host::Ipv4(v4) => IpAddr::V4(v4),
                url::Host::Ipv6(v6) => IpAddr::V6(v6),
                url::Host::Domain(d) => panic!("{raw} parsed as domain {d}"),
            };
            assert_eq!(classify(host), want, "{raw}");
        }
    }

    #[test]
    fn strict_allows_only_public() {
        let policy = EgressPolicy::strict();
        for addr in ["8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"] {
            assert_eq!(policy.check(ip(addr)), Ok(()), "{addr}");
        }
        for addr in [
            "127.0.0.1",
            "::1",
            "::ffff:127.0.0.1",
            "10.0.0.1",
            "::ffff:10.0.0.1",
            "169.254.169.254",
            "fd00:ec2::254",
            "100.100.100.200",
            "100.64.0.1",
            "0.0.0.0",
            "::",
            "224.0.0.1",
            "255.255.255.255",
            "192.0.2.1",
            "240.0.0.1",
        ] {
            assert!(policy.check(ip(addr)).is_err(), "{addr}");
        }
    }

    #[test]
    fn local_development_allows_loopback_only() {
        let policy = EgressPolicy::local_development();
        for addr in [
            "127.0.0.1",
            "127.1.2.3",
            "::1",
            "::ffff:127.0.0.1",
            "8.8.8.8",
        ] {
            assert_eq!(policy.check(ip(addr)), Ok(()), "{addr}");
        }
        for addr in [
            "10.1.2.3",
            "::ffff:10.0.0.1",
            "172.20.0.1",
            "192.168.0.10",
            "fd12::1",
            "169.254.169.254",
            "::ffff:169.254.169.254",
            "169.254.1.1",
            "fe80::1",
            "fd00:ec2::254",
            "fd20:ce::254",
            "100.100.100.200",
            "100.64.0.1",
            "0.0.0.0",
        ] {
            assert!(policy.check(ip(addr)).is_err(), "{addr}");
        }
    }

    #[test]
    fn metadata_needs_a_narrow_explicit_entry() {
        let metadata = ip("169.254.169.254");
        let mapped = ip("::ffff:169.254.169.254");
        for catch_all in [
            "0.0.0.0/0",
            "128.0.0.0/1",
            "169.0.0.0/8",
            "::/0",
            "::ffff:0:0/96",
        ] {
            let policy = EgressPolicy::new(nets(catch_all));
            assert!(policy.check(metadata).is_err(), "{catch_all}");
            assert!(policy.check(mapped).is_err(), "{catch_all} (mapped)");
        }
        for exact in ["169.254.169.254/32", "169.254.169.254"] {
            let policy = EgressPolicy::new(nets(exact));
            assert_eq!(policy.check(metadata), Ok(()), "{exact}");
            assert_eq!(policy.check(mapped), Ok(()), "{exact} (mapped)");
        }
        // A range that merely covers it, however narrow, does not name it.
        for range in ["169.254.0.0/16", "169.254.169.0/24", "169.254.169.254/31"] {
            let policy = EgressPolicy::new(nets(range));
            assert!(policy.check(metadata).is_err(), "{range}");
        }
        for v6 in ["fd00:ec2::254", "fd20:ce::254", "fd00:42::42"] {
            assert_eq!(classify(ip(v6)), AddressClass::Metadata, "{v6}");
            assert!(EgressPolicy::new(nets("fc00::/7")).check(ip(v6)).is_err());
            assert!(
                EgressPolicy::new(nets("fd00::/8, fd20::/16"))
                    .check(ip(v6))
                    .is_err()
            );
            assert_eq!(EgressPolicy::new(nets(v6)).check(ip(v6)), Ok(()));
        }
        let link_local = ip("fe80::1");
        assert!(EgressPolicy::new(nets("::/0")).check(link_local).is_err());
        assert_eq!(
            EgressPolicy::new(nets("fe80::/10")).check(link_local),
            Ok(())
        );
    }

    #[test]
    fn catch_all_unlocks_other_non_public_classes() {
        let policy = EgressPolicy::new(nets("0.0.0.0/0, ::/0"));
        for addr in [
            "127.0.0.1",
            "10.0.0.1",
            "::ffff:10.0.0.1",
            "100.64.0.1",
            "::1",
        ] {
            assert_eq!(policy.check(ip(addr)), Ok(()), "{addr}");
        }
    }

    #[test]
    fn refusal_message_names_address_and_class() {
        let err = EgressPolicy::strict().check(ip("127.0.0.1")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "callback address 127.0.0.1 is loopback and not in the allow-list"
        );
        assert_eq!(err.class, Loopback);
        let err = EgressPolicy::strict()
            .check(ip("169.254.169.254"))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "callback address 169.254.169.254 is a cloud metadata endpoint and not in the allow-list"
        );
    }

    #[test]
    fn parses_cidr_lists() {
        assert_eq!(parse_cidr_list(""), Ok(vec![]));
        assert_eq!(parse_cidr_list("  "), Ok(vec![]));
        assert_eq!(
            parse_cidr_list("127.0.0.0/8, ::1/128"),
            Ok(vec![
                "127.0.0.0/8".parse().unwrap(),
                "::1/128".parse().unwrap()
            ])
        );
        assert_eq!(
            parse_cidr_list("10.0.0.5,fd00::1,"),
            Ok(vec![
                "10.0.0.5/32".parse().unwrap(),
                "fd00::1/128".parse().unwrap()
            ])
        );
        // Host bits are dropped so the list reads as the networks it means.
        assert_eq!(
            parse_cidr_list("10.1.2.3/8"),
            Ok(vec!["10.0.0.0/8".parse().unwrap()])
        );
        for bad in [
            "localhost",
            "10.0.0.0/33",
            "::1/129",
            "10.0.0",
            "127.0.0.0/8; ::1",
        ] {
            let err = parse_cidr_list(bad).unwrap_err();
            assert!(
                err.to_string().contains("invalid allow-list entry"),
                "{bad}"
            );
        }
        assert_eq!(
            parse_cidr_list("127.0.0.0/8, nope").unwrap_err().entry,
            "nope"
        );
    }
}
