//! Choosing a peer. The decision is a pure function of shared balancer state; adapters hold one
//! [`Balancer`] per configuration (in an `Arc`) and hand it to every session they create.
//!
//! Round-robin is all the first release does. Weights, least-connections, hashing and health
//! windows slot in here as more state on [`Balancer`] without changing the session.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::config::{Config, Peer};
use crate::io::PeerInfo;

/// Shared, lock-free balancing state for one configuration.
#[derive(Debug, Default)]
pub struct Balancer {
    cursor: AtomicUsize,
}

impl Balancer {
    /// Fresh state for `config`.
    pub fn new(_config: &Config) -> Self {
        Balancer {
            cursor: AtomicUsize::new(0),
        }
    }

    /// The peer the next connection for `client` should go to.
    ///
    /// Returns `None` only for an empty group, which [`Config::validate`] rules out.
    pub fn pick<'c>(&self, config: &'c Config, _client: &PeerInfo) -> Option<&'c Peer> {
        let peers = &config.upstream.peers;
        if peers.is_empty() {
            return None;
        }
        // Relaxed is enough: the counter only spreads load, it orders nothing else.
        let n = self.cursor.fetch_add(1, Ordering::Relaxed);
        peers.get(n % peers.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UpstreamGroup;

    #[test]
    fn round_robin_cycles_through_peers() {
        let peers: Vec<Peer> = (1..=3).map(|p| Peer::new("127.0.0.1", p)).collect();
        let config = Config::new(UpstreamGroup::new(peers));
        let b = Balancer::new(&config);
        let client = PeerInfo::new("127.0.0.1:1".parse().expect("addr"));
        let ports: Vec<u16> = (0..6)
            .filter_map(|_| b.pick(&config, &client))
            .map(Peer::port)
            .collect();
        assert_eq!(ports, [1, 2, 3, 1, 2, 3]);
    }
}
