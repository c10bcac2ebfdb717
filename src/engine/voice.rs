//! Voice channels: on the user's home (one voice channel per user) and on
//! the channel's owner (the room, its participants and their states).
//!
//! Handlers are named after their event: `on_<event>` on the member's
//! connection's shard (checks, then the request goes on), and after the
//! event again on the shard that carries it out.

use super::*;

impl<O: Outbound> Engine<O> {
    /// `voice:join`, on the user's home: one voice channel per user (the
    /// one before is left, here and on other nodes), then the channel's
    /// owner adds the member.
    pub(super) fn voice_join_home(
        &mut self,
        r: UserReq,
        channel: Arc<str>,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let (user, from, ack) = r.parts();
        let Some((conn, protocol)) = from else { return };
        let Some(session) = self
            .users
            .get(&user)
            .and_then(|st| st.devices.iter().find(|d| d.conn == conn))
            .map(|d| d.session)
        else {
            return;
        };
        // One voice channel per user: leave the one before, here
        // and on the other nodes.
        let same = self
            .users
            .get(&user)
            .and_then(|st| st.extra()?.voice.clone())
            .is_some_and(|(old, old_conn)| old == channel && old_conn == conn);
        if !same {
            self.leave_voice_for(&user, Some((session, protocol)), now, tx);
        }
        if self.cluster_up() {
            let msg = ToBridge::VoiceJoined {
                user: user.clone(),
                channel: channel.clone(),
                at: now,
            };
            self.send_bridge(msg, now, tx);
        }
        self.counter += 1;
        let seq = self.counter;
        let m = self.user(&user).more();
        m.voice = Some((channel.clone(), conn));
        m.voice_at = now;
        m.voice_seq = seq;
        let member = Member {
            user,
            session,
            protocol,
        };
        let join = ChanCmd::VoiceJoin { seq };
        self.voice_op(channel, conn, member, ack, join, now, tx);
    }

    /// `voice:leave` or `voice:update`, on the user's home, for the
    /// device that is in the user's voice channel.
    pub(super) fn voice_leave_or_update_home(
        &mut self,
        r: UserReq,
        op: UserCmd,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let (user, from, ack) = r.parts();
        let Some((conn, protocol)) = from else { return };
        let st = self.user(&user);
        let session = st
            .devices
            .iter()
            .find(|d| d.conn == conn)
            .map(|d| d.session);
        let in_voice = st
            .extra()
            .and_then(|m| m.voice.as_ref())
            .is_some_and(|(_, c)| *c == conn);
        let (Some(session), true) = (session, in_voice) else {
            let e = err(ack, ErrorCode::NotFound, "not in a voice channel");
            return self.answer(from, &e, now, tx);
        };
        let (channel, cmd) = match op {
            UserCmd::VoiceUpdate(u) => {
                let channel = st.more().voice.as_ref().expect("checked").0.clone();
                (channel, ChanCmd::VoiceUpdate(u))
            }
            _ => {
                let (channel, _) = st.more().voice.take().expect("checked");
                (channel, ChanCmd::VoiceLeave)
            }
        };
        let member = Member {
            user,
            session,
            protocol,
        };
        self.voice_op(channel, conn, member, ack, cmd, now, tx);
    }

    /// The user was taken out of this channel's voice room, from what
    /// join `seq` put there: forgotten here unless a later join is on its
    /// way to the owner.
    pub(super) fn voice_gone_home(
        &mut self,
        r: UserReq,
        channel: Arc<str>,
        seq: u64,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let (user, _, _) = r.parts();
        if let Some(st) = self.users.get_mut(&user) {
            if let Some(m) = st.extra_mut() {
                if m.voice_seq == seq {
                    m.voice.take_if(|(c, _)| *c == channel);
                }
            }
        }
        self.maintain_user(&user, now, tx);
    }

    /// Takes the user out of the voice channel it is in here (it joins
    /// another, here or on another node); `fallback`: the session and
    /// protocol to leave with if the device in it is gone.
    pub(super) fn leave_voice_for(
        &mut self,
        user: &Arc<str>,
        fallback: Option<(SessionId, Protocol)>,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let Some(st) = self.users.get_mut(user) else {
            return;
        };
        let Some((old, old_conn)) = st.extra_mut().and_then(|m| m.voice.take()) else {
            return;
        };
        let device = st.devices.iter().find(|d| d.conn == old_conn);
        let Some((session, protocol)) = device.map(|d| (d.session, d.protocol)).or(fallback) else {
            return;
        };
        let member = Member {
            user: user.clone(),
            session,
            protocol,
        };
        self.voice_op(old, old_conn, member, None, ChanCmd::VoiceLeave, now, tx);
        self.maintain_user(user, now, tx);
    }

