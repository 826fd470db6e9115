//! WebSocket frames (RFC 6455 §5), as much as a proxy needs to understand a tunnel without
//! re-framing it: where each frame starts and ends, its opcode, FIN, mask and length, and the
//! payload of control frames (at most 125 bytes, never compressed by any extension, RFC 7692 §6).
//!
//! A [`FrameReader`] follows one direction of a tunnel across arbitrary read splits. Data-frame
//! bytes are passed on as slices of the `Bytes` they arrived in (a chunk of whole data frames
//! comes out as the very same chunk); only a frame header split across reads (≤ 14 bytes) and a
//! control frame (≤ 139 bytes) are held until complete. Payload of data frames is never
//! unmasked, inflated or copied, so extensions such as permessage-deflate pass untouched (their
//! RSV bits are not judged).

use bytes::{BufMut, Bytes, BytesMut};

/// Opcodes (RFC 6455 §5.2).
pub(crate) const OP_CONTINUATION: u8 = 0x0;
pub(crate) const OP_TEXT: u8 = 0x1;
pub(crate) const OP_BINARY: u8 = 0x2;
pub(crate) const OP_CLOSE: u8 = 0x8;
pub(crate) const OP_PING: u8 = 0x9;
pub(crate) const OP_PONG: u8 = 0xA;

/// The largest control-frame payload (RFC 6455 §5.5).
pub(crate) const MAX_CONTROL_PAYLOAD: usize = 125;
/// The largest frame header: 2 bytes, a 64-bit length, a masking key.
const MAX_HEADER: usize = 14;

/// What a reader enforces on its direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct FrameLimits {
    /// Largest frame payload, 0 for no limit.
    pub(crate) max_frame: u64,
    /// Largest message (the payload of all its frames, as on the wire), 0 for no limit.
    pub(crate) max_message: u64,
    /// Frames must be masked (the client's direction, RFC 6455 §5.1).
    pub(crate) require_mask: bool,
}

/// A frame the reader refuses. Nothing of it has been passed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Violation {
    /// Over `max_frame` or `max_message`: the frame is skipped, the stream stays readable.
    TooBig,
    /// An unmasked frame where masking is required; the stream is not read further.
    Unmasked,
    /// Not valid WebSocket framing (reserved opcode, bad fragmentation, a control frame that is
    /// fragmented or longer than 125 bytes, a 64-bit length with its top bit set); the stream is
    /// not read further.
    Protocol,
}

/// A complete control frame. Its unmasked payload stays in the reader
/// ([`FrameReader::control_payload`]), which keeps [`Item`] small.
#[derive(Debug, Clone)]
pub(crate) struct Control {
    pub(crate) opcode: u8,
    /// The frame as it arrived, for passing it on unchanged.
    pub(crate) raw: Bytes,
}

/// A Close frame's status code; `None` for a Close without one (RFC 6455 §7.1.5: 1005).
pub(crate) fn close_code(payload: &[u8]) -> Option<u16> {
    match payload {
        [a, b, ..] => Some(u16::from_be_bytes([*a, *b])),
        _ => None,
    }
}

/// What reading a chunk yields, in stream order.
#[derive(Debug)]
pub(crate) enum Item {
    /// Bytes to pass on as they are.
    Forward(Bytes),
    /// A complete control frame, not passed on: the caller decides.
    Control(Control),
    /// The stream is between frames (reported once per [`Feed`], when asked for): something
    /// may be injected into the outgoing stream here.
    Boundary,
    /// A refused frame.
    Violation(Violation),
}

/// One chunk being read, and where the reader is in it.
#[derive(Debug)]
pub(crate) struct Feed {
    bytes: Bytes,
    /// The chunk's length (`bytes` is taken when the whole chunk is passed on at once).
    len: usize,
    pos: usize,
    /// Start of the bytes read but not yet passed on (a run of data-frame bytes).
    run: usize,
    /// Report the next frame boundary (at once if the stream is at one).
    pub(crate) want_boundary: bool,
    /// Where the header being read began in this chunk (`None`: in an earlier chunk).
    head_start: Option<usize>,
}

