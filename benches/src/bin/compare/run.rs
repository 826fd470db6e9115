//! The scenarios and the rounds: for each round, each scenario, each target (order rotated
//! round by round), start a fresh backend and proxy, drive the load, and turn what was read from
//! `/proc` into a [`Measurement`].
//!
//! What is measured, per scenario (the load generator's modes are in `load.rs`):
//!
//! | scenario | load | unit |
//! |---|---|---|
//! | ping-pong | 32 connections, one 256 B message in flight each | round trip |
//! | handshakes | 16 workers: connect, upgrade, close, EOF | handshake + close |
//! | http | `wrk -t1 -c32`, 13-byte body, keep-alive | request |
//! | stream | 8 connections, 16 KiB messages, 32 in flight each | echoed message |
//! | idle-rss | N upgraded connections, one echo each, then idle | RSS growth per connection |
//! | warm-http | the http scenario on a proxy that first served 20k handshakes | request |
//! | wss-handshakes | handshakes over TLS: connect, full TLS handshake, upgrade, close, EOF | handshake + close |
//! | wss-stream | stream over TLS | echoed message |
//!
//! The `wss-*` scenarios terminate TLS at the proxy (the backend stays plain ws, as in the usual
//! deployment), with one certificate generated for the run and one client configuration for
//! every proxy (see `tls.rs`); `direct` has no TLS end and is left out of them.
//!
//! CPU time is utime + stime of the whole process (all threads) from `/proc/<pid>/stat`, read
//! at the edges of the measured window: by the load generator itself for its modes, and by the
//! orchestrator around the `wrk` run for http (wrk's own time is read while it is a zombie).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::load::LoadResult;
use crate::procfs;
use crate::targets::{self, Env, Proc, Running, Target};
use crate::{check_interrupt, nap};

/// The scenarios, in run order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum)]
pub enum Scenario {
    /// 32 connections × one 256 B message in flight.
    PingPong,
    /// Connect, upgrade, close; 16 at once.
    Handshakes,
    /// wrk -t1 -c32 against a 13-byte body.
    Http,
    /// 8 connections × 32 in flight × 16 KiB.
    Stream,
    /// RSS growth per idle upgraded connection.
    IdleRss,
    /// http after 20k handshakes on the same proxy process.
    WarmHttp,
    /// Handshakes over TLS: connect, full TLS handshake, upgrade, close; 16 at once.
    WssHandshakes,
    /// stream over TLS: 8 connections × 32 in flight × 16 KiB.
    WssStream,
}

impl Scenario {
    /// Every scenario, in run order.
    pub const ALL: [Scenario; 8] = [
        Scenario::PingPong,
        Scenario::Handshakes,
        Scenario::Http,
        Scenario::Stream,
        Scenario::IdleRss,
        Scenario::WarmHttp,
        Scenario::WssHandshakes,
        Scenario::WssStream,
    ];

    /// The name used in tables and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::PingPong => "ping-pong",
            Scenario::Handshakes => "handshakes",
            Scenario::Http => "http",
            Scenario::Stream => "stream",
            Scenario::IdleRss => "idle-rss",
            Scenario::WarmHttp => "warm-http",
            Scenario::WssHandshakes => "wss-handshakes",
            Scenario::WssStream => "wss-stream",
        }
    }

    /// What one unit is, for table headers.
    pub fn unit(self) -> &'static str {
        match self {
            Scenario::PingPong => "round trip",
            Scenario::Handshakes | Scenario::WssHandshakes => "handshake",
            Scenario::Http | Scenario::WarmHttp => "request",
            Scenario::Stream | Scenario::WssStream => "message",
            Scenario::IdleRss => "connection",
        }
    }

    /// Whether it only makes sense with a proxy in the path.
    pub fn needs_proxy(self) -> bool {
        matches!(self, Scenario::IdleRss | Scenario::WarmHttp) || self.tls()
    }

    /// Whether the proxy terminates TLS for it.
    pub fn tls(self) -> bool {
        matches!(self, Scenario::WssHandshakes | Scenario::WssStream)
    }

    /// Whether its messages are [`STREAM_SIZE`] bytes (for MB/s).
    pub fn streams(self) -> bool {
        matches!(self, Scenario::Stream | Scenario::WssStream)
    }
}

/// The stream scenario's message size (for MB/s).
pub const STREAM_SIZE: usize = 16 * 1024;

