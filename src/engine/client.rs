//! The connection's shard: client messages checked and passed on to the
//! owner or home shard they concern, and the answers to joins.

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
    fn may_join(&self, id: ConnId, channel: &str, token: Option<&str>) -> Result<(), String> {
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
    fn check_voice(&self, id: ConnId, channel: &str) -> Result<(), (ErrorCode, String)> {
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
    fn check_user_target(
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
        use crate::protocol::{binary, json, DecodeError};
        let Some(protocol) = self.conn(id).map(|c| c.member.protocol) else {
            return;
        };
        match (protocol, text) {
            (Protocol::Json, true) => match json::envelope(payload, scratch) {
                Err(e) => self.malformed(id, e, now, tx),
                Ok(env) if self.charge(id, env.bucket(), env.id, now, tx) => match env.decode() {
                    Ok(m) => self.handle_charged(id, m, now, tx),
                    Err(e) => self.malformed_charged(id, e, now, tx),
                },
                Ok(_) => {}
            },
            (Protocol::Binary, false) => match binary::decode_client(payload) {
                Ok(m) => self.handle(id, m, now, tx),
                Err(e) => self.malformed(id, e, now, tx),
            },
            (p, _) => self.malformed(id, DecodeError::wrong_frame(p), now, tx),
        }
    }

    /// Handles a decoded message from a local, authenticated connection:
    /// charges its rate-limit bucket, then [`Engine::handle_charged`].
    pub fn handle(&mut self, id: ConnId, msg: ClientMessage, now: u64, tx: &mut impl MeshTx) {
        if self.charge(id, msg.event.index(), msg.id, now, tx) {
            self.handle_charged(id, msg, now, tx)
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
    fn handle_checked(&mut self, id: ConnId, msg: ClientMessage, now: u64, tx: &mut impl MeshTx) {
        let Some(member) = self.conn(id).map(|c| c.member.clone()) else {
            return;
        };
        let ack = msg.id;
        let from = Some((self.here(id), member.protocol));
        use ClientEvent as E;
        match msg.event {
            E::Heartbeat => self.reply(
                id,
                &ServerMessage {
                    id: ack,
                    event: ServerEvent::HeartbeatAck(HeartbeatAck { timestamp: now }),
                },
            ),
            E::Auth(_) => self.error(id, ack, ErrorCode::BadRequest, "already authenticated"),
            E::SessionResume(r) => self.resume(id, ack, r, now, tx),
            E::ChannelJoin(j) => {
                self.join(id, ack, j, None, now, tx);
            }
            E::ChannelLeave(c) => self.leave(id, ack, &c.channel_id, now, tx),
            E::MessageSend(m) => self.send(id, ack, m, now, tx),
            E::MessageEdit(m) => {
                if let Err((code, e)) = self.check_content("content", &m.content) {
                    return self.error(id, ack, code, e);
                }
                self.channel_op(
                    id,
                    ack,
                    &m.channel_id,
                    ChanCmd::Edit {
                        message_id: m.message_id,
                        content: m.content,
                    },
                    now,
                    tx,
                )
            }
            E::MessageDelete(m) => {
                let moderator = self.conn(id).is_some_and(|c| c.roles.moderates());
                self.channel_op(
                    id,
                    ack,
                    &m.channel_id,
                    ChanCmd::Delete {
                        message_id: m.message_id,
                        moderator,
                    },
                    now,
                    tx,
                )
            }
            E::MessageReact(r) => {
                if r.emoji.is_empty()
                    || r.emoji.len() > MAX_EMOJI_BYTES
                    || r.emoji.chars().any(char::is_control)
                {
                    return self.error(
                        id,
                        ack,
                        ErrorCode::BadRequest,
                        format!("`emoji` must be 1 to {MAX_EMOJI_BYTES} bytes"),
                    );
                }
                let channel = r.channel_id.clone();
                self.channel_op(id, ack, &channel, ChanCmd::React(r), now, tx)
            }
            E::MessageDelivered(m) => self.channel_op(
                id,
                ack,
                &m.channel_id,
                ChanCmd::Delivered {
                    message_id: m.message_id,
                },
                now,
                tx,
            ),
            E::MessageMarkRead(m) => self.channel_op(
                id,
                ack,
                &m.channel_id,
                ChanCmd::MarkRead {
                    message_id: m.message_id,
                },
                now,
                tx,
            ),
            E::MessageGetReadReceipts(m) => self.channel_op(
                id,
                ack,
                &m.channel_id,
                ChanCmd::ReadReceipts {
                    message_id: m.message_id,
                },
                now,
                tx,
            ),
            E::ChannelGetHistory(h) => {
                let channel = h.channel_id.clone();
                self.channel_op(id, ack, &channel, ChanCmd::History(h), now, tx)
            }
            E::ChannelGetMembers(c) => {
                self.channel_op(id, ack, &c.channel_id, ChanCmd::Members, now, tx)
            }
            E::TypingStart(c) => {
                self.channel_op(id, ack, &c.channel_id, ChanCmd::TypingStart, now, tx)
            }
            E::TypingStop(c) => {
                self.channel_op(id, ack, &c.channel_id, ChanCmd::TypingStop, now, tx)
            }
            E::TypingGetActive(c) => {
                self.channel_op(id, ack, &c.channel_id, ChanCmd::TypingActive, now, tx)
            }
            E::DmSend(d) => {
                if let Err((code, e)) = self.check_user_target(id, "toUserId", &d.to_user_id) {
                    return self.error(id, ack, code, e);
                }
                if let Err((code, e)) = self.check_content("content", &d.content) {
                    return self.error(id, ack, code, e);
                }
                if let Some(Err(e)) = d.nonce.as_deref().map(|n| check_id("nonce", n)) {
                    return self.error(id, ack, ErrorCode::BadRequest, e);
                }
                self.send_user_op(member.user, from, ack, UserCmd::DmSend(d), now, tx)
            }
            E::DmGetConversations(l) => self.send_user_op(
                member.user,
                from,
                ack,
                UserCmd::Conversations { limit: l.limit },
                now,
                tx,
            ),
            E::PresenceUpdate(p) => {
                if let Err(e) = check_presence(&p) {
                    return self.error(id, ack, ErrorCode::BadRequest, e);
                }
                if let Some(d) = p.device {
                    if let Some(c) = self.conn_mut(id) {
                        c.device = d;
                    }
                }
                self.send_user_op(member.user, from, ack, UserCmd::Update(p), now, tx)
            }
            E::PresenceHeartbeat => {
                self.send_user_op(member.user, from, ack, UserCmd::Heartbeat, now, tx)
            }
            E::PresenceSubscribe(u) => self.presence_query(id, ack, u.user_ids, true, now, tx),
            E::PresenceGetBulk(u) => self.presence_query(id, ack, u.user_ids, false, now, tx),
            E::PresenceUnsubscribe(u) => {
                let Some(c) = self.conn_mut(id) else { return };
                let mut gone = Vec::new();
                c.links().subscriptions.retain(|s| {
                    let drop = u.user_ids.iter().any(|u| **u == **s);
                    if drop {
                        gone.push(s.clone());
                    }
                    !drop
                });
                self.unsubscribe_all(id, gone, now, tx);
                self.reply(id, &empty_ack(ack));
            }
            E::VoiceJoin(c) => {
                if let Err((code, e)) = self.check_voice(id, &c.channel_id) {
                    return self.error(id, ack, code, e);
                }
                let channel = c.channel_id.into();
                self.send_user_op(
                    member.user,
                    from,
                    ack,
                    UserCmd::VoiceJoin { channel },
                    now,
                    tx,
                )
            }
            E::VoiceLeave => {
                self.send_user_op(member.user, from, ack, UserCmd::VoiceLeave, now, tx)
            }
            E::VoiceUpdate(u) => {
                self.send_user_op(member.user, from, ack, UserCmd::VoiceUpdate(u), now, tx)
            }
            E::VoiceGetParticipants(c) => {
                if let Err((code, e)) = self.check_voice(id, &c.channel_id) {
                    return self.error(id, ack, code, e);
                }
                // Text membership is not required to look.
                let channel: Arc<str> = c.channel_id.into();
                let op = ChannelOp {
                    channel: channel.clone(),
                    from: self.here(id),
                    member,
                    ack,
                    op: ChanCmd::VoiceParticipants,
                };
                let owner = owner_of(&channel, self.shards);
                self.route(owner, MeshMsg::ChannelOp(Box::new(op)), now, tx);
            }
            E::CallInitiate(c) => {
                if let Err((code, e)) = self.check_user_target(id, "toUserId", &c.to_user_id) {
                    return self.error(id, ack, code, e);
                }
                if *c.to_user_id == *member.user {
                    return self.error(id, ack, ErrorCode::BadRequest, "cannot call yourself");
                }
                if c.sdp.as_ref().is_some_and(|s| s.len() > MAX_SDP_BYTES) {
                    return self.error(
                        id,
                        ack,
                        ErrorCode::TooLarge,
                        format!("`sdp` is longer than {MAX_SDP_BYTES} bytes"),
                    );
                }
                self.send_user_op(member.user, from, ack, UserCmd::CallInitiate(c), now, tx)
            }
            E::CallAnswer(c) => {
                if c.sdp.as_ref().is_some_and(|s| s.len() > MAX_SDP_BYTES) {
                    return self.error(
                        id,
                        ack,
                        ErrorCode::TooLarge,
                        format!("`sdp` is longer than {MAX_SDP_BYTES} bytes"),
                    );
                }
                self.call_op(id, ack, &c.call_id, CallCmd::Answer { sdp: c.sdp }, now, tx)
            }
            E::CallReject(c) => self.call_op(
                id,
                ack,
                &c.call_id,
                CallCmd::Reject { reason: c.reason },
                now,
                tx,
            ),
            E::CallEnd(c) => self.call_op(id, ack, &c.call_id, CallCmd::End, now, tx),
            E::CallIceCandidate(c) => {
                if c.candidate.0.len() > MAX_SDP_BYTES {
                    return self.error(id, ack, ErrorCode::TooLarge, "`candidate` is too large");
                }
                self.call_op(id, ack, &c.call_id, CallCmd::Ice(c.candidate), now, tx)
            }
            E::NotificationGetPending => self.send_user_op(
                member.user,
                from,
                ack,
                UserCmd::NotificationsPending,
                now,
                tx,
            ),
            E::NotificationRead(n) => self.send_user_op(
                member.user,
                from,
                ack,
                UserCmd::NotificationsRead(n.notification_ids),
                now,
                tx,
            ),
            E::NotificationClear(n) => self.send_user_op(
                member.user,
                from,
                ack,
                UserCmd::NotificationClear(n.notification_id),
                now,
                tx,
            ),
            E::NotificationClearAll => self.send_user_op(
                member.user,
                from,
                ack,
                UserCmd::NotificationClearAll,
                now,
                tx,
            ),
            E::ModerationKickUser(k) => self.client_moderation(
                id,
                ack,
                ModKind::Kick,
                k.user_id,
                k.channel_id,
                k.reason,
                now,
                tx,
            ),
            E::ModerationBanUser(b) => {
                let until = match b.duration_ms {
                    None => None,
                    Some(d) if (1..=moderation::MAX_BAN_MS).contains(&d) => Some(now + d),
                    Some(_) => {
                        return self.error(
                            id,
                            ack,
                            ErrorCode::BadRequest,
                            format!(
                                "`durationMs` must be 1 to {} (ten years)",
                                moderation::MAX_BAN_MS
                            ),
                        )
                    }
                };
                self.client_moderation(
                    id,
                    ack,
                    ModKind::Ban { until },
                    b.user_id,
                    b.channel_id,
                    b.reason,
                    now,
                    tx,
                )
            }
            other @ E::Unsupported(_) => self.error(
                id,
                ack,
                ErrorCode::Unsupported,
                format!("unsupported event `{}`", other.name()),
            ),
        }
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

    /// Asks the owner to add this connection to a channel; false when
    /// refused here (the refusal is answered).
    pub(super) fn join(
        &mut self,
        id: ConnId,
        ack: Option<u64>,
        j: ChannelJoin,
        gather: Option<u64>,
        now: u64,
        tx: &mut impl MeshTx,
    ) -> bool {
        let ChannelJoin {
            channel_id,
            since,
            token,
        } = j;
        if let Err(e) = self.check_channel_id(&channel_id) {
            self.error(id, ack, ErrorCode::BadRequest, e);
            return false;
        }
        if let Err(e) = self.may_join(id, &channel_id, token.as_deref()) {
            self.error(id, ack, ErrorCode::Forbidden, e);
            return false;
        }
        let ban = self.conn(id).and_then(|c| {
            self.bans
                .channel(&c.member.user, &channel_id, now)
                .map(|b| moderation::banned_message(b))
        });
        if let Some(e) = ban {
            self.error(id, ack, ErrorCode::Forbidden, e);
            return false;
        }
        let max = self.s.max_channels_per_connection;
        let Some(conn) = self.conn_mut(id) else {
            return false;
        };
        if conn.channels().iter().any(|(c, _)| **c == *channel_id) {
            self.error(
                id,
                ack,
                ErrorCode::BadRequest,
                format!("already in channel `{channel_id}`"),
            );
            return false;
        }
        if conn.channels().len() >= max {
            self.error(
                id,
                ack,
                ErrorCode::TooLarge,
                format!("at most {max} channels per connection"),
            );
            return false;
        }
        let channel: Arc<str> = channel_id.into();
        conn.links()
            .channels
            .push((channel.clone(), JoinState::Pending { ack, gather }));
        let member = conn.member.clone();
        let from = self.here(id);
        let owner = owner_of(&channel, self.shards);
        self.route(
            owner,
            MeshMsg::Join(Box::new(Join {
                channel,
                from,
                member,
                ack,
                since,
            })),
            now,
            tx,
        );
        true
    }

    pub(super) fn leave(
        &mut self,
        id: ConnId,
        ack: Option<u64>,
        channel_id: &str,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let Some(conn) = self.conn_mut(id) else {
            return;
        };
        let Some(pos) = conn.channels().iter().position(|(c, _)| **c == *channel_id) else {
            return self.error(
                id,
                ack,
                ErrorCode::NotFound,
                format!("not in channel `{channel_id}`"),
            );
        };
        let (channel, state) = conn.links().channels.swap_remove(pos);
        let member = conn.member.clone();
        match state {
            JoinState::Joined => {
                self.remove_local(&channel, id);
                self.tell_owner_left(id, channel, member, None, now, tx);
            }
            // A channel a resumed session was rejoining: the resume no
            // longer waits for it (its `Joined` will undo the join).
            JoinState::Pending {
                gather: Some(g), ..
            } => self.resumed_join_gone(g),
            JoinState::Pending { .. } => {}
        }
        self.reply(id, &empty_ack(ack));
    }

    pub(super) fn send(
        &mut self,
        id: ConnId,
        ack: Option<u64>,
        m: MessageSend,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        if let Err((code, e)) = self.check_content("content", &m.content) {
            return self.error(id, ack, code, e);
        }
        if let Err((code, e)) = api::check_send_ids(&m) {
            return self.error(id, ack, code, e);
        }
        // A mention is a message to a user: the token's `users` claim must
        // cover it, as for a direct message.
        if let Some(u) = m
            .mentions
            .iter()
            .find(|u| !self.conn(id).is_some_and(|c| c.may_reach_user(u)))
        {
            let e = format!(
                "user `{u}` is not granted to this connection (a mention is a message to them)"
            );
            return self.error(id, ack, ErrorCode::Forbidden, e);
        }
        let Some(channel) = self.joined(id, &m.channel_id) else {
            return self.error(
                id,
                ack,
                ErrorCode::Forbidden,
                format!("join `{}` before sending to it", m.channel_id),
            );
        };
        let Some(member) = self.conn(id).map(|c| c.member.clone()) else {
            return;
        };
        let msg = MeshMsg::Publish(Box::new(Publish {
            channel: channel.clone(),
            from: self.here(id),
            member,
            ack,
            send: m,
        }));
        let owner = owner_of(&channel, self.shards);
        self.route(owner, msg, now, tx);
    }

    pub(super) fn presence_query(
        &mut self,
        id: ConnId,
        ack: Option<u64>,
        user_ids: Vec<String>,
        subscribe: bool,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        if let Some(Err(e)) = user_ids
            .iter()
            .map(|u| check_id("userIds", u))
            .find(Result::is_err)
        {
            return self.error(id, ack, ErrorCode::BadRequest, e);
        }
        let mut order: Vec<Arc<str>> = Vec::with_capacity(user_ids.len());
        for u in user_ids {
            if !order.iter().any(|o| **o == *u) {
                order.push(u.into());
            }
        }
        let max = self.s.max_subscriptions;
        let Some(conn) = self.conn_mut(id) else {
            return;
        };
        let protocol = conn.member.protocol;
        if subscribe {
            let new: Vec<Arc<str>> = order
                .iter()
                .filter(|u| !conn.subscriptions().contains(u))
                .cloned()
                .collect();
            if conn.subscriptions().len() + new.len() > max {
                return self.error(
                    id,
                    ack,
                    ErrorCode::TooLarge,
                    format!("at most {max} presence subscriptions per connection"),
                );
            }
            conn.links().subscriptions.extend(new);
        }
        if order.is_empty() {
            return self.reply(
                id,
                &ack_of(ack, AckBody::Presences(PresencesAck { presences: vec![] })),
            );
        }
        let groups = self.by_home(order.clone());
        let gather = self.next_id();
        self.gathers.insert(
            gather,
            Gather {
                conn: id,
                ack,
                waiting: groups.len(),
                kind: GatherKind::Presences {
                    order,
                    got: Vec::new(),
                },
            },
        );
        let from = self.here(id);
        for (shard, users) in groups {
            let q = PresenceQuery {
                gather,
                from,
                protocol,
                users,
                subscribe,
            };
            self.route(shard, MeshMsg::Presence(Box::new(q)), now, tx);
        }
    }

    pub(super) fn resume(
        &mut self,
        id: ConnId,
        ack: Option<u64>,
        r: SessionResume,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let Ok(session) = r.session_id.parse::<SessionId>() else {
            return self.error(
                id,
                ack,
                ErrorCode::BadRequest,
                "`sessionId` must be 32 hex digits",
            );
        };
        let Some(member) = self.conn(id).map(|c| c.member.clone()) else {
            return;
        };
        let gather = self.next_id();
        self.gathers.insert(
            gather,
            Gather {
                conn: id,
                ack,
                waiting: 1,
                kind: GatherKind::ResumeLookup {
                    session,
                    positions: r.positions,
                },
            },
        );
        let from = Some((self.here(id), member.protocol));
        self.send_user_op(
            member.user,
            from,
            None,
            UserCmd::Resume { session, gather },
            now,
            tx,
        );
    }

    pub(super) fn on_joined(&mut self, j: Joined, now: u64, tx: &mut impl MeshTx) {
        let Joined {
            channel,
            conn: id,
            member,
            ack,
            offset,
            epoch,
            members,
            recovered,
            replay,
            refused,
        } = j;
        if let Some((code, reason)) = refused {
            return self.join_refused(id, &channel, ack, code, reason);
        }
        let pending = self.conn_mut(id).and_then(|c| {
            c.links
                .as_mut()?
                .channels
                .iter_mut()
                .find(|(ch, s)| {
                    *ch == channel && matches!(s, JoinState::Pending { ack: a, .. } if *a == ack)
                })
                .map(|entry| {
                    let JoinState::Pending { gather, .. } = entry.1 else {
                        unreachable!("matched above")
                    };
                    entry.1 = JoinState::Joined;
                    gather
                })
        });
        let body = JoinAck {
            channel_id: channel.to_string(),
            offset,
            epoch: epoch.to_string(),
            members,
            recovered,
        };
        let Some(gather) = pending else {
            // Closed or left while the join was in flight: the join did
            // happen (answer it if anyone is there to hear), then undo it.
            if ack.is_some() {
                self.reply(id, &ack_of(ack, AckBody::Join(body)));
            }
            return self.tell_owner_left(id, channel, member, None, now, tx);
        };
        let local = self
            .local
            .entry(channel.clone())
            .or_insert_with(|| LocalChannel {
                members: Vec::new(),
                offset,
                epoch: epoch.clone(),
            });
        if local.epoch != epoch {
            local.epoch = epoch;
            local.offset = offset;
        }
        local.offset = local.offset.max(offset);
        local.members.push(LocalMember {
            conn: id,
            protocol: member.protocol,
        });
        match gather {
            Some(g) => self.resumed_join(g, body),
            None => self.reply(id, &ack_of(ack, AckBody::Join(body))),
        }
        if let Some(c) = self.conn(id) {
            for f in &replay {
                if !c.out.push(f) {
                    self.metrics.queue_drops.inc();
                }
            }
        }
    }

    /// The owner refused a join: forget it, and answer.
    fn join_refused(
        &mut self,
        id: ConnId,
        channel: &str,
        ack: Option<u64>,
        code: ErrorCode,
        reason: String,
    ) {
        let gather = self.conn_mut(id).and_then(|c| {
            let links = c.links.as_mut()?;
            let i = links.channels.iter().position(|(ch, s)| {
                **ch == *channel && matches!(s, JoinState::Pending { ack: a, .. } if *a == ack)
            })?;
            match links.channels.remove(i).1 {
                JoinState::Pending { gather, .. } => Some(gather),
                JoinState::Joined => None,
            }
        });
        match gather {
            Some(Some(g)) => self.resumed_join_gone(g),
            Some(None) => self.error(id, ack, code, reason),
            // Left (or closed) while the join was in flight: the join is
            // still answered, if anyone is there to hear.
            None if ack.is_some() => self.error(id, ack, code, reason),
            None => {}
        }
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
