//! Notifications: made (mentions, missed calls, the server API), kept for
//! users away, read and cleared, on the user's home; `on_notification_*`
//! on the asking connection's shard.
//!
//! Bounds on stored notifications. A notification waits for a user who is
//! offline (for `notification_ttl_ms`); what a shard keeps that way is
//! bounded in total and per sender, so that nobody can fill a node's
//! memory (or, in a cluster, Redis) by mentioning users who are away.
//!
//! The [`Ledger`] of a home shard counts every notification it keeps, by
//! who made it (a mention's author, a missed call's caller; the server
//! API's count in the total only), and, in a cluster, those it made for
//! users with no device on this node (kept in Redis only) until they expire.
//! A notification past a bound is not stored: devices online get it all
//! the same, and `corecast_notifications_dropped_total` counts it.

use std::collections::{HashMap, VecDeque};

use super::cluster::Asker;
use super::*;
use std::sync::Arc;

/// Characters of a message a mention notification holds (the message
/// itself stays in the channel's history, found by its id).
pub const MENTION_EXCERPT_CHARS: usize = 100;

/// Why a notification was not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// The shard keeps its share of `max_stored_notifications`.
    Node,
    /// Its sender has its share of `max_notifications_per_sender` waiting.
    Sender,
}

/// What a home shard keeps, counted (see the module doc).
#[derive(Debug, Default)]
pub struct Ledger {
    total: usize,
    by_sender: HashMap<Arc<str>, u32>,
    /// Made here for Redis without a copy here (cluster): expiry and
    /// sender, in expiry order (every notification lives as long).
    away: VecDeque<(u64, Option<Arc<str>>)>,
}

impl Ledger {
    /// Whether one more notification from `from` fits within `max_total`
    /// and `max_per_sender` (this shard's shares).
    pub fn admit(
        &self,
        from: Option<&Arc<str>>,
        max_total: usize,
        max_per_sender: usize,
    ) -> Result<(), Full> {
        if self.total >= max_total {
            return Err(Full::Node);
        }
        match from.and_then(|f| self.by_sender.get(f)) {
            Some(&n) if n as usize >= max_per_sender => Err(Full::Sender),
            _ => Ok(()),
        }
    }

    pub fn add(&mut self, from: Option<&Arc<str>>) {
        self.total += 1;
        if let Some(f) = from {
            *self.by_sender.entry(f.clone()).or_default() += 1;
        }
    }

    pub fn remove(&mut self, from: Option<&Arc<str>>) {
        self.total = self.total.saturating_sub(1);
        let Some(f) = from else { return };
        if let Some(n) = self.by_sender.get_mut(f) {
            *n -= 1;
            if *n == 0 {
                self.by_sender.remove(f);
            }
        }
    }

    /// Counts a notification made for another node (kept in Redis only)
    /// until it expires.
    pub fn add_away(&mut self, expires_at: u64, from: Option<Arc<str>>) {
        self.add(from.as_ref());
        self.away.push_back((expires_at, from));
    }

    /// Forgets the notifications made for other nodes that have expired.
    pub fn expire_away(&mut self, now: u64) {
        while let Some((at, _)) = self.away.front() {
            if *at > now {
                break;
            }
            let (_, from) = self.away.pop_front().expect("just seen");
            self.remove(from.as_ref());
        }
    }

    /// Notifications counted.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Notifications counted for `from`.
    pub fn of(&self, from: &str) -> usize {
        self.by_sender.get(from).map_or(0, |n| *n as usize)
    }
}

/// The first [`MENTION_EXCERPT_CHARS`] characters of a message, with `…`
/// when there was more.
pub fn excerpt(content: &str) -> String {
    match content.char_indices().nth(MENTION_EXCERPT_CHARS) {
        None => content.to_string(),
        Some((i, _)) => format!("{}…", &content[..i]),
    }
}

impl<O: Outbound> Engine<O> {
    /// `notification:get_pending`: the unread ones (in a cluster, with
    /// those made on other nodes).
    pub(super) fn notifications_pending(&mut self, r: UserReq, now: u64, tx: &mut impl MeshTx) {
        let (user, from, ack) = r.parts();
        // In a cluster, with those made elsewhere that did not reach
        // this node (the user was not connected here then).
        if let (Some((conn, protocol)), true) = (from, self.cluster_up()) {
            let asker = Some((conn, protocol, ack));
            let msg = ToBridge::LoadNotifications { user, asker };
            return self.send_bridge(msg, now, tx);
        }
        let msg = self.pending_notifications(&user, ack, now);
        self.answer(from, &msg, now, tx);
    }

