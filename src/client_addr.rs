//! Who the client is: the address that per-address limits count and logs
//! name.
//!
//! Without `trusted_proxies` it is the TCP peer, and `X-Forwarded-For` is
//! ignored (a client could otherwise name any address and escape its
//! limits). When the peer is in one of the trusted CIDRs (a load balancer,
//! an ingress), the client is the right-most address of `X-Forwarded-For`
//! that is not itself a trusted proxy: each proxy appends the address it
//! received the request from, so everything right of the first untrusted
//! hop was written by our own proxies and everything left of it may be
//! forged. An entry that does not parse stops the walk: the client is then
//! the last trusted hop (so a garbled header cannot name anyone).
//!
//! Behind a load balancer that speaks the PROXY protocol (v1 or v2,
//! `proxy_protocol`), a trusted peer's connection opens with a header
//! naming the client ([`read_proxy_header`], parsed by the `ppp` crate);
//! that client then stands for the peer everywhere (and if it is itself a
//! trusted proxy, its `X-Forwarded-For` is read as above). Untrusted peers
//! are never asked for one.
//!
//! Limits count IPv6 clients per /64 ([`AddrKey`]): one subscriber line or
//! host usually has a whole /64, and counting single addresses would let it
//! take 2^64 of them.

use std::net::{IpAddr, Ipv6Addr};

use axum::http::HeaderMap;
use ipnet::IpNet;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::error::{Error, Result};

/// Parse `--trusted-proxies`: CIDRs, or bare addresses (a /32 or /128).
pub fn parse_cidrs(name: &str, items: Vec<String>) -> Result<Vec<IpNet>> {
    items
        .iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                .map(|n| n.trunc())
                .map_err(|_| {
                    Error::Config(format!(
                        "{name}: {s:?} is not a CIDR (e.g. 10.0.0.0/8) or an address"
                    ))
                })
        })
        .collect()
}

/// An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, as a dual-stack listener
/// reports IPv4 peers) as the IPv4 address it is.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Whether `ip` is one of the trusted proxies.
pub fn is_trusted(trusted: &[IpNet], ip: IpAddr) -> bool {
    let ip = canonical(ip);
    trusted.iter().any(|n| n.contains(&ip))
}

/// The client behind a trusted `peer`, from `X-Forwarded-For` (see the
/// module docs); `peer` itself when the header is absent, the left-most
/// entry when every entry is a trusted proxy. Every `X-Forwarded-For`
/// line counts, in order.
pub fn forwarded_client(trusted: &[IpNet], peer: IpAddr, headers: &HeaderMap) -> IpAddr {
    let mut client = canonical(peer);
    let lines: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .map(|v| v.to_str().unwrap_or(""))
        .collect();
    for entry in lines.iter().rev().flat_map(|l| l.rsplit(',')) {
        let Some(ip) = parse_entry(entry) else {
            return client;
        };
        client = canonical(ip);
        if !is_trusted(trusted, client) {
            return client;
        }
    }
    client
}

