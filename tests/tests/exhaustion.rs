//! Running out of descriptors (on every runtime), and what idle WebSockets cost (tokio, smol).
//!
//! * `accept_recovers_after_descriptor_exhaustion`: with the open-files limit lowered so that
//!   the descriptor table is full, the proxy's `accept` fails with `EMFILE` while connections
//!   wait in its backlog. The proxy must neither die nor spin (its accept loop backs off
//!   50 ms after an accept error), must go on serving the tunnels it has, answer a request
//!   that needs a new upstream connection with a clean 503 (the proxy's own trouble, not the
//!   server's: it is not marked failed), and, once held connections are
//!   closed, accept the waiting connections and serve them and new ones in full.
//! * `ten_thousand_idle_websockets`: N idle WebSocket tunnels through one proxy process (a
//!   child process, so that its memory and descriptors are its own), with the proxy's resident
//!   memory per connection printed and bounded, and every descriptor given back once the
//!   clients have gone.
//!
//! Both change state that belongs to the whole process (its open-files limit, most of its
//! descriptor table), so every scenario in this binary takes [`EXCLUSIVE`] first, and this
//! binary holds nothing else.
//!
//! Limits are changed with `prlimit(1)` (util-linux) acting on this process's own pid, which
//! is `prlimit(2)`, the same as `setrlimit(2)` on oneself: the workspace forbids `unsafe`
//! code, so `libc::setrlimit` cannot be called from a test.
#![cfg(target_os = "linux")]

