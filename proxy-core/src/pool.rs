//! Bookkeeping for idle upstream keep-alive connections, generic over the connection type so
//! that every adapter shares one implementation. Pure: the adapter passes the time and checks a
//! connection's liveness itself; this only decides which connection to hand out, which ones are
//! too old, and which ones exceed the per-peer cap.
//!
//! Upgraded connections never enter the pool: the session releases them with
//! `reusable: false`.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::time::{Duration, Instant};

use crate::config::Peer;

/// Idle connections per peer, most recently used first out (warm connections are the least
/// likely to have been closed by the peer's own idle timeout).
#[derive(Debug)]
pub struct IdlePool<C> {
    peers: HashMap<Peer, VecDeque<(C, Instant)>, BuildHasherDefault<PeerHasher>>,
    idle_timeout: Duration,
    max_per_peer: usize,
    len: usize,
}

impl<C> IdlePool<C> {
    /// A pool keeping at most `max_per_peer` idle connections per peer, each for at most
    /// `idle_timeout`. `max_per_peer == 0` disables pooling.
    pub fn new(idle_timeout: Duration, max_per_peer: usize) -> Self {
        IdlePool {
            peers: HashMap::default(),
            idle_timeout,
            max_per_peer,
            len: 0,
        }
    }

    /// Number of idle connections held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no connection is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Offers a released connection. Returns the connection the caller must close: `conn`
    /// itself when pooling is off, or the oldest idle connection when the peer is at its cap.
    pub fn put(&mut self, peer: &Peer, conn: C, now: Instant) -> Option<C> {
        if self.max_per_peer == 0 || self.idle_timeout.is_zero() {
            return Some(conn);
        }
        let list = self.peers.entry(peer.clone()).or_default();
        list.push_front((conn, now));
        self.len += 1;
        if list.len() > self.max_per_peer {
            self.len -= 1;
            return list.pop_back().map(|(c, _)| c);
        }
        None
    }

    /// The most recently released connection to `peer` that has not exceeded the idle timeout.
    /// Expired connections met on the way are dropped (closing them, for socket types).
    pub fn take(&mut self, peer: &Peer, now: Instant) -> Option<C> {
        let list = self.peers.get_mut(peer)?;
        let mut found = None;
        while let Some((conn, since)) = list.pop_front() {
            self.len -= 1;
            if now.saturating_duration_since(since) < self.idle_timeout {
                found = Some(conn);
                break;
            }
        }
        if list.is_empty() {
            self.peers.remove(peer);
        }
        found
    }

    /// Drops every connection idle for longer than the timeout; returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        let before = self.len;
        let timeout = self.idle_timeout;
        self.peers.retain(|_, list| {
            list.retain(|(_, since)| now.saturating_duration_since(*since) < timeout);
            !list.is_empty()
        });
        self.len = self.peers.values().map(VecDeque::len).sum();
        before - self.len
    }

    /// Keeps only the connections `keep` accepts (an adapter drops those whose upstream closed
    /// or spoke while idle); returns how many went.
    pub fn retain(&mut self, mut keep: impl FnMut(&C) -> bool) -> usize {
        let before = self.len;
        self.peers.retain(|_, list| {
            list.retain(|(conn, _)| keep(conn));
            !list.is_empty()
        });
        self.len = self.peers.values().map(VecDeque::len).sum();
        before - self.len
    }

    /// When the oldest held connection expires, for scheduling [`expire`](Self::expire).
    pub fn next_expiry(&self) -> Option<Instant> {
        self.peers
            .values()
            .filter_map(|l| l.back())
            .filter_map(|(_, since)| since.checked_add(self.idle_timeout))
            .min()
    }
}

/// FNV-1a over a peer's host and port. Keys come from the configuration, not from clients, so
/// the pool needs no defence against chosen collisions, and SipHash would only cost time on
/// every check-out and release.
#[derive(Debug)]
pub(crate) struct PeerHasher(u64);

impl Default for PeerHasher {
    fn default() -> Self {
        PeerHasher(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for PeerHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifo_cap_and_expiry() {
        let t0 = Instant::now();
        let a = Peer::new("127.0.0.1", 1);
        let b = Peer::new("127.0.0.1", 2);
        let mut pool = IdlePool::new(Duration::from_secs(10), 2);
        assert_eq!(pool.put(&a, 1, t0), None);
        assert_eq!(pool.put(&a, 2, t0 + Duration::from_secs(1)), None);
        assert_eq!(
            pool.put(&a, 3, t0 + Duration::from_secs(2)),
            Some(1),
            "oldest evicted at cap"
        );
        assert_eq!(pool.put(&b, 9, t0), None);
        assert_eq!(pool.len(), 3);
        assert_eq!(
            pool.take(&a, t0 + Duration::from_secs(3)),
            Some(3),
            "most recent first"
        );
        assert_eq!(pool.next_expiry(), Some(t0 + Duration::from_secs(10)));
        assert_eq!(
            pool.take(&a, t0 + Duration::from_secs(11)),
            None,
            "2 expired"
        );
        assert_eq!(pool.expire(t0 + Duration::from_secs(11)), 1, "9 expired");
        assert!(pool.is_empty());
        let mut off = IdlePool::new(Duration::from_secs(10), 0);
        assert_eq!(off.put(&a, 5, t0), Some(5));
    }

    #[test]
    fn retain_drops_what_the_probe_refuses() {
        let now = Instant::now();
        let mut pool = IdlePool::new(Duration::from_secs(60), 4);
        let (a, b) = (Peer::new("a", 1), Peer::new("b", 1));
        for (peer, c) in [(&a, 1), (&a, 2), (&b, 3)] {
            assert!(pool.put(peer, c, now).is_none());
        }
        assert_eq!(pool.retain(|c| *c != 2 && *c != 3), 2);
        assert_eq!(pool.len(), 1);
        assert_eq!(pool.take(&a, now), Some(1));
        assert_eq!(pool.take(&b, now), None);
    }
}
