//! 2. Chunking invariance of responses (upstream side).

use super::*;

// ---- 2. chunking invariance, upstream side ----

#[derive(Debug, Clone)]
pub(crate) enum RespBody {
    Length(Vec<u8>),
    Chunked {
        chunks: Vec<ChunkSpec>,
        last_ext: String,
        trailers: Vec<(String, String)>,
    },
    UntilClose(Vec<u8>),
    NoContent,
}

#[derive(Debug, Clone)]
pub(crate) struct RespSpec {
    pub(crate) interim: Vec<usize>,
    pub(crate) extra: Vec<(String, String)>,
    pub(crate) body: RespBody,
}

pub(crate) const INTERIM: &[&str] = &[
    "HTTP/1.1 100 Continue\r\n\r\n",
    "HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n",
    "HTTP/1.1 102 Processing\r\n\r\n",
];

pub(crate) fn resp_spec() -> impl Strategy<Value = RespSpec> {
    let body = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..60).prop_map(RespBody::Length),
        (
            prop::collection::vec(chunk(), 0..4),
            chunk_ext(),
            trailers()
        )
            .prop_map(|(chunks, last_ext, trailers)| RespBody::Chunked {
                chunks,
                last_ext,
                trailers
            }),
        prop::collection::vec(any::<u8>(), 0..60).prop_map(RespBody::UntilClose),
        Just(RespBody::NoContent),
    ];
    (
        prop::collection::vec(0..INTERIM.len(), 0..3),
        prop::collection::vec((token(10), visible(20)), 0..3),
        body,
    )
        .prop_map(|(interim, extra, body)| RespSpec {
            interim,
            extra,
            body,
        })
}

impl RespSpec {
    fn write(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for i in &self.interim {
            out.extend_from_slice(INTERIM[*i].as_bytes());
        }
        let status = match self.body {
            RespBody::NoContent => "204 No Content",
            _ => "200 OK",
        };
        out.extend_from_slice(format!("HTTP/1.1 {status}\r\n").as_bytes());
        for (name, value) in &self.extra {
            out.extend_from_slice(format!("X-{name}: {value}\r\n").as_bytes());
        }
        match &self.body {
            RespBody::Length(data) => {
                out.extend_from_slice(format!("Content-Length: {}\r\n\r\n", data.len()).as_bytes());
                out.extend_from_slice(data);
            }
            RespBody::Chunked {
                chunks,
                last_ext,
                trailers,
            } => {
                out.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
                write_chunked(&mut out, chunks, last_ext, trailers);
            }
            RespBody::UntilClose(data) => {
                out.extend_from_slice(b"\r\n");
                out.extend_from_slice(data);
            }
            RespBody::NoContent => out.extend_from_slice(b"\r\n"),
        }
        out
    }

    /// What the client must receive after the final head.
    fn client_body(&self) -> Vec<u8> {
        match &self.body {
            RespBody::Length(data) | RespBody::UntilClose(data) => data.clone(),
            RespBody::Chunked { chunks, .. } => canonical_chunked(chunks),
            RespBody::NoContent => Vec::new(),
        }
    }
}

pub(crate) fn run_response(pieces: &[Vec<u8>], until_close: bool) -> Observed {
    let mut sim = Sim::default_config();
    sim.client("GET /r HTTP/1.1\r\nHost: example.com\r\n\r\n");
    sim.connected();
    let head = std::mem::take(&mut sim.upstream_rx);
    for piece in pieces {
        sim.upstream(piece);
    }
    if until_close {
        sim.upstream_eof();
    }
    observe(&sim, vec![head])
}

proptest! {
    #![proptest_config(cases(128))]

    /// A response (Content-Length, chunked with extensions and trailers, until-close, 204,
    /// each possibly after 1xx interim responses) gives the client the same bytes however the
    /// upstream's writes are split.
    #[test]
    fn upstream_chunking_invariance(resp in resp_spec(), sizes in piece_sizes()) {
        let bytes = resp.write();
        let until_close = matches!(resp.body, RespBody::UntilClose(_));
        let whole = run_response(std::slice::from_ref(&bytes), until_close);

        let mut interim = Vec::new();
        for i in &resp.interim {
            interim.extend_from_slice(INTERIM[*i].as_bytes());
        }
        prop_assert!(whole.client.starts_with(&interim), "{:?}", lossy(&whole.client));
        let end = interim.len()
            + head_end(&whole.client[interim.len()..]).expect("a final head reached the client");
        let final_head = &whole.client[interim.len()..end];
        prop_assert_eq!(&whole.client[end..], &resp.client_body()[..]);
        prop_assert_eq!(contains(final_head, b"\r\nConnection: close\r\n"), until_close);
        let reusable = !until_close;
        let released = whole.actions.iter().any(|a| matches!(a, Action::Release { reusable: r, .. } if *r == reusable));
        prop_assert!(released, "{:?}", whole.actions);
        prop_assert_eq!(whole.events.len(), 1);

        let bytewise = run_response(&split(&bytes, &[1]), until_close);
        prop_assert_eq!(&bytewise, &whole);
        let pieces = run_response(&split(&bytes, &sizes), until_close);
        prop_assert_eq!(&pieces, &whole);
    }
}
