//! The JSON encoding: `{"t":"<event>","id":<ack id>,"d":{...}}`.
//!
//! Client envelopes are parsed in place with simd-json (the read buffer is
//! ours to mutate) with scratch buffers reused across messages; server
//! envelopes are written straight into the frame buffer.

use serde::de::DeserializeOwned;
use serde::Serialize;

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
///
/// simd-json deserializes straight into [`RawEnvelope`], whose fields
/// borrow from `buf`; each field is read "loosely" (a string, a number, or
/// the name of what it was instead) so that errors can name the field
/// without building a value tree first.
pub fn decode_client(buf: &mut [u8], scratch: &mut Scratch) -> Result<ClientMessage, DecodeError> {
    let raw: RawEnvelope<'_> = simd_json::serde::from_slice_with_buffers(buf, &mut scratch.0).map_err(|e| {
        DecodeError::new(
            None,
            match e.error() {
                simd_json::ErrorType::ExpectedMap | simd_json::ErrorType::Serde(_) => {
                    "invalid envelope: it must be an object {\"t\", \"id\", \"d\"} and `d` an object".to_string()
                }
                _ => format!("invalid JSON: {e}"),
            },
        )
    })?;
    let id = match raw.id {
        None | Some(Loose::Null) => None,
        Some(Loose::U64(n)) => Some(n),
        Some(other) => {
            return Err(DecodeError::new(
                None,
                format!("`id` must be a non-negative integer, not {}", other.kind()),
            ))
        }
    };
    let t = match raw.t {
        Some(Loose::Str(t)) => t,
        Some(other) => {
            return Err(DecodeError::new(
                id,
                format!("`t` must be a string, not {}", other.kind()),
            ))
        }
        None => return Err(DecodeError::new(id, "missing `t` (the event name)")),
    };
    let event = match &*t {
        "heartbeat" => ClientEvent::Heartbeat,
        "auth" | "channel:join" | "channel:leave" | "message:send" => {
            let Some(d) = raw.d else {
                return Err(DecodeError::new(id, "missing `d` (the event payload)"));
            };
            match &*t {
                "auth" => ClientEvent::Auth(Auth {
                    token: string_field(id, "token", d.token.as_ref())?,
                }),
                "channel:join" => ClientEvent::ChannelJoin(ChannelRef {
                    channel_id: string_field(id, "channelId", d.channel_id.as_ref())?,
                }),
                "channel:leave" => ClientEvent::ChannelLeave(ChannelRef {
                    channel_id: string_field(id, "channelId", d.channel_id.as_ref())?,
                }),
                _ => ClientEvent::MessageSend(MessageSend {
                    channel_id: string_field(id, "channelId", d.channel_id.as_ref())?,
                    content: string_field(id, "content", d.content.as_ref())?,
                    reply_to: optional_string_field(id, "replyTo", d.reply_to.as_ref())?,
                }),
            }
        }
        other => ClientEvent::Unsupported(other.to_owned()),
    };
    Ok(ClientMessage { id, event })
}

#[derive(serde::Deserialize)]
struct RawEnvelope<'a> {
    #[serde(borrow)]
    t: Option<Loose<'a>>,
    #[serde(borrow)]
    id: Option<Loose<'a>>,
    #[serde(borrow)]
    d: Option<RawPayload<'a>>,
}

/// The union of every payload field; each event takes what it needs.
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawPayload<'a> {
    #[serde(borrow)]
    channel_id: Option<Loose<'a>>,
    #[serde(borrow)]
    content: Option<Loose<'a>>,
    #[serde(borrow)]
    reply_to: Option<Loose<'a>>,
    #[serde(borrow)]
    token: Option<Loose<'a>>,
}

fn string_field(id: Option<u64>, name: &str, v: Option<&Loose<'_>>) -> Result<String, DecodeError> {
    match v {
        Some(Loose::Str(s)) => Ok(s.to_string()),
        Some(other) => Err(DecodeError::new(
            id,
            format!("`d.{name}` must be a string, not {}", other.kind()),
        )),
        None => Err(DecodeError::new(id, format!("missing `d.{name}`"))),
    }
}

fn optional_string_field(
    id: Option<u64>,
    name: &str,
    v: Option<&Loose<'_>>,
) -> Result<Option<String>, DecodeError> {
    match v {
        None | Some(Loose::Null) => Ok(None),
        v => string_field(id, name, v).map(Some),
    }
}

/// Any JSON value, kept only when it is a string or a non-negative integer.
enum Loose<'a> {
    Str(std::borrow::Cow<'a, str>),
    U64(u64),
    Null,
    Other(&'static str),
}

impl Loose<'_> {
    fn kind(&self) -> &'static str {
        match self {
            Loose::Str(_) => "a string",
            Loose::U64(_) => "a number",
            Loose::Null => "null",
            Loose::Other(k) => k,
        }
    }
}

impl<'de: 'a, 'a> serde::Deserialize<'de> for Loose<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for V<'a> {
            type Value = Loose<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Loose::Str(std::borrow::Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Loose::Str(std::borrow::Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(Loose::Str(std::borrow::Cow::Owned(v)))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
                Ok(Loose::U64(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
                Ok(if v >= 0 {
                    Loose::U64(v as u64)
                } else {
                    Loose::Other("a negative number")
                })
            }
            fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Loose::Other("a fractional number"))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Loose::Other("a boolean"))
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Loose::Null)
            }
            fn visit_none<E>(self) -> Result<Self::Value, E> {
                Ok(Loose::Null)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(Loose::Other("an array"))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                while map
                    .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(Loose::Other("an object"))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

fn write_envelope<T: Serialize>(name: &str, id: Option<u64>, d: Option<&T>, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"t\":");
    serde_json::to_writer(&mut *out, name).expect("writing to a Vec cannot fail");
    if let Some(id) = id {
        out.extend_from_slice(b",\"id\":");
        // Straight into the frame buffer: no temporary string per id.
        std::io::Write::write_fmt(out, format_args!("{id}")).expect("writing to a Vec cannot fail");
    }
    if let Some(d) = d {
        out.extend_from_slice(b",\"d\":");
        serde_json::to_writer(&mut *out, d).expect("writing to a Vec cannot fail");
    }
    out.push(b'}');
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