/// Sizes and durations of a run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Rounds.
    pub rounds: usize,
    /// Seconds of load before each measured window.
    pub warmup: f64,
    /// Seconds in each measured window.
    pub duration: f64,
    /// Connections in the idle-rss scenario.
    pub idle_conns: usize,
    /// Handshakes served before warm-http.
    pub warm_handshakes: u64,
    /// How often a NOISY measurement is run again (the least noisy attempt is kept).
    pub noise_retries: u32,
    /// Targets, in base order (rotated by one each round).
    pub targets: Vec<Target>,
    /// Scenarios, in order.
    pub scenarios: Vec<Scenario>,
}

/// One scenario run against one target in one round.
#[derive(Debug, Clone)]
pub struct Measurement {
    /// Round number (0-based).
    pub round: usize,
    /// The scenario.
    pub scenario: Scenario,
    /// The target.
    pub target: Target,
    /// Units completed in the window.
    pub units: u64,
    /// The window, in seconds.
    pub window: f64,
    /// The proxy's CPU ticks in the window (`None` for direct).
    pub proxy_ticks: Option<u64>,
    /// CPU ticks of the load side in the window, per CPU: `(cpu, ticks)`; the load generator
    /// (or wrk) and the backend, added up when they share a CPU.
    pub load_ticks: Vec<(Option<usize>, u64)>,
    /// Errors (a measurement with errors has no figure).
    pub errors: u64,
    /// The first error, or why the run failed.
    pub error: Option<String>,
    /// The proxy's RSS in KiB, before and after: opening the connections (idle-rss), or
    /// serving the warming handshakes (warm-http).
    pub rss_kib: Option<(u64, u64)>,
    /// warm-http: how long the warming handshakes took, in seconds.
    pub warm_secs: Option<f64>,
    /// CPU ticks on the proxy's CPU that were not the proxy's (other processes, kernel
    /// threads, steal), and over how many seconds (the whole load run, warm-up included).
    pub foreign: Option<(u64, f64)>,
    /// Which attempt this is (1 unless earlier attempts were NOISY).
    pub attempt: u32,
    /// wss scenarios: what the load generator's TLS handshakes negotiated.
    pub tls: Option<String>,
}

impl Measurement {
    /// An empty measurement (no units, no figure yet).
    pub fn new(round: usize, scenario: Scenario, target: Target) -> Self {
        Measurement {
            round,
            scenario,
            target,
            units: 0,
            window: 0.0,
            proxy_ticks: None,
            load_ticks: Vec::new(),
            errors: 0,
            error: None,
            rss_kib: None,
            warm_secs: None,
            foreign: None,
            attempt: 1,
            tls: None,
        }
    }

    /// Whether it produced a figure.
    pub fn ok(&self) -> bool {
        self.errors == 0 && self.error.is_none() && self.units > 0
    }

    /// Units per second.
    pub fn throughput(&self) -> f64 {
        if self.window > 0.0 {
            self.units as f64 / self.window
        } else {
            0.0
        }
    }

    /// The proxy's CPU microseconds per unit.
    pub fn proxy_us_per_unit(&self, clk_tck: u64) -> Option<f64> {
        let ticks = self.proxy_ticks?;
        (self.units > 0).then(|| ticks as f64 * 1e6 / clk_tck as f64 / self.units as f64)
    }

    /// The proxy's CPU use in the window, in percent of one core.
    pub fn proxy_pct(&self, clk_tck: u64) -> Option<f64> {
        let ticks = self.proxy_ticks?;
        (self.window > 0.0).then(|| ticks as f64 * 100.0 / clk_tck as f64 / self.window)
    }

    /// The busiest load-side CPU, in percent.
    pub fn load_pct(&self, clk_tck: u64) -> f64 {
        if self.window <= 0.0 {
            return 0.0;
        }
        let mut per_cpu: Vec<(Option<usize>, u64)> = Vec::new();
        for &(cpu, t) in &self.load_ticks {
            match per_cpu.iter_mut().find(|(c, _)| *c == cpu) {
                Some((_, sum)) => *sum += t,
                None => per_cpu.push((cpu, t)),
            }
        }
        let max = per_cpu.iter().map(|&(_, t)| t).max().unwrap_or(0);
        max as f64 * 100.0 / clk_tck as f64 / self.window
    }

