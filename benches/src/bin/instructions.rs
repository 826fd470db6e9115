//! A fixed workload through the sans-IO core, for counting instructions with
//! `valgrind --tool=callgrind`: unlike wall-clock benchmarks, the count repeats exactly, so a
//! before/after difference of 1 % is real.
//!
//! ```sh
//! cargo build --release -p switchyard-benches --bin instructions
//! valgrind --tool=callgrind target/release/instructions http 20000
//! ```
//!
//! Workloads: `http` (keep-alive exchanges on one connection), `handshakes` (new connection,
//! upgrade, genuine `101`, tunnel closed by the client), `tunnel` (256-byte messages, one each
//! way per round), `frames` (the same messages as WebSocket frames through the frame-aware
//! tunnel). Every step is checked by the harness, and the run ends by printing what it
//! did: a count taken from a run that did not print it is not a measurement.

use bytes::Bytes;
use proxy_core::{Input, Side, WebSocket};
use switchyard_benches::{drain, exchange, fixtures, open_tunnel, tunnel_forward, Harness};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let workload = args.next().unwrap_or_else(|| "http".to_owned());
    let n: usize = match args.next() {
        Some(s) => s.parse()?,
        None => 20_000,
    };
    let mut config = Harness::default_config();
    // One connection serves every exchange of the `http` workload.
    config.limits.max_requests = u32::MAX;
    if workload == "frames" {
        let mut w = WebSocket::default();
        w.max_message = 1 << 30;
        w.ping_interval = Some(std::time::Duration::from_secs(3600));
        config.websocket = Some(w);
    }
    let harness = Harness::new(config);
    let now = harness.now();
    match workload.as_str() {
        "http" => {
            let mut session = harness.session();
            for _ in 0..n {
                exchange(
                    &mut session,
                    now,
                    Bytes::from_static(fixtures::BROWSER_GET),
                    Bytes::from_static(fixtures::RESPONSE_200_EMPTY),
                );
            }
            anyhow::ensure!(!session.is_closed(), "the connection closed");
        }
        "handshakes" => {
            for _ in 0..n {
                let mut session = open_tunnel(&harness);
                session.handle_input(now, Input::Eof { from: Side::Client });
                drain(&mut session);
                session.handle_input(
                    now,
                    Input::Eof {
                        from: Side::Upstream,
                    },
                );
                let d = drain(&mut session);
                anyhow::ensure!(
                    session.is_closed() && d.events == 1,
                    "the tunnel did not close with one log event: {d:?}"
                );
            }
        }
        "tunnel" => {
            let mut session = open_tunnel(&harness);
            let message = Bytes::from_static(&[0x82; 256]);
            for _ in 0..n {
                tunnel_forward(&mut session, now, Side::Client, message.clone());
                tunnel_forward(&mut session, now, Side::Upstream, message.clone());
            }
        }
        "frames" => {
            let mut session = open_tunnel(&harness);
            let (to_upstream, to_client) = (frame(256, true), frame(256, false));
            for _ in 0..n {
                let out = tunnel_forward(&mut session, now, Side::Client, to_upstream.clone());
                anyhow::ensure!(out == to_upstream, "a frame changed on the way");
                tunnel_forward(&mut session, now, Side::Upstream, to_client.clone());
            }
        }
        other => {
            anyhow::bail!("unknown workload {other:?}: http, handshakes, tunnel or frames")
        }
    }
    println!("{workload}: {n} rounds done");
    Ok(())
}

/// A binary WebSocket frame of `len` bytes (126..=65535), masked as a client sends it or not.
fn frame(len: usize, masked: bool) -> Bytes {
    let mut out = vec![0x82, if masked { 0x80 | 126 } else { 126 }];
    out.extend_from_slice(&(len as u16).to_be_bytes());
    if masked {
        out.extend_from_slice(&[0x11, 0x22, 0x33, 0x44]);
    }
    out.resize(out.len() + len, 0x5A);
    Bytes::from(out)
}
