//! Error types. One enum per layer: what a client did wrong ([`RequestError`]), what an upstream
//! did wrong ([`ResponseError`]), and what a configuration says wrong ([`ConfigError`]). The
//! session turns the first two into responses and a logged close; it never panics on them.

/// A request the proxy refuses; each variant maps to the status the client receives.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// The request head does not parse as HTTP/1.x (bad tokens, bare LF, obs-fold, …).
    #[error("malformed request head: {0}")]
    Malformed(&'static str),
    /// A header field is malformed or repeated where it must be unique.
    #[error("invalid header field: {0}")]
    BadField(&'static str),
    /// Message framing is ambiguous or invalid (RFC 9112 §6).
    #[error("invalid message framing: {0}")]
    BadFraming(&'static str),
    /// A transfer coding other than a single `chunked`.
    #[error("unsupported transfer coding")]
    UnsupportedTransferCoding,
    /// The head exceeds the head-size or header-count limit.
    #[error("request head too large")]
    HeadTooLarge,
    /// The request target exceeds the URI limit.
    #[error("request target too long")]
    UriTooLong,
    /// The declared or streamed body exceeds the body limit.
    #[error("request body too large")]
    BodyTooLarge,
    /// The chunked body is malformed.
    #[error("malformed chunked body: {0}")]
    BadChunk(&'static str),
    /// An HTTP version other than 1.0/1.1 (including the HTTP/2 preface).
    #[error("unsupported HTTP version")]
    Version,
    /// A method this reverse proxy does not serve (CONNECT).
    #[error("method not allowed")]
    Method,
    /// No virtual host's route matches the request's host and path.
    #[error("no route for this host and path")]
    NoRoute,
}

impl RequestError {
    /// The HTTP status the client receives for this error.
    pub fn status(&self) -> u16 {
        match self {
            RequestError::Malformed(_)
            | RequestError::BadField(_)
            | RequestError::BadFraming(_)
            | RequestError::BadChunk(_) => 400,
            RequestError::UnsupportedTransferCoding => 501,
            RequestError::HeadTooLarge => 431,
            RequestError::UriTooLong => 414,
            RequestError::BodyTooLarge => 413,
            RequestError::Version => 505,
            RequestError::Method => 405,
            RequestError::NoRoute => 404,
        }
    }
}

/// An upstream answer the proxy will not relay; the client receives 502.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ResponseError {
    /// The response head does not parse or violates field syntax.
    #[error("malformed response head: {0}")]
    Malformed(&'static str),
    /// The response head exceeds the head-size or header-count limit.
    #[error("response head too large")]
    HeadTooLarge,
    /// The response framing is ambiguous or invalid.
    #[error("invalid response framing: {0}")]
    BadFraming(&'static str),
    /// The chunked response body is malformed.
    #[error("malformed chunked response body: {0}")]
    BadChunk(&'static str),
    /// A `101` to a request that did not ask to upgrade.
    #[error("unsolicited 101 Switching Protocols")]
    UnsolicitedSwitch,
    /// A `101` whose `Upgrade` does not name the requested protocol, or not on HTTP/1.1.
    #[error("101 with a mismatched Upgrade")]
    UpgradeMismatch,
    /// A websocket `101` whose `Sec-WebSocket-Accept` does not match the client's key.
    #[error("101 with a wrong Sec-WebSocket-Accept")]
    BadAccept,
    /// Too many 1xx interim responses before a final one.
    #[error("too many interim responses")]
    TooManyInterim,
    /// The upstream closed before a complete response head arrived.
    #[error("upstream closed before a response")]
    Truncated,
}

/// A configuration the core cannot run with. Names the field and what was expected; the CLI adds
/// the file and line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {expected}")]
pub struct ConfigError {
    /// The dotted path of the offending field, e.g. `upstream.peers[1]`.
    pub field: String,
    /// What a valid value looks like.
    pub expected: String,
}

impl ConfigError {
    pub(crate) fn new(field: impl Into<String>, expected: impl Into<String>) -> Self {
        ConfigError {
            field: field.into(),
            expected: expected.into(),
        }
    }
}
