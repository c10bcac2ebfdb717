//! A user's home shard: the routing table of what the home is asked (each
//! request's handler is in its feature's file), and the user's state kept
//! whole (followed in a cluster while needed, dropped once empty, woken by
//! its timers).

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

    /// What a user's home does, by request: each has its handler in the
    /// feature's file.
    fn user_op(&mut self, op: UserOp, now: u64, tx: &mut impl MeshTx) {
        let UserOp {
            user,
            from,
            ack,
            op,
        } = op;
        let r = UserReq { user, from, ack };
        match op {
            UserCmd::Online { session, device } => self.device_online(r, session, device, now, tx),
            UserCmd::Offline { resume } => self.device_offline(r, resume, now, tx),
            UserCmd::Update(p) => self.presence_update(r, p, now, tx),
            UserCmd::Heartbeat => self.presence_heartbeat(r, now, tx),
            UserCmd::DmSend(d) => self.dm_send(r, d, now, tx),
            UserCmd::DmDeliver(msg) => self.dm_deliver(r, msg, now, tx),
            UserCmd::Conversations { limit } => self.dm_conversations(r, limit, now, tx),
            UserCmd::Notify { kind, data, from } => {
                // Past a bound it is not kept (counted in the metrics): the
                // sender is not told of a side effect of its message.
                let _ = self.notify(&r.user, kind, data, from, now, tx);
            }
            UserCmd::NotificationsPending => self.notifications_pending(r, now, tx),
            UserCmd::NotificationsRead(ids) => self.notifications_read(r, ids, now, tx),
            UserCmd::NotificationClear(id) => self.notification_clear(r, id, now, tx),
            UserCmd::NotificationClearAll => self.notifications_clear_all(r, now, tx),
            UserCmd::Delivery(d) => self.delivery_to_author(r, d, now, tx),
            UserCmd::VoiceJoin { channel } => self.voice_join_home(r, channel, now, tx),
            UserCmd::VoiceLeave | UserCmd::VoiceUpdate(_) => {
                self.voice_leave_or_update_home(r, op, now, tx)
            }
            UserCmd::CallInitiate(c) => self.call_initiate(r, c, now, tx),
            UserCmd::VoiceGone { channel, seq } => self.voice_gone_home(r, channel, seq, now, tx),
            UserCmd::CallDone { call } => self.call_done_home(&r.user, call),
            UserCmd::Resume { session, gather } => self.session_resume(r, session, gather, now, tx),
        }
    }

    /// The shards holding the user's connections.
    pub(super) fn user_shards(&self, user: &Arc<str>) -> Vec<ShardId> {
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
    pub(super) fn spread(
        &mut self,
        user: &Arc<str>,
        before: &[ShardId],
        now: u64,
        tx: &mut impl MeshTx,
    ) {
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

    /// An event for a user's devices from another node (a DM, a receipt,
    /// a call's event).
    pub(super) fn on_to_user(
        &mut self,
        user: Arc<str>,
        msg: ServerMessage,
        except: Option<ConnRef>,
        origin: u64,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        if self.users.get(&user).is_none_or(|st| st.devices.is_empty()) {
            // Followed for its presence only: no device here.
            return;
        }
        let max = self.s.max_conversations;
        match &msg.event {
            // A call held by another node rings here: this node's
            // devices answer it through that node.
            ServerEvent::CallIncoming(c) => {
                if let Some(call) = parse_call_id(&c.call_id) {
                    self.user(&user).add_remote_call(call, origin);
                }
            }
            ServerEvent::CallEnded(c) | ServerEvent::CallMissed(c) => {
                let answered_here =
                    except.is_some() && c.reason.as_deref() == Some("answered_elsewhere");
                if let (Some(call), false) = (parse_call_id(&c.call_id), answered_here) {
                    self.user(&user).remote_call_over(call);
                }
            }
            ServerEvent::DmNew(m) => {
                let peer: Arc<str> = m.from_user_id.as_str().into();
                self.user(&user).record_dm(&peer, m.clone(), true, max);
            }
            ServerEvent::DmSent(m) => {
                let peer: Arc<str> = m.to_user_id.as_str().into();
                self.user(&user).record_dm(&peer, m.clone(), false, max);
            }
            _ => {}
        }
        self.send_devices(&user, msg.event, except, now, tx);
        self.maintain_user(&user, now, tx);
    }
}