    /// The load side's (load generator + backend) CPU microseconds per unit.
    pub fn load_us_per_unit(&self, clk_tck: u64) -> Option<f64> {
        let ticks: u64 = self.load_ticks.iter().map(|&(_, t)| t).sum();
        (self.units > 0).then(|| ticks as f64 * 1e6 / clk_tck as f64 / self.units as f64)
    }

    /// Which side limited the throughput.
    pub fn bottleneck(&self, clk_tck: u64) -> Bottleneck {
        let load = self.load_pct(clk_tck);
        let proxy = self.proxy_pct(clk_tck);
        if proxy.is_some_and(|p| p >= 90.0) {
            Bottleneck::Proxy
        } else if load >= 90.0 && proxy.is_none_or(|p| p < 80.0) {
            Bottleneck::Load
        } else {
            Bottleneck::Neither
        }
    }

    /// Foreign CPU use on the proxy's CPU, in percent (see [`Measurement::foreign`]).
    pub fn foreign_pct(&self, clk_tck: u64) -> Option<f64> {
        let (ticks, secs) = self.foreign?;
        (secs > 0.0).then(|| ticks as f64 * 100.0 / clk_tck as f64 / secs)
    }

    /// Whether something else used ≥ 10% of the proxy's CPU while it was measured.
    pub fn noisy(&self, clk_tck: u64) -> bool {
        self.foreign_pct(clk_tck).is_some_and(|p| p >= 10.0)
    }

    /// The idle-rss figure: KiB of proxy RSS per open connection.
    pub fn kib_per_conn(&self) -> Option<f64> {
        if self.scenario != Scenario::IdleRss {
            return None;
        }
        let (before, after) = self.rss_kib?;
        (self.units > 0).then(|| (after as f64 - before as f64) / self.units as f64)
    }
}

/// Which side limited a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bottleneck {
    /// The proxy used ≥ 90% of its core: the figure is the proxy's.
    Proxy,
    /// A load-side core was ≥ 90% busy while the proxy was below 80%: the figure understates
    /// the proxy (flagged LOAD-BOUND in the tables).
    Load,
    /// Neither side saturated (latency-bound, or direct without saturation).
    Neither,
}

/// Runs the whole plan; `on_result` sees each measurement as it completes.
pub fn run_plan(
    env: &Env,
    plan: &Plan,
    mut on_result: impl FnMut(&Measurement),
) -> anyhow::Result<Vec<Measurement>> {
    let mut all = Vec::new();
    for round in 0..plan.rounds {
        let n = plan.targets.len();
        let order: Vec<Target> = (0..n).map(|i| plan.targets[(i + round) % n]).collect();
        for &scenario in &plan.scenarios {
            for &target in &order {
                if scenario.needs_proxy() && !target.is_proxy() {
                    continue;
                }
                let mut kept: Option<Measurement> = None;
                for attempt in 1..=plan.noise_retries + 1 {
                    check_interrupt()?;
                    let mut m = Measurement::new(round, scenario, target);
                    m.attempt = attempt;
                    if let Err(e) = run_one(env, plan, &mut m) {
                        // An interrupt ends the whole run; anything else is this figure's error.
                        check_interrupt()?;
                        m.error = Some(format!("{e:#}"));
                    }
                    let noisy = m.ok() && m.noisy(env.clk_tck);
                    let other = m.foreign_pct(env.clk_tck).unwrap_or(0.0);
                    let better = kept.as_ref().is_none_or(|k| {
                        other < k.foreign_pct(env.clk_tck).unwrap_or(0.0) || !k.ok()
                    });
                    if better {
                        kept = Some(m);
                    }
                    if !noisy {
                        break;
                    }
                    if attempt <= plan.noise_retries {
                        eprintln!(
                            "compare: {} / {}: {other:.0}% of the proxy CPU went to something else \
                             (NOISY); waiting for a quiet CPU and running it again",
                            scenario.name(),
                            target.name()
                        );
                        wait_quiet(env)?;
                    }
                }
                if let Some(m) = kept {
                    on_result(&m);
                    all.push(m);
                }
            }
        }
    }
    Ok(all)
}

