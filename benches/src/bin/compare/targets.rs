//! Child processes and the targets: starting the echo backend, switchyard, nginx and HAProxy
//! pinned to their CPUs, waiting (bounded) until they are ready, and killing them.
//!
//! Every child is owned by a [`Proc`], which kills (`SIGKILL`) and reaps it when dropped, so
//! children die with the scope that started them, on success, on error, on panic and on Ctrl-C
//! (the orchestrator turns SIGINT/SIGTERM into an error that unwinds through these guards).
//! Our own helpers (backend, load generator) also exit when their stdin closes, which covers the
//! orchestrator itself being killed.
//!
//! Each child runs as `prlimit --nofile=H:H taskset -c CPU program ...` (both `exec` the next
//! program, so the pid we hold is the program's): the open-files soft limit raised to the hard
//! limit, and the process pinned. Configs, logs and pid files go to the run's temp directory;
//! everything listens on 127.0.0.1.
//!
//! For the `wss-*` scenarios a proxy is started with TLS on its listener and the run's
//! certificate ([`crate::tls::Files`]): switchyard `--tls-cert/--tls-key`, nginx `listen ...
//! ssl` with `ssl_certificate(_key)`, HAProxy `bind ... ssl crt` (certificate and key in one
//! file) `alpn http/1.1`. The backend behind them stays plain.

use std::fs::File;
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::{check_interrupt, nap, tls};

/// How long a child may take to become ready.
const READY: Duration = Duration::from_secs(15);

/// The things a scenario can be pointed at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum)]
pub enum Target {
    /// No proxy: the load goes straight to the backend (the reference).
    Direct,
    /// `switchyard --runtime tokio --workers 1`.
    SwitchyardTokio,
    /// `switchyard --runtime smol --workers 1`.
    SwitchyardSmol,
    /// `switchyard --runtime tokio --workers 1` with the frame-aware WebSocket tunnel on
    /// (`--ws-max-message 1g --ws-ping-interval 1h`: every frame header read, no ping fires).
    SwitchyardFrames,
    /// `switchyard --runtime tokio --workers 1 --metrics 127.0.0.1:0`: what counting costs.
    SwitchyardMetrics,
    /// nginx, one process (`master_process off`).
    Nginx,
    /// HAProxy, one thread (`nbthread 1`, `-db`).
    Haproxy,
}

impl Target {
    /// Every target, in report order.
    pub const ALL: [Target; 7] = [
        Target::Direct,
        Target::SwitchyardTokio,
        Target::SwitchyardSmol,
        Target::SwitchyardFrames,
        Target::SwitchyardMetrics,
        Target::Nginx,
        Target::Haproxy,
    ];

    /// The name used in tables and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::SwitchyardTokio => "switchyard-tokio",
            Target::SwitchyardSmol => "switchyard-smol",
            Target::SwitchyardFrames => "switchyard-frames",
            Target::SwitchyardMetrics => "switchyard-metrics",
            Target::Nginx => "nginx",
            Target::Haproxy => "haproxy",
        }
    }

    /// Whether there is a proxy process to measure.
    pub fn is_proxy(self) -> bool {
        self != Target::Direct
    }

    /// The program this target needs on `PATH`, if any.
    pub fn program(self) -> Option<&'static str> {
        match self {
            Target::Nginx => Some("nginx"),
            Target::Haproxy => Some("haproxy"),
            _ => None,
        }
    }
}

/// Which CPU each role is pinned to (`None`: not pinned).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// The proxy under test.
    pub proxy: Option<usize>,
    /// The load generator (and wrk).
    pub load: Option<usize>,
    /// The echo backend.
    pub backend: Option<usize>,
}

impl Placement {
    /// One CPU: nothing pinned (the figures are then only indicative). Two: the proxy alone on
    /// the first, load generator and backend together on the second. Three or more: one each.
    pub fn for_cpus(cpus: &[usize]) -> Placement {
        match *cpus {
            [] | [_] => Placement {
                proxy: None,
                load: None,
                backend: None,
            },
            [a, b] => Placement {
                proxy: Some(a),
                load: Some(b),
                backend: Some(b),
            },
            [a, b, c, ..] => Placement {
                proxy: Some(a),
                load: Some(b),
                backend: Some(c),
            },
        }
    }

