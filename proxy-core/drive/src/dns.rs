//! Upstream host names, resolved off the event loop and cached: a name is looked up on first
//! use, then re-resolved in the background every `refresh` interval while it is in use, so a
//! DNS-based pool (a Kubernetes headless service, say) is followed without a restart and no
//! connect waits for a lookup once the name is known. A failed refresh keeps the last good
//! addresses and logs why. The cache holds one entry per configured name: bounded by the
//! configuration, not by traffic.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proxy_core::Peer;

use crate::runtime::{BoxFuture, Runtime};
use crate::shutdown::Stats;

/// Looks names up; a blocking call, run on the runtime's blocking pool. The default is the
/// system resolver ([`SystemResolver`]); tests and embedders may supply their own.
pub trait Resolve: Send + Sync + 'static {
    /// The addresses of `host`, with `port`.
    fn resolve(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>>;
}

impl<F> Resolve for F
where
    F: Fn(&str, u16) -> io::Result<Vec<SocketAddr>> + Send + Sync + 'static,
{
    fn resolve(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        self(host, port)
    }
}

/// The operating system's resolver (`getaddrinfo`: A and AAAA, `/etc/hosts`).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        (host, port).to_socket_addrs().map(Iterator::collect)
    }
}

/// What a connect gets for a name.
pub(crate) enum Lookup {
    /// Known addresses (maybe being refreshed in the background).
    Ready(Arc<[SocketAddr]>),
    /// The first lookup of this name: wait for it, then [`DnsCache::store`] the answer.
    Wait(BoxFuture<io::Result<Vec<SocketAddr>>>),
}

pub(crate) struct DnsCache {
    resolver: Arc<dyn Resolve>,
    refresh: Duration,
    entries: Mutex<HashMap<Peer, Entry>>,
}

struct Entry {
    addrs: Arc<[SocketAddr]>,
    fetched: Instant,
    refreshing: bool,
}

impl fmt::Debug for DnsCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DnsCache")
            .field("refresh", &self.refresh)
            .finish_non_exhaustive()
    }
}

impl DnsCache {
    pub(crate) fn new(resolver: Arc<dyn Resolve>, refresh: Duration) -> Self {
        DnsCache {
            resolver,
            refresh,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// The addresses for `peer` (a name). A stale entry is returned as is while a background
    /// task refreshes it; a refresh interval of zero looks the name up on every connect.
    pub(crate) fn lookup<R: Runtime>(
        self: &Arc<Self>,
        rt: &R,
        stats: &Arc<Stats>,
        peer: &Peer,
        now: Instant,
    ) -> Lookup {
        if self.refresh.is_zero() {
            return Lookup::Wait(rt.lookup(Arc::clone(&self.resolver), peer.host(), peer.port()));
        }
        let stale = {
            let Ok(mut entries) = self.entries.lock() else {
                return Lookup::Wait(rt.lookup(
                    Arc::clone(&self.resolver),
                    peer.host(),
                    peer.port(),
                ));
            };
            let Some(entry) = entries.get_mut(peer) else {
                drop(entries);
                return Lookup::Wait(rt.lookup(
                    Arc::clone(&self.resolver),
                    peer.host(),
                    peer.port(),
                ));
            };
            let stale =
                !entry.refreshing && now.saturating_duration_since(entry.fetched) >= self.refresh;
            if stale {
                entry.refreshing = true;
            }
            (Arc::clone(&entry.addrs), stale)
        };
        let (addrs, stale) = stale;
        if stale {
            let lookup = rt.lookup(Arc::clone(&self.resolver), peer.host(), peer.port());
            let (cache, peer, guard) = (Arc::clone(self), peer.clone(), stats.task());
            rt.spawn(async move {
                let result = lookup.await;
                cache.refreshed(&peer, result, Instant::now());
                drop(guard);
            });
        }
        Lookup::Ready(addrs)
    }

    /// Forgets the names `keep` says are no longer configured (after a reload), so the cache
    /// stays bounded by the configuration in force.
    pub(crate) fn retain(&self, keep: impl Fn(&Peer) -> bool) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.retain(|peer, _| keep(peer));
        }
    }

    /// Records the answer of a first lookup.
    pub(crate) fn store(&self, peer: &Peer, addrs: &[SocketAddr], now: Instant) {
        if self.refresh.is_zero() || addrs.is_empty() {
            return;
        }
        if let Ok(mut entries) = self.entries.lock() {
            entries.insert(
                peer.clone(),
                Entry {
                    addrs: addrs.into(),
                    fetched: now,
                    refreshing: false,
                },
            );
        }
    }

    fn refreshed(&self, peer: &Peer, result: io::Result<Vec<SocketAddr>>, now: Instant) {
        let Ok(mut entries) = self.entries.lock() else {
            return;
        };
        let Some(entry) = entries.get_mut(peer) else {
            return;
        };
        entry.refreshing = false;
        entry.fetched = now;
        match result {
            Ok(addrs) if !addrs.is_empty() => {
                if *entry.addrs != *addrs {
                    tracing::info!(upstream = %peer, addresses = ?addrs, "upstream name now resolves differently");
                }
                entry.addrs = addrs.into();
            }
            Ok(_) => {
                tracing::warn!(upstream = %peer, "upstream name resolved to no address; keeping the last good ones")
            }
            Err(e) => {
                tracing::warn!(upstream = %peer, error = %e, "upstream name did not resolve; keeping the last good addresses")
            }
        }
    }
}
