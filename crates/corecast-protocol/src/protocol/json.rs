//! The JSON encoding: `{"t":"<event>","id":<ack id>,"d":{...}}`.
//!
//! Client envelopes are parsed in place with simd-json (the read buffer is
//! ours to mutate) into a borrowed value tree, with scratch buffers reused
//! across messages; [`Fields`] then reads each event's payload, and every
//! error names the field (`` `d.since.offset` must be a number, not a
//! string ``). Server envelopes are written straight into the frame buffer.

use std::borrow::Cow;

use serde::de::DeserializeOwned;
use serde::Serialize;
use simd_json::prelude::*;
use simd_json::value::borrowed::{Object, Value};
use simd_json::StaticNode;

use super::events::*;
use super::DecodeError;

/// Most entries a list field (`mentions`, `userIds`, …) may hold.
pub const MAX_LIST: usize = 1000;

/// Reusable simd-json scratch space; keep one per shard.
pub struct Scratch(simd_json::Buffers);

impl Scratch {
    pub(crate) fn buffers(&mut self) -> &mut simd_json::Buffers {
        &mut self.0
    }
}

impl Default for Scratch {
    fn default() -> Self {
        Scratch(simd_json::Buffers::new(1024))
    }
}

/// Parses a client envelope in place (`buf` is overwritten).
pub fn decode_client(buf: &mut [u8], scratch: &mut Scratch) -> Result<ClientMessage, DecodeError> {
    envelope(buf, scratch)?.decode()
}

/// A client envelope parsed as far as its ack id and its event name: enough
/// to charge the event's rate-limit bucket before its payload is read.
pub struct Envelope<'v> {
    pub id: Option<u64>,
    /// The event's [`ClientEvent::index`] (past the end when unknown).
    pub event: usize,
    t: Cow<'v, str>,
    d: Option<Value<'v>>,
}

/// Parses a client envelope in place (`buf` is overwritten) and reads its
/// `id` and `t`; [`Envelope::decode`] reads the rest.
pub fn envelope<'v>(buf: &'v mut [u8], scratch: &mut Scratch) -> Result<Envelope<'v>, DecodeError> {
    let root = simd_json::value::borrowed::to_value_with_buffers(buf, &mut scratch.0)
        .map_err(|e| DecodeError::new(None, format!("invalid JSON: {e}")))?;
    let Value::Object(mut env) = root else {
        return Err(DecodeError::new(
            None,
            "invalid envelope: it must be an object {\"t\", \"id\", \"d\"}",
        ));
    };
    let id = match env.get("id") {
        None | Some(Value::Static(StaticNode::Null)) => None,
        Some(Value::Static(StaticNode::U64(n))) => Some(*n),
        Some(Value::Static(StaticNode::I64(n))) if *n >= 0 => Some(*n as u64),
        Some(other) => {
            return Err(DecodeError::new(
                None,
                format!("`id` must be a non-negative integer, not {}", kind(other)),
            ))
        }
    };
    let t = match env.remove("t") {
        Some(Value::String(t)) => t,
        Some(other) => {
            return Err(DecodeError::new(
                id,
                format!("`t` must be a string, not {}", kind(&other)),
            ))
        }
        None => return Err(DecodeError::new(id, "missing `t` (the event name)")),
    };
    Ok(Envelope {
        id,
        event: event_index(&t),
        t,
        d: env.remove("d"),
    })
}

impl<'v> Envelope<'v> {
    /// An envelope read by another framing (Socket.IO's event arrays).
    pub(crate) fn new(id: Option<u64>, t: Cow<'v, str>, d: Option<Value<'v>>) -> Self {
        Envelope {
            id,
            event: event_index(&t),
            t,
            d,
        }
    }

    /// The rate-limit bucket the message is charged to.
    pub fn bucket(&self) -> usize {
        self.event
    }

    /// The event's name, as the client sent it.
    pub fn name(&self) -> &str {
        &self.t
    }

    /// Reads the event's payload.
    pub fn decode(&self) -> Result<ClientMessage, DecodeError> {
        let id = self.id;
        let named = |mut e: DecodeError| {
            e.event = Some(self.event);
            e
        };
        let d = match &self.d {
            None | Some(Value::Static(StaticNode::Null)) => None,
            Some(Value::Object(o)) => Some(&**o),
            Some(other) => {
                return Err(named(DecodeError::new(
                    id,
                    format!("`d` must be an object, not {}", kind(other)),
                )))
            }
        };
        let f = Fields {
            id,
            path: Cow::Borrowed("d"),
            obj: d,
        };
        let event = event(&self.t, &f).map_err(named)?;
        Ok(ClientMessage { id, event })
    }
}

