//! Presence: on a user's home shard, devices coming and going, status
//! and activity updates, heartbeats, and telling subscribers and the other
//! nodes; on the asking connection's shard, subscriptions and bulk reads.
//!
//! Handlers are named after their event: `on_<event>` on the member's
//! connection's shard (checks, then the request goes on), and after the
//! event again on the shard that carries it out.

use super::*;

impl<O: Outbound> Engine<O> {
    /// A user's connection authenticated (on any shard): counted against
    /// the per-user cap, then a device of the user, online.
    pub(super) fn device_online(
        &mut self,
        r: UserReq,
        session: SessionId,
        device: DeviceKind,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let (user, from, _) = r.parts();
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
        let pending: Vec<Notification> = st.notifications().filter(|n| !n.read).cloned().collect();
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

    /// A user's connection closed: kept for resuming if it may be, taken
    /// out of its voice channel and calls, and the presence announced.
    pub(super) fn device_offline(
        &mut self,
        r: UserReq,
        resume: Option<ResumePoints>,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let (user, from, _) = r.parts();
        let presence_grace_ms = self.s.presence_grace_ms;
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
        if let Some(channels) = resume {
            self.detach_session(&user, device.session, channels, now, tx);
        }
        let Some(st) = self.users.get_mut(&user) else {
            return;
        };
        st.last_seen = now;
        if st.devices.is_empty() {
            st.left_at = Some(user::at(now));
            self.wake_user(&user, now + presence_grace_ms);
        }
        let voice = self
            .users
            .get_mut(&user)
            .and_then(|st| st.extra_mut())
            .and_then(|m| m.voice.take_if(|(_, c)| *c == conn));
        if let Some((channel, _)) = voice {
            let member = Member {
                user: user.clone(),
                session: device.session,
                protocol: device.protocol,
            };
            self.voice_op(channel, conn, member, None, ChanCmd::VoiceLeave, now, tx);
        }
        self.calls_of_gone_device(&user, conn, device.protocol, now, tx);
        self.announce(&user, now, tx);
    }

    /// `presence:update`: a device's status or kind, the user's custom
    /// status or activity.
    pub(super) fn presence_update(
        &mut self,
        r: UserReq,
        p: PresenceUpdate,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let (user, from, ack) = r.parts();
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
        self.answer(from, &empty_ack(ack), now, tx);
    }

    /// `presence:heartbeat`: the user was seen now.
    pub(super) fn presence_heartbeat(&mut self, r: UserReq, now: u64, tx: &mut impl MeshTx) {
        let (user, from, ack) = r.parts();
        self.user(&user).last_seen = now;
        self.answer(from, &empty_ack(ack), now, tx);
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

    /// Presence of this shard's users. In a cluster the other nodes' views
    /// are read from Redis first (the bridge comes back with them).
    pub(super) fn presence_query(
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
        let mut kept = Vec::new();
        for user in &q.users {
            let remote = loaded.next().unwrap_or_default();
            views.push(match self.users.get_mut(user) {
                Some(st) if st.following => {
                    // Followed: what was read is kept (a later view that
                    // came meanwhile stays).
                    for p in remote {
                        st.set_remote(p);
                    }
                    kept.push(user.clone());
                    st.view(user, now)
                }
                Some(st) => user::merge(st.local_view(user, now), 0, &remote),
                None => user::merge(UserState::default().view(user, now), 0, &remote),
            });
        }
        // What was read becomes what subscribers were last told, so that
        // the next change (another node gone, say) reaches them, even when
        // the read that following started comes back after it.
        for user in kept {
            self.announce(&user, now, tx);
        }
        let g = Gathered {
            gather: q.gather,
            part: GatherPart::Presences(views),
        };
        self.route(q.from.shard, MeshMsg::Gathered(Box::new(g)), now, tx);
    }

    /// `presence:update`: checked here, then to the user's home.
    pub(super) fn on_presence_update(
        &mut self,
        id: ConnId,
        ack: Option<u64>,
        p: PresenceUpdate,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        if let Err(e) = check_presence(&p) {
            return self.error(id, ack, ErrorCode::BadRequest, e);
        }
        if let Some(d) = p.device {
            if let Some(c) = self.conn_mut(id) {
                c.device = d;
            }
        }
        self.ask_home(id, ack, UserCmd::Update(p), now, tx)
    }

    /// `presence:heartbeat`, to the user's home.
    pub(super) fn on_presence_heartbeat(
        &mut self,
        id: ConnId,
        ack: Option<u64>,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        self.ask_home(id, ack, UserCmd::Heartbeat, now, tx)
    }

    /// `presence:unsubscribe`: this connection stops following these users.
    pub(super) fn on_presence_unsubscribe(
        &mut self,
        id: ConnId,
        ack: Option<u64>,
        u: UserIds,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let Some(c) = self.conn_mut(id) else { return };
        let mut gone = Vec::new();
        if let Some(subscriptions) = c.links.as_mut().and_then(|l| l.subscriptions.as_mut()) {
            subscriptions.retain(|s| {
                let drop = u.user_ids.iter().any(|u| **u == **s);
                if drop {
                    gone.push(s.clone());
                }
                !drop
            });
        }
        self.unsubscribe_all(id, gone, now, tx);
        self.reply(id, &empty_ack(ack));
    }

    /// `presence:subscribe`: the users' presence now, and each change after.
    pub(super) fn on_presence_subscribe(
        &mut self,
        id: ConnId,
        ack: Option<u64>,
        u: UserIds,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        self.ask_presence(id, ack, u.user_ids, true, now, tx);
    }

    /// `presence:get_bulk`: the users' presence now.
    pub(super) fn on_presence_get_bulk(
        &mut self,
        id: ConnId,
        ack: Option<u64>,
        u: UserIds,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        self.ask_presence(id, ack, u.user_ids, false, now, tx);
    }

    /// Asks the users' homes (gathered from every shard; in a cluster, with
    /// the other nodes' parts from Redis) for their presence.
    pub(super) fn ask_presence(
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
            conn.links()
                .subscriptions
                .get_or_insert_with(Default::default)
                .extend(new);
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

    /// Other nodes' parts of a user's presence.
    pub(super) fn on_remote_presences(
        &mut self,
        user: Arc<str>,
        views: Vec<NodePresence>,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let Some(st) = self.users.get_mut(&user) else {
            return;
        };
        if !st.following {
            return;
        }
        for p in views {
            st.set_remote(p);
        }
        self.announce(&user, now, tx);
    }

    /// Nodes went silent: their members and users' parts are dropped.
    pub(super) fn on_nodes_gone(&mut self, nodes: Vec<u64>, now: u64, tx: &mut impl MeshTx) {
        for o in self.owned.values_mut() {
            o.remote_members.retain(|(n, _)| !nodes.contains(n));
        }
        let users: Vec<Arc<str>> = self
            .users
            .iter_mut()
            .filter_map(|(u, st)| st.drop_nodes(&nodes).then(|| u.clone()))
            .collect();
        for user in users {
            self.announce(&user, now, tx);
            self.maintain_user(&user, now, tx);
        }
    }

    /// Redis lost this node's presences: every user is published again.
    pub(super) fn on_republish(&mut self, now: u64, tx: &mut impl MeshTx) {
        let users: Vec<Arc<str>> = self.users.keys().cloned().collect();
        for user in users {
            if let Some(st) = self.users.get_mut(&user) {
                st.published = None;
            }
            self.announce(&user, now, tx);
        }
    }
}
