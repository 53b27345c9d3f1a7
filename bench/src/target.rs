//! Where the streams go: the stream URL template taken apart once, the
//! request each stream sends, and the source addresses streams connect from.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// One stream URL: where it connects and what it asks for.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    authority: String,
    /// Path and query, with `{topic}` still in it.
    path: String,
}

/// The stream side of the server(s) under test: one endpoint per replica.
#[derive(Debug, Clone)]
pub struct Target {
    pub endpoints: Vec<Endpoint>,
    /// Topics, so that consecutive streams of one topic go to different
    /// endpoints (every replica gets every topic).
    topics: usize,
    /// Source addresses to bind before connecting (empty: let the kernel
    /// choose).
    pub sources: Vec<IpAddr>,
    /// The kernel's ephemeral port range, which source ports are taken from.
    ports: (u16, u16),
}

/// The topic of stream or event number `i`.
pub fn topic_name(i: u64, topics: usize) -> String {
    format!("bench-{}", i % topics.max(1) as u64)
}

impl Target {
    /// Parses `http://host[:port]/path?query[,http://…]` (several URLs
    /// separated by commas: one per replica) and resolves the hosts.
    /// `source_addrs`: see `--source-addrs`; `streams`: the run's total.
    pub async fn resolve(
        urls: &str,
        source_addrs: u8,
        streams: usize,
        topics: usize,
    ) -> Result<Target, String> {
        let mut endpoints = Vec::new();
        for url in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
            endpoints.push(Endpoint::resolve(url).await?);
        }
        if endpoints.is_empty() {
            return Err("no stream URL".into());
        }
        let loopback_v4 = endpoints
            .iter()
            .all(|e| matches!(e.addr.ip(), IpAddr::V4(ip) if ip.is_loopback()));
        let count = match source_addrs {
            0 if loopback_v4 => streams.div_ceil(25_000).clamp(1, 254),
            0 => 0,
            k if loopback_v4 => k as usize,
            _ => {
                return Err(format!(
                    "--source-addrs needs 127.x.x.x targets, not {urls}"
                ));
            }
        };
        // One address needs no explicit bind.
        let sources = if count > 1 {
            (1..=count as u8)
                .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, i)))
                .collect()
        } else {
            Vec::new()
        };
        Ok(Target {
            endpoints,
            topics: topics.max(1),
            sources,
            ports: ephemeral_ports(),
        })
    }

    /// The endpoint of stream `i` (a global stream number): streams of
    /// each topic are dealt round the endpoints in turn.
    pub fn endpoint(&self, i: usize) -> &Endpoint {
        &self.endpoints[(i / self.topics) % self.endpoints.len()]
    }

    /// The source address for stream `i`, if streams are spread.
    pub fn source(&self, i: usize) -> Option<IpAddr> {
        (!self.sources.is_empty()).then(|| self.sources[i % self.sources.len()])
    }

    /// A source port for stream `i`'s first connection, distinct from every
    /// other stream's on the same source address while one address has no
    /// more streams than the ephemeral range has ports. Binding port 0
    /// makes the kernel search for a free port among every one bound on
    /// the machine: past ~70,000 streams that search was most of a load
    /// process's CPU and streams opened at a few hundred a second.
    pub fn source_port(&self, i: usize) -> u16 {
        let (low, high) = self.ports;
        let span = usize::from(high - low) + 1;
        low + ((i / self.sources.len().max(1)) % span) as u16
    }
}

/// `net.ipv4.ip_local_port_range`, or Linux's default.
fn ephemeral_ports() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|p| p.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .filter(|(low, high)| low <= high)
        .unwrap_or((32768, 60999))
}

impl Endpoint {
    async fn resolve(url: &str) -> Result<Endpoint, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("{url:?}: only http:// stream URLs are supported"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.is_empty() || authority.contains('@') {
            return Err(format!("{url:?}: no usable host"));
        }
        let with_port = if authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host(&with_port)
            .await
            .map_err(|e| format!("cannot resolve {with_port}: {e}"))?
            .collect();
        let addr = addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or(addrs.first())
            .copied()
            .ok_or_else(|| format!("{with_port} resolves to no address"))?;
        Ok(Endpoint {
            addr,
            authority: authority.to_owned(),
            path: path.to_owned(),
        })
    }

    /// The request a stream sends for `topic`: with `Last-Event-ID` when
    /// `last_id` is not empty (a reconnect, as `EventSource` sends it).
    pub fn request(&self, topic: &str, last_id: &[u8]) -> Vec<u8> {
        let path = self.path.replace("{topic}", topic);
        let mut req = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n\
             Cache-Control: no-cache\r\nUser-Agent: streamline-bench\r\n",
            self.authority
        )
        .into_bytes();
        if !last_id.is_empty() {
            req.extend_from_slice(b"Last-Event-ID: ");
            req.extend_from_slice(last_id);
            req.extend_from_slice(b"\r\n");
        }
        req.extend_from_slice(b"\r\n");
        req
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn parses_and_spreads() {
        let t = Target::resolve("http://127.0.0.1:9/stream?topic={topic}", 3, 10, 1)
            .await
            .unwrap();
        assert_eq!(t.endpoint(7).addr, "127.0.0.1:9".parse().unwrap());
        let req = t.endpoint(0).request("bench-1", b"");
        assert!(req.starts_with(
            b"GET /stream?topic=bench-1 HTTP/1.1\r\nHost: 127.0.0.1:9\r\nAccept: text/event-stream\r\n"
        ));
        assert!(req.ends_with(b"streamline-bench\r\n\r\n"));
        let req = t.endpoint(0).request("bench-1", b"bench-1:5-0");
        assert!(req.ends_with(b"\r\nLast-Event-ID: bench-1:5-0\r\n\r\n"));
        assert_eq!(t.source(4), Some("127.0.0.2".parse().unwrap()));
        let t = Target::resolve("http://127.0.0.1:9/s", 0, 60_000, 1)
            .await
            .unwrap();
        assert_eq!(t.sources.len(), 3);
        let t = Target::resolve("http://127.0.0.1:9/s", 0, 100, 1)
            .await
            .unwrap();
        assert_eq!(t.source(5), None);
        assert!(Target::resolve("https://x/", 0, 1, 1).await.is_err());
        // Two replicas, two topics: each replica gets both topics.
        let t = Target::resolve("http://127.0.0.1:9/a,http://127.0.0.1:10/b", 0, 8, 2)
            .await
            .unwrap();
        let ports: Vec<u16> = (0..4).map(|i| t.endpoint(i).addr.port()).collect();
        assert_eq!(ports, [9, 9, 10, 10]);
        assert_eq!(topic_name(7, 3), "bench-1");
    }
}