/// The position of event `t` in [`CLIENT_EVENT_NAMES`] (past the end when
/// the server does not know it), as [`ClientEvent::index`] numbers it.
pub fn event_index(t: &str) -> usize {
    CLIENT_EVENT_NAMES
        .iter()
        .position(|n| *n == t)
        .unwrap_or(CLIENT_EVENT_NAMES.len())
}

fn event(t: &str, f: &Fields<'_, '_>) -> Result<ClientEvent, DecodeError> {
    use ClientEvent as E;
    Ok(match t {
        "auth" => E::Auth(Auth {
            token: f.string("token")?,
        }),
        "heartbeat" => E::Heartbeat,
        "auth:refresh" => E::AuthRefresh(Auth {
            token: f.string("token")?,
        }),
        "rpc" => E::Rpc(RpcCall {
            method: f.string("method")?,
            data: match f.present("data") {
                Some(_) => Some(f.json("data")?),
                None => None,
            },
        }),
        "session:resume" => E::SessionResume(SessionResume {
            session_id: f.string("sessionId")?,
            positions: f
                .objects("positions")?
                .iter()
                .map(|p| {
                    Ok(Position {
                        channel_id: p.string("channelId")?,
                        offset: p.u64("offset")?,
                        epoch: p.string("epoch")?,
                    })
                })
                .collect::<Result<_, DecodeError>>()?,
        }),
        "channel:join" => E::ChannelJoin(ChannelJoin {
            channel_id: f.string("channelId")?,
            since: match f.opt_object("since")? {
                Some(s) => Some(Since {
                    offset: s.u64("offset")?,
                    epoch: s.string("epoch")?,
                }),
                None => None,
            },
            token: f.opt_string("token")?,
        }),
        "channel:leave" => E::ChannelLeave(channel(f)?),
        "channel:get_history" => E::ChannelGetHistory(GetHistory {
            channel_id: f.string("channelId")?,
            limit: f.opt_u32("limit")?,
            before: f.opt_u64("before")?,
        }),
        "channel:get_members" => E::ChannelGetMembers(channel(f)?),
        "message:send" => E::MessageSend(MessageSend {
            channel_id: f.string("channelId")?,
            content: f.string("content")?,
            reply_to: f.opt_string("replyTo")?,
            thread_id: f.opt_string("threadId")?,
            mentions: f.strings("mentions")?,
            nonce: f.opt_string("nonce")?,
        }),
        "message:edit" => E::MessageEdit(MessageEdit {
            channel_id: f.string("channelId")?,
            message_id: f.string("messageId")?,
            content: f.string("content")?,
        }),
        "message:delete" => E::MessageDelete(message(f)?),
        "message:react" => E::MessageReact(MessageReact {
            channel_id: f.string("channelId")?,
            message_id: f.string("messageId")?,
            emoji: f.string("emoji")?,
            action: f
                .opt_enum("action", ReactAction::parse)?
                .unwrap_or(ReactAction::Add),
        }),
        "message:delivered" => E::MessageDelivered(message(f)?),
        "message:mark_read" => E::MessageMarkRead(message(f)?),
        "message:get_read_receipts" => E::MessageGetReadReceipts(message(f)?),
        "dm:send" => E::DmSend(DmSend {
            to_user_id: f.string("toUserId")?,
            content: f.string("content")?,
            nonce: f.opt_string("nonce")?,
        }),
        "dm:get_conversations" => E::DmGetConversations(Limit {
            limit: f.opt_u32("limit")?,
        }),
        "presence:update" => E::PresenceUpdate(PresenceUpdate {
            status: f.opt_enum("status", Status::parse)?,
            custom_status: f.patch("customStatus", |v| v.string_value())?,
            activity: f.patch("activity", |v| {
                let a = v.as_fields()?;
                Ok(Activity {
                    kind: a.string("type")?,
                    name: a.string("name")?,
                    details: a.opt_string("details")?,
                })
            })?,
            device: f.opt_enum("device", DeviceKind::parse)?,
        }),
        "presence:subscribe" => E::PresenceSubscribe(users(f)?),
        "presence:unsubscribe" => E::PresenceUnsubscribe(users(f)?),
        "presence:get_bulk" => E::PresenceGetBulk(users(f)?),
        "presence:heartbeat" => E::PresenceHeartbeat,
        "typing:start" => E::TypingStart(channel(f)?),
        "typing:stop" => E::TypingStop(channel(f)?),
        "typing:get_active" => E::TypingGetActive(channel(f)?),
        "voice:join" => E::VoiceJoin(channel(f)?),
        "voice:leave" => E::VoiceLeave,
        "voice:update" => E::VoiceUpdate(VoiceUpdate {
            muted: f.opt_bool("muted")?,
            deafened: f.opt_bool("deafened")?,
            speaking: f.opt_bool("speaking")?,
            video: f.opt_bool("video")?,
            screen_share: f.opt_bool("screenShare")?,
        }),
        "voice:get_participants" => E::VoiceGetParticipants(channel(f)?),
        "call:initiate" => E::CallInitiate(CallInitiate {
            to_user_id: f.string("toUserId")?,
            call_type: f
                .opt_enum("callType", CallType::parse)?
                .unwrap_or(CallType::Audio),
            sdp: f.opt_string("sdp")?,
        }),
        "call:answer" => E::CallAnswer(CallAnswer {
            call_id: f.string("callId")?,
            sdp: f.opt_string("sdp")?,
        }),
        "call:reject" => E::CallReject(CallReject {
            call_id: f.string("callId")?,
            reason: f.opt_string("reason")?,
        }),
        "call:end" => E::CallEnd(CallRef {
            call_id: f.string("callId")?,
        }),
        "call:ice_candidate" => E::CallIceCandidate(CallIce {
            call_id: f.string("callId")?,
            candidate: f.json("candidate")?,
        }),
        "notification:get_pending" => E::NotificationGetPending,
        "notification:read" => E::NotificationRead(NotificationIds {
            notification_ids: f.required_strings("notificationIds")?,
        }),
        "notification:clear" => E::NotificationClear(NotificationRef {
            notification_id: f.string("notificationId")?,
        }),
        "notification:clear_all" => E::NotificationClearAll,
        "moderation:kick_user" => E::ModerationKickUser(KickUser {
            user_id: f.string("userId")?,
            channel_id: f.opt_string("channelId")?,
            reason: f.opt_string("reason")?,
        }),
        "moderation:ban_user" => E::ModerationBanUser(BanUser {
            user_id: f.string("userId")?,
            channel_id: f.opt_string("channelId")?,
            duration_ms: f.opt_u64("durationMs")?,
            reason: f.opt_string("reason")?,
        }),
        // Another name, to a channel: the application's own event, if the
        // server allows the name.
        other => match f.present("channelId") {
            Some(_) => E::Custom(
                other.to_owned(),
                CustomSend {
                    channel_id: f.string("channelId")?,
                    data: match f.present("data") {
                        Some(_) => Some(f.json("data")?),
                        None => None,
                    },
                },
            ),
            None => E::Unsupported(other.to_owned()),
        },
    })
}

