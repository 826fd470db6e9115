//! `switchyard`: a WebSocket-first reverse proxy. This binary only wires things together: flags
//! and the TOML file become settings, a runtime is chosen, signals trigger a graceful drain, and
//! finished exchanges become access-log lines. All proxy logic is in `proxy-core`.

mod access_log;
mod demo;
mod metrics;
mod observe;
mod probe;
mod settings;
mod tls;
mod units;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

use settings::{Overrides, RuntimeKind, Settings};
use units::{parse_duration, parse_size};

/// A reverse proxy for WebSocket and HTTP/1.1 that is correct by default.
///
/// Upgrade handling needs no configuration: Upgrade/Connection are handled for you, the
/// upstream's 101 is verified (Sec-WebSocket-Accept) before anything is tunnelled, and idle
/// WebSockets get their own timeout (--tunnel-idle-timeout, 1h) instead of dying at the HTTP
/// read timeout (--read-timeout, 60s).
#[derive(Debug, Parser)]
#[command(name = "switchyard", version, args_conflicts_with_subcommands = true)]
#[command(
    after_help = "Examples:\n  switchyard demo\n  switchyard --listen 127.0.0.1:8080 --upstream 127.0.0.1:9000 --upstream 127.0.0.1:9001\n  switchyard --config switchyard.toml\n  switchyard check-config switchyard.toml\n  switchyard probe ws://127.0.0.1:8080/ws\n\nDurations take ms, s, m, h, d (e.g. 500ms, 90s, 1h30m) like nginx; `off` disables a timeout."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
    /// Log level for stderr: error, warn, info, debug, trace, or a RUST_LOG-style filter such
    /// as `info,proxy_drive=debug` [default: RUST_LOG, else info].
    #[arg(long, global = true, value_name = "LEVEL")]
    log_level: Option<String>,
    /// Log line format on stderr (colour only when stderr is a terminal).
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs a built-in WebSocket echo upstream and a demo page behind the proxy.
    Demo {
        /// Where the proxy listens.
        #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8080")]
        listen: String,
        /// Access log destination: a path, `-` for stdout, or `off`.
        #[arg(long, value_name = "PATH|-|off", default_value = "-")]
        access_log: String,
        /// Async runtime to use.
        #[arg(long, value_enum, default_value = "tokio")]
        runtime: RuntimeKind,
        /// Also serve Prometheus metrics at http://ADDR/metrics (linked from the page).
        #[arg(long, value_name = "ADDR")]
        metrics: Option<String>,
        /// Serve https:// and wss:// with a self-signed certificate made at start (for
        /// localhost; the browser asks you to accept it once).
        #[arg(long)]
        tls: bool,
    },
    /// Validates a config file and prints the effective configuration.
    CheckConfig {
        /// The TOML file to check.
        file: PathBuf,
    },
    /// Performs one WebSocket handshake against URL (a backend, or through a proxy) and says in
    /// plain words what is wrong if it fails.
    ///
    /// Exit codes: 0 ok (genuine 101, Ping answered), 2 unusable URL, 3 name does not resolve,
    /// 4 cannot connect, 5 timeout, 6 no 101 (with why: redirect, 400, 404, a plain 200...),
    /// 7 a 101 that is not a valid answer (Upgrade, Connection, Sec-WebSocket-Accept,
    /// subprotocol), 8 no frames after the 101, 9 the TLS handshake failed (wss://).
    Probe {
        /// The WebSocket URL, e.g. ws://127.0.0.1:8080/ws.
        url: String,
        /// Bound on each step (connect, handshake answer, Pong).
        #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "5s")]
        timeout: Duration,
        /// A subprotocol to ask for (Sec-WebSocket-Protocol).
        #[arg(long, value_name = "NAME")]
        protocol: Option<String>,
        /// An Origin header to send, as a browser would.
        #[arg(long, value_name = "ORIGIN")]
        origin: Option<String>,
        /// wss://: trust the CA certificates in this PEM file too (repeatable).
        #[arg(long, value_name = "FILE")]
        ca: Vec<PathBuf>,
        /// wss://: accept any certificate (a test bench's self-signed one).
        #[arg(long)]
        insecure: bool,
    },
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Address to accept clients on; repeat for several (default 127.0.0.1:8080).
    #[arg(long, value_name = "ADDR")]
    listen: Vec<String>,
    /// Upstream server; repeat to balance round-robin across several.
    #[arg(long, value_name = "HOST:PORT")]
    upstream: Vec<String>,
    /// Time to establish an upstream connection (nginx proxy_connect_timeout) [default: 60s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    connect_timeout: Option<Duration>,
    /// HTTP only: time to wait for the upstream's response head, and between two reads of its
    /// body (nginx proxy_read_timeout). Does not apply to WebSocket tunnels [default: 60s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    read_timeout: Option<Duration>,
    /// Time a peer may leave written bytes unaccepted (nginx send_timeout) [default: 60s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    send_timeout: Option<Duration>,
    /// WebSocket/upgraded connections: close after this long with no byte in either direction
    /// (HAProxy `timeout tunnel`) [default: 1h].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    tunnel_idle_timeout: Option<Duration>,
    /// WebSocket tunnels: ping a side after this long without a byte from it, and close the
    /// tunnel as dead if no Pong follows (turns the frame-aware tunnel on) [default: off].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    ws_ping_interval: Option<Duration>,
    /// How long the proxy's Ping waits for its Pong (turns the frame-aware tunnel on)
    /// [default: 10s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    ws_ping_timeout: Option<Duration>,
    /// Largest WebSocket message a peer may send; over it, Close 1009 (turns the frame-aware
    /// tunnel on) [default: none].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    ws_max_message: Option<u64>,
    /// Most client connections open at once (nginx worker_connections); more are closed at
    /// accept and counted [default: no limit].
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,
    /// Most client connections open at once from one client address [default: no limit].
    #[arg(long, value_name = "N")]
    max_connections_per_ip: Option<usize>,
    /// Serve Prometheus metrics at http://ADDR/metrics (a listener of their own) [default: off].
    #[arg(long, value_name = "ADDR")]
    metrics: Option<String>,
    /// On SIGTERM/SIGINT, how long open tunnels may stay before they are closed [default: 30s].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    drain_timeout: Option<Duration>,
    /// Worker threads [default: number of cores]; 1 runs a single-threaded runtime.
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
    /// Async runtime [default: tokio].
    #[arg(long, value_enum)]
    runtime: Option<RuntimeKind>,
    /// TOML config file; flags override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Access log destination: a path, `-` for stdout, or `off` [default: -].
    #[arg(long, value_name = "PATH|-|off")]
    access_log: Option<String>,
    /// Terminate TLS (https, wss) on every listener with this PEM certificate chain (leaf
    /// first); needs --tls-key. Replaces the file's `tls`.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = init_logging(cli.log_level.as_deref(), cli.log_format) {
        eprintln!("switchyard: error: {e:#}");
        return ExitCode::FAILURE;
    }
    if let Some(Command::Probe {
        url,
        timeout,
        protocol,
        origin,
        ca,
        insecure,
    }) = cli.command
    {
        let outcome = probe::run(&probe::Probe {
            url,
            timeout,
            protocol,
            origin,
            ca,
            insecure,
        });
        return ExitCode::from(outcome.code());
    }
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("switchyard: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(level: Option<&str>, format: LogFormat) -> anyhow::Result<()> {
    use std::io::IsTerminal as _;
    let filter = match level {
        Some(l) => tracing_subscriber::EnvFilter::try_new(l).with_context(|| {
            format!(
                "--log-level {l:?}: expected error, warn, info, debug, trace or a RUST_LOG filter"
            )
        })?,
        None => tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

fn real_main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        // Handled in `main`, which owns the exit code.
        Some(Command::Probe { .. }) => Ok(()),
        Some(Command::CheckConfig { file }) => {
            let settings = Settings::load(Some(&file), &Overrides::default())?;
            // The certificate, key and CA files must load too.
            let listeners: Vec<_> = settings.listen.iter().map(|a| (*a, *a)).collect();
            tls::load(&settings, &listeners)?;
            print!(
                "# {} is valid; effective configuration:\n{}",
                file.display(),
                settings.to_toml()
            );
            Ok(())
        }
        Some(Command::Demo {
            listen,
            access_log,
            runtime,
            metrics,
            tls,
        }) => {
            let metrics = bind_metrics(metrics)?;
            let metrics_url = metrics
                .as_ref()
                .and_then(|l| l.local_addr().ok())
                .map(|a| format!("http://{a}/metrics"));
            let upstream = demo::start_upstream_thread(metrics_url)
                .context("cannot start the demo upstream")?;
            let (tls_cert, tls_key) = if tls {
                let (cert, key) =
                    demo::self_signed().context("cannot make the demo certificate")?;
                (Some(cert), Some(key))
            } else {
                (None, None)
            };
            let flags = Overrides {
                listen: vec![listen],
                upstream: vec![upstream.to_string()],
                access_log: Some(access_log),
                workers: Some(1),
                runtime: Some(runtime),
                tls_cert,
                tls_key,
                ..Default::default()
            };
            let settings = Settings::load(None, &flags)?;
            let listeners = bind(&settings)?;
            let shown = listeners
                .first()
                .and_then(|l| l.local_addr().ok())
                .map(|a| a.to_string())
                .unwrap_or_default();
            let (http, ws) = if tls {
                ("https", "wss")
            } else {
                ("http", "ws")
            };
            println!(
                "switchyard demo: open {http}://{shown}/ in a browser (WebSocket echo at {ws}://{shown}/ws); Ctrl-C stops it"
            );
            serve(settings, listeners, metrics, None)
        }
        None => {
            let a = cli.run;
            let flags = Overrides {
                listen: a.listen,
                upstream: a.upstream,
                connect_timeout: a.connect_timeout,
                read_timeout: a.read_timeout,
                send_timeout: a.send_timeout,
                tunnel_idle_timeout: a.tunnel_idle_timeout,
                ws_ping_interval: a.ws_ping_interval,
                ws_ping_timeout: a.ws_ping_timeout,
                ws_max_message: a.ws_max_message,
                max_connections: a.max_connections,
                max_connections_per_ip: a.max_connections_per_ip,
                drain_timeout: a.drain_timeout,
                workers: a.workers,
                runtime: a.runtime,
                access_log: a.access_log,
                tls_cert: a.tls_cert,
                tls_key: a.tls_key,
            };
            let settings = Settings::load(a.config.as_deref(), &flags)?;
            // Bind before starting a runtime so that "address in use" is reported at once.
            let listeners = bind(&settings)?;
            let metrics = bind_metrics(a.metrics)?;
            serve(settings, listeners, metrics, Some((a.config, flags)))
        }
    }
}

