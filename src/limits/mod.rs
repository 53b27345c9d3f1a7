//! Bounds on what one client may take, so that a hostile or broken client
//! cannot crowd out the others: a rate limiter (token buckets per key, in a
//! table of bounded size) and a count of open streams per client address.
//! The stream plane (`stream::limits`) and the control plane
//! (`control::auth`) apply them; this module knows nothing of HTTP.
//!
//! Addresses are counted per host for IPv4 and per /64 network for IPv6
//! (one subscriber line usually gets a whole /64), see [`ip_key`].

pub mod per_ip;
pub mod rate;

use std::net::{IpAddr, Ipv6Addr};

pub use per_ip::{StreamCounts, StreamSlot};
pub use rate::RateLimiter;

/// The key an address is limited under: the IPv4 address itself, or the
/// /64 network of an IPv6 address.
pub fn ip_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(bits))
        }
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_counts_per_slash_64() {
        let k = |s: &str| ip_key(s.parse().unwrap()).to_string();
        assert_eq!(k("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::");
        assert_eq!(k("2001:db8:1:2:bbbb::9"), "2001:db8:1:2::");
        assert_eq!(k("203.0.113.7"), "203.0.113.7");
        assert_eq!(k("::ffff:203.0.113.7"), "203.0.113.7");
    }
}