fn channel(f: &Fields<'_, '_>) -> Result<ChannelRef, DecodeError> {
    Ok(ChannelRef {
        channel_id: f.string("channelId")?,
    })
}

fn message(f: &Fields<'_, '_>) -> Result<MessageRef, DecodeError> {
    Ok(MessageRef {
        channel_id: f.string("channelId")?,
        message_id: f.string("messageId")?,
    })
}

fn users(f: &Fields<'_, '_>) -> Result<UserIds, DecodeError> {
    Ok(UserIds {
        user_ids: f.required_strings("userIds")?,
    })
}

fn kind(v: &Value<'_>) -> &'static str {
    match v {
        Value::Static(StaticNode::Null) => "null",
        Value::Static(StaticNode::Bool(_)) => "a boolean",
        Value::Static(StaticNode::I64(n)) if *n < 0 => "a negative number",
        Value::Static(StaticNode::F64(_)) => "a fractional number",
        Value::Static(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The fields of one JSON object of a client payload, read by name. `path`
/// (`d`, `d.since`, …) makes every error name the field it is about.
pub struct Fields<'o, 'v> {
    id: Option<u64>,
    path: Cow<'static, str>,
    obj: Option<&'o Object<'v>>,
}

/// One field's value, with its full name for errors.
pub struct Field<'o, 'v> {
    id: Option<u64>,
    name: String,
    value: &'o Value<'v>,
}

impl<'o, 'v> Field<'o, 'v> {
    fn wrong(&self, expected: &str) -> DecodeError {
        DecodeError::new(
            self.id,
            format!(
                "`{}` must be {expected}, not {}",
                self.name,
                kind(self.value)
            ),
        )
    }

    pub fn string_value(&self) -> Result<String, DecodeError> {
        match self.value {
            Value::String(s) => Ok(s.to_string()),
            _ => Err(self.wrong("a string")),
        }
    }

    pub fn u64_value(&self) -> Result<u64, DecodeError> {
        match self.value {
            Value::Static(StaticNode::U64(n)) => Ok(*n),
            Value::Static(StaticNode::I64(n)) if *n >= 0 => Ok(*n as u64),
            _ => Err(self.wrong("a non-negative integer")),
        }
    }

    pub fn as_fields(&self) -> Result<Fields<'o, 'v>, DecodeError> {
        match self.value {
            Value::Object(o) => Ok(Fields {
                id: self.id,
                path: Cow::Owned(self.name.clone()),
                obj: Some(o),
            }),
            _ => Err(self.wrong("an object")),
        }
    }

    fn is_null(&self) -> bool {
        matches!(self.value, Value::Static(StaticNode::Null))
    }
}

impl<'o, 'v> Fields<'o, 'v> {
    fn get(&self, name: &str) -> Option<Field<'o, 'v>> {
        let value = self.obj?.get(name)?;
        Some(Field {
            id: self.id,
            name: format!("{}.{name}", self.path),
            value,
        })
    }

    /// The field, when present and not null.
    fn present(&self, name: &str) -> Option<Field<'o, 'v>> {
        self.get(name).filter(|f| !f.is_null())
    }

    fn missing(&self, name: &str) -> DecodeError {
        DecodeError::new(self.id, format!("missing `{}.{name}`", self.path))
    }

    pub fn string(&self, name: &str) -> Result<String, DecodeError> {
        self.present(name)
            .ok_or_else(|| self.missing(name))?
            .string_value()
    }

    pub fn opt_string(&self, name: &str) -> Result<Option<String>, DecodeError> {
        self.present(name).map(|f| f.string_value()).transpose()
    }

    pub fn u64(&self, name: &str) -> Result<u64, DecodeError> {
        self.present(name)
            .ok_or_else(|| self.missing(name))?
            .u64_value()
    }

    pub fn opt_u64(&self, name: &str) -> Result<Option<u64>, DecodeError> {
        self.present(name).map(|f| f.u64_value()).transpose()
    }

    pub fn opt_u32(&self, name: &str) -> Result<Option<u32>, DecodeError> {
        match self.present(name) {
            None => Ok(None),
            Some(f) => match f.u64_value()? {
                n if n <= u32::MAX as u64 => Ok(Some(n as u32)),
                _ => Err(f.wrong("a number below 2^32")),
            },
        }
    }

    pub fn opt_bool(&self, name: &str) -> Result<Option<bool>, DecodeError> {
        match self.present(name) {
            None => Ok(None),
            Some(f) => match f.value {
                Value::Static(StaticNode::Bool(b)) => Ok(Some(*b)),
                _ => Err(f.wrong("a boolean")),
            },
        }
    }

    /// An optional string naming one of a fixed set of values.
    pub fn opt_enum<T: Copy>(
        &self,
        name: &str,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Result<Option<T>, DecodeError> {
        let Some(f) = self.present(name) else {
            return Ok(None);
        };
        let s = f.string_value()?;
        parse(&s)
            .map(Some)
            .ok_or_else(|| DecodeError::new(self.id, format!("`{}` cannot be `{s}`", f.name)))
    }

    /// A field that may be absent (keep), null (clear) or set.
    pub fn patch<T>(
        &self,
        name: &str,
        read: impl Fn(&Field<'o, 'v>) -> Result<T, DecodeError>,
    ) -> Result<Option<Option<T>>, DecodeError> {
        match self.get(name) {
            None => Ok(None),
            Some(f) if f.is_null() => Ok(Some(None)),
            Some(f) => read(&f).map(|v| Some(Some(v))),
        }
    }

    pub fn opt_object(&self, name: &str) -> Result<Option<Fields<'o, 'v>>, DecodeError> {
        self.present(name).map(|f| f.as_fields()).transpose()
    }

    fn list(&self, name: &str) -> Result<Option<(Field<'o, 'v>, &'o [Value<'v>])>, DecodeError> {
        let Some(f) = self.present(name) else {
            return Ok(None);
        };
        let Value::Array(items) = f.value else {
            return Err(f.wrong("an array"));
        };
        if items.len() > MAX_LIST {
            return Err(DecodeError::too_large(
                self.id,
                format!("`{}` has more than {MAX_LIST} entries", f.name),
            ));
        }
        Ok(Some((f, items.as_slice())))
    }

    /// An optional array of strings (absent: empty).
    pub fn strings(&self, name: &str) -> Result<Vec<String>, DecodeError> {
        let Some((f, items)) = self.list(name)? else {
            return Ok(Vec::new());
        };
        items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.to_string()),
                _ => Err(f.wrong("an array of strings")),
            })
            .collect()
    }

    /// A required array of strings.
    pub fn required_strings(&self, name: &str) -> Result<Vec<String>, DecodeError> {
        if self.present(name).is_none() {
            return Err(self.missing(name));
        }
        self.strings(name)
    }

    /// An optional array of objects (absent: empty).
    pub fn objects(&self, name: &str) -> Result<Vec<Fields<'o, 'v>>, DecodeError> {
        let Some((f, items)) = self.list(name)? else {
            return Ok(Vec::new());
        };
        items
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::Object(o) => Ok(Fields {
                    id: self.id,
                    path: Cow::Owned(format!("{}[{i}]", f.name)),
                    obj: Some(o),
                }),
                _ => Err(f.wrong("an array of objects")),
            })
            .collect()
    }

    /// Any JSON value, kept as its text (relayed as is).
    pub fn json(&self, name: &str) -> Result<Json, DecodeError> {
        let f = self.present(name).ok_or_else(|| self.missing(name))?;
        // Written with its keys sorted: the parser's objects past 32 keys
        // iterate in hash order, and the same input should be relayed the
        // same way every time.
        let canonical = serde_json::to_value(f.value)
            .map(|v| v.to_string())
            .unwrap_or_else(|_| f.value.encode());
        Ok(Json(canonical))
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
    out.extend_from_slice(b"{\"t\":");
    serde_json::to_writer(&mut *out, msg.event.name()).expect("writing to a Vec cannot fail");
    if let Some(id) = msg.id {
        out.extend_from_slice(b",\"id\":");
        std::io::Write::write_fmt(out, format_args!("{id}")).expect("writing to a Vec cannot fail");
    }
    out.extend_from_slice(b",\"d\":");
    write_server_body(msg, out);
    out.push(b'}');
}

