//! `compare`: switchyard end to end, beside nginx and HAProxy, on one core each.
//!
//! ```sh
//! cargo run --release -p switchyard-benches --bin compare -- --quick            # ~2.5 minutes
//! cargo run --release -p switchyard-benches --bin compare                        # ~14 minutes
//! cargo run --release -p switchyard-benches --bin compare -- --write-results --label "after: abc1234"
//! cargo run --release -p switchyard-benches --bin compare -- --quick --scenarios wss-handshakes,wss-stream
//! ```
//!
//! A manual instrument, not a test: it needs `nginx`, `haproxy` and `wrk` on `PATH` (a missing
//! peer is skipped with a note; without wrk the http scenarios are skipped) and takes minutes.
//!
//! # What it does
//!
//! For every round, every scenario, every target (order rotated by one target per round), it
//! starts a fresh echo backend and a fresh proxy, drives load through it, and reads the proxy's
//! CPU time from `/proc/<pid>/stat` over the measured window. Results are the **median over
//! rounds** per target, and the **median of per-round ratios** switchyard ÷ nginx and
//! switchyard ÷ HAProxy (ratios formed within a round, so slow drift of the machine cancels).
//! The scenarios are listed in [`run`]; the targets in [`targets::Target`].
//!
//! Pinning (`taskset`): the proxy alone on the first usable CPU; the load generator (or wrk) and
//! the echo backend on the second (on three or more CPUs the backend gets the third). The
//! orchestrator pins itself to the load CPU too, and only polls files while load runs. Each
//! proxy gets one worker: `switchyard --workers 1`, nginx `master_process off; worker_processes
//! 1`, HAProxy `nbthread 1`. Access logs are off everywhere.
//!
//! A round is flagged **NOISY** when something other than the proxy (a parallel build, kernel
//! threads, hypervisor steal) used ≥ 10% of the proxy's CPU while load ran (from `/proc/stat`).
//!
//! A round is flagged **LOAD-BOUND** when a load-side CPU was ≥ 90% busy while the proxy used
//! under 80% of its core: its throughput then measures the load side, though the proxy's CPU per
//! unit is still its own. A scenario whose load generator saw an error (wrong echo, refused
//! upgrade, a connection that stalled) or whose wrk saw socket errors or non-2xx answers has no
//! figure for that round; the error is reported instead.
//!
//! # Parts
//!
//! * [`ws`] — RFC 6455 frames and handshakes, pre-encoded;
//! * [`backend`] — the echo backend (`compare backend`, hidden);
//! * [`load`] — the load generator (`compare load`, hidden);
//! * [`procfs`] — CPU time, RSS and machine facts from `/proc`;
//! * [`tls`] — the run's certificate and the load generator's TLS client settings;
//! * [`targets`] — child processes (killed on drop), proxy configs and startup;
//! * [`run`] — scenarios, rounds, measurements;
//! * [`report`] — medians, ratios, markdown, RESULTS.md.

mod backend;
mod load;
mod procfs;
mod report;
mod run;
mod targets;
mod tls;
mod ws;

use std::io::Read as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

use run::{Plan, Scenario};
use targets::{Env, Placement, Target};

