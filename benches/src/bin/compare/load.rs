//! The WebSocket load generator (`compare load`): one single-threaded tokio runtime, so that it
//! uses exactly the one core it is pinned to and its CPU time is easy to account for.
//!
//! Modes (see [`Mode`]):
//!
//! * `ping-pong` — `conns` connections, each: send one `size`-byte binary message, wait for its
//!   echo, check it, repeat. Unit: one round trip.
//! * `stream` — `conns` connections, each with a writer task that keeps `inflight` messages
//!   outstanding (a semaphore) and a reader task that checks echoes in order. Unit: one echoed
//!   message.
//! * `handshakes` — `conns` workers, each looping: connect, upgrade (the `101` and its
//!   `Sec-WebSocket-Accept` are checked), send a close, read the echoed close, read EOF. Unit: one
//!   such cycle. With `--count N` it stops after N cycles in total instead of running timed.
//! * `idle` — opens `conns` upgraded connections (64 at a time), does one 256-byte echo on each
//!   so the tunnel is fully established, prints `OPEN ...`, and then holds them, doing nothing,
//!   until its stdin closes.
//!
//! With `--tls-ca FILE` every mode runs over TLS (`wss://`): each connection is a full TLS
//! handshake with the client settings of [`crate::tls`], trusting the certificate in `FILE`,
//! before the upgrade. The plain and the TLS client are two implementations of [`Dial`], and every
//! mode is generic over it, so the plain modes stay plain `TcpStream` code (no boxing, no
//! dispatch; the one addition is a `flush` after each write, which is a no-op on TCP).
//! A TLS run also prints `TLS <version> <suite> <group>`, what its first connection negotiated.
//!
//! Correctness: every echo is compared byte for byte with the expected frame (header included),
//! whose payload starts with the message's sequence number, so lost, duplicated, reordered or
//! corrupted messages are all errors. A worker that hits an error stops and the error is
//! reported; a worker that completed no unit during the measured window is reported as stalled.
//!
//! Timed modes run `warmup`, then measure for `duration`: at both edges of that window they read
//! the unit counters and `/proc/<pid>/stat` of every `--watch` pid and of themselves, so the CPU
//! time and the units cover exactly the same interval. The result is one `RESULT ...` line on
//! stdout (see [`LoadResult`]); the process then exits, which drops every connection.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::ws::{self, ClientFrame};
use crate::{procfs, tls};

/// What to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// One message in flight per connection.
    PingPong,
    /// `inflight` messages in flight per connection.
    Stream,
    /// Connect, upgrade, close, repeat.
    Handshakes,
    /// Open upgraded connections and hold them.
    Idle,
}

/// The `compare load` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// The mode.
    #[arg(long, value_enum)]
    pub mode: Mode,
    /// Where to connect (the target's listening address).
    #[arg(long)]
    pub addr: SocketAddr,
    /// Connections (or handshake workers).
    #[arg(long, default_value_t = 32)]
    pub conns: usize,
    /// Message size in bytes (ping-pong, stream).
    #[arg(long, default_value_t = 256)]
    pub size: usize,
    /// Messages outstanding per connection (stream).
    #[arg(long, default_value_t = 32)]
    pub inflight: usize,
    /// Seconds of load before the measured window.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,
    /// Seconds in the measured window.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,
    /// Handshakes: stop after this many in total instead of running timed.
    #[arg(long)]
    pub count: Option<u64>,
    /// Pids whose CPU time is read at the edges of the window.
    #[arg(long)]
    pub watch: Vec<u32>,
    /// Speak TLS (`wss://`), trusting the certificate in this PEM file.
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
}

/// How the load generator reaches the target: plain TCP, or TLS over TCP.
trait Dial: Clone + Send + Sync + 'static {
    /// A connection.
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// Its reading half.
    type Read: AsyncRead + Unpin + Send + 'static;
    /// Its writing half.
    type Write: AsyncWrite + Unpin + Send + 'static;

    /// Connects to `addr` (TLS: and completes the handshake), `TCP_NODELAY` on.
    fn dial(&self, addr: SocketAddr) -> impl Future<Output = anyhow::Result<Self::Stream>> + Send;

    /// Splits a connection for a writer and a reader task.
    fn split(s: Self::Stream) -> (Self::Read, Self::Write);

    /// What the TLS handshakes negotiated, once one has completed.
    fn negotiated(&self) -> Option<String>;
}

