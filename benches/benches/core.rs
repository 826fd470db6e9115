//! Criterion benchmarks for `proxy-core`, the sans-IO session state machine.
//!
//! * `request_head` — parse, validate and rewrite one request head, from a fresh session to the
//!   rewritten head ready to write upstream. Reported twice: heads/s and bytes/s.
//! * `response_head` — one keep-alive exchange (request head + `Content-Length: 0` response) on
//!   a long-lived session, and the response half of it alone.
//! * `tunnel` — one chunk through an open websocket tunnel, each direction, 64 B to 64 KiB.
//!
//! Run with `cargo bench -p switchyard-benches`. Measurement times are kept short so the whole
//! suite finishes in well under two minutes; pass `-- --measurement-time 10` for steadier
//! numbers.

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use switchyard_benches::{
    exchange, finish_response, fixtures, forward_request, open_tunnel, tunnel_forward, Harness,
};

use proxy_core::Side;

/// Per request head: `Session::new` (two `Arc` clones, empty collections), the head as one
/// `Bytes`, the `Connect`, `UpstreamConnected`, and the rewritten head. Creating (and dropping)
/// the session is deliberately part of the measured cost: it is what a new client connection's
/// first request pays.
fn request_head(c: &mut Criterion) {
    let harness = Harness::new(Harness::default_config());
    let now = harness.now();
    let heads = [
        ("browser_get", Bytes::from_static(fixtures::BROWSER_GET)),
        (
            "websocket_upgrade",
            Bytes::from_static(fixtures::WS_UPGRADE),
        ),
    ];

    let mut group = c.benchmark_group("request_head");
    for (name, head) in &heads {
        // Once, outside the timing: the path is the one we mean to measure.
        let mut session = harness.session();
        let out = forward_request(&mut session, now, head.clone(), false);
        assert!(out > 0, "{name}: an upstream head was produced");

        for (unit, throughput) in [
            ("heads", Throughput::Elements(1)),
            ("bytes", Throughput::Bytes(head.len() as u64)),
        ] {
            group.throughput(throughput);
            group.bench_with_input(BenchmarkId::new(*name, unit), head, |b, head| {
                b.iter(|| {
                    let mut session = harness.session();
                    let n = forward_request(&mut session, now, head.clone(), false);
                    black_box(n);
                    session
                });
            });
        }
    }
    group.finish();
}

/// Per keep-alive exchange on one long-lived session (`max_requests` lifted so it never has
/// to close): request head, connect with a pooled connection, `Sent`, response head,
/// `ReleaseUpstream` + access-log event, `Sent`. `response_only` times just the response half
/// with `iter_custom` (each iteration carries two `Instant::now()` reads, ~tens of ns).
fn response_head(c: &mut Criterion) {
    let mut config = Harness::default_config();
    config.limits.max_requests = u32::MAX;
    let harness = Harness::new(config);
    let now = harness.now();
    let request = Bytes::from_static(fixtures::BROWSER_GET);
    let response = Bytes::from_static(fixtures::RESPONSE_200_EMPTY);

    let mut group = c.benchmark_group("response_head");
    group.throughput(Throughput::Elements(1));

    let mut session = harness.session();
    // Warm the session's buffers and check the path once.
    let [down, up] = exchange(&mut session, now, request.clone(), response.clone());
    assert!(down > 0 && up > 0);

    group.bench_function("exchange", |b| {
        b.iter(|| {
            black_box(exchange(
                &mut session,
                now,
                request.clone(),
                response.clone(),
            ))
        });
    });

    group.bench_function("response_only", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let up = forward_request(&mut session, now, request.clone(), true);
                switchyard_benches::ack(&mut session, now, Side::Upstream, up);
                let start = Instant::now();
                black_box(finish_response(&mut session, now, response.clone()));
                total += start.elapsed();
            }
            total
        });
    });
    group.finish();
    assert!(!session.is_closed(), "the keep-alive session stayed open");
}

/// Per chunk through an open tunnel: one `Data` of N bytes, one `Send` out, one `Sent` back.
/// The input is a refcount clone of a preallocated buffer, so this measures the core, not the
/// allocator.
fn tunnel(c: &mut Criterion) {
    let harness = Harness::new(Harness::default_config());
    let now = harness.now();

    let mut group = c.benchmark_group("tunnel");
    for (dir, from) in [
        ("client_to_upstream", Side::Client),
        ("upstream_to_client", Side::Upstream),
    ] {
        for (label, size) in [("64B", 64usize), ("4KiB", 4 << 10), ("64KiB", 64 << 10)] {
            let chunk = Bytes::from(vec![0x5a_u8; size]);
            let mut session = open_tunnel(&harness);

            // Zero-copy check, once: what leaves is the very buffer that came in.
            let sent = tunnel_forward(&mut session, now, from, chunk.clone());
            assert!(
                sent.as_ptr() == chunk.as_ptr() && sent.len() == chunk.len(),
                "tunnel {dir} {label}: the core copied the chunk ({:p}+{} in, {:p}+{} out)",
                chunk.as_ptr(),
                chunk.len(),
                sent.as_ptr(),
                sent.len(),
            );
            drop(sent);

            group.throughput(Throughput::Bytes(size as u64));
            group.bench_function(BenchmarkId::new(dir, label), |b| {
                b.iter(|| tunnel_forward(&mut session, now, from, chunk.clone()));
            });
            assert!(!session.is_closed(), "the tunnel stayed open");
        }
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
}

criterion_group! {
    name = benches;
    config = config();
    targets = request_head, response_head, tunnel
}
criterion_main!(benches);