impl Feed {
    pub(crate) fn new(bytes: Bytes, want_boundary: bool) -> Self {
        Feed {
            len: bytes.len(),
            bytes,
            pos: 0,
            run: 0,
            want_boundary,
            head_start: None,
        }
    }

    /// Passes on the run up to `end` (if any), starting the next run at `next`.
    fn flush(&mut self, end: usize, next: usize) -> Option<Item> {
        let run = self.run;
        self.run = next;
        if run == 0 && end == self.len && end > 0 {
            // The whole chunk: passed on as it came, without touching its reference count.
            return Some(Item::Forward(std::mem::take(&mut self.bytes)));
        }
        (run < end).then(|| Item::Forward(self.bytes.slice(run..end)))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Frame {
    /// Between frames, or reading a header.
    Header,
    /// In a data frame's payload, passed on or skipped.
    Data { forward: bool },
    /// In a control frame's payload, held.
    Control,
}

/// Follows the frames of one direction of a tunnel.
#[derive(Debug, Clone)]
pub(crate) struct FrameReader {
    limits: FrameLimits,
    head: [u8; MAX_HEADER],
    head_len: u8,
    frame: Frame,
    /// Payload bytes of the current frame still to come.
    remaining: u64,
    /// The control frame being held (header, then payload as it arrived).
    /// Allocated only while a control frame is held (and until the next frame), so an idle
    /// reader holds no buffer: at most 139 bytes, a few times a minute.
    ctrl: Vec<u8>,
    ctrl_opcode: u8,
    ctrl_mask: Option<[u8; 4]>,
    /// Where the held control frame began in the current chunk, if it did.
    ctrl_start: Option<usize>,
    in_message: bool,
    message_len: u64,
    /// Data frames starting from now on are skipped, not passed on.
    discard: bool,
    /// After a protocol violation nothing more is read.
    failed: bool,
    pending: Option<Violation>,
    /// Frames seen.
    pub(crate) frames: u64,
    /// Messages seen (counted at their final frame).
    pub(crate) messages: u64,
}

impl FrameReader {
    pub(crate) fn new(limits: FrameLimits) -> Self {
        FrameReader {
            limits,
            head: [0; MAX_HEADER],
            head_len: 0,
            frame: Frame::Header,
            remaining: 0,
            ctrl: Vec::new(),
            ctrl_opcode: 0,
            ctrl_mask: None,
            ctrl_start: None,
            in_message: false,
            message_len: 0,
            discard: false,
            failed: false,
            pending: None,
            frames: 0,
            messages: 0,
        }
    }

    /// Whether the outgoing stream is between frames: no frame has been passed on in part.
    /// A header or control frame still held, or a frame being skipped, counts as between: a
    /// frame injected now goes before it.
    pub(crate) fn at_boundary(&self) -> bool {
        !matches!(self.frame, Frame::Data { forward: true })
    }

    /// Skips the data frames that start from now on (the frame under way is finished first).
    pub(crate) fn discard_data(&mut self) {
        self.discard = true;
    }

    /// The unmasked payload of the control frame last returned.
    pub(crate) fn control_payload(&self) -> &[u8] {
        self.ctrl
            .get(2..)
            .map_or(&[], |_| &self.ctrl[header_len(&self.ctrl)..])
    }

    /// Whether a protocol violation stopped the reader.
    pub(crate) fn failed(&self) -> bool {
        self.failed
    }

    /// The next item of `feed`, or `None` once the chunk is used up.
    pub(crate) fn next(&mut self, feed: &mut Feed) -> Option<Item> {
        loop {
            if let Some(v) = self.pending.take() {
                return Some(Item::Violation(v));
            }
            if matches!(self.frame, Frame::Control) && self.remaining == 0 {
                // An empty control frame whose header ended the previous step.
                return self.read_control(feed);
            }
            if feed.want_boundary && self.at_boundary() && !self.failed {
                if let Some(item) = feed.flush(feed.pos, feed.pos) {
                    return Some(item);
                }
                feed.want_boundary = false;
                return Some(Item::Boundary);
            }
            let len = feed.len;
            if feed.pos == len {
                // A control frame still held continues in another chunk: it will be copied.
                self.ctrl_start = None;
                return feed.flush(len, len);
            }
            if self.failed {
                feed.pos = len;
                feed.run = len;
                continue;
            }
            let item = match self.frame {
                Frame::Header => self.read_header(feed),
                Frame::Data { forward } => {
                    self.take(feed);
                    if !forward {
                        feed.run = feed.pos;
                    }
                    None
                }
                Frame::Control => self.read_control(feed),
            };
            if item.is_some() {
                return item;
            }
        }
    }

    /// Consumes up to the rest of the current payload from `feed`.
    fn take(&mut self, feed: &mut Feed) {
        let available = feed.len - feed.pos;
        let take = usize::try_from(self.remaining).map_or(available, |r| r.min(available));
        feed.pos += take;
        self.remaining -= take as u64;
        if self.remaining == 0 {
            self.frame = Frame::Header;
        }
    }

    fn read_header(&mut self, feed: &mut Feed) -> Option<Item> {
        if self.head_len == 0 {
            if self.ctrl.capacity() > 0 {
                self.ctrl = Vec::new();
            }
            feed.head_start = Some(feed.pos);
            // The common case: the whole header is in this chunk.
            let rest = &feed.bytes[feed.pos..];
            if rest.len() >= 2 {
                let need = header_len(rest);
                if let Some(h) = rest.get(..need) {
                    self.head[..need].copy_from_slice(h);
                    self.head_len = need as u8;
                    feed.pos += need;
                }
            }
        }
        loop {
            let have = usize::from(self.head_len);
            let need = if have < 2 {
                2
            } else {
                header_len(&self.head[..2])
            };
            if have == need {
                break;
            }
            let len = feed.len;
            if feed.pos == len {
                // The rest of the header is in a later chunk: hold what is here.
                let start = feed.head_start.unwrap_or(0);
                return feed.flush(start, len);
            }
            self.head[have] = feed.bytes[feed.pos];
            self.head_len += 1;
            feed.pos += 1;
        }
        let start = feed.head_start.take();
        let carried = match start {
            Some(_) => 0,
            None => usize::from(self.head_len) - feed.pos,
        };
        let header = parse_header(&self.head[..usize::from(self.head_len)]);
        self.frames += 1;
        let verdict = header.and_then(|h| self.judge(&h).map(|()| h));
        let head_len = usize::from(self.head_len);
        self.head_len = 0;
        let before = start.unwrap_or(0);
        match verdict {
            Err(v) => {
                if v == Violation::TooBig {
                    // Skip the frame's payload, so the stream stays readable (its Close reply).
                    self.remaining = header.map_or(0, |h| h.len);
                    self.frame = Frame::Data { forward: false };
                    if self.remaining == 0 {
                        self.frame = Frame::Header;
                    }
                } else {
                    self.failed = true;
                }
                self.pending = Some(v);
                feed.flush(before, feed.pos)
            }
            Ok(h) if h.opcode >= OP_CLOSE => {
                self.ctrl = Vec::with_capacity(head_len + h.len as usize);
                self.ctrl.extend_from_slice(&self.head[..head_len]);
                self.ctrl_start = start;
                self.ctrl_opcode = h.opcode;
                self.ctrl_mask = h.mask;
                self.remaining = h.len;
                self.frame = Frame::Control;
                let flushed = feed.flush(before, feed.pos);
                if flushed.is_some() {
                    return flushed;
                }
                if h.len == 0 {
                    return self.read_control(feed);
                }
                None
            }
            Ok(h) => {
                let forward = !self.discard;
                self.remaining = h.len;
                self.frame = if h.len == 0 {
                    Frame::Header
                } else {
                    Frame::Data { forward }
                };
                if !forward {
                    return feed.flush(before, feed.pos);
                }
                // A header begun in an earlier chunk was held: it goes out now, and this
                // chunk's run (from its start) carries the rest of it.
                if carried > 0 {
                    return Some(Item::Forward(Bytes::copy_from_slice(&self.head[..carried])));
                }
                // The payload at hand joins the run now, without another turn of the loop.
                if !matches!(self.frame, Frame::Header) {
                    self.take(feed);
                }
                None
            }
        }
    }

    /// Checks a data or control header against the protocol and the limits, and counts it.
    fn judge(&mut self, h: &Header) -> Result<(), Violation> {
        if self.limits.require_mask && !h.masked {
            return Err(Violation::Unmasked);
        }
        match h.opcode {
            OP_CLOSE | OP_PING | OP_PONG => {
                if !h.fin || h.len > MAX_CONTROL_PAYLOAD as u64 {
                    return Err(Violation::Protocol);
                }
                Ok(())
            }
            OP_CONTINUATION | OP_TEXT | OP_BINARY => {
                let continuation = h.opcode == OP_CONTINUATION;
                if continuation != self.in_message {
                    return Err(Violation::Protocol);
                }
                let message = if continuation { self.message_len } else { 0 }.saturating_add(h.len);
                // The fragmentation state follows even a refused frame, so the rest of the
                // stream still parses (the sender's Close reply must be found).
                self.in_message = !h.fin;
                self.message_len = if h.fin { 0 } else { message };
                if h.fin {
                    self.messages += 1;
                }
                let l = self.limits;
                if (l.max_frame != 0 && h.len > l.max_frame)
                    || (l.max_message != 0 && message > l.max_message)
                {
                    return Err(Violation::TooBig);
                }
                Ok(())
            }
            _ => Err(Violation::Protocol),
        }
    }

    fn read_control(&mut self, feed: &mut Feed) -> Option<Item> {
        let from = feed.pos;
        self.take(feed);
        self.ctrl.extend_from_slice(&feed.bytes[from..feed.pos]);
        feed.run = feed.pos;
        if matches!(self.frame, Frame::Control) {
            return None;
        }
        let raw = match self.ctrl_start.take() {
            Some(start) => feed.bytes.slice(start..feed.pos),
            None => Bytes::copy_from_slice(&self.ctrl),
        };
        // Unmasked in place: `raw` keeps the frame as it arrived.
        let at = header_len(&self.ctrl);
        if let Some(m) = self.ctrl_mask {
            for (i, b) in self.ctrl[at..].iter_mut().enumerate() {
                *b ^= m[i % 4];
            }
        }
        Some(Item::Control(Control {
            opcode: self.ctrl_opcode,
            raw,
        }))
    }
}

#[derive(Debug, Clone, Copy)]
struct Header {
    fin: bool,
    opcode: u8,
    masked: bool,
    mask: Option<[u8; 4]>,
    len: u64,
}

/// The header's full length from its first two bytes.
fn header_len(first: &[u8]) -> usize {
    let ext = match first[1] & 0x7F {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    2 + ext + if first[1] & 0x80 != 0 { 4 } else { 0 }
}

fn parse_header(h: &[u8]) -> Result<Header, Violation> {
    let masked = h[1] & 0x80 != 0;
    let (len, at) = match h[1] & 0x7F {
        126 => (u64::from(u16::from_be_bytes([h[2], h[3]])), 4),
        127 => {
            let mut b = [0; 8];
            b.copy_from_slice(&h[2..10]);
            let len = u64::from_be_bytes(b);
            if len >> 63 != 0 {
                return Err(Violation::Protocol);
            }
            (len, 10)
        }
        n => (u64::from(n), 2),
    };
    let mask = masked.then(|| [h[at], h[at + 1], h[at + 2], h[at + 3]]);
    Ok(Header {
        fin: h[0] & 0x80 != 0,
        opcode: h[0] & 0x0F,
        masked,
        mask,
        len,
    })
}

/// A control frame of the proxy's own: unmasked towards a client, masked with `mask` towards
/// an upstream (RFC 6455 §5.3). The payload is cut at 125 bytes.
pub(crate) fn control_frame(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Bytes {
    let payload = &payload[..payload.len().min(MAX_CONTROL_PAYLOAD)];
    let mut out = BytesMut::with_capacity(6 + payload.len());
    out.put_u8(0x80 | opcode);
    let len = payload.len() as u8;
    match mask {
        None => {
            out.put_u8(len);
            out.put_slice(payload);
        }
        Some(key) => {
            out.put_u8(0x80 | len);
            out.put_slice(&key);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        }
    }
    out.freeze()
}

/// A Close frame with `code` and no reason text.
pub(crate) fn close_frame(code: u16, mask: Option<[u8; 4]>) -> Bytes {
    control_frame(OP_CLOSE, &code.to_be_bytes(), mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(fin: bool, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
        let mut out = vec![(u8::from(fin) << 7) | opcode];
        let m = if mask.is_some() { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => out.push(m | n as u8),
            n if n <= 0xFFFF => {
                out.push(m | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(m | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if let Some(key) = mask {
            out.extend_from_slice(&key);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        } else {
            out.extend_from_slice(payload);
        }
        out
    }

    /// Forwarded bytes, control frames (opcode, payload) and violations.
    type Read = (Vec<u8>, Vec<(u8, Vec<u8>)>, Vec<Violation>);

    /// Reads `chunks`.
    fn read(reader: &mut FrameReader, chunks: &[&[u8]]) -> Read {
        let (mut out, mut ctrl, mut bad) = (Vec::new(), Vec::new(), Vec::new());
        for c in chunks {
            let mut feed = Feed::new(Bytes::copy_from_slice(c), false);
            while let Some(item) = reader.next(&mut feed) {
                match item {
                    Item::Forward(b) => out.extend_from_slice(&b),
                    Item::Control(c) => ctrl.push((c.opcode, reader.control_payload().to_vec())),
                    Item::Boundary => {}
                    Item::Violation(v) => bad.push(v),
                }
            }
        }
        (out, ctrl, bad)
    }

    #[test]
    fn a_chunk_of_whole_data_frames_comes_out_as_the_same_bytes() {
        let mut r = FrameReader::new(FrameLimits::default());
        let mut wire = frame(true, OP_TEXT, b"hello", None);
        wire.extend(frame(true, OP_BINARY, &[7; 300], None));
        let mut feed = Feed::new(Bytes::from(wire.clone()), false);
        let first = r.next(&mut feed);
        assert!(matches!(&first, Some(Item::Forward(b)) if b[..] == wire[..]));
        assert!(r.next(&mut feed).is_none());
        assert_eq!((r.frames, r.messages), (2, 2));
    }

    #[test]
    fn control_frames_are_held_and_unmasked_data_passes_between_them() {
        let mut r = FrameReader::new(FrameLimits {
            require_mask: true,
            ..FrameLimits::default()
        });
        let key = Some([1, 2, 3, 4]);
        let mut wire = frame(false, OP_TEXT, b"ab", key);
        wire.extend(frame(true, OP_PING, b"are you there", key));
        wire.extend(frame(true, OP_CONTINUATION, b"cd", key));
        wire.extend(frame(true, OP_CLOSE, &1000u16.to_be_bytes(), key));
        let (out, ctrl, bad) = read(&mut r, &[&wire]);
        let mut data = frame(false, OP_TEXT, b"ab", key);
        data.extend(frame(true, OP_CONTINUATION, b"cd", key));
        assert_eq!(out, data);
        assert_eq!(
            ctrl,
            vec![
                (OP_PING, b"are you there".to_vec()),
                (OP_CLOSE, 1000u16.to_be_bytes().to_vec())
            ]
        );
        assert!(bad.is_empty());
        assert_eq!(r.messages, 1);
    }

    #[test]
    fn limits_and_protocol_errors_are_refused_before_any_byte_of_the_frame() {
        let limits = FrameLimits {
            max_message: 10,
            ..FrameLimits::default()
        };
        let mut r = FrameReader::new(limits);
        let mut wire = frame(false, OP_BINARY, &[1; 6], None);
        wire.extend(frame(true, OP_CONTINUATION, &[2; 6], None));
        wire.extend(frame(true, OP_CLOSE, &1000u16.to_be_bytes(), None));
        let (out, ctrl, bad) = read(&mut r, &[&wire]);
        assert_eq!(out, frame(false, OP_BINARY, &[1; 6], None));
        assert_eq!(bad, vec![Violation::TooBig]);
        assert_eq!(
            ctrl.len(),
            1,
            "the stream stays readable after a too-big frame"
        );

        let mut r = FrameReader::new(FrameLimits {
            require_mask: true,
            ..FrameLimits::default()
        });
        let (out, _, bad) = read(&mut r, &[&frame(true, OP_TEXT, b"x", None)]);
        assert!(out.is_empty());
        assert_eq!(bad, vec![Violation::Unmasked]);

        for wire in [
            frame(true, 0x3, b"", None),
            frame(true, OP_CONTINUATION, b"x", None),
            frame(false, OP_PING, b"", None),
            frame(true, OP_PING, &[0; 126], None),
        ] {
            let mut r = FrameReader::new(FrameLimits::default());
            let (out, _, bad) = read(&mut r, &[&wire, b"more"]);
            assert!(out.is_empty(), "{wire:?}");
            assert_eq!(bad, vec![Violation::Protocol], "{wire:?}");
            assert!(r.failed());
        }
    }

    #[test]
    fn boundaries_are_reported_between_frames_only() {
        let mut r = FrameReader::new(FrameLimits::default());
        let wire = frame(true, OP_BINARY, &[9; 10], None);
        let mut feed = Feed::new(Bytes::copy_from_slice(&wire[..5]), true);
        assert!(matches!(r.next(&mut feed), Some(Item::Boundary)));
        assert!(matches!(r.next(&mut feed), Some(Item::Forward(b)) if b[..] == wire[..5]));
        feed.want_boundary = true;
        assert!(r.next(&mut feed).is_none(), "no boundary inside a frame");
        let mut feed = Feed::new(Bytes::copy_from_slice(&wire[5..]), true);
        assert!(matches!(r.next(&mut feed), Some(Item::Forward(b)) if b[..] == wire[5..]));
        assert!(matches!(r.next(&mut feed), Some(Item::Boundary)));
    }

    #[test]
    fn the_proxys_own_frames_are_valid() {
        let mut r = FrameReader::new(FrameLimits {
            require_mask: true,
            ..FrameLimits::default()
        });
        let (_, ctrl, bad) = read(&mut r, &[&close_frame(1001, Some([9, 8, 7, 6]))]);
        assert!(bad.is_empty());
        assert_eq!(ctrl, vec![(OP_CLOSE, 1001u16.to_be_bytes().to_vec())]);
        assert_eq!(&close_frame(1009, None)[..], &[0x88, 2, 0x03, 0xF1]);
    }

    use proptest::prelude::*;

    /// A valid frame sequence: messages of 1–3 fragments with control frames between them.
    fn frames() -> impl Strategy<Value = (Vec<Vec<u8>>, bool)> {
        let masked = any::<bool>();
        masked.prop_flat_map(|masked| {
            let key = masked.then_some([0x37, 0xFA, 0x21, 0x3D]);
            // Lengths around each header size change: 7-bit, 16-bit and 64-bit.
            let payload = prop_oneof![
                6 => prop::collection::vec(any::<u8>(), 0..20),
                3 => prop::collection::vec(any::<u8>(), 120..130),
                1 => prop::collection::vec(Just(0x5A), 65_534..65_538),
            ];
            let message = (prop::collection::vec(payload, 1..4), any::<bool>()).prop_map(
                move |(parts, text)| {
                    let n = parts.len();
                    parts
                        .iter()
                        .enumerate()
                        .map(|(i, p)| {
                            let op = match (i, text) {
                                (0, true) => OP_TEXT,
                                (0, false) => OP_BINARY,
                                _ => OP_CONTINUATION,
                            };
                            frame(i + 1 == n, op, p, key)
                        })
                        .collect::<Vec<_>>()
                },
            );
            let control = (
                prop_oneof![Just(OP_PING), Just(OP_PONG), Just(OP_CLOSE)],
                prop::collection::vec(any::<u8>(), 0..126),
            )
                .prop_map(move |(op, p)| vec![frame(true, op, &p, key)]);
            prop::collection::vec(prop_oneof![3 => message, 1 => control], 1..8)
                .prop_map(move |groups| (groups.into_iter().flatten().collect(), masked))
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn any_split_reads_the_same(
            (frames, masked) in frames(),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
        ) {
            let wire: Vec<u8> = frames.concat();
            let limits = FrameLimits { require_mask: masked, ..FrameLimits::default() };
            let mut whole = FrameReader::new(limits);
            let expected = read(&mut whole, &[&wire]);
            let mut points: Vec<usize> = cuts.iter().map(|c| c.index(wire.len() + 1)).collect();
            points.sort_unstable();
            let mut chunks = Vec::new();
            let mut at = 0;
            for p in points.into_iter().chain([wire.len()]) {
                chunks.push(&wire[at..p]);
                at = p;
            }
            let mut split = FrameReader::new(limits);
            let got = read(&mut split, &chunks);
            prop_assert_eq!(&got, &expected);
            prop_assert!(expected.2.is_empty());
            // Data frames come out byte for byte; control frames are handed over instead.
            let data: Vec<u8> = frames
                .iter()
                .filter(|f| f[0] & 0x0F < OP_CLOSE)
                .flatten()
                .copied()
                .collect();
            prop_assert_eq!(got.0, data);
            prop_assert_eq!(got.1.len(), frames.len() - frames.iter().filter(|f| f[0] & 0x0F < OP_CLOSE).count());
            prop_assert_eq!((split.frames, split.messages), (whole.frames, whole.messages));
            prop_assert!(split.at_boundary());
        }

        #[test]
        fn boundaries_fall_only_between_frames(
            (frames, _) in frames(),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
        ) {
            let wire: Vec<u8> = frames.concat();
            let mut starts = std::collections::BTreeSet::new();
            let mut at = 0;
            for f in &frames {
                starts.insert(at);
                at += f.len();
            }
            starts.insert(at);
            let mut points: Vec<usize> = cuts.iter().map(|c| c.index(wire.len() + 1)).collect();
            points.sort_unstable();
            let mut r = FrameReader::new(FrameLimits::default());
            // The offset in the outgoing stream at which an injection would land, counted in
            // input bytes consumed (held control frames count where they started).
            let mut consumed = 0;
            let mut prev = 0;
            for p in points.into_iter().chain([wire.len()]) {
                let mut feed = Feed::new(Bytes::copy_from_slice(&wire[prev..p]), true);
                while let Some(item) = r.next(&mut feed) {
                    match item {
                        Item::Forward(b) => consumed += b.len(),
                        Item::Control(c) => consumed += c.raw.len(),
                        Item::Boundary => {
                            prop_assert!(starts.contains(&consumed), "boundary at {} is inside a frame", consumed);
                            feed.want_boundary = false;
                        }
                        Item::Violation(v) => prop_assert!(false, "violation {:?}", v),
                    }
                }
                prev = p;
            }
        }
    }
}
