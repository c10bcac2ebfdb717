//! The JSON encoding: `{"t":"<event>","id":<ack id>,"d":{...}}`.
//!
//! Client envelopes are parsed in place with simd-json (the read buffer is
//! ours to mutate) with scratch buffers reused across messages; server
//! envelopes are written straight into the frame buffer.

use serde::de::DeserializeOwned;
use serde::Serialize;
use simd_json::{BorrowedValue, StaticNode};

use super::events::*;
use super::DecodeError;

/// Reusable simd-json scratch space; keep one per shard.
pub struct Scratch(simd_json::Buffers);

impl Default for Scratch {
    fn default() -> Self {
        Scratch(simd_json::Buffers::new(1024))
    }
}

/// Parses a client envelope in place (`buf` is overwritten).
pub fn decode_client(buf: &mut [u8], scratch: &mut Scratch) -> Result<ClientMessage, DecodeError> {
    let value = simd_json::value::borrowed::to_value_with_buffers(buf, &mut scratch.0)
        .map_err(|e| DecodeError::new(None, format!("invalid JSON: {e}")))?;
    let BorrowedValue::Object(mut obj) = value else {
        return Err(DecodeError::new(None, "the envelope must be a JSON object"));
    };
    let id = match obj.remove("id") {
        None | Some(BorrowedValue::Static(StaticNode::Null)) => None,
        Some(BorrowedValue::Static(StaticNode::U64(n))) => Some(n),
        Some(BorrowedValue::Static(StaticNode::I64(n))) if n >= 0 => Some(n as u64),
        Some(_) => {
            return Err(DecodeError::new(
                None,
                "`id` must be a non-negative integer",
            ))
        }
    };
    let t = match obj.remove("t") {
        Some(BorrowedValue::String(t)) => t,
        Some(_) => return Err(DecodeError::new(id, "`t` must be a string")),
        None => return Err(DecodeError::new(id, "missing `t` (the event name)")),
    };
    let d = obj.remove("d");
    let event = match &*t {
        "auth" => ClientEvent::Auth(payload(id, d)?),
        "heartbeat" => ClientEvent::Heartbeat,
        "channel:join" => ClientEvent::ChannelJoin(payload(id, d)?),
        "channel:leave" => ClientEvent::ChannelLeave(payload(id, d)?),
        "message:send" => ClientEvent::MessageSend(payload(id, d)?),
        other => ClientEvent::Unsupported(other.to_owned()),
    };
    Ok(ClientMessage { id, event })
}

fn payload<T: DeserializeOwned>(
    id: Option<u64>,
    d: Option<BorrowedValue<'_>>,
) -> Result<T, DecodeError> {
    let d = match d {
        Some(v @ BorrowedValue::Object(_)) => v,
        Some(_) => return Err(DecodeError::new(id, "`d` must be a JSON object")),
        None => return Err(DecodeError::new(id, "missing `d` (the event payload)")),
    };
    simd_json::serde::from_borrowed_value(d)
        .map_err(|e| DecodeError::new(id, format!("invalid `d`: {e}")))
}

fn write_envelope<T: Serialize>(name: &str, id: Option<u64>, d: Option<&T>, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"t\":");
    serde_json::to_writer(&mut *out, name).expect("writing to a Vec cannot fail");
    if let Some(id) = id {
        out.extend_from_slice(b",\"id\":");
        out.extend_from_slice(itoa_u64(id).as_bytes());
    }
    if let Some(d) = d {
        out.extend_from_slice(b",\"d\":");
        serde_json::to_writer(&mut *out, d).expect("writing to a Vec cannot fail");
    }
    out.push(b'}');
}

fn itoa_u64(n: u64) -> String {
    n.to_string()
}

/// Appends the JSON encoding of a server message to `out`.
pub fn encode_server(msg: &ServerMessage, out: &mut Vec<u8>) {
    let name = msg.event.name();
    let id = msg.id;
    match &msg.event {
        ServerEvent::Ready(d) => write_envelope(name, id, Some(d), out),
        ServerEvent::Ack(d) => write_envelope(name, id, Some(d), out),
        ServerEvent::Error(d) => write_envelope(name, id, Some(d), out),
        ServerEvent::HeartbeatAck(d) => write_envelope(name, id, Some(d), out),
        ServerEvent::MessageNew(d) => write_envelope(name, id, Some(d), out),
        ServerEvent::MemberJoined(d) | ServerEvent::MemberLeft(d) => {
            write_envelope(name, id, Some(d), out)
        }
    }
}

