//! Message bodies as a stream of pieces: a decoder that delimits a body (RFC 9112 §6–7) and hands
//! out its data as zero-copy slices of the input, and the canonical re-encoding the proxy writes.
//!
//! Chunked bodies are parsed strictly: hex sizes without sign or overflow, extensions checked and
//! dropped, CRLF required after each chunk's data, trailers parsed as fields and dropped. The
//! re-encoding keeps each chunk's original size, so the bytes written do not depend on how the
//! input was split into reads.

use bytes::{Buf, Bytes};

/// How a message body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// No body at all.
    None,
    /// Exactly this many bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the sender closes (responses only).
    UntilClose,
}

/// A piece of decoded body, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Piece {
    /// A chunk of this size starts (chunked only).
    ChunkStart(u64),
    /// Body data, a slice of the input.
    Data(Bytes),
    /// The current chunk's data and its CRLF are complete (chunked only).
    ChunkEnd,
    /// The body is complete (after the last chunk and its trailers, for chunked).
    End,
}

/// A malformed body; the message names the rule broken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ChunkError(pub(crate) &'static str);

/// Longest chunk-size line (size, extensions) or trailer section we accept.
const MAX_CHUNK_LINE: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Reading hex digits of a size; `digits` so far.
    Size {
        size: u64,
        digits: u8,
    },
    /// After the size: optional whitespace then `;ext` until CR.
    Ext {
        size: u64,
        len: usize,
    },
    /// Saw CR after the size line; need LF.
    SizeLf {
        size: u64,
    },
    /// Inside chunk data.
    Data {
        left: u64,
    },
    /// After chunk data; need CR.
    DataCr,
    /// After chunk data and CR; need LF.
    DataLf,
    /// At the start of a trailer line (or the final empty line).
    TrailerStart {
        total: usize,
    },
    /// Inside a trailer field name.
    TrailerName {
        total: usize,
        len: usize,
    },
    /// Inside a trailer field value.
    TrailerValue {
        total: usize,
    },
    /// Saw CR ending a trailer line.
    TrailerLf {
        total: usize,
        last: bool,
    },
    Done,
}

/// Decodes one body.
#[derive(Debug, Clone)]
pub(crate) struct BodyDecoder {
    state: DecoderState,
    /// Data bytes delivered so far (excluding chunk framing).
    pub(crate) data_len: u64,
}

#[derive(Debug, Clone)]
enum DecoderState {
    Length { left: u64 },
    Chunked(Chunk),
    UntilClose,
    Done,
}

impl BodyDecoder {
    pub(crate) fn new(framing: Framing) -> Self {
        let state = match framing {
            Framing::None | Framing::Length(0) => DecoderState::Done,
            Framing::Length(n) => DecoderState::Length { left: n },
            Framing::Chunked => DecoderState::Chunked(Chunk::Size { size: 0, digits: 0 }),
            Framing::UntilClose => DecoderState::UntilClose,
        };
        BodyDecoder { state, data_len: 0 }
    }

    /// True once the whole body has been delivered.
    pub(crate) fn is_done(&self) -> bool {
        matches!(self.state, DecoderState::Done)
    }

    /// Decodes from the front of `input`, calling `out` for each piece, and stops after `End`
    /// (leaving later bytes in `input`) or when `input` is exhausted.
    pub(crate) fn decode(
        &mut self,
        input: &mut Bytes,
        out: &mut impl FnMut(Piece),
    ) -> Result<(), ChunkError> {
        match &mut self.state {
            DecoderState::Done => Ok(()),
            DecoderState::UntilClose => {
                if !input.is_empty() {
                    self.data_len += input.len() as u64;
                    out(Piece::Data(input.split_to(input.len())));
                }
                Ok(())
            }
            DecoderState::Length { left } => {
                let n = usize::try_from(*left)
                    .unwrap_or(usize::MAX)
                    .min(input.len());
                if n > 0 {
                    *left -= n as u64;
                    self.data_len += n as u64;
                    out(Piece::Data(input.split_to(n)));
                }
                if *left == 0 {
                    self.state = DecoderState::Done;
                    out(Piece::End);
                }
                Ok(())
            }
            DecoderState::Chunked(_) => self.decode_chunked(input, out),
        }
    }

    /// The sender closed. Returns whether that completes the body (true only for
    /// read-until-close bodies, and bodies already complete).
    pub(crate) fn finish_at_eof(&mut self, out: &mut impl FnMut(Piece)) -> bool {
        match self.state {
            DecoderState::Done => true,
            DecoderState::UntilClose => {
                self.state = DecoderState::Done;
                out(Piece::End);
                true
            }
            _ => false,
        }
    }

