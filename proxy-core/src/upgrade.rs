//! The upgrade rules in one place (DESIGN §3, "The upgrade"): when a request offers a protocol
//! switch ([`offer`]), what the upstream is told ([`put_upgrade_fields`]), and when its `101`
//! is genuine ([`check_switch`]) — for websocket, the opening-handshake check of RFC 6455
//! §4.2.2, the only proof that the `101` answers *this* client's request rather than being
//! replayed or forged.

use base64::Engine as _;
use bytes::{BufMut, BytesMut};
use sha1::{Digest, Sha1};

use crate::body::Framing;
use crate::error::ResponseError;
use crate::fields::is_token_byte;
use crate::request::ParsedRequest;

/// A request that may switch protocols.
#[derive(Debug, Clone)]
pub(crate) struct UpgradeRequest {
    /// The protocol token as the client spelled it.
    pub(crate) token: String,
    /// The `Sec-WebSocket-Accept` a genuine answer must carry (websocket with exactly one key).
    pub(crate) expected_accept: Option<[u8; ACCEPT_LEN]>,
    pub(crate) is_websocket: bool,
}

/// The switch `req` offers, if it is an upgrade request at all: `GET`, HTTP/1.1, no body,
/// `Connection` naming `upgrade`, and an `Upgrade` token among `allowed` (never `h2c`). The
/// first acceptable token wins.
pub(crate) fn offer(req: &ParsedRequest<'_>, allowed: &[String]) -> Option<UpgradeRequest> {
    if req.method != "GET"
        || req.minor != 1
        || req.framing != Framing::None
        || !req.connection_has(b"upgrade")
    {
        return None;
    }
    req.upgrade_offers().iter().find_map(|offered| {
        let name = offered.split(|b| *b == b'/').next().unwrap_or(offered);
        let is_allowed = allowed
            .iter()
            .any(|p| p.as_bytes().eq_ignore_ascii_case(name) && !p.eq_ignore_ascii_case("h2c"));
        if !is_allowed || !offered.iter().all(|b| is_token_byte(*b) || *b == b'/') {
            return None;
        }
        let is_websocket = offered.eq_ignore_ascii_case(b"websocket");
        let expected_accept = match req.websocket_keys() {
            [key] if is_websocket => Some(websocket_accept(key)),
            _ => None,
        };
        Some(UpgradeRequest {
            token: String::from_utf8_lossy(offered).into_owned(),
            expected_accept,
            is_websocket,
        })
    })
}

/// The fields that ask the upstream (or tell the client) to switch: `Upgrade: <token>` and
/// `Connection: upgrade`. A head without an upgrade never carries either.
pub(crate) fn put_upgrade_fields(out: &mut BytesMut, up: &UpgradeRequest) {
    out.put_slice(b"Upgrade: ");
    out.put_slice(up.token.as_bytes());
    out.put_slice(b"\r\nConnection: upgrade\r\n");
}

/// Whether a `101` on HTTP/1.`minor` is genuine for `requested`: the request offered a switch,
/// the answer names the same protocol (`names_token`), and for websocket (when `check_accept`)
/// it carries exactly one `Sec-WebSocket-Accept`, the one the client's key demands.
pub(crate) fn check_switch(
    requested: Option<&UpgradeRequest>,
    minor: u8,
    names_token: bool,
    accepts: &[&[u8]],
    check_accept: bool,
) -> Result<(), ResponseError> {
    let up = requested.ok_or(ResponseError::UnsolicitedSwitch)?;
    if minor != 1 || !names_token {
        return Err(ResponseError::UpgradeMismatch);
    }
    if up.is_websocket && check_accept {
        match (up.expected_accept.as_ref(), accepts) {
            (Some(expected), [got]) if *got == &expected[..] => {}
            _ => return Err(ResponseError::BadAccept),
        }
    }
    Ok(())
}

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