/// Plain TCP (`ws://`).
#[derive(Debug, Clone, Copy)]
struct Plain;

impl Dial for Plain {
    type Stream = TcpStream;
    type Read = OwnedReadHalf;
    type Write = OwnedWriteHalf;

    async fn dial(&self, addr: SocketAddr) -> anyhow::Result<TcpStream> {
        let s = TcpStream::connect(addr).await.context("connect")?;
        s.set_nodelay(true)?;
        Ok(s)
    }

    fn split(s: TcpStream) -> (OwnedReadHalf, OwnedWriteHalf) {
        s.into_split()
    }

    fn negotiated(&self) -> Option<String> {
        None
    }
}

/// TLS over TCP (`wss://`) with the client settings of [`crate::tls`]: a full handshake per
/// connection (no resumption), the certificate verified, ALPN `http/1.1` required.
#[derive(Clone)]
struct Tls {
    connector: TlsConnector,
    name: ServerName<'static>,
    /// What the first handshake negotiated.
    seen: Arc<OnceLock<String>>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Tls {
    fn new(ca: &std::path::Path) -> anyhow::Result<Tls> {
        Ok(Tls {
            connector: TlsConnector::from(tls::client_config(ca)?),
            name: tls::server_name()?,
            seen: Arc::new(OnceLock::new()),
        })
    }
}

impl Dial for Tls {
    type Stream = TlsStream<TcpStream>;
    type Read = tokio::io::ReadHalf<TlsStream<TcpStream>>;
    type Write = tokio::io::WriteHalf<TlsStream<TcpStream>>;

    async fn dial(&self, addr: SocketAddr) -> anyhow::Result<TlsStream<TcpStream>> {
        let tcp = Plain.dial(addr).await?;
        let s = self
            .connector
            .connect(self.name.clone(), tcp)
            .await
            .context("TLS handshake")?;
        let (_, conn) = s.get_ref();
        anyhow::ensure!(
            conn.alpn_protocol() == Some(tls::ALPN),
            "the server chose ALPN {:?}, not http/1.1",
            conn.alpn_protocol().map(String::from_utf8_lossy)
        );
        if self.seen.get().is_none() {
            let _ = self.seen.set(tls::negotiated(conn));
        }
        Ok(s)
    }

    fn split(s: Self::Stream) -> (Self::Read, Self::Write) {
        tokio::io::split(s)
    }

    fn negotiated(&self) -> Option<String> {
        self.seen.get().cloned()
    }
}

/// What a load run reports, as one `RESULT` line.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadResult {
    /// Units completed in the window.
    pub units: u64,
    /// The window's length in nanoseconds.
    pub window_ns: u64,
    /// Errors seen (the whole run, warm-up included).
    pub errors: u64,
    /// Workers that completed nothing during the window.
    pub stalled: u64,
    /// CPU ticks used in the window by each `--watch` pid, in order.
    pub ticks: Vec<u64>,
    /// CPU ticks used in the window by the load generator itself.
    pub self_ticks: u64,
}

impl LoadResult {
    /// The `RESULT` line.
    pub fn to_line(&self) -> String {
        let ticks: Vec<String> = self.ticks.iter().map(u64::to_string).collect();
        format!(
            "RESULT units={} window_ns={} errors={} stalled={} self={} ticks={}",
            self.units,
            self.window_ns,
            self.errors,
            self.stalled,
            self.self_ticks,
            ticks.join(",")
        )
    }

