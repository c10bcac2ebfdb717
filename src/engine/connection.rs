//! A connection's shard: the routing table of client events (each event's
//! handler, named after it, is in its feature's file), the checks every
//! event shares, and how a request reaches the owner or home shard it
//! concerns.

use std::sync::Arc;

use super::*;

impl<O: Outbound> Engine<O> {
    pub(super) fn check_channel_id(&self, channel: &str) -> Result<(), String> {
        if channel.is_empty() || channel.len() > self.s.max_channel_id_bytes {
            return Err(format!(
                "`channelId` must be 1 to {} bytes",
                self.s.max_channel_id_bytes
            ));
        }
        if !channel.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("`channelId` must be printable ASCII without spaces".into());
        }
        Ok(())
    }

    pub(super) fn check_content(
        &self,
        field: &str,
        content: &str,
    ) -> Result<(), (ErrorCode, String)> {
        let max = self.s.max_content_chars;
        if content.len() > max && content.chars().count() > max {
            return Err((
                ErrorCode::TooLarge,
                format!("`{field}` is longer than {max} characters"),
            ));
        }
        Ok(())
    }

    /// The channel, when this connection has joined it.
    pub(super) fn joined(&self, id: ConnId, channel: &str) -> Option<Arc<str>> {
        self.conn(id)?
            .channels()
            .iter()
            .find(|(c, s)| **c == *channel && *s == JoinState::Joined)
            .map(|(c, _)| c.clone())
    }

    /// Whether a connection may join a channel: granted by its token, or
    /// by a subscription token for this user and channel.
    pub(super) fn may_join(
        &self,
        id: ConnId,
        channel: &str,
        token: Option<&str>,
    ) -> Result<(), String> {
        let Some(conn) = self.conn(id) else {
            return Err("connection gone".into());
        };
        if conn.granted(channel) {
            return Ok(());
        }
        match (token, &self.subscriptions) {
            (None, _) => Err(format!(
                "channel `{channel}` is not granted to this connection (its token's `channels` claim does not cover it; pass a subscription token in `token`)"
            )),
            (Some(_), None) => Err("subscription tokens are not accepted here".into()),
            (Some(t), Some(check)) => check(t, &conn.member.user, channel),
        }
    }

    /// Whether a connection may see or enter a channel's voice room: a
    /// valid id, and it is granted the channel or has joined it.
    pub(super) fn check_voice(&self, id: ConnId, channel: &str) -> Result<(), (ErrorCode, String)> {
        self.check_channel_id(channel)
            .map_err(|e| (ErrorCode::BadRequest, e))?;
        if self.conn(id).is_some_and(|c| c.granted(channel)) || self.joined(id, channel).is_some() {
            return Ok(());
        }
        Err((
            ErrorCode::Forbidden,
            format!("channel `{channel}` is not granted to this connection"),
        ))
    }

    /// Whether a connection may send to a user (a direct message, a call):
    /// a valid id, within its token's `users` claim.
    pub(super) fn check_user_target(
        &self,
        id: ConnId,
        field: &str,
        user: &str,
    ) -> Result<(), (ErrorCode, String)> {
        check_id(field, user).map_err(|e| (ErrorCode::BadRequest, e))?;
        if self.conn(id).is_some_and(|c| c.may_reach_user(user)) {
            return Ok(());
        }
        Err((
            ErrorCode::Forbidden,
            format!("user `{user}` is not granted to this connection"),
        ))
    }

    /// Handles a frame's payload from a local, authenticated connection
    /// (`text`: a text frame). The event is charged to its rate-limit
    /// bucket as soon as it is named: for JSON, once the envelope's `t` is
    /// read and before its payload is; an archive of the binary protocol
    /// is validated whole first. Input that does not decode costs a token
    /// (from the default bucket when no event can be named) and a strike.
    pub fn handle_frame(
        &mut self,
        id: ConnId,
        text: bool,
        payload: &mut [u8],
        scratch: &mut crate::protocol::json::Scratch,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        use crate::protocol::{binary, json, socketio, DecodeError};
        let Some(protocol) = self.conn(id).map(|c| c.member.protocol) else {
            return;
        };
        let envelope = match (protocol, text) {
            (Protocol::Json, true) => json::envelope(payload, scratch),
            // A Socket.IO packet (the shell has read its Engine.IO type).
            (Protocol::SocketIo | Protocol::SocketIoMsgpack, true) => {
                socketio::envelope(payload, scratch)
            }
            (Protocol::Binary, false) => {
                return match binary::decode_client(payload) {
                    Ok(m) => self.handle(id, m, now, tx),
                    Err(e) => self.malformed(id, e, now, tx),
                }
            }
            (p, _) => return self.malformed(id, DecodeError::wrong_frame(p), now, tx),
        };
        match envelope {
            Err(e) => self.malformed(id, e, now, tx),
            Ok(env)
                if self.charge(
                    id,
                    self.bucket_of(env.bucket(), env.name()),
                    env.id,
                    now,
                    tx,
                ) =>
            {
                match env.decode() {
                    Ok(m) => self.handle_charged(id, m, now, tx),
                    Err(e) => self.malformed_charged(id, e, now, tx),
                }
            }
            Ok(_) => {}
        }
    }

    /// Handles a decoded message from a local, authenticated connection:
    /// charges its rate-limit bucket, then [`Engine::handle_charged`].
    pub fn handle(&mut self, id: ConnId, msg: ClientMessage, now: u64, tx: &mut impl MeshTx) {
        let bucket = self.bucket_of(msg.event.index(), msg.event.name());
        if self.charge(id, bucket, msg.id, now, tx) {
            self.handle_charged(id, msg, now, tx)
        }
    }

    /// The rate-limit bucket of an event: its own, or, for a name the
    /// server does not know that `custom_events` allows, the
    /// application's (`custom`).
    fn bucket_of(&self, bucket: usize, name: &str) -> usize {
        let custom = bucket == limits::DEFAULT
            && self
                .s
                .custom_events
                .as_ref()
                .is_some_and(|p| p.matches(name));
        if custom {
            limits::CUSTOM
        } else {
            bucket
        }
    }

    /// Handles a message whose bucket [`Engine::charge`] took a token from
    /// (the shell charges a JSON envelope as soon as it has read `t`):
    /// checks its lists and ids, then carries it out.
    pub fn handle_charged(
        &mut self,
        id: ConnId,
        msg: ClientMessage,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        if let Err((code, message)) = check_event(&msg.event) {
            let e = crate::protocol::DecodeError {
                id: msg.id,
                code,
                message,
                event: Some(msg.event.index()),
            };
            return self.malformed_charged(id, e, now, tx);
        }
        self.rate_accepted(id);
        self.handle_checked(id, msg, now, tx)
    }

    /// Handles a message whose lists and ids are within bounds.
    /// `heartbeat`: answered at once, with the time.
    fn on_heartbeat(&mut self, id: ConnId, ack: Option<u64>, now: u64) {
        let msg = ServerMessage {
            id: ack,
            event: ServerEvent::HeartbeatAck(HeartbeatAck { timestamp: now }),
        };
        self.reply(id, &msg);
    }

    /// Each event has its handler, named after it, in its feature's file.
    pub(super) fn handle_checked(
        &mut self,
        id: ConnId,
        msg: ClientMessage,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        if self.conn(id).is_none() {
            return;
        }
        // Behind a question to the backend: later, in order.
        let Some(msg) = self.hold(id, msg, now, tx) else {
            return;
        };
        let ack = msg.id;
        use ClientEvent as E;
        match msg.event {
            E::Heartbeat => self.on_heartbeat(id, ack, now),
            E::Auth(_) => self.error(id, ack, ErrorCode::BadRequest, "already authenticated"),
            E::AuthRefresh(a) => self.on_auth_refresh(id, ack, &a.token, now),
            E::Rpc(call) => self.on_rpc(id, ack, call, tx),
            E::SessionResume(r) => self.on_session_resume(id, ack, r, now, tx),
            E::ChannelJoin(j) => {
                self.on_channel_join(id, ack, j, None, now, tx);
            }
            E::ChannelLeave(c) => self.on_channel_leave(id, ack, &c.channel_id, now, tx),
            E::MessageSend(m) => self.on_message_send(id, ack, m, now, tx),
            E::MessageEdit(m) => self.on_message_edit(id, ack, m, now, tx),
            E::MessageDelete(m) => self.on_message_delete(id, ack, m, now, tx),
            E::MessageReact(r) => self.on_message_react(id, ack, r, now, tx),
            E::MessageDelivered(m) => self.on_message_delivered(id, ack, m, now, tx),
            E::MessageMarkRead(m) => self.on_message_mark_read(id, ack, m, now, tx),
            E::MessageGetReadReceipts(m) => self.on_message_get_read_receipts(id, ack, m, now, tx),
            E::ChannelGetHistory(h) => self.on_channel_get_history(id, ack, h, now, tx),
            E::ChannelGetMembers(c) => self.on_channel_get_members(id, ack, c, now, tx),
            E::TypingStart(c) => self.on_typing_start(id, ack, c, now, tx),
            E::TypingStop(c) => self.on_typing_stop(id, ack, c, now, tx),
            E::TypingGetActive(c) => self.on_typing_get_active(id, ack, c, now, tx),
            E::DmSend(d) => self.on_dm_send(id, ack, d, now, tx),
            E::DmGetConversations(l) => self.on_dm_get_conversations(id, ack, l, now, tx),
            E::PresenceUpdate(p) => self.on_presence_update(id, ack, p, now, tx),
            E::PresenceHeartbeat => self.on_presence_heartbeat(id, ack, now, tx),
            E::PresenceSubscribe(u) => self.on_presence_subscribe(id, ack, u, now, tx),
            E::PresenceGetBulk(u) => self.on_presence_get_bulk(id, ack, u, now, tx),
            E::PresenceUnsubscribe(u) => self.on_presence_unsubscribe(id, ack, u, now, tx),
            E::VoiceJoin(c) => self.on_voice_join(id, ack, c, now, tx),
            E::VoiceLeave => self.on_voice_leave(id, ack, now, tx),
            E::VoiceUpdate(u) => self.on_voice_update(id, ack, u, now, tx),
            E::VoiceGetParticipants(c) => self.on_voice_get_participants(id, ack, c, now, tx),
            E::CallInitiate(c) => self.on_call_initiate(id, ack, c, now, tx),
            E::CallAnswer(c) => self.on_call_answer(id, ack, c, now, tx),
            E::CallReject(c) => self.on_call_reject(id, ack, c, now, tx),
            E::CallEnd(c) => self.on_call_end(id, ack, c, now, tx),
            E::CallIceCandidate(c) => self.on_call_ice_candidate(id, ack, c, now, tx),
            E::NotificationGetPending => self.on_notification_get_pending(id, ack, now, tx),
            E::NotificationRead(n) => self.on_notification_read(id, ack, n, now, tx),
            E::NotificationClear(n) => self.on_notification_clear(id, ack, n, now, tx),
            E::NotificationClearAll => self.on_notification_clear_all(id, ack, now, tx),
            E::ModerationKickUser(k) => self.on_moderation_kick_user(id, ack, k, now, tx),
            E::ModerationBanUser(b) => self.on_moderation_ban_user(id, ack, b, now, tx),
            E::Custom(name, c) => self.on_custom(id, ack, name, c, now, tx),
            other @ E::Unsupported(_) => self.error(
                id,
                ack,
                ErrorCode::Unsupported,
                format!("unsupported event `{}`", other.name()),
            ),
        }
    }

    /// Passes a request of connection `id` to its user's home shard, which
    /// answers the connection.
    pub(super) fn ask_home(
        &mut self,
        id: ConnId,
        ack: Option<u64>,
        cmd: UserCmd,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let Some(member) = self.conn(id).map(|c| c.member.clone()) else {
            return;
        };
        let from = Some((self.here(id), member.protocol));
        self.send_user_op(member.user, from, ack, cmd, now, tx)
    }

    pub(super) fn send_user_op(
        &mut self,
        user: Arc<str>,
        from: Option<(ConnRef, Protocol)>,
        ack: Option<u64>,
        op: UserCmd,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let home = home_of(&user, self.shards);
        let msg = MeshMsg::UserOp(Box::new(UserOp {
            user,
            from,
            ack,
            op,
        }));
        self.route(home, msg, now, tx);
    }

    /// Passes a member's operation to the channel's owner, once this
    /// connection is known to be in the channel.
    pub(super) fn channel_op(
        &mut self,
        id: ConnId,
        ack: Option<u64>,
        channel_id: &str,
        op: ChanCmd,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let Some(channel) = self.joined(id, channel_id) else {
            return self.error(
                id,
                ack,
                ErrorCode::Forbidden,
                format!("join `{channel_id}` first"),
            );
        };
        let Some(member) = self.conn(id).map(|c| c.member.clone()) else {
            return;
        };
        let owner = owner_of(&channel, self.shards);
        let op = ChannelOp {
            channel,
            from: self.here(id),
            member,
            ack,
            op,
        };
        self.route(owner, MeshMsg::ChannelOp(Box::new(op)), now, tx);
    }

    pub(super) fn call_op(
        &mut self,
        id: ConnId,
        ack: Option<u64>,
        call_id: &str,
        op: CallCmd,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let Some(member) = self.conn(id).map(|c| c.member.clone()) else {
            return;
        };
        // The call's shard, or in a cluster (a call held by a node with
        // more shards) the user's home, which knows the node.
        let target = parse_call_id(call_id).and_then(|call| match call >> 48 {
            s if s < self.shards as u64 => Some((call, s as ShardId)),
            _ if self.cluster.is_some() => Some((call, home_of(&member.user, self.shards))),
            _ => None,
        });
        let Some((call, target)) = target else {
            return self.error(id, ack, ErrorCode::NotFound, format!("no call `{call_id}`"));
        };
        let msg = CallOp {
            call,
            user: member.user,
            from: Some((self.here(id), member.protocol)),
            ack,
            op,
        };
        self.route(target, MeshMsg::CallOp(Box::new(msg)), now, tx);
    }
}

