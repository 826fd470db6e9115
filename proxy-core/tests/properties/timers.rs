//! 7. Timers always make progress and a silent session always ends.

use super::*;

// ---- 7. timers ----

#[derive(Debug, Clone)]
pub(crate) enum Step {
    Client(usize),
    ClientRaw(Vec<u8>),
    Connected,
    ConnectFailed,
    Upstream(usize),
    ClientEof,
    UpstreamEof,
    Advance(u64),
    AutoAck(bool),
    Ack(Side),
    Drain,
}

pub(crate) const TIMER_CLIENT: &[&str] = &[
    "GET / HTTP/1.1\r\nHost: example.com\r\n\r\n",
    "POST /p HTTP/1.1\r\nHost: example.com\r\nContent-Length: 10\r\n\r\nhal",
    "", // the websocket request, built at run time
    "GET / HT",
    "POST /c HTTP/1.1\r\nHost: example.com\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhe",
    "BAD\r\n\r\n",
    "lf",
];

pub(crate) const TIMER_UPSTREAM: &[&str] = &[
    "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\npart",
    "", // the genuine 101, built at run time
    "HTTP/1.1 100 Continue\r\n\r\n",
    "HTTP/1.1 200 O",
    "HTTP/1.1 200 OK\r\n\r\nuntil close",
    "frame",
];

pub(crate) fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        3 => (0..TIMER_CLIENT.len()).prop_map(Step::Client),
        1 => prop::collection::vec(any::<u8>(), 1..16).prop_map(Step::ClientRaw),
        2 => Just(Step::Connected),
        1 => Just(Step::ConnectFailed),
        3 => (0..TIMER_UPSTREAM.len()).prop_map(Step::Upstream),
        1 => Just(Step::ClientEof),
        1 => Just(Step::UpstreamEof),
        2 => (0u64..30).prop_map(Step::Advance),
        1 => any::<bool>().prop_map(Step::AutoAck),
        1 => side().prop_map(Step::Ack),
        1 => Just(Step::Drain),
    ]
}

/// Scripts that reach the named states, then a few random steps.
pub(crate) fn prefix(state: usize) -> Vec<Step> {
    use Step::*;
    match state {
        // idle, before any request
        0 => vec![],
        // waiting for connect
        1 => vec![Client(0)],
        // waiting for the response
        2 => vec![Client(0), Connected],
        // mid request body
        3 => vec![Client(1), Connected],
        // mid response body
        4 => vec![Client(0), Connected, Upstream(1)],
        // tunnel
        5 => vec![Client(2), Connected, Upstream(2)],
        // half-closed tunnel
        6 => vec![Client(2), Connected, Upstream(2), ClientEof],
        // lingering after an error
        7 => vec![Client(5)],
        // kept alive between requests
        8 => vec![Client(0), Connected, Upstream(0)],
        // a peer that stops accepting bytes
        _ => vec![AutoAck(false), Client(0), Connected, Upstream(1)],
    }
}

pub(crate) fn timer_config(t: &[u64], lifetime: Option<u64>) -> Config {
    let mut c = config();
    let secs = |i: usize| Duration::from_secs(t.get(i).copied().unwrap_or(60));
    let x = &mut c.timeouts;
    x.request_head = secs(0);
    x.keep_alive = secs(1);
    x.client_body = secs(2);
    x.connect = secs(3);
    x.read = secs(4);
    x.send = secs(5);
    x.tunnel_idle = secs(6);
    x.tunnel_lifetime = lifetime.map(Duration::from_secs);
    x.fin = secs(7);
    x.linger = secs(8);
    c
}

pub(crate) fn apply(sim: &mut Sim, step: &Step) {
    match step {
        Step::Client(i) => match *i {
            2 => sim.client(ws_request("/ws")),
            i => sim.client(TIMER_CLIENT[i]),
        },
        Step::ClientRaw(b) => sim.client(b),
        Step::Connected => {
            if sim.last_connect.is_some() {
                sim.connected();
            }
        }
        Step::ConnectFailed => {
            if let Some(id) = sim.last_connect {
                sim.input(Input::UpstreamFailed {
                    id,
                    why: ConnectError::Refused,
                });
            }
        }
        Step::Upstream(i) => match *i {
            2 => sim.upstream(ws_101()),
            i => sim.upstream(TIMER_UPSTREAM[i]),
        },
        Step::ClientEof => sim.client_eof(),
        Step::UpstreamEof => sim.upstream_eof(),
        Step::Advance(s) => sim.advance(Duration::from_secs(*s)),
        Step::AutoAck(on) => sim.auto_ack = *on,
        Step::Ack(s) => sim.ack(*s),
        Step::Drain => {
            let now = sim.now;
            sim.session.start_drain(now, now + Duration::from_secs(10));
            sim.drain();
        }
    }
}

/// Everything a timer firing could change, for the "early call is a no-op" check.
pub(crate) fn snapshot(sim: &Sim) -> (usize, usize, usize, usize, bool) {
    (
        sim.client_total.len(),
        sim.upstream_total.len(),
        sim.actions.len(),
        sim.events.len(),
        sim.session.is_closed(),
    )
}

proptest! {
    #![proptest_config(cases(256))]

    /// From idle, connecting, waiting, mid-body, tunnel, half-closed tunnel, lingering,
    /// keep-alive and stalled states (plus random steps): a live session always has a
    /// deadline; handling it early does nothing; handling it on time closes the session or
    /// moves the deadline past `now`; with silent peers the session closes within 50 firings.
    #[test]
    fn timers_make_progress(
        state in 0usize..10,
        extra in prop::collection::vec(step(), 0..6),
        timeouts in prop::collection::vec(1u64..=120, 9),
        lifetime in prop::option::of(1u64..=600),
    ) {
        let mut sim = Sim::new(timer_config(&timeouts, lifetime));
        for s in prefix(state).iter().chain(&extra) {
            apply(&mut sim, s);
        }
        // From here on the peers are silent.
        for _ in 0..50 {
            if sim.session.is_closed() {
                break;
            }
            let Some(deadline) = sim.session.poll_timeout() else {
                return Err(TestCaseError::fail(format!(
                    "a live session with silent peers has no deadline (state {state}, {extra:?})"
                )));
            };
            if let Some(early) = deadline.checked_sub(Duration::from_millis(1)) {
                if early >= sim.now {
                    let before = snapshot(&sim);
                    sim.now = early;
                    sim.session.handle_timeout(early);
                    sim.drain();
                    prop_assert_eq!(snapshot(&sim), before, "handle_timeout before the deadline acted");
                    prop_assert_eq!(sim.session.poll_timeout(), Some(deadline));
                }
            }
            sim.now = sim.now.max(deadline);
            sim.session.handle_timeout(sim.now);
            sim.drain();
            let now = sim.now;
            prop_assert!(
                sim.session.is_closed() || sim.session.poll_timeout().is_some_and(|t| t > now),
                "the deadline did not move: {:?} at {:?}", sim.session.poll_timeout(), now
            );
        }
        prop_assert!(sim.session.is_closed(), "still open after 50 timer firings (state {}, {:?})", state, extra);
        prop_assert!(sim.closed(Side::Client));
        prop_assert_eq!(sim.session.poll_timeout(), None);
    }
}