    /// Parses a `RESULT` line.
    pub fn parse(line: &str) -> Option<LoadResult> {
        let mut r = LoadResult::default();
        for word in line.strip_prefix("RESULT ")?.split_whitespace() {
            let (k, v) = word.split_once('=')?;
            match k {
                "units" => r.units = v.parse().ok()?,
                "window_ns" => r.window_ns = v.parse().ok()?,
                "errors" => r.errors = v.parse().ok()?,
                "stalled" => r.stalled = v.parse().ok()?,
                "self" => r.self_ticks = v.parse().ok()?,
                "ticks" => {
                    r.ticks = v
                        .split(',')
                        .filter(|t| !t.is_empty())
                        .map(str::parse)
                        .collect::<Result<_, _>>()
                        .ok()?
                }
                _ => return None,
            }
        }
        Some(r)
    }
}

/// State shared by the workers: per-worker unit counters and the errors.
#[derive(Debug)]
struct Shared {
    units: Box<[AtomicU64]>,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Shared {
    fn new(workers: usize) -> Arc<Self> {
        Arc::new(Shared {
            units: (0..workers).map(|_| AtomicU64::new(0)).collect(),
            errors: AtomicU64::new(0),
            first_error: Mutex::new(None),
        })
    }

    fn error(&self, e: &anyhow::Error) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut first) = self.first_error.lock() {
            first.get_or_insert_with(|| format!("{e:#}"));
        }
    }

    fn snapshot(&self) -> Vec<u64> {
        self.units
            .iter()
            .map(|u| u.load(Ordering::Relaxed))
            .collect()
    }
}

/// Runs `compare load`.
pub fn run(args: LoadArgs) -> anyhow::Result<()> {
    crate::exit_when_stdin_closes();
    anyhow::ensure!(args.conns > 0, "--conns must be positive");
    anyhow::ensure!(
        args.size >= ws::SEQ_LEN,
        "--size must be at least {}",
        ws::SEQ_LEN
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the load runtime")?;
    rt.block_on(async move {
        match &args.tls_ca {
            None => run_mode(&args, Plain).await,
            Some(ca) => run_mode(&args, Tls::new(ca)?).await,
        }
    })
}

async fn run_mode<D: Dial>(args: &LoadArgs, dial: D) -> anyhow::Result<()> {
    match args.mode {
        Mode::Idle => idle(args, dial).await,
        Mode::Handshakes if args.count.is_some() => counted_handshakes(args, dial).await,
        _ => timed(args, dial).await,
    }
}

/// The result of a measured window: `units` done in `window`, and the CPU ticks of the watched
/// pids and of this process since `start` (as read by [`ticks`] when the window opened).
fn window_result(
    shared: &Shared,
    watch: &[u32],
    start: (&[u64], u64),
    units: u64,
    stalled: u64,
    window: Duration,
) -> anyhow::Result<LoadResult> {
    let (watch0, self0) = start;
    let (watch1, self1) = ticks(watch)?;
    Ok(LoadResult {
        units,
        window_ns: window.as_nanos() as u64,
        errors: shared.errors.load(Ordering::Relaxed),
        stalled,
        ticks: watch1
            .iter()
            .zip(watch0)
            .map(|(b, a)| b.saturating_sub(*a))
            .collect(),
        self_ticks: self1.saturating_sub(self0),
    })
}

/// Prints the first error (if any), what TLS negotiated (if anything), and the result line.
fn report(shared: &Shared, dial: &impl Dial, result: &LoadResult) {
    if let Ok(first) = shared.first_error.lock() {
        if let Some(e) = first.as_ref() {
            println!("ERROR {}", e.replace('\n', " "));
        }
    }
    if let Some(tls) = dial.negotiated() {
        println!("TLS {tls}");
    }
    println!("{}", result.to_line());
}

/// CPU ticks of every watched pid, then our own.
fn ticks(watch: &[u32]) -> anyhow::Result<(Vec<u64>, u64)> {
    let watched = watch
        .iter()
        .map(|&pid| procfs::cpu_ticks(pid))
        .collect::<anyhow::Result<_>>()?;
    Ok((watched, procfs::cpu_ticks(std::process::id())?))
}

async fn timed<D: Dial>(args: &LoadArgs, dial: D) -> anyhow::Result<()> {
    let shared = Shared::new(args.conns);
    let host = args.addr.to_string();
    let upgrade = Arc::new(ws::upgrade_request(&host));
    // Connections for the message modes are opened before the clock starts.
    let mut streams = Vec::with_capacity(args.conns);
    if args.mode != Mode::Handshakes {
        for _ in 0..args.conns {
            let open = connect_ws(&dial, args.addr, &upgrade);
            let s = tokio::time::timeout(Duration::from_secs(10), open)
                .await
                .context("opening a connection took over 10 s")?
                .context("opening a connection")?;
            streams.push(s);
        }
    }
    match args.mode {
        Mode::PingPong => {
            for (i, s) in streams.into_iter().enumerate() {
                let shared = Arc::clone(&shared);
                let size = args.size;
                tokio::spawn(async move {
                    if let Err(e) = ping_pong(s, i, size, &shared.units[i]).await {
                        shared.error(&e);
                    }
                });
            }
        }
        Mode::Stream => {
            for (i, s) in streams.into_iter().enumerate() {
                stream::<D>(s, i, args.size, args.inflight, &shared);
            }
        }
        Mode::Handshakes => {
            for i in 0..args.conns {
                let shared = Arc::clone(&shared);
                let (dial, addr, upgrade) = (dial.clone(), args.addr, Arc::clone(&upgrade));
                tokio::spawn(async move {
                    let r = handshakes(&dial, addr, &upgrade, i, &shared.units[i], None).await;
                    if let Err(e) = r {
                        shared.error(&e);
                    }
                });
            }
        }
        Mode::Idle => unreachable!("idle is not timed"),
    }
    tokio::time::sleep(Duration::from_secs_f64(args.warmup)).await;
    let (watch0, self0) = ticks(&args.watch)?;
    let units0 = shared.snapshot();
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(args.duration)).await;
    let units1 = shared.snapshot();
    let window = t0.elapsed();
    let units = units1.iter().sum::<u64>() - units0.iter().sum::<u64>();
    let stalled = units0.iter().zip(&units1).filter(|(a, b)| a == b).count() as u64;
    let result = window_result(
        &shared,
        &args.watch,
        (&watch0, self0),
        units,
        stalled,
        window,
    )?;
    report(&shared, &dial, &result);
    Ok(())
}

