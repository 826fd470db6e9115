//! The PROXY protocol header (HAProxy's spec, versions 1 and 2) that an L4 balancer in front
//! (AWS NLB, HAProxy in TCP mode) sends before the client's first byte, carrying the client's
//! real address. Sans-IO: [`parse`] looks at the bytes received so far and says whether a
//! header is complete, incomplete, or invalid; it never allocates and never reads past the
//! header.
//!
//! A connection on a listener that requires the header must start with a valid one, and come
//! from a trusted source; otherwise it is closed without an answer (the peer is a balancer,
//! not an HTTP client).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The v2 signature.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// A v1 header is at most 107 bytes, CRLF included.
const V1_MAX: usize = 107;

/// The largest v2 header accepted (16-byte fixed part plus addresses and TLVs). The format
/// allows 64 KiB of TLVs; balancers send a few hundred bytes at most.
pub const V2_MAX: usize = 16 + 4096;

/// What a complete header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyHeader {
    /// A proxied connection from `source` (the client) to `destination`.
    Proxied {
        /// The client's address.
        source: SocketAddr,
        /// The address the client connected to.
        destination: SocketAddr,
    },
    /// The balancer's own connection (v2 `LOCAL`, a health check) or an address family it could
    /// not describe (`UNKNOWN`, `AF_UNIX`): the socket's address stands.
    Local,
}

/// Why a header is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    /// The connection does not start with a PROXY header.
    #[error("no PROXY protocol header")]
    Missing,
    /// A v1 line that does not follow the grammar.
    #[error("malformed PROXY v1 header")]
    BadV1,
    /// A v2 header with a bad version, command, family or length.
    #[error("malformed PROXY v2 header")]
    BadV2,
    /// Longer than the limit.
    #[error("PROXY header too long")]
    TooLong,
}

/// Parses the header at the start of `buf`: `Ok(None)` while more bytes are needed, else the
/// header and its length in bytes (the client's data starts after it).
pub fn parse(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    if buf.is_empty() {
        return Ok(None);
    }
    let sig = V2_SIGNATURE.len().min(buf.len());
    if buf[..sig] == V2_SIGNATURE[..sig] {
        return if buf.len() < V2_SIGNATURE.len() {
            Ok(None)
        } else {
            parse_v2(buf)
        };
    }
    let v1 = b"PROXY ";
    let n = v1.len().min(buf.len());
    if buf[..n] == v1[..n] {
        return parse_v1(buf);
    }
    Err(ProxyError::Missing)
}

fn parse_v1(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(lf) = window.iter().position(|b| *b == b'\n') else {
        return if buf.len() >= V1_MAX {
            Err(ProxyError::TooLong)
        } else {
            Ok(None)
        };
    };
    let line = window[..lf].strip_suffix(b"\r").ok_or(ProxyError::BadV1)?;
    let line = std::str::from_utf8(line).map_err(|_| ProxyError::BadV1)?;
    let mut parts = line.split(' ');
    if parts.next() != Some("PROXY") {
        return Err(ProxyError::BadV1);
    }
    let header = match parts.next() {
        Some("UNKNOWN") => ProxyHeader::Local,
        Some(family @ ("TCP4" | "TCP6")) => {
            let mut field = || parts.next().ok_or(ProxyError::BadV1);
            let (src, dst, sport, dport) = (field()?, field()?, field()?, field()?);
            if parts.next().is_some() {
                return Err(ProxyError::BadV1);
            }
            let ip = |s: &str| -> Result<IpAddr, ProxyError> {
                let ip: IpAddr = s.parse().map_err(|_| ProxyError::BadV1)?;
                match (family, ip) {
                    ("TCP4", IpAddr::V4(_)) | ("TCP6", IpAddr::V6(_)) => Ok(ip),
                    _ => Err(ProxyError::BadV1),
                }
            };
            let port = |s: &str| -> Result<u16, ProxyError> {
                // Decimal without leading zeros, as the spec writes them.
                if s.is_empty() || (s.len() > 1 && s.starts_with('0')) {
                    return Err(ProxyError::BadV1);
                }
                s.parse().map_err(|_| ProxyError::BadV1)
            };
            ProxyHeader::Proxied {
                source: SocketAddr::new(ip(src)?, port(sport)?),
                destination: SocketAddr::new(ip(dst)?, port(dport)?),
            }
        }
        _ => return Err(ProxyError::BadV1),
    };
    Ok(Some((header, lf + 1)))
}