    /// A sentence for the report.
    pub fn describe(&self) -> String {
        let cpu =
            |c: Option<usize>| c.map_or_else(|| "unpinned".to_string(), |c| format!("CPU {c}"));
        format!(
            "proxy on {}; load generator / wrk on {}; echo backend on {}",
            cpu(self.proxy),
            cpu(self.load),
            cpu(self.backend)
        )
    }
}

/// What every spawn needs to know.
#[derive(Debug, Clone)]
pub struct Env {
    /// The run's temp directory.
    pub dir: PathBuf,
    /// The switchyard binary.
    pub switchyard: PathBuf,
    /// This binary (for the `backend` and `load` subcommands).
    pub me: PathBuf,
    /// The open-files limit to raise children to with `prlimit` (the hard limit), if available.
    pub nofile: Option<u64>,
    /// The open-files limit children end up with.
    pub fd_limit: u64,
    /// CPU placement.
    pub placement: Placement,
    /// Clock ticks per second.
    pub clk_tck: u64,
    /// The run's certificate, if a `wss-*` scenario is planned.
    pub tls: Option<tls::Files>,
}

impl Env {
    /// A command for `program` wrapped in `prlimit` and `taskset` as configured.
    pub fn command(&self, program: &Path, cpu: Option<usize>) -> Command {
        let mut wrap: Vec<String> = Vec::new();
        if let Some(n) = self.nofile {
            wrap.extend(["prlimit".into(), format!("--nofile={n}:{n}")]);
        }
        if let Some(cpu) = cpu {
            wrap.extend(["taskset".into(), "-c".into(), cpu.to_string()]);
        }
        let mut cmd = match wrap.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(program);
                c
            }
            None => Command::new(program),
        };
        cmd.env("NO_COLOR", "1");
        cmd
    }
}

/// A running child, killed and reaped on drop. Its stdout and stderr go to files in the temp
/// directory (`<name>.out`, `<name>.err`).
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    out: PathBuf,
    err: PathBuf,
}

