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
    /// The first line alone is longer than the line limit allows.
    LineTooLong,
}

/// Accumulates one head at a time.
///
/// The limits are a function of the bytes only, never of how they were split into reads: the
/// first line is refused ([`HeadLimit::LineTooLong`]) if it is longer than
/// `min(max_line, max_head)`; otherwise the head is refused ([`HeadLimit::TooLarge`]) if it is
/// longer than `max_head`. Both are detected as soon as the bytes seen prove them.
#[derive(Debug, Default)]
pub(crate) struct HeadReader {
    buf: BytesMut,
    /// Where scanning for the head's end resumes in `buf`: nothing before it ends the head.
    scanned: usize,
    /// Where the first LF is in `buf`, once seen.
    first_lf: Option<usize>,
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
        let max_line = max_line.min(max_head);
        loop {
            if self.buf.is_empty() {
                // Fast path: scan the caller's bytes in place; a complete head is split off
                // them without a copy.
                let first_lf = memchr::memchr(b'\n', input);
                match scan(input, 0) {
                    Scan::Found(end) => {
                        if is_only_empty_lines(&input[..end]) {
                            input.advance(end);
                            continue;
                        }
                        check(first_lf, end, max_head, max_line)?;
                        return Ok(Some(strip_leading_empty_lines(input.split_to(end))));
                    }
                    Scan::NotYet { .. } => {
                        check(first_lf, input.len(), max_head, max_line)?;
                        self.buf.extend_from_slice(input);
                        self.scanned = self.buf.len().saturating_sub(2);
                        self.first_lf = first_lf;
                        input.advance(input.len());
                        return Ok(None);
                    }
                }
            }

            let old_len = self.buf.len();
            // Never copy more than could still belong to an acceptable head.
            let room = (max_head + 4).saturating_sub(old_len);
            let take = input.len().min(room);
            self.buf.extend_from_slice(&input[..take]);
            if self.first_lf.is_none() {
                self.first_lf = memchr::memchr(b'\n', &self.buf[old_len..]).map(|i| i + old_len);
            }
            match scan(&self.buf, self.scanned) {
                Scan::Found(end) => {
                    check(self.first_lf, end, max_head, max_line)?;
                    input.advance(end - old_len);
                    self.buf.truncate(end);
                    let head = std::mem::take(&mut self.buf).freeze();
                    self.scanned = 0;
                    self.first_lf = None;
                    if is_only_empty_lines(&head) {
                        continue;
                    }
                    return Ok(Some(strip_leading_empty_lines(head)));
                }
                Scan::NotYet { resume } => {
                    check(self.first_lf, self.buf.len(), max_head, max_line)?;
                    input.advance(take);
                    self.scanned = resume;
                    return Ok(None);
                }
            }
        }
    }

    /// Forgets any partial head.
    pub(crate) fn clear(&mut self) {
        self.buf = BytesMut::new();
        self.scanned = 0;
        self.first_lf = None;
    }
}

/// Applies the limits to a head of which `seen` bytes are known (the whole head when it is
/// complete) and whose first LF is at `first_lf`, if seen.
fn check(
    first_lf: Option<usize>,
    seen: usize,
    max_head: usize,
    max_line: usize,
) -> Result<(), HeadLimit> {
    let line_too_long = match first_lf {
        Some(lf) => lf > max_line,
        None => seen > max_line,
    };
    if line_too_long {
        return Err(HeadLimit::LineTooLong);
    }
    if seen > max_head {
        return Err(HeadLimit::TooLarge);
    }
    Ok(())
}

enum Scan {
    /// The head ends at this index (exclusive).
    Found(usize),
    /// No end yet; rescan from `resume`.
    NotYet { resume: usize },
}

/// Looks for the blank line ending a head, from `from`. A head ends at the first LF that is
/// followed by CRLF or by a bare LF; bare LFs are rejected later by the parser's checks, but must
/// still end the scan so that a bare-LF head cannot hide bytes behind it.
fn scan(buf: &[u8], from: usize) -> Scan {
    let mut pos = from;
    while let Some(off) = memchr::memchr(b'\n', &buf[pos..]) {
        let lf = pos + off;
        match buf.get(lf + 1) {
            None => return Scan::NotYet { resume: lf },
            Some(b'\n') => return Scan::Found(lf + 2),
            Some(b'\r') => match buf.get(lf + 2) {
                None => return Scan::NotYet { resume: lf },
                Some(b'\n') => return Scan::Found(lf + 3),
                Some(_) => pos = lf + 1,
            },
            Some(_) => pos = lf + 1,
        }
    }
    Scan::NotYet { resume: buf.len() }
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

    /// The verdict on any byte string is the same whole and byte by byte.
    #[test]
    fn limits_do_not_depend_on_reads() {
        let cases: Vec<Vec<u8>> = vec![
            [
                vec![b'M'; 40],
                b" /".to_vec(),
                vec![b't'; 59],
                b" HTTP/1.1\r\nHost: example.com\r\n\r\n".to_vec(),
            ]
            .concat(),
            [
                vec![b'M'; 80],
                b" /ttttt HTTP/1.1\r\nHost: example.com\r\n".to_vec(),
            ]
            .concat(),
            [
                b"GET /".to_vec(),
                vec![b't'; 245],
                b" HTTP/1.1\r\nX-Pad: p\r\n\r\n".to_vec(),
            ]
            .concat(),
            [
                b"GET / HTTP/1.1\r\nX: ".to_vec(),
                vec![b'p'; 300],
                b"\r\n\r\n".to_vec(),
            ]
            .concat(),
        ];
        for (max_head, max_line) in [(256, 96), (256, 288), (128, 64)] {
            for msg in &cases {
                let verdict = |pieces: Vec<&[u8]>| {
                    let mut r = HeadReader::default();
                    for p in pieces {
                        let mut b = Bytes::copy_from_slice(p);
                        match r.push(&mut b, max_head, max_line) {
                            Ok(Some(h)) => return Ok(Some(h.len())),
                            Ok(None) => {}
                            Err(e) => return Err(e),
                        }
                    }
                    Ok(None)
                };
                let whole = verdict(vec![&msg[..]]);
                let bytewise = verdict(msg.chunks(1).collect());
                assert_eq!(
                    whole,
                    bytewise,
                    "limits {max_head}/{max_line} on {:?}",
                    String::from_utf8_lossy(msg)
                );
            }
        }
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
