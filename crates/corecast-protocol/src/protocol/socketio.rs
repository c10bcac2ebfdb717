//! Socket.IO 5 packets over Engine.IO 4's WebSocket transport: the third
//! wire protocol, spoken by `socket.io-client` and its ports.
//!
//! Every WebSocket text frame holds one Engine.IO packet: a type digit
//! (`0` open, `1` close, `2` ping, `3` pong, `4` message, `5` upgrade, `6`
//! noop) and its data. A message carries one Socket.IO packet: a type digit
//! (`0` CONNECT … `6` BINARY_ACK), the attachment count and `-` for binary
//! packets, `/namespace,` unless it is the main one, the ack id, and JSON.
//!
//! The vocabulary is corecast's: `42["message:send",{...}]` is the request
//! `{"t":"message:send","d":{...}}`, and `42<id>[...]` asks for an ack, which
//! comes back as `43<id>[{"success":true,...}]` (the ack body) or
//! `43<id>[{"success":false,"error":{"code","message"}}]`. Server events are
//! `42["<event>",{...}]`; an error without an ack id is the event `error`.

use bytes::Bytes;
use simd_json::BorrowedValue as Value;

use super::json::{self, Envelope, Scratch};
use super::{DecodeError, ServerEvent, ServerMessage};
use crate::ws::frame::{FrameBuf, OpCode};

/// An Engine.IO packet from a client, as one WebSocket text frame holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnginePacket<'a> {
    /// `1`: the client closes the session.
    Close,
    /// `2`: a ping with its data (servers ping in Engine.IO 4; a client's,
    /// such as the `2probe` of an upgrade, is answered with the same data).
    Ping(&'a [u8]),
    /// `3`: the answer to the server's ping.
    Pong,
    /// `4…`: a Socket.IO packet.
    Message(&'a [u8]),
    /// `5`: the upgrade from polling is complete.
    Upgrade,
    /// `6`: nothing (sent by a polling transport during an upgrade).
    Noop,
}

/// Reads an Engine.IO packet from a text frame.
pub fn engine_packet(p: &[u8]) -> Result<EnginePacket<'_>, DecodeError> {
    match p.split_first() {
        Some((b'1', _)) => Ok(EnginePacket::Close),
        Some((b'2', data)) => Ok(EnginePacket::Ping(data)),
        Some((b'3', _)) => Ok(EnginePacket::Pong),
        Some((b'4', rest)) => Ok(EnginePacket::Message(rest)),
        Some((b'5', _)) => Ok(EnginePacket::Upgrade),
        Some((b'6', _)) => Ok(EnginePacket::Noop),
        _ => Err(DecodeError::new(
            None,
            "invalid Engine.IO packet: a type digit 1-6 first",
        )),
    }
}

/// The kind of a Socket.IO packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketKind {
    Connect,
    Disconnect,
    Event,
    Ack,
    ConnectError,
    BinaryEvent,
    BinaryAck,
}

/// A Socket.IO packet's header, and where its JSON starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet<'a> {
    pub kind: PacketKind,
    /// Binary attachments that follow as binary frames.
    pub attachments: u32,
    /// The namespace (`/` for the main one).
    pub nsp: &'a str,
    /// The ack id the client asks for (or answers).
    pub id: Option<u64>,
    /// The JSON data (may be empty).
    pub data: &'a [u8],
}

/// Most attachments a binary packet may announce.
pub const MAX_ATTACHMENTS: u32 = 16;

