//! 1. Chunking invariance of request streams (client side).

use super::*;

// ---- 1. chunking invariance, client side ----

#[derive(Debug, Clone)]
pub(crate) enum ReqBody {
    None,
    Length(Vec<u8>),
    Chunked {
        chunks: Vec<ChunkSpec>,
        last_ext: String,
        trailers: Vec<(String, String)>,
    },
}

#[derive(Debug, Clone)]
pub(crate) struct ReqSpec {
    pub(crate) path: String,
    pub(crate) extra: Vec<(String, String)>,
    pub(crate) body: ReqBody,
}

pub(crate) fn req_spec() -> impl Strategy<Value = ReqSpec> {
    let body = prop_oneof![
        Just(ReqBody::None),
        prop::collection::vec(any::<u8>(), 0..40).prop_map(ReqBody::Length),
        (
            prop::collection::vec(chunk(), 0..4),
            chunk_ext(),
            trailers()
        )
            .prop_map(|(chunks, last_ext, trailers)| ReqBody::Chunked {
                chunks,
                last_ext,
                trailers
            }),
    ];
    (
        token(12),
        prop::collection::vec((token(10), visible(20)), 0..3),
        body,
    )
        .prop_map(|(path, extra, body)| ReqSpec { path, extra, body })
}

impl ReqSpec {
    fn method(&self) -> &'static str {
        match self.body {
            ReqBody::None => "GET",
            _ => "POST",
        }
    }

    fn write(&self, out: &mut Vec<u8>, close: bool) {
        out.extend_from_slice(
            format!(
                "{} /{} HTTP/1.1\r\nHost: example.com\r\n",
                self.method(),
                self.path
            )
            .as_bytes(),
        );
        for (name, value) in &self.extra {
            out.extend_from_slice(format!("X-{name}: {value}\r\n").as_bytes());
        }
        match &self.body {
            ReqBody::None => {}
            ReqBody::Length(data) => {
                out.extend_from_slice(format!("Content-Length: {}\r\n", data.len()).as_bytes())
            }
            ReqBody::Chunked { .. } => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
        }
        if close {
            out.extend_from_slice(b"Connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        match &self.body {
            ReqBody::None => {}
            ReqBody::Length(data) => out.extend_from_slice(data),
            ReqBody::Chunked {
                chunks,
                last_ext,
                trailers,
            } => write_chunked(out, chunks, last_ext, trailers),
        }
    }

    /// The body the upstream must receive.
    fn upstream_body(&self) -> Vec<u8> {
        match &self.body {
            ReqBody::None => Vec::new(),
            ReqBody::Length(data) => data.clone(),
            ReqBody::Chunked { chunks, .. } => canonical_chunked(chunks),
        }
    }
}

pub(crate) const OK2: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

/// Everything observable about a run.
#[derive(Debug, PartialEq)]
pub(crate) struct Observed {
    pub(crate) upstream: Vec<u8>,
    pub(crate) client: Vec<u8>,
    pub(crate) actions: Vec<Action>,
    pub(crate) events: Vec<ExchangeLog>,
    pub(crate) closed: bool,
    /// The requests the fake upstream saw, one complete message each.
    pub(crate) requests: Vec<Vec<u8>>,
}

pub(crate) fn observe(sim: &Sim, requests: Vec<Vec<u8>>) -> Observed {
    Observed {
        upstream: sim.upstream_total.clone(),
        client: sim.client_total.clone(),
        actions: sim.actions.clone(),
        events: sim.events.clone(),
        closed: sim.session.is_closed(),
        requests,
    }
}

/// Feeds `pieces` from the client; the fake upstream connects when asked and answers each
/// request with `OK2` once the whole request has reached it.
pub(crate) fn run_client_stream(config: Config, pieces: &[Vec<u8>], eof: bool) -> Observed {
    let mut sim = Sim::new(config);
    let mut connected = None;
    let mut requests = Vec::new();
    let mut pump = |sim: &mut Sim| loop {
        let mut progressed = connect_if_asked(sim, &mut connected);
        if let Some(len) = complete_message(&sim.upstream_rx) {
            let request: Vec<u8> = sim.upstream_rx.drain(..len).collect();
            check_canonical_request_head(&request[..head_end(&request).unwrap_or(len)]);
            requests.push(request);
            sim.upstream(OK2);
            progressed = true;
        }
        if !progressed {
            break;
        }
    };
    for piece in pieces {
        sim.client(piece);
        pump(&mut sim);
    }
    if eof {
        sim.client_eof();
        pump(&mut sim);
    }
    observe(&sim, requests)
}

proptest! {
    #![proptest_config(cases(128))]

    /// A keep-alive stream of 1–3 requests (GET, POST with Content-Length, POST chunked with
    /// extensions and trailers) gives the same upstream bytes, client bytes, actions and
    /// events whether it arrives whole, byte by byte, or in arbitrary pieces.
    #[test]
    fn client_chunking_invariance(
        reqs in prop::collection::vec(req_spec(), 1..=3),
        close_last in any::<bool>(),
        sizes in piece_sizes(),
    ) {
        let mut stream = Vec::new();
        for (i, r) in reqs.iter().enumerate() {
            r.write(&mut stream, close_last && i + 1 == reqs.len());
        }
        let whole = run_client_stream(config(), std::slice::from_ref(&stream), false);

        // The whole run is itself correct: every request forwarded, canonically framed, answered.
        prop_assert_eq!(whole.requests.len(), reqs.len(), "{:?}", lossy(&whole.upstream));
        for (got, want) in whole.requests.iter().zip(&reqs) {
            let end = head_end(got).expect("complete head");
            check_canonical_request_head(&got[..end]);
            let line = format!("{} /{} HTTP/1.1\r\n", want.method(), want.path);
            prop_assert!(got.starts_with(line.as_bytes()), "{:?}", lossy(got));
            prop_assert_eq!(&got[end..], &want.upstream_body()[..]);
        }
        check_client_stream(&whole.client, reqs.len());
        prop_assert_eq!(whole.events.len(), reqs.len());
        prop_assert!(whole.events.iter().all(|e| e.status == Some(200)));
        prop_assert_eq!(whole.closed || whole.actions.contains(&Action::ShutdownWrite(Side::Client)), close_last);

        let bytewise = run_client_stream(config(), &split(&stream, &[1]), false);
        prop_assert_eq!(&bytewise, &whole);
        let pieces = run_client_stream(config(), &split(&stream, &sizes), false);
        prop_assert_eq!(&pieces, &whole);
    }
}