/// switchyard end to end beside nginx and HAProxy: WebSocket ping-pong, handshakes, HTTP
/// keep-alive, streaming, idle memory, uptime decay, and handshakes and streaming over TLS, one
/// core per proxy.
#[derive(Debug, Parser)]
#[command(name = "compare", args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Sub>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Sub {
    /// The echo backend (used by the orchestrator).
    #[command(hide = true)]
    Backend {
        /// Where to listen.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
    /// The load generator (used by the orchestrator).
    #[command(hide = true)]
    Load(load::LoadArgs),
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Short run: 1 round, 2 s windows after 0.5 s warm-up, 2000 idle connections.
    #[arg(long)]
    quick: bool,
    /// Rounds [default: 3, quick: 1].
    #[arg(long)]
    rounds: Option<usize>,
    /// Seconds per measured window [default: 5, quick: 2].
    #[arg(long)]
    duration: Option<f64>,
    /// Seconds of load before each window [default: 1, quick: 0.5].
    #[arg(long)]
    warmup: Option<f64>,
    /// Connections for idle-rss [default: 10000, quick: 2000; capped by the open-files limit].
    #[arg(long)]
    idle_conns: Option<usize>,
    /// Handshakes served before warm-http.
    #[arg(long, default_value_t = 20_000)]
    warm_handshakes: u64,
    /// Run a NOISY measurement (≥ 10% of the proxy's CPU used by something else) again, up to
    /// this many times, keeping the least noisy attempt.
    #[arg(long, default_value_t = 2)]
    noise_retries: u32,
    /// Targets, comma-separated [default: all installed].
    #[arg(long, value_enum, value_delimiter = ',')]
    targets: Vec<Target>,
    /// Scenarios, comma-separated [default: all].
    #[arg(long, value_enum, value_delimiter = ',')]
    scenarios: Vec<Scenario>,
    /// The switchyard binary [default: target/release/switchyard, built first].
    #[arg(long, value_name = "PATH")]
    switchyard: Option<PathBuf>,
    /// Do not run `cargo build --release -p proxy-cli` first.
    #[arg(long)]
    no_build: bool,
    /// Write (or refresh this run's section of) the results file.
    #[arg(long)]
    write_results: bool,
    /// The results file.
    #[arg(long, value_name = "PATH", default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/RESULTS.md"))]
    results: PathBuf,
    /// What this run measures, e.g. "before: c622304" [default: switchyard's git commit].
    #[arg(long)]
    label: Option<String>,
    /// Keep the temp directory (configs, logs) for inspection.
    #[arg(long)]
    keep_temp: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Sub::Backend { listen }) => backend::run(listen),
        Some(Sub::Load(args)) => load::run(args),
        None => compare(cli.run),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("compare: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// switchyard's sources, relative to the workspace: what "the commit measured" refers to.
const SOURCES: [&str; 4] = ["proxy-core", "proxy-tokio", "proxy-smol", "proxy-cli"];

/// Set by SIGINT/SIGTERM in the orchestrator.
static STOP: OnceLock<Arc<AtomicBool>> = OnceLock::new();

/// Fails once SIGINT or SIGTERM arrived, so that the run unwinds and its guards kill children.
pub fn check_interrupt() -> anyhow::Result<()> {
    if STOP.get().is_some_and(|s| s.load(Ordering::Relaxed)) {
        anyhow::bail!("interrupted");
    }
    Ok(())
}

/// Sleeps `d` in short slices, failing early on an interrupt.
pub fn nap(d: Duration) -> anyhow::Result<()> {
    let end = std::time::Instant::now() + d;
    loop {
        check_interrupt()?;
        let left = end.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(Duration::from_millis(20)));
    }
}

/// For the helper subcommands: exit as soon as stdin reaches EOF (the orchestrator closed it or
/// died), from a plain thread so that it works whatever the runtime is doing.
pub fn exit_when_stdin_closes() {
    let spawned = std::thread::Builder::new()
        .name("stdin-watch".into())
        .spawn(|| {
            let mut sink = [0u8; 64];
            let mut stdin = std::io::stdin();
            while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
            std::process::exit(0);
        });
    if let Err(e) = spawned {
        eprintln!("compare: cannot watch stdin ({e}); relying on being killed");
    }
}