/// `--count` handshakes in total, as fast as `conns` workers go; bounded by 300 s.
async fn counted_handshakes<D: Dial>(args: &LoadArgs, dial: D) -> anyhow::Result<()> {
    let total = args.count.unwrap_or(0);
    let shared = Shared::new(args.conns);
    let upgrade = Arc::new(ws::upgrade_request(&args.addr.to_string()));
    let tickets = Arc::new(AtomicU64::new(0));
    let (watch0, self0) = ticks(&args.watch)?;
    let t0 = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..args.conns {
        let shared = Arc::clone(&shared);
        let (addr, upgrade, tickets) = (args.addr, Arc::clone(&upgrade), Arc::clone(&tickets));
        let dial = dial.clone();
        set.spawn(async move {
            let quota = Some((&*tickets, total));
            if let Err(e) = handshakes(&dial, addr, &upgrade, i, &shared.units[i], quota).await {
                shared.error(&e);
            }
        });
    }
    let all = async { while set.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(300), all)
        .await
        .is_err()
    {
        shared.error(&anyhow::anyhow!("{total} handshakes took over 300 s"));
    }
    let window = t0.elapsed();
    let units: u64 = shared.snapshot().iter().sum();
    let result = window_result(&shared, &args.watch, (&watch0, self0), units, 0, window)?;
    report(&shared, &dial, &result);
    Ok(())
}