use std::fs::File;
use std::io::{Read, Seek};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use switchyard_tests::origin::ws_echo;
use switchyard_tests::{child, config_for, runtime_tests, start_proxy, Runtime, WAIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

runtime_tests! {
    accept_recovers_after_descriptor_exhaustion,
}

/// On tokio and smol: the state an idle tunnel keeps is the adapter's (`proxy-tokio`,
/// `proxy-smol`), which tokio multi-threaded and async-std share (they measured the same, 3.3
/// and 2.9 KiB), and each run takes about 10 s of a debug build.
mod ten_thousand_idle_websockets {
    use switchyard_tests::{run_scenario, Runtime};

    #[test]
    fn tokio() {
        run_scenario(Runtime::Tokio, super::ten_thousand_idle_websockets);
    }

    #[test]
    fn smol() {
        run_scenario(Runtime::Smol, super::ten_thousand_idle_websockets);
    }
}

/// One scenario at a time: they change the process's open-files limit and fill its
/// descriptor table.
static EXCLUSIVE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Tasks a serving proxy runs with no connection open: one accept loop and the pool reaper.
const IDLE_TASKS: usize = 2;

// ---- descriptor exhaustion ----

/// WebSocket tunnels held open while the table is full; closing them gives descriptors back.
const HELD: usize = 200;
/// Connections that reach the proxy's backlog while it cannot accept.
const PENDING: usize = 32;
/// How long the proxy is watched while its accepts fail.
const SPIN_WINDOW: Duration = Duration::from_secs(1);
/// Most CPU time the whole process may use in [`SPIN_WINDOW`]. An accept loop that retried
/// without pausing would use a core for the whole window (1 s, or about half of it on a
/// machine busy elsewhere); backing off 50 ms costs about 20 failed `accept` calls, well under
/// 10 ms.
const SPIN_CPU_BOUND: Duration = Duration::from_millis(250);

/// `EMFILE` at accept, and recovery from it.
///
/// The limit is set to the lowest free descriptor number once the held connections are open,
/// so the table is exactly full: no new descriptor can be made anywhere in the process, and
/// whoever closes one makes room for exactly one. The waiting clients' sockets are created
/// before that and only connected after it, so that they are certain to be waiting in the
/// proxy's backlog when its `accept` fails. Recovery is checked with the lowered limit still
/// in force: the proxy must use the descriptors that were given back, not a higher limit.
/// (`ENFILE`, the system-wide table, takes the same path in the accept loop but cannot be
/// provoked without changing the whole machine.)
async fn accept_recovers_after_descriptor_exhaustion(rt: Runtime) {
    let _one_at_a_time = EXCLUSIVE.lock().await;
    let me = std::process::id();
    let (soft, hard) = nofile_limits(me);
    let ticks_per_second = clock_ticks();
    let echo = ws_echo().await;
    let proxy = start_proxy(rt, config_for(&[echo]));
    // Warm-up: whatever the runtimes open lazily is open before the table is filled.
    let mut first = open_tunnel(proxy.addr).await;
    echo_roundtrip(&mut first, b"warm-up").await;
    drop(first);
    wait_until("the warm-up connection to close", || {
        proxy.stats.connections() == 0
    })
    .await;

    // Declared before the connections: on a failure it is dropped after them, when they have
    // given their descriptors back and `prlimit` can be started again.
    let mut limit = LimitGuard {
        pid: me,
        soft,
        hard,
        lowered: false,
    };
    // Read again (from offset 0) while the table is full, when nothing can be opened.
    let mut stat = File::open("/proc/self/stat").expect("open /proc/self/stat");
    let pending: Vec<socket2::Socket> = (0..PENDING)
        .map(|_| {
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                .expect("a client socket")
        })
        .collect();
    let mut held = Vec::with_capacity(HELD);
    for _ in 0..HELD {
        held.push(open_tunnel(proxy.addr).await);
    }
    // One connection that will ask for something needing a new upstream connection.
    let mut plain = connect(proxy.addr).await;
    wait_until("the proxy to accept the held connections", || {
        proxy.stats.connections() == HELD + 1
    })
    .await;
    let accepted = proxy.stats.accepted();

    // Fill the table: the limit becomes the lowest free descriptor number.
    let full_at = u64::try_from(lowest_free_fd()).expect("a descriptor number");
    limit.lower(full_at);
    // A descriptor closed since the lowest free number was read left a hole below the limit:
    // filled here, so that the table is full whatever closed.
    let mut fillers = Vec::new();
    let refused = loop {
        match File::open("/dev/null") {
            Ok(f) if fillers.len() < 64 => fillers.push(f),
            Ok(_) => panic!("the descriptor table does not fill up below {full_at}"),
            Err(e) => break e,
        }
    };
    assert_eq!(
        refused.raw_os_error(),
        Some(libc::EMFILE),
        "opening a file with the table full: {refused}"
    );
    // Loopback connects complete in the kernel (the backlog is far from full): no descriptor
    // is made here, and none can be made by the proxy's accept.
    let addr = proxy.addr;
    let pending = tokio::task::spawn_blocking(move || {
        for s in &pending {
            s.connect(&addr.into())
                .expect("a loopback connect completes in the kernel");
        }
        pending
    })
    .await
    .expect("connect the waiting clients");

    // (a) Neither dies nor spins.
    let cpu_before = cpu_time(&mut stat, ticks_per_second);
    let window = Instant::now();
    // Alive: a tunnel it holds still carries messages both ways.
    echo_roundtrip(&mut held[HELD / 2], b"while accept fails").await;
    // An observation window, not a synchronisation: what is measured is work not done.
    tokio::time::sleep_until((window + SPIN_WINDOW).into()).await;
    let cpu = cpu_time(&mut stat, ticks_per_second).saturating_sub(cpu_before);
    let elapsed = window.elapsed();
    eprintln!("{rt:?}: {cpu:?} of CPU time in {elapsed:?} while accept failed with EMFILE");
    assert!(
        cpu < SPIN_CPU_BOUND,
        "{rt:?}: the process used {cpu:?} of CPU in {elapsed:?} while the proxy's accept \
         failed: the accept loop spins"
    );
    assert_eq!(
        proxy.stats.accepted(),
        accepted,
        "{rt:?}: a connection was accepted with the descriptor table full"
    );
    assert_eq!(proxy.stats.connections(), HELD + 1);
    assert!(
        proxy.stats.accept_errors() > 0,
        "{rt:?}: the failed accepts are counted"
    );
    // A request needing a new upstream connection: the proxy cannot make its socket and says so.
    plain
        .write_all(b"GET /needs-upstream HTTP/1.1\r\nHost: switchyard.test\r\n\r\n")
        .await
        .expect("send the request");
    let answer = read_to_close(&mut plain).await;
    assert_eq!(
        String::from_utf8_lossy(&answer),
        String::from_utf8_lossy(&proxy_error(503, "Service Unavailable")),
        "{rt:?}: a request needing an upstream socket while none can be made"
    );

    // (b) Give descriptors back; the waiting connections are accepted and served.
    drop(plain);
    drop(held);
    drop(fillers);
    wait_until("the proxy to accept the waiting connections", || {
        proxy.stats.accepted() >= accepted + PENDING as u64
    })
    .await;
    // Still under the lowered limit: each waiting connection is served in full, and so is a
    // new one.
    let mut late: Vec<TcpStream> = pending
        .into_iter()
        .map(|s| {
            let s = std::net::TcpStream::from(s);
            s.set_nonblocking(true).expect("non-blocking");
            TcpStream::from_std(s).expect("register with the test runtime")
        })
        .collect();
    for (i, s) in late.iter_mut().enumerate() {
        handshake(s).await;
        echo_roundtrip(s, format!("accepted late {i}").as_bytes()).await;
    }
    let mut fresh = open_tunnel(proxy.addr).await;
    echo_roundtrip(&mut fresh, b"a new connection").await;
    limit.restore();

    drop(late);
    drop(fresh);
    wait_until("the proxy to close every connection", || {
        proxy.stats.connections() == 0 && proxy.stats.tasks() == IDLE_TASKS
    })
    .await;
    tokio::task::spawn_blocking(move || proxy.stop())
        .await
        .expect("stop the proxy");
}

/// Restores this process's open-files limits once lowered, also when a scenario fails.
#[derive(Debug)]
struct LimitGuard {
    pid: u32,
    soft: u64,
    hard: u64,
    lowered: bool,
}

impl LimitGuard {
    /// Lowers the soft limit to `soft`, keeping the hard one.
    fn lower(&mut self, soft: u64) {
        set_nofile(self.pid, soft, self.hard).unwrap_or_else(|e| panic!("{e}"));
        self.lowered = true;
    }

    /// Restores the limits; panics if that fails.
    fn restore(&mut self) {
        set_nofile(self.pid, self.soft, self.hard).unwrap_or_else(|e| panic!("{e}"));
        self.lowered = false;
        assert_eq!(nofile_limits(self.pid), (self.soft, self.hard));
    }
}

impl Drop for LimitGuard {
    fn drop(&mut self) {
        if !self.lowered {
            return;
        }
        // A failing scenario: the descriptors may be coming back only now. Bounded retries.
        for _ in 0..100 {
            if set_nofile(self.pid, self.soft, self.hard).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "could not restore the open-files limit to {}:{}",
            self.soft, self.hard
        );
    }
}

// ---- idle WebSockets ----

/// Idle tunnels wanted.
const IDLE_TUNNELS: u64 = 10_000;
/// Descriptors the proxy process holds besides its tunnels (stdio, the listener, the runtime,
/// the test harness), with room to spare.
const PROXY_OWN_FDS: u64 = 100;
/// Handshakes in flight at once.
const CONCURRENCY: usize = 64;
/// Most resident memory the proxy may spend on one idle tunnel (measured: about 3 KiB).
const RSS_PER_TUNNEL_BOUND: u64 = 16 * 1024;

/// `N` idle WebSocket tunnels through one proxy: what each costs it in resident memory (printed
/// and bounded), and every descriptor given back once the clients are gone.
///
/// Clients (this process), proxy and echo upstream are three processes, each within its own
/// open-files limit and each with its soft limit raised to its hard limit. The proxy holds two
/// descriptors per tunnel (client and upstream side), and without `CAP_SYS_RESOURCE` no
/// process can go past its hard limit; so `N = min(10,000, (hard - 100) / 2)`. Where the hard
/// limit is 20,000 (the machine this was written on), that is 9,950 tunnels, not 10,000.
///
/// The figure measured is the proxy process's VmRSS after `N` handshakes minus before them
/// (after a warm-up), divided by `N`: userland memory per tunnel. Socket buffers are kernel
/// memory and not part of it.
async fn ten_thousand_idle_websockets(rt: Runtime) {
    let _one_at_a_time = EXCLUSIVE.lock().await;
    raise_nofile_to_hard();
    let (_, hard) = nofile_limits(std::process::id());
    let n = usize::try_from(IDLE_TUNNELS.min(hard.saturating_sub(PROXY_OWN_FDS) / 2))
        .expect("a tunnel count");
    assert!(
        n >= 100,
        "an open-files limit of {hard} leaves room for {n} tunnels only"
    );
    let echo = spawn_child(Role::Echo).await;
    let proxy = spawn_child(Role::Proxy(rt, echo.addr)).await;
    let pid = proxy.pid();

    // Warm-up: the proxy's runtime is up, its threads have their read buffers and the
    // allocator its arenas.
    let warm = open_many(proxy.addr, CONCURRENCY).await;
    for (i, mut s) in warm.into_iter().enumerate() {
        echo_roundtrip(&mut s, format!("warm-up {i}").as_bytes()).await;
    }
    let base_fds = settled_fds(pid).await;
    let rss_before = vm_rss(pid);

    let started = Instant::now();
    let mut tunnels = open_many(proxy.addr, n).await;
    let opened_in = started.elapsed();
    // A sample carries a message through, both ways.
    let step = (n / 16).max(1);
    for i in (0..n).step_by(step) {
        echo_roundtrip(&mut tunnels[i], format!("idle {i}").as_bytes()).await;
    }
    let rss_after = vm_rss(pid);
    let fds = open_fds(pid);
    assert!(
        fds >= base_fds + 2 * n,
        "{rt:?}: the proxy holds {fds} descriptors for {n} tunnels (it had {base_fds})"
    );
    let per_tunnel = rss_after.saturating_sub(rss_before) / n as u64;
    eprintln!(
        "{rt:?}: {n} idle WebSockets opened in {opened_in:?}; proxy RSS {} KiB -> {} KiB: \
         {per_tunnel} bytes ({:.1} KiB) per connection; descriptors {base_fds} -> {fds}",
        rss_before >> 10,
        rss_after >> 10,
        per_tunnel as f64 / 1024.0
    );
    assert!(
        per_tunnel < RSS_PER_TUNNEL_BOUND,
        "{rt:?}: {per_tunnel} bytes of resident memory per idle tunnel"
    );

    // The clients go; the proxy closes both sides of every tunnel.
    drop(tunnels);
    fds_back_to(pid, base_fds, "after the clients closed").await;
    proxy.finish().await;
    echo.finish().await;
}

/// `count` tunnels to `addr`, [`CONCURRENCY`] handshakes at a time.
async fn open_many(addr: SocketAddr, count: usize) -> Vec<TcpStream> {
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..CONCURRENCY.min(count) {
        workers.spawn(async move {
            let mut mine = Vec::new();
            for _ in (w..count).step_by(CONCURRENCY) {
                mine.push(open_tunnel(addr).await);
            }
            mine
        });
    }
    let mut all = Vec::with_capacity(count);
    while let Some(done) = workers.join_next().await {
        all.extend(done.expect("a handshake worker"));
    }
    assert_eq!(all.len(), count);
    all
}

/// `pid`'s descriptor count once it has not changed for 250 ms (five polls), bounded by
/// [`WAIT`]. Polled: a count has no event to await.
async fn settled_fds(pid: u32) -> usize {
    let deadline = Instant::now() + WAIT;
    let (mut last, mut same) = (open_fds(pid), 0);
    while same < 5 {
        assert!(
            Instant::now() < deadline,
            "the proxy's descriptors did not settle within {WAIT:?}: {last}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = open_fds(pid);
        same = if now == last { same + 1 } else { 0 };
        last = now;
    }
    last
}

/// Waits (bounded by [`WAIT`]) until `pid` has at most `target` descriptors open. Polled: a
/// count has no event to await.
async fn fds_back_to(pid: u32, target: usize, when: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let now = open_fds(pid);
        if now <= target {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{when}: the proxy holds {now} descriptors {WAIT:?} on, {target} before"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---- child processes ----

/// Set in a child: which part it plays.
const ROLE_ENV: &str = "SWITCHYARD_EXHAUSTION_CHILD";
/// The proxy child's runtime (`Tokio`, `TokioMulti`, `Smol`, `AsyncStd`).
const RUNTIME_ENV: &str = "SWITCHYARD_CHILD_RUNTIME";
/// The proxy child's upstream.
const UPSTREAM_ENV: &str = "SWITCHYARD_CHILD_UPSTREAM";

/// The part a child process plays.
#[derive(Debug, Clone, Copy)]
enum Role {
    /// A WebSocket echo upstream ([`light_echo`]).
    Echo,
    /// The proxy on this runtime, in front of this upstream.
    Proxy(Runtime, SocketAddr),
}

/// The body of a child process: this test binary, started again with only this test selected
/// and [`ROLE_ENV`] set. It raises its own open-files limit, serves, prints its address, and
/// stops when its stdin closes (so it cannot outlive the test that started it).
#[test]
#[ignore = "the body of the child processes this file's tests start; does nothing on its own"]
fn child_process() {
    let Ok(role) = std::env::var(ROLE_ENV) else {
        return;
    };
    raise_nofile_to_hard();
    match role.as_str() {
        "echo" => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("echo runtime");
            let addr = runtime.block_on(light_echo());
            println!("{}{addr}", child::ADDR_PREFIX);
            child::wait_for_stdin_to_close();
            runtime.shutdown_background();
        }
        "proxy" => {
            let rt = child::runtime_named(&std::env::var(RUNTIME_ENV).expect("a runtime"));
            let upstream: SocketAddr = std::env::var(UPSTREAM_ENV)
                .expect("an upstream")
                .parse()
                .expect("an upstream address");
            child::serve_proxy_until_stdin_closes(rt, upstream);
        }
        other => panic!("no child role {other:?}"),
    }
}

/// A WebSocket echo upstream light enough for ten thousand idle connections in a debug build
/// (the test's CPU time is mostly handshakes): it answers the upgrade with a genuine 101, then
/// sends each short masked frame back unmasked, a Close included; anything else, or EOF, ends
/// the connection.
async fn light_echo() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the echo upstream");
    let addr = listener.local_addr().expect("the echo's address");
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(light_echo_connection(s));
        }
    });
    addr
}