impl Proc {
    /// Spawns `cmd`; `keep_stdin` gives it a pipe that [`Proc::close_stdin`] (or drop) closes.
    pub fn spawn(
        env: &Env,
        name: &str,
        mut cmd: Command,
        keep_stdin: bool,
    ) -> anyhow::Result<Proc> {
        check_interrupt()?;
        let out = env.dir.join(format!("{name}.out"));
        let err = env.dir.join(format!("{name}.err"));
        cmd.stdout(File::create(&out).context("stdout file")?)
            .stderr(File::create(&err).context("stderr file")?)
            .stdin(if keep_stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            });
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name}: {cmd:?}"))?;
        let stdin = child.stdin.take();
        Ok(Proc {
            name: name.to_string(),
            child,
            stdin,
            out,
            err,
        })
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything it wrote to stdout so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// Everything it wrote to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    /// The last lines of its stderr, for error messages.
    pub fn stderr_tail(&self) -> String {
        let text = self.stderr();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" | ")
    }

    /// Closes its stdin (our helpers exit on that).
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Its exit status, if it has exited (reaps it).
    pub fn try_exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Waits (bounded by `limit`) until `find` returns something for its stdout or stderr text.
    pub fn wait_for<T>(
        &mut self,
        limit: Duration,
        what: &str,
        mut find: impl FnMut(&str, &str) -> Option<T>,
    ) -> anyhow::Result<T> {
        let start = Instant::now();
        loop {
            if let Some(found) = find(&self.stdout(), &self.stderr()) {
                return Ok(found);
            }
            if let Some(status) = self.try_exited() {
                // One more look: it may have written and exited in between.
                if let Some(found) = find(&self.stdout(), &self.stderr()) {
                    return Ok(found);
                }
                anyhow::bail!(
                    "{} exited ({status}) before {what}: {}",
                    self.name,
                    self.stderr_tail()
                );
            }
            anyhow::ensure!(
                start.elapsed() < limit,
                "{} not {what} after {limit:?}: {}",
                self.name,
                self.stderr_tail()
            );
            nap(Duration::from_millis(5))?;
        }
    }

    /// Waits (bounded) for it to exit by itself, polling `/proc` so that its CPU time can be read
    /// while it is a zombie, before it is reaped. Returns its CPU ticks and the instant it was
    /// first seen exited.
    pub fn wait_zombie(&mut self, limit: Duration) -> anyhow::Result<(u64, Instant)> {
        let start = Instant::now();
        let pid = self.pid();
        loop {
            match crate::procfs::state(pid) {
                Some('Z') | Some('X') => {
                    let at = Instant::now();
                    let ticks = crate::procfs::cpu_ticks(pid)?;
                    let status = self.child.wait().context("reaping")?;
                    anyhow::ensure!(
                        status.success(),
                        "{} failed ({status}): {}",
                        self.name,
                        self.stderr_tail()
                    );
                    return Ok((ticks, at));
                }
                Some(_) => {}
                None => anyhow::bail!("{} vanished before it could be measured", self.name),
            }
            anyhow::ensure!(
                start.elapsed() < limit,
                "{} still running after {limit:?}",
                self.name
            );
            nap(Duration::from_millis(5))?;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stdin = None;
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Parses the address from a `listening on ADDR` line (switchyard's log line or our backend's).
pub fn parse_listening(text: &str) -> Option<SocketAddr> {
    let at = text.find("listening on ")? + "listening on ".len();
    let rest = &text[at..];
    let end = rest
        .find(|c: char| c.is_whitespace() || c == ',')
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// The echo backend, started and ready.
pub fn start_backend(env: &Env, tag: &str) -> anyhow::Result<(Proc, SocketAddr)> {
    let mut cmd = env.command(&env.me, env.placement.backend);
    cmd.args(["backend", "--listen", "127.0.0.1:0"]);
    let mut p = Proc::spawn(env, &format!("{tag}-backend"), cmd, true)?;
    let addr = p.wait_for(READY, "listening", |out, _| parse_listening(out))?;
    Ok((p, addr))
}

/// A free loopback port (for nginx and HAProxy, which cannot report a port-0 bind). The port
/// is released before returning, so another process could take it; startup then fails loudly.
fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("probing for a free port")?;
    Ok(l.local_addr().context("probe address")?.port())
}

/// Waits (bounded) until `addr` accepts connections, or `p` exits.
fn wait_accepting(p: &mut Proc, addr: SocketAddr) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if let Some(status) = p.try_exited() {
            anyhow::bail!("{} exited ({status}): {}", p.name, p.stderr_tail());
        }
        anyhow::ensure!(
            start.elapsed() < READY,
            "{} not accepting on {addr} after {READY:?}: {}",
            p.name,
            p.stderr_tail()
        );
        nap(Duration::from_millis(10))?;
    }
}

/// The nginx configuration: one process, no logs, the WebSocket boilerplate, long tunnels;
/// with `tls`, a TLS listener serving that certificate (TLS 1.2 and 1.3 as switchyard, ALPN
/// http/1.1 being nginx's own answer without http2).
pub fn nginx_conf(
    dir: &Path,
    port: u16,
    backend: SocketAddr,
    connections: u64,
    tls: Option<&tls::Files>,
) -> String {
    let d = dir.display();
    let (ssl, certificate) = match tls {
        Some(files) => (
            " ssl",
            format!(
                "\n        ssl_certificate {};\n        ssl_certificate_key {};\n        \
                 ssl_protocols TLSv1.2 TLSv1.3;",
                files.cert.display(),
                files.key.display()
            ),
        ),
        None => ("", String::new()),
    };
    format!(
        r#"# Written by switchyard-benches `compare`.
daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{
    worker_connections {connections};
}}
http {{
    access_log off;
    client_body_temp_path {d}/nginx-client-body;
    proxy_temp_path {d}/nginx-proxy;
    fastcgi_temp_path {d}/nginx-fastcgi;
    uwsgi_temp_path {d}/nginx-uwsgi;
    scgi_temp_path {d}/nginx-scgi;
    # WebSocket boilerplate; '' keeps "Connection:" empty (not "close") for upstream keepalive.
    map $http_upgrade $connection_upgrade {{
        default upgrade;
        '' '';
    }}
    upstream backend {{
        server {backend};
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port}{ssl};{certificate}
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_read_timeout 1h;
            proxy_send_timeout 1h;
        }}
    }}
}}
"#
    )
}

