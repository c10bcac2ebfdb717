//! The HTTP/1.1 side of the connection: the WebSocket upgrade (RFC 6455 §4)
//! and plain requests to the operational endpoints on the same port.
//!
//! [`parse_request`] looks at the bytes read so far and answers "need more",
//! a parsed request, or a [`HandshakeError`] that carries its HTTP status and
//! a reason for the response body and the metrics.

use base64::Engine as _;

/// The WebSocket GUID of RFC 6455 §1.3.
const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// The application protocol negotiated with `Sec-WebSocket-Protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// `corecast.json`, the default when the client offers none.
    Json,
    /// `corecast.bin`, the compact binary protocol.
    Binary,
    /// Socket.IO 5 packets over Engine.IO 4 (on the Socket.IO path, not a
    /// subprotocol name), with the default JSON parser.
    SocketIo,
    /// The same with `socket.io-msgpack-parser`: each packet a MessagePack
    /// map in a binary message (chosen by the client's first packet).
    SocketIoMsgpack,
}

impl Protocol {
    /// How many protocols there are (per-protocol tables have a slot each).
    pub const COUNT: usize = 4;

    /// Every protocol, in [`Protocol::index`] order.
    pub const ALL: [Protocol; Protocol::COUNT] = [
        Protocol::Json,
        Protocol::Binary,
        Protocol::SocketIo,
        Protocol::SocketIoMsgpack,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Protocol::Json => "corecast.json",
            Protocol::Binary => "corecast.bin",
            Protocol::SocketIo => "socket.io",
            Protocol::SocketIoMsgpack => "socket.io+msgpack",
        }
    }

    /// The protocol's position in [`Protocol::ALL`] (per-protocol tables
    /// are indexed by it).
    pub fn index(self) -> usize {
        self as usize
    }

    /// Socket.IO, with either parser.
    pub fn is_socketio(self) -> bool {
        matches!(self, Protocol::SocketIo | Protocol::SocketIoMsgpack)
    }

    /// The protocol at `i` in [`Protocol::ALL`].
    pub fn from_index(i: usize) -> Option<Protocol> {
        Protocol::ALL.get(i).copied()
    }

    pub fn from_name(name: &str) -> Option<Protocol> {
        match name {
            "corecast.json" => Some(Protocol::Json),
            "corecast.bin" => Some(Protocol::Binary),
            _ => None,
        }
    }
}

/// Handshake settings from the configuration.
#[derive(Debug, Clone)]
pub struct HandshakeConfig {
    /// Allowed `Origin` values; empty allows any (and requests without one).
    pub allowed_origins: Vec<String>,
    /// Largest request head accepted, in bytes.
    pub max_header_bytes: usize,
}

/// A valid WebSocket upgrade request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgrade {
    pub path: String,
    /// The query string (after `?`, not decoded; empty without one).
    pub query: String,
    /// `?token=` from the query string.
    pub query_token: Option<String>,
    /// `?device=` (desktop, mobile, web) from the query string.
    pub device: Option<String>,
    /// The token from `Authorization: Bearer`.
    pub bearer: Option<String>,
    pub protocol: Protocol,
    /// Whether the client named the protocol (then the response echoes it).
    pub protocol_offered: bool,
    /// The `Sec-WebSocket-Accept` value to answer with.
    pub accept: String,
    /// `X-Forwarded-For` (several headers joined with commas).
    pub forwarded_for: Option<String>,
    /// The request carries an `Origin` header, as every browser's does.
    pub has_origin: bool,
}

/// A request without an upgrade (health, readiness, metrics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlainRequest {
    pub method: String,
    /// The path with its query string.
    pub path: String,
    /// The body that follows the head (`Content-Length`; chunked bodies
    /// are refused).
    pub content_length: usize,
    /// The `Origin` header.
    pub origin: Option<String>,
    /// The token from `Authorization: Bearer`.
    pub bearer: Option<String>,
    /// `X-Forwarded-For` (several headers joined with commas).
    pub forwarded_for: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Upgrade(Upgrade),
    Plain(PlainRequest),
}