fn parse_v2(buf: &[u8]) -> Result<Option<(ProxyHeader, usize)>, ProxyError> {
    if buf.len() < 16 {
        return Ok(None);
    }
    let ver_cmd = buf[12];
    let family = buf[13];
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if ver_cmd >> 4 != 2 {
        return Err(ProxyError::BadV2);
    }
    let total = 16 + len;
    if total > V2_MAX {
        return Err(ProxyError::TooLong);
    }
    if buf.len() < total {
        return Ok(None);
    }
    let body = &buf[16..total];
    let header = match ver_cmd & 0x0f {
        // LOCAL: the balancer speaking for itself; the addresses, if any, are ignored.
        0 => ProxyHeader::Local,
        1 => match family {
            // TCP over IPv4: 4 + 4 + 2 + 2 bytes.
            0x11 if body.len() >= 12 => {
                let src = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
                let dst = Ipv4Addr::new(body[4], body[5], body[6], body[7]);
                ProxyHeader::Proxied {
                    source: SocketAddr::new(
                        IpAddr::V4(src),
                        u16::from_be_bytes([body[8], body[9]]),
                    ),
                    destination: SocketAddr::new(
                        IpAddr::V4(dst),
                        u16::from_be_bytes([body[10], body[11]]),
                    ),
                }
            }
            // TCP over IPv6: 16 + 16 + 2 + 2 bytes.
            0x21 if body.len() >= 36 => {
                let octets = |at: usize| {
                    let mut a = [0u8; 16];
                    a.copy_from_slice(&body[at..at + 16]);
                    Ipv6Addr::from(a)
                };
                ProxyHeader::Proxied {
                    source: SocketAddr::new(
                        IpAddr::V6(octets(0)),
                        u16::from_be_bytes([body[32], body[33]]),
                    ),
                    destination: SocketAddr::new(
                        IpAddr::V6(octets(16)),
                        u16::from_be_bytes([body[34], body[35]]),
                    ),
                }
            }
            // Unspecified or AF_UNIX: nothing to take from it.
            0x00 | 0x31 | 0x32 => ProxyHeader::Local,
            _ => return Err(ProxyError::BadV2),
        },
        _ => return Err(ProxyError::BadV2),
    };
    Ok(Some((header, total)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v2(cmd: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(0x20 | cmd);
        out.push(family);
        out.extend_from_slice(&u16::try_from(body.len()).expect("short").to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    fn v2_tcp4(src: [u8; 4], sport: u16, tlvs: &[u8]) -> Vec<u8> {
        let mut body = src.to_vec();
        body.extend_from_slice(&[10, 0, 0, 1]);
        body.extend_from_slice(&sport.to_be_bytes());
        body.extend_from_slice(&443u16.to_be_bytes());
        body.extend_from_slice(tlvs);
        v2(1, 0x11, &body)
    }

    #[test]
    fn v1_lines() {
        let h = b"PROXY TCP4 192.0.2.7 10.0.0.1 56324 443\r\nGET /";
        assert_eq!(
            parse(h),
            Ok(Some((
                ProxyHeader::Proxied {
                    source: "192.0.2.7:56324".parse().expect("addr"),
                    destination: "10.0.0.1:443".parse().expect("addr"),
                },
                41
            )))
        );
        let h6 = b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n";
        assert!(matches!(
            parse(h6),
            Ok(Some((ProxyHeader::Proxied { .. }, 40)))
        ));
        assert_eq!(
            parse(b"PROXY UNKNOWN\r\n"),
            Ok(Some((ProxyHeader::Local, 15)))
        );
        for bad in [
            &b"PROXY TCP4 192.0.2.7 10.0.0.1 56324 443\n"[..],
            b"PROXY TCP4 2001:db8::1 10.0.0.1 1 2\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.1 056324 443\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.1 70000 443\r\n",
            b"PROXY TCP4 192.0.2.7 10.0.0.1 1 2 3\r\n",
            b"PROXY UDP4 192.0.2.7 10.0.0.1 1 2\r\n",
            b"PROXY  TCP4 192.0.2.7 10.0.0.1 1 2\r\n",
        ] {
            assert_eq!(
                parse(bad),
                Err(ProxyError::BadV1),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(parse(&[b'P'; 200][..]), Err(ProxyError::Missing));
        let mut long = b"PROXY TCP4 ".to_vec();
        long.resize(200, b'1');
        assert_eq!(parse(&long), Err(ProxyError::TooLong));
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(ProxyError::Missing));
    }

    #[test]
    fn v2_headers() {
        let h = v2_tcp4([192, 0, 2, 7], 56324, &[0x04, 0, 1, 0]);
        let (header, len) = parse(&h).expect("valid").expect("complete");
        assert_eq!(len, h.len());
        assert_eq!(
            header,
            ProxyHeader::Proxied {
                source: "192.0.2.7:56324".parse().expect("addr"),
                destination: "10.0.0.1:443".parse().expect("addr"),
            }
        );
        assert_eq!(parse(&v2(0, 0x00, &[])), Ok(Some((ProxyHeader::Local, 16))));
        assert_eq!(
            parse(&v2(1, 0x11, &[1, 2, 3])),
            Err(ProxyError::BadV2),
            "short addresses"
        );
        assert_eq!(
            parse(&v2(2, 0x11, &[0; 12])),
            Err(ProxyError::BadV2),
            "bad command"
        );
        let mut wrong_version = v2(1, 0x11, &[0; 12]);
        wrong_version[12] = 0x11;
        assert_eq!(parse(&wrong_version), Err(ProxyError::BadV2));
        let mut huge = V2_SIGNATURE.to_vec();
        huge.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert_eq!(parse(&huge), Err(ProxyError::TooLong));
    }

    proptest! {
        /// However the header and what follows are split, the parser says "incomplete" until
        /// the header is whole, then the same header and length; it never needs the bytes
        /// after it.
        #[test]
        fn split_points_do_not_matter(
            which in 0usize..3,
            a in any::<[u8; 4]>(),
            port in 1u16..,
            tlv in prop::collection::vec(any::<u8>(), 0..64),
            tail in prop::collection::vec(any::<u8>(), 0..32),
        ) {
            let header = match which {
                0 => format!(
                    "PROXY TCP4 {}.{}.{}.{} 10.0.0.1 {port} 443\r\n",
                    a[0], a[1], a[2], a[3]
                )
                .into_bytes(),
                1 => v2_tcp4(a, port, &tlv),
                _ => v2(0, 0x00, &tlv),
            };
            let whole = parse(&header).expect("valid").expect("complete");
            prop_assert_eq!(whole.1, header.len());
            for cut in 0..header.len() {
                prop_assert_eq!(parse(&header[..cut]), Ok(None), "cut at {}", cut);
            }
            let mut with_tail = header.clone();
            with_tail.extend_from_slice(&tail);
            prop_assert_eq!(parse(&with_tail), Ok(Some(whole)));
        }

        /// Arbitrary bytes never panic, and a verdict is reached within the size limit.
        #[test]
        fn garbage_is_contained(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
            match parse(&bytes) {
                Ok(Some((_, len))) => prop_assert!(len <= bytes.len()),
                Ok(None) => prop_assert!(bytes.len() < V2_MAX),
                Err(_) => {}
            }
        }
    }
}
