//! A client for corecast: the SDK for Rust programs and the base of
//! `corecast bench`.
//!
//! Two layers, as on the server:
//! - sans-IO pieces that work with any runtime: [`Url`],
//!   [`handshake_request`] and [`parse_handshake_response`], a
//!   [`FrameReader`] that yields every complete frame of a read buffer without
//!   copying, [`Masker`] for client frames, and [`encode_message`] /
//!   [`decode_message`] for both protocols;
//! - [`Client`], a connection on monoio (io_uring or epoll) that
//!   authenticates, sends events, waits for their acks, answers pings and
//!   hands every other server event to the caller.
//!
//! ```no_run
//! use corecast_client::{Client, ConnectOptions};
//! use corecast_protocol::protocol::{ChannelJoin, ClientEvent, MessageSend, ServerEvent};
//!
//! # async fn demo() -> Result<(), corecast_client::ClientError> {
//! let opts = ConnectOptions::new("ws://127.0.0.1:8080/ws".parse()?).token("<jwt>");
//! let mut c = Client::connect(&opts).await?;
//! c.call(ClientEvent::ChannelJoin(ChannelJoin::new("general"))).await?;
//! c.call(ClientEvent::MessageSend(MessageSend::new("general", "hello")))
//!     .await?;
//! loop {
//!     if let ServerEvent::MessageNew(m) = c.next_event().await?.event {
//!         println!("{}: {}", m.user_id, m.content);
//!         break;
//!     }
//! }
//! c.close(1000, "bye").await
//! # }
//! ```

mod conn;
mod frames;

pub use corecast_protocol::{protocol, ws};

pub use conn::{connect_tcp, Client, ConnectOptions};
pub use frames::{FrameReader, Masker, RawFrame};

use std::net::{SocketAddr, ToSocketAddrs};
use std::str::FromStr;

use base64::Engine as _;

use crate::protocol::{binary, json, ClientMessage, DecodeError, Protocol, ServerMessage};
use crate::ws::{OpCode, WsError};

/// Why a client operation failed.
#[derive(Debug)]
pub enum ClientError {
    /// A socket error (connection refused, reset, …).
    Io(std::io::Error),
    /// The URL could not be understood or resolved.
    Url(String),
    /// The server refused the upgrade: the HTTP status and the body.
    Refused { status: u16, body: String },
    /// The upgrade response broke RFC 6455 (bad accept key, unknown protocol).
    Handshake(String),
    /// The server broke RFC 6455 after the upgrade.
    Protocol(WsError),
    /// A server event that could not be decoded.
    Decode(DecodeError),
    /// The server answered an event with an `error`.
    Server(crate::protocol::ErrorBody),
    /// The connection was closed, with the close code and reason when the
    /// server sent them.
    Closed { code: Option<u16>, reason: String },
    /// Nothing arrived within the allowed time.
    Timeout(&'static str),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Io(e) => write!(f, "socket error: {e}"),
            ClientError::Url(e) => write!(f, "bad URL: {e}"),
            ClientError::Refused { status, body } => {
                write!(f, "upgrade refused with HTTP {status}: {}", body.trim())
            }
            ClientError::Handshake(e) => write!(f, "bad upgrade response: {e}"),
            ClientError::Protocol(e) => write!(f, "protocol error from the server: {e}"),
            ClientError::Decode(e) => write!(f, "undecodable server event: {e}"),
            ClientError::Server(e) => write!(f, "server error {:?}: {}", e.code, e.message),
            ClientError::Closed { code, reason } => match code {
                Some(c) => write!(f, "connection closed with {c} {reason}"),
                None => write!(f, "connection closed"),
            },
            ClientError::Timeout(what) => write!(f, "timed out waiting for {what}"),
        }
    }
}

impl std::error::Error for ClientError {}

impl From<std::io::Error> for ClientError {
    fn from(e: std::io::Error) -> Self {
        ClientError::Io(e)
    }
}

impl From<WsError> for ClientError {
    fn from(e: WsError) -> Self {
        ClientError::Protocol(e)
    }
}

impl From<DecodeError> for ClientError {
    fn from(e: DecodeError) -> Self {
        ClientError::Decode(e)
    }
}