/// Why a request was refused. [`HandshakeError::status`] and
/// [`HandshakeError::reason`] make the response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeError {
    Malformed,
    HeaderTooLarge,
    BadHttpVersion,
    BadMethod,
    MissingHost,
    BadUpgrade,
    BadConnection,
    MissingKey,
    BadKey,
    UnsupportedVersion,
    OriginNotAllowed,
    UnsupportedSubprotocol,
}

impl HandshakeError {
    pub const ALL: [HandshakeError; 12] = [
        HandshakeError::Malformed,
        HandshakeError::HeaderTooLarge,
        HandshakeError::BadHttpVersion,
        HandshakeError::BadMethod,
        HandshakeError::MissingHost,
        HandshakeError::BadUpgrade,
        HandshakeError::BadConnection,
        HandshakeError::MissingKey,
        HandshakeError::BadKey,
        HandshakeError::UnsupportedVersion,
        HandshakeError::OriginNotAllowed,
        HandshakeError::UnsupportedSubprotocol,
    ];

    pub fn status(self) -> u16 {
        match self {
            HandshakeError::HeaderTooLarge => 431,
            HandshakeError::UnsupportedVersion => 426,
            HandshakeError::OriginNotAllowed => 403,
            _ => 400,
        }
    }

    /// A stable label, used in the response body and as a metrics label.
    pub fn reason(self) -> &'static str {
        match self {
            HandshakeError::Malformed => "malformed_request",
            HandshakeError::HeaderTooLarge => "header_too_large",
            HandshakeError::BadHttpVersion => "bad_http_version",
            HandshakeError::BadMethod => "bad_method",
            HandshakeError::MissingHost => "missing_host",
            HandshakeError::BadUpgrade => "bad_upgrade_header",
            HandshakeError::BadConnection => "bad_connection_header",
            HandshakeError::MissingKey => "missing_key",
            HandshakeError::BadKey => "bad_key",
            HandshakeError::UnsupportedVersion => "unsupported_version",
            HandshakeError::OriginNotAllowed => "origin_not_allowed",
            HandshakeError::UnsupportedSubprotocol => "unsupported_subprotocol",
        }
    }

    pub fn index(self) -> usize {
        Self::ALL.iter().position(|e| *e == self).unwrap_or(0)
    }

    /// The full HTTP response for this refusal.
    pub fn response(self) -> Vec<u8> {
        let extra = if self == HandshakeError::UnsupportedVersion {
            "Sec-WebSocket-Version: 13\r\n"
        } else {
            ""
        };
        http_response(self.status(), extra, "text/plain", self.reason().as_bytes())
    }
}

impl std::fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.reason())
    }
}

impl std::error::Error for HandshakeError {}