fn run_one(env: &Env, plan: &Plan, m: &mut Measurement) -> anyhow::Result<()> {
    let tls = if m.scenario.tls() {
        Some(
            env.tls
                .as_ref()
                .context("no certificate was made for this run")?,
        )
    } else {
        None
    };
    let running = targets::start(env, m.target, &tag_of(m), tls)?;
    let ca = tls.map(|files| files.cert.to_string_lossy().into_owned());
    let tls_args: Vec<&str> = match &ca {
        Some(ca) => vec!["--tls-ca", ca],
        None => Vec::new(),
    };
    match m.scenario {
        Scenario::PingPong => {
            let args = ["--conns", "32", "--size", "256"];
            timed_load(env, plan, &running, "ping-pong", &args, m)
        }
        Scenario::Handshakes | Scenario::WssHandshakes => {
            let args = [&["--conns", "16"][..], &tls_args].concat();
            timed_load(env, plan, &running, "handshakes", &args, m)
        }
        Scenario::Stream | Scenario::WssStream => {
            let size = STREAM_SIZE.to_string();
            let args = ["--conns", "8", "--size", &size, "--inflight", "32"];
            let args = [&args[..], &tls_args].concat();
            timed_load(env, plan, &running, "stream", &args, m)
        }
        Scenario::Http => http(env, plan, &running, m),
        Scenario::IdleRss => idle_rss(env, plan, &running, m),
        Scenario::WarmHttp => {
            let pid = running
                .proxy
                .as_ref()
                .map(Proc::pid)
                .context("warm-http needs a proxy")?;
            let rss_fresh = procfs::rss_kib(pid)?;
            let started = Instant::now();
            warm_up_handshakes(env, plan, &running, &tag_of(m))?;
            m.warm_secs = Some(started.elapsed().as_secs_f64());
            m.rss_kib = Some((rss_fresh, procfs::rss_kib(pid)?));
            http(env, plan, &running, m)
        }
    }
}

/// Percent of CPU `cpu` busy over `over` (see [`procfs::cpu_busy`]).
pub fn busy_pct(cpu: usize, over: Duration, clk_tck: u64) -> anyhow::Result<f64> {
    let a = procfs::cpu_busy(cpu)?;
    let t = Instant::now();
    nap(over)?;
    let b = procfs::cpu_busy(cpu)?;
    Ok(b.saturating_sub(a) as f64 * 100.0 / clk_tck as f64 / t.elapsed().as_secs_f64())
}

/// Waits (at most 60 s) until the proxy's CPU is under 5% busy for a second.
fn wait_quiet(env: &Env) -> anyhow::Result<()> {
    let Some(cpu) = env.placement.proxy else {
        return Ok(());
    };
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        if busy_pct(cpu, Duration::from_secs(1), env.clk_tck)? < 5.0 {
            return Ok(());
        }
    }
    Ok(())
}

/// Watches the proxy's CPU for time that is not the proxy's: a parallel build, kernel threads,
/// or the hypervisor stealing the vCPU would all distort the figures.
struct NoiseProbe {
    cpu: usize,
    pid: u32,
    busy0: u64,
    proxy0: u64,
    t0: Instant,
}

impl NoiseProbe {
    /// `None` without a proxy or without pinning.
    fn start(env: &Env, running: &Running) -> anyhow::Result<Option<NoiseProbe>> {
        let (Some(cpu), Some(proxy)) = (env.placement.proxy, running.proxy.as_ref()) else {
            return Ok(None);
        };
        let pid = proxy.pid();
        Ok(Some(NoiseProbe {
            cpu,
            pid,
            busy0: procfs::cpu_busy(cpu)?,
            proxy0: procfs::cpu_ticks(pid)?,
            t0: Instant::now(),
        }))
    }

    fn finish(probe: Option<NoiseProbe>) -> anyhow::Result<Option<(u64, f64)>> {
        let Some(p) = probe else { return Ok(None) };
        let busy = procfs::cpu_busy(p.cpu)?.saturating_sub(p.busy0);
        let proxy = procfs::cpu_ticks(p.pid)?.saturating_sub(p.proxy0);
        Ok(Some((
            busy.saturating_sub(proxy),
            p.t0.elapsed().as_secs_f64(),
        )))
    }
}

/// The pids the load generator watches: the proxy (if any), then the backend.
fn watched(running: &Running) -> Vec<u32> {
    running
        .proxy
        .iter()
        .map(Proc::pid)
        .chain([running.backend.pid()])
        .collect()
}

