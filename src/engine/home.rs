//! A user's home shard: devices and presence, subscribers, direct
//! messages, notifications, the voice channel, and resumable sessions.

use std::sync::Arc;

use super::*;

impl<O: Outbound> Engine<O> {
    pub(super) fn user(&mut self, user: &Arc<str>) -> &mut UserState {
        self.users.entry(user.clone()).or_default()
    }

    /// After any change to a user's state: in a cluster, follows the user
    /// while it has devices or presence subscribers here; drops the state
    /// once nothing is left in it; otherwise makes sure a deviceless user's
    /// state has a timer that will let it expire.
    pub(super) fn maintain_user(&mut self, user: &Arc<str>, now: u64, tx: &mut impl MeshTx) {
        let up = self.cluster_up();
        let Some(st) = self.users.get_mut(user) else {
            return;
        };
        let wanted = self.cluster.is_some() && st.wants_following();
        if wanted != st.following {
            st.following = wanted;
            if let Some(m) = st.extra_mut().filter(|_| !wanted) {
                // What other nodes show is only kept while followed.
                m.remote.clear();
            }
            if up {
                let user = user.clone();
                let msg = match wanted {
                    true => ToBridge::FollowUser { user },
                    false => ToBridge::UnfollowUser { user },
                };
                self.send_bridge(msg, now, tx);
            }
        }
        let Some(st) = self.users.get_mut(user) else {
            return;
        };
        st.shrink();
        if st.is_empty() {
            // Gone while Redis is out of reach: what it still shows of the
            // user from this node is retracted when it is back.
            let (published, last_seen) = (st.published.is_some(), st.last_seen);
            if let Some(c) = self.cluster.as_mut().filter(|_| published && !up) {
                c.retract.insert(user.clone(), last_seen);
            }
            self.users.remove(user);
        } else if st.devices.is_empty() && st.wake.is_none() {
            self.wake_user(user, now + 1);
        }
    }

    /// Files the user's timer for `at`, unless an earlier one is pending
    /// (it will file the next one when it runs).
    pub(super) fn wake_user(&mut self, user: &Arc<str>, at: u64) {
        let Some(st) = self.users.get_mut(user) else {
            return;
        };
        if st.wake.is_none_or(|w| at < w.get()) {
            st.wake = Some(user::at(at));
            self.timers.at(at, Timer::User { user: user.clone() });
        }
    }

    /// Tells subscribers when the user's presence changed, and in a cluster
    /// the other nodes when this node's part of it did.
    pub(super) fn announce(&mut self, user: &Arc<str>, now: u64, tx: &mut impl MeshTx) {
        let node = self.cluster.as_ref().filter(|c| c.up).map(|c| c.node);
        let seq = node.map(|_| self.next_id());
        let Some(st) = self.users.get_mut(user) else {
            return;
        };
        if let Some(p) = node
            .zip(seq)
            .and_then(|(node, seq)| st.publish(user, now, node, seq))
        {
            self.send_bridge(ToBridge::Presence(Box::new(p)), now, tx);
        }
        let Some(st) = self.users.get_mut(user) else {
            return;
        };
        let Some(view) = st.change(user, now) else {
            return;
        };
        let targets = st
            .extra()
            .map(|m| m.subscribers.clone())
            .unwrap_or_default();
        self.send_to_all(&targets, &ev(ServerEvent::PresenceChanged(view)), now, tx);
    }

    pub(super) fn devices(&self, user: &Arc<str>) -> Vec<(ConnRef, Protocol)> {
        self.users
            .get(user)
            .map(|u| u.devices.iter().map(|d| (d.conn, d.protocol)).collect())
            .unwrap_or_default()
    }

    /// Sends an event to every device of a user (this shard is its home).
    pub(super) fn send_devices(
        &mut self,
        user: &Arc<str>,
        event: ServerEvent,
        except: Option<ConnRef>,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let targets: Vec<_> = self
            .devices(user)
            .into_iter()
            .filter(|(c, _)| Some(*c) != except)
            .collect();
        self.send_to_all(&targets, &ev(event), now, tx);
    }

