//! The little RFC 6455 the load generator and the echo backend need: the accept key, frame
//! headers, masking, and pre-encoded frames whose sequence number can be patched in place.
//!
//! Nothing here allocates per message: a [`ClientFrame`] is encoded once per connection and only
//! its 8-byte sequence number is rewritten (already masked) before each send, and the echo it
//! should produce is prepared once as well, so checking an echo is one `memcmp`.
//!
//! The masking key is fixed per connection (derived from the connection's index). RFC 6455 wants
//! unpredictable keys to protect caching intermediaries from a hostile script; for a load
//! generator on loopback a fixed key is the honest cheap choice, and proxies treat the payload
//! as opaque either way.

use base64::Engine as _;
use sha1::{Digest as _, Sha1};

/// The GUID RFC 6455 §1.3 appends to the client's key.
const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Opcode of a binary data frame.
pub const OP_BINARY: u8 = 0x2;
/// Opcode of a close frame.
pub const OP_CLOSE: u8 = 0x8;
/// Opcode of a ping frame.
pub const OP_PING: u8 = 0x9;
/// Opcode of a pong frame.
pub const OP_PONG: u8 = 0xA;

/// Bytes at the start of every payload that carry the message's sequence number.
pub const SEQ_LEN: usize = 8;

/// `Sec-WebSocket-Accept` for a client's `Sec-WebSocket-Key`: base64(SHA-1(key + GUID)).
pub fn accept_key(key: &[u8]) -> String {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(GUID);
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The FIN bit.
    pub fin: bool,
    /// The opcode (low 4 bits of the first byte).
    pub opcode: u8,
    /// The masking key, if the MASK bit is set.
    pub mask: Option<[u8; 4]>,
    /// Bytes of header, masking key included: the payload starts here.
    pub header_len: usize,
    /// Bytes of payload.
    pub payload_len: u64,
}

/// Parses the frame header at the start of `buf`; `None` until the whole header is there.
/// RSV bits are ignored (no extension is ever negotiated).
pub fn parse_header(buf: &[u8]) -> Option<Header> {
    let (&b0, rest) = buf.split_first()?;
    let &b1 = rest.first()?;
    let (payload_len, mut at) = match b1 & 0x7f {
        126 => (
            u64::from(u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?)),
            4,
        ),
        127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?), 10),
        n => (u64::from(n), 2),
    };
    let mask = if b1 & 0x80 != 0 {
        let key: [u8; 4] = buf.get(at..at + 4)?.try_into().ok()?;
        at += 4;
        Some(key)
    } else {
        None
    };
    Some(Header {
        fin: b0 & 0x80 != 0,
        opcode: b0 & 0x0f,
        mask,
        header_len: at,
        payload_len,
    })
}

/// Appends a final frame header (FIN set) for `opcode` and `len` payload bytes, with `mask` if
/// given, to `out`.
pub fn write_header(out: &mut Vec<u8>, opcode: u8, len: usize, mask: Option<[u8; 4]>) {
    out.push(0x80 | (opcode & 0x0f));
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    if len < 126 {
        // Lossless: len < 126.
        out.push(mask_bit | len as u8);
    } else if let Ok(short) = u16::try_from(len) {
        out.push(mask_bit | 126);
        out.extend_from_slice(&short.to_be_bytes());
    } else {
        out.push(mask_bit | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    if let Some(key) = mask {
        out.extend_from_slice(&key);
    }
}

/// XORs `data` with `mask`, where `data[0]` is payload byte number `offset` (masking is its own
/// inverse). Works a word at a time.
pub fn apply_mask(data: &mut [u8], mask: [u8; 4], offset: usize) {
    let rot = offset % 4;
    let key: [u8; 4] = [
        mask[rot],
        mask[(rot + 1) % 4],
        mask[(rot + 2) % 4],
        mask[(rot + 3) % 4],
    ];
    let mut wide = [0u8; 8];
    wide[..4].copy_from_slice(&key);
    wide[4..].copy_from_slice(&key);
    let wide = u64::from_ne_bytes(wide);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        chunk.copy_from_slice(&(u64::from_ne_bytes(word) ^ wide).to_ne_bytes());
    }
    for (i, byte) in chunks.into_remainder().iter_mut().enumerate() {
        *byte ^= key[i % 4];
    }
}

/// A fixed masking key for connection number `index` (see the module docs).
pub fn mask_for(index: usize) -> [u8; 4] {
    let x = (index as u32).wrapping_mul(0x9E37_79B9) ^ 0x5A5A_A5A5;
    x.to_le_bytes()
}

/// The payload pattern after the sequence number: not constant, so a proxy that mixed up
/// offsets would be caught.
fn pattern(len: usize, salt: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(31).wrapping_add(salt.wrapping_mul(7)) % 251) as u8)
        .collect()
}

/// A binary message sent by the load generator (masked, as a client must), with the unmasked
/// echo the backend should send back. Encoded once; [`ClientFrame::set_seq`] patches the
/// sequence number into both.
#[derive(Debug, Clone)]
pub struct ClientFrame {
    wire: Vec<u8>,
    payload_at: usize,
    mask: [u8; 4],
    echo: Vec<u8>,
    echo_payload_at: usize,
}