/// A `ws://host:port/path?query` URL. (`wss://` needs a TLS terminator in
/// front of the engine and is not spoken by this client.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
}

impl FromStr for Url {
    type Err = ClientError;

    fn from_str(s: &str) -> Result<Url, ClientError> {
        let rest = s
            .strip_prefix("ws://")
            .ok_or_else(|| ClientError::Url(format!("`{s}`: only ws:// URLs are supported")))?;
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_string()),
            Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
            None => (rest, "/".to_string()),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
                h,
                p.parse()
                    .map_err(|_| ClientError::Url(format!("`{s}`: bad port `{p}`")))?,
            ),
            _ => (authority, 80),
        };
        if host.is_empty() {
            return Err(ClientError::Url(format!("`{s}`: no host")));
        }
        Ok(Url {
            host: host.trim_start_matches('[').trim_end_matches(']').into(),
            port,
            path,
        })
    }
}

impl Url {
    /// Resolves the host (blocking: call it before a load starts).
    pub fn resolve(&self) -> Result<SocketAddr, ClientError> {
        (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(|e| ClientError::Url(format!("cannot resolve {}: {e}", self.host)))?
            .next()
            .ok_or_else(|| ClientError::Url(format!("{} has no address", self.host)))
    }

    /// This URL with `name=value` added to its query (the value is
    /// percent-encoded).
    pub fn with_query(&self, name: &str, value: &str) -> Url {
        let mut u = self.clone();
        u.path.push(if u.path.contains('?') { '&' } else { '?' });
        u.path.push_str(name);
        u.path.push('=');
        for b in value.bytes() {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                u.path.push(b as char);
            } else {
                u.path.push_str(&format!("%{b:02X}"));
            }
        }
        u
    }

    fn host_header(&self) -> String {
        if self.port == 80 {
            self.host.clone()
        } else if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// A fresh random `Sec-WebSocket-Key`.
pub fn new_key() -> String {
    let mut k = [0u8; 16];
    getrandom::fill(&mut k).expect("the OS random source works");
    base64::engine::general_purpose::STANDARD.encode(k)
}

/// The upgrade request for `url`. `protocol` is offered with
/// `Sec-WebSocket-Protocol` (none for servers that speak no subprotocol);
/// `bearer` goes into `Authorization`.
pub fn handshake_request(
    url: &Url,
    key: &str,
    protocol: Option<Protocol>,
    bearer: Option<&str>,
) -> Vec<u8> {
    let mut r = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n",
        url.path,
        url.host_header()
    );
    if let Some(p) = protocol {
        r.push_str(&format!("Sec-WebSocket-Protocol: {}\r\n", p.name()));
    }
    if let Some(t) = bearer {
        r.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    r.push_str("\r\n");
    r.into_bytes()
}

/// A successful upgrade response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandshakeResponse {
    /// Bytes of `buf` taken by the response head; what follows are frames.
    pub head_len: usize,
    /// The protocol the server chose (`None` when it named none).
    pub protocol: Option<Protocol>,
}

/// Parses the server's answer to [`handshake_request`] from the bytes read
/// so far: `Ok(None)` means more are needed. A refusal carries its status
/// and body (once the body has arrived, or when the head says there is none).
pub fn parse_handshake_response(
    buf: &[u8],
    key: &str,
) -> Result<Option<HandshakeResponse>, ClientError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > 16 * 1024 => {
            return Err(ClientError::Handshake(
                "response head larger than 16 KiB".into(),
            ))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(ClientError::Handshake(format!("not HTTP: {e}"))),
    };
    let header = |name: &str| {
        resp.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_string())
    };
    let status = resp.code.unwrap_or(0);
    if status != 101 {
        let want = header("content-length")
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0);
        if buf.len() < head_len + want {
            return Ok(None);
        }
        return Err(ClientError::Refused {
            status,
            body: String::from_utf8_lossy(&buf[head_len..head_len + want]).into_owned(),
        });
    }
    let accept = header("sec-websocket-accept").unwrap_or_default();
    if accept != crate::ws::handshake::accept_key(key) {
        return Err(ClientError::Handshake(format!(
            "Sec-WebSocket-Accept `{accept}` does not match the key"
        )));
    }
    let protocol = match header("sec-websocket-protocol") {
        None => None,
        Some(p) => Some(
            Protocol::from_name(&p)
                .ok_or_else(|| ClientError::Handshake(format!("unknown protocol `{p}`")))?,
        ),
    };
    Ok(Some(HandshakeResponse { head_len, protocol }))
}

