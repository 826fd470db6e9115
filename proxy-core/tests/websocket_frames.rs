//! The frame-aware tunnel inside the session: keepalive pings and their pongs, dead-peer
//! detection, Close 1001 on drain, message limits, and that pings land only between frames.

mod sim;

use std::time::Duration;

use proxy_core::{CloseReason, Config, Side, WebSocket};
use sim::Sim;

const PING: u8 = 0x9;
const PONG: u8 = 0xA;
const CLOSE: u8 = 0x8;
const BINARY: u8 = 0x2;
const KEY: [u8; 4] = [0xA1, 0xB2, 0xC3, 0xD4];

/// A frame as a client sends it (masked) or a server does (`mask: false`).
fn frame(fin: bool, opcode: u8, payload: &[u8], mask: bool) -> Vec<u8> {
    let mut out = vec![(u8::from(fin) << 7) | opcode];
    let m = if mask { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(m | n as u8),
        n => {
            out.push(m | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
    }
    if mask {
        out.extend_from_slice(&KEY);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ KEY[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

/// A frame read back: opcode, whether it was masked, the unmasked payload.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Frame {
    opcode: u8,
    masked: bool,
    payload: Vec<u8>,
}

/// Every frame in `wire`, which must hold whole frames.
fn frames(wire: &[u8]) -> Vec<Frame> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < wire.len() {
        let (b0, b1) = (wire[at], wire[at + 1]);
        let masked = b1 & 0x80 != 0;
        let (len, mut p) = match b1 & 0x7F {
            126 => (
                usize::from(u16::from_be_bytes([wire[at + 2], wire[at + 3]])),
                at + 4,
            ),
            127 => panic!("no test frame is that long"),
            n => (usize::from(n), at + 2),
        };
        let key = masked.then(|| [wire[p], wire[p + 1], wire[p + 2], wire[p + 3]]);
        if masked {
            p += 4;
        }
        let payload = wire[p..p + len]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ key.map_or(0, |k| k[i % 4]))
            .collect();
        out.push(Frame {
            opcode: b0 & 0x0F,
            masked,
            payload,
        });
        at = p + len;
    }
    assert_eq!(at, wire.len(), "a frame was cut");
    out
}

fn ws_config(settings: WebSocket) -> Config {
    let mut c = sim::config();
    c.websocket = Some(settings);
    c
}

fn keepalive() -> WebSocket {
    let mut w = WebSocket::default();
    w.ping_interval = Some(Duration::from_secs(30));
    w.ping_timeout = Duration::from_secs(10);
    w
}

fn close_code(f: &Frame) -> u16 {
    assert_eq!(f.opcode, CLOSE, "{f:?}");
    u16::from_be_bytes([f.payload[0], f.payload[1]])
}

fn last_close(sim: &Sim) -> Option<CloseReason> {
    sim.events.last().and_then(|e| e.close.clone())
}

#[test]
fn silent_sides_get_pings_and_their_pongs_are_kept() {
    let mut sim = Sim::new(ws_config(keepalive()));
    sim.open_tunnel();
    sim.advance(Duration::from_secs(29));
    assert!(sim.client_rx.is_empty() && sim.upstream_rx.is_empty());
    sim.advance(Duration::from_secs(1));
    let to_client = frames(&std::mem::take(&mut sim.client_rx));
    let to_upstream = frames(&std::mem::take(&mut sim.upstream_rx));
    assert_eq!(to_client.len(), 1);
    assert_eq!(to_client[0].opcode, PING);
    assert!(!to_client[0].masked, "frames to a client are never masked");
    assert_eq!(to_upstream[0].opcode, PING);
    assert!(
        to_upstream[0].masked,
        "frames to a server are always masked"
    );

    // Each side answers its own ping: the pongs stay in the proxy.
    sim.client(frame(true, PONG, &to_client[0].payload, true));
    sim.upstream(frame(true, PONG, &to_upstream[0].payload, false));
    assert!(sim.client_rx.is_empty() && sim.upstream_rx.is_empty());

    // The peers' own pings and pongs pass untouched.
    let ping = frame(true, PING, b"app ping", true);
    sim.client(&ping);
    assert_eq!(std::mem::take(&mut sim.upstream_rx), ping);
    let pong = frame(true, PONG, b"app ping", false);
    sim.upstream(&pong);
    assert_eq!(std::mem::take(&mut sim.client_rx), pong);

    // Answered, so nothing is dead: the tunnel stays open through many intervals.
    for _ in 0..10 {
        sim.advance(Duration::from_secs(30));
        for (side, wire) in [
            (Side::Client, std::mem::take(&mut sim.client_rx)),
            (Side::Upstream, std::mem::take(&mut sim.upstream_rx)),
        ] {
            for f in frames(&wire) {
                assert_eq!(f.opcode, PING);
                match side {
                    Side::Client => sim.client(frame(true, PONG, &f.payload, true)),
                    Side::Upstream => sim.upstream(frame(true, PONG, &f.payload, false)),
                }
            }
        }
    }
    assert!(!sim.session.is_closed());
    assert!(sim.client_rx.is_empty() && sim.upstream_rx.is_empty());
}

#[test]
fn traffic_from_a_side_puts_off_its_ping() {
    let mut sim = Sim::new(ws_config(keepalive()));
    sim.open_tunnel();
    for _ in 0..5 {
        sim.advance(Duration::from_secs(20));
        sim.client(frame(true, BINARY, b"still here", true));
    }
    sim.upstream_rx.clear();
    let to_client = frames(&std::mem::take(&mut sim.client_rx));
    assert!(
        to_client.iter().all(|f| f.opcode != PING),
        "the client spoke every 20 s: {to_client:?}"
    );
}

#[test]
fn a_side_that_does_not_answer_is_closed_as_dead() {
    let mut sim = Sim::new(ws_config(keepalive()));
    sim.open_tunnel();
    // The upstream keeps talking; the client has gone silent (a phone that left Wi-Fi).
    for _ in 0..3 {
        sim.advance(Duration::from_secs(10));
        sim.upstream(frame(true, BINARY, b"news", false));
    }
    let to_client = frames(&std::mem::take(&mut sim.client_rx));
    let ping = to_client.iter().find(|f| f.opcode == PING).expect("a ping");
    assert!(!ping.masked);
    sim.upstream_rx.clear();
    sim.advance(Duration::from_secs(9));
    assert!(!sim.session.is_closed());
    sim.advance(Duration::from_secs(1));
    let to_upstream = frames(&std::mem::take(&mut sim.upstream_rx));
    assert_eq!(to_upstream.len(), 1, "{to_upstream:?}");
    assert_eq!(close_code(&to_upstream[0]), 1001);
    assert!(to_upstream[0].masked);
    assert!(!sim.session.is_closed(), "waits for the upstream's Close");
    sim.upstream(frame(true, CLOSE, &1001u16.to_be_bytes(), false));
    assert!(sim.closed(Side::Client) && sim.closed(Side::Upstream));
    assert_eq!(last_close(&sim), Some(CloseReason::PeerDead(Side::Client)));
    let ws = sim.events.last().and_then(|e| e.websocket).expect("counts");
    assert_eq!(ws.from_upstream.close_code, Some(1001));
    assert_eq!(ws.from_upstream.messages, 3);
    assert!(ws.proxy_pings >= 1);
}

#[test]
fn a_drain_sends_going_away_to_both_and_waits_for_the_handshake() {
    let mut sim = Sim::new(ws_config(WebSocket::default()));
    sim.open_tunnel();
    let start = sim.now;
    sim.session
        .start_drain(sim.now, sim.now + Duration::from_secs(60));
    sim.drain();
    // The Close goes out at a moment within the spread window (10 s by default).
    while sim.client_rx.is_empty() {
        assert!(sim.fire_next_timer(), "a close is scheduled");
        assert!(sim.now - start <= Duration::from_secs(10));
    }
    let to_client = frames(&std::mem::take(&mut sim.client_rx));
    let to_upstream = frames(&std::mem::take(&mut sim.upstream_rx));
    assert_eq!(close_code(&to_client[0]), 1001);
    assert_eq!(close_code(&to_upstream[0]), 1001);
    // Data after the proxy's Close is dropped, and the replies end the tunnel.
    sim.client(frame(true, BINARY, b"late", true));
    sim.client(frame(true, CLOSE, &1001u16.to_be_bytes(), true));
    assert!(
        sim.upstream_rx.is_empty(),
        "nothing passes after the proxy's Close"
    );
    assert!(!sim.session.is_closed());
    sim.upstream(frame(true, CLOSE, &1001u16.to_be_bytes(), false));
    assert!(sim.session.is_closed());
    assert_eq!(last_close(&sim), Some(CloseReason::Drain));
    let ws = sim.events.last().and_then(|e| e.websocket).expect("counts");
    assert_eq!(ws.from_client.close_code, Some(1001));
    assert_eq!(ws.from_upstream.close_code, Some(1001));
}

#[test]
fn a_drain_waits_for_the_frame_under_way() {
    let mut sim = Sim::new(ws_config(WebSocket::default()));
    sim.open_tunnel();
    let big = frame(true, BINARY, &[7; 1000], false);
    sim.upstream(&big[..300]);
    sim.client_rx.clear();
    sim.session
        .start_drain(sim.now, sim.now + Duration::from_secs(60));
    sim.drain();
    while sim.upstream_rx.is_empty() {
        assert!(sim.fire_next_timer());
    }
    assert!(sim.client_rx.is_empty(), "no Close inside a frame");
    sim.upstream(&big[300..]);
    assert_eq!(&sim.client_rx[..big.len() - 300], &big[300..]);
    let rest = sim.client_rx[big.len() - 300..].to_vec();
    assert_eq!(close_code(&frames(&rest)[0]), 1001);
}

#[test]
fn the_close_wait_is_bounded() {
    let mut sim = Sim::new(ws_config(WebSocket::default()));
    sim.open_tunnel();
    sim.session
        .start_drain(sim.now, sim.now + Duration::from_secs(60));
    sim.drain();
    let start = sim.now;
    while !sim.session.is_closed() {
        assert!(sim.fire_next_timer());
    }
    assert!(
        sim.now - start <= Duration::from_secs(15),
        "spread 10 s + wait 5 s"
    );
    assert_eq!(last_close(&sim), Some(CloseReason::Drain));
}

#[test]
fn an_oversized_message_gets_1009_and_never_reaches_the_other_side() {
    let mut w = WebSocket::default();
    w.max_message = 100;
    let mut sim = Sim::new(ws_config(w));
    sim.open_tunnel();
    let ok = frame(false, BINARY, &[1; 60], true);
    sim.client(&ok);
    assert_eq!(std::mem::take(&mut sim.upstream_rx), ok);
    sim.client(frame(true, 0x0, &[2; 60], true));
    let to_client = frames(&std::mem::take(&mut sim.client_rx));
    let to_upstream = frames(&std::mem::take(&mut sim.upstream_rx));
    assert_eq!(close_code(&to_client[0]), 1009);
    assert_eq!(close_code(&to_upstream[0]), 1001);
    assert_eq!(
        to_upstream.len(),
        1,
        "no byte of the refused frame: {to_upstream:?}"
    );
    sim.client(frame(true, CLOSE, &1009u16.to_be_bytes(), true));
    sim.upstream(frame(true, CLOSE, &1001u16.to_be_bytes(), false));
    assert!(sim.session.is_closed());
    assert_eq!(
        last_close(&sim),
        Some(CloseReason::MessageTooBig(Side::Client))
    );
}

#[test]
fn an_unmasked_client_frame_gets_1002() {
    let mut sim = Sim::new(ws_config(WebSocket::default()));
    sim.open_tunnel();
    sim.client(frame(true, BINARY, b"not masked", false));
    assert_eq!(close_code(&frames(&sim.client_rx)[0]), 1002);
    assert_eq!(close_code(&frames(&sim.upstream_rx)[0]), 1001);
    sim.upstream(frame(true, CLOSE, &1001u16.to_be_bytes(), false));
    assert!(
        sim.session.is_closed(),
        "the client's frames cannot be read any more, so its answer is not awaited"
    );
    assert_eq!(
        last_close(&sim),
        Some(CloseReason::WebSocketProtocol(Side::Client))
    );
}

#[test]
fn a_ping_waits_for_the_end_of_the_frame_under_way() {
    let mut sim = Sim::new(ws_config(keepalive()));
    sim.open_tunnel();
    let big = frame(true, BINARY, &[9; 500], false);
    sim.advance(Duration::from_secs(29));
    sim.upstream(&big[..100]);
    sim.client_rx.clear();
    sim.advance(Duration::from_secs(1));
    assert!(sim.client_rx.is_empty(), "no ping inside a frame");
    sim.upstream(&big[100..]);
    let wire = std::mem::take(&mut sim.client_rx);
    let rest = big.len() - 100;
    assert_eq!(&wire[..rest], &big[100..]);
    assert_eq!(frames(&wire[rest..])[0].opcode, PING);
}

#[test]
fn a_peers_own_close_passes_through() {
    let mut sim = Sim::new(ws_config(keepalive()));
    sim.open_tunnel();
    let close = frame(true, CLOSE, &1000u16.to_be_bytes(), true);
    sim.client(&close);
    assert_eq!(std::mem::take(&mut sim.upstream_rx), close);
    let reply = frame(true, CLOSE, &1000u16.to_be_bytes(), false);
    sim.upstream(&reply);
    assert_eq!(std::mem::take(&mut sim.client_rx), reply);
    sim.upstream_eof();
    sim.client_eof();
    assert!(sim.session.is_closed());
    let ws = sim.events.last().and_then(|e| e.websocket).expect("counts");
    assert_eq!(ws.from_client.close_code, Some(1000));
    assert_eq!(ws.from_upstream.close_code, Some(1000));
}

#[test]
fn tunnels_stay_opaque_unless_configured() {
    let mut sim = Sim::default_config();
    sim.open_tunnel();
    let garbage = b"\xff\xff not websocket framing at all".to_vec();
    sim.client(&garbage);
    assert_eq!(std::mem::take(&mut sim.upstream_rx), garbage);
    sim.advance(Duration::from_secs(600));
    assert!(sim.client_rx.is_empty(), "no pings without a ping_interval");
    sim.client_eof();
    sim.upstream_eof();
    assert_eq!(sim.events.last().and_then(|e| e.websocket), None);
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    /// Client messages of 1–3 fragments, as whole frames.
    fn client_frames() -> impl Strategy<Value = Vec<Vec<u8>>> {
        let part = prop_oneof![
            4 => prop::collection::vec(any::<u8>(), 0..40),
            1 => prop::collection::vec(any::<u8>(), 120..300),
        ];
        let message = prop::collection::vec(part, 1..4).prop_map(|parts| {
            let n = parts.len();
            parts
                .iter()
                .enumerate()
                .map(|(i, p)| frame(i + 1 == n, if i == 0 { BINARY } else { 0 }, p, true))
                .collect::<Vec<_>>()
        });
        let ping = prop::collection::vec(any::<u8>(), 0..20)
            .prop_map(|p| vec![frame(true, PING, &p, true)]);
        prop::collection::vec(prop_oneof![4 => message, 1 => ping], 1..10)
            .prop_map(|g| g.into_iter().flatten().collect())
    }

    fn is_proxy_ping(f: &Frame) -> bool {
        f.opcode == PING && f.payload.starts_with(b"swyd")
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Whatever the read splits and however time jumps between reads: the upstream gets
        /// exactly the client's frames, with the proxy's pings only between them; the client's
        /// answers to the proxy's pings never reach the upstream; no message over the limit
        /// reaches it either.
        #[test]
        fn the_upstream_sees_the_clients_frames_and_only_whole_proxy_pings_between(
            sent in client_frames(),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..10),
            waits in prop::collection::vec(0u64..45, 11),
            limit in prop_oneof![Just(0u64), 50u64..400],
        ) {
            let mut w = keepalive();
            w.ping_timeout = Duration::from_secs(100_000);
            w.max_message = limit;
            let mut sim = Sim::new(ws_config(w));
            sim.open_tunnel();
            let wire: Vec<u8> = sent.concat();
            let mut points: Vec<usize> = cuts.iter().map(|c| c.index(wire.len() + 1)).collect();
            points.sort_unstable();
            let mut at = 0;
            for (i, p) in points.into_iter().chain([wire.len()]).enumerate() {
                sim.advance(Duration::from_secs(waits[i]));
                // The client answers the proxy's pings between its own frames' bytes, which
                // is legal only at a frame boundary of its own stream: answer at the end.
                sim.client(&wire[at..p]);
                at = p;
                if sim.session.is_closed() {
                    break;
                }
            }
            // Now at a boundary of its own stream, the client answers every ping it got.
            let answers: Vec<Vec<u8>> = frames(&sim.client_rx)
                .iter()
                .filter(|f| f.opcode == PING)
                .map(|f| frame(true, PONG, &f.payload, true))
                .collect();
            if !sim.session.is_closed() {
                for a in &answers {
                    sim.client(a);
                }
            }
            let got = frames(&sim.upstream_rx);
            let (pings, data): (Vec<Frame>, Vec<Frame>) = got.into_iter().partition(is_proxy_ping);
            prop_assert!(pings.iter().all(|f| f.masked));
            prop_assert!(data.iter().all(|f| !(f.opcode == PONG && f.payload.starts_with(b"swyd"))));
            let expected: Vec<Frame> = sent.iter().map(|f| frames(f).remove(0)).collect();
            // The client sends no Close here: one on the wire to the upstream is the proxy's.
            let refused = data.last().is_some_and(|f| f.opcode == CLOSE);
            prop_assert_eq!(refused, frames(&sim.client_rx).iter().any(|f| f.opcode == CLOSE && close_code(f) == 1009));
            if refused {
                // A prefix of the client's frames, then the proxy's Close 1001.
                let (last, before) = data.split_last().expect("the proxy's close");
                prop_assert_eq!(close_code(last), 1001);
                prop_assert!(before.len() < expected.len());
                prop_assert_eq!(before, &expected[..before.len()]);
                let mut message = 0;
                for f in before {
                    if f.opcode != PING {
                        message += f.payload.len() as u64;
                        prop_assert!(limit == 0 || message <= limit, "a message over the limit passed");
                        if frames_fin(f, &sent) { message = 0; }
                    }
                }
            } else {
                prop_assert_eq!(&data, &expected);
            }
        }
    }

    /// Whether `f` (as read back) was sent with FIN: looked up by payload among `sent`.
    fn frames_fin(f: &Frame, sent: &[Vec<u8>]) -> bool {
        sent.iter()
            .find(|w| frames(w)[0] == *f)
            .is_some_and(|w| w[0] & 0x80 != 0)
    }
}
