//! Arbitrary client and upstream bytes, EOFs, resets, acknowledgements, connect outcomes, time
//! jumps and drains against one session: no panic, no Send after a Close, no timer after the
//! end, and every connection upstream starts with a complete, canonical request head.

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

#[derive(Arbitrary, Debug)]
struct Script {
    steps: Vec<common::Step>,
}

fuzz_target!(|script: Script| {
    let mut h = common::Harness::new(common::config(false));
    for step in script.steps.into_iter().take(64) {
        h.step(step);
    }
});
