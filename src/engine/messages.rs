//! Messages: sending (sequenced by the owner, in `owner.rs`), edits,
//! deletions, reactions and history, checked on the member's shard and
//! carried out on the channel's owner.
//!
//! Handlers are named after their event: `on_<event>` on the member's
//! connection's shard (checks, then the request goes on), and after the
//! event again on the shard that carries it out.

use super::owner::FULL_ALONE;
use super::*;

impl<O: Outbound> Engine<O> {
    /// `message:edit`, on the channel's owner: by its author only, sequenced
    /// like a new message.
    pub(super) fn message_edit(
        &mut self,
        req: ChanReq,
        message_id: String,
        content: String,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let (channel, from, member, ack) = req.parts();
        let reply = Reply::to(from, member.protocol, ack);
        if let Some(e) = self.backlog_refusal(ack) {
            return self.send_reply(reply, e, now, tx);
        }
        let Some(owned) = self.owned.get_mut(&channel) else {
            return;
        };
        if let Err(e) = check_author(owned, &message_id, "edit", false, &member.user, ack) {
            return self.send_reply(reply, *e, now, tx);
        }
        let offset = owned.next_offset();
        let m = owned.find_mut(&message_id).expect("found above");
        m.msg.content = content.clone();
        m.edited_at = Some(now);
        let event = ev(ServerEvent::MessageEdited(MessageEdited {
            message_id: message_id.clone(),
            channel_id: channel.to_string(),
            user_id: member.user.to_string(),
            content,
            offset,
            edited_at: now,
        }));
        self.sequence(&channel, offset, event, Some(reply), now, tx);
    }

    /// `message:delete`, on the channel's owner: by its author or a
    /// moderator.
    pub(super) fn message_delete(
        &mut self,
        req: ChanReq,
        message_id: String,
        moderator: bool,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let (channel, from, member, ack) = req.parts();
        let reply = Reply::to(from, member.protocol, ack);
        if let Some(e) = self.backlog_refusal(ack) {
            return self.send_reply(reply, e, now, tx);
        }
        let Some(owned) = self.owned.get_mut(&channel) else {
            return;
        };
        let stored = match check_author(owned, &message_id, "delete", moderator, &member.user, ack)
        {
            Ok(stored) => stored,
            Err(e) => return self.send_reply(reply, *e, now, tx),
        };
        owned.remove(stored);
        let offset = owned.next_offset();
        let event = ev(ServerEvent::MessageDeleted(MessageDeleted {
            message_id: message_id.clone(),
            channel_id: channel.to_string(),
            user_id: member.user.to_string(),
            offset,
            timestamp: now,
        }));
        self.sequence(&channel, offset, event, Some(reply), now, tx);
    }

    /// `message:react`, on the channel's owner: a reaction added or
    /// removed, within the bounds on reactions.
    pub(super) fn message_react(
        &mut self,
        req: ChanReq,
        r: MessageReact,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let (channel, from, member, ack) = req.parts();
        let reply = Reply::to(from, member.protocol, ack);
        if let Some(e) = self.backlog_refusal(ack) {
            return self.send_reply(reply, e, now, tx);
        }
        let Some(owned) = self.owned.get_mut(&channel) else {
            return;
        };
        let current = owned.offset;
        let Some(m) = owned.find_mut(&r.message_id) else {
            return self.send_reply(reply, not_in_history(ack, &r.message_id), now, tx);
        };
        let Ok(count) = apply_reaction(&mut m.reactions, &r.emoji, r.action, &member.user) else {
            let e = err(
                ack,
                ErrorCode::TooLarge,
                format!("at most {MAX_REACTIONS_PER_MESSAGE} different reactions per message"),
            );
            return self.send_reply(reply, e, now, tx);
        };
        let Some(count) = count else {
            // Already so: nothing changes, nothing is broadcast.
            return self.event_ack(
                &channel,
                from,
                &member,
                ack,
                &r.message_id,
                current,
                now,
                tx,
            );
        };
        let offset = owned.next_offset();
        let event = ev(ServerEvent::MessageReaction(MessageReaction {
            message_id: r.message_id.clone(),
            channel_id: channel.to_string(),
            user_id: member.user.to_string(),
            emoji: r.emoji,
            action: r.action,
            count: count as u32,
            offset,
            timestamp: now,
        }));
        self.sequence(&channel, offset, event, Some(reply), now, tx);
    }