fn load_command(
    env: &Env,
    mode: &str,
    addr: SocketAddr,
    running: &Running,
) -> std::process::Command {
    let mut cmd = env.command(&env.me, env.placement.load);
    cmd.args(["load", "--mode", mode, "--addr"])
        .arg(addr.to_string());
    for pid in watched(running) {
        cmd.arg("--watch").arg(pid.to_string());
    }
    cmd
}

/// Reads the `ERROR`, `TLS` and `RESULT` lines of a finished load generator.
fn load_result(load: &Proc) -> anyhow::Result<(LoadResult, Option<String>, Option<String>)> {
    let out = load.stdout();
    let line = |prefix: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .map(str::to_string)
    };
    let (error, tls) = (line("ERROR "), line("TLS "));
    let result = out
        .lines()
        .find_map(LoadResult::parse)
        .with_context(|| format!("no RESULT from the load generator: {}", load.stderr_tail()))?;
    Ok((result, error, tls))
}

/// Fills `m` from a load result whose ticks are `[proxy?, backend]`.
fn fill(env: &Env, running: &Running, m: &mut Measurement, r: &LoadResult, error: Option<String>) {
    m.units = r.units;
    m.window = r.window_ns as f64 / 1e9;
    m.errors = r.errors + r.stalled;
    m.error = error.or_else(|| {
        (r.stalled > 0).then(|| format!("{} connection(s) made no progress", r.stalled))
    });
    let mut ticks = r.ticks.iter().copied();
    if running.proxy.is_some() {
        m.proxy_ticks = ticks.next();
    }
    m.load_ticks = vec![(env.placement.load, r.self_ticks)];
    if let Some(b) = ticks.next() {
        m.load_ticks.push((env.placement.backend, b));
    }
}

fn timed_load(
    env: &Env,
    plan: &Plan,
    running: &Running,
    mode: &str,
    args: &[&str],
    m: &mut Measurement,
) -> anyhow::Result<()> {
    let mut cmd = load_command(env, mode, running.addr, running);
    cmd.args(args)
        .arg("--warmup")
        .arg(plan.warmup.to_string())
        .arg("--duration")
        .arg(plan.duration.to_string());
    let probe = NoiseProbe::start(env, running)?;
    let mut load = Proc::spawn(env, &format!("{}-load", tag_of(m)), cmd, true)?;
    let limit = Duration::from_secs_f64(plan.warmup + plan.duration + 30.0);
    load.wait_for(limit, "finished", |out, _| {
        out.lines().any(|l| l.starts_with("RESULT ")).then_some(())
    })?;
    m.foreign = NoiseProbe::finish(probe)?;
    let (r, error, tls) = load_result(&load)?;
    fill(env, running, m, &r, error);
    m.tls = tls;
    Ok(())
}

fn tag_of(m: &Measurement) -> String {
    format!("r{}-{}-{}", m.round, m.scenario.name(), m.target.name())
}

/// `wrk`'s summary: requests, its duration in seconds, and errors (socket errors + non-2xx).
#[derive(Debug, Clone, PartialEq)]
pub struct WrkSummary {
    /// Completed requests.
    pub requests: u64,
    /// The run's duration in seconds, as wrk reports it.
    pub seconds: f64,
    /// Socket errors (connect, read, write, timeout) plus non-2xx/3xx responses.
    pub errors: u64,
}

