//! Shared helpers for switchyard's end-to-end tests: start the proxy on a chosen runtime, and
//! real peers to put on either side of it.
//!
//! Every scenario is written once as a function of [`Runtime`] and instantiated per runtime with
//! [`runtime_tests!`], so a runtime that misbehaves fails that scenario under its own name.
//! The proxy runs on its own thread with its own runtime; the test's peers run on the test's
//! tokio runtime. All addresses are loopback with ephemeral ports, and every wait is bounded.

use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use proxy_core::{Config, Event, ExchangeLog, Peer, UpstreamGroup};

pub mod child;
pub mod origin;

/// How long any single wait in a test may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(20);

/// A runtime the proxy can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    /// tokio, current-thread (`--workers 1`).
    Tokio,
    /// tokio, multi-threaded with two workers.
    TokioMulti,
    /// proxy-smol on smol's executor.
    Smol,
    /// proxy-smol on async-std's executor.
    AsyncStd,
}

/// Instantiates each listed scenario `async fn name(rt: Runtime)` once per runtime, as
/// `mod name { #[test] fn tokio() ... fn tokio_multi() ... fn smol() ... fn async_std() ... }`.
#[macro_export]
macro_rules! runtime_tests {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn tokio() {
                    $crate::run_scenario($crate::Runtime::Tokio, super::$name);
                }
                #[test]
                fn tokio_multi() {
                    $crate::run_scenario($crate::Runtime::TokioMulti, super::$name);
                }
                #[test]
                fn smol() {
                    $crate::run_scenario($crate::Runtime::Smol, super::$name);
                }
                #[test]
                fn async_std() {
                    $crate::run_scenario($crate::Runtime::AsyncStd, super::$name);
                }
            }
        )*
    };
}

/// Runs an async scenario on a fresh multi-threaded tokio runtime for the peers.
pub fn run_scenario<F, Fut>(rt: Runtime, scenario: F)
where
    F: FnOnce(Runtime) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let peers = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("test runtime");
    peers.block_on(async move {
        tokio::time::timeout(Duration::from_secs(120), scenario(rt))
            .await
            .expect("scenario finished within 120 s");
    });
}

/// A loopback port that refuses connections for as long as the value lives: a socket bound to
/// it but never listening. (Binding a listener and dropping it is racy: another test's proxy may
/// take the port in between and answer.)
#[derive(Debug)]
pub struct RefusingPort {
    pub addr: SocketAddr,
    _socket: socket2::Socket,
}

/// A fresh [`RefusingPort`].
pub fn refusing_port() -> RefusingPort {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .expect("create a socket");
    let any: SocketAddr = "127.0.0.1:0".parse().expect("loopback address");
    socket.bind(&any.into()).expect("bind a loopback port");
    let addr = socket
        .local_addr()
        .expect("bound address")
        .as_socket()
        .expect("an IP socket address");
    RefusingPort {
        addr,
        _socket: socket,
    }
}

/// A config sending everything to `upstreams`, round-robin.
pub fn config_for(upstreams: &[SocketAddr]) -> Config {
    let peers = upstreams
        .iter()
        .map(|a| Peer::new(&a.ip().to_string(), a.port()))
        .collect();
    Config::new(UpstreamGroup::new(peers))
}

/// Events the proxy reported, with a way to wait for them.
#[derive(Debug, Default)]
pub struct EventLog {
    events: Mutex<Vec<ExchangeLog>>,
    changed: Condvar,
}

impl EventLog {
    fn push(&self, log: &ExchangeLog) {
        if let Ok(mut v) = self.events.lock() {
            v.push(log.clone());
            self.changed.notify_all();
        }
    }

