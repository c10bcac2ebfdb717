//! Direct messages, on the sender's and the recipient's home shards, and
//! the conversation list.
//!
//! Handlers are named after their event: `on_<event>` on the member's
//! connection's shard (checks, then the request goes on), and after the
//! event again on the shard that carries it out.

use super::cluster::Asker;
use super::event_stream::Extra;
use super::*;

impl<O: Outbound> Engine<O> {
    /// `dm:send`, on the sender's home: once per nonce, to the sender's
    /// other devices and to the recipient's home.
    pub(super) fn dm_send(&mut self, r: UserReq, d: DmSend, now: u64, tx: &mut impl MeshTx) {
        let (user, from, ack) = r.parts();
        let max_conversations = self.s.max_conversations;
        let st = self.user(&user);
        if let Some(first) = d.nonce.as_deref().and_then(|n| st.dm_by_nonce(n)) {
            let body = AckBody::Dm(DmAck {
                message_id: first.message_id.clone(),
                to_user_id: first.to_user_id.clone(),
                timestamp: first.timestamp,
                duplicate: true,
            });
            return self.answer(from, &ack_of(ack, body), now, tx);
        }
        let message_id = self.mint_id("dm");
        let to: Arc<str> = d.to_user_id.as_str().into();
        let msg = DmMessage {
            message_id: message_id.clone(),
            from_user_id: user.to_string(),
            to_user_id: d.to_user_id.clone(),
            content: d.content,
            nonce: d.nonce.clone(),
            timestamp: now,
        };
        let st = self.user(&user);
        if let Some(n) = &d.nonce {
            st.remember_dm_nonce(n, msg.clone());
        }
        st.record_dm(&to, msg.clone(), false, max_conversations);
        self.keep_conversation(&user, &to, &msg, false, now, tx);
        let body = AckBody::Dm(DmAck {
            message_id,
            to_user_id: d.to_user_id,
            timestamp: now,
            duplicate: false,
        });
        self.answer(from, &ack_of(ack, body), now, tx);
        self.send_devices(
            &user,
            ServerEvent::DmSent(msg.clone()),
            from.map(|f| f.0),
            now,
            tx,
        );
        self.tell_other_nodes(&user, ServerEvent::DmSent(msg.clone()), now, tx);
        if self.s.stream_extras.dms {
            let event = ev(ServerEvent::DmNew(msg.clone()));
            self.stream_extra(Extra::Dms, None, &event, now, tx);
        }
        self.send_user_op(to, None, None, UserCmd::DmDeliver(msg), now, tx);
    }

    /// A direct message, on the recipient's home: to every device of the
    /// recipient, on every node.
    pub(super) fn dm_deliver(
        &mut self,
        r: UserReq,
        msg: DmMessage,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let (user, _, _) = r.parts();
        let max_conversations = self.s.max_conversations;
        let from_user: Arc<str> = msg.from_user_id.as_str().into();
        self.user(&user)
            .record_dm(&from_user, msg.clone(), true, max_conversations);
        self.keep_conversation(&user, &from_user, &msg, true, now, tx);
        self.tell_other_nodes(&user, ServerEvent::DmNew(msg.clone()), now, tx);
        self.send_devices(&user, ServerEvent::DmNew(msg), None, now, tx);
    }

    /// `dm:get_conversations`: the latest first (in a cluster, from Redis).
    pub(super) fn dm_conversations(
        &mut self,
        r: UserReq,
        limit: Option<u32>,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let (user, from, ack) = r.parts();
        let limit = limit.unwrap_or(50) as usize;
        // In a cluster, Redis has every node's.
        if let (Some((conn, protocol)), true) = (from, self.cluster_up()) {
            let asker = (conn, protocol, ack);
            let msg = ToBridge::LoadConversations { user, limit, asker };
            return self.send_bridge(msg, now, tx);
        }
        let conversations = self.local_conversations(&user, limit);
        let body = AckBody::Conversations(ConversationsAck { conversations });
        self.answer(from, &ack_of(ack, body), now, tx);
    }

    /// The user's conversations kept here, most recent first.
    pub(super) fn local_conversations(&self, user: &Arc<str>, limit: usize) -> Vec<Conversation> {
        self.users
            .get(user)
            .and_then(|st| st.extra())
            .map(|m| {
                m.conversations
                    .iter()
                    .take(limit)
                    .map(|c| Conversation {
                        user_id: c.peer.to_string(),
                        last_message: c.last.clone(),
                        unread: c.unread,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// In a cluster: a direct message in a conversation, for Redis (the
    /// node where it is sent keeps it for both users).
    pub(super) fn keep_conversation(
        &mut self,
        user: &Arc<str>,
        peer: &Arc<str>,
        msg: &DmMessage,
        incoming: bool,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        if self.cluster_up() {
            let msg = ToBridge::Conversation {
                user: user.clone(),
                peer: peer.clone(),
                msg: Box::new(msg.clone()),
                incoming,
            };
            self.send_bridge(msg, now, tx);
        }
    }

    /// `dm:send`: checked here, then to the sender's home.
    pub(super) fn on_dm_send(
        &mut self,
        id: ConnId,
        ack: Option<u64>,
        d: DmSend,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        if let Err((code, e)) = self.check_user_target(id, "toUserId", &d.to_user_id) {
            return self.error(id, ack, code, e);
        }
        if let Err((code, e)) = self.check_content("content", &d.content) {
            return self.error(id, ack, code, e);
        }
        if let Some(Err(e)) = d.nonce.as_deref().map(|n| check_id("nonce", n)) {
            return self.error(id, ack, ErrorCode::BadRequest, e);
        }
        self.ask_home(id, ack, UserCmd::DmSend(d), now, tx)
    }

    /// `dm:get_conversations`, to the user's home.
    pub(super) fn on_dm_get_conversations(
        &mut self,
        id: ConnId,
        ack: Option<u64>,
        l: Limit,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        self.ask_home(id, ack, UserCmd::Conversations { limit: l.limit }, now, tx)
    }

    /// A user's conversations read from Redis (none: Redis could not
    /// answer, this node's are given), for `dm:get_conversations`.
    pub(super) fn on_conversations_loaded(
        &mut self,
        user: Arc<str>,
        limit: usize,
        conversations: Option<Vec<Conversation>>,
        (conn, protocol, id): Asker,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let conversations = conversations.unwrap_or_else(|| self.local_conversations(&user, limit));
        let body = AckBody::Conversations(ConversationsAck { conversations });
        self.send_to(conn, protocol, &ack_of(id, body), now, tx);
    }
}