/// Parses wrk's output (`N requests in 5.00s, ...`, `Socket errors: ...`, `Non-2xx ...`).
pub fn parse_wrk(out: &str) -> Option<WrkSummary> {
    let line = out.lines().find(|l| l.contains(" requests in "))?;
    let mut words = line.split_whitespace();
    let requests = words.next()?.parse().ok()?;
    let secs = words.nth(2)?.trim_end_matches(',');
    let seconds = if let Some(ms) = secs.strip_suffix("ms") {
        ms.parse::<f64>().ok()? / 1e3
    } else if let Some(m) = secs.strip_suffix('m') {
        m.parse::<f64>().ok()? * 60.0
    } else {
        secs.strip_suffix('s')?.parse().ok()?
    };
    let mut errors = 0;
    for l in out.lines().map(str::trim) {
        if let Some(rest) = l.strip_prefix("Socket errors:") {
            for part in rest.split(',') {
                errors += part
                    .split_whitespace()
                    .last()
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        } else if let Some(rest) = l.strip_prefix("Non-2xx or 3xx responses:") {
            errors += rest.trim().parse::<u64>().unwrap_or(0);
        }
    }
    Some(WrkSummary {
        requests,
        seconds,
        errors,
    })
}

fn wrk_command(env: &Env, addr: SocketAddr, secs: f64) -> std::process::Command {
    let mut cmd = env.command(std::path::Path::new("wrk"), env.placement.load);
    // wrk takes whole seconds; at least 1.
    let secs = secs.round().max(1.0) as u64;
    cmd.args(["-t1", "-c32", "--timeout", "10s", "-d"])
        .arg(format!("{secs}s"))
        .arg(format!("http://{addr}/"));
    cmd
}

/// http (and the second half of warm-http): a wrk warm-up run, then the measured run.
fn http(env: &Env, plan: &Plan, running: &Running, m: &mut Measurement) -> anyhow::Result<()> {
    let tag = tag_of(m);
    let probe = NoiseProbe::start(env, running)?;
    {
        let mut warm = Proc::spawn(
            env,
            &format!("{tag}-wrk-warmup"),
            wrk_command(env, running.addr, plan.warmup),
            false,
        )?;
        warm.wait_zombie(Duration::from_secs_f64(plan.warmup + 30.0))?;
        let w = parse_wrk(&warm.stdout()).context("cannot parse wrk's warm-up output")?;
        anyhow::ensure!(w.errors == 0, "wrk warm-up saw {} errors", w.errors);
    }
    let proxy_pid = running.proxy.as_ref().map(Proc::pid);
    let backend_pid = running.backend.pid();
    let proxy0 = proxy_pid.map(procfs::cpu_ticks).transpose()?;
    let backend0 = procfs::cpu_ticks(backend_pid)?;
    let started = Instant::now();
    let mut wrk = Proc::spawn(
        env,
        &format!("{tag}-wrk"),
        wrk_command(env, running.addr, plan.duration),
        false,
    )?;
    let (wrk_ticks, ended) = wrk.wait_zombie(Duration::from_secs_f64(plan.duration + 30.0))?;
    let proxy1 = proxy_pid.map(procfs::cpu_ticks).transpose()?;
    let backend1 = procfs::cpu_ticks(backend_pid)?;
    m.foreign = NoiseProbe::finish(probe)?;
    let s = parse_wrk(&wrk.stdout()).context("cannot parse wrk's output")?;
    m.units = s.requests;
    // Throughput over wrk's own clock; CPU over spawn..exit (the proxy is idle outside it, so
    // the few extra milliseconds add nothing to its ticks).
    anyhow::ensure!(
        (ended - started).as_secs_f64() >= s.seconds * 0.9,
        "wrk ended early"
    );
    m.window = s.seconds;
    m.errors = s.errors;
    if s.errors > 0 {
        m.error = Some(format!(
            "wrk: {} socket errors or non-2xx responses",
            s.errors
        ));
    }
    m.proxy_ticks = proxy0.zip(proxy1).map(|(a, b)| b.saturating_sub(a));
    // Percentages use wrk's window; its CPU ticks also include its own start-up (a few ms).
    m.load_ticks = vec![
        (env.placement.load, wrk_ticks),
        (env.placement.backend, backend1.saturating_sub(backend0)),
    ];
    Ok(())
}

/// warm-http's first half: `plan.warm_handshakes` handshake cycles, 16 at a time.
fn warm_up_handshakes(env: &Env, plan: &Plan, running: &Running, tag: &str) -> anyhow::Result<()> {
    let mut cmd = load_command(env, "handshakes", running.addr, running);
    cmd.args(["--conns", "16", "--count"])
        .arg(plan.warm_handshakes.to_string());
    let mut load = Proc::spawn(env, &format!("{tag}-warming"), cmd, true)?;
    load.wait_for(Duration::from_secs(330), "finished", |out, _| {
        out.lines().any(|l| l.starts_with("RESULT ")).then_some(())
    })?;
    let (r, error, _) = load_result(&load)?;
    anyhow::ensure!(
        r.errors == 0 && r.units == plan.warm_handshakes,
        "warming handshakes: {} of {} done, {} errors: {}",
        r.units,
        plan.warm_handshakes,
        r.errors,
        error.unwrap_or_default()
    );
    Ok(())
}

/// idle-rss: the proxy's RSS before and after `plan.idle_conns` upgraded idle connections.
fn idle_rss(env: &Env, plan: &Plan, running: &Running, m: &mut Measurement) -> anyhow::Result<()> {
    let proxy = running.proxy.as_ref().context("idle-rss needs a proxy")?;
    let before = procfs::rss_kib(proxy.pid())?;
    let mut cmd = load_command(env, "idle", running.addr, running);
    cmd.args(["--conns"]).arg(plan.idle_conns.to_string());
    let mut load = Proc::spawn(env, &format!("{}-load", tag_of(m)), cmd, true)?;
    let (conns, errors) = load.wait_for(Duration::from_secs(330), "open", |out, _| {
        out.lines().find_map(parse_open)
    })?;
    // Let the proxy settle (deferred frees, buffers shrinking after the one echo).
    nap(Duration::from_secs(1))?;
    let after = procfs::rss_kib(proxy.pid())?;
    m.units = conns;
    m.errors = errors;
    m.error = load
        .stdout()
        .lines()
        .find_map(|l| l.strip_prefix("ERROR "))
        .map(str::to_string);
    m.rss_kib = Some((before, after));
    m.window = 1.0;
    load.close_stdin();
    Ok(())
}

/// Parses `OPEN conns=N errors=E ms=T` into (N, E).
fn parse_open(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix("OPEN ")?;
    let mut conns = None;
    let mut errors = None;
    for word in rest.split_whitespace() {
        match word.split_once('=')? {
            ("conns", v) => conns = v.parse().ok(),
            ("errors", v) => errors = v.parse().ok(),
            _ => {}
        }
    }
    Some((conns?, errors?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_output_parses() {
        let out = "Running 5s test @ http://127.0.0.1:8080/\n  1 threads and 32 connections\n\
                   \x20 Thread Stats   Avg      Stdev     Max   +/- Stdev\n\
                   \x20   Latency   310.12us   40.00us   2.00ms   90.00%\n\
                   \x20 512345 requests in 5.00s, 45.00MB read\n\
                   \x20 Socket errors: connect 0, read 2, write 0, timeout 1\n\
                   \x20 Non-2xx or 3xx responses: 4\n\
                   Requests/sec: 102469.00\nTransfer/sec:      9.00MB\n";
        assert_eq!(
            parse_wrk(out),
            Some(WrkSummary {
                requests: 512_345,
                seconds: 5.0,
                errors: 7
            })
        );
        let clean = "  100 requests in 1.00m, 1.00KB read\nRequests/sec: 1.66\n";
        assert_eq!(
            parse_wrk(clean),
            Some(WrkSummary {
                requests: 100,
                seconds: 60.0,
                errors: 0
            })
        );
        assert_eq!(parse_wrk("unable to connect to 127.0.0.1:1"), None);
    }

    #[test]
    fn open_lines_parse() {
        assert_eq!(
            parse_open("OPEN conns=9900 errors=0 ms=2100"),
            Some((9900, 0))
        );
        assert_eq!(parse_open("RESULT units=1"), None);
    }

    fn sample(proxy_ticks: Option<u64>, load: Vec<(Option<usize>, u64)>) -> Measurement {
        Measurement {
            units: 1000,
            window: 2.0,
            proxy_ticks,
            load_ticks: load,
            ..Measurement::new(0, Scenario::PingPong, Target::Nginx)
        }
    }

    #[test]
    fn cpu_figures_and_bottleneck_flags() {
        // Proxy at 50% of a core, load generator + backend share CPU 1 at 95%.
        let m = sample(Some(100), vec![(Some(1), 150), (Some(1), 40)]);
        assert_eq!(m.proxy_us_per_unit(100), Some(1000.0));
        assert_eq!(m.proxy_pct(100), Some(50.0));
        assert_eq!(m.load_pct(100), 95.0);
        assert_eq!(m.bottleneck(100), Bottleneck::Load);
        // Same ticks on separate CPUs: neither side saturated.
        let m = sample(Some(100), vec![(Some(1), 150), (Some(2), 40)]);
        assert_eq!(m.load_pct(100), 75.0);
        assert_eq!(m.bottleneck(100), Bottleneck::Neither);
        // The proxy saturated.
        let m = sample(Some(196), vec![(Some(1), 190)]);
        assert_eq!(m.bottleneck(100), Bottleneck::Proxy);
        // Direct: no proxy figure.
        let m = sample(None, vec![(Some(1), 190)]);
        assert_eq!(m.proxy_us_per_unit(100), None);
        assert_eq!(m.bottleneck(100), Bottleneck::Load);
    }
}