/// Opens `conns` upgraded connections with one echo each, reports, and holds them.
async fn idle<D: Dial>(args: &LoadArgs, dial: D) -> anyhow::Result<()> {
    let shared = Shared::new(1);
    let upgrade = Arc::new(ws::upgrade_request(&args.addr.to_string()));
    let gate = Arc::new(Semaphore::new(64));
    let t0 = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..args.conns {
        let (addr, upgrade, gate) = (args.addr, Arc::clone(&upgrade), Arc::clone(&gate));
        let dial = dial.clone();
        set.spawn(async move {
            let _permit = gate.acquire().await.context("gate closed")?;
            let open = async {
                let mut s = connect_ws(&dial, addr, &upgrade).await?;
                let mut frame = ClientFrame::new(256, i);
                frame.set_seq(i as u64);
                s.write_all(frame.wire()).await?;
                s.flush().await?;
                let mut echo = vec![0; frame.echo().len()];
                s.read_exact(&mut echo).await?;
                anyhow::ensure!(echo == frame.echo(), "echo mismatch");
                Ok(s)
            };
            tokio::time::timeout(Duration::from_secs(30), open)
                .await
                .context("opening an idle connection took over 30 s")?
        });
    }
    let mut held = Vec::with_capacity(args.conns);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    loop {
        match tokio::time::timeout_at(deadline, set.join_next()).await {
            Ok(Some(Ok(Ok(s)))) => held.push(s),
            Ok(Some(Ok(Err(e)))) => shared.error(&e),
            Ok(Some(Err(e))) => shared.error(&anyhow::anyhow!("task: {e}")),
            Ok(None) => break,
            Err(_) => {
                shared.error(&anyhow::anyhow!("opening connections took over 300 s"));
                break;
            }
        }
    }
    if let Ok(first) = shared.first_error.lock() {
        if let Some(e) = first.as_ref() {
            println!("ERROR {}", e.replace('\n', " "));
        }
    }
    println!(
        "OPEN conns={} errors={} ms={}",
        held.len(),
        shared.errors.load(Ordering::Relaxed),
        t0.elapsed().as_millis()
    );
    // Hold them until stdin closes (the stdin watcher exits the process), bounded.
    tokio::time::sleep(Duration::from_secs(600)).await;
    drop(held);
    Ok(())
}

/// Connects and upgrades; checks the `101` and its accept value. Nothing may follow the head.
///
/// Every write is followed by a flush: a no-op on TCP, but a TLS stream may keep the tail of a
/// write in its buffer when the socket is full, and a peer waiting for it would wait forever.
async fn connect_ws<D: Dial>(
    dial: &D,
    addr: SocketAddr,
    upgrade: &[u8],
) -> anyhow::Result<D::Stream> {
    let mut s = dial.dial(addr).await?;
    s.write_all(upgrade).await.context("writing the upgrade")?;
    s.flush().await.context("writing the upgrade")?;
    let mut buf = [0u8; 2048];
    let mut len = 0;
    loop {
        let n = s.read(&mut buf[len..]).await.context("reading the 101")?;
        anyhow::ensure!(n > 0, "EOF before the end of the response head");
        len += n;
        let mut headers = [httparse::EMPTY_HEADER; 24];
        let mut resp = httparse::Response::new(&mut headers);
        match resp
            .parse(&buf[..len])
            .context("parsing the response head")?
        {
            httparse::Status::Partial => {
                anyhow::ensure!(len < buf.len(), "response head over {} bytes", buf.len());
            }
            httparse::Status::Complete(head) => {
                anyhow::ensure!(
                    resp.code == Some(101),
                    "upgrade answered {:?}: {}",
                    resp.code,
                    String::from_utf8_lossy(&buf[..head.min(200)])
                );
                let accept = resp
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("sec-websocket-accept"))
                    .map(|h| h.value);
                anyhow::ensure!(
                    accept == Some(SERVER_ACCEPT.as_bytes()),
                    "101 with a wrong Sec-WebSocket-Accept"
                );
                anyhow::ensure!(head == len, "{} bytes after the 101", len - head);
                return Ok(s);
            }
        }
    }
}

/// The accept value for [`ws::CLIENT_KEY`].
const SERVER_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