/// Reads a Socket.IO packet's header (the Engine.IO `4` already removed).
pub fn packet(p: &[u8]) -> Result<Packet<'_>, DecodeError> {
    let bad = |m: &str| DecodeError::new(None, format!("invalid Socket.IO packet: {m}"));
    let kind = match p.first() {
        Some(b'0') => PacketKind::Connect,
        Some(b'1') => PacketKind::Disconnect,
        Some(b'2') => PacketKind::Event,
        Some(b'3') => PacketKind::Ack,
        Some(b'4') => PacketKind::ConnectError,
        Some(b'5') => PacketKind::BinaryEvent,
        Some(b'6') => PacketKind::BinaryAck,
        _ => return Err(bad("unknown packet type")),
    };
    let mut i = 1;
    let mut attachments = 0;
    if matches!(kind, PacketKind::BinaryEvent | PacketKind::BinaryAck) {
        let start = i;
        while i < p.len() && p[i].is_ascii_digit() {
            i += 1;
        }
        if i == start || p.get(i) != Some(&b'-') || i - start > 2 {
            return Err(bad("a binary packet needs its attachment count and `-`"));
        }
        attachments = std::str::from_utf8(&p[start..i])
            .ok()
            .and_then(|n| n.parse().ok())
            .filter(|n| (1..=MAX_ATTACHMENTS).contains(n))
            .ok_or_else(|| bad(&format!("1 to {MAX_ATTACHMENTS} attachments")))?;
        i += 1;
    }
    let mut nsp = "/";
    if p.get(i) == Some(&b'/') {
        let end = p[i..]
            .iter()
            .position(|&b| b == b',')
            .map_or(p.len(), |n| i + n);
        nsp = std::str::from_utf8(&p[i..end]).map_err(|_| bad("the namespace is not UTF-8"))?;
        i = (end + 1).min(p.len());
    }
    let start = i;
    while i < p.len() && p[i].is_ascii_digit() {
        i += 1;
    }
    let id = if i > start {
        let n = std::str::from_utf8(&p[start..i])
            .ok()
            .and_then(|n| n.parse::<u64>().ok())
            .ok_or_else(|| bad("the ack id is too large"))?;
        Some(n)
    } else {
        None
    };
    let data = &p[i..];
    let shape_ok = match kind {
        PacketKind::Connect => data.is_empty() || data[0] == b'{',
        PacketKind::Disconnect => data.is_empty(),
        PacketKind::Event | PacketKind::BinaryEvent | PacketKind::Ack | PacketKind::BinaryAck => {
            data.first() == Some(&b'[')
        }
        PacketKind::ConnectError => true,
    };
    if !shape_ok || (id.is_some() && matches!(kind, PacketKind::Connect | PacketKind::Disconnect)) {
        return Err(DecodeError {
            id: id.filter(|_| kind == PacketKind::Event),
            ..bad("invalid payload format")
        });
    }
    if matches!(kind, PacketKind::Ack | PacketKind::BinaryAck) && id.is_none() {
        return Err(bad("an ACK needs its id"));
    }
    Ok(Packet {
        kind,
        attachments,
        nsp,
        id,
        data,
    })
}

/// Reads an EVENT's `["<event>", {...}]` as a client envelope: its ack id
/// and event name first (to charge the event's rate-limit bucket), its
/// payload by [`Envelope::decode`]. `buf` is the whole Socket.IO packet,
/// parsed in place.
pub fn envelope<'v>(buf: &'v mut [u8], scratch: &mut Scratch) -> Result<Envelope<'v>, DecodeError> {
    let (id, at) = {
        let p = packet(buf)?;
        if p.kind != PacketKind::Event {
            return Err(DecodeError::new(
                p.id,
                "only EVENT packets carry requests (binary attachments are not supported)",
            ));
        }
        if p.nsp != "/" {
            return Err(DecodeError::new(
                p.id,
                format!("namespace `{}` is not connected", p.nsp),
            ));
        }
        (p.id, buf.len() - p.data.len())
    };
    let root = simd_json::value::borrowed::to_value_with_buffers(&mut buf[at..], scratch.buffers())
        .map_err(|e| DecodeError::new(id, format!("invalid JSON: {e}")))?;
    let Value::Array(mut args) = root else {
        return Err(DecodeError::new(id, "an EVENT's data must be an array"));
    };
    if args.len() > 2 {
        return Err(DecodeError::new(
            id,
            "an event takes one argument (an object) besides its name",
        ));
    }
    let d = (args.len() == 2).then(|| args.pop()).flatten();
    let t = match args.pop() {
        Some(Value::String(t)) => t,
        _ => {
            return Err(DecodeError::new(
                id,
                "an EVENT starts with its name (a string)",
            ))
        }
    };
    Ok(Envelope::new(id, t, d))
}

