//! The application's own events: names the `custom_events` patterns allow
//! (e.g. `game:*`) pass through to the channel they name, to every member
//! (the sender's devices included), without being sequenced or kept. They
//! are charged to a rate limit of their own (`custom`), bounded by
//! `max_custom_event_bytes`, and encoded once per protocol in use like any
//! channel event. The server API sends them too (`POST /api/emit`), to a
//! channel or to a user's devices.
//!
//! Handlers are named after their event: `on_<event>` on the member's
//! connection's shard (checks, then the request goes on), and after the
//! event again on the shard that carries it out.

use std::sync::Arc;

use super::*;

/// Longest name of an application's event.
pub const MAX_CUSTOM_NAME: usize = 64;

/// Whether `name` may name an application's event: 1 to 64 printable
/// ASCII characters, not one of the server's own events.
pub fn check_custom_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_CUSTOM_NAME {
        return Err(format!(
            "an event name is 1 to {MAX_CUSTOM_NAME} characters"
        ));
    }
    if !name.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "event `{name}`: printable ASCII without spaces only"
        ));
    }
    if CLIENT_EVENT_NAMES.contains(&name) || SERVER_EVENT_NAMES.contains(&name) {
        return Err(format!("`{name}` is one of the server's own events"));
    }
    Ok(())
}

impl<O: Outbound> Engine<O> {
    /// An event name the server does not implement, to a channel: passed
    /// to the channel's owner when the patterns allow it.
    pub(super) fn on_custom(
        &mut self,
        id: ConnId,
        ack: Option<u64>,
        name: String,
        c: CustomSend,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let allowed = self
            .s
            .custom_events
            .as_ref()
            .is_some_and(|p| p.matches(&name));
        if !allowed || check_custom_name(&name).is_err() {
            let why = format!("unsupported event `{name}`");
            return self.error(id, ack, ErrorCode::Unsupported, why);
        }
        let max = self.s.max_custom_event_bytes;
        if c.data.as_ref().is_some_and(|d| d.0.len() > max) {
            let why = format!("`data` is larger than {max} bytes of JSON");
            return self.error(id, ack, ErrorCode::TooLarge, why);
        }
        let op = ChanCmd::Custom { name, data: c.data };
        self.channel_op(id, ack, &c.channel_id, op, now, tx)
    }

    /// An application's event, on the channel's owner: to every member,
    /// on every node.
    pub(super) fn custom_event(
        &mut self,
        req: ChanReq,
        name: String,
        data: Option<Json>,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let (channel, from, member, ack) = req.parts();
        let reply = Reply::to(from, member.protocol, ack);
        let event = CustomEvent {
            channel_id: Some(channel.to_string()),
            user_id: Some(member.user.to_string()),
            data,
        };
        let msg = ev(ServerEvent::Custom(name, event));
        self.fan_out(&channel, &msg, None, now, tx);
        self.send_reply(reply, empty_ack(ack), now, tx);
    }
}

impl<O: Outbound> Engine<O> {
    /// `POST /api/emit`, on the channel's owner or the user's home: the
    /// event to every member of the channel, or to every device of the
    /// user, on every node.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn api_emit(
        &mut self,
        from: ConnRef,
        ack: Option<u64>,
        name: String,
        to: EmitTo,
        data: Option<Json>,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        // The backend's events are bounded as its notifications are.
        let max = super::api::MAX_NOTIFICATION_DATA;
        let checked = check_custom_name(&name)
            .map_err(|e| (ErrorCode::BadRequest, e))
            .and_then(|_| match &data {
                Some(d) if d.0.len() > max => Err((
                    ErrorCode::TooLarge,
                    format!("`data` is larger than {max} bytes of JSON"),
                )),
                _ => Ok(()),
            })
            .and_then(|_| match &to {
                EmitTo::Channel(c) => self
                    .check_channel_id(c)
                    .map_err(|e| (ErrorCode::BadRequest, e)),
                EmitTo::User(u) => check_id("userId", u).map_err(|e| (ErrorCode::BadRequest, e)),
            });
        if let Err((code, why)) = checked {
            return self.send_to(from, Protocol::Json, &err(ack, code, why), now, tx);
        }
        match to {
            EmitTo::Channel(c) => {
                let channel: Arc<str> = c.as_str().into();
                let event = CustomEvent {
                    channel_id: Some(c),
                    user_id: None,
                    data,
                };
                // Owned for the moment it takes: in a cluster, the other
                // nodes' members hear it through Redis.
                self.ensure_owned(&channel, now, tx);
                self.fan_out(
                    &channel,
                    &ev(ServerEvent::Custom(name, event)),
                    None,
                    now,
                    tx,
                );
                self.channel_gc(&channel, now, tx);
            }
            EmitTo::User(u) => {
                let user: Arc<str> = u.as_str().into();
                let event = ServerEvent::Custom(
                    name,
                    CustomEvent {
                        channel_id: None,
                        user_id: None,
                        data,
                    },
                );
                self.tell_other_nodes(&user, event.clone(), now, tx);
                self.send_devices(&user, event, None, now, tx);
            }
        }
        let done = ack_of(ack, AckBody::Empty(Empty {}));
        self.send_to(from, Protocol::Json, &done, now, tx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_custom_name("game:move").is_ok());
        assert!(check_custom_name("").is_err());
        assert!(check_custom_name("with space").is_err());
        assert!(check_custom_name(&"x".repeat(65)).is_err());
        assert!(check_custom_name("message:new").is_err());
        assert!(check_custom_name("message:send").is_err());
    }
}
