//! A channel's members: joins and leaves (checked on the member's shard,
//! carried out on the channel's owner) and the list on every node.
//!
//! Handlers are named after their event: `on_<event>` on the member's
//! connection's shard (checks, then the request goes on), and after the
//! event again on the shard that carries it out.

use super::event_stream::Extra;
use super::moderation::{banned_message, moderation_event, once_id};
use super::*;

impl<O: Outbound> Engine<O> {
    /// Whether a channel has `large_channel_members` connections or more
    /// (on every node): its joins and leaves are not broadcast, so that
    /// filling a room of N does not cost N² member events.
    pub(super) fn large_channel(&self, channel: &str) -> bool {
        let at = self.s.large_channel_members;
        at > 0
            && self
                .owned
                .get(channel)
                .is_some_and(|o| o.cluster_total() >= at)
    }

    /// `channel:get_members`: every member, on every node.
    pub(super) fn channel_members(&mut self, req: ChanReq, now: u64, tx: &mut impl MeshTx) {
        self.channel_query(req, ChannelPart::Members(Vec::new()), now, tx);
    }

    /// `channel:join`, on the channel's owner: a member (with what it
    /// missed, given `since`), or a refusal (a ban, a channel that cannot
    /// load).
    pub(super) fn channel_join(&mut self, j: Join, now: u64, tx: &mut impl MeshTx) {
        let Join {
            channel,
            from,
            member,
            ack,
            since,
        } = j;
        if let Some(ban) = self.bans.channel(&member.user, &channel, now) {
            let refused = Some((ErrorCode::Forbidden, banned_message(ban)));
            let joined = MeshMsg::Joined(Box::new(Joined {
                channel,
                conn: from.conn,
                member,
                ack,
                offset: 0,
                epoch: "".into(),
                members: 0,
                recovered: None,
                replay: Vec::new(),
                refused,
            }));
            return self.route(from.shard, joined, now, tx);
        }
        self.ensure_owned(&channel, now, tx);
        if let Some(Link::Attaching(waiting)) = self.owned.get_mut(&channel).map(|o| &mut o.link) {
            // Answered once the cluster's state of the channel is here.
            waiting.push(Join {
                channel,
                from,
                member,
                ack,
                since,
            });
            return;
        }
        // Existing members hear of the join before the joiner's first
        // delivery; in a large channel they do not hear of it at all.
        let large = self.large_channel(&channel);
        if !large || self.s.stream_extras.members {
            let event = ev(ServerEvent::MemberJoined(MemberEvent {
                channel_id: channel.to_string(),
                user_id: member.user.to_string(),
                session_id: member.session.to_string(),
            }));
            self.stream_extra(Extra::Members, Some(&channel), &event, now, tx);
            if !large {
                self.fan_out(&channel, &event, None, now, tx);
            }
        }
        let owned = self.owned.get_mut(&channel).expect("owned above");
        owned.per_shard[from.shard as usize][member.protocol.index()] += 1;
        owned.count_user(&member.user, 1);
        self.members_changed(&channel, now, tx);
        let owned = self.owned.get_mut(&channel).expect("owned above");
        let (recovered, replay) = match &since {
            None => (None, Vec::new()),
            Some(s) => match owned.replay(&channel, s, member.protocol) {
                Some(frames) => (Some(true), frames),
                None => (Some(false), Vec::new()),
            },
        };
        let joined = MeshMsg::Joined(Box::new(Joined {
            channel,
            conn: from.conn,
            member,
            ack,
            offset: owned.offset,
            epoch: owned.epoch.clone(),
            members: owned.cluster_total(),
            recovered,
            replay,
            refused: None,
        }));
        self.route(from.shard, joined, now, tx);
    }

    /// `channel:leave` (or a closed connection), on the channel's owner.
    pub(super) fn channel_leave(&mut self, l: Leave, now: u64, tx: &mut impl MeshTx) {
        let Leave {
            channel,
            from,
            member,
            moderation,
        } = l;
        // Large before this leave: the others do not hear of it.
        let large = self.large_channel(&channel);
        let Some(owned) = self.owned.get_mut(&channel) else {
            return;
        };
        let count = &mut owned.per_shard[from.shard as usize][member.protocol.index()];
        *count = count.saturating_sub(1);
        owned.count_user(&member.user, -1);
        let gone = !owned.users.contains_key(&member.user);
        self.members_changed(&channel, now, tx);
        if let (Some(m), true) = (moderation, gone) {
            // A server-wide kick or ban: each channel the user was in hears
            // of it once, when the user's last connection there leaves (on
            // any node: each may relay it, every node delivers it once).
            let event = moderation_event(&m, Some(&channel), true);
            self.fan_out_once(&channel, &event, None, once_id(&m), now, tx);
        }
        let Some(owned) = self.owned.get_mut(&channel) else {
            return;
        };
        let was_typing = owned
            .typing
            .iter()
            .position(|t| t.conn == from)
            .map(|i| owned.typing.remove(i));
        // Without members here, only other nodes' members could hear of it.
        let last = owned.total() == 0;
        if last && !owned.clustered() {
            return self.channel_gc(&channel, now, tx);
        }
        if let Some(t) = was_typing {
            self.typing_event(&channel, &t.user, false, now, tx);
        }
        if !large || self.s.stream_extras.members {
            let event = ev(ServerEvent::MemberLeft(MemberEvent {
                channel_id: channel.to_string(),
                user_id: member.user.to_string(),
                session_id: member.session.to_string(),
            }));
            self.stream_extra(Extra::Members, Some(&channel), &event, now, tx);
            if !large {
                self.fan_out(&channel, &event, None, now, tx);
            }
        }
        if last {
            self.channel_gc(&channel, now, tx);
        }
    }