async fn light_echo_connection(mut s: TcpStream) -> Option<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 512];
    let head_len = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk).await.ok().filter(|n| *n > 0)?;
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_len]).into_owned();
    let key = header_value(&head, "sec-websocket-key")?;
    let accept = proxy_core::websocket_accept(key.as_bytes());
    let reply = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        String::from_utf8_lossy(&accept)
    );
    s.write_all(reply.as_bytes()).await.ok()?;
    buf.drain(..head_len);
    buf.shrink_to_fit();
    loop {
        // A complete short masked frame: two header bytes, the mask, the payload.
        if buf.len() >= 2 {
            let (masked, len) = (buf[1] & 0x80 != 0, usize::from(buf[1] & 0x7f));
            if !masked || len >= 126 {
                return None;
            }
            if buf.len() >= 6 + len {
                let frame: Vec<u8> = buf.drain(..6 + len).collect();
                let mut out = vec![frame[0], frame[1] & 0x7f];
                out.extend(
                    frame[6..]
                        .iter()
                        .zip(frame[2..6].iter().cycle())
                        .map(|(b, m)| b ^ m),
                );
                s.write_all(&out).await.ok()?;
                if frame[0] & 0x0f == 0x8 {
                    return Some(());
                }
                continue;
            }
        }
        let n = s.read(&mut chunk).await.ok().filter(|n| *n > 0)?;
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The value of the first header field named `name` (case-insensitive) in a head.
fn header_value(head: &str, name: &str) -> Option<String> {
    head.split("\r\n").skip(1).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_owned())
    })
}