/// What a CONNECT packet's auth payload carries: the token
/// (`{"token": "..."}`), and, from a client reconnecting with connection
/// state recovery, the session it had (`pid`) and the recovery offset of
/// the last event it received (`offset`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ConnectAuth {
    pub token: Option<String>,
    pub pid: Option<String>,
    pub offset: Option<String>,
}

/// Reads a CONNECT packet's auth payload; an error when it is not a JSON
/// object or one of its fields is not a string.
pub fn connect_auth(data: &[u8]) -> Result<ConnectAuth, DecodeError> {
    if data.is_empty() {
        return Ok(ConnectAuth::default());
    }
    let v: serde_json::Value = serde_json::from_slice(data)
        .map_err(|e| DecodeError::new(None, format!("invalid CONNECT payload: {e}")))?;
    let serde_json::Value::Object(o) = v else {
        return Err(DecodeError::new(
            None,
            "the CONNECT payload must be an object",
        ));
    };
    let field = |name: &str| match o.get(name) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(t)) => Ok(Some(t.clone())),
        Some(_) => Err(DecodeError::new(
            None,
            format!("`auth.{name}` must be a string"),
        )),
    };
    Ok(ConnectAuth {
        token: field("token")?,
        pid: field("pid")?,
        offset: field("offset")?,
    })
}

/// Where a sequenced channel event stands. Socket.IO frames of such an
/// event carry it as their last argument, the offset a client of
/// connection state recovery keeps and sends back when it reconnects
/// (see [`recovery_offset`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seq<'a> {
    pub channel: &'a str,
    pub offset: u64,
    pub epoch: &'a str,
}

impl Seq<'_> {
    /// `<offset>:<epoch>:<channel>`: epochs are hex and offsets digits, so
    /// the channel is whatever follows the second `:`.
    pub fn token(&self) -> String {
        format!("{}:{}:{}", self.offset, self.epoch, self.channel)
    }
}

/// Reads a recovery offset made by [`Seq::token`].
pub fn recovery_offset(token: &str) -> Option<Seq<'_>> {
    let mut parts = token.splitn(3, ':');
    let offset = parts.next()?.parse().ok()?;
    let epoch = parts.next()?;
    let channel = parts.next()?;
    (!epoch.is_empty() && !channel.is_empty()).then_some(Seq {
        channel,
        offset,
        epoch,
    })
}

/// Appends the text of a server message (one Engine.IO message packet) to
/// `out`; appends nothing for a success ack nobody asked for.
pub fn encode_server(msg: &ServerMessage, out: &mut Vec<u8>) {
    encode_server_at(msg, None, out)
}

/// [`encode_server`] for an event sequenced at `at`: the event carries its
/// recovery offset as its last argument.
pub fn encode_server_at(msg: &ServerMessage, at: Option<Seq>, out: &mut Vec<u8>) {
    let write_id = |out: &mut Vec<u8>, id: u64| {
        std::io::Write::write_fmt(out, format_args!("{id}")).expect("writing to a Vec cannot fail")
    };
    match (&msg.event, msg.id) {
        (ServerEvent::Ack(_), None) => {}
        (ServerEvent::Error(_), Some(id)) => {
            out.extend_from_slice(b"43");
            write_id(out, id);
            out.extend_from_slice(b"[{\"success\":false,\"error\":");
            json::write_server_body(msg, out);
            out.extend_from_slice(b"}]");
        }
        (_, Some(id)) => {
            out.extend_from_slice(b"43");
            write_id(out, id);
            out.push(b'[');
            let at = out.len();
            json::write_server_body(msg, out);
            // Every body is an object: `{` + `"success":true` + the rest.
            let extra: &[u8] = if out.get(at + 1) == Some(&b'}') {
                b"\"success\":true"
            } else {
                b"\"success\":true,"
            };
            out.splice(at + 1..at + 1, extra.iter().copied());
            out.push(b']');
        }
        (event, None) => {
            out.extend_from_slice(b"42[");
            serde_json::to_writer(&mut *out, event.name()).expect("writing to a Vec cannot fail");
            out.push(b',');
            json::write_server_body(msg, out);
            if let Some(at) = at {
                out.push(b',');
                serde_json::to_writer(&mut *out, &at.token())
                    .expect("writing to a Vec cannot fail");
            }
            out.push(b']');
        }
    }
}