async fn ping_pong(
    mut s: impl AsyncRead + AsyncWrite + Unpin,
    index: usize,
    size: usize,
    units: &AtomicU64,
) -> anyhow::Result<()> {
    let mut frame = ClientFrame::new(size, index);
    let mut echo = vec![0; frame.echo().len()];
    for seq in 0u64.. {
        frame.set_seq(seq);
        s.write_all(frame.wire()).await.context("write")?;
        s.flush().await.context("write")?;
        s.read_exact(&mut echo).await.context("read")?;
        anyhow::ensure!(echo == frame.echo(), "echo of message {seq} differs");
        units.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// Starts the writer and reader tasks of one pipelined connection.
fn stream<D: Dial>(s: D::Stream, index: usize, size: usize, inflight: usize, shared: &Arc<Shared>) {
    let (r, mut w) = D::split(s);
    let window = Arc::new(Semaphore::new(inflight));
    {
        let (window, shared) = (Arc::clone(&window), Arc::clone(shared));
        tokio::spawn(async move {
            let mut frame = ClientFrame::new(size, index);
            let writer = async {
                for seq in 0u64.. {
                    window.acquire().await.context("window closed")?.forget();
                    frame.set_seq(seq);
                    w.write_all(frame.wire()).await.context("write")?;
                    w.flush().await.context("write")?;
                }
                anyhow::Ok(())
            };
            if let Err(e) = writer.await {
                shared.error(&e);
            }
        });
    }
    let shared = Arc::clone(shared);
    tokio::spawn(async move {
        let mut expected = ClientFrame::new(size, index);
        let mut echo = vec![0; expected.echo().len()];
        let mut r = BufReader::with_capacity(256 * 1024, r);
        let reader = async {
            for seq in 0u64.. {
                r.read_exact(&mut echo).await.context("read")?;
                expected.set_seq(seq);
                anyhow::ensure!(echo == expected.echo(), "echo of message {seq} differs");
                window.add_permits(1);
                shared.units[index].fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        };
        if let Err(e) = reader.await {
            shared.error(&e);
        }
    });
}

/// Handshake cycles until the runtime stops (timed) or the shared quota is used up.
///
/// Over TLS, the end of the stream may come without a `close_notify` alert: browsers accept
/// that, and so does this client (tokio-rustls reports it as `UnexpectedEof`, which plain TCP
/// never does).
async fn handshakes<D: Dial>(
    dial: &D,
    addr: SocketAddr,
    upgrade: &[u8],
    index: usize,
    units: &AtomicU64,
    quota: Option<(&AtomicU64, u64)>,
) -> anyhow::Result<()> {
    let close = ws::client_close(index);
    let mut reply = [0u8; 4];
    let mut rest = [0u8; 16];
    loop {
        if let Some((tickets, total)) = quota {
            if tickets.fetch_add(1, Ordering::Relaxed) >= total {
                return Ok(());
            }
        }
        let mut s = connect_ws(dial, addr, upgrade).await?;
        s.write_all(&close).await.context("writing the close")?;
        s.flush().await.context("writing the close")?;
        s.read_exact(&mut reply)
            .await
            .context("reading the close")?;
        anyhow::ensure!(
            reply == ws::SERVER_CLOSE_1000,
            "close answered with {reply:02x?}"
        );
        let n = match s.read(&mut rest).await {
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => 0,
            r => r.context("reading EOF")?,
        };
        anyhow::ensure!(n == 0, "{n} bytes after the close");
        units.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_lines_round_trip() {
        let r = LoadResult {
            units: 123_456,
            window_ns: 5_000_000_123,
            errors: 2,
            stalled: 1,
            ticks: vec![499, 12],
            self_ticks: 301,
        };
        assert_eq!(LoadResult::parse(&r.to_line()), Some(r.clone()));
        let no_watch = LoadResult { ticks: vec![], ..r };
        assert_eq!(LoadResult::parse(&no_watch.to_line()), Some(no_watch));
        assert_eq!(LoadResult::parse("RESULT units=x"), None);
        assert_eq!(LoadResult::parse("OPEN conns=1"), None);
    }

    #[test]
    fn the_expected_accept_is_the_one_for_the_client_key() {
        assert_eq!(SERVER_ACCEPT, ws::accept_key(ws::CLIENT_KEY.as_bytes()));
    }
}