/// The temp directory of a run, removed on drop unless kept.
#[derive(Debug)]
struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if self.keep {
            eprintln!("compare: kept {}", self.path.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Output of a command, trimmed, if it ran and succeeded.
fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// `arg` as a POSIX shell word.
fn shell_quote(arg: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./:=,@+%".contains(c);
    if !arg.is_empty() && arg.chars().all(plain) {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', "'\\''"))
    }
}

/// The orchestrator.
fn compare(args: RunArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        !cfg!(debug_assertions),
        "build the load generator in release mode: cargo run --release -p switchyard-benches --bin compare"
    );
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop)).context("signal handler")?;
    }
    let _ = STOP.set(stop);

    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?
        .to_path_buf();
    let me = std::env::current_exe().context("own path")?;
    let mut notes: Vec<String> = Vec::new();

    // The switchyard binary: built now unless told otherwise.
    let switchyard = match &args.switchyard {
        Some(p) => p.clone(),
        None => {
            let target_dir = me
                .parent()
                .and_then(Path::parent)
                .context("own target directory")?;
            if !args.no_build {
                let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
                eprintln!("compare: cargo build --release -p proxy-cli");
                let status = Command::new(cargo)
                    .args(["build", "--release", "-p", "proxy-cli"])
                    .current_dir(&workspace)
                    .env("CARGO_TARGET_DIR", target_dir)
                    .status()
                    .context("cannot run cargo")?;
                anyhow::ensure!(status.success(), "building switchyard failed");
            }
            target_dir.join("release").join("switchyard")
        }
    };
    anyhow::ensure!(
        switchyard.is_file(),
        "no switchyard binary at {}",
        switchyard.display()
    );
    check_interrupt()?;

    // Sizes.
    let quick = args.quick;
    let (soft, hard) = procfs::nofile_limits().unwrap_or((1024, 1024));
    let prlimit = output(Command::new("prlimit").arg("--version")).is_some();
    let fd_limit = if prlimit { hard } else { soft };
    let mut idle_conns = args
        .idle_conns
        .unwrap_or(if quick { 2_000 } else { 10_000 });
    // The proxy holds two descriptors per connection.
    let idle_cap = (fd_limit.saturating_sub(200) / 2) as usize;
    if idle_conns > idle_cap {
        notes.push(format!(
            "idle-rss uses {idle_cap} connections, not {idle_conns}: the open-files limit here is \
             {fd_limit} and the proxy holds two descriptors per connection"
        ));
        idle_conns = idle_cap;
    }
    let plan = Plan {
        rounds: args.rounds.unwrap_or(if quick { 1 } else { 3 }).max(1),
        warmup: args.warmup.unwrap_or(if quick { 0.5 } else { 1.0 }),
        duration: args.duration.unwrap_or(if quick { 2.0 } else { 5.0 }),
        idle_conns,
        warm_handshakes: args.warm_handshakes,
        noise_retries: args.noise_retries,
        targets: Vec::new(),
        scenarios: Vec::new(),
    };
    anyhow::ensure!(
        plan.duration >= 1.0 && plan.duration <= 600.0 && plan.warmup >= 0.0 && plan.warmup <= 60.0,
        "--duration must be 1..600 s and --warmup 0..60 s"
    );
    let mut plan = plan;

    // Targets and scenarios that can run here.
    let wanted = if args.targets.is_empty() {
        Target::ALL.to_vec()
    } else {
        args.targets.clone()
    };
    let mut versions = Vec::new();
    // The commit that last changed switchyard's own sources (not this tool's).
    let commit = output(
        Command::new("git")
            .args(["log", "-1", "--format=%h", "--"])
            .args(SOURCES)
            .current_dir(&workspace),
    )
    .filter(|c| !c.is_empty())
    .unwrap_or_else(|| "unknown".into());
    let dirty = output(
        Command::new("git")
            .args(["status", "--porcelain", "--"])
            .args(SOURCES)
            .current_dir(&workspace),
    )
    .is_some_and(|s| !s.is_empty());
    let commit = format!("{commit}{}", if dirty { "+dirty" } else { "" });
    // Paths are written relative to the workspace: RESULTS.md is committed, and a machine's
    // directory layout says nothing about the figures.
    let shown = switchyard
        .strip_prefix(&workspace)
        .unwrap_or(&switchyard)
        .display()
        .to_string();
    versions.push(if args.switchyard.is_some() {
        format!("switchyard: {shown} (given; not built here)")
    } else {
        format!("switchyard: {shown} built from this workspace at commit {commit} (the last commit changing it)")
    });
    for &t in &wanted {
        if let Some(program) = t.program() {
            if targets::installed(program) {
                versions.push(targets::version(program).unwrap_or_else(|| program.to_string()));
                plan.targets.push(t);
            } else {
                notes.push(format!(
                    "{} skipped: `{program}` is not installed",
                    t.name()
                ));
            }
        } else {
            plan.targets.push(t);
        }
    }
    let mut scenarios = if args.scenarios.is_empty() {
        Scenario::ALL.to_vec()
    } else {
        args.scenarios.clone()
    };
    scenarios.sort();
    scenarios.dedup();
    if targets::installed("wrk") {
        versions.push(targets::version("wrk").unwrap_or_else(|| "wrk".into()));
    } else {
        scenarios.retain(|s| !matches!(s, Scenario::Http | Scenario::WarmHttp));
        notes.push("http and warm-http skipped: `wrk` is not installed".into());
    }
    let tls_planned = scenarios.iter().any(|s| s.tls());
    if tls_planned {
        notes.push(format!("wss scenarios: {}", tls::CLIENT_SUMMARY));
        for &t in &plan.targets {
            if let Some(lib) = t.program().and_then(targets::tls_library) {
                versions.push(format!("{} TLS: {lib}", t.name()));
            }
        }
        if plan.targets.contains(&Target::Direct) {
            notes.push("direct has no TLS end: it is left out of the wss scenarios".into());
        }
    }
    plan.scenarios = scenarios;
    anyhow::ensure!(!plan.targets.is_empty(), "no target can run here");

    // CPUs (and the machine, described before we pin ourselves).
    let machine = procfs::machine();
    let cpus = procfs::allowed_cpus();
    let placement = Placement::for_cpus(&cpus);
    if placement.proxy.is_none() {
        notes.push("only one CPU: nothing is pinned and every figure is indicative only".into());
    }
    if let Some(cpu) = placement.load {
        // Keep our own polling off the proxy's CPU.
        let _ = output(Command::new("taskset").args([
            "-a",
            "-p",
            "-c",
            &cpu.to_string(),
            &std::process::id().to_string(),
        ]));
    }
    let clk_tck = procfs::clock_ticks();
    if !clk_tck.1 {
        notes.push("`getconf CLK_TCK` failed; assumed 100 ticks per second".into());
    }
    if !prlimit {
        notes.push(format!(
            "`prlimit` not found: children keep the open-files limit {soft}"
        ));
    }

    let dir = TempDir {
        path: std::env::temp_dir().join(format!("switchyard-compare-{}", std::process::id())),
        keep: args.keep_temp,
    };
    std::fs::create_dir_all(&dir.path).context("temp dir")?;
    let tls = if tls_planned {
        Some(
            tls::generate(&dir.path)
                .context("cannot make the certificate for the wss scenarios")?,
        )
    } else {
        None
    };
    let env = Env {
        dir: dir.path.clone(),
        switchyard,
        me,
        nofile: prlimit.then_some(hard),
        fd_limit,
        placement,
        clk_tck: clk_tck.0,
        tls,
    };
    // Is the machine quiet? (A parallel build would make every figure NOISY.)
    for cpu in [placement.proxy, placement.load, placement.backend]
        .into_iter()
        .flatten()
        .collect::<std::collections::BTreeSet<_>>()
    {
        let busy = run::busy_pct(cpu, Duration::from_millis(500), clk_tck.0)?;
        if busy >= 10.0 {
            let note = format!("CPU {cpu} was {busy:.0}% busy with other work just before the run");
            eprintln!("compare: warning: {note}");
            notes.push(note);
        }
    }

    let command = {
        let mut c = String::from("cargo run --release -p switchyard-benches --bin compare");
        let rest: Vec<String> = std::env::args().skip(1).map(|a| shell_quote(&a)).collect();
        if !rest.is_empty() {
            c.push_str(" -- ");
            c.push_str(&rest.join(" "));
        }
        c
    };
    let info = report::RunInfo {
        label: args
            .label
            .clone()
            .unwrap_or_else(|| match &args.switchyard {
                Some(p) => format!("switchyard {}", p.display()),
                None => format!("switchyard {commit}"),
            }),
        mode: if quick { "quick" } else { "full" }.into(),
        date: output(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))
            .unwrap_or_else(|| "unknown date".into()),
        command,
        machine,
        placement,
        clk_tck,
        versions,
        notes,
        plan: plan.clone(),
    };
    eprintln!(
        "compare: {} rounds × {} scenarios × {} targets; {}",
        plan.rounds,
        plan.scenarios.len(),
        plan.targets.len(),
        placement.describe()
    );
    for n in &info.notes {
        eprintln!("compare: note: {n}");
    }

    let clk = clk_tck.0;
    let measurements = run::run_plan(&env, &plan, |m| {
        let figure = if !m.ok() {
            format!(
                "ERROR: {}",
                m.error.as_deref().unwrap_or("no units completed")
            )
        } else if let Some(k) = m.kib_per_conn() {
            format!("{} conns, {k:.1} KiB/conn", m.units)
        } else {
            format!(
                "{:.0}/s, proxy {} µs/unit at {}, load core {:.0}%{}",
                m.throughput(),
                m.proxy_us_per_unit(clk)
                    .map_or_else(|| "—".into(), |x| format!("{x:.2}")),
                m.proxy_pct(clk)
                    .map_or_else(|| "—".into(), |x| format!("{x:.0}%")),
                m.load_pct(clk),
                m.foreign_pct(clk)
                    .map_or_else(String::new, |x| format!(", other use of proxy CPU {x:.0}%"))
            )
        };
        let tls = m
            .tls
            .as_ref()
            .map_or_else(String::new, |t| format!(", {t}"));
        eprintln!(
            "compare: [round {}/{}] {:<10} {:<16} {figure}{tls}",
            m.round + 1,
            plan.rounds,
            m.scenario.name(),
            m.target.name()
        );
    })?;

    let section = report::render(&info, &measurements);
    println!("{section}");
    if args.write_results {
        let existing = std::fs::read_to_string(&args.results).unwrap_or_default();
        let key = format!("{} / {}", info.label, info.mode);
        let merged = report::merge_results(&existing, RESULTS_INTRO, &key, &section);
        std::fs::write(&args.results, merged)
            .with_context(|| format!("cannot write {}", args.results.display()))?;
        eprintln!("compare: wrote {}", args.results.display());
    }
    Ok(())
}