    /// `channel:get_members` from a member, to the channel's owner.
    pub(super) fn on_channel_get_members(
        &mut self,
        id: ConnId,
        ack: Option<u64>,
        c: ChannelRef,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        self.channel_op(id, ack, &c.channel_id, ChanCmd::Members, now, tx)
    }

    /// Asks the owner to add this connection to a channel; false when
    /// refused here (the refusal is answered).
    pub(super) fn on_channel_join(
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
        // The server's own joins are the backend's decision.
        let by_server = gather == Some(super::subscribe::SERVER_JOIN);
        if let (false, Err(e)) = (by_server, self.may_join(id, &channel_id, token.as_deref())) {
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
        // The channel's name, shared with its other members here.
        let channel: Arc<str> = match self.local.get_key_value(&*channel_id) {
            Some((name, _)) => name.clone(),
            None => channel_id.as_str().into(),
        };
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
        let pending = JoinState::Pending(Box::new(PendingJoin { ack, gather }));
        let pending = (channel.clone(), pending);
        push_small(&mut conn.links().channels, pending);
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

    /// `channel:leave`: checked here, then to the channel's owner.
    pub(super) fn on_channel_leave(
        &mut self,
        id: ConnId,
        ack: Option<u64>,
        channel_id: &str,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        if !self.leave(id, channel_id, now, tx) {
            return self.error(
                id,
                ack,
                ErrorCode::NotFound,
                format!("not in channel `{channel_id}`"),
            );
        }
        self.reply(id, &empty_ack(ack));
    }

    /// Takes a connection out of a channel (the owner is told); false when
    /// it is not in it.
    pub(super) fn leave(
        &mut self,
        id: ConnId,
        channel_id: &str,
        now: u64,
        tx: &mut impl MeshTx,
    ) -> bool {
        let Some(conn) = self.conn_mut(id) else {
            return false;
        };
        let Some(pos) = conn.channels().iter().position(|(c, _)| **c == *channel_id) else {
            return false;
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
            JoinState::Pending(p) => {
                if let Some(g) = p.gather {
                    self.resumed_join_gone(g, now, tx)
                }
            }
        }
        true
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
        if let Some(refused) = refused {
            return self.join_refused(id, &channel, ack, refused, now, tx);
        }
        let pending = self.conn_mut(id).and_then(|c| {
            c.links
                .as_mut()?
                .channels
                .iter_mut()
                .find(|(ch, s)| {
                    *ch == channel && matches!(s, JoinState::Pending(p) if p.ack == ack)
                })
                .map(
                    |entry| match std::mem::replace(&mut entry.1, JoinState::Joined) {
                        JoinState::Pending(p) => p.gather,
                        JoinState::Joined => unreachable!("matched above"),
                    },
                )
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
        if member.protocol.is_socketio() {
            let since = offset.saturating_sub(replay.len() as u64);
            self.sent.joined(id, &channel, since, offset);
        }
        let push_replay = |e: &Self| {
            if let Some(c) = e.conn(id) {
                for f in &replay {
                    if !c.out.push(f) {
                        e.metrics.queue_drops.inc();
                    }
                }
            }
        };
        match gather {
            // Joined by the server: told as an event.
            Some(super::subscribe::SERVER_JOIN) => {
                self.reply(id, &ev(ServerEvent::ChannelJoined(body)));
                push_replay(self);
            }
            // A resumed session: the answer follows what it missed.
            Some(g) => {
                push_replay(self);
                self.resumed_join(g, body, now, tx);
            }
            None => {
                self.reply(id, &ack_of(ack, AckBody::Join(body)));
                push_replay(self);
            }
        }
    }

    /// The owner refused a join: forget it, and answer.
    pub(super) fn join_refused(
        &mut self,
        id: ConnId,
        channel: &str,
        ack: Option<u64>,
        (code, reason): (ErrorCode, String),
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let gather = self.conn_mut(id).and_then(|c| {
            let links = c.links.as_mut()?;
            let i = links.channels.iter().position(|(ch, s)| {
                **ch == *channel && matches!(s, JoinState::Pending(p) if p.ack == ack)
            })?;
            match links.channels.remove(i).1 {
                JoinState::Pending(p) => Some(p.gather),
                JoinState::Joined => None,
            }
        });
        match gather {
            Some(Some(g)) if g != super::subscribe::SERVER_JOIN => {
                self.resumed_join_gone(g, now, tx)
            }
            Some(_) => self.error(id, ack, code, reason),
            // Left (or closed) while the join was in flight: the join is
            // still answered, if anyone is there to hear.
            None if ack.is_some() => self.error(id, ack, code, reason),
            None => {}
        }
    }
}
