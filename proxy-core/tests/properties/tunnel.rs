//! 3. Tunnel fidelity under arbitrary interleavings, half-closes and backpressure.

use super::*;

// ---- 3. tunnel fidelity ----

#[derive(Debug, Clone)]
pub(crate) enum TunnelOp {
    Data(Side, Vec<u8>),
    Eof(Side),
    Ack(Side),
}

pub(crate) fn tunnel_ops() -> impl Strategy<Value = Vec<TunnelOp>> {
    let op = prop_oneof![
        6 => (side(), prop::collection::vec(any::<u8>(), 1..48)).prop_map(|(s, d)| TunnelOp::Data(s, d)),
        1 => side().prop_map(TunnelOp::Eof),
        3 => side().prop_map(TunnelOp::Ack),
    ];
    prop::collection::vec(op, 0..40)
}

pub(crate) fn idx(side: Side) -> usize {
    match side {
        Side::Client => 0,
        Side::Upstream => 1,
    }
}

/// What `side` has received so far in the sim.
pub(crate) fn received(sim: &Sim, side: Side) -> &[u8] {
    match side {
        Side::Client => &sim.client_rx,
        Side::Upstream => &sim.upstream_rx,
    }
}

/// Checks the end state of a tunnel run: each side received exactly what the other sent, in
/// order; each FIN was passed on; both FINs end the session.
pub(crate) fn check_tunnel_end(sim: &Sim, sent: &[Vec<u8>; 2], eof: [bool; 2]) {
    assert_eq!(
        received(sim, Side::Upstream),
        &sent[0][..],
        "upstream got the client's bytes"
    );
    assert_eq!(
        received(sim, Side::Client),
        &sent[1][..],
        "client got the upstream's bytes"
    );
    for from in [Side::Client, Side::Upstream] {
        // A FIN is passed on by a shutdown, or, when it ends the tunnel, by the close that
        // follows once everything is flushed.
        let fin_sent = sim.shut(from.other()) || sim.closed(from.other());
        assert_eq!(
            fin_sent,
            eof[idx(from)],
            "FIN from {from:?} is passed on exactly when it happened"
        );
    }
    if eof == [true, true] {
        assert!(sim.session.is_closed());
        assert!(sim.closed(Side::Client) && sim.closed(Side::Upstream));
        assert_eq!(sim.events.len(), 1);
        assert!(sim.events[0].upgraded);
        assert_eq!(sim.events[0].bytes_from_client, {
            let head = ws_request("/ws").len() as u64;
            head + sent[0].len() as u64
        });
    } else {
        assert!(!sim.session.is_closed());
        assert!(sim.events.is_empty());
        for s in [Side::Client, Side::Upstream] {
            assert_eq!(sim.session.wants_read(s), !eof[idx(s)]);
        }
    }
}

pub(crate) fn tunnel_config(queue: usize) -> Config {
    let mut c = config();
    c.limits.queue = queue;
    c
}

proptest! {
    #![proptest_config(cases(192))]

    /// With fast peers, any interleaving of data and half-closes from both sides arrives
    /// intact and in order on the other side.
    #[test]
    fn tunnel_relays_interleavings(ops in tunnel_ops()) {
        let mut sim = Sim::default_config();
        sim.open_tunnel();
        let mut sent: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
        let mut eof = [false, false];
        for op in &ops {
            match op {
                TunnelOp::Data(s, d) if !eof[idx(*s)] => {
                    sent[idx(*s)].extend_from_slice(d);
                    sim.input(Input::Data { from: *s, bytes: bytes::Bytes::copy_from_slice(d) });
                }
                TunnelOp::Eof(s) if !eof[idx(*s)] => {
                    eof[idx(*s)] = true;
                    sim.input(Input::Eof { from: *s });
                }
                _ => {}
            }
        }
        check_tunnel_end(&sim, &sent, eof);
    }

    /// With slow peers (acks at arbitrary points) and an adapter that reads a side only while
    /// `wants_read` says so, output still equals input, in-flight bytes stay bounded by the
    /// queue, and no byte follows a FIN.
    #[test]
    fn tunnel_relays_under_backpressure(ops in tunnel_ops(), queue in 1usize..64) {
        const MAX_PIECE: usize = 47;
        let mut sim = Sim::new(tunnel_config(queue));
        sim.open_tunnel();
        sim.auto_ack = false;
        let mut pending: [std::collections::VecDeque<Vec<u8>>; 2] = Default::default();
        let mut eof_wanted = [false, false];
        let mut eof = [false, false];
        let mut sent: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
        // Bytes received by a side when it was shut down, to check nothing follows the FIN.
        let mut at_shutdown: [Option<usize>; 2] = [None, None];

        let pump = |sim: &mut Sim,
                        pending: &mut [std::collections::VecDeque<Vec<u8>>; 2],
                        eof_wanted: &[bool; 2],
                        eof: &mut [bool; 2],
                        sent: &mut [Vec<u8>; 2],
                        at_shutdown: &mut [Option<usize>; 2]| {
            loop {
                let mut progressed = false;
                for s in [Side::Client, Side::Upstream] {
                    if !sim.session.wants_read(s) {
                        continue;
                    }
                    if let Some(d) = pending[idx(s)].pop_front() {
                        sent[idx(s)].extend_from_slice(&d);
                        sim.input(Input::Data { from: s, bytes: bytes::Bytes::from(d) });
                        progressed = true;
                    } else if eof_wanted[idx(s)] && !eof[idx(s)] {
                        eof[idx(s)] = true;
                        sim.input(Input::Eof { from: s });
                        progressed = true;
                    }
                }
                for s in [Side::Client, Side::Upstream] {
                    assert!(
                        sim.unacked[idx(s)] < queue + MAX_PIECE,
                        "in-flight to {s:?} grew to {} with queue {queue}",
                        sim.unacked[idx(s)]
                    );
                    if sim.shut(s) && at_shutdown[idx(s)].is_none() {
                        assert_eq!(sim.unacked[idx(s)], 0, "FIN to {s:?} before its bytes were flushed");
                        at_shutdown[idx(s)] = Some(received(sim, s).len());
                    }
                }
                if !progressed {
                    break;
                }
            }
        };

        for op in &ops {
            match op {
                TunnelOp::Data(s, d) if !eof_wanted[idx(*s)] => pending[idx(*s)].push_back(d.clone()),
                TunnelOp::Eof(s) => eof_wanted[idx(*s)] = true,
                TunnelOp::Ack(s) => sim.ack(*s),
                TunnelOp::Data(..) => {}
            }
            pump(&mut sim, &mut pending, &eof_wanted, &mut eof, &mut sent, &mut at_shutdown);
        }
        // The peers catch up: everything held must eventually be delivered.
        for _ in 0..10_000 {
            let done = pending.iter().all(|p| p.is_empty())
                && eof == eof_wanted
                && sim.unacked == [0, 0];
            if done {
                break;
            }
            sim.ack(Side::Client);
            sim.ack(Side::Upstream);
            pump(&mut sim, &mut pending, &eof_wanted, &mut eof, &mut sent, &mut at_shutdown);
        }
        prop_assert!(pending.iter().all(|p| p.is_empty()), "bytes stuck behind wants_read");
        prop_assert_eq!(eof, eof_wanted);
        check_tunnel_end(&sim, &sent, eof);
        for s in [Side::Client, Side::Upstream] {
            if let Some(n) = at_shutdown[idx(s)] {
                prop_assert_eq!(received(&sim, s).len(), n, "bytes to {:?} after its FIN", s);
            }
        }
    }
}