    /// Sends a voice command for `member` on connection `conn` to the
    /// channel's owner; the owner answers only when `ack` is set.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn voice_op(
        &mut self,
        channel: Arc<str>,
        conn: ConnRef,
        member: Member,
        ack: Option<u64>,
        op: ChanCmd,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let owner = owner_of(&channel, self.shards);
        let op = ChannelOp {
            channel,
            from: conn,
            member,
            ack,
            op,
        };
        self.route(owner, MeshMsg::ChannelOp(Box::new(op)), now, tx);
    }

    /// `voice:join`, on the channel's owner (the user's home chose this
    /// channel): a participant, with a LiveKit token when configured.
    pub(super) fn voice_join_owner(
        &mut self,
        req: ChanReq,
        seq: u64,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let (channel, from, member, ack) = req.parts();
        let reply = Reply::to(from, member.protocol, ack);
        let Some(owned) = self.owned.get_mut(&channel) else {
            return;
        };
        let state = match owned.voice.iter_mut().find(|p| p.user == member.user) {
            Some(p) => {
                p.conn = from;
                p.seq = seq;
                p.state
            }
            None => {
                owned.voice.push(Participant {
                    user: member.user.clone(),
                    conn: from,
                    state: VoiceState::default(),
                    seq,
                });
                VoiceState::default()
            }
        };
        let participants = owned.voice_participants();
        let event = ev(ServerEvent::VoiceUserJoined(VoiceEvent {
            channel_id: channel.to_string(),
            user_id: member.user.to_string(),
            state: Some(state),
        }));
        self.fan_out(&channel, &event, None, now, tx);
        let (token, server_url) = match &self.s.livekit {
            Some(lk) => (
                Some(crate::livekit::livekit_token(
                    lk,
                    &channel,
                    &member.user,
                    now / 1000,
                )),
                Some(lk.url.clone()),
            ),
            None => (None, None),
        };
        let body = AckBody::Voice(VoiceAck {
            channel_id: channel.to_string(),
            participants,
            token,
            server_url,
        });
        self.send_reply(reply, ack_of(ack, body), now, tx);
    }

    /// `voice:leave`, on the channel's owner.
    pub(super) fn voice_leave_owner(&mut self, req: ChanReq, now: u64, tx: &mut impl MeshTx) {
        let (channel, from, member, ack) = req.parts();
        let reply = Reply::to(from, member.protocol, ack);
        let Some(owned) = self.owned.get_mut(&channel) else {
            return;
        };
        let was = owned
            .voice
            .iter()
            .position(|p| p.user == member.user && p.conn == from)
            .map(|i| owned.voice.remove(i));
        if was.is_some() {
            let event = ev(ServerEvent::VoiceUserLeft(VoiceEvent {
                channel_id: channel.to_string(),
                user_id: member.user.to_string(),
                state: None,
            }));
            self.fan_out(&channel, &event, None, now, tx);
            if self.owned.get(&channel).is_some_and(|o| o.total() == 0) {
                self.channel_gc(&channel, now, tx);
            }
        }
        if ack.is_some() {
            self.send_reply(reply, empty_ack(ack), now, tx);
        }
    }

    /// `voice:update`, on the channel's owner: a participant's mute, deaf
    /// or video state.
    pub(super) fn voice_update_owner(
        &mut self,
        req: ChanReq,
        u: VoiceUpdate,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let (channel, from, member, ack) = req.parts();
        let reply = Reply::to(from, member.protocol, ack);
        let Some(owned) = self.owned.get_mut(&channel) else {
            return;
        };
        let Some(p) = owned
            .voice
            .iter_mut()
            .find(|p| p.user == member.user && p.conn == from)
        else {
            let e = err(ack, ErrorCode::NotFound, "not in a voice channel");
            return self.send_reply(reply, e, now, tx);
        };
        if apply_voice(&mut p.state, &u) {
            let event = ev(ServerEvent::VoiceStateUpdate(VoiceEvent {
                channel_id: channel.to_string(),
                user_id: member.user.to_string(),
                state: Some(p.state),
            }));
            self.fan_out(&channel, &event, None, now, tx);
        }
        self.send_reply(reply, empty_ack(ack), now, tx);
    }

    /// `voice:get_participants`: every participant, on every node.
    pub(super) fn voice_participants(&mut self, req: ChanReq, now: u64, tx: &mut impl MeshTx) {
        self.channel_query(req, ChannelPart::Voice(Vec::new()), now, tx);
    }

    /// `voice:join`: checked here, then to the user's home (one voice channel per user).
    pub(super) fn on_voice_join(
        &mut self,
        id: ConnId,
        ack: Option<u64>,
        c: ChannelRef,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        if let Err((code, e)) = self.check_voice(id, &c.channel_id) {
            return self.error(id, ack, code, e);
        }
        let channel = c.channel_id.into();
        self.ask_home(id, ack, UserCmd::VoiceJoin { channel }, now, tx)
    }

    /// `voice:leave`, to the user's home.
    pub(super) fn on_voice_leave(
        &mut self,
        id: ConnId,
        ack: Option<u64>,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        self.ask_home(id, ack, UserCmd::VoiceLeave, now, tx)
    }

    /// `voice:update`, to the user's home.
    pub(super) fn on_voice_update(
        &mut self,
        id: ConnId,
        ack: Option<u64>,
        u: VoiceUpdate,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        self.ask_home(id, ack, UserCmd::VoiceUpdate(u), now, tx)
    }

    /// `voice:get_participants`, to the channel's owner (text membership is not required).
    pub(super) fn on_voice_get_participants(
        &mut self,
        id: ConnId,
        ack: Option<u64>,
        c: ChannelRef,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let Some(member) = self.conn(id).map(|c| c.member.clone()) else {
            return;
        };
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

    /// The user joined a voice channel on another node: the later join
    /// wins, the same way on every node.
    pub(super) fn on_voice_elsewhere(
        &mut self,
        user: Arc<str>,
        at: u64,
        node: u64,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let me = self.cluster.as_ref().map_or(0, |c| c.node);
        let mine = self
            .users
            .get(&user)
            .and_then(|st| st.extra())
            .map(|m| m.voice_at);
        // The later join wins, the same way on every node.
        if mine.is_some_and(|t| (at, node) > (t, me)) {
            self.leave_voice_for(&user, None, now, tx);
        }
    }
}