/// One `X-Forwarded-For` entry: an address, `a.b.c.d:port`, `[v6]` or
/// `[v6]:port`.
fn parse_entry(entry: &str) -> Option<IpAddr> {
    let e = entry.trim();
    if let Ok(ip) = e.parse() {
        return Some(ip);
    }
    if let Some(rest) = e.strip_prefix('[') {
        return rest.split_once(']')?.0.parse().ok();
    }
    let (host, port) = e.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    host.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

/// Longest PROXY protocol v1 header (the specification's bound).
const V1_MAX: usize = 107;
/// The 12-byte signature of a PROXY protocol v2 header.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// Largest v2 header accepted (16 bytes + addresses + TLVs); the
/// specification allows 64 KiB of TLVs, load balancers send a few hundred
/// bytes.
const V2_MAX: usize = 4096;

/// Read exactly the PROXY protocol header (v1 or v2) at the start of
/// `tcp`, leaving what follows (the HTTP request) unread. `Some(client)`
/// for a proxied TCP connection; `None` for `LOCAL`/`UNKNOWN` (the proxy
/// speaking for itself); an error for anything else.
pub async fn read_proxy_header(tcp: &mut TcpStream) -> std::io::Result<Option<IpAddr>> {
    use std::io::{Error as IoError, ErrorKind};
    let bad = |why: &str| IoError::new(ErrorKind::InvalidData, why.to_string());
    // 15 bytes: the shortest v1 header ("PROXY UNKNOWN\r\n"), and less
    // than a v2 header's fixed part.
    let mut head = vec![0u8; 15];
    tcp.read_exact(&mut head).await?;
    if head.starts_with(V2_SIGNATURE) {
        head.resize(16, 0);
        tcp.read_exact(&mut head[15..]).await?;
        let len = usize::from(u16::from_be_bytes([head[14], head[15]]));
        if 16 + len > V2_MAX {
            return Err(bad("PROXY v2 header too long"));
        }
        head.resize(16 + len, 0);
        tcp.read_exact(&mut head[16..]).await?;
        let header = ppp::v2::Header::try_from(&head[..]).map_err(|e| bad(&e.to_string()))?;
        return Ok(match (header.command, header.addresses) {
            (ppp::v2::Command::Local, _) => None,
            (_, ppp::v2::Addresses::IPv4(a)) => Some(IpAddr::V4(a.source_address)),
            (_, ppp::v2::Addresses::IPv6(a)) => Some(IpAddr::V6(a.source_address)),
            _ => None,
        });
    }
    if !head.starts_with(b"PROXY ") {
        return Err(bad("no PROXY protocol header"));
    }
    // v1: up to CRLF. Peek at what has arrived and take exactly the
    // header's bytes.
    while !head.ends_with(b"\r\n") {
        if head.len() >= V1_MAX {
            return Err(bad("PROXY v1 header too long"));
        }
        let mut more = [0u8; V1_MAX];
        let room = V1_MAX - head.len();
        let n = tcp.peek(&mut more[..room]).await?;
        if n == 0 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        let take = more[..n]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(n, |i| i + 1);
        tcp.read_exact(&mut more[..take]).await?;
        head.extend_from_slice(&more[..take]);
    }
    let header = ppp::v1::Header::try_from(&head[..]).map_err(|e| bad(&e.to_string()))?;
    Ok(match header.addresses {
        ppp::v1::Addresses::Tcp4(a) => Some(IpAddr::V4(a.source_address)),
        ppp::v1::Addresses::Tcp6(a) => Some(IpAddr::V6(a.source_address)),
        ppp::v1::Addresses::Unknown => None,
    })
}

/// What per-address limits count: an IPv4 address, or an IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AddrKey(IpAddr);

impl AddrKey {
    pub fn of(ip: IpAddr) -> AddrKey {
        match canonical(ip) {
            IpAddr::V6(v6) => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                AddrKey(IpAddr::V6(Ipv6Addr::from(bits)))
            }
            v4 => AddrKey(v4),
        }
    }
}

impl std::fmt::Display for AddrKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
            v4 => write!(f, "{v4}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn xff(lines: &[&'static str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for l in lines {
            h.append("x-forwarded-for", HeaderValue::from_static(l));
        }
        h
    }

    #[test]
    fn cidrs_and_bare_addresses_parse() {
        let t = parse_cidrs("t", vec!["10.1.2.3/8".into(), " ::1 ".into(), "".into()]).unwrap();
        assert_eq!(t.len(), 2);
        assert!(is_trusted(&t, ip("10.200.0.1")));
        assert!(is_trusted(&t, ip("::ffff:10.0.0.9")), "mapped IPv4");
        assert!(is_trusted(&t, ip("::1")));
        assert!(!is_trusted(&t, ip("11.0.0.1")));
        let err = parse_cidrs("trusted_proxies", vec!["10.0.0.0/33".into()]).unwrap_err();
        assert!(err.to_string().contains("trusted_proxies"), "{err}");
    }

    #[test]
    fn the_right_most_untrusted_hop_is_the_client() {
        let t = parse_cidrs("t", vec!["10.0.0.0/8".into()]).unwrap();
        let peer = ip("10.0.0.1");
        // The client forged the first entry; our proxies appended the rest.
        let h = xff(&["6.6.6.6, 1.2.3.4", "10.0.0.7"]);
        assert_eq!(forwarded_client(&t, peer, &h), ip("1.2.3.4"));
        assert_eq!(forwarded_client(&t, peer, &HeaderMap::new()), peer);
        assert_eq!(
            forwarded_client(&t, peer, &xff(&["10.0.0.9"])),
            ip("10.0.0.9")
        );
        // Ports and brackets are tolerated; garbage stops the walk.
        assert_eq!(
            forwarded_client(&t, peer, &xff(&["1.2.3.4:5678"])),
            ip("1.2.3.4")
        );
        assert_eq!(
            forwarded_client(&t, peer, &xff(&["[2001:db8::1]:443"])),
            ip("2001:db8::1")
        );
        assert_eq!(
            forwarded_client(&t, peer, &xff(&["1.2.3.4, bogus, 10.0.0.5"])),
            ip("10.0.0.5")
        );
    }

    #[test]
    fn ipv6_counts_per_64() {
        assert_eq!(
            AddrKey::of(ip("2001:db8:1:2:aaaa::1")),
            AddrKey::of(ip("2001:db8:1:2:bbbb::9"))
        );
        assert_ne!(
            AddrKey::of(ip("2001:db8:1:2::1")),
            AddrKey::of(ip("2001:db8:1:3::1"))
        );
        assert_eq!(
            AddrKey::of(ip("::ffff:1.2.3.4")),
            AddrKey::of(ip("1.2.3.4"))
        );
        assert_eq!(AddrKey::of(ip("2001:db8::1")).to_string(), "2001:db8::/64");
    }
}