fn bind_metrics(addr: Option<String>) -> anyhow::Result<Option<TcpListener>> {
    addr.map(|addr| {
        TcpListener::bind(&addr).with_context(|| format!("--metrics: cannot listen on {addr}"))
    })
    .transpose()
}

fn bind(settings: &Settings) -> anyhow::Result<Vec<TcpListener>> {
    settings
        .listen
        .iter()
        .map(|addr| TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr}")))
        .collect()
}

/// Runs the proxy on the configured runtime until a signal has drained it.
/// `reload_from` is where a SIGHUP re-reads the configuration (the file and the flags), if
/// this proxy can be reloaded.
fn serve(
    settings: Settings,
    listeners: Vec<TcpListener>,
    metrics_listener: Option<TcpListener>,
    reload_from: Option<(Option<PathBuf>, Overrides)>,
) -> anyhow::Result<()> {
    let access = access_log::sink(&settings.access_log)
        .with_context(|| format!("cannot open access log {}", settings.access_log.describe()))?;
    let metrics = metrics_listener.as_ref().map(|_| metrics::Metrics::new());
    let mut options = proxy_tokio::ServeOptions::default();
    options.drain_timeout = settings.drain_timeout;
    options.pool_idle_timeout = settings.pool_idle_timeout;
    options.pool_max_per_peer = settings.pool_max_idle;
    options.dns_refresh = settings.dns_refresh;
    options.max_connections = settings.max_connections;
    options.max_connections_per_ip = settings.max_connections_per_ip;
    options.events = observe::sink(access, metrics.clone());
    options.tls_handshake_timeout = settings.tls_handshake_timeout;
    options.max_tls_handshakes = settings.max_tls_handshakes;
    let bound: Vec<(std::net::SocketAddr, std::net::SocketAddr)> = settings
        .listen
        .iter()
        .zip(&listeners)
        .filter_map(|(cfg, l)| Some((*cfg, l.local_addr().ok()?)))
        .collect();
    let loaded = tls::load(&settings, &bound)?;
    let secure: Vec<std::net::SocketAddr> = loaded.tls_listeners().collect();
    loaded.apply(&options.tls);
    tls::warn_insecure(&settings);
    warn_unresolved(&settings.config);
    let addrs: Vec<String> = listeners
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .map(|a| {
            if secure.contains(&a) {
                format!("{a} (TLS)")
            } else {
                a.to_string()
            }
        })
        .collect();
    let peers: Vec<String> = settings
        .config
        .upstream
        .peers()
        .map(ToString::to_string)
        .collect();
    let workers = settings.workers.max(1);
    let runtime = match settings.runtime {
        RuntimeKind::Tokio => "tokio",
        RuntimeKind::Smol => "smol",
    };
    let shutdown = proxy_tokio::Shutdown::new();
    let on_hup = reload_from.map(|(path, flags)| {
        reload::handler(
            path,
            flags,
            (options.reload.clone(), options.tls.clone()),
            bound,
            settings.clone(),
        )
    });
    signals::install(shutdown.clone(), settings.drain_timeout, on_hup)?;
    // Ready only once the signals are handled: a TERM right after this line must drain, not
    // kill with the default action.
    tracing::info!(
        "switchyard listening on {} -> {} (runtime {runtime}, {workers} worker{})",
        addrs.join(", "),
        peers.join(", "),
        if workers == 1 { "" } else { "s" }
    );
    if let (Some(listener), Some(m)) = (metrics_listener, metrics) {
        let at = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        metrics::serve(listener, m, Arc::clone(&options.stats), shutdown.clone())
            .context("cannot start the metrics thread")?;
        tracing::info!("metrics at http://{at}/metrics");
    }
    let config = Arc::new(settings.config);
    match settings.runtime {
        RuntimeKind::Tokio => {
            let mut builder = if workers == 1 {
                tokio::runtime::Builder::new_current_thread()
            } else {
                let mut b = tokio::runtime::Builder::new_multi_thread();
                b.worker_threads(workers);
                b
            };
            let rt = builder
                .enable_all()
                .build()
                .context("cannot start the tokio runtime")?;
            rt.block_on(proxy_tokio::serve(
                config,
                listeners,
                options,
                shutdown.clone(),
            ))?;
        }
        RuntimeKind::Smol => {
            let ex = Arc::new(smol::Executor::new());
            let (stop, stopped) = smol::channel::unbounded::<()>();
            // The calling thread runs the executor too, so N workers are N-1 extra threads.
            let threads: Vec<_> = (1..workers)
                .map(|i| {
                    let (ex, stopped) = (Arc::clone(&ex), stopped.clone());
                    std::thread::Builder::new()
                        .name(format!("smol-worker-{i}"))
                        .spawn(move || smol::block_on(ex.run(stopped.recv())))
                })
                .collect::<Result<_, _>>()
                .context("cannot start smol worker threads")?;
            let spawner = {
                let ex = Arc::clone(&ex);
                move |task| ex.spawn(task).detach()
            };
            let served = smol::block_on(ex.run(proxy_smol::serve(
                config,
                listeners,
                options,
                shutdown.clone(),
                spawner,
            )));
            drop(stop);
            for t in threads {
                let _ = t.join();
            }
            served?;
        }
    }
    if shutdown.is_forced() {
        tracing::warn!("stopped by a second signal: open connections were cut");
        std::process::exit(130);
    }
    tracing::info!("stopped");
    Ok(())
}

