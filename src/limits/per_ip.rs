//! Open streams per client address (`--max-streams-per-ip`): a slot is
//! taken when a stream opens and given back when it ends. The table holds
//! only addresses with open streams, so it is bounded by `--max-clients`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use super::ip_key;

#[derive(Debug)]
pub struct StreamCounts {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One open stream's place in its address's count; dropping it gives the
/// place back.
#[derive(Debug)]
pub struct StreamSlot {
    counts: Arc<StreamCounts>,
    key: IpAddr,
}

impl StreamCounts {
    /// `None` when `max` is 0 (no limit).
    pub fn new(max: usize) -> Option<Arc<Self>> {
        (max > 0).then(|| {
            Arc::new(StreamCounts {
                max,
                open: Mutex::new(HashMap::new()),
            })
        })
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// A slot for a stream from `ip`, unless it already has `max` open.
    pub fn acquire(self: &Arc<Self>, ip: IpAddr) -> Option<StreamSlot> {
        let key = ip_key(ip);
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(key).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(StreamSlot {
            counts: self.clone(),
            key,
        })
    }

    /// Open streams from `ip` now.
    pub fn open(&self, ip: IpAddr) -> usize {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.get(&ip_key(ip)).copied().unwrap_or(0)
    }

    /// Addresses with open streams.
    pub fn addresses(&self) -> usize {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.counts.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_address_and_gives_back() {
        let c = StreamCounts::new(2).unwrap();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let s1 = c.acquire(a).unwrap();
        let _s2 = c.acquire(a).unwrap();
        assert!(c.acquire(a).is_none());
        let _s3 = c.acquire(b).unwrap();
        drop(s1);
        assert_eq!(c.open(a), 1);
        let _s4 = c.acquire(a).unwrap();
        drop((_s2, _s3, _s4));
        assert_eq!(c.addresses(), 0, "empty entries are removed");
        assert!(StreamCounts::new(0).is_none());
    }
}
