//! What a user's home shard keeps about the user, sans-IO: the devices
//! (connections on any shard) and their statuses, the presence others see,
//! presence subscribers, notifications, direct-message conversations, the
//! voice channel the user is in, the calls the user placed, and sessions
//! waiting to be resumed.
//!
//! Presence aggregates over devices: the most available status wins
//! (online, idle, dnd, invisible), an invisible user looks offline to
//! others, and a user whose last device left stays as they were for the
//! grace period before others see them offline.

use std::collections::VecDeque;
use std::sync::Arc;

use super::{ConnRef, SessionId};
use crate::protocol::*;

pub struct Device {
    pub conn: ConnRef,
    pub session: SessionId,
    pub kind: DeviceKind,
    pub status: Status,
    pub protocol: Protocol,
}

/// A session that dropped and may be resumed until `until`.
pub struct Detached {
    pub session: SessionId,
    /// Its channels, with the last offset queued to it and the epoch.
    pub channels: super::ResumePoints,
    pub until: u64,
}

pub struct Conv {
    pub peer: Arc<str>,
    pub last: DmMessage,
    pub unread: u32,
}

/// Recent direct-message nonces kept per user to drop resends.
const DM_NONCES: usize = 64;

#[derive(Default)]
pub struct UserState {
    pub devices: Vec<Device>,
    pub custom_status: Option<String>,
    pub activity: Option<Activity>,
    /// When the user was last connected (ms).
    pub last_seen: u64,
    /// The last device left at this time; others see the user offline once
    /// the grace period is over.
    pub left_at: Option<u64>,
    /// What subscribers last saw (status, custom status, activity, devices).
    pub announced: Option<PresenceView>,
    pub subscribers: Vec<(ConnRef, Protocol)>,
    pub notifications: VecDeque<Notification>,
    pub conversations: Vec<Conv>,
    pub dm_nonces: VecDeque<(Box<str>, DmMessage)>,
    /// The voice channel the user is in, and from which connection.
    pub voice: Option<(Arc<str>, ConnRef)>,
    /// Calls placed from this user's connections: (call, connection).
    pub calls: Vec<(u64, ConnRef)>,
    pub detached: Vec<Detached>,
    /// When the pending user timer is due, if one is.
    pub wake: Option<u64>,
}

impl UserState {
    /// Whether nothing is left to keep (the state can be dropped).
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
            && self.left_at.is_none()
            && self.subscribers.is_empty()
            && self.notifications.is_empty()
            && self.conversations.is_empty()
            && self.voice.is_none()
            && self.calls.is_empty()
            && self.detached.is_empty()
    }

    /// The presence others see now. During the grace period after the last
    /// device left, that is what they last saw.
    pub fn view(&self, user: &str, now: u64) -> PresenceView {
        if self.devices.is_empty() {
            if self.left_at.is_some() {
                if let Some(a) = &self.announced {
                    return a.clone();
                }
            }
            return offline(user, self.last_seen);
        }
        let best = self
            .devices
            .iter()
            .map(|d| d.status)
            .max_by_key(|s| s.availability())
            .unwrap_or(Status::Offline);
        if best == Status::Invisible {
            return offline(user, self.last_seen);
        }
        let mut devices: Vec<DeviceKind> = self
            .devices
            .iter()
            .filter(|d| d.status != Status::Invisible)
            .map(|d| d.kind)
            .collect();
        devices.sort_by_key(|k| k.as_str());
        devices.dedup();
        PresenceView {
            user_id: user.to_string(),
            status: best,
            custom_status: self.custom_status.clone(),
            activity: self.activity.clone(),
            devices,
            last_seen: now,
        }
    }

    /// The view to announce to subscribers, when it differs from what they
    /// last saw in anything but `lastSeen`; remembers it as announced.
    pub fn change(&mut self, user: &str, now: u64) -> Option<PresenceView> {
        let v = self.view(user, now);
        let same = self.announced.as_ref().is_some_and(|a| {
            a.status == v.status
                && a.custom_status == v.custom_status
                && a.activity == v.activity
                && a.devices == v.devices
        });
        if same {
            return None;
        }
        let first_offline = self.announced.is_none() && v.status == Status::Offline;
        self.announced = Some(v.clone());
        // A user nobody saw online going offline is no news.
        (!first_offline).then_some(v)
    }

    pub fn device_mut(&mut self, conn: ConnRef) -> Option<&mut Device> {
        self.devices.iter_mut().find(|d| d.conn == conn)
    }

    /// Records a direct message in the conversation with `peer`, most
    /// recent first, at most `max` conversations.
    pub fn record_dm(&mut self, peer: &Arc<str>, msg: DmMessage, incoming: bool, max: usize) {
        let unread = match self.conversations.iter().position(|c| c.peer == *peer) {
            Some(i) => self.conversations.remove(i).unread,
            None => 0,
        };
        self.conversations.insert(
            0,
            Conv {
                peer: peer.clone(),
                last: msg,
                // Writing in a conversation reads it.
                unread: if incoming { unread + 1 } else { 0 },
            },
        );
        self.conversations.truncate(max);
    }

    /// The message already sent with this nonce, if recent.
    pub fn dm_by_nonce(&self, nonce: &str) -> Option<&DmMessage> {
        self.dm_nonces
            .iter()
            .find(|(n, _)| &**n == nonce)
            .map(|(_, m)| m)
    }

    pub fn remember_dm_nonce(&mut self, nonce: &str, msg: DmMessage) {
        if self.dm_nonces.len() >= DM_NONCES {
            self.dm_nonces.pop_front();
        }
        self.dm_nonces.push_back((nonce.into(), msg));
    }

    /// Drops expired notifications; returns the next expiry.
    pub fn expire_notifications(&mut self, now: u64) -> Option<u64> {
        self.notifications.retain(|n| n.expires_at > now);
        self.notifications.iter().map(|n| n.expires_at).min()
    }

    /// Adds a notification, dropping the oldest past `max`.
    pub fn push_notification(&mut self, n: Notification, max: usize) {
        self.notifications.push_back(n);
        while self.notifications.len() > max {
            self.notifications.pop_front();
        }
    }
}