/// Warns about upstream names that do not resolve now: switchyard starts anyway (the name may
/// appear later, and it is looked up again), but requests to it fail until it does.
fn warn_unresolved(config: &proxy_core::Config) {
    use std::net::ToSocketAddrs as _;
    for group in config.all_groups() {
        for peer in group.peers() {
            if peer.host().parse::<std::net::IpAddr>().is_ok() {
                continue;
            }
            if let Err(e) = (peer.host(), peer.port()).to_socket_addrs() {
                tracing::warn!(
                    "upstream {peer} (group {}) does not resolve now: {e}; requests to it fail until it does",
                    group.name
                );
            }
        }
    }
}

mod reload {
    //! SIGHUP: the configuration is read again, exactly as at start (the file, then the
    //! flags). A file that does not load is refused with the same error `check-config` gives,
    //! and the running configuration stays. Otherwise new connections get the new one, open
    //! tunnels and exchanges keep theirs, and listeners are opened and closed to match.

    use std::net::{SocketAddr, TcpListener};
    use std::path::PathBuf;
    use std::sync::{Arc, Mutex};

    use crate::settings::{Overrides, Settings};

    /// Settings that only a restart changes.
    fn restart_only(old: &Settings, new: &Settings) -> Vec<&'static str> {
        let mut v = Vec::new();
        if old.workers != new.workers {
            v.push("workers");
        }
        if old.runtime != new.runtime {
            v.push("runtime");
        }
        if old.access_log != new.access_log {
            v.push("access_log");
        }
        if old.drain_timeout != new.drain_timeout {
            v.push("drain_timeout");
        }
        if old.max_connections != new.max_connections
            || old.max_connections_per_ip != new.max_connections_per_ip
        {
            v.push("the connection limits");
        }
        if old.pool_idle_timeout != new.pool_idle_timeout
            || old.pool_max_idle != new.pool_max_idle
            || old.dns_refresh != new.dns_refresh
        {
            v.push("the upstream pool and DNS settings");
        }
        if old.tls_handshake_timeout != new.tls_handshake_timeout
            || old.max_tls_handshakes != new.max_tls_handshakes
        {
            v.push("the TLS handshake limits");
        }
        v
    }

    /// The SIGHUP handler. `bound` pairs each configured listen address with the address it
    /// was bound to (they differ for port 0).
    pub fn handler(
        path: Option<PathBuf>,
        flags: Overrides,
        (reloader, tls): (proxy_tokio::Reloader, proxy_tokio::TlsSettings),
        bound: Vec<(SocketAddr, SocketAddr)>,
        running: Settings,
    ) -> Box<dyn Fn() + Send> {
        let state = Mutex::new((bound, running));
        Box::new(move || {
            let new = match Settings::load(path.as_deref(), &flags) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(
                        "reload refused, still serving the previous configuration: {e}"
                    );
                    return;
                }
            };
            let Ok(mut state) = state.lock() else {
                return;
            };
            let (bound, running) = &mut *state;
            // Bind what is new first: an address that cannot be had refuses the whole reload.
            let mut add = Vec::new();
            let mut added = Vec::new();
            for addr in new
                .listen
                .iter()
                .filter(|a| !bound.iter().any(|(c, _)| c == *a))
            {
                match TcpListener::bind(addr) {
                    Ok(l) => {
                        added.push((*addr, l.local_addr().unwrap_or(*addr)));
                        add.push(l);
                    }
                    Err(e) => {
                        tracing::error!(
                            "reload refused, still serving the previous configuration: cannot listen on {addr}: {e}"
                        );
                        return;
                    }
                }
            }
            let (kept, gone): (Vec<_>, Vec<_>) =
                bound.iter().partition(|(c, _)| new.listen.contains(c));
            // Certificates and keys are read again: one that does not load refuses the whole
            // reload, and the ones in use stay.
            let mut now_bound = kept;
            now_bound.extend(added);
            let loaded = match crate::tls::load(&new, &now_bound) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(
                        "reload refused, still serving the previous configuration and certificates: {e}"
                    );
                    return;
                }
            };
            let stale = restart_only(running, &new);
            if !stale.is_empty() {
                tracing::warn!(
                    "reload: {} changed, which takes a restart; the rest applies now",
                    stale.join(", ")
                );
            }
            crate::warn_unresolved(&new.config);
            crate::tls::warn_insecure(&new);
            // In force before the new listeners accept their first connection.
            loaded.apply(&tls);
            let mut reload = proxy_tokio::Reload::new(Arc::new(new.config.clone()));
            reload.add = add;
            reload.remove = gone.iter().map(|(_, b)| *b).collect();
            reloader.reload(reload);
            let listening: Vec<String> = now_bound.iter().map(|(_, b)| b.to_string()).collect();
            *bound = now_bound;
            *running = new;
            tracing::info!(
                "reloaded the configuration: listening on {}; open connections keep the one they started with",
                listening.join(", ")
            );
        })
    }
}