/// The top of RESULTS.md (rewritten on every `--write-results`; run sections are kept).
const RESULTS_INTRO: &str = "# switchyard end to end, beside nginx and HAProxy

Written by `cargo run --release -p switchyard-benches --bin compare -- --write-results` (the
source, `benches/src/bin/compare/`, documents the method). Each section below is one run; a run
with the same label and mode replaces its section.

Method in short: one worker per proxy (switchyard `--workers 1`, nginx `master_process off`,
HAProxy `nbthread 1`), the proxy pinned alone on one CPU, the Rust load generator (or wrk) and
the Rust echo backend on the other; a fresh backend and proxy for every scenario; CPU time is
utime+stime from `/proc/<pid>/stat` over the measured window, divided by the units completed.
Figures are medians over rounds; ratios are medians of per-round ratios.

| scenario | what runs | unit |
|---|---|---|
| ping-pong | 32 WebSocket connections, each: send 256 B binary, wait for the echo, repeat | round trip |
| handshakes | 16 at once: connect, upgrade (101 + accept checked), close, EOF | handshake + close |
| http | `wrk -t1 -c32`, the backend answers a 13-byte body, keep-alive | request |
| stream | 8 connections, 16 KiB messages, 32 in flight per connection | message (MB/s = echoed payload) |
| idle-rss | N upgraded connections, one 256 B echo each, then idle | proxy RSS growth per connection |
| warm-http | http on a proxy process that first served 20k handshakes | request |
| wss-handshakes | handshakes over TLS terminated by the proxy: connect, full TLS 1.3 handshake (no resumption), upgrade, close, EOF | handshake + close |
| wss-stream | stream over TLS terminated by the proxy | message (MB/s = echoed payload) |

The wss scenarios use one self-signed ECDSA P-256 certificate, made for the run and served by
every proxy, and one client (rustls) offering only TLS 1.3, AES-128-GCM and X25519, so that the
proxies do the same cryptographic work; the backend behind the proxy stays plain ws.

**NOISY** marks rounds where something else (another build, kernel threads, hypervisor steal)
used ≥ 10% of the proxy's CPU while load ran (from `/proc/stat`); such figures are suspect.
**LOAD-BOUND** marks rounds where a load-side CPU was ≥ 90% busy while the proxy was under 80%:
there the throughput is the load side's, and only the CPU-per-unit figure describes the proxy.
";

#[cfg(test)]
mod tests {
    use super::shell_quote;

    #[test]
    fn command_lines_are_quoted_for_a_shell() {
        assert_eq!(shell_quote("--quick"), "--quick");
        assert_eq!(shell_quote("before: c622304 (x)"), "'before: c622304 (x)'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}