/// Appends the JSON encoding of a client message to `out` (client side).
pub fn encode_client(msg: &ClientMessage, out: &mut Vec<u8>) {
    let name = msg.event.name();
    let id = msg.id;
    match &msg.event {
        ClientEvent::Auth(d) => write_envelope(name, id, Some(d), out),
        ClientEvent::Heartbeat | ClientEvent::Unsupported(_) => {
            write_envelope::<Empty>(name, id, None, out)
        }
        ClientEvent::ChannelJoin(d) | ClientEvent::ChannelLeave(d) => {
            write_envelope(name, id, Some(d), out)
        }
        ClientEvent::MessageSend(d) => write_envelope(name, id, Some(d), out),
    }
}

/// Parses a server envelope (client side; not on the server's hot path).
pub fn decode_server(buf: &[u8]) -> Result<ServerMessage, DecodeError> {
    #[derive(serde::Deserialize)]
    struct Raw {
        t: String,
        id: Option<u64>,
        d: serde_json::Value,
    }
    let raw: Raw =
        serde_json::from_slice(buf).map_err(|e| DecodeError::new(None, e.to_string()))?;
    fn d<T: DeserializeOwned>(raw: &Raw) -> Result<T, DecodeError> {
        serde_json::from_value(raw.d.clone())
            .map_err(|e| DecodeError::new(raw.id, format!("{}: {e}", raw.t)))
    }
    let event = match raw.t.as_str() {
        "ready" => ServerEvent::Ready(d(&raw)?),
        "ack" => ServerEvent::Ack(d(&raw)?),
        "error" => ServerEvent::Error(d(&raw)?),
        "heartbeat:ack" => ServerEvent::HeartbeatAck(d(&raw)?),
        "message:new" => ServerEvent::MessageNew(d(&raw)?),
        "channel:member_joined" => ServerEvent::MemberJoined(d(&raw)?),
        "channel:member_left" => ServerEvent::MemberLeft(d(&raw)?),
        other => {
            return Err(DecodeError::new(
                raw.id,
                format!("unknown server event `{other}`"),
            ))
        }
    };
    Ok(ServerMessage { id: raw.id, event })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(s: &str) -> Result<ClientMessage, DecodeError> {
        let mut b = s.as_bytes().to_vec();
        decode_client(&mut b, &mut Scratch::default())
    }

    #[test]
    fn decodes_send() {
        let m = decode(r#"{"t":"message:send","id":7,"d":{"channelId":"general","content":"hi","replyTo":"m1"}}"#).unwrap();
        assert_eq!(
            m,
            ClientMessage {
                id: Some(7),
                event: ClientEvent::MessageSend(MessageSend {
                    channel_id: "general".into(),
                    content: "hi".into(),
                    reply_to: Some("m1".into()),
                })
            }
        );
    }

    #[test]
    fn errors_name_the_problem_and_keep_the_id() {
        let e = decode(r#"{"t":"channel:join","id":3,"d":{}}"#).unwrap_err();
        assert_eq!(e.id, Some(3));
        assert!(e.message.contains("channelId"), "{}", e.message);
        assert!(decode("{nope")
            .unwrap_err()
            .message
            .contains("invalid JSON"));
        assert!(decode("[1]").unwrap_err().message.contains("object"));
        assert!(decode(r#"{"id":-1,"t":"x"}"#)
            .unwrap_err()
            .message
            .contains("id"));
        assert!(decode(r#"{"id":1}"#).unwrap_err().message.contains("`t`"));
        let e = decode(r#"{"t":"channel:join","id":4,"d":{"channelId":5}}"#).unwrap_err();
        assert_eq!(e.id, Some(4));
    }

    #[test]
    fn unknown_event_is_unsupported() {
        let m = decode(r#"{"t":"dance","id":1}"#).unwrap();
        assert_eq!(m.event, ClientEvent::Unsupported("dance".into()));
    }

    #[test]
    fn server_envelope_shape() {
        let mut out = vec![];
        encode_server(
            &ServerMessage::error(Some(9), ErrorCode::BadRequest, "nope \"x\""),
            &mut out,
        );
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"t":"error","id":9,"d":{"code":"bad_request","message":"nope \"x\""}}"#
        );
        out.clear();
        encode_server(
            &ServerMessage::ack(Some(1), AckBody::Empty(Empty {})),
            &mut out,
        );
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"t":"ack","id":1,"d":{}}"#
        );
    }
}
