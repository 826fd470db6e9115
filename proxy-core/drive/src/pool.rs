//! The upstream keep-alive pool as connection tasks share it: the core's [`IdlePool`] behind a
//! mutex, with the release and check-out rules. It holds only idle connections, each for at
//! most the idle timeout and at most `max_per_peer` per peer, so it is bounded by the
//! configuration, not by traffic.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proxy_core::{IdlePool, Peer};

use crate::shutdown::Stats;

/// Idle upstream connections of type `S`, shared by every connection task of a server.
#[derive(Debug)]
pub(crate) struct SharedPool<S> {
    pool: Mutex<IdlePool<S>>,
    stats: Arc<Stats>,
}

impl<S> SharedPool<S> {
    pub(crate) fn new(idle_timeout: Duration, max_per_peer: usize, stats: Arc<Stats>) -> Self {
        SharedPool {
            pool: Mutex::new(IdlePool::new(idle_timeout, max_per_peer)),
            stats,
        }
    }

    /// Takes a released upstream socket: pooled if `reusable`, otherwise (and whatever the pool
    /// evicts) dropped, which closes it.
    pub(crate) fn release(&self, peer: &Peer, socket: S, reusable: bool, now: Instant) {
        if !reusable {
            return;
        }
        // The evicted connection, if any, is closed outside the lock.
        let evicted = match self.pool.lock() {
            Ok(mut pool) => {
                let evicted = pool.put(peer, socket, now);
                self.stats.set_pooled(pool.len());
                evicted
            }
            Err(_) => Some(socket),
        };
        drop(evicted);
    }

    /// The most recent idle connection to `peer` that `alive` accepts; others met on the way are
    /// dropped. `alive` is the liveness probe: an idle HTTP/1.1 connection has nothing to say,
    /// so anything readable (bytes, or EOF) means it must not be used.
    pub(crate) fn checkout(
        &self,
        peer: &Peer,
        now: Instant,
        alive: impl Fn(&S) -> bool,
    ) -> Option<S> {
        let mut dead = Vec::new();
        let found = {
            let mut pool = self.pool.lock().ok()?;
            let found = loop {
                match pool.take(peer, now) {
                    Some(socket) if alive(&socket) => break Some(socket),
                    Some(socket) => dead.push(socket),
                    None => break None,
                }
            };
            self.stats.set_pooled(pool.len());
            found
        };
        drop(dead);
        found
    }

    /// Registers `cx` for readability of every pooled connection and drops those that are
    /// readable and fail `alive`: an idle upstream connection has nothing to say, so a FIN (or
    /// any byte) means it is finished, and it is closed at once rather than left in CLOSE_WAIT
    /// until the idle timeout or its next check-out.
    pub(crate) fn watch(&self, cx: &mut std::task::Context<'_>, alive: impl Fn(&S) -> bool) -> usize
    where
        S: crate::runtime::Socket,
    {
        let Ok(mut pool) = self.pool.lock() else {
            return 0;
        };
        let mut spurious = false;
        let dropped = pool.retain(|socket| {
            if socket.poll_read_ready(cx).is_pending() {
                return true;
            }
            let keep = alive(socket);
            // Readiness without anything to read (now cleared): poll again to re-register.
            spurious |= keep;
            keep
        });
        if dropped > 0 {
            self.stats.set_pooled(pool.len());
        }
        if spurious {
            cx.waker().wake_by_ref();
        }
        dropped
    }

    /// Closes connections idle for longer than the timeout.
    pub(crate) fn expire(&self, now: Instant) {
        if let Ok(mut pool) = self.pool.lock() {
            pool.expire(now);
            self.stats.set_pooled(pool.len());
        }
    }

    /// Closes every pooled connection and stops pooling (at shutdown).
    pub(crate) fn close_all(&self) {
        let old = match self.pool.lock() {
            Ok(mut pool) => {
                self.stats.set_pooled(0);
                std::mem::replace(&mut *pool, IdlePool::new(Duration::ZERO, 0))
            }
            Err(_) => return,
        };
        drop(old);
    }
}