    pub(super) fn on_user_op(&mut self, op: UserOp, now: u64, tx: &mut impl MeshTx) {
        let user = op.user.clone();
        self.user_op(op, now, tx);
        self.maintain_user(&user, now, tx);
    }

    fn user_op(&mut self, op: UserOp, now: u64, tx: &mut impl MeshTx) {
        let UserOp {
            user,
            from,
            ack,
            op,
        } = op;
        let reply = |e: &mut Self, msg: ServerMessage, tx: &mut _| e.answer(from, &msg, now, tx);
        // Copied out: the arms below borrow the user's state mutably.
        let (resume_window_ms, presence_grace_ms, max_conversations) = (
            self.s.resume_window_ms,
            self.s.presence_grace_ms,
            self.s.max_conversations,
        );
        match op {
            UserCmd::Online { session, device } => {
                let Some((conn, protocol)) = from else { return };
                if let Some(ban) = self.bans.server(&user, now) {
                    // Banned while this connection was authenticating.
                    let msg = MeshMsg::Disconnect {
                        conn: conn.conn,
                        moderation: ban.clone(),
                    };
                    return self.route(conn.shard, msg, now, tx);
                }
                let max = self.s.max_connections_per_user as usize;
                let full = max > 0
                    && self
                        .users
                        .get(&user)
                        .is_some_and(|st| st.devices.len() >= max);
                let admission = MeshMsg::Admission {
                    conn: conn.conn,
                    refused: full,
                };
                self.route(conn.shard, admission, now, tx);
                if full {
                    return;
                }
                let before = self.user_shards(&user);
                let st = self.user(&user);
                if st.devices.is_empty() {
                    self.online_users += 1;
                    self.metrics.online_users.set(self.online_users as u64);
                }
                let st = self.user(&user);
                st.add_device(Device {
                    conn,
                    session,
                    kind: device,
                    status: Status::Online,
                    protocol,
                });
                self.spread(&user, &before, now, tx);
                let first_here = self.user(&user).devices.len() == 1;
                if first_here && self.cluster_up() {
                    // Notifications made on other nodes meanwhile.
                    let user = user.clone();
                    let msg = ToBridge::LoadNotifications { user, asker: None };
                    self.send_bridge(msg, now, tx);
                }
                let st = self.users.entry(user.clone()).or_default();
                st.left_at = None;
                st.last_seen = now;
                st.expire_notifications(now, &mut self.notes);
                let pending: Vec<Notification> =
                    st.notifications().filter(|n| !n.read).cloned().collect();
                self.announce(&user, now, tx);
                for n in pending {
                    self.send_to(
                        conn,
                        protocol,
                        &ev(ServerEvent::NotificationNew(n)),
                        now,
                        tx,
                    );
                }
            }
            UserCmd::Offline { resume } => {
                let Some((conn, _)) = from else { return };
                let before = self.user_shards(&user);
                let Some(st) = self.users.get_mut(&user) else {
                    return;
                };
                let Some(i) = st.devices.iter().position(|d| d.conn == conn) else {
                    return;
                };
                let device = st.devices.remove(i);
                if st.devices.is_empty() {
                    self.online_users -= 1;
                    self.metrics.online_users.set(self.online_users as u64);
                }
                self.spread(&user, &before, now, tx);
                let up = self.cluster_up();
                let Some(st) = self.users.get_mut(&user) else {
                    return;
                };
                st.last_seen = now;
                let mut wake = Vec::new();
                let mut keep = None;
                if let Some(channels) = resume {
                    let kept = up;
                    if up {
                        // Any node may resume it.
                        keep = Some(ToBridge::KeepSession {
                            user: user.clone(),
                            session: device.session,
                            points: channels.clone(),
                            ttl_ms: resume_window_ms,
                        });
                    }
                    st.more().detached.push(Detached {
                        session: device.session,
                        channels,
                        until: now + resume_window_ms,
                        kept,
                    });
                    wake.push(now + resume_window_ms);
                }
                if st.devices.is_empty() {
                    st.left_at = Some(user::at(now));
                    wake.push(now + presence_grace_ms);
                }
                let voice = st
                    .extra_mut()
                    .and_then(|m| m.voice.take_if(|(_, c)| *c == conn));
                let placed: Vec<u64> = st
                    .extra_mut()
                    .map(|m| {
                        let placed = m
                            .calls
                            .iter()
                            .filter(|(_, c)| *c == conn)
                            .map(|(id, _)| *id)
                            .collect();
                        m.calls.retain(|(_, c)| *c != conn);
                        placed
                    })
                    .unwrap_or_default();
                for at in wake {
                    self.wake_user(&user, at);
                }
                if let Some(keep) = keep {
                    self.send_bridge(keep, now, tx);
                }
                if let Some((channel, _)) = voice {
                    let member = Member {
                        user: user.clone(),
                        session: device.session,
                        protocol: device.protocol,
                    };
                    self.voice_op(channel, conn, member, None, ChanCmd::VoiceLeave, now, tx);
                }
                // A gone party's operation on a call, from this connection.
                let gone = |call| {
                    Box::new(CallOp {
                        call,
                        user: user.clone(),
                        from: Some((conn, device.protocol)),
                        ack: None,
                        op: CallCmd::PartyGone,
                    })
                };
                for call in placed {
                    let op = MeshMsg::CallOp(gone(call));
                    self.route((call >> 48) as ShardId, op, now, tx);
                }
                // Calls this device answered end with it.
                let answered: Vec<u64> = self
                    .calls
                    .iter()
                    .filter(|(_, c)| c.callee == user && c.answered.is_some_and(|(a, _)| a == conn))
                    .map(|(id, _)| *id)
                    .collect();
                for call in answered {
                    self.end_call(call, "disconnected", &user, now, tx);
                }
                // And calls of other nodes it answered.
                let remote: Vec<(u64, u64)> = self
                    .users
                    .get_mut(&user)
                    .and_then(|st| st.extra_mut())
                    .map(|m| {
                        let gone = m
                            .remote_calls
                            .iter()
                            .filter(|r| r.answered_by == Some(conn))
                            .map(|r| (r.call, r.node))
                            .collect();
                        m.remote_calls.retain(|r| r.answered_by != Some(conn));
                        gone
                    })
                    .unwrap_or_default();
                for (call, node) in remote {
                    let op = gone(call);
                    self.send_bridge(ToBridge::CallTo { node, op }, now, tx);
                }
                self.announce(&user, now, tx);
            }
            UserCmd::Update(p) => {
                let Some((conn, _)) = from else { return };
                let st = self.user(&user);
                if let Some(d) = st.device_mut(conn) {
                    if let Some(status) = p.status {
                        d.status = status;
                    }
                    if let Some(kind) = p.device {
                        d.kind = kind;
                    }
                }
                if p.custom_status.is_some() || p.activity.is_some() {
                    st.more().detail_at = now;
                }
                if let Some(c) = p.custom_status {
                    st.more().custom_status = c;
                }
                if let Some(a) = p.activity {
                    st.more().activity = a;
                }
                st.last_seen = now;
                self.announce(&user, now, tx);
                reply(self, empty_ack(ack), tx);
            }
            UserCmd::Heartbeat => {
                self.user(&user).last_seen = now;
                reply(self, empty_ack(ack), tx);
            }
            UserCmd::DmSend(d) => {
                let st = self.user(&user);
                if let Some(first) = d.nonce.as_deref().and_then(|n| st.dm_by_nonce(n)) {
                    let body = AckBody::Dm(DmAck {
                        message_id: first.message_id.clone(),
                        to_user_id: first.to_user_id.clone(),
                        timestamp: first.timestamp,
                        duplicate: true,
                    });
                    return reply(self, ack_of(ack, body), tx);
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
                reply(self, ack_of(ack, body), tx);
                self.send_devices(
                    &user,
                    ServerEvent::DmSent(msg.clone()),
                    from.map(|f| f.0),
                    now,
                    tx,
                );
                self.tell_other_nodes(&user, ServerEvent::DmSent(msg.clone()), now, tx);
                self.send_user_op(to, None, None, UserCmd::DmDeliver(msg), now, tx);
            }
            UserCmd::DmDeliver(msg) => {
                let from_user: Arc<str> = msg.from_user_id.as_str().into();
                self.user(&user)
                    .record_dm(&from_user, msg.clone(), true, max_conversations);
                self.keep_conversation(&user, &from_user, &msg, true, now, tx);
                self.tell_other_nodes(&user, ServerEvent::DmNew(msg.clone()), now, tx);
                self.send_devices(&user, ServerEvent::DmNew(msg), None, now, tx);
            }
            UserCmd::Conversations { limit } => {
                let limit = limit.unwrap_or(50) as usize;
                // In a cluster, Redis has every node's.
                if let (Some((conn, protocol)), true) = (from, self.cluster_up()) {
                    let asker = (conn, protocol, ack);
                    let msg = ToBridge::LoadConversations { user, limit, asker };
                    return self.send_bridge(msg, now, tx);
                }
                let conversations = self.local_conversations(&user, limit);
                let body = AckBody::Conversations(ConversationsAck { conversations });
                reply(self, ack_of(ack, body), tx);
            }
            UserCmd::Notify { kind, data, from } => {
                // Past a bound it is not kept (counted in the metrics): the
                // sender is not told of a side effect of its message.
                let _ = self.notify(&user, kind, data, from, now, tx);
            }
            UserCmd::NotificationsPending => {
                // In a cluster, with those made elsewhere that did not reach
                // this node (the user was not connected here then).
                if let (Some((conn, protocol)), true) = (from, self.cluster_up()) {
                    let asker = Some((conn, protocol, ack));
                    let msg = ToBridge::LoadNotifications { user, asker };
                    return self.send_bridge(msg, now, tx);
                }
                let msg = self.pending_notifications(&user, ack, now);
                reply(self, msg, tx);
            }
            // In a cluster, answered once Redis has the change: a device
            // that connects next anywhere sees it.
            UserCmd::NotificationsRead(ids) => {
                let change = NotificationChange::Read(ids);
                let keep = self.change_notifications(&user, &change, now);
                self.tell_notifications(&user, change, keep, from, ack, now, tx);
            }
            UserCmd::NotificationClear(id) => {
                let change = NotificationChange::Clear(id.clone());
                let gone = self.change_notifications(&user, &change, now);
                if gone.is_empty() {
                    let e = err(ack, ErrorCode::NotFound, format!("no notification `{id}`"));
                    return reply(self, e, tx);
                }
                self.tell_notifications(&user, change, gone, from, ack, now, tx);
            }
            UserCmd::NotificationClearAll => {
                let change = NotificationChange::ClearAll;
                self.change_notifications(&user, &change, now);
                self.tell_notifications(&user, change, Vec::new(), from, ack, now, tx);
            }
            UserCmd::Delivery(d) => {
                self.tell_other_nodes(&user, ServerEvent::MessageDelivery(d.clone()), now, tx);
                self.send_devices(&user, ServerEvent::MessageDelivery(d), None, now, tx);
            }
            UserCmd::VoiceJoin { channel } => {
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
                let m = self.user(&user).more();
                m.voice = Some((channel.clone(), conn));
                m.voice_at = now;
                let member = Member {
                    user,
                    session,
                    protocol,
                };
                self.voice_op(channel, conn, member, ack, ChanCmd::VoiceJoin, now, tx);
            }
            UserCmd::VoiceLeave | UserCmd::VoiceUpdate(_) => {
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
                    return reply(self, e, tx);
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
            UserCmd::CallInitiate(c) => {
                let Some((conn, protocol)) = from else { return };
                let callee: Arc<str> = c.to_user_id.as_str().into();
                let owner = home_of(&callee, self.shards);
                let n = self.next_id() & 0xffff_ffff;
                let call = ((owner as u64) << 48) | ((self.shard as u64) << 32) | n;
                self.user(&user).more().calls.push((call, conn));
                let op = CallOp {
                    call,
                    user,
                    from: Some((conn, protocol)),
                    ack,
                    op: CallCmd::Create {
                        callee,
                        call_type: c.call_type,
                        sdp: c.sdp,
                        elsewhere: None,
                    },
                };
                self.route(owner, MeshMsg::CallOp(Box::new(op)), now, tx);
            }
            UserCmd::VoiceGone { channel } => {
                if let Some(st) = self.users.get_mut(&user) {
                    if let Some(m) = st.extra_mut() {
                        m.voice.take_if(|(c, _)| *c == channel);
                    }
                }
                self.maintain_user(&user, now, tx);
            }
            UserCmd::CallDone { call } => {
                if let Some(st) = self.users.get_mut(&user) {
                    st.more().calls.retain(|(id, _)| *id != call);
                }
            }
            UserCmd::Resume { session, gather } => {
                let Some((conn, _)) = from else { return };
                let here = self.users.get_mut(&user).and_then(|st| {
                    let i = st
                        .more()
                        .detached
                        .iter()
                        .position(|d| d.session == session && d.until > now)?;
                    Some(st.more().detached.remove(i))
                });
                let kept = here.as_ref().is_none_or(|d| d.kept);
                if self.cluster_up() && kept {
                    // Kept in Redis for any node: whoever takes it there
                    // resumes it (once, whichever node held it).
                    let take = ToBridge::TakeSession {
                        user: user.clone(),
                        session,
                        asker: Some((conn, gather)),
                    };
                    self.send_bridge(take, now, tx);
                    self.maintain_user(&user, now, tx);
                    return;
                }
                let channels = here.map(|d| d.channels);
                let g = Gathered {
                    gather,
                    part: GatherPart::Resume(channels),
                };
                self.route(conn.shard, MeshMsg::Gathered(Box::new(g)), now, tx);
            }
        }
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
    fn voice_op(
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

    /// The shards holding the user's connections.
    fn user_shards(&self, user: &Arc<str>) -> Vec<ShardId> {
        let mut shards: Vec<ShardId> = self
            .users
            .get(user)
            .map(|st| st.devices.iter().map(|d| d.conn.shard).collect())
            .unwrap_or_default();
        shards.sort_unstable();
        shards.dedup();
        shards
    }

    /// Tells the shards holding the user's connections how many they are,
    /// when that changed and matters (each takes that share of the user's
    /// rate limits).
    fn spread(&mut self, user: &Arc<str>, before: &[ShardId], now: u64, tx: &mut impl MeshTx) {
        let after = self.user_shards(user);
        if after == before || (before.len() <= 1 && after.len() <= 1) {
            return;
        }
        for s in &after {
            let msg = MeshMsg::Spread {
                user: user.clone(),
                shards: after.len() as u16,
            };
            self.route(*s, msg, now, tx);
        }
        for s in before.iter().filter(|s| !after.contains(s)) {
            let msg = MeshMsg::Spread {
                user: user.clone(),
                shards: 0,
            };
            self.route(*s, msg, now, tx);
        }
    }

    /// Queues a notification for a user (delivered at once to its devices)
    /// and returns it.
    /// A notification for `user` made by `from` (none: the server API),
    /// delivered to its devices and kept for `notification_ttl_ms`, within
    /// the shard's bounds (engine/notifications.rs). Past them it is
    /// delivered to devices online but not kept: the error says why.
    pub(super) fn notify(
        &mut self,
        user: &Arc<str>,
        kind: String,
        data: Option<Json>,
        from: Option<Arc<str>>,
        now: u64,
        tx: &mut impl MeshTx,
    ) -> Result<Notification, notifications::Full> {
        let notification_id = self.mint_id("n");
        let n = Notification {
            notification_id,
            kind,
            data,
            read: false,
            created_at: now,
            expires_at: now + self.s.notification_ttl_ms,
        };
        let shards = self.shards.max(1) as usize;
        let max_total = (self.s.max_stored_notifications / shards).max(1);
        let max_sender = (self.s.max_notifications_per_sender / shards).max(1);
        self.notes.expire_away(now);
        if let Err(full) = self.notes.admit(from.as_ref(), max_total, max_sender) {
            self.metrics.notifications_dropped.inc();
            self.send_devices(user, ServerEvent::NotificationNew(n), None, now, tx);
            return Err(full);
        }
        // In a cluster, Redis keeps it for the nodes the user connects to
        // later; this node keeps it only for devices here.
        let here = !self.cluster_up()
            || self
                .users
                .get(user)
                .is_some_and(|st| !st.devices.is_empty());
        if here {
            let max = self.s.max_notifications;
            let kept = Kept { n: n.clone(), from };
            let st = self.users.entry(user.clone()).or_default();
            st.push_notification(kept, max, &mut self.notes);
            self.wake_user(user, n.expires_at);
            self.send_devices(user, ServerEvent::NotificationNew(n.clone()), None, now, tx);
        } else {
            self.notes.add_away(n.expires_at, from);
        }
        self.metrics
            .notifications_stored
            .set(self.notes.total() as u64);
        let change = NotificationChange::New(n.clone());
        self.tell_notifications(user, change, Vec::new(), None, None, now, tx);
        Ok(n)
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
    fn keep_conversation(
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

    /// The answer to `notification:get_pending`.
    pub(super) fn pending_notifications(
        &mut self,
        user: &Arc<str>,
        ack: Option<u64>,
        now: u64,
    ) -> ServerMessage {
        let notifications = match self.users.get_mut(user) {
            Some(st) => {
                st.expire_notifications(now, &mut self.notes);
                st.notifications().cloned().collect()
            }
            None => Vec::new(),
        };
        ack_of(
            ack,
            AckBody::Notifications(NotificationsAck { notifications }),
        )
    }

    /// Applies a change to the user's notifications here; returns the
    /// notifications it touched (read, or cleared).
    pub(super) fn change_notifications(
        &mut self,
        user: &Arc<str>,
        change: &NotificationChange,
        now: u64,
    ) -> Vec<Notification> {
        let max = self.s.max_notifications;
        let Some(st) = self.users.get_mut(user) else {
            return Vec::new();
        };
        let touched = match change {
            NotificationChange::New(n) => {
                // Made on another node: the sender was counted there.
                let kept = Kept {
                    n: n.clone(),
                    from: None,
                };
                st.push_notification(kept, max, &mut self.notes);
                let at = n.expires_at;
                self.wake_user(user, at);
                self.metrics
                    .notifications_stored
                    .set(self.notes.total() as u64);
                return vec![n.clone()];
            }
            NotificationChange::Read(ids) => st
                .more()
                .notifications
                .iter_mut()
                .map(|k| &mut k.n)
                .filter(|n| ids.contains(&n.notification_id))
                .map(|n| {
                    n.read = true;
                    n.clone()
                })
                .collect(),
            NotificationChange::Clear(id) => {
                let mut once = true;
                st.remove_notifications(
                    |n| n.notification_id == *id && std::mem::take(&mut once),
                    &mut self.notes,
                )
            }
            NotificationChange::ClearAll => st.remove_notifications(|_| true, &mut self.notes),
        };
        st.expire_notifications(now, &mut self.notes);
        self.metrics
            .notifications_stored
            .set(self.notes.total() as u64);
        touched
    }

    /// In a cluster: a change of the user's notifications made here, for
    /// Redis and the other nodes. Its asker (if any) is answered once Redis
    /// has it, or at once on a single node.
    #[allow(clippy::too_many_arguments)]
    fn tell_notifications(
        &mut self,
        user: &Arc<str>,
        change: NotificationChange,
        keep: Vec<Notification>,
        from: Option<(ConnRef, Protocol)>,
        ack: Option<u64>,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        if self.cluster_up() {
            let user = user.clone();
            let asker = from.map(|(c, p)| (c, p, ack));
            let msg = ToBridge::Notifications {
                user,
                change,
                keep,
                asker,
            };
            return self.send_bridge(msg, now, tx);
        }
        self.answer(from, &empty_ack(ack), now, tx);
    }

    /// Whatever is due for a user: the end of the grace period, resume
    /// windows, notifications, and (for a user without devices) the
    /// conversation list, kept `notification_ttl_ms` after the last activity.
    /// Files the next wake-up from everything still pending.
    pub(super) fn user_timer(&mut self, user: &Arc<str>, now: u64, tx: &mut impl MeshTx) {
        let (grace, ttl) = (self.s.presence_grace_ms, self.s.notification_ttl_ms);
        let Some(st) = self.users.get_mut(user) else {
            return;
        };
        st.wake = None;
        let mut next: Option<u64> = None;
        let mut soon = |t: u64| next = Some(next.map_or(t, |n: u64| n.min(t)));
        if let Some(n) = st.expire_notifications(now, &mut self.notes) {
            soon(n);
        }
        self.metrics
            .notifications_stored
            .set(self.notes.total() as u64);
        if let Some(m) = st.extra_mut() {
            m.detached.retain(|d| d.until > now);
            for d in &m.detached {
                soon(d.until);
            }
        }
        let mut gone = false;
        if st.devices.is_empty() {
            if let Some(left) = st.left_at.map(|l| l.get()) {
                if now >= left + grace {
                    st.left_at = None;
                    gone = true;
                } else {
                    soon(left + grace);
                }
            }
            let last_seen = st.last_seen;
            if let Some(m) = st
                .extra_mut()
                .filter(|m| !m.conversations.is_empty() || !m.dm_nonces.is_empty())
            {
                let last = m
                    .conversations
                    .iter()
                    .map(|c| c.last.timestamp)
                    .max()
                    .unwrap_or(0)
                    .max(last_seen);
                if now >= last + ttl {
                    m.conversations.clear();
                    m.dm_nonces.clear();
                } else {
                    soon(last + ttl);
                }
            }
        }
        if gone {
            self.announce(user, now, tx);
        }
        if let Some(at) = next {
            self.wake_user(user, at);
        }
        self.maintain_user(user, now, tx);
    }

    /// Presence of this shard's users. In a cluster the other nodes' views
    /// are read from Redis first (the bridge comes back with them).
    pub(super) fn on_presence_query(
        &mut self,
        q: PresenceQuery,
        loaded: Option<Vec<Vec<NodePresence>>>,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        if loaded.is_none() && q.subscribe {
            for user in &q.users {
                let st = self.user(user);
                if !st.more().subscribers.iter().any(|(c, _)| *c == q.from) {
                    st.more().subscribers.push((q.from, q.protocol));
                }
                self.maintain_user(user, now, tx);
            }
        }
        if loaded.is_none() && self.cluster_up() {
            return self.send_bridge(ToBridge::LoadPresence(Box::new(q)), now, tx);
        }
        let mut loaded = loaded.unwrap_or_default().into_iter();
        let mut views = Vec::with_capacity(q.users.len());
        for user in &q.users {
            let remote = loaded.next().unwrap_or_default();
            views.push(match self.users.get_mut(user) {
                Some(st) if st.following => {
                    // Followed: what was read is kept (a later view that
                    // came meanwhile stays).
                    for p in remote {
                        st.set_remote(p);
                    }
                    st.view(user, now)
                }
                Some(st) => user::merge(st.local_view(user, now), 0, &remote),
                None => user::merge(UserState::default().view(user, now), 0, &remote),
            });
        }
        let g = Gathered {
            gather: q.gather,
            part: GatherPart::Presences(views),
        };
        self.route(q.from.shard, MeshMsg::Gathered(Box::new(g)), now, tx);
    }
}