fn has_token(value: &str, token: &str) -> bool {
    value
        .split(',')
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Parses the request head at the start of `buf`. Returns the request and
/// the number of bytes it took, or `Ok(None)` when the head is incomplete.
pub fn parse_request(
    buf: &[u8],
    cfg: &HandshakeConfig,
) -> Result<Option<(Request, usize)>, HandshakeError> {
    let mut headers = [httparse::EMPTY_HEADER; 48];
    let mut req = httparse::Request::new(&mut headers);
    let consumed = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() > cfg.max_header_bytes {
                return Err(HandshakeError::HeaderTooLarge);
            }
            return Ok(None);
        }
        Err(httparse::Error::TooManyHeaders) => return Err(HandshakeError::HeaderTooLarge),
        Err(_) => return Err(HandshakeError::Malformed),
    };
    if consumed > cfg.max_header_bytes {
        return Err(HandshakeError::HeaderTooLarge);
    }
    let method = req.method.ok_or(HandshakeError::Malformed)?;
    let path = req.path.ok_or(HandshakeError::Malformed)?;
    if req.version != Some(1) {
        return Err(HandshakeError::BadHttpVersion);
    }
    let header = |name: &str| -> Option<&str> {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
    };
    let bearer = header("authorization").and_then(|v| {
        let v = v.trim();
        v.get(..7)
            .filter(|p| p.eq_ignore_ascii_case("bearer "))
            .map(|_| v[7..].trim().to_owned())
    });
    let forwarded: Vec<&str> = req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("x-forwarded-for"))
        .filter_map(|h| std::str::from_utf8(h.value).ok())
        .collect();
    let forwarded_for = (!forwarded.is_empty()).then(|| forwarded.join(","));
    let Some(upgrade) = header("upgrade") else {
        if header("transfer-encoding").is_some() {
            return Err(HandshakeError::Malformed);
        }
        let content_length = match header("content-length") {
            None => 0,
            Some(v) => v.trim().parse().map_err(|_| HandshakeError::Malformed)?,
        };
        return Ok(Some((
            Request::Plain(PlainRequest {
                method: method.to_owned(),
                path: path.to_owned(),
                content_length,
                origin: header("origin").map(str::to_owned),
                bearer,
                forwarded_for,
            }),
            consumed,
        )));
    };
    if method != "GET" {
        return Err(HandshakeError::BadMethod);
    }
    // An upgrade has no body: bytes after the head are frames. A request
    // that frames a body could be read two ways by a proxy in front.
    let framed = req.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("transfer-encoding")
            || (h.name.eq_ignore_ascii_case("content-length") && h.value.trim_ascii() != b"0")
    });
    if framed {
        return Err(HandshakeError::Malformed);
    }
    if header("host").is_none() {
        return Err(HandshakeError::MissingHost);
    }
    if !has_token(upgrade, "websocket") {
        return Err(HandshakeError::BadUpgrade);
    }
    if !header("connection").is_some_and(|c| has_token(c, "upgrade")) {
        return Err(HandshakeError::BadConnection);
    }
    if header("sec-websocket-version").map(str::trim) != Some("13") {
        return Err(HandshakeError::UnsupportedVersion);
    }
    let key = header("sec-websocket-key")
        .ok_or(HandshakeError::MissingKey)?
        .trim();
    match base64::engine::general_purpose::STANDARD.decode(key) {
        Ok(raw) if raw.len() == 16 => {}
        _ => return Err(HandshakeError::BadKey),
    }
    if !cfg.allowed_origins.is_empty() {
        let origin = header("origin").ok_or(HandshakeError::OriginNotAllowed)?;
        if !cfg
            .allowed_origins
            .iter()
            .any(|o| o.eq_ignore_ascii_case(origin.trim()))
        {
            return Err(HandshakeError::OriginNotAllowed);
        }
    }
    let offered: Vec<&str> = req
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("sec-websocket-protocol"))
        .filter_map(|h| std::str::from_utf8(h.value).ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let (protocol, protocol_offered) = if offered.is_empty() {
        (Protocol::Json, false)
    } else {
        let p = offered
            .iter()
            .find_map(|name| Protocol::from_name(name))
            .ok_or(HandshakeError::UnsupportedSubprotocol)?;
        (p, true)
    };
    let (route, query) = path.split_once('?').unwrap_or((path, ""));
    let query_token = query_param(query, "token");
    let device = query_param(query, "device");
    Ok(Some((
        Request::Upgrade(Upgrade {
            path: route.to_owned(),
            query: query.to_owned(),
            query_token,
            device,
            bearer,
            protocol,
            protocol_offered,
            accept: accept_key(key),
            forwarded_for,
            has_origin: header("origin").is_some(),
        }),
        consumed,
    )))
}

/// Finds `name` in a query string and percent-decodes its value.
pub fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| percent_decode(v, true))
    })
}