mod signals {
    //! Signal handling on a plain thread, the same for every runtime: SIGINT/SIGTERM start a
    //! graceful drain (a second one exits at once), SIGHUP reloads the configuration.

    use std::time::Duration;

    use anyhow::Context as _;
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    use signal_hook::iterator::Signals;

    pub fn install(
        shutdown: proxy_tokio::Shutdown,
        drain: Duration,
        on_hup: Option<Box<dyn Fn() + Send>>,
    ) -> anyhow::Result<()> {
        let mut wanted = vec![SIGINT, SIGTERM];
        if on_hup.is_some() {
            wanted.push(SIGHUP);
        }
        let mut signals = Signals::new(&wanted).context("cannot install signal handlers")?;
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let mut seen = 0;
                for sig in signals.forever() {
                    if sig == SIGHUP {
                        if let Some(reload) = &on_hup {
                            reload();
                        }
                        continue;
                    }
                    seen += 1;
                    if seen == 1 {
                        tracing::info!(
                            "shutting down: no new connections, draining (tunnels get {}); signal again to exit now",
                            crate::units::format_duration(drain)
                        );
                        shutdown.trigger();
                    } else {
                        // Every connection is cut now, but its access-log line is written (and a
                        // frame-aware tunnel says Close 1001) on the way out; a third signal, or
                        // a stuck exit, ends the process regardless.
                        tracing::warn!("second signal: exiting now");
                        shutdown.force();
                        std::thread::spawn(|| {
                            std::thread::sleep(Duration::from_secs(5));
                            std::process::exit(130);
                        });
                        if seen > 2 {
                            std::process::exit(130);
                        }
                    }
                }
            })
            .context("cannot start the signal thread")?;
        Ok(())
    }
}