    fn decode_chunked(
        &mut self,
        input: &mut Bytes,
        out: &mut impl FnMut(Piece),
    ) -> Result<(), ChunkError> {
        let DecoderState::Chunked(mut st) = self.state else {
            return Ok(());
        };
        let result = loop {
            if let Chunk::Data { left } = st {
                if input.is_empty() {
                    break Ok(());
                }
                let n = usize::try_from(left).unwrap_or(usize::MAX).min(input.len());
                self.data_len += n as u64;
                out(Piece::Data(input.split_to(n)));
                let left = left - n as u64;
                st = if left == 0 {
                    Chunk::DataCr
                } else {
                    Chunk::Data { left }
                };
                continue;
            }
            if st == Chunk::Done {
                break Ok(());
            }
            let Some(&b) = input.first() else {
                break Ok(());
            };
            input.advance(1);
            st = match step(st, b) {
                Ok(Step::Next(s)) => s,
                Ok(Step::StartChunk(size)) => {
                    out(Piece::ChunkStart(size));
                    Chunk::Data { left: size }
                }
                Ok(Step::ChunkEnd) => {
                    out(Piece::ChunkEnd);
                    Chunk::Size { size: 0, digits: 0 }
                }
                Ok(Step::End) => {
                    out(Piece::End);
                    Chunk::Done
                }
                Err(e) => break Err(e),
            };
        };
        self.state = if st == Chunk::Done {
            DecoderState::Done
        } else {
            DecoderState::Chunked(st)
        };
        result
    }
}

enum Step {
    Next(Chunk),
    StartChunk(u64),
    ChunkEnd,
    End,
}

/// One byte of chunk framing. Data bytes never come here.
fn step(st: Chunk, b: u8) -> Result<Step, ChunkError> {
    use Chunk::*;
    let next = match st {
        Size { size, digits } => match b {
            b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                if digits >= 16 || size > (u64::MAX >> 4) {
                    return Err(ChunkError("chunk size overflows"));
                }
                let v = match b {
                    b'0'..=b'9' => b - b'0',
                    b'a'..=b'f' => b - b'a' + 10,
                    _ => b - b'A' + 10,
                };
                Size {
                    size: (size << 4) | u64::from(v),
                    digits: digits + 1,
                }
            }
            _ if digits == 0 => return Err(ChunkError("chunk size missing")),
            b'\r' => SizeLf { size },
            b';' | b' ' | b'\t' => Ext { size, len: 0 },
            _ => return Err(ChunkError("invalid byte in chunk size")),
        },
        Ext { size, len } => match b {
            b'\r' => SizeLf { size },
            b'\n' | 0 => return Err(ChunkError("bare LF or NUL in chunk extension")),
            _ if len >= MAX_CHUNK_LINE => return Err(ChunkError("chunk extension too long")),
            0x01..=0x08 | 0x0a..=0x1f | 0x7f => {
                return Err(ChunkError("control byte in chunk extension"))
            }
            _ => Ext { size, len: len + 1 },
        },
        SizeLf { size } => match b {
            b'\n' if size == 0 => TrailerStart { total: 0 },
            b'\n' => return Ok(Step::StartChunk(size)),
            _ => return Err(ChunkError("chunk size line not ended by CRLF")),
        },
        DataCr => match b {
            b'\r' => DataLf,
            _ => return Err(ChunkError("chunk data not followed by CRLF")),
        },
        DataLf => match b {
            b'\n' => return Ok(Step::ChunkEnd),
            _ => return Err(ChunkError("chunk data not followed by CRLF")),
        },
        TrailerStart { total } => match b {
            b'\r' => TrailerLf { total, last: true },
            _ if is_token(b) => TrailerName {
                total: total + 1,
                len: 1,
            },
            _ => return Err(ChunkError("invalid trailer field")),
        },
        TrailerName { total, len } => match b {
            b':' => TrailerValue { total: total + 1 },
            _ if is_token(b) => TrailerName {
                total: total + 1,
                len: len + 1,
            },
            _ => return Err(ChunkError("invalid trailer field name")),
        },
        TrailerValue { total } => match b {
            b'\r' => TrailerLf { total, last: false },
            b'\t' | 0x20..=0x7e | 0x80..=0xff => TrailerValue { total: total + 1 },
            _ => return Err(ChunkError("invalid byte in trailer value")),
        },
        TrailerLf { total, last } => match b {
            b'\n' if last => return Ok(Step::End),
            b'\n' => TrailerStart { total },
            _ => return Err(ChunkError("trailer line not ended by CRLF")),
        },
        Data { .. } | Done => return Err(ChunkError("internal: data byte in framing")),
    };
    if let TrailerStart { total } | TrailerName { total, .. } | TrailerValue { total } = next {
        if total > MAX_CHUNK_LINE {
            return Err(ChunkError("trailer section too large"));
        }
    }
    Ok(Step::Next(next))
}