impl ClientFrame {
    /// A `size`-byte binary message (at least [`SEQ_LEN`]) for connection `index`.
    pub fn new(size: usize, index: usize) -> Self {
        assert!(
            size >= SEQ_LEN,
            "a message carries an 8-byte sequence number"
        );
        let payload = pattern(size, index);
        let mask = mask_for(index);
        let mut wire = Vec::with_capacity(size + 14);
        write_header(&mut wire, OP_BINARY, size, Some(mask));
        let payload_at = wire.len();
        wire.extend_from_slice(&payload);
        apply_mask(&mut wire[payload_at..], mask, 0);
        let mut echo = Vec::with_capacity(size + 10);
        write_header(&mut echo, OP_BINARY, size, None);
        let echo_payload_at = echo.len();
        echo.extend_from_slice(&payload);
        ClientFrame {
            wire,
            payload_at,
            mask,
            echo,
            echo_payload_at,
        }
    }

    /// Writes `seq` into the first payload bytes of the frame (masked) and of the expected echo.
    pub fn set_seq(&mut self, seq: u64) {
        let bytes = seq.to_le_bytes();
        let masked = &mut self.wire[self.payload_at..self.payload_at + SEQ_LEN];
        masked.copy_from_slice(&bytes);
        apply_mask(masked, self.mask, 0);
        self.echo[self.echo_payload_at..self.echo_payload_at + SEQ_LEN].copy_from_slice(&bytes);
    }

    /// The bytes to write.
    pub fn wire(&self) -> &[u8] {
        &self.wire
    }

    /// The bytes the echo must consist of, header included.
    pub fn echo(&self) -> &[u8] {
        &self.echo
    }
}

/// The close frame the load generator sends (status 1000, masked).
pub fn client_close(index: usize) -> Vec<u8> {
    let mask = mask_for(index);
    let mut frame = Vec::with_capacity(8);
    write_header(&mut frame, OP_CLOSE, 2, Some(mask));
    let at = frame.len();
    frame.extend_from_slice(&1000u16.to_be_bytes());
    apply_mask(&mut frame[at..], mask, 0);
    frame
}

/// The close frame the backend echoes back for [`client_close`].
pub const SERVER_CLOSE_1000: [u8; 4] = [0x88, 0x02, 0x03, 0xE8];

/// The `Sec-WebSocket-Key` every handshake of the load generator sends (the RFC's sample
/// nonce; proxies do not care, and the expected accept value is then a constant).
pub const CLIENT_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// The upgrade request the load generator sends to `host`.
pub fn upgrade_request(host: &str) -> Vec<u8> {
    format!(
        "GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {CLIENT_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_key_matches_rfc_6455_example() {
        assert_eq!(
            accept_key(CLIENT_KEY.as_bytes()),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn headers_round_trip_at_length_boundaries() {
        for len in [0usize, 125, 126, 65_535, 65_536, 1 << 20] {
            for mask in [None, Some([1, 2, 3, 4])] {
                let mut out = Vec::new();
                write_header(&mut out, OP_BINARY, len, mask);
                let h = parse_header(&out).expect("complete header");
                assert_eq!(h.header_len, out.len(), "len {len}");
                assert_eq!(h.payload_len, len as u64);
                assert_eq!(h.mask, mask);
                assert!(h.fin);
                assert_eq!(h.opcode, OP_BINARY);
                // Any prefix is incomplete.
                assert_eq!(parse_header(&out[..out.len() - 1]), None);
            }
        }
    }

    #[test]
    fn masking_at_any_offset_matches_the_bytewise_definition() {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let data: Vec<u8> = (0..=40u8).collect();
        for offset in 0..8 {
            let mut fast = data.clone();
            apply_mask(&mut fast, mask, offset);
            let slow: Vec<u8> = data
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[(i + offset) % 4])
                .collect();
            assert_eq!(fast, slow, "offset {offset}");
        }
    }

    #[test]
    fn a_client_frame_unmasks_to_its_expected_echo() {
        for size in [8usize, 256, 16 * 1024] {
            let mut frame = ClientFrame::new(size, 3);
            frame.set_seq(0xDEAD_BEEF_0000_0042);
            let h = parse_header(frame.wire()).expect("header");
            let mut payload = frame.wire()[h.header_len..].to_vec();
            apply_mask(&mut payload, h.mask.expect("client frames are masked"), 0);
            let mut echo = Vec::new();
            write_header(&mut echo, h.opcode, payload.len(), None);
            echo.extend_from_slice(&payload);
            assert_eq!(echo, frame.echo(), "size {size}");
            assert_eq!(&payload[..8], &0xDEAD_BEEF_0000_0042u64.to_le_bytes());
        }
    }

    #[test]
    fn the_close_frame_carries_status_1000() {
        let frame = client_close(9);
        let h = parse_header(&frame).expect("header");
        let mut payload = frame[h.header_len..].to_vec();
        apply_mask(&mut payload, h.mask.expect("masked"), 0);
        assert_eq!(payload, [0x03, 0xE8]);
        assert_eq!(h.opcode, OP_CLOSE);
    }
}
