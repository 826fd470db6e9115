//! Finding the end of a message head in bytes that arrive in arbitrary pieces.
//!
//! When a whole head arrives in one read (the common case) it is split off that read without a
//! copy. Otherwise the pieces are copied into a buffer bounded by the head limit, and scanning
//! resumes where it stopped, so the work is O(bytes) however the head is chunked. This module
//! never interprets the head; it only delimits it.

use bytes::{Buf, Bytes, BytesMut};

/// Why a head could not be delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HeadLimit {
    /// The head is longer than the head limit.
    TooLarge,
    /// The first line alone is longer than the URI limit allows.
    LineTooLong,
}

/// Accumulates one head at a time.
#[derive(Debug, Default)]
pub(crate) struct HeadReader {
    buf: BytesMut,
    /// Where scanning resumes in `buf`: everything before it holds no head end.
    scanned: usize,
    /// Whether the first line's end has been seen.
    line_done: bool,
}

impl HeadReader {
    /// True when no byte of a head has been taken yet.
    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Takes bytes from the front of `input` until a head is complete, returning it (including
    /// the blank line). Bytes after the head stay in `input`. Leading empty lines before a head
    /// are dropped, as RFC 9112 §2.2 allows.
    pub(crate) fn push(
        &mut self,
        input: &mut Bytes,
        max_head: usize,
        max_line: usize,
    ) -> Result<Option<Bytes>, HeadLimit> {
        loop {
            if self.buf.is_empty() {
                // Fast path: scan the caller's bytes in place.
                let (end, line_done) = match scan(input, 0, self.line_done) {
                    Scan::Found(end) => (end, true),
                    Scan::NotYet { line_done, .. } => (0, line_done),
                };
                if end > 0 {
                    if is_only_empty_lines(&input[..end]) {
                        input.advance(end);
                        continue;
                    }
                    if end > max_head {
                        return Err(limit_kind(&input[..end], max_line));
                    }
                    self.line_done = false;
                    return Ok(Some(strip_leading_empty_lines(input.split_to(end))));
                }
                self.line_done = line_done;
                if input.len() > max_head {
                    return Err(limit_kind(input, max_line));
                }
                if !line_done && input.len() > max_line {
                    return Err(HeadLimit::LineTooLong);
                }
                self.buf.extend_from_slice(input);
                self.scanned = resume_point(&self.buf);
                input.advance(input.len());
                return Ok(None);
            }

            let old_len = self.buf.len();
            // Never copy more than could still belong to an acceptable head.
            let room = (max_head + 4).saturating_sub(old_len);
            let take = input.len().min(room);
            self.buf.extend_from_slice(&input[..take]);
            match scan(&self.buf, self.scanned, self.line_done) {
                Scan::Found(end) => {
                    input.advance(end - old_len);
                    self.buf.truncate(end);
                    let head = std::mem::take(&mut self.buf).freeze();
                    self.scanned = 0;
                    self.line_done = false;
                    if is_only_empty_lines(&head) {
                        continue;
                    }
                    if end > max_head {
                        return Err(limit_kind(&head, max_line));
                    }
                    return Ok(Some(strip_leading_empty_lines(head)));
                }
                Scan::NotYet { resume, line_done } => {
                    input.advance(take);
                    self.scanned = resume;
                    self.line_done = line_done;
                    if self.buf.len() > max_head {
                        return Err(limit_kind(&self.buf, max_line));
                    }
                    if !line_done && self.buf.len() > max_line {
                        return Err(HeadLimit::LineTooLong);
                    }
                    return Ok(None);
                }
            }
        }
    }

    /// Forgets any partial head.
    pub(crate) fn clear(&mut self) {
        self.buf = BytesMut::new();
        self.scanned = 0;
        self.line_done = false;
    }
}

enum Scan {
    /// The head ends at this index (exclusive).
    Found(usize),
    /// No end yet; rescan from `resume`.
    NotYet { resume: usize, line_done: bool },
}

/// Looks for the blank line ending a head, from `from`. A head ends at the first LF that is
/// followed by CRLF or by a bare LF; bare LFs are rejected later by the parser's checks, but must
/// still end the scan so that a bare-LF head cannot hide bytes behind it.
fn scan(buf: &[u8], from: usize, mut line_done: bool) -> Scan {
    let mut pos = from;
    while let Some(off) = memchr::memchr(b'\n', &buf[pos..]) {
        let lf = pos + off;
        line_done = true;
        match buf.get(lf + 1) {
            None => {
                return Scan::NotYet {
                    resume: lf,
                    line_done,
                }
            }
            Some(b'\n') => return Scan::Found(lf + 2),
            Some(b'\r') => match buf.get(lf + 2) {
                None => {
                    return Scan::NotYet {
                        resume: lf,
                        line_done,
                    }
                }
                Some(b'\n') => return Scan::Found(lf + 3),
                Some(_) => pos = lf + 1,
            },
            Some(_) => pos = lf + 1,
        }
    }
    Scan::NotYet {
        resume: buf.len(),
        line_done,
    }
}

fn resume_point(buf: &[u8]) -> usize {
    // Rescan the last two bytes: they may start a blank line completed by the next piece.
    buf.len().saturating_sub(2)
}

fn strip_leading_empty_lines(mut head: Bytes) -> Bytes {
    while head.starts_with(b"\r\n") {
        head.advance(2);
    }
    head
}

fn is_only_empty_lines(head: &[u8]) -> bool {
    head.iter().all(|b| *b == b'\r' || *b == b'\n')
}

fn limit_kind(bytes: &[u8], max_line: usize) -> HeadLimit {
    match memchr::memchr(b'\n', bytes) {
        Some(i) if i <= max_line => HeadLimit::TooLarge,
        _ => HeadLimit::LineTooLong,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_pieces(pieces: &[&[u8]]) -> (Vec<Bytes>, Bytes) {
        let mut r = HeadReader::default();
        let mut heads = Vec::new();
        let mut rest = Vec::new();
        for p in pieces {
            let mut b = Bytes::copy_from_slice(p);
            while !b.is_empty() {
                match r.push(&mut b, 1024, 512).expect("within limits") {
                    Some(h) => heads.push(h),
                    None => assert!(b.is_empty()),
                }
            }
            rest.extend_from_slice(&b);
        }
        (heads, Bytes::from(rest))
    }

    #[test]
    fn whole_head_is_split_without_copy() {
        let mut r = HeadReader::default();
        let mut input = Bytes::from_static(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nBODY");
        let head = r
            .push(&mut input, 1024, 512)
            .expect("ok")
            .expect("complete");
        assert_eq!(&head[..], b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_eq!(&input[..], b"BODY");
    }

    #[test]
    fn any_split_finds_the_same_head() {
        let msg: &[u8] = b"\r\nGET / HTTP/1.1\r\nHost: a\r\nX: y\r\n\r\nNEXT";
        for cut1 in 0..msg.len() {
            for cut2 in cut1..msg.len() {
                let mut r = HeadReader::default();
                let mut got = None;
                let mut after = Vec::new();
                for piece in [&msg[..cut1], &msg[cut1..cut2], &msg[cut2..]] {
                    let mut b = Bytes::copy_from_slice(piece);
                    if got.is_none() {
                        if let Some(h) = r.push(&mut b, 1024, 512).expect("ok") {
                            got = Some(h);
                        }
                    }
                    after.extend_from_slice(&b);
                }
                assert_eq!(
                    got.as_deref(),
                    Some(&b"GET / HTTP/1.1\r\nHost: a\r\nX: y\r\n\r\n"[..]),
                    "cuts {cut1} {cut2}"
                );
                assert_eq!(after, b"NEXT", "cuts {cut1} {cut2}");
            }
        }
    }

    #[test]
    fn byte_by_byte() {
        let msg = b"HTTP/1.1 200 OK\r\nA: b\r\n\r\n";
        let pieces: Vec<&[u8]> = msg.chunks(1).collect();
        let (heads, rest) = feed_pieces(&pieces);
        assert_eq!(heads.len(), 1);
        assert_eq!(&heads[0][..], &msg[..]);
        assert!(rest.is_empty());
    }

    #[test]
    fn limits() {
        let mut r = HeadReader::default();
        let mut long_line = Bytes::from(vec![b'a'; 600]);
        assert_eq!(
            r.push(&mut long_line, 1024, 512),
            Err(HeadLimit::LineTooLong)
        );
        let mut r = HeadReader::default();
        let mut big = Vec::from(&b"GET / HTTP/1.1\r\n"[..]);
        big.extend(std::iter::repeat_n(b'x', 2000));
        let mut big = Bytes::from(big);
        assert_eq!(r.push(&mut big, 1024, 512), Err(HeadLimit::TooLarge));
    }

    #[test]
    fn bare_lf_blank_line_ends_scan() {
        let mut r = HeadReader::default();
        let mut input = Bytes::from_static(b"GET / HTTP/1.1\nHost: a\n\nX");
        let head = r
            .push(&mut input, 1024, 512)
            .expect("ok")
            .expect("complete");
        assert_eq!(&head[..], b"GET / HTTP/1.1\nHost: a\n\n");
        assert_eq!(&input[..], b"X");
    }
}
