//! Field-level helpers shared by request and response handling: token lists, `Content-Length`
//! parsing, the hop-by-hop set. All operate on borrowed bytes and never allocate.

use std::mem::MaybeUninit;

/// Header slots kept on the stack; configurations allowing more fields use the heap.
pub(crate) const STACK_HEADERS: usize = 128;

/// Slots for httparse to fill: `max` of them, from `stack` when they fit, so that parsing a head
/// neither allocates nor zeroes a header array.
pub(crate) fn header_slots<'a, 'b>(
    stack: &'a mut [MaybeUninit<httparse::Header<'b>>; STACK_HEADERS],
    heap: &'a mut Vec<MaybeUninit<httparse::Header<'b>>>,
    max: usize,
) -> &'a mut [MaybeUninit<httparse::Header<'b>>] {
    if max <= STACK_HEADERS {
        &mut stack[..max]
    } else {
        heap.resize_with(max, MaybeUninit::uninit);
        heap
    }
}

/// A short list of borrowed field values or list items, held inline: a head's `Connection`,
/// `Upgrade` or `Transfer-Encoding` tokens are nearly always a few, so gathering them needs no
/// allocation. More than [`INLINE_ITEMS`] spill to the heap (bounded by the head size).
#[derive(Debug, Default)]
pub(crate) struct Items<'h> {
    inline: [&'h [u8]; INLINE_ITEMS],
    len: usize,
    spilled: Vec<&'h [u8]>,
}

/// Items an [`Items`] holds without allocating.
pub(crate) const INLINE_ITEMS: usize = 8;

impl<'h> Items<'h> {
    pub(crate) fn push(&mut self, item: &'h [u8]) {
        if self.len < INLINE_ITEMS {
            self.inline[self.len] = item;
            self.len += 1;
            return;
        }
        if self.spilled.is_empty() {
            self.spilled.extend_from_slice(&self.inline);
        }
        self.spilled.push(item);
    }

    pub(crate) fn as_slice(&self) -> &[&'h [u8]] {
        if self.spilled.is_empty() {
            &self.inline[..self.len]
        } else {
            &self.spilled
        }
    }

    pub(crate) fn iter(&self) -> std::slice::Iter<'_, &'h [u8]> {
        self.as_slice().iter()
    }
}

impl<'a, 'h> IntoIterator for &'a Items<'h> {
    type Item = &'a &'h [u8];
    type IntoIter = std::slice::Iter<'a, &'h [u8]>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl<'h> Extend<&'h [u8]> for Items<'h> {
    fn extend<I: IntoIterator<Item = &'h [u8]>>(&mut self, iter: I) {
        for item in iter {
            self.push(item);
        }
    }
}

/// `tchar` from RFC 9110 §5.6.2.
pub(crate) fn is_token_byte(b: u8) -> bool {
    matches!(b,
        b'!' | b'#' | b'$' | b'%' | b'&' | b'\'' | b'*' | b'+' | b'-' | b'.' | b'^' | b'_' | b'`'
        | b'|' | b'~' | b'0'..=b'9' | b'a'..=b'z' | b'A'..=b'Z')
}

/// Trims optional whitespace (SP / HTAB) from both ends.
pub(crate) fn trim_ows(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

/// The comma-separated elements of a list-valued field, trimmed, empties skipped
/// (RFC 9110 §5.6.1).
pub(crate) fn list_items(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    v.split(|b| *b == b',')
        .map(trim_ows)
        .filter(|t| !t.is_empty())
}

/// Whether a list-valued field contains `token`, case-insensitively, as a whole element.
pub(crate) fn list_contains(v: &[u8], token: &[u8]) -> bool {
    list_items(v).any(|t| t.eq_ignore_ascii_case(token))
}

/// Parses one `Content-Length` field value: a comma list of identical decimal numbers
/// (RFC 9110 §8.6). Signs, hex, whitespace inside numbers, overflow and disagreement are errors.
pub(crate) fn parse_content_length(v: &[u8]) -> Option<u64> {
    let mut found: Option<u64> = None;
    for item in v.split(|b| *b == b',') {
        let item = trim_ows(item);
        if item.is_empty() || item.len() > 19 || !item.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let n = item.iter().try_fold(0u64, |acc, d| {
            acc.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        })?;
        match found {
            Some(prev) if prev != n => return None,
            _ => found = Some(n),
        }
    }
    found
}

/// Headers that describe one connection and never cross the proxy (RFC 9110 §7.6.1), in both
/// directions, plus framing headers the proxy always regenerates itself.
const HOP_BY_HOP: &[&[u8]] = &[
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"te",
    b"trailer",
    b"upgrade",
    b"proxy-authorization",
    b"http2-settings",
    b"transfer-encoding",
    b"content-length",
];

/// True for hop-by-hop and framing fields (removed from every forwarded head; the proxy writes
/// its own framing).
pub(crate) fn is_hop_or_framing(name: &[u8]) -> bool {
    HOP_BY_HOP.iter().any(|h| h.eq_ignore_ascii_case(name))
}

/// True for fields a configured header rule may not touch.
pub(crate) fn is_framing_or_hop(name: &[u8]) -> bool {
    is_hop_or_framing(name) || name.eq_ignore_ascii_case(b"host")
}

/// A `Host` value: reg-name, IPv4 or bracketed IPv6, optional port. Rejects whitespace, control
/// bytes and anything that could end a line or a field.
pub(crate) fn is_valid_host(v: &[u8]) -> bool {
    v.iter().all(|b| {
        b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
                    | b':'
                    | b'['
                    | b']'
                    | b'%'
            )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_spill_past_the_inline_capacity_in_order() {
        let words: Vec<Vec<u8>> = (0..20).map(|i| format!("t{i}").into_bytes()).collect();
        let mut items = Items::default();
        for (i, w) in words.iter().enumerate() {
            items.push(w);
            assert_eq!(items.as_slice().len(), i + 1);
        }
        let got: Vec<&[u8]> = items.iter().copied().collect();
        let want: Vec<&[u8]> = words.iter().map(Vec::as_slice).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn content_length_vectors() {
        assert_eq!(parse_content_length(b"0"), Some(0));
        assert_eq!(parse_content_length(b"42"), Some(42));
        assert_eq!(parse_content_length(b"42, 42"), Some(42));
        assert_eq!(parse_content_length(b"42,43"), None);
        assert_eq!(parse_content_length(b"+42"), None);
        assert_eq!(parse_content_length(b"-1"), None);
        assert_eq!(parse_content_length(b"0x10"), None);
        assert_eq!(parse_content_length(b"4 2"), None);
        assert_eq!(parse_content_length(b""), None);
        assert_eq!(parse_content_length(b"18446744073709551615"), None);
        assert_eq!(parse_content_length(b"99999999999999999999"), None);
        assert_eq!(
            parse_content_length(b"1844674407370955161"),
            Some(1_844_674_407_370_955_161)
        );
    }

    #[test]
    fn token_lists() {
        assert!(list_contains(b"keep-alive, Upgrade", b"upgrade"));
        assert!(!list_contains(b"upgrade-insecure", b"upgrade"));
        assert!(list_contains(b" ,, close ", b"close"));
        assert_eq!(list_items(b"a, b ,c").count(), 3);
    }

    #[test]
    fn host_values() {
        assert!(is_valid_host(b"example.com:8080"));
        assert!(is_valid_host(b"[::1]:80"));
        assert!(!is_valid_host(b"a b"));
        assert!(!is_valid_host(b"a/b"));
        assert!(!is_valid_host(b"a\r\nb"));
    }
}
