//! The WebSocket opening-handshake check (RFC 6455 §4.2.2): the only proof that an upstream's
//! `101` answers *this* client's request rather than being replayed or forged.

use base64::Engine as _;
use sha1::{Digest, Sha1};

/// The GUID RFC 6455 appends to the client key before hashing.
const WEBSOCKET_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Length of a base64-encoded SHA-1 digest.
pub const ACCEPT_LEN: usize = 28;

/// The `Sec-WebSocket-Accept` value a server must send for `key`:
/// base64(SHA-1(key ++ GUID)).
pub fn websocket_accept(key: &[u8]) -> [u8; ACCEPT_LEN] {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(WEBSOCKET_GUID);
    let digest = sha.finalize();
    let mut out = [0u8; ACCEPT_LEN];
    // A 20-byte digest always encodes to exactly 28 base64 characters, so this cannot fail.
    let written = base64::engine::general_purpose::STANDARD
        .encode_slice(digest, &mut out)
        .unwrap_or(0);
    debug_assert_eq!(written, ACCEPT_LEN);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc6455_example_key() {
        // The worked example from RFC 6455 §1.3.
        assert_eq!(
            &websocket_accept(b"dGhlIHNhbXBsZSBub25jZQ=="),
            b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }
}