/// Appends the JSON of a server message's payload (the envelope's `d`)
/// to `out`; the Socket.IO encoding wraps the same text.
pub fn write_server_body(msg: &ServerMessage, out: &mut Vec<u8>) {
    fn w<T: Serialize>(d: &T, out: &mut Vec<u8>) {
        serde_json::to_writer(out, d).expect("writing to a Vec cannot fail");
    }
    use ServerEvent::*;
    match &msg.event {
        Ready(d) => w(d, out),
        Ack(d) => w(d, out),
        Error(d) => w(d, out),
        HeartbeatAck(d) => w(d, out),
        MemberJoined(d) | MemberLeft(d) => w(d, out),
        MessageNew(d) => w(d, out),
        MessageEdited(d) => w(d, out),
        MessageDeleted(d) => w(d, out),
        MessageReaction(d) => w(d, out),
        MessageDelivery(d) => w(d, out),
        MessageReadReceipt(d) => w(d, out),
        DmNew(d) | DmSent(d) => w(d, out),
        PresenceChanged(d) => w(d, out),
        TypingUserStart(d) | TypingUserStop(d) => w(d, out),
        VoiceUserJoined(d) | VoiceUserLeft(d) | VoiceStateUpdate(d) => w(d, out),
        CallIncoming(d) => w(d, out),
        CallAnswered(d) | CallRejected(d) | CallEnded(d) | CallMissed(d) => w(d, out),
        CallIceCandidate(d) => w(d, out),
        NotificationNew(d) => w(d, out),
        ModerationKicked(d)
        | ModerationBanned(d)
        | ModerationUserKicked(d)
        | ModerationUserBanned(d) => w(d, out),
        AuthExpiring(d) => w(d, out),
        ChannelJoined(d) => w(d, out),
        ChannelLeft(d) => w(d, out),
        Custom(_, d) => w(d, out),
    }
}