/// The HAProxy configuration: one thread, no logs, long tunnels, safe connection reuse; with
/// `tls`, a TLS listener serving that certificate with ALPN http/1.1.
pub fn haproxy_conf(
    port: u16,
    backend: SocketAddr,
    maxconn: u64,
    tls: Option<&tls::Files>,
) -> String {
    let ssl = tls.map_or_else(String::new, |files| {
        format!(" ssl crt {} alpn http/1.1", files.combined.display())
    });
    format!(
        r#"# Written by switchyard-benches `compare`.
global
    nbthread 1
    maxconn {maxconn}

defaults
    mode http
    option http-keep-alive
    http-reuse safe
    timeout connect 10s
    timeout client 1h
    timeout server 1h
    timeout tunnel 1h

frontend fe
    bind 127.0.0.1:{port}{ssl}
    default_backend be

backend be
    server s1 {backend}
"#
    )
}

/// A target under test: its backend and (unless direct) its proxy, ready to take load.
#[derive(Debug)]
pub struct Running {
    /// The proxy process, `None` for direct.
    pub proxy: Option<Proc>,
    /// The echo backend.
    pub backend: Proc,
    /// Where load goes.
    pub addr: SocketAddr,
}

/// Starts a fresh backend and a fresh `target` in front of it, terminating TLS with `tls` if
/// given; `tag` names the files.
pub fn start(
    env: &Env,
    target: Target,
    tag: &str,
    tls: Option<&tls::Files>,
) -> anyhow::Result<Running> {
    anyhow::ensure!(
        tls.is_none() || target.is_proxy(),
        "{} has no TLS end",
        target.name()
    );
    let (backend, backend_addr) = start_backend(env, tag)?;
    let connections = env.fd_limit.min(1 << 20);
    let name = format!("{tag}-proxy");
    let (proxy, addr) = match target {
        Target::Direct => (None, backend_addr),
        Target::SwitchyardTokio
        | Target::SwitchyardSmol
        | Target::SwitchyardFrames
        | Target::SwitchyardMetrics => {
            let runtime = if target == Target::SwitchyardSmol {
                "smol"
            } else {
                "tokio"
            };
            let mut cmd = env.command(&env.switchyard, env.placement.proxy);
            cmd.args(["--listen", "127.0.0.1:0", "--upstream"])
                .arg(backend_addr.to_string())
                .args([
                    "--workers",
                    "1",
                    "--runtime",
                    runtime,
                    "--access-log",
                    "off",
                ]);
            if target == Target::SwitchyardFrames {
                cmd.args(["--ws-max-message", "1g", "--ws-ping-interval", "1h"]);
            }
            if target == Target::SwitchyardMetrics {
                cmd.args(["--metrics", "127.0.0.1:0"]);
            }
            if let Some(files) = tls {
                cmd.arg("--tls-cert")
                    .arg(&files.cert)
                    .arg("--tls-key")
                    .arg(&files.key);
            }
            let mut p = Proc::spawn(env, &name, cmd, false)?;
            let addr = p.wait_for(READY, "listening", |_, err| parse_listening(err))?;
            (Some(p), addr)
        }
        Target::Nginx => {
            let port = free_port()?;
            let conf = env.dir.join(format!("{name}.conf"));
            let mut f = File::create(&conf).context("nginx.conf")?;
            // nginx starts closing fresh (still "reusable") client connections once fewer than
            // 1/16 of worker_connections are free, so the table must be larger than the fd
            // limit for idle-rss to reach it. (nginx warns that it exceeds the fd limit.)
            let worker_connections = connections + connections / 8;
            let text = nginx_conf(&env.dir, port, backend_addr, worker_connections, tls);
            f.write_all(text.as_bytes()).context("nginx.conf")?;
            let mut cmd = env.command(Path::new("nginx"), env.placement.proxy);
            cmd.arg("-p")
                .arg(&env.dir)
                .arg("-e")
                .arg(env.dir.join("nginx-error.log"))
                .arg("-c")
                .arg(&conf);
            let mut p = Proc::spawn(env, &name, cmd, false)?;
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            wait_accepting(&mut p, addr)?;
            (Some(p), addr)
        }
        Target::Haproxy => {
            let port = free_port()?;
            let conf = env.dir.join(format!("{name}.cfg"));
            // HAProxy needs two descriptors per connection plus some of its own.
            let maxconn = (connections.saturating_sub(100) / 2).max(100);
            std::fs::write(&conf, haproxy_conf(port, backend_addr, maxconn, tls))
                .context("haproxy.cfg")?;
            let mut cmd = env.command(Path::new("haproxy"), env.placement.proxy);
            cmd.arg("-db").arg("-f").arg(&conf);
            let mut p = Proc::spawn(env, &name, cmd, false)?;
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            wait_accepting(&mut p, addr)?;
            (Some(p), addr)
        }
    };
    Ok(Running {
        proxy,
        backend,
        addr,
    })
}

