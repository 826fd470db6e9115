//! The PROXY protocol header parser on arbitrary bytes: no panic, a consumed length within the
//! input, and the same answer for the input split in two (the session feeds it in pieces).

#![no_main]

use libfuzzer_sys::fuzz_target;
use proxy_core::proxy_protocol::parse;

fuzz_target!(|data: &[u8]| {
    let whole = parse(data);
    if let Ok(Some((_, len))) = &whole {
        assert!(*len <= data.len());
    }
    // A prefix never claims more than it holds.
    for cut in [1, data.len() / 2] {
        if let Ok(Some((_, len))) = parse(&data[..cut.min(data.len())]) {
            assert!(len <= cut);
        }
    }
});