/// Appends the JSON encoding of a client message to `out` (client side).
pub fn encode_client(msg: &ClientMessage, out: &mut Vec<u8>) {
    use ClientEvent::*;
    let (name, id) = (msg.event.name(), msg.id);
    match &msg.event {
        Heartbeat
        | PresenceHeartbeat
        | VoiceLeave
        | NotificationGetPending
        | NotificationClearAll
        | Unsupported(_) => write_envelope::<Empty>(name, id, None, out),
        Auth(d) | AuthRefresh(d) => write_envelope(name, id, Some(d), out),
        Rpc(d) => write_envelope(name, id, Some(d), out),
        Custom(_, d) => write_envelope(name, id, Some(d), out),
        SessionResume(d) => write_envelope(name, id, Some(d), out),
        ChannelJoin(d) => write_envelope(name, id, Some(d), out),
        ChannelLeave(d)
        | ChannelGetMembers(d)
        | TypingStart(d)
        | TypingStop(d)
        | TypingGetActive(d)
        | VoiceJoin(d)
        | VoiceGetParticipants(d) => write_envelope(name, id, Some(d), out),
        ChannelGetHistory(d) => write_envelope(name, id, Some(d), out),
        MessageSend(d) => write_envelope(name, id, Some(d), out),
        MessageEdit(d) => write_envelope(name, id, Some(d), out),
        MessageDelete(d) | MessageDelivered(d) | MessageMarkRead(d) | MessageGetReadReceipts(d) => {
            write_envelope(name, id, Some(d), out)
        }
        MessageReact(d) => write_envelope(name, id, Some(d), out),
        DmSend(d) => write_envelope(name, id, Some(d), out),
        DmGetConversations(d) => write_envelope(name, id, Some(d), out),
        PresenceUpdate(d) => write_envelope(name, id, Some(d), out),
        PresenceSubscribe(d) | PresenceUnsubscribe(d) | PresenceGetBulk(d) => {
            write_envelope(name, id, Some(d), out)
        }
        VoiceUpdate(d) => write_envelope(name, id, Some(d), out),
        CallInitiate(d) => write_envelope(name, id, Some(d), out),
        CallAnswer(d) => write_envelope(name, id, Some(d), out),
        CallReject(d) => write_envelope(name, id, Some(d), out),
        CallEnd(d) => write_envelope(name, id, Some(d), out),
        CallIceCandidate(d) => write_envelope(name, id, Some(d), out),
        NotificationRead(d) => write_envelope(name, id, Some(d), out),
        NotificationClear(d) => write_envelope(name, id, Some(d), out),
        ModerationKickUser(d) => write_envelope(name, id, Some(d), out),
        ModerationBanUser(d) => write_envelope(name, id, Some(d), out),
    }
}

