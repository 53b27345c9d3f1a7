//! Who the client is: the TCP peer's address or, when the peer is a trusted
//! proxy (`--trusted-proxy`), the address the proxies forwarded in
//! `X-Forwarded-For`.
//!
//! The header is read from the right: each proxy appends the address it
//! received the request from, so the rightmost address that is not itself a
//! trusted proxy is the client. Whatever a client wrote into the header
//! itself sits further left and is never believed. From a peer that is not
//! trusted the header is ignored.

use std::net::IpAddr;

use http::HeaderMap;
use ipnet::IpNet;

/// The networks whose `X-Forwarded-For` is believed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    pub fn new(nets: Vec<IpNet>) -> Self {
        TrustedProxies(nets)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn trusts(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.0.iter().any(|n| n.contains(&ip))
    }

    /// The client's address for a request that came from `peer`.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let peer = peer.to_canonical();
        if !self.trusts(peer) {
            return peer;
        }
        // Every X-Forwarded-For header, in order, as one list.
        let hops: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .flat_map(|v| v.to_str().unwrap_or("").split(','))
            .collect();
        let mut client = peer;
        for hop in hops.iter().rev() {
            match parse_hop(hop) {
                Some(ip) if self.trusts(ip) => client = ip,
                Some(ip) => return ip,
                // Unreadable: nothing left of it can be believed; the
                // nearest trusted hop is as far as we know.
                None => return client,
            }
        }
        client
    }
}

/// One `X-Forwarded-For` entry: an address, tolerating `ip:port` and
/// `[v6]:port`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    if let Ok(sock) = hop.parse::<std::net::SocketAddr>() {
        return Some(sock.ip().to_canonical());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use proptest::prelude::*;

    fn proxies(nets: &[&str]) -> TrustedProxies {
        TrustedProxies::new(nets.iter().map(|n| n.parse().unwrap()).collect())
    }

    fn xff(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn untrusted_peers_are_the_client() {
        let p = proxies(&["10.0.0.0/8"]);
        let h = xff(&["203.0.113.9"]);
        assert_eq!(p.client_ip(ip("192.0.2.1"), &h), ip("192.0.2.1"));
        assert_eq!(
            TrustedProxies::default().client_ip(ip("10.0.0.1"), &h),
            ip("10.0.0.1")
        );
    }

    #[test]
    fn trusted_peers_forward_the_rightmost_untrusted_hop() {
        let p = proxies(&["10.0.0.0/8", "::1/128"]);
        let peer = ip("10.0.0.5");
        assert_eq!(p.client_ip(peer, &xff(&["203.0.113.9"])), ip("203.0.113.9"));
        // A client-written entry on the left is ignored.
        assert_eq!(
            p.client_ip(peer, &xff(&["1.2.3.4, 203.0.113.9, 10.0.0.7"])),
            ip("203.0.113.9")
        );
        assert_eq!(
            p.client_ip(peer, &xff(&["1.2.3.4", "203.0.113.9"])),
            ip("203.0.113.9")
        );
        assert_eq!(p.client_ip(peer, &HeaderMap::new()), peer);
        assert_eq!(p.client_ip(peer, &xff(&["10.0.0.9"])), ip("10.0.0.9"));
        assert_eq!(
            p.client_ip(peer, &xff(&["1.2.3.4, junk, 10.0.0.9"])),
            ip("10.0.0.9")
        );
        assert_eq!(p.client_ip(peer, &xff(&["junk"])), peer);
        assert_eq!(
            p.client_ip(peer, &xff(&["[2001:db8::1]:443"])),
            ip("2001:db8::1")
        );
        assert_eq!(
            p.client_ip(peer, &xff(&["203.0.113.9:5000"])),
            ip("203.0.113.9")
        );
        // IPv4-mapped peers match IPv4 networks.
        assert_eq!(
            p.client_ip(ip("::ffff:10.0.0.5"), &xff(&["203.0.113.9"])),
            ip("203.0.113.9")
        );
    }

    proptest! {
        #[test]
        fn never_panics_on_any_header(
            entries in proptest::collection::vec("\\PC{0,20}", 0..6),
        ) {
            let p = proxies(&["10.0.0.0/8"]);
            let joined = entries.join(",");
            if let Ok(v) = HeaderValue::from_str(&joined) {
                let mut h = HeaderMap::new();
                h.insert("x-forwarded-for", v);
                let _ = p.client_ip(ip("10.0.0.1"), &h);
            }
        }
    }
}
