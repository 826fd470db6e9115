//! Property tests for the session (DESIGN §4), driven through the simulation harness:
//!
//! 1. chunking invariance of request streams (client side);
//! 2. chunking invariance of responses (upstream side);
//! 3. tunnel fidelity under arbitrary interleavings, half-closes and backpressure;
//! 4. arbitrary bytes from either peer: no panic, errors close, nothing invalid goes upstream,
//!    and bounded holding when the adapter honours `wants_read`;
//! 5. hop-by-hop fields never reach the upstream;
//! 6. no tunnel without a genuine `101`;
//! 7. timers always make progress and a silent session always ends;
//! 8. only requests that are safe to repeat are retried after a stale pooled connection.
//!
//! Beyond the list: request and response bodies under backpressure (3b), and chunking invariance
//! on arbitrary bytes from either peer (in 4). Three properties pin down head-limit behaviour
//! that once depended on how bytes were split into reads (414 vs 431, the request-line limit,
//! and the logged byte count of a refused head).
//!
//! One module per theme; the shared strategies and helpers are in `support`, the oracles every
//! property judges by (and their own tests) in `oracles`.
//!
//! Every property asserts on bytes and behaviour, so each can fail. Case counts are kept small
//! (64–256) so the file runs in a few seconds in debug builds.

#[path = "../sim/mod.rs"]
mod sim;

mod oracles;
mod support;

mod bodies;
mod client_chunking;
mod garbage;
mod hop_by_hop;
mod retries;
mod switch;
mod timers;
mod tunnel;
mod upstream_chunking;

pub(crate) use std::time::Duration;

pub(crate) use proptest::prelude::*;
pub(crate) use proptest::sample::select;
pub(crate) use proxy_core::{
    websocket_accept, CloseReason, Config, ConnectError, ExchangeLog, Input, Side, UpstreamId,
};
pub(crate) use sim::{config, ws_101, ws_request, Action, Sim, WS_ACCEPT, WS_KEY};

pub(crate) use oracles::*;
pub(crate) use support::*;
// Helpers one theme defines and another uses.
pub(crate) use client_chunking::*;
pub(crate) use garbage::*;
pub(crate) use tunnel::*;