/// A program's version line (`nginx -v`, `haproxy -v`, `wrk -v`), for the report.
pub fn version(program: &str) -> Option<String> {
    let out = Command::new(program).arg("-v").output().ok()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines().next().map(|l| l.trim().to_string())
}

/// The TLS library `program` (nginx or HAProxy) runs with, for the report.
pub fn tls_library(program: &str) -> Option<String> {
    let flag = if program == "haproxy" { "-vv" } else { "-V" };
    let out = Command::new(program).arg(flag).output().ok()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("Running on OpenSSL") || l.starts_with("built with OpenSSL"))?;
    Some(line.to_string())
}

/// Whether `program` can be run at all.
pub fn installed(program: &str) -> bool {
    Command::new(program)
        .arg("-v")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_lines_parse() {
        let log = "2024-01-01T00:00:00Z  INFO switchyard listening on 127.0.0.1:40123 -> 127.0.0.1:9000 (runtime tokio, 1 worker)";
        assert_eq!(parse_listening(log), "127.0.0.1:40123".parse().ok());
        assert_eq!(
            parse_listening("listening on 127.0.0.1:5, 127.0.0.1:6"),
            "127.0.0.1:5".parse().ok()
        );
        assert_eq!(parse_listening("starting"), None);
    }

    #[test]
    fn tls_listeners_are_configured_only_when_asked() {
        let dir = Path::new("/tmp/run");
        let backend: SocketAddr = "127.0.0.1:9000".parse().expect("address");
        let files = tls::Files {
            cert: dir.join("tls-cert.pem"),
            key: dir.join("tls-key.pem"),
            combined: dir.join("tls-haproxy.pem"),
        };
        let plain = nginx_conf(dir, 8080, backend, 100, None);
        assert!(plain.contains("listen 127.0.0.1:8080;\n"));
        assert!(!plain.contains("ssl"));
        let secure = nginx_conf(dir, 8080, backend, 100, Some(&files));
        assert!(secure.contains("listen 127.0.0.1:8080 ssl;"));
        assert!(secure.contains("ssl_certificate /tmp/run/tls-cert.pem;"));
        assert!(secure.contains("ssl_certificate_key /tmp/run/tls-key.pem;"));
        assert!(haproxy_conf(8080, backend, 100, None).contains("bind 127.0.0.1:8080\n"));
        assert!(haproxy_conf(8080, backend, 100, Some(&files))
            .contains("bind 127.0.0.1:8080 ssl crt /tmp/run/tls-haproxy.pem alpn http/1.1\n"));
    }

    #[test]
    fn placement_adapts_to_the_cpu_count() {
        assert_eq!(Placement::for_cpus(&[0]).proxy, None);
        let two = Placement::for_cpus(&[0, 1]);
        assert_eq!(
            (two.proxy, two.load, two.backend),
            (Some(0), Some(1), Some(1))
        );
        let four = Placement::for_cpus(&[2, 3, 4, 5]);
        assert_eq!(
            (four.proxy, four.load, four.backend),
            (Some(2), Some(3), Some(4))
        );
    }
}