/// Reads a server message from its Socket.IO packet (client side, and the
/// engine's tests; `packet` without Engine.IO's `4`): an EVENT is the
/// event it names, an ACK the ack or the error it carries. The CONNECT that
/// comes with `ready` is not a message (`None`).
pub fn decode_server(packet: &[u8]) -> Result<Option<ServerMessage>, DecodeError> {
    let p = self::packet(packet)?;
    let bad = |m: &str| DecodeError::new(p.id, m.to_owned());
    let mut args: Vec<serde_json::Value> = match p.kind {
        PacketKind::Event | PacketKind::Ack => {
            serde_json::from_slice(p.data).map_err(|e| bad(&e.to_string()))?
        }
        PacketKind::Connect => return Ok(None),
        _ => return Err(bad("not a message")),
    };
    let envelope = if p.kind == PacketKind::Event {
        if args.len() == 3 && args[2].is_string() {
            // The recovery offset of a sequenced event.
            args.pop();
        }
        let d = args.pop().unwrap_or_default();
        let t = args.pop().unwrap_or_default();
        serde_json::json!({ "t": t, "d": d })
    } else {
        let Some(serde_json::Value::Object(mut body)) = args.pop() else {
            return Err(bad("an ACK carries one object"));
        };
        match body.remove("success") {
            Some(serde_json::Value::Bool(true)) => {
                serde_json::json!({ "t": "ack", "id": p.id, "d": body })
            }
            Some(serde_json::Value::Bool(false)) => {
                let e = body.remove("error").unwrap_or_default();
                serde_json::json!({ "t": "error", "id": p.id, "d": e })
            }
            _ => return Err(bad("an ACK without `success`")),
        }
    };
    json::decode_server(envelope.to_string().as_bytes()).map(Some)
}

/// A text frame of `text`.
fn text_frame(text: &[u8]) -> Bytes {
    crate::ws::frame::encode(OpCode::Text, text)
}

/// Encodes `msg` as complete WebSocket frames: one text frame, none for a
/// success ack nobody asked for, and for `ready` the CONNECT packet that
/// opens the main namespace (`40{"sid":...,"pid":...}`) followed by the event.
pub fn encode_frame(msg: &ServerMessage, at: Option<Seq>) -> Bytes {
    let mut f = FrameBuf::with_capacity(128);
    let header = f.payload().len();
    encode_server_at(msg, at, f.payload());
    if f.payload().len() == header {
        return Bytes::new();
    }
    let event = f.finish(OpCode::Text);
    let ServerEvent::Ready(r) = &msg.event else {
        return event;
    };
    let connect = format!("40{}", connect_answer(&r.session_id));
    let mut both = Vec::with_capacity(connect.len() + event.len() + 4);
    both.extend_from_slice(&text_frame(connect.as_bytes()));
    both.extend_from_slice(&event);
    Bytes::from(both)
}

/// Encodes `msg` for a client of `socket.io-msgpack-parser`: the same
/// packets as [`encode_frame`], each a MessagePack map in a binary frame.
pub fn encode_msgpack_frame(msg: &ServerMessage, at: Option<Seq>) -> Bytes {
    let mut text = Vec::with_capacity(128);
    encode_server_at(msg, at, &mut text);
    if text.is_empty() {
        return Bytes::new();
    }
    let event = msgpack_frame(&text[1..]);
    let ServerEvent::Ready(r) = &msg.event else {
        return event;
    };
    let connect = format!("0{}", connect_answer(&r.session_id));
    let mut both = msgpack_frame(connect.as_bytes()).to_vec();
    both.extend_from_slice(&event);
    Bytes::from(both)
}

