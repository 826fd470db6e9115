//! 6. No tunnel without a genuine `101`.

use super::*;

// ---- 6. no tunnel without a genuine 101 ----

pub(crate) const SWITCH_TOKENS: &[&str] =
    &["websocket", "WebSocket", "WEBSOCKET", "h2c", "websocket/13"];

#[derive(Debug, Clone)]
pub(crate) enum AcceptKind {
    Genuine,
    Missing,
    Doubled,
    OtherKey(Vec<u8>),
    Random(String),
}

#[derive(Debug, Clone)]
pub(crate) struct SwitchCase {
    pub(crate) status: u16,
    pub(crate) http10: bool,
    pub(crate) upgrade: Option<usize>,
    pub(crate) accept: AcceptKind,
    pub(crate) connection: bool,
    pub(crate) content_length: bool,
    pub(crate) after_head: Vec<u8>,
    /// Client bytes, each sent after the upstream piece its position names (mod the count).
    pub(crate) client_chunks: Vec<(usize, Vec<u8>)>,
    pub(crate) sizes: Vec<usize>,
}

pub(crate) fn accept_kind() -> impl Strategy<Value = AcceptKind> {
    let b64 = select(&b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"[..]);
    prop_oneof![
        4 => Just(AcceptKind::Genuine),
        1 => Just(AcceptKind::Missing),
        1 => Just(AcceptKind::Doubled),
        1 => prop::collection::vec(any::<u8>(), 1..24).prop_map(AcceptKind::OtherKey),
        1 => prop::collection::vec(b64, 27)
            .prop_map(|v| AcceptKind::Random(format!("{}=", lossy(&v)))),
    ]
}

/// Bytes a websocket client or server might send: a frame header byte no HTTP head starts with.
pub(crate) fn frame_bytes(first: u8) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..40).prop_map(move |mut v| {
        v.insert(0, first);
        v
    })
}

pub(crate) fn switch_case() -> impl Strategy<Value = SwitchCase> {
    (
        prop_oneof![3 => Just(101u16), 1 => 100u16..600],
        prop::bool::weighted(0.2),
        prop::option::weighted(0.85, 0..SWITCH_TOKENS.len()),
        accept_kind(),
        any::<bool>(),
        any::<bool>(),
        prop_oneof![Just(Vec::new()), frame_bytes(0x82)],
        prop::collection::vec((any::<usize>(), frame_bytes(0x81)), 1..4),
        piece_sizes(),
    )
        .prop_map(
            |(
                status,
                http10,
                upgrade,
                accept,
                connection,
                content_length,
                after_head,
                client_chunks,
                sizes,
            )| {
                SwitchCase {
                    status,
                    http10,
                    upgrade,
                    accept,
                    connection,
                    content_length,
                    after_head,
                    client_chunks,
                    sizes,
                }
            },
        )
}

impl SwitchCase {
    fn genuine(&self) -> bool {
        self.status == 101
            && !self.http10
            && matches!(self.upgrade, Some(0..=2))
            && matches!(self.accept, AcceptKind::Genuine)
    }

    fn write(&self) -> Vec<u8> {
        let version = if self.http10 { "HTTP/1.0" } else { "HTTP/1.1" };
        let mut s = format!("{version} {} Whatever\r\n", self.status);
        if let Some(u) = self.upgrade {
            s.push_str(&format!("Upgrade: {}\r\n", SWITCH_TOKENS[u]));
        }
        if self.connection {
            s.push_str("Connection: Upgrade\r\n");
        }
        match &self.accept {
            AcceptKind::Genuine => s.push_str(&format!("Sec-WebSocket-Accept: {WS_ACCEPT}\r\n")),
            AcceptKind::Missing => {}
            AcceptKind::Doubled => s.push_str(&format!(
                "Sec-WebSocket-Accept: {WS_ACCEPT}\r\nSec-WebSocket-Accept: {WS_ACCEPT}\r\n"
            )),
            AcceptKind::OtherKey(key) => {
                let accept = websocket_accept(key);
                if accept != websocket_accept(WS_KEY.as_bytes()) {
                    s.push_str(&format!("Sec-WebSocket-Accept: {}\r\n", lossy(&accept)));
                }
            }
            AcceptKind::Random(a) => {
                if a != WS_ACCEPT {
                    s.push_str(&format!("Sec-WebSocket-Accept: {a}\r\n"));
                }
            }
        }
        if self.content_length {
            s.push_str("Content-Length: 0\r\n");
        }
        s.push_str("\r\n");
        let mut out = s.into_bytes();
        out.extend_from_slice(&self.after_head);
        out
    }
}

proptest! {
    #![proptest_config(cases(256))]

    /// Client bytes sent after an upgrade request (before, during or after the answer, which
    /// arrives in arbitrary pieces) reach the upstream only when the answer is a genuine `101`:
    /// HTTP/1.1, `Upgrade: websocket`, and exactly one correct `Sec-WebSocket-Accept`.
    #[test]
    fn no_tunnel_without_genuine_101(case in switch_case()) {
        let mut sim = Sim::default_config();
        sim.client(ws_request("/ws"));
        sim.connected();
        let head = sim.take_upstream();
        prop_assert!(head.contains("Connection: upgrade\r\n"));
        let pieces = split(&case.write(), &case.sizes);
        let slots = pieces.len() + 1;
        let mut sent = Vec::new();
        for slot in 0..slots {
            for (pos, chunk) in &case.client_chunks {
                if pos % slots != slot {
                    continue;
                }
                let switched = sim.client_total.starts_with(b"HTTP/1.1 101 ")
                    && head_end(&sim.client_total).is_some();
                sim.client(chunk);
                sent.extend_from_slice(chunk);
                if !switched {
                    prop_assert!(sim.upstream_rx.is_empty(), "bytes forwarded in the might-switch window");
                }
            }
            if let Some(piece) = pieces.get(slot) {
                sim.upstream(piece);
            }
        }

        let client = sim.client_total.clone();
        if case.genuine() {
            prop_assert!(client.starts_with(b"HTTP/1.1 101 "), "{:?}", lossy(&client));
            let end = head_end(&client).expect("complete 101");
            prop_assert_eq!(&client[end..], &case.after_head[..]);
            prop_assert_eq!(&sim.upstream_rx[..], &sent[..]);
            prop_assert!(!sim.session.is_closed());
            prop_assert!(sim.session.wants_read(Side::Upstream) && sim.session.wants_read(Side::Client));
        } else {
            prop_assert!(sim.upstream_rx.is_empty(), "tunnel bytes without a genuine 101: {:?}", lossy(&sim.upstream_rx));
            prop_assert!(!client.starts_with(b"HTTP/1.1 101"), "{:?}", lossy(&client));
            if case.status == 101 {
                prop_assert!(client.starts_with(b"HTTP/1.1 502 "), "{:?}", lossy(&client));
                prop_assert!(contains(&client, b"\r\nConnection: close\r\n"));
                prop_assert!(sim.shut(Side::Client) || sim.closed(Side::Client));
            }
        }
    }
}
