//! 5. Hop-by-hop fields never reach the upstream.

use super::*;

// ---- 5. hop-by-hop fields ----

pub(crate) const HOPS: &[(&str, &str)] = &[
    ("Keep-Alive", "timeout=5, max=100"),
    ("Proxy-Connection", "keep-alive"),
    ("TE", "trailers"),
    ("Trailer", "X-Checksum"),
    ("Proxy-Authorization", "Basic dXNlcjpwYXNz"),
    ("HTTP2-Settings", "AAMAAABkAAQAAP__"),
];

/// `Upgrade` values a client may send, and the token a genuine upgrade forwards (the first
/// allowed one; only websocket is allowed).
pub(crate) const UPGRADES: &[(&str, Option<&str>)] = &[
    ("websocket", Some("websocket")),
    ("WebSocket", Some("WebSocket")),
    ("h2c", None),
    ("foo", None),
    ("h2c, websocket", Some("websocket")),
    ("foo ,WebSocket", Some("WebSocket")),
];

/// Ways to separate the elements of a `Connection` list (empty elements are allowed).
pub(crate) const SEPARATORS: &[&str] = &[", ", ",", " , ", ",, ", ",\t"];

#[derive(Debug, Clone)]
pub(crate) struct HopCase {
    pub(crate) post: bool,
    pub(crate) hops: Vec<(usize, u64)>,
    pub(crate) custom: Vec<(String, u64)>,
    pub(crate) conn_upgrade: bool,
    pub(crate) upgrade: Option<usize>,
    pub(crate) conn_extra: Vec<usize>,
    pub(crate) split_connection: bool,
    pub(crate) sep: usize,
    pub(crate) ws_key: bool,
    pub(crate) sizes: Vec<usize>,
}

/// Flips the case of ASCII letters where `mask` has a bit set.
pub(crate) fn recase(s: &str, mask: u64) -> String {
    s.chars()
        .enumerate()
        .map(|(i, c)| {
            if mask >> (i % 64) & 1 == 1 {
                if c.is_ascii_lowercase() {
                    c.to_ascii_uppercase()
                } else {
                    c.to_ascii_lowercase()
                }
            } else {
                c
            }
        })
        .collect()
}

pub(crate) fn hop_case() -> impl Strategy<Value = HopCase> {
    (
        any::<bool>(),
        prop::collection::vec((0..HOPS.len(), any::<u64>()), 0..6),
        prop::collection::vec((token(8), any::<u64>()), 0..3),
        any::<bool>(),
        prop::option::of(0..UPGRADES.len()),
        prop::collection::vec(0usize..2, 0..2),
        any::<bool>(),
        0..SEPARATORS.len(),
        any::<bool>(),
        piece_sizes(),
    )
        .prop_map(
            |(
                post,
                hops,
                custom,
                conn_upgrade,
                upgrade,
                conn_extra,
                split_connection,
                sep,
                ws_key,
                sizes,
            )| {
                HopCase {
                    post,
                    hops,
                    custom,
                    conn_upgrade,
                    upgrade,
                    conn_extra,
                    split_connection,
                    sep,
                    ws_key,
                    sizes,
                }
            },
        )
}

impl HopCase {
    fn genuine_upgrade(&self) -> bool {
        self.forwarded_token().is_some()
    }

    /// The `Upgrade` token the upstream must get, for a genuine upgrade request.
    fn forwarded_token(&self) -> Option<&'static str> {
        if self.post || !self.conn_upgrade {
            return None;
        }
        self.upgrade.and_then(|u| UPGRADES[u].1)
    }

    fn custom_name(name: &str) -> String {
        format!("x-c-{name}")
    }

    fn write(&self) -> Vec<u8> {
        let method = if self.post { "POST" } else { "GET" };
        let mut s = format!("{method} /hop HTTP/1.1\r\nHost: example.com\r\nX-Keep: yes\r\n");
        for (i, mask) in &self.hops {
            let (name, value) = HOPS[*i];
            s.push_str(&format!("{}: {value}\r\n", recase(name, *mask)));
        }
        let mut tokens: Vec<String> = Vec::new();
        for (name, mask) in &self.custom {
            let name = Self::custom_name(name);
            s.push_str(&format!("{}: v\r\n", recase(&name, *mask)));
            tokens.push(recase(&name, mask.rotate_left(7)));
        }
        if self.conn_upgrade {
            tokens.push("Upgrade".into());
        }
        for e in &self.conn_extra {
            tokens.push(["keep-alive", "close"][*e].into());
        }
        if !tokens.is_empty() {
            if self.split_connection && tokens.len() > 1 {
                let (a, b) = tokens.split_at(tokens.len() / 2);
                s.push_str(&format!("Connection: {}\r\n", a.join(SEPARATORS[self.sep])));
                s.push_str(&format!("connection: {}\r\n", b.join(",")));
            } else {
                s.push_str(&format!(
                    "Connection: {}\r\n",
                    tokens.join(SEPARATORS[self.sep])
                ));
            }
        }
        if let Some(u) = self.upgrade {
            s.push_str(&format!("Upgrade: {}\r\n", UPGRADES[u].0));
        }
        if self.ws_key {
            s.push_str(&format!(
                "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {WS_KEY}\r\n"
            ));
        }
        if self.post {
            s.push_str("Content-Length: 3\r\n\r\nabc");
        } else {
            s.push_str("\r\n");
        }
        s.into_bytes()
    }
}

proptest! {
    #![proptest_config(cases(256))]

    /// Hop-by-hop fields and every field a `Connection` line names never reach the upstream;
    /// `Upgrade` / `Connection: upgrade` appear exactly for a genuine websocket upgrade.
    #[test]
    fn hop_by_hop_fields_never_reach_upstream(case in hop_case()) {
        let request = case.write();
        let mut sim = Sim::default_config();
        for piece in split(&request, &case.sizes) {
            sim.client(piece);
        }
        prop_assert_eq!(sim.connects(), 1, "{:?}", lossy(&request));
        sim.connected();
        let upstream = sim.upstream_total.clone();
        let end = head_end(&upstream).expect("the head reached the upstream");
        let head = &upstream[..end];
        let method = if case.post { "POST" } else { "GET" };
        let start = format!("{method} /hop HTTP/1.1\r\nHost: example.com\r\n");
        prop_assert!(head.starts_with(start.as_bytes()), "{:?}", lossy(head));
        check_canonical_request_head(head);
        let names: Vec<String> = fields(head).into_iter().map(|(n, _)| n).collect();
        for (name, _) in &case.custom {
            let name = HopCase::custom_name(name);
            prop_assert!(!names.contains(&name), "{} named by Connection reached upstream: {:?}", name, lossy(head));
        }
        prop_assert!(names.iter().any(|n| n == "x-keep"), "an end-to-end field was lost: {:?}", lossy(head));
        let upgrade = field_values(head, "upgrade");
        let connection = field_values(head, "connection");
        if case.genuine_upgrade() {
            let token = case.forwarded_token().expect("genuine has a token");
            prop_assert_eq!(upgrade, vec![token.as_bytes().to_vec()]);
            prop_assert_eq!(connection, vec![b"upgrade".to_vec()]);
        } else {
            prop_assert!(upgrade.is_empty() && connection.is_empty(), "{:?}", lossy(head));
        }
        if case.post {
            prop_assert_eq!(framing_of(head), BodyKind::Length(3));
            prop_assert_eq!(&upstream[end..], b"abc");
        } else {
            prop_assert_eq!(upstream.len(), end);
        }
    }
}