/// `msg` as one masked client frame for `protocol`.
pub fn encode_message(protocol: Protocol, msg: &ClientMessage, masker: &mut Masker) -> Vec<u8> {
    match protocol {
        Protocol::Json => {
            let mut payload = Vec::with_capacity(96);
            json::encode_client(msg, &mut payload);
            masker.frame(OpCode::Text, &payload)
        }
        Protocol::Binary => masker.frame(OpCode::Binary, &binary::encode_client(msg)),
        Protocol::SocketIo | Protocol::SocketIoMsgpack => {
            unreachable!("`Client::connect` refuses Socket.IO")
        }
    }
}

/// Decodes the payload of a server data frame.
pub fn decode_message(protocol: Protocol, payload: &[u8]) -> Result<ServerMessage, ClientError> {
    Ok(match protocol {
        Protocol::Json => json::decode_server(payload)?,
        Protocol::Binary => binary::decode_server(payload)?,
        Protocol::SocketIo | Protocol::SocketIoMsgpack => {
            return Err(ClientError::Handshake(
                "this client speaks corecast.json and corecast.bin, not Socket.IO".into(),
            ))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u: Url = "ws://127.0.0.1:9000/ws?x=1".parse().unwrap();
        assert_eq!(
            u,
            Url {
                host: "127.0.0.1".into(),
                port: 9000,
                path: "/ws?x=1".into()
            }
        );
        let u: Url = "ws://example.com".parse().unwrap();
        assert_eq!((u.port, u.path.as_str()), (80, "/"));
        let u: Url = "ws://h:1?room=a".parse().unwrap();
        assert_eq!(u.path, "/?room=a");
        let u: Url = "ws://[::1]:7/".parse().unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 7));
        assert!("http://x".parse::<Url>().is_err());
        assert!("ws://:80/".parse::<Url>().is_err());
        assert!("ws://h:99999/".parse::<Url>().is_err());
        let q = u.with_query("token", "a b/c");
        assert_eq!(q.path, "/?token=a%20b%2Fc");
        assert_eq!(q.with_query("room", "r").path, "/?token=a%20b%2Fc&room=r");
    }

    #[test]
    fn handshake_round_trip() {
        let url: Url = "ws://127.0.0.1:9000/ws".parse().unwrap();
        let key = new_key();
        let req = handshake_request(&url, &key, Some(Protocol::Binary), Some("tok"));
        let cfg = crate::ws::handshake::HandshakeConfig {
            allowed_origins: vec![],
            max_header_bytes: 8192,
        };
        let up = match crate::ws::handshake::parse_request(&req, &cfg)
            .unwrap()
            .unwrap()
        {
            (crate::ws::handshake::Request::Upgrade(u), _) => u,
            other => panic!("{other:?}"),
        };
        assert_eq!(up.bearer.as_deref(), Some("tok"));
        assert_eq!(up.protocol, Protocol::Binary);
        let mut resp = crate::ws::handshake::accept_response(&up);
        let head = resp.len();
        resp.extend_from_slice(&[0x81, 0]);
        assert_eq!(parse_handshake_response(&resp[..10], &key).unwrap(), None);
        let r = parse_handshake_response(&resp, &key).unwrap().unwrap();
        assert_eq!(r.head_len, head);
        assert_eq!(r.protocol, Some(Protocol::Binary));
        assert!(matches!(
            parse_handshake_response(&resp, "other key"),
            Err(ClientError::Handshake(_))
        ));
    }

    #[test]
    fn refusals_carry_status_and_body() {
        let r = b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 7\r\n\r\nno auth";
        assert_eq!(
            parse_handshake_response(&r[..r.len() - 2], "k").unwrap(),
            None
        );
        match parse_handshake_response(r, "k") {
            Err(ClientError::Refused { status, body }) => {
                assert_eq!((status, body.as_str()), (401, "no auth"))
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_handshake_response(b"SSH-2.0\r\n\r\n", "k"),
            Err(ClientError::Handshake(_))
        ));
    }
}
