//! Reloading a running server: a new configuration for the connections accepted from now on
//! (running sessions keep the `Arc<Config>` and balancer they started with, so no tunnel or
//! exchange is cut), and listeners opened or closed.

use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};

use event_listener::Event;
use proxy_core::Config;

/// A handle that hands reloads to a running server (give it in
/// [`ServeOptions::reload`](crate::ServeOptions::reload)). Cheap to clone; reloads are applied in order.
#[derive(Clone, Default)]
pub struct Reloader {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    pending: Mutex<Vec<Reload>>,
    event: Event,
}

/// One reload.
#[derive(Debug)]
#[non_exhaustive]
pub struct Reload {
    /// The configuration new connections get; it should have passed [`Config::validate`].
    pub config: Arc<Config>,
    /// Listeners to start accepting on (already bound by the caller, who reports bind errors).
    pub add: Vec<TcpListener>,
    /// Listener addresses (as bound) to stop accepting on; their open connections go on.
    pub remove: Vec<SocketAddr>,
}

impl Reload {
    /// A reload to `config` with no listener change.
    pub fn new(config: Arc<Config>) -> Self {
        Reload {
            config,
            add: Vec::new(),
            remove: Vec::new(),
        }
    }
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader").finish_non_exhaustive()
    }
}

impl Reloader {
    /// A handle no server listens to yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues `reload` for the server and wakes it.
    pub fn reload(&self, reload: Reload) {
        if let Ok(mut p) = self.inner.pending.lock() {
            p.push(reload);
        }
        self.inner.event.notify(usize::MAX);
    }

    pub(crate) fn take(&self) -> Vec<Reload> {
        self.inner
            .pending
            .lock()
            .map(|mut p| std::mem::take(&mut *p))
            .unwrap_or_default()
    }

    fn has_pending(&self) -> bool {
        self.inner.pending.lock().is_ok_and(|p| !p.is_empty())
    }

    /// Resolves once a reload is queued.
    pub(crate) async fn requested(&self) {
        loop {
            if self.has_pending() {
                return;
            }
            let listener = self.inner.event.listen();
            // Checked again after registering, so a reload in between is not missed.
            if self.has_pending() {
                return;
            }
            listener.await;
        }
    }
}
