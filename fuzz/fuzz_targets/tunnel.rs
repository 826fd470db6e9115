//! A WebSocket tunnel with the frame-aware reader on (keepalive, limits), opened by a genuine
//! handshake, then arbitrary bytes both ways, EOFs, resets, time and drains: no panic, and
//! the same output invariants as the session target.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

use common::Step;

const UPGRADE: &[u8] =
    b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
    Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
const SWITCH: &[u8] =
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
    Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";

#[derive(Arbitrary, Debug)]
struct Script {
    steps: Vec<Step>,
}

fuzz_target!(|script: Script| {
    let mut h = common::Harness::new(common::config(true));
    h.step(Step::Client(UPGRADE.to_vec()));
    h.step(Step::Connected { reused: false });
    h.step(Step::AckUpstream);
    h.step(Step::Upstream(SWITCH.to_vec()));
    h.step(Step::AckClient);
    for step in script.steps.into_iter().take(64) {
        h.step(step);
    }
});