/// Parses a server envelope (client side; not on the server's hot path).
pub fn decode_server(buf: &[u8]) -> Result<ServerMessage, DecodeError> {
    #[derive(serde::Deserialize)]
    struct Raw<'a> {
        t: String,
        id: Option<u64>,
        #[serde(borrow, default)]
        d: Option<&'a serde_json::value::RawValue>,
    }
    let raw: Raw =
        serde_json::from_slice(buf).map_err(|e| DecodeError::new(None, e.to_string()))?;
    // From the raw text, not a `Value`: opaque fields keep their JSON.
    fn d<T: DeserializeOwned>(raw: &Raw) -> Result<T, DecodeError> {
        serde_json::from_str(raw.d.map_or("null", |d| d.get()))
            .map_err(|e| DecodeError::new(raw.id, format!("{}: {e}", raw.t)))
    }
    use ServerEvent as S;
    let event = match raw.t.as_str() {
        "ready" => S::Ready(d(&raw)?),
        "ack" => S::Ack(d(&raw)?),
        "error" => S::Error(d(&raw)?),
        "heartbeat:ack" => S::HeartbeatAck(d(&raw)?),
        "channel:member_joined" => S::MemberJoined(d(&raw)?),
        "channel:member_left" => S::MemberLeft(d(&raw)?),
        "message:new" => S::MessageNew(d(&raw)?),
        "message:edited" => S::MessageEdited(d(&raw)?),
        "message:deleted" => S::MessageDeleted(d(&raw)?),
        "message:reaction" => S::MessageReaction(d(&raw)?),
        "message:delivery" => S::MessageDelivery(d(&raw)?),
        "message:read_receipt" => S::MessageReadReceipt(d(&raw)?),
        "dm:new" => S::DmNew(d(&raw)?),
        "dm:sent" => S::DmSent(d(&raw)?),
        "presence:changed" => S::PresenceChanged(d(&raw)?),
        "typing:user_start" => S::TypingUserStart(d(&raw)?),
        "typing:user_stop" => S::TypingUserStop(d(&raw)?),
        "voice:user_joined" => S::VoiceUserJoined(d(&raw)?),
        "voice:user_left" => S::VoiceUserLeft(d(&raw)?),
        "voice:state_update" => S::VoiceStateUpdate(d(&raw)?),
        "call:incoming" => S::CallIncoming(d(&raw)?),
        "call:answered" => S::CallAnswered(d(&raw)?),
        "call:rejected" => S::CallRejected(d(&raw)?),
        "call:ended" => S::CallEnded(d(&raw)?),
        "call:missed" => S::CallMissed(d(&raw)?),
        "call:ice_candidate" => S::CallIceCandidate(d(&raw)?),
        "notification:new" => S::NotificationNew(d(&raw)?),
        "moderation:kicked" => S::ModerationKicked(d(&raw)?),
        "moderation:banned" => S::ModerationBanned(d(&raw)?),
        "moderation:user_kicked" => S::ModerationUserKicked(d(&raw)?),
        "moderation:user_banned" => S::ModerationUserBanned(d(&raw)?),
        "auth:expiring" => S::AuthExpiring(d(&raw)?),
        "channel:joined" => S::ChannelJoined(d(&raw)?),
        "channel:left" => S::ChannelLeft(d(&raw)?),
        // Any other name is an application's own event.
        other => S::Custom(other.to_owned(), d(&raw)?),
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
    fn an_opaque_value_is_written_the_same_way_every_time() {
        // Past 32 keys the parser's objects iterate in hash order: the
        // candidate is written with sorted keys, so the same input is
        // relayed the same way (found by fuzzing json_envelope).
        let keys: Vec<String> = (0..40).map(|i| format!("\"k{i:02}\":{i}")).collect();
        let mut reversed = keys.clone();
        reversed.reverse();
        let text = format!(
            r#"{{"t":"call:ice_candidate","d":{{"callId":"c1","candidate":{{{}}}}}}}"#,
            reversed.join(",")
        );
        let candidate = |m: ClientMessage| match m.event {
            ClientEvent::CallIceCandidate(c) => c.candidate.0,
            other => panic!("{other:?}"),
        };
        let first = candidate(decode(&text).unwrap());
        assert_eq!(first, format!("{{{}}}", keys.join(",")));
        for _ in 0..5 {
            assert_eq!(candidate(decode(&text).unwrap()), first);
        }
    }

    #[test]
    fn decodes_send() {
        let m = decode(r#"{"t":"message:send","id":7,"d":{"channelId":"general","content":"hi","replyTo":"m1","mentions":["bob","eve"],"nonce":"n-1"}}"#).unwrap();
        assert_eq!(
            m,
            ClientMessage {
                id: Some(7),
                event: ClientEvent::MessageSend(MessageSend {
                    channel_id: "general".into(),
                    content: "hi".into(),
                    reply_to: Some("m1".into()),
                    thread_id: None,
                    mentions: vec!["bob".into(), "eve".into()],
                    nonce: Some("n-1".into()),
                })
            }
        );
    }

    #[test]
    fn errors_name_the_problem_and_keep_the_id() {
        let e = decode(r#"{"t":"channel:join","id":3,"d":{}}"#).unwrap_err();
        assert_eq!(e.id, Some(3));
        assert_eq!(e.message, "missing `d.channelId`");
        assert!(decode("{nope")
            .unwrap_err()
            .message
            .contains("invalid JSON"));
        assert!(decode("[1]").unwrap_err().message.contains("object"));
        assert!(decode(r#"{"id":-1,"t":"x"}"#)
            .unwrap_err()
            .message
            .contains("`id`"));
        assert!(decode(r#"{"id":1}"#).unwrap_err().message.contains("`t`"));
        let e = decode(r#"{"t":"channel:join","id":4,"d":{"channelId":5}}"#).unwrap_err();
        assert_eq!(e.id, Some(4));
        assert_eq!(e.message, "`d.channelId` must be a string, not a number");
        let e = decode(r#"{"t":"channel:join","id":5,"d":{"channelId":"a","since":{"offset":"x","epoch":"e"}}}"#)
            .unwrap_err();
        assert_eq!(
            e.message,
            "`d.since.offset` must be a non-negative integer, not a string"
        );
        let e = decode(
            r#"{"t":"message:send","d":{"channelId":"a","content":"b","mentions":["x",1]}}"#,
        )
        .unwrap_err();
        assert_eq!(
            e.message,
            "`d.mentions` must be an array of strings, not an array"
        );
        let e = decode(r#"{"t":"presence:update","d":{"status":"asleep"}}"#).unwrap_err();
        assert_eq!(e.message, "`d.status` cannot be `asleep`");
        let e = decode(r#"{"t":"session:resume","d":{"sessionId":"s","positions":[{"channelId":"a","offset":1}]}}"#)
            .unwrap_err();
        assert_eq!(e.message, "missing `d.positions[0].epoch`");
        let many = format!(
            r#"{{"t":"presence:get_bulk","d":{{"userIds":[{}]}}}}"#,
            vec!["\"u\""; MAX_LIST + 1].join(",")
        );
        assert!(decode(&many)
            .unwrap_err()
            .message
            .contains("more than 1000"));
        let e = decode(r#"{"t":"channel:join","d":[1]}"#).unwrap_err();
        assert_eq!(e.message, "`d` must be an object, not an array");
    }

    #[test]
    fn patches_tell_absent_from_null() {
        let m = decode(r#"{"t":"presence:update","d":{"status":"idle","customStatus":null,"activity":{"type":"playing","name":"Chess"}}}"#).unwrap();
        let ClientEvent::PresenceUpdate(p) = m.event else {
            panic!()
        };
        assert_eq!(p.status, Some(Status::Idle));
        assert_eq!(p.custom_status, Some(None));
        assert_eq!(
            p.activity,
            Some(Some(Activity {
                kind: "playing".into(),
                name: "Chess".into(),
                details: None
            }))
        );
        assert_eq!(p.device, None);
        let m = decode(r#"{"t":"presence:update","d":{}}"#).unwrap();
        let ClientEvent::PresenceUpdate(p) = m.event else {
            panic!()
        };
        assert_eq!((p.custom_status, p.activity), (None, None));
    }

    #[test]
    fn opaque_json_is_kept_as_text() {
        let m = decode(r#"{"t":"call:ice_candidate","d":{"callId":"c1","candidate":{"candidate":"candidate:1 1 UDP 2 10.0.0.1 5000 typ host","sdpMLineIndex":0}}}"#).unwrap();
        let ClientEvent::CallIceCandidate(c) = m.event else {
            panic!()
        };
        let v: serde_json::Value = serde_json::from_str(&c.candidate.0).unwrap();
        assert_eq!(v["sdpMLineIndex"], 0);
        let mut out = vec![];
        encode_server(
            &ServerMessage::event(ServerEvent::CallIceCandidate(CallIceRelay {
                call_id: "c1".into(),
                from_user_id: "a".into(),
                candidate: c.candidate,
            })),
            &mut out,
        );
        let back: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            back["d"]["candidate"]["sdpMLineIndex"], 0,
            "relayed as JSON, not a string"
        );
    }

    #[test]
    fn unknown_event_is_unsupported() {
        let m = decode(r#"{"t":"dance","id":1}"#).unwrap();
        assert_eq!(m.event, ClientEvent::Unsupported("dance".into()));
    }

    #[test]
    fn an_unknown_event_to_a_channel_is_the_applications_own() {
        let m = decode(r#"{"t":"game:move","id":1,"d":{"channelId":"g","data":{"y":2,"x":[1]}}}"#)
            .unwrap();
        assert_eq!(
            m.event,
            ClientEvent::Custom(
                "game:move".into(),
                CustomSend {
                    channel_id: "g".into(),
                    data: Some(Json(r#"{"x":[1],"y":2}"#.into())),
                }
            )
        );
        assert_eq!(m.event.name(), "game:move");
        let bare = decode(r#"{"t":"ping:all","d":{"channelId":"g"}}"#).unwrap();
        assert!(matches!(
            bare.event,
            ClientEvent::Custom(_, CustomSend { data: None, .. })
        ));
        assert!(decode(r#"{"t":"game:move","d":{"channelId":5}}"#).is_err());
        // Its recipients' form reads back, under its own name.
        let e = ServerMessage::event(ServerEvent::Custom(
            "game:move".into(),
            CustomEvent {
                channel_id: Some("g".into()),
                user_id: Some("alice".into()),
                data: Some(Json("[1,2]".into())),
            },
        ));
        let mut out = vec![];
        encode_server(&e, &mut out);
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"t":"game:move","d":{"channelId":"g","userId":"alice","data":[1,2]}}"#
        );
        assert_eq!(decode_server(&out).unwrap(), e);
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