/// Decodes `%XX` escapes (and, in a query string, `+` as a space).
pub fn percent_decode(s: &str, plus_as_space: bool) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' if plus_as_space => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `Sec-WebSocket-Accept` for a client key.
pub fn accept_key(key: &str) -> String {
    let mut sha = sha1_smol::Sha1::new();
    sha.update(key.as_bytes());
    sha.update(GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(sha.digest().bytes())
}

/// The `101 Switching Protocols` response.
pub fn accept_response(up: &Upgrade) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n",
        up.accept
    );
    if up.protocol_offered {
        r.push_str("Sec-WebSocket-Protocol: ");
        r.push_str(up.protocol.name());
        r.push_str("\r\n");
    }
    r.push_str("\r\n");
    r.into_bytes()
}

/// The reason phrase for the HTTP status codes this server sends.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Payload Too Large",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Internal Server Error",
    }
}

/// A complete HTTP/1.1 response that closes the connection.
pub fn http_response(status: u16, extra_headers: &str, content_type: &str, body: &[u8]) -> Vec<u8> {
    response(status, extra_headers, content_type, body, false)
}

/// A complete HTTP/1.1 response, the one builder of every response the
/// node sends (upgrade refusals, plain requests, the server API):
/// `extra_headers` are whole lines ending in CRLF; `keep_alive` says
/// whether the connection stays open after it.
pub fn response(
    status: u16,
    extra_headers: &str,
    content_type: &str,
    body: &[u8],
    keep_alive: bool,
) -> Vec<u8> {
    let text = reason_phrase(status);
    let connection = if keep_alive { "keep-alive" } else { "close" };
    let mut r = format!(
        "HTTP/1.1 {status} {text}\r\n{extra_headers}Content-Type: {content_type}\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> HandshakeConfig {
        HandshakeConfig {
            allowed_origins: vec![],
            max_header_bytes: 8192,
        }
    }

    const OK: &str = "GET /ws?token=abc%2Bd HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

    fn with(replace: &str, by: &str) -> String {
        OK.replace(replace, by)
    }

    #[test]
    fn rfc_example_accept_key() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn valid_upgrade() {
        let (req, n) = parse_request(OK.as_bytes(), &cfg()).unwrap().unwrap();
        assert_eq!(n, OK.len());
        let Request::Upgrade(up) = req else { panic!() };
        assert_eq!(up.path, "/ws");
        assert_eq!(up.query_token.as_deref(), Some("abc+d"));
        assert_eq!(up.protocol, Protocol::Json);
        assert!(!up.protocol_offered);
        let resp = String::from_utf8(accept_response(&up)).unwrap();
        assert!(resp.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(!resp.contains("Sec-WebSocket-Protocol"));
    }

    #[test]
    fn incomplete_then_too_large() {
        assert_eq!(parse_request(&OK.as_bytes()[..20], &cfg()), Ok(None));
        let big = format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(9000));
        assert_eq!(
            parse_request(big.as_bytes(), &cfg()),
            Err(HandshakeError::HeaderTooLarge)
        );
    }

    #[test]
    fn refusals() {
        let cases = [
            (with("GET", "POST"), HandshakeError::BadMethod),
            (with("HTTP/1.1", "HTTP/1.0"), HandshakeError::BadHttpVersion),
            (with("Host: x\r\n", ""), HandshakeError::MissingHost),
            (
                with("Upgrade: websocket", "Upgrade: h2c"),
                HandshakeError::BadUpgrade,
            ),
            (
                with("keep-alive, Upgrade", "keep-alive"),
                HandshakeError::BadConnection,
            ),
            (
                with("Version: 13", "Version: 8"),
                HandshakeError::UnsupportedVersion,
            ),
            (
                with("dGhlIHNhbXBsZSBub25jZQ==", "c2hvcnQ="),
                HandshakeError::BadKey,
            ),
            (
                with("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", ""),
                HandshakeError::MissingKey,
            ),
            ("GARBAGE\r\n\r\n".to_string(), HandshakeError::Malformed),
            // An upgrade that frames a body could be read two ways.
            (
                with("Host: x\r\n", "Host: x\r\nContent-Length: 5\r\n"),
                HandshakeError::Malformed,
            ),
            (
                with("Host: x\r\n", "Host: x\r\nTransfer-Encoding: chunked\r\n"),
                HandshakeError::Malformed,
            ),
        ];
        for (req, want) in cases {
            assert_eq!(parse_request(req.as_bytes(), &cfg()), Err(want), "{req}");
        }
        let r = String::from_utf8(HandshakeError::UnsupportedVersion.response()).unwrap();
        assert!(r.starts_with("HTTP/1.1 426 "));
        assert!(r.contains("Sec-WebSocket-Version: 13\r\n"));
    }

    #[test]
    fn origin_allow_list() {
        let c = HandshakeConfig {
            allowed_origins: vec!["https://chat.example".into()],
            ..cfg()
        };
        assert_eq!(
            parse_request(OK.as_bytes(), &c),
            Err(HandshakeError::OriginNotAllowed)
        );
        let good = with("Host: x\r\n", "Host: x\r\nOrigin: https://chat.example\r\n");
        assert!(parse_request(good.as_bytes(), &c).unwrap().is_some());
        let bad = with("Host: x\r\n", "Host: x\r\nOrigin: https://evil.example\r\n");
        assert_eq!(
            parse_request(bad.as_bytes(), &c),
            Err(HandshakeError::OriginNotAllowed)
        );
    }

    #[test]
    fn subprotocols() {
        let bin = with(
            "Host: x\r\n",
            "Host: x\r\nSec-WebSocket-Protocol: other, corecast.bin\r\n",
        );
        let Some((Request::Upgrade(up), _)) = parse_request(bin.as_bytes(), &cfg()).unwrap() else {
            panic!()
        };
        assert_eq!(up.protocol, Protocol::Binary);
        assert!(String::from_utf8(accept_response(&up))
            .unwrap()
            .contains("Sec-WebSocket-Protocol: corecast.bin\r\n"));
        let none = with("Host: x\r\n", "Host: x\r\nSec-WebSocket-Protocol: mqtt\r\n");
        assert_eq!(
            parse_request(none.as_bytes(), &cfg()),
            Err(HandshakeError::UnsupportedSubprotocol)
        );
    }

    #[test]
    fn bearer_and_plain() {
        let b = with("Host: x\r\n", "Host: x\r\nAuthorization: Bearer t0k\r\n");
        let Some((Request::Upgrade(up), _)) = parse_request(b.as_bytes(), &cfg()).unwrap() else {
            panic!()
        };
        assert_eq!(up.bearer.as_deref(), Some("t0k"));
        let plain = "GET /health HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(
            parse_request(plain.as_bytes(), &cfg()).unwrap().unwrap().0,
            Request::Plain(PlainRequest {
                method: "GET".into(),
                path: "/health".into(),
                content_length: 0,
                origin: None,
                bearer: None,
                forwarded_for: None,
            })
        );
        // A long-polling POST: its body's length, its origin, its token.
        let post = "POST /socket.io/?EIO=4&transport=polling&sid=x HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nOrigin: http://app\r\nAuthorization: Bearer t\r\n\r\n4hello";
        let Some((Request::Plain(p), consumed)) = parse_request(post.as_bytes(), &cfg()).unwrap()
        else {
            panic!()
        };
        assert_eq!(p.content_length, 6);
        assert_eq!(consumed, post.len() - 6);
        assert_eq!(p.origin.as_deref(), Some("http://app"));
        assert_eq!(p.bearer.as_deref(), Some("t"));
        // Chunked bodies and bad lengths are refused.
        let chunked = "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(
            parse_request(chunked.as_bytes(), &cfg()),
            Err(HandshakeError::Malformed)
        );
        let bad = "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n";
        assert_eq!(
            parse_request(bad.as_bytes(), &cfg()),
            Err(HandshakeError::Malformed)
        );
    }
}