/// Starts a child playing `role` (see [`child_process`]) and waits (bounded) for its address.
async fn spawn_child(role: Role) -> child::Child {
    let env = match role {
        Role::Echo => vec![(ROLE_ENV, "echo".to_owned())],
        Role::Proxy(rt, upstream) => vec![
            (ROLE_ENV, "proxy".to_owned()),
            (RUNTIME_ENV, format!("{rt:?}")),
            (UPSTREAM_ENV, upstream.to_string()),
        ],
    };
    child::Child::spawn("child_process", &env).await
}

// ---- helpers ----

/// `pid`'s open-files limits (soft, hard) from `/proc/<pid>/limits`; `u64::MAX` is unlimited.
fn nofile_limits(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/limits: {e}"));
    let rest = text
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .expect("a `Max open files` line");
    let mut values = rest.split_whitespace().map(|v| match v {
        "unlimited" => u64::MAX,
        v => v.parse().expect("a numeric limit"),
    });
    (
        values.next().expect("the soft limit"),
        values.next().expect("the hard limit"),
    )
}

/// Sets `pid`'s open-files limits with `prlimit(1)`. Never panics (it runs in a `Drop`), and
/// opens nothing once `prlimit` has run (the table may be full then).
fn set_nofile(pid: u32, soft: u64, hard: u64) -> Result<(), String> {
    let show = |v: u64| {
        if v == u64::MAX {
            "unlimited".to_owned()
        } else {
            v.to_string()
        }
    };
    let out = std::process::Command::new("prlimit")
        .arg("--pid")
        .arg(pid.to_string())
        .arg(format!("--nofile={}:{}", show(soft), show(hard)))
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            format!("cannot run `prlimit` (util-linux) to set the open-files limit: {e}")
        })?;
    if !out.status.success() {
        return Err(format!(
            "prlimit --nofile={}:{} failed: {}",
            show(soft),
            show(hard),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// Raises this process's soft open-files limit to its hard limit (no privilege needed).
fn raise_nofile_to_hard() {
    let me = std::process::id();
    let (soft, hard) = nofile_limits(me);
    if soft < hard {
        if let Err(e) = set_nofile(me, hard, hard) {
            eprintln!("the open-files limit stays at {soft}: {e}");
        }
    }
}

/// The lowest descriptor number not in use: the one the next `open` gets.
fn lowest_free_fd() -> i32 {
    File::open("/dev/null").expect("open /dev/null").as_raw_fd()
}

/// Clock ticks per second, the unit of CPU times in `/proc/<pid>/stat`.
fn clock_ticks() -> u64 {
    let out = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .stdin(Stdio::null())
        .output();
    match out
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
    {
        Some(t) => t,
        None => {
            eprintln!("`getconf CLK_TCK` failed; assuming 100 ticks per second (Linux's USER_HZ)");
            100
        }
    }
}

/// CPU time (user and system, every thread) of the process whose `stat` file is open.
fn cpu_time(stat: &mut File, ticks_per_second: u64) -> Duration {
    let mut text = String::new();
    stat.rewind().expect("rewind /proc/self/stat");
    stat.read_to_string(&mut text)
        .expect("read /proc/self/stat");
    // After the command name (in parentheses, and free to contain spaces): state is field 3,
    // utime 14 and stime 15.
    let after_name = text.rsplit_once(')').expect("a command name").1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| -> u64 { fields[i].parse().expect("a tick count") };
    let total = ticks(11) + ticks(12);
    Duration::from_secs_f64(total as f64 / ticks_per_second as f64)
}

/// Polls `done` until it holds, bounded by [`WAIT`]: for gauges with no event to await.
async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The exact bytes of one of the proxy's own error responses.
fn proxy_error(status: u16, reason: &str) -> Vec<u8> {
    let body = format!("{status} {reason}\n");
    format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

async fn connect(addr: SocketAddr) -> TcpStream {
    let s = tokio::time::timeout(WAIT, TcpStream::connect(addr))
        .await
        .expect("connect within WAIT")
        .expect("connect to the proxy");
    s.set_nodelay(true).expect("TCP_NODELAY");
    s
}

async fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .expect("the proxy closes within WAIT")
        .expect("read to the close");
    out
}

/// The RFC 6455 sample key; every tunnel uses it.
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

const UPGRADE: &str = "GET /idle HTTP/1.1\r\nHost: switchyard.test\r\nConnection: Upgrade\r\n\
    Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

/// Sends the upgrade on `s` and checks the answer is a genuine 101 for it, with nothing after.
async fn handshake(s: &mut TcpStream) {
    tokio::time::timeout(WAIT, s.write_all(UPGRADE.as_bytes()))
        .await
        .expect("write within WAIT")
        .expect("send the upgrade");
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .expect("the 101 within WAIT")
            .expect("read the 101");
        assert!(
            n > 0,
            "closed before the end of the 101: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.extend_from_slice(&buf[..n]);
        // The upstream sends nothing unasked, so nothing may follow the head.
        if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            assert_eq!(i + 4, head.len(), "bytes after the 101: {head:?}");
        }
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101 "), "not a 101: {head:?}");
    static EXPECTED: OnceLock<String> = OnceLock::new();
    let expected = EXPECTED.get_or_init(|| {
        String::from_utf8_lossy(&proxy_core::websocket_accept(KEY.as_bytes())).into_owned()
    });
    assert_eq!(
        header_value(&head, "sec-websocket-accept").as_ref(),
        Some(expected),
        "the accept key in {head:?}"
    );
}

/// A new connection to `addr`, upgraded.
async fn open_tunnel(addr: SocketAddr) -> TcpStream {
    let mut s = connect(addr).await;
    handshake(&mut s).await;
    s
}

/// One masked text message out; the same text must come back in one unmasked frame.
async fn echo_roundtrip(s: &mut TcpStream, text: &[u8]) {
    let len = u8::try_from(text.len())
        .ok()
        .filter(|l| *l < 126)
        .expect("a short message");
    let mask = [0x37u8, 0xfa, 0x21, 0x3d];
    let mut frame = vec![0x81, 0x80 | len];
    frame.extend_from_slice(&mask);
    frame.extend(text.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
    tokio::time::timeout(WAIT, s.write_all(&frame))
        .await
        .expect("write within WAIT")
        .expect("send a message");
    let mut reply = vec![0u8; 2 + text.len()];
    tokio::time::timeout(WAIT, s.read_exact(&mut reply))
        .await
        .expect("the echo within WAIT")
        .expect("read the echo");
    let mut expected = vec![0x81, len];
    expected.extend_from_slice(text);
    assert_eq!(
        reply,
        expected,
        "the echo of {:?}",
        String::from_utf8_lossy(text)
    );
}

/// Resident memory of `pid` in bytes.
fn vm_rss(pid: u32) -> u64 {
    child::vm_rss(pid).unwrap_or_else(|| panic!("VmRSS of {pid} from /proc"))
}

/// How many descriptors `pid` has open.
fn open_fds(pid: u32) -> usize {
    child::open_fds(pid).unwrap_or_else(|| panic!("list /proc/{pid}/fd"))
}
