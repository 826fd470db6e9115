//! Running part of a test in a child process — this test binary started again with one test
//! selected — so that what is measured there (its memory, its descriptors) is its own and no
//! concurrent test disturbs it. The child prints [`ADDR_PREFIX`] and the address it serves, and
//! serves until its stdin closes, so it cannot outlive the test that started it.

use std::net::SocketAddr;

use smol::io::{AsyncBufReadExt as _, AsyncReadExt as _};

use crate::{config_for, start_proxy_with, ProxyOptions, Runtime, WAIT};

/// What a child prints, followed by the address it listens on.
pub const ADDR_PREFIX: &str = "switchyard-child-listening=";

/// A runtime by its `Debug` name (how a parent hands it to a child).
pub fn runtime_named(name: &str) -> Runtime {
    match name {
        "Tokio" => Runtime::Tokio,
        "TokioMulti" => Runtime::TokioMulti,
        "Smol" => Runtime::Smol,
        "AsyncStd" => Runtime::AsyncStd,
        other => panic!("no runtime named {other:?}"),
    }
}

/// The body of a proxy child: the proxy on `rt` in front of `upstream` (recording no events,
/// so nothing in it grows with connections served), its address printed, until stdin closes.
pub fn serve_proxy_until_stdin_closes(rt: Runtime, upstream: SocketAddr) {
    let opts = ProxyOptions {
        record_events: false,
        ..ProxyOptions::default()
    };
    let proxy = start_proxy_with(rt, config_for(&[upstream]), opts);
    println!("{ADDR_PREFIX}{}", proxy.addr);
    wait_for_stdin_to_close();
    proxy.stop();
}

/// Blocks until the parent closes this process's stdin (or goes away).
pub fn wait_for_stdin_to_close() {
    let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut Vec::new());
}

/// A running child; killed if dropped before [`Child::finish`].
#[derive(Debug)]
pub struct Child {
    child: smol::process::Child,
    stdout: smol::io::BufReader<smol::process::ChildStdout>,
    /// The address the child printed.
    pub addr: SocketAddr,
}

impl Child {
    /// Runs test `test` of this binary (ignored ones included) in a child with `env`, and waits
    /// (bounded) for the address it prints.
    pub async fn spawn(test: &str, env: &[(&str, String)]) -> Child {
        let exe = std::env::current_exe().expect("the path of this test binary");
        let mut cmd = smol::process::Command::new(exe);
        cmd.args([
            test,
            "--exact",
            "--include-ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .stdin(smol::process::Stdio::piped())
        .stdout(smol::process::Stdio::piped())
        .stderr(smol::process::Stdio::piped())
        .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start a child process");
        let mut stdout = smol::io::BufReader::new(child.stdout.take().expect("the child's stdout"));
        let addr = tokio::time::timeout(WAIT, async {
            let mut line = String::new();
            loop {
                line.clear();
                let n = stdout.read_line(&mut line).await.expect("read the child");
                assert!(n > 0, "the {test} child ended before printing its address");
                // libtest may have written `test NAME ... ` on the same line.
                if let Some((_, addr)) = line.trim().split_once(ADDR_PREFIX) {
                    return addr.parse::<SocketAddr>().expect("the child's address");
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("the {test} child printed no address within {WAIT:?}"));
        Child {
            child,
            stdout,
            addr,
        }
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Closes the child's stdin and waits (bounded) for it to stop; it must have passed (a
    /// panic in it fails the caller).
    pub async fn finish(mut self) {
        drop(self.child.stdin.take());
        let mut stderr = self.child.stderr.take().expect("the child's stderr");
        let (mut out, mut err) = (String::new(), String::new());
        let status = tokio::time::timeout(WAIT, async {
            let (o, e) = futures_util::future::join(
                self.stdout.read_to_string(&mut out),
                stderr.read_to_string(&mut err),
            )
            .await;
            o.expect("read the child's stdout");
            e.expect("read the child's stderr");
            self.child.status().await.expect("the child's exit status")
        })
        .await
        .expect("the child stops within WAIT");
        assert!(
            status.success() && out.contains(" 1 passed"),
            "the child failed ({status}):\n{out}\n{err}"
        );
    }
}

/// Resident memory of `pid` in bytes, from `/proc/<pid>/status`; `None` without /proc.
pub fn vm_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// How many descriptors `pid` has open; `None` without /proc.
pub fn open_fds(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}