    /// A snapshot of every event so far.
    pub fn all(&self) -> Vec<ExchangeLog> {
        self.events.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Waits (bounded by [`WAIT`]) until at least `n` events were reported; returns them.
    pub fn wait_for(&self, n: usize) -> Vec<ExchangeLog> {
        let guard = self.events.lock().expect("event log lock");
        let (guard, _) = self
            .changed
            .wait_timeout_while(guard, WAIT, |v| v.len() < n)
            .expect("event log lock");
        assert!(guard.len() >= n, "expected {n} events, got {:?}", *guard);
        guard.clone()
    }
}

/// A running proxy.
pub struct ProxyHandle {
    /// Where clients connect.
    pub addr: SocketAddr,
    /// What the proxy logged.
    pub events: Arc<EventLog>,
    /// The proxy's live gauges (tasks, connections, pooled upstream connections).
    pub stats: Arc<proxy_tokio::Stats>,
    /// The proxy's TLS settings (replace a listener's certificate through it).
    pub tls: proxy_tokio::TlsSettings,
    reloader: proxy_tokio::Reloader,
    shutdown: proxy_tokio::Shutdown,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ProxyHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyHandle")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// Adapter options a test may change.
#[derive(Clone)]
pub struct ProxyOptions {
    pub drain_timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub pool_max_per_peer: usize,
    /// Keep every event in [`ProxyHandle::events`]. Off for long runs, where the record itself
    /// would be the growing structure.
    pub record_events: bool,
    /// A resolver for upstream names instead of the system's (a test seam: no DNS traffic).
    pub resolver: Option<Arc<dyn proxy_tokio::Resolve>>,
    /// How often names in use are looked up again.
    pub dns_refresh: Duration,
    /// Most client connections open at once; 0 for no limit.
    pub max_connections: usize,
    /// Most client connections open at once from one address; 0 for no limit.
    pub max_connections_per_ip: usize,
    /// Terminates TLS on the proxy's listener with these settings.
    pub tls_listener: Option<proxy_tokio::ServerTls>,
    /// TLS client settings for upstream profiles, by name.
    pub tls_clients: Vec<(String, proxy_tokio::ClientTls)>,
    /// How long a client has for its TLS handshake.
    pub tls_handshake_timeout: Duration,
    /// Most TLS handshakes in flight; 0 for no limit.
    pub max_tls_handshakes: usize,
}

impl std::fmt::Debug for ProxyOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyOptions")
            .field("drain_timeout", &self.drain_timeout)
            .field("pool_idle_timeout", &self.pool_idle_timeout)
            .field("pool_max_per_peer", &self.pool_max_per_peer)
            .field("dns_refresh", &self.dns_refresh)
            .finish_non_exhaustive()
    }
}

impl Default for ProxyOptions {
    fn default() -> Self {
        ProxyOptions {
            drain_timeout: Duration::from_secs(30),
            pool_idle_timeout: Duration::from_secs(60),
            pool_max_per_peer: 32,
            record_events: true,
            resolver: None,
            dns_refresh: Duration::from_secs(30),
            max_connections: 0,
            max_connections_per_ip: 0,
            tls_listener: None,
            tls_clients: Vec::new(),
            tls_handshake_timeout: Duration::from_secs(10),
            max_tls_handshakes: 1024,
        }
    }
}

/// Starts the proxy with `config` on `rt`, listening on an ephemeral loopback port.
pub fn start_proxy(rt: Runtime, config: Config) -> ProxyHandle {
    start_proxy_with(rt, config, ProxyOptions::default())
}