/// The CONNECT answer's data: the session is both the socket's id and the
/// private id (`pid`) a client of connection state recovery sends back
/// when it reconnects. It stays the client's own: a session resumes only
/// for a connection of its user.
fn connect_answer(session: &str) -> serde_json::Value {
    serde_json::json!({ "sid": session, "pid": session })
}

/// A Socket.IO packet's text form (without Engine.IO's `4`) as the binary
/// frame of its MessagePack form.
pub fn msgpack_frame(packet: &[u8]) -> Bytes {
    let mut f = FrameBuf::with_capacity(packet.len());
    // The server's own packets always translate.
    let _ = super::msgpack::packet_from_text(packet, f.payload());
    f.finish(OpCode::Binary)
}

/// The Engine.IO open packet (`0{...}`) as a text frame; a polling
/// session may upgrade to WebSocket.
pub fn open_frame(
    sid: &str,
    polling: bool,
    ping_interval_ms: u64,
    ping_timeout_ms: u64,
    max_payload: usize,
) -> Bytes {
    let upgrades: &[&str] = if polling { &["websocket"] } else { &[] };
    let open = serde_json::json!({
        "sid": sid,
        "upgrades": upgrades,
        "pingInterval": ping_interval_ms,
        "pingTimeout": ping_timeout_ms,
        "maxPayload": max_payload,
    });
    text_frame(format!("0{open}").as_bytes())
}

/// The packets of a long-polling request's body: separated by the record
/// separator (0x1e), a binary one as `b` and base64. Each comes back as
/// (`true` for text, its bytes).
pub fn decode_payload(body: &[u8]) -> Result<Vec<(bool, Vec<u8>)>, DecodeError> {
    use base64::Engine as _;
    if body.is_empty() {
        return Err(DecodeError::new(None, "an empty payload"));
    }
    body.split(|&b| b == 0x1e)
        .map(|p| match p.split_first() {
            Some((b'b', data)) => base64::engine::general_purpose::STANDARD
                .decode(data)
                .map(|d| (false, d))
                .map_err(|e| DecodeError::new(None, format!("invalid base64 packet: {e}"))),
            Some(_) => Ok((true, p.to_vec())),
            None => Err(DecodeError::new(None, "an empty packet")),
        })
        .collect()
}

/// A long-polling response's body from the WebSocket frames queued for
/// the session (unmasked, as the server encodes them; a `Bytes` may hold
/// several): text packets as they are, binary ones as `b` and base64, a
/// close frame as the close packet `1`, separated by the record separator.
/// Also says whether a close frame was among them.
pub fn encode_payload<'a>(frames: impl IntoIterator<Item = &'a [u8]>) -> (Vec<u8>, bool) {
    use base64::Engine as _;
    let mut out = Vec::new();
    let mut closed = false;
    for mut buf in frames {
        while let Ok(Some(h)) = crate::ws::frame::parse_header(buf) {
            let end = (h.header_len + h.payload_len as usize).min(buf.len());
            let payload = &buf[h.header_len..end];
            let packet_start = out.len();
            if packet_start > 0 {
                out.push(0x1e);
            }
            match h.opcode {
                OpCode::Text => out.extend_from_slice(payload),
                OpCode::Binary => {
                    out.push(b'b');
                    out.extend_from_slice(
                        base64::engine::general_purpose::STANDARD
                            .encode(payload)
                            .as_bytes(),
                    );
                }
                OpCode::Close => {
                    out.push(b'1');
                    closed = true;
                }
                _ => out.truncate(packet_start),
            }
            buf = &buf[end..];
        }
    }
    (out, closed)
}

/// The server's ping (`2`) as a text frame.
pub fn ping_frame() -> Bytes {
    // A final text frame of one byte: no allocation per ping.
    Bytes::from_static(&[0x81, 0x01, b'2'])
}

/// An answer to a client's ping (`3`, with its data).
pub fn pong_frame(data: &[u8]) -> Bytes {
    let mut p = Vec::with_capacity(1 + data.len());
    p.push(b'3');
    p.extend_from_slice(data);
    text_frame(&p)
}

