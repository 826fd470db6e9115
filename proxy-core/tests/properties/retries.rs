//! 8. Only requests that are safe to repeat are retried after a stale pooled connection.

use super::*;

// ---- 8. retries ----

pub(crate) const METHODS: &[(&str, bool)] = &[
    ("GET", true),
    ("HEAD", true),
    ("OPTIONS", true),
    ("PUT", true),
    ("DELETE", true),
    ("POST", false),
    ("PATCH", false),
];

proptest! {
    #![proptest_config(cases(128))]

    /// A request that meets a connection the upstream closes before any response byte is
    /// repeated, once, on a fresh (non-pooled) connection exactly when that is safe: the
    /// connection was pooled, the method is idempotent, there is no body, and nothing came back.
    /// Otherwise the client gets a 502 and the request is never sent twice.
    #[test]
    fn only_safe_requests_are_retried(
        method in 0..METHODS.len(),
        body in any::<bool>(),
        reused in any::<bool>(),
        partial in 0usize..12,
        second_fails in any::<bool>(),
    ) {
        let (name, idempotent) = METHODS[method];
        let request = if body {
            format!("{name} /r HTTP/1.1\r\nHost: example.com\r\nContent-Length: 3\r\n\r\nabc")
        } else {
            format!("{name} /r HTTP/1.1\r\nHost: example.com\r\n\r\n")
        };
        let mut sim = Sim::default_config();
        sim.client(&request);
        sim.connected_with(reused);
        let first = sim.upstream_total.clone();
        prop_assert!(!first.is_empty());
        if partial > 0 {
            sim.upstream(&b"HTTP/1.1 200 OK\r\n"[..partial]);
        }
        sim.upstream_eof();
        let retry = reused && idempotent && !body && partial == 0;
        prop_assert_eq!(sim.connects(), 1 + usize::from(retry), "{:?}", sim.actions);
        if retry {
            prop_assert!(matches!(sim.actions.last(), Some(Action::Connect { allow_pooled: false, .. })), "{:?}", sim.actions);
            prop_assert!(sim.client_total.is_empty());
            sim.connected();
            prop_assert_eq!(&sim.upstream_total, &[&first[..], &first[..]].concat());
            if second_fails {
                sim.upstream_eof();
                prop_assert!(sim.client_total.starts_with(b"HTTP/1.1 502 "), "{:?}", lossy(&sim.client_total));
                prop_assert_eq!(sim.connects(), 2, "retried only once");
            } else {
                sim.upstream(OK2);
                prop_assert!(sim.client_total.starts_with(b"HTTP/1.1 200 OK\r\n"));
            }
        } else {
            prop_assert_eq!(&sim.upstream_total, &first);
            prop_assert!(sim.client_total.starts_with(b"HTTP/1.1 502 "), "{:?}", lossy(&sim.client_total));
            prop_assert!(contains(&sim.client_total, b"\r\nConnection: close\r\n"));
        }
    }
}