    /// `channel:get_history`: a page of the channel's messages, newest
    /// last.
    pub(super) fn message_history(
        &mut self,
        req: ChanReq,
        h: GetHistory,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let (channel, from, member, ack) = req.parts();
        let reply = Reply::to(from, member.protocol, ack);
        let Some(owned) = self.owned.get_mut(&channel) else {
            return;
        };
        let limit = h.limit.unwrap_or(50).min(self.s.max_history_page) as usize;
        owned.trim(now, &self.s);
        let (messages, has_more) = owned.history(h.before, limit);
        let body = AckBody::History(HistoryAck {
            channel_id: channel.to_string(),
            messages,
            has_more,
        });
        self.send_reply(reply, ack_of(ack, body), now, tx);
    }

    /// `message:send` (or the server API's publish), on the channel's
    /// owner: a resend of a nonce is answered as the first time; otherwise
    /// sequenced and fanned out.
    pub(super) fn message_send(&mut self, p: Publish, now: u64, tx: &mut impl MeshTx) {
        let Publish {
            channel,
            from,
            member,
            ack,
            send,
            meta,
        } = p;
        let Some(owned) = self.owned.get_mut(&channel) else {
            let msg = err(
                ack,
                ErrorCode::NotFound,
                format!("channel `{channel}` has no members"),
            );
            return self.send_to(from, member.protocol, &msg, now, tx);
        };
        if let Some(first) = send
            .nonce
            .as_deref()
            .and_then(|n| owned.by_nonce(&member.user, n))
        {
            // A resend: answer as the first time, publish nothing.
            let body = AckBody::Send(SendAck {
                message_id: first.msg.message_id.clone(),
                channel_id: channel.to_string(),
                offset: first.msg.offset,
                timestamp: first.msg.timestamp,
                nonce: send.nonce.clone(),
                duplicate: true,
            });
            return self.send_to(from, member.protocol, &ack_of(ack, body), now, tx);
        }
        if let Some(e) = self.backlog_refusal(ack) {
            return self.send_to(from, member.protocol, &e, now, tx);
        }
        let Some(owned) = self.owned.get_mut(&channel) else {
            return;
        };
        if self.cluster.is_some()
            && !owned.clustered()
            && owned.waiting_for_cluster() >= self.s.history_size
        {
            let msg = err(ack, ErrorCode::Internal, FULL_ALONE);
            return self.send_to(from, member.protocol, &msg, now, tx);
        }
        let was_typing = owned
            .typing
            .iter()
            .position(|t| t.user == member.user)
            .map(|i| owned.typing.remove(i));
        let offset = owned.next_offset();
        let message_id = owned.message_id(offset);
        let clustered = owned.clustered();
        let mut mentions: Vec<String> = Vec::with_capacity(send.mentions.len());
        for m in send.mentions {
            if !mentions.contains(&m) {
                mentions.push(m);
            }
        }
        self.metrics.messages_published.inc();
        if let Some(t) = was_typing {
            self.typing_event(&channel, &t.user, false, now, tx);
        }
        let message = MessageNew {
            message_id: message_id.clone(),
            channel_id: channel.to_string(),
            user_id: member.user.to_string(),
            content: send.content,
            reply_to: send.reply_to,
            thread_id: send.thread_id,
            mentions,
            nonce: send.nonce,
            offset,
            timestamp: now,
            meta,
        };
        // In the cluster, once Redis has given the message its id.
        if !clustered {
            self.notify_mentions(&channel, &message, now, tx);
        }
        let event = ev(ServerEvent::MessageNew(message));
        let reply = Reply::to(from, member.protocol, ack);
        self.sequence(&channel, offset, event, Some(reply), now, tx);
    }