fn offline(user: &str, last_seen: u64) -> PresenceView {
    PresenceView {
        user_id: user.to_string(),
        status: Status::Offline,
        custom_status: None,
        activity: None,
        devices: Vec::new(),
        last_seen,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ConnId;

    fn conn(n: u32) -> ConnRef {
        ConnRef {
            shard: 0,
            conn: ConnId { slot: n, gen: 0 },
        }
    }

    fn device(n: u32, kind: DeviceKind, status: Status) -> Device {
        Device {
            conn: conn(n),
            session: SessionId(0, n as u64),
            kind,
            status,
            protocol: Protocol::Json,
        }
    }

    #[test]
    fn the_most_available_device_wins_and_invisible_looks_offline() {
        let mut u = UserState::default();
        assert_eq!(u.view("a", 5).status, Status::Offline);
        u.devices.push(device(1, DeviceKind::Mobile, Status::Dnd));
        u.devices.push(device(2, DeviceKind::Desktop, Status::Idle));
        let v = u.view("a", 5);
        assert_eq!(v.status, Status::Idle);
        assert_eq!(v.devices, [DeviceKind::Desktop, DeviceKind::Mobile]);
        assert_eq!(v.last_seen, 5);
        u.device_mut(conn(2)).unwrap().status = Status::Invisible;
        let v = u.view("a", 6);
        assert_eq!(
            (v.status, v.devices.clone()),
            (Status::Dnd, vec![DeviceKind::Mobile])
        );
        u.device_mut(conn(1)).unwrap().status = Status::Invisible;
        u.custom_status = Some("secret".into());
        let v = u.view("a", 7);
        assert_eq!(v.status, Status::Offline);
        assert!(v.devices.is_empty() && v.custom_status.is_none());
    }

    #[test]
    fn only_effective_changes_are_announced() {
        let mut u = UserState::default();
        assert!(
            u.change("a", 1).is_none(),
            "offline to begin with is no news"
        );
        u.devices.push(device(1, DeviceKind::Web, Status::Online));
        assert_eq!(u.change("a", 2).unwrap().status, Status::Online);
        assert!(u.change("a", 3).is_none(), "lastSeen alone is no change");
        u.devices.push(device(2, DeviceKind::Web, Status::Online));
        assert!(
            u.change("a", 4).is_none(),
            "a second web device changes nothing"
        );
        u.custom_status = Some("lunch".into());
        assert_eq!(
            u.change("a", 5).unwrap().custom_status.as_deref(),
            Some("lunch")
        );
        // The last device leaves: during the grace period nothing changes.
        u.devices.clear();
        u.left_at = Some(6);
        u.last_seen = 6;
        assert!(u.change("a", 7).is_none());
        u.left_at = None;
        let v = u.change("a", 12).unwrap();
        assert_eq!((v.status, v.last_seen), (Status::Offline, 6));
    }

    #[test]
    fn conversations_keep_the_latest_first_and_count_unread() {
        let mut u = UserState::default();
        let dm = |id: &str| DmMessage {
            message_id: id.into(),
            from_user_id: "x".into(),
            to_user_id: "y".into(),
            content: id.into(),
            nonce: None,
            timestamp: 1,
        };
        let (b, c, d): (Arc<str>, Arc<str>, Arc<str>) = ("b".into(), "c".into(), "d".into());
        u.record_dm(&b, dm("1"), true, 2);
        u.record_dm(&b, dm("2"), true, 2);
        u.record_dm(&c, dm("3"), true, 2);
        assert_eq!(u.conversations[1].unread, 2);
        u.record_dm(&b, dm("4"), false, 2);
        assert_eq!(
            (&*u.conversations[0].peer, u.conversations[0].unread),
            ("b", 0)
        );
        u.record_dm(&d, dm("5"), true, 2);
        let peers: Vec<&str> = u.conversations.iter().map(|c| &*c.peer).collect();
        assert_eq!(peers, ["d", "b"], "bounded, oldest dropped");
    }

    #[test]
    fn notifications_are_bounded_and_expire() {
        let mut u = UserState::default();
        for i in 0..5 {
            u.push_notification(
                Notification {
                    notification_id: i.to_string(),
                    kind: "mention".into(),
                    data: None,
                    read: false,
                    created_at: i,
                    expires_at: 100 + i,
                },
                3,
            );
        }
        let ids: Vec<&str> = u
            .notifications
            .iter()
            .map(|n| n.notification_id.as_str())
            .collect();
        assert_eq!(ids, ["2", "3", "4"]);
        assert_eq!(u.expire_notifications(103), Some(104));
        assert_eq!(u.notifications.len(), 1);
        assert_eq!(u.expire_notifications(200), None);
    }
}