/// CONNECT_ERROR for `nsp`: the client's `connect_error` gets an `Error`
/// whose `message` is `message` and whose `data` is `{"code": code}` (no
/// `data` without a code, as Socket.IO servers refuse a namespace). In
/// MessagePack for a client of `socket.io-msgpack-parser`.
pub fn connect_error_frame(nsp: &str, code: Option<&str>, message: &str, msgpack: bool) -> Bytes {
    let body = match code {
        Some(code) => serde_json::json!({ "message": message, "data": { "code": code } }),
        None => serde_json::json!({ "message": message }),
    };
    let packet = if nsp == "/" {
        format!("4{body}")
    } else {
        format!("4{nsp},{body}")
    };
    if msgpack {
        return msgpack_frame(packet.as_bytes());
    }
    text_frame(format!("4{packet}").as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{AckBody, ClientEvent, Empty, ErrorCode, HeartbeatAck};

    /// The text of the first frame in `frame` (short, unmasked).
    fn text_of(frame: &[u8]) -> String {
        assert_eq!(frame[0], 0x81, "a final text frame");
        let len = frame[1] as usize;
        assert!(len < 126);
        String::from_utf8(frame[2..2 + len].to_vec()).unwrap()
    }

    fn decode(s: &str) -> Result<ClientEvent, DecodeError> {
        let mut buf = s.as_bytes().to_vec();
        let mut scratch = Scratch::default();
        let env = envelope(&mut buf, &mut scratch)?;
        env.decode().map(|m| m.event)
    }

    #[test]
    fn engine_packets() {
        assert_eq!(engine_packet(b"2").unwrap(), EnginePacket::Ping(b""));
        assert_eq!(engine_packet(b"3").unwrap(), EnginePacket::Pong);
        assert_eq!(
            engine_packet(b"2probe").unwrap(),
            EnginePacket::Ping(b"probe")
        );
        assert_eq!(engine_packet(b"1").unwrap(), EnginePacket::Close);
        assert_eq!(engine_packet(b"40").unwrap(), EnginePacket::Message(b"0"));
        assert!(engine_packet(b"").is_err());
        assert!(engine_packet(b"0{}").is_err());
        assert!(engine_packet(b"9").is_err());
    }

    #[test]
    fn packet_headers() {
        let p = packet(b"2[\"a\"]").unwrap();
        assert_eq!(
            (p.kind, p.nsp, p.id, p.data),
            (PacketKind::Event, "/", None, &b"[\"a\"]"[..])
        );
        let p = packet(b"212[\"a\"]").unwrap();
        assert_eq!(p.id, Some(12));
        let p = packet(b"2/chat,7[\"a\"]").unwrap();
        assert_eq!((p.nsp, p.id), ("/chat", Some(7)));
        let p = packet(b"51-3[\"a\",{\"_placeholder\":true,\"num\":0}]").unwrap();
        assert_eq!(
            (p.kind, p.attachments, p.id),
            (PacketKind::BinaryEvent, 1, Some(3))
        );
        let p = packet(b"0{\"token\":\"x\"}").unwrap();
        assert_eq!(
            (p.kind, p.data),
            (PacketKind::Connect, &b"{\"token\":\"x\"}"[..])
        );
        assert_eq!(packet(b"0/custom,").unwrap().nsp, "/custom");
        assert_eq!(packet(b"1").unwrap().kind, PacketKind::Disconnect);
        // What the official suite sends as invalid: an unknown type, data
        // that is not an array, an ack id that is not a number.
        assert!(packet(b"8").is_err());
        assert!(packet(b"2{\"a\":1}").is_err());
        assert!(packet(b"2abc").is_err());
        assert!(packet(b"3[]").is_err(), "an ACK without id");
        assert!(packet(b"5-[]").is_err());
        assert!(packet(b"599-[]").is_err());
        assert!(packet(b"299999999999999999999999[]").is_err());
    }

    #[test]
    fn events_are_the_native_requests() {
        let e = decode(r#"2["message:send",{"channelId":"general","content":"hi"}]"#).unwrap();
        let ClientEvent::MessageSend(m) = e else {
            panic!("{e:?}")
        };
        assert_eq!(
            (m.channel_id.as_str(), m.content.as_str()),
            ("general", "hi")
        );
        assert_eq!(
            decode(r#"2["presence:heartbeat"]"#).unwrap(),
            ClientEvent::PresenceHeartbeat
        );
        let mut buf = br#"25["heartbeat"]"#.to_vec();
        let env = envelope(&mut buf, &mut Scratch::default()).unwrap();
        assert_eq!(env.id, Some(5));
        assert!(matches!(
            decode(r#"2["no:such",{}]"#),
            Ok(ClientEvent::Unsupported(_))
        ));
        // Errors keep the ack id, so the client's callback hears them.
        let e = decode(r#"29["message:send",{"channelId":7}]"#).unwrap_err();
        assert_eq!(e.id, Some(9));
        assert!(e.message.contains("channelId"), "{e}");
        assert_eq!(decode(r#"24[1,2]"#).unwrap_err().id, Some(4));
        assert!(decode(r#"24["a",{},{}]"#)
            .unwrap_err()
            .message
            .contains("one argument"));
        assert!(decode(r#"2/x,["a"]"#)
            .unwrap_err()
            .message
            .contains("namespace"));
        assert!(decode(r#"51-["a",{"_placeholder":true,"num":0}]"#).is_err());
    }

    #[test]
    fn server_messages() {
        let frame = |m: &ServerMessage| {
            let mut out = Vec::new();
            encode_server(m, &mut out);
            String::from_utf8(out).unwrap()
        };
        let hb = ServerEvent::HeartbeatAck(HeartbeatAck { timestamp: 5 });
        assert_eq!(
            frame(&ServerMessage::event(hb.clone())),
            r#"42["heartbeat:ack",{"timestamp":5}]"#
        );
        assert_eq!(
            frame(&ServerMessage {
                id: Some(3),
                event: hb
            }),
            r#"433[{"success":true,"timestamp":5}]"#
        );
        let empty = ServerMessage::ack(Some(8), AckBody::Empty(Empty {}));
        assert_eq!(frame(&empty), r#"438[{"success":true}]"#);
        assert_eq!(
            frame(&ServerMessage::ack(None, AckBody::Empty(Empty {}))),
            ""
        );
        assert!(encode_frame(&ServerMessage::ack(None, AckBody::Empty(Empty {})), None).is_empty());
        let e = ServerMessage::error(Some(2), ErrorCode::Forbidden, "no");
        assert_eq!(
            frame(&e),
            r#"432[{"success":false,"error":{"code":"forbidden","message":"no"}}]"#
        );
        let e = ServerMessage::error(None, ErrorCode::RateLimited, "slow");
        assert_eq!(
            frame(&e),
            r#"42["error",{"code":"rate_limited","message":"slow"}]"#
        );
        let ready = ServerMessage::event(ServerEvent::Ready(crate::protocol::Ready {
            user_id: "u".into(),
            session_id: "s1".into(),
            shard: 0,
            heartbeat_interval_ms: 1,
        }));
        let both = encode_frame(&ready, None);
        let first = text_of(&both);
        assert_eq!(first, r#"40{"pid":"s1","sid":"s1"}"#);
        let second = text_of(&both.slice(first.len() + 2..));
        assert!(
            second.starts_with(r#"42["ready",{"userId":"u""#),
            "{second}"
        );
    }

    #[test]
    fn server_messages_read_back() {
        let msgs = [
            ServerMessage::ack(Some(8), AckBody::Empty(Empty {})),
            ServerMessage::error(Some(2), ErrorCode::Forbidden, "no"),
            ServerMessage::error(None, ErrorCode::RateLimited, "slow"),
            ServerMessage::event(ServerEvent::HeartbeatAck(HeartbeatAck { timestamp: 5 })),
        ];
        for m in msgs {
            let mut out = Vec::new();
            encode_server(&m, &mut out);
            assert_eq!(decode_server(&out[1..]).unwrap(), Some(m.clone()), "{m:?}");
            let mp = encode_msgpack_frame(&m, None);
            let text = crate::protocol::msgpack::packet_to_text(&mp[2..]).unwrap();
            assert_eq!(decode_server(&text).unwrap(), Some(m));
        }
        assert_eq!(decode_server(br#"0{"sid":"s"}"#).unwrap(), None);
    }

    #[test]
    fn sequenced_events_carry_their_recovery_offset() {
        let m = ServerMessage::event(ServerEvent::HeartbeatAck(HeartbeatAck { timestamp: 5 }));
        let at = Seq {
            channel: "room:a:b",
            offset: 41,
            epoch: "9f2c",
        };
        let mut out = Vec::new();
        encode_server_at(&m, Some(at), &mut out);
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"42["heartbeat:ack",{"timestamp":5},"41:9f2c:room:a:b"]"#
        );
        assert_eq!(recovery_offset(&at.token()), Some(at));
        // Clients read the event without it.
        assert_eq!(decode_server(&out[1..]).unwrap(), Some(m.clone()));
        let mp = encode_msgpack_frame(&m, Some(at));
        let text = crate::protocol::msgpack::packet_to_text(&mp[2..]).unwrap();
        assert!(text.ends_with(br#","41:9f2c:room:a:b"]"#));
        for bad in ["", "41", "41:e", "x:e:c", "41::c", "41:e:"] {
            assert_eq!(recovery_offset(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_ping_is_a_text_frame() {
        assert_eq!(ping_frame(), text_frame(b"2"));
    }

    #[test]
    fn polling_payloads() {
        let p = decode_payload(b"4hello\x1ebAQIDBA==\x1e3").unwrap();
        assert_eq!(
            p,
            [
                (true, b"4hello".to_vec()),
                (false, vec![1, 2, 3, 4]),
                (true, b"3".to_vec())
            ]
        );
        assert!(decode_payload(b"").is_err());
        assert!(decode_payload(b"4a\x1e\x1e4b").is_err());
        assert!(decode_payload(b"b!!").is_err());
        let frames = [
            crate::ws::frame::encode(OpCode::Text, b"4hello"),
            crate::ws::frame::encode(OpCode::Binary, &[1, 2, 3, 4]),
        ];
        let both: Vec<u8> = frames.iter().flat_map(|f| f.iter().copied()).collect();
        let close = crate::ws::frame::encode(OpCode::Close, &[3, 232]);
        let (body, closed) = encode_payload([&both[..], &close[..]]);
        assert_eq!(body, b"4hello\x1ebAQIDBA==\x1e1");
        assert!(closed);
        let (body, closed) = encode_payload([&frames[0][..]]);
        assert_eq!((&body[..], closed), (&b"4hello"[..], false));
    }

    #[test]
    fn connect_payloads() {
        assert_eq!(connect_auth(b"").unwrap(), ConnectAuth::default());
        assert_eq!(
            connect_auth(br#"{"token":"t"}"#).unwrap().token.as_deref(),
            Some("t")
        );
        assert_eq!(
            connect_auth(br#"{"token":"t","pid":"p","offset":"3:e:c"}"#).unwrap(),
            ConnectAuth {
                token: Some("t".into()),
                pid: Some("p".into()),
                offset: Some("3:e:c".into()),
            }
        );
        assert_eq!(
            connect_auth(br#"{"other":1}"#).unwrap(),
            ConnectAuth::default()
        );
        assert!(connect_auth(br#"{"token":1}"#).is_err());
        assert!(connect_auth(br#"{"pid":1}"#).is_err());
        assert!(connect_auth(br#"[1]"#).is_err());
        assert_eq!(
            text_of(&connect_error_frame(
                "/",
                Some("unauthorized"),
                "bad token",
                false
            )),
            r#"44{"data":{"code":"unauthorized"},"message":"bad token"}"#
        );
        assert_eq!(
            text_of(&connect_error_frame("/x", None, "Invalid namespace", false)),
            r#"44/x,{"message":"Invalid namespace"}"#
        );
    }
}