    /// `message:edit` from a member: checked here, carried out by the owner.
    pub(super) fn on_message_edit(
        &mut self,
        id: ConnId,
        ack: Option<u64>,
        m: MessageEdit,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
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

    /// `message:delete` from a member (a moderator may delete any).
    pub(super) fn on_message_delete(
        &mut self,
        id: ConnId,
        ack: Option<u64>,
        m: MessageRef,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
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

    /// `message:react` from a member: the emoji checked here.
    pub(super) fn on_message_react(
        &mut self,
        id: ConnId,
        ack: Option<u64>,
        r: MessageReact,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
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

    /// `channel:get_history` from a member, to the channel's owner.
    pub(super) fn on_channel_get_history(
        &mut self,
        id: ConnId,
        ack: Option<u64>,
        h: GetHistory,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let channel = h.channel_id.clone();
        self.channel_op(id, ack, &channel, ChanCmd::History(h), now, tx)
    }

    /// `message:send`: checked here (content, ids, grants), then to the
    /// channel's owner.
    pub(super) fn on_message_send(
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
        if self.publish_hooked(&channel) {
            let Some(user) = self.conn(id).map(|c| c.member.user.clone()) else {
                return;
            };
            return self.ask_publish_hook(id, ack, channel, &user, m, tx);
        }
        self.publish_to_owner(id, ack, channel, m, None, now, tx);
    }

    /// A member's message, checked, goes to the channel's owner (with the
    /// publish hook's `meta`).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn publish_to_owner(
        &mut self,
        id: ConnId,
        ack: Option<u64>,
        channel: Arc<str>,
        send: MessageSend,
        meta: Option<Json>,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let Some(member) = self.conn(id).map(|c| c.member.clone()) else {
            return;
        };
        let msg = MeshMsg::Publish(Box::new(Publish {
            channel: channel.clone(),
            from: self.here(id),
            member,
            ack,
            send,
            meta,
        }));
        let owner = owner_of(&channel, self.shards);
        self.route(owner, msg, now, tx);
    }
}

/// Applies a reaction to a message's reactions. Returns the emoji's new
/// count, `None` when nothing changes (added twice, or removed when not
/// there), or an error past the bound on different reactions.
fn apply_reaction(
    reactions: &mut Vec<(String, Vec<Arc<str>>)>,
    emoji: &str,
    action: ReactAction,
    user: &Arc<str>,
) -> Result<Option<usize>, ()> {
    let pos = reactions.iter().position(|(e, _)| *e == emoji);
    Ok(match (action, pos) {
        (ReactAction::Add, Some(i)) => {
            let users = &mut reactions[i].1;
            if users.contains(user) {
                None
            } else {
                users.push(user.clone());
                Some(users.len())
            }
        }
        (ReactAction::Add, None) => {
            if reactions.len() >= MAX_REACTIONS_PER_MESSAGE {
                return Err(());
            }
            reactions.push((emoji.to_string(), vec![user.clone()]));
            Some(1)
        }
        (ReactAction::Remove, Some(i)) => {
            let users = &mut reactions[i].1;
            match users.iter().position(|u| u == user) {
                Some(j) => {
                    users.remove(j);
                    let n = users.len();
                    if n == 0 {
                        reactions.remove(i);
                    }
                    Some(n)
                }
                None => None,
            }
        }
        (ReactAction::Remove, None) => None,
    })
}

/// The offset of message `id` if `user` may change it: only its author
/// may (and a moderator delete it).
fn check_author(
    owned: &Owned,
    id: &str,
    verb: &str,
    moderator: bool,
    user: &Arc<str>,
    ack: Option<u64>,
) -> Result<u64, Box<ServerMessage>> {
    match owned.find(id) {
        None => Err(Box::new(not_in_history(ack, id))),
        Some(m) if *m.msg.user_id != **user && !moderator => Err(Box::new(err(
            ack,
            ErrorCode::Forbidden,
            format!("only the author may {verb} a message"),
        ))),
        Some(m) => Ok(m.msg.offset),
    }
}