    /// `notification:mark_read`; in a cluster, answered once Redis has the
    /// change (a device that connects next anywhere sees it).
    pub(super) fn notifications_read(
        &mut self,
        r: UserReq,
        ids: Vec<String>,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let (user, from, ack) = r.parts();
        let change = NotificationChange::Read(ids);
        let keep = self.change_notifications(&user, &change, now);
        self.tell_notifications(&user, change, keep, from, ack, now, tx);
    }

    /// `notification:clear` of one notification.
    pub(super) fn notification_clear(
        &mut self,
        r: UserReq,
        id: String,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let (user, from, ack) = r.parts();
        let change = NotificationChange::Clear(id.clone());
        let gone = self.change_notifications(&user, &change, now);
        if gone.is_empty() {
            let e = err(ack, ErrorCode::NotFound, format!("no notification `{id}`"));
            return self.answer(from, &e, now, tx);
        }
        self.tell_notifications(&user, change, gone, from, ack, now, tx);
    }

    /// `notification:clear_all`.
    pub(super) fn notifications_clear_all(&mut self, r: UserReq, now: u64, tx: &mut impl MeshTx) {
        let (user, from, ack) = r.parts();
        let change = NotificationChange::ClearAll;
        self.change_notifications(&user, &change, now);
        self.tell_notifications(&user, change, Vec::new(), from, ack, now, tx);
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
    pub(super) fn tell_notifications(
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

    /// Tells users mentioned in a message who are not in its channel.
    pub(super) fn notify_mentions(
        &mut self,
        channel: &Arc<str>,
        message: &MessageNew,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let Some(owned) = self.owned.get(channel) else {
            return;
        };
        let absent: Vec<Arc<str>> = message
            .mentions
            .iter()
            .filter(|u| **u != message.user_id && !owned.users.contains_key(u.as_str()))
            .map(|u| Arc::from(u.as_str()))
            .collect();
        if absent.is_empty() {
            return;
        }
        if self.cluster_up() && owned.clustered() {
            // Members here or on another node are not notified: the other
            // nodes say who is a member there.
            let part = self.local_part(channel, ChannelPart::Members(Vec::new()));
            let msg = ToBridge::ChannelQuery {
                channel: channel.clone(),
                parts: vec![part],
                then: QueryThen::Mentions(Box::new(message.clone())),
            };
            return self.send_bridge(msg, now, tx);
        }
        self.notify_absent(channel, message, absent, now, tx);
    }

    /// Notifies mentioned users who are not members of the channel.
    pub(super) fn notify_absent(
        &mut self,
        channel: &Arc<str>,
        message: &MessageNew,
        absent: Vec<Arc<str>>,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        // A reference to the message and an excerpt, not a copy: the
        // message stays in the channel's history.
        let data = serde_json::json!({
            "channelId": &**channel,
            "messageId": &message.message_id,
            "fromUserId": &message.user_id,
            "excerpt": notifications::excerpt(&message.content),
        })
        .to_string();
        let from: Arc<str> = message.user_id.as_str().into();
        for user in absent {
            let op = UserCmd::Notify {
                kind: "mention".into(),
                data: Some(Json(data.clone())),
                from: Some(from.clone()),
            };
            self.send_user_op(user, None, None, op, now, tx);
        }
    }

    /// `notification:get_pending`, to the user's home.
    pub(super) fn on_notification_get_pending(
        &mut self,
        id: ConnId,
        ack: Option<u64>,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        self.ask_home(id, ack, UserCmd::NotificationsPending, now, tx)
    }

    /// `notification:mark_read`, to the user's home.
    pub(super) fn on_notification_read(
        &mut self,
        id: ConnId,
        ack: Option<u64>,
        n: NotificationIds,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        self.ask_home(
            id,
            ack,
            UserCmd::NotificationsRead(n.notification_ids),
            now,
            tx,
        )
    }

    /// `notification:clear`, to the user's home.
    pub(super) fn on_notification_clear(
        &mut self,
        id: ConnId,
        ack: Option<u64>,
        n: NotificationRef,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        self.ask_home(
            id,
            ack,
            UserCmd::NotificationClear(n.notification_id),
            now,
            tx,
        )
    }

    /// `notification:clear_all`, to the user's home.
    pub(super) fn on_notification_clear_all(
        &mut self,
        id: ConnId,
        ack: Option<u64>,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        self.ask_home(id, ack, UserCmd::NotificationClearAll, now, tx)
    }

    /// A notification change made on another node.
    pub(super) fn on_remote_notifications(
        &mut self,
        user: Arc<str>,
        change: NotificationChange,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        if self.users.get(&user).is_none_or(|st| st.devices.is_empty()) {
            // Redis keeps them for when the user connects here.
            return;
        }
        if let NotificationChange::New(n) = &change {
            let known = self
                .users
                .get_mut(&user)
                .and_then(|st| st.notification_mut(&n.notification_id))
                .is_some();
            if known {
                // Read from Redis already, when the user's first
                // device here connected.
                return;
            }
            let event = ServerEvent::NotificationNew(n.clone());
            self.send_devices(&user, event, None, now, tx);
        }
        self.change_notifications(&user, &change, now);
    }

    /// A user's notifications read from Redis: the unread ones for a new
    /// device, or the answer to `notification:get_pending`.
    pub(super) fn on_notifications_loaded(
        &mut self,
        user: Arc<str>,
        notifications: Vec<Notification>,
        asker: Option<Asker>,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        self.add_notifications(&user, notifications, now, tx);
        if let Some((conn, protocol, id)) = asker {
            let msg = self.pending_notifications(&user, id, now);
            self.send_to(conn, protocol, &msg, now, tx);
        }
    }

    /// Adds notifications read from Redis to those here (for devices here),
    /// and sends the unread ones that are new to the user's devices.
    pub(super) fn add_notifications(
        &mut self,
        user: &Arc<str>,
        notifications: Vec<Notification>,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let max = self.s.max_notifications;
        let Some(st) = self.users.get_mut(user).filter(|st| !st.devices.is_empty()) else {
            return;
        };
        st.expire_notifications(now, &mut self.notes);
        let mut new = Vec::new();
        for n in notifications {
            if let Some(k) = st.notification_mut(&n.notification_id) {
                // Read on another node meanwhile.
                k.read |= n.read;
                continue;
            }
            if n.expires_at <= now {
                continue;
            }
            if !n.read {
                new.push(n.clone());
            }
            // Copies of what Redis keeps: their senders were counted where
            // they were made.
            st.push_notification(Kept { n, from: None }, max, &mut self.notes);
        }
        if let Some(m) = st.extra_mut() {
            m.notifications
                .make_contiguous()
                .sort_by_key(|k| k.n.created_at);
        }
        let next = st.expire_notifications(now, &mut self.notes);
        self.metrics
            .notifications_stored
            .set(self.notes.total() as u64);
        if let Some(next) = next {
            self.wake_user(user, next);
        }
        for n in new {
            self.send_devices(user, ServerEvent::NotificationNew(n), None, now, tx);
        }
    }

    /// Redis has a notification change: its asker gets the answer.
    pub(super) fn on_notifications_kept(
        &mut self,
        (conn, protocol, id): Asker,
        error: Option<String>,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let msg = match error {
            None => empty_ack(id),
            Some(e) => err(id, ErrorCode::Internal, e),
        };
        self.send_to(conn, protocol, &msg, now, tx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ledger_bounds_the_total_and_each_sender() {
        let mut l = Ledger::default();
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        for _ in 0..3 {
            assert_eq!(l.admit(Some(&a), 10, 3), Ok(()));
            l.add(Some(&a));
        }
        assert_eq!(l.admit(Some(&a), 10, 3), Err(Full::Sender));
        assert_eq!(l.admit(Some(&b), 10, 3), Ok(()), "another sender");
        assert_eq!(l.admit(None, 10, 3), Ok(()), "the backend");
        l.remove(Some(&a));
        assert_eq!(l.admit(Some(&a), 10, 3), Ok(()));
        for t in 0..8 {
            l.add_away(100 + t, None);
        }
        assert_eq!(l.total(), 10);
        assert_eq!(l.admit(None, 10, 3), Err(Full::Node));
        l.expire_away(103);
        assert_eq!(l.total(), 6);
        l.expire_away(1_000);
        assert_eq!((l.total(), l.of("a")), (2, 2));
    }

    #[test]
    fn an_excerpt_is_cut_on_a_character() {
        assert_eq!(excerpt("short"), "short");
        let long = "é".repeat(150);
        let e = excerpt(&long);
        assert_eq!(e.chars().count(), MENTION_EXCERPT_CHARS + 1);
        assert!(e.ends_with('…'));
        assert_eq!(excerpt(&"x".repeat(100)), "x".repeat(100));
    }
}