fn is_token(b: u8) -> bool {
    crate::fields::is_token_byte(b)
}

/// The canonical chunk-size line for `size`: lower-case hex, no extensions.
pub(crate) fn chunk_size_line(size: u64, buf: &mut bytes::BytesMut) -> Bytes {
    use std::fmt::Write as _;
    buf.reserve(20);
    // Writing to a BytesMut cannot fail.
    let _ = write!(buf, "{size:x}\r\n");
    buf.split().freeze()
}

/// CRLF after chunk data.
pub(crate) const CHUNK_END: &[u8] = b"\r\n";
/// The last chunk with no trailers.
pub(crate) const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    /// Data, chunk sizes, whether the end was seen, and the bytes left after the body.
    type Decoded = (Vec<u8>, Vec<u64>, bool, Vec<u8>);

    /// Decodes `input` split into `piece`-byte reads.
    fn run(framing: Framing, input: &[u8], piece: usize) -> Result<Decoded, ChunkError> {
        let mut d = BodyDecoder::new(framing);
        let (mut data, mut sizes, mut end, mut rest) = (Vec::new(), Vec::new(), false, Vec::new());
        for p in input.chunks(piece.max(1)) {
            let mut b = Bytes::copy_from_slice(p);
            if end {
                rest.extend_from_slice(&b);
                continue;
            }
            d.decode(&mut b, &mut |pc| match pc {
                Piece::Data(x) => data.extend_from_slice(&x),
                Piece::ChunkStart(s) => sizes.push(s),
                Piece::End => end = true,
                Piece::ChunkEnd => {}
            })?;
            rest.extend_from_slice(&b);
        }
        Ok((data, sizes, end, rest))
    }

    #[test]
    fn chunked_any_split() {
        let msg = b"5;ext=1\r\nhello\r\nA\r\n0123456789\r\n0\r\nX-T: v\r\n\r\nNEXT";
        for piece in 1..msg.len() {
            let (data, sizes, end, rest) = run(Framing::Chunked, msg, piece).expect("valid");
            assert_eq!(data, b"hello0123456789");
            assert_eq!(sizes, [5, 10]);
            assert!(end);
            assert_eq!(rest, b"NEXT");
        }
    }

    #[test]
    fn chunked_rejects() {
        for bad in [
            &b"\r\n"[..],
            b"-5\r\n",
            b"0x5\r\n",
            b"5\nhello",
            b"5\r\nhelloXX",
            b"5\r\nhello\r\n11111111111111111\r\n",
            b"5;a\nb\r\n",
            b"5;a\0\r\n",
            b"0\r\nbad trailer\r\n\r\n",
            b"0\r\n folded: x\r\n\r\n",
            b"0\r\nX: a\rb\r\n\r\n",
        ] {
            assert!(
                run(Framing::Chunked, bad, 1).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn length_and_until_close() {
        let (data, _, end, rest) = run(Framing::Length(3), b"abcdef", 2).expect("ok");
        assert_eq!(
            (data.as_slice(), end, rest.as_slice()),
            (&b"abc"[..], true, &b"def"[..])
        );
        let mut d = BodyDecoder::new(Framing::UntilClose);
        let mut b = Bytes::from_static(b"xyz");
        let mut n = 0;
        d.decode(&mut b, &mut |p| {
            if let Piece::Data(x) = p {
                n += x.len()
            }
        })
        .expect("ok");
        assert_eq!(n, 3);
        assert!(d.finish_at_eof(&mut |_| {}));
        assert!(!BodyDecoder::new(Framing::Length(1)).finish_at_eof(&mut |_| {}));
    }

    #[test]
    fn data_is_zero_copy() {
        let input = Bytes::from_static(b"3\r\nabc\r\n0\r\n\r\n");
        let base = input.as_ptr() as usize;
        let mut b = input.clone();
        let mut d = BodyDecoder::new(Framing::Chunked);
        let mut ptr = 0;
        d.decode(&mut b, &mut |p| {
            if let Piece::Data(x) = p {
                ptr = x.as_ptr() as usize
            }
        })
        .expect("ok");
        assert_eq!(ptr, base + 3);
    }
}