/// [`start_proxy`] with adapter options.
pub fn start_proxy_with(rt: Runtime, config: Config, opts: ProxyOptions) -> ProxyHandle {
    config.validate().expect("test config is valid");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind proxy listener");
    let addr = listener.local_addr().expect("listener address");
    let events = Arc::new(EventLog::default());
    let shutdown = proxy_tokio::Shutdown::new();
    let sink_events = Arc::clone(&events);
    let mut options = proxy_tokio::ServeOptions::default();
    options.drain_timeout = opts.drain_timeout;
    options.pool_idle_timeout = opts.pool_idle_timeout;
    options.pool_max_per_peer = opts.pool_max_per_peer;
    options.dns_refresh = opts.dns_refresh;
    options.max_connections = opts.max_connections;
    options.max_connections_per_ip = opts.max_connections_per_ip;
    if let Some(resolver) = opts.resolver.clone() {
        options.resolver = resolver;
    }
    if let Some(tls) = opts.tls_listener.clone() {
        options.tls.set_listener(addr, tls);
    }
    for (profile, tls) in &opts.tls_clients {
        options.tls.set_client(profile, tls.clone());
    }
    options.tls_handshake_timeout = opts.tls_handshake_timeout;
    options.max_tls_handshakes = opts.max_tls_handshakes;
    let tls = options.tls.clone();
    if opts.record_events {
        options.events = Arc::new(move |e: &Event| {
            if let Event::Exchange(log) = e {
                sink_events.push(log);
            }
        });
    }
    let stats = Arc::clone(&options.stats);
    let reloader = options.reload.clone();
    let serve_shutdown = shutdown.clone();
    let config = Arc::new(config);
    let thread = std::thread::Builder::new()
        .name(format!("proxy-{rt:?}"))
        .spawn(move || {
            let listeners = vec![listener];
            let served = match rt {
                Runtime::Tokio | Runtime::TokioMulti => {
                    let runtime = if rt == Runtime::Tokio {
                        tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                    } else {
                        tokio::runtime::Builder::new_multi_thread()
                            .worker_threads(2)
                            .enable_all()
                            .build()
                    }
                    .expect("proxy runtime");
                    runtime.block_on(proxy_tokio::serve(
                        config,
                        listeners,
                        options,
                        serve_shutdown,
                    ))
                }
                Runtime::Smol => {
                    let ex = Arc::new(smol::Executor::new());
                    let spawner = {
                        let ex = Arc::clone(&ex);
                        move |task| ex.spawn(task).detach()
                    };
                    smol::block_on(ex.run(proxy_smol::serve(
                        config,
                        listeners,
                        options,
                        serve_shutdown,
                        spawner,
                    )))
                }
                Runtime::AsyncStd => async_std::task::block_on(proxy_smol::serve(
                    config,
                    listeners,
                    options,
                    serve_shutdown,
                    |task| {
                        async_std::task::spawn(task);
                    },
                )),
            };
            served.expect("proxy serve");
        })
        .expect("spawn proxy thread");
    ProxyHandle {
        addr,
        events,
        stats,
        tls,
        reloader,
        shutdown,
        thread: Some(thread),
    }
}

impl ProxyHandle {
    /// `ws://ADDR{path}`.
    pub fn ws_url(&self, path: &str) -> String {
        format!("ws://{}{path}", self.addr)
    }

    /// Hands the running proxy a reload (a new configuration, listeners to add or remove).
    pub fn reload(&self, reload: proxy_tokio::Reload) {
        self.reloader.reload(reload);
    }

    /// Forces a hard stop (the second signal): nothing is waited for.
    pub fn force(&self) {
        self.shutdown.force();
    }

    /// Triggers a graceful shutdown.
    pub fn shutdown(&self) {
        self.shutdown.trigger();
    }

    /// Triggers shutdown and waits (bounded) for the proxy to return; panics if it does not.
    pub fn stop(mut self) {
        self.shutdown.trigger();
        self.join_bounded();
    }

    /// Waits (bounded by [`WAIT`]) for an already-triggered proxy to return.
    pub fn join_bounded(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        let deadline = std::time::Instant::now() + WAIT;
        while !thread.is_finished() {
            assert!(
                std::time::Instant::now() < deadline,
                "proxy did not stop within {WAIT:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        thread.join().expect("proxy thread panicked");
    }
}

impl Drop for ProxyHandle {
    fn drop(&mut self) {
        // A failing test must not leave a proxy thread behind; stopping is best effort here.
        self.shutdown.trigger();
    }
}
