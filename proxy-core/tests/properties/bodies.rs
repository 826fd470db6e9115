//! 3b. Request and response bodies under backpressure.

use super::*;

// ---- 3b. HTTP bodies under backpressure ----

/// `data` cut into chunks of the given sizes, written canonically.
pub(crate) fn chunks_of(data: &[u8], sizes: &[usize]) -> Vec<ChunkSpec> {
    split(data, sizes)
        .into_iter()
        .map(|data| ChunkSpec {
            data,
            style: 0,
            ext: String::new(),
        })
        .collect()
}

/// A message head with `first` as its start line and a body framed by Content-Length or
/// chunked; returns the message and the body the receiver must get.
pub(crate) fn message(
    first: &str,
    body: &[u8],
    chunked: bool,
    chunk_sizes: &[usize],
) -> (Vec<u8>, Vec<u8>) {
    let mut out = first.as_bytes().to_vec();
    if chunked {
        let chunks = chunks_of(body, chunk_sizes);
        out.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
        write_chunked(&mut out, &chunks, "", &[]);
        (out, canonical_chunked(&chunks))
    } else {
        out.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
        out.extend_from_slice(body);
        (out, body.to_vec())
    }
}

proptest! {
    #![proptest_config(cases(128))]

    /// A request body and a response body cross a session whose peers acknowledge writes at
    /// arbitrary points, with an adapter that reads a side only while `wants_read` says so:
    /// every byte arrives, canonically framed; in-flight bytes stay bounded by the queue;
    /// nothing deadlocks; the client connection is kept alive afterwards.
    #[test]
    fn bodies_flow_under_backpressure(
        req_body in prop::collection::vec(any::<u8>(), 0..300),
        req_chunked in any::<bool>(),
        resp_body in prop::collection::vec(any::<u8>(), 0..300),
        resp_chunked in any::<bool>(),
        chunk_sizes in prop::collection::vec(1usize..64, 1..6),
        read_sizes in piece_sizes(),
        queue in 1usize..64,
        acks in prop::collection::vec((any::<bool>(), any::<bool>()), 0..80),
    ) {
        const SLACK: usize = 24 + 16; // one read, plus chunk framing
        let (request, want_up) = message(
            "POST /up HTTP/1.1\r\nHost: example.com\r\n",
            &req_body,
            req_chunked,
            &chunk_sizes,
        );
        let (response, want_down) =
            message("HTTP/1.1 200 OK\r\n", &resp_body, resp_chunked, &chunk_sizes);
        let mut sim = Sim::new(tunnel_config(queue));
        sim.auto_ack = false;
        let mut client_pending: std::collections::VecDeque<Vec<u8>> =
            split(&request, &read_sizes).into();
        let mut upstream_pending = std::collections::VecDeque::new();
        let mut responded = false;
        let mut connected = None;
        for round in 0..10_000 {
            let mut progressed = false;
            if sim.session.wants_read(Side::Client) {
                if let Some(p) = client_pending.pop_front() {
                    sim.client(p);
                    progressed = true;
                }
            }
            progressed |= connect_if_asked(&mut sim, &mut connected);
            if !responded && complete_message(&sim.upstream_total).is_some() {
                responded = true;
                upstream_pending = split(&response, &read_sizes).into();
                progressed = true;
            }
            if sim.session.wants_read(Side::Upstream) {
                if let Some(p) = upstream_pending.pop_front() {
                    sim.upstream(p);
                    progressed = true;
                }
            }
            let (ack_client, ack_upstream) = acks.get(round).copied().unwrap_or((true, true));
            if ack_client && sim.unacked[0] > 0 {
                sim.ack(Side::Client);
                progressed = true;
            }
            if ack_upstream && sim.unacked[1] > 0 {
                sim.ack(Side::Upstream);
                progressed = true;
            }
            let up_head = head_end(&sim.upstream_total).unwrap_or(0);
            let down_head = head_end(&sim.client_total).unwrap_or(0);
            prop_assert!(sim.unacked[1] <= up_head + queue + SLACK, "in flight upstream {} (queue {})", sim.unacked[1], queue);
            prop_assert!(sim.unacked[0] <= down_head + queue + SLACK, "in flight to client {} (queue {})", sim.unacked[0], queue);
            if !progressed && round >= acks.len() {
                break;
            }
        }
        prop_assert!(client_pending.is_empty(), "request bytes stuck behind wants_read(Client)");
        prop_assert!(responded, "the request never fully reached the upstream");
        prop_assert!(upstream_pending.is_empty(), "response bytes stuck behind wants_read(Upstream)");
        let up_head = head_end(&sim.upstream_total).expect("request head upstream");
        check_canonical_request_head(&sim.upstream_total[..up_head]);
        prop_assert_eq!(&sim.upstream_total[up_head..], &want_up[..]);
        let down_head = head_end(&sim.client_total).expect("response head to client");
        prop_assert_eq!(&sim.client_total[down_head..], &want_down[..]);
        prop_assert_eq!(sim.events.len(), 1);
        prop_assert_eq!(sim.events[0].status, Some(200));
        prop_assert_eq!(&sim.events[0].close, &None);
        prop_assert!(!sim.session.is_closed() && sim.session.wants_read(Side::Client));
    }
}