/// Bounds on what any client event carries, whichever protocol decoded it
/// (the JSON decoder bounds lists itself; a binary archive is only bounded
/// by the message size): list lengths, and ids not checked where they are
/// used.
pub(super) fn check_event(event: &ClientEvent) -> Result<(), (ErrorCode, String)> {
    use crate::protocol::json::MAX_LIST;
    use ClientEvent as E;
    let bad = |e: String| (ErrorCode::BadRequest, e);
    let list = |field: &str, len: usize| {
        if len > MAX_LIST {
            return Err((
                ErrorCode::TooLarge,
                format!("`{field}` has more than {MAX_LIST} entries"),
            ));
        }
        Ok(())
    };
    let ids = |field: &str, v: &[String]| -> Result<(), (ErrorCode, String)> {
        list(field, v.len())?;
        v.iter().try_for_each(|x| check_id(field, x).map_err(bad))
    };
    match event {
        E::PresenceSubscribe(u) | E::PresenceUnsubscribe(u) | E::PresenceGetBulk(u) => {
            ids("userIds", &u.user_ids)
        }
        E::NotificationRead(n) => ids("notificationIds", &n.notification_ids),
        E::NotificationClear(n) => check_id("notificationId", &n.notification_id).map_err(bad),
        E::SessionResume(r) => list("positions", r.positions.len()),
        E::MessageEdit(m) => check_id("messageId", &m.message_id).map_err(bad),
        E::MessageDelete(m)
        | E::MessageDelivered(m)
        | E::MessageMarkRead(m)
        | E::MessageGetReadReceipts(m) => check_id("messageId", &m.message_id).map_err(bad),
        E::MessageReact(m) => check_id("messageId", &m.message_id).map_err(bad),
        E::Rpc(r) => check_id("method", &r.method).map_err(bad),
        E::CallAnswer(CallAnswer { call_id, .. })
        | E::CallEnd(CallRef { call_id })
        | E::CallIceCandidate(CallIce { call_id, .. }) => check_id("callId", call_id).map_err(bad),
        E::CallReject(r) => {
            check_id("callId", &r.call_id).map_err(bad)?;
            match &r.reason {
                Some(x) if x.chars().count() > moderation::MAX_REASON_CHARS => Err((
                    ErrorCode::TooLarge,
                    format!(
                        "`reason` is longer than {} characters",
                        moderation::MAX_REASON_CHARS
                    ),
                )),
                _ => Ok(()),
            }
        }
        _ => Ok(()),
    }
}
