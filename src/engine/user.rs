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
use std::num::NonZeroU64;
use std::sync::Arc;

use super::notifications::Ledger;
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
    /// Kept in the cluster's Redis too: whichever node resumes it takes it
    /// there.
    pub kept: bool,
}

pub struct Conv {
    pub peer: Arc<str>,
    pub last: DmMessage,
    pub unread: u32,
}

/// Recent direct-message nonces kept per user to drop resends.
const DM_NONCES: usize = 64;

/// What others last saw of a user, as a key: enough to tell whether a new
/// view is news.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shown {
    status: Status,
    /// One bit per [`DeviceKind`].
    devices: u8,
    /// A hash of the custom status and activity (32 bits keep the key in 8
    /// bytes; a collision would only hide one change of them).
    detail: u32,
}

/// A user's state on its home shard. The common part is small (every
/// online user has one); the rest comes in [`More`], made when needed.
#[derive(Default)]
pub struct UserState {
    pub devices: Vec<Device>,
    /// When the user was last connected (ms).
    pub last_seen: u64,
    /// The last device left at this time; others see the user offline once
    /// the grace period is over. (Non-zero types keep the option in 8 bytes.)
    pub left_at: Option<NonZeroU64>,
    /// When the pending user timer is due, if one is.
    pub wake: Option<NonZeroU64>,
    /// What subscribers last saw.
    announced: Option<Shown>,
    /// In a cluster: this node's part of the presence as last published.
    pub published: Option<Shown>,
    /// In a cluster: whether the bridge was told to follow the user.
    pub following: bool,
    more: Option<Box<More>>,
}

/// The rarer part of a user's state.
#[derive(Default)]
pub struct More {
    pub custom_status: Option<String>,
    pub activity: Option<Activity>,
    pub subscribers: Vec<(ConnRef, Protocol)>,
    pub notifications: VecDeque<Kept>,
    pub conversations: Vec<Conv>,
    pub dm_nonces: VecDeque<(Box<str>, DmMessage)>,
    /// The voice channel the user is in, and from which connection.
    pub voice: Option<(Arc<str>, ConnRef)>,
    /// When the user joined it (in a cluster, the latest join on any node
    /// wins).
    pub voice_at: u64,
    /// Which join put the user there (unique on this shard).
    pub voice_seq: u64,
    /// Calls placed from this user's connections: (call, connection).
    pub calls: Vec<(u64, ConnRef)>,
    pub detached: Vec<Detached>,
    /// In a cluster: the user's presence on other nodes, as each last
    /// published it (offline ones kept for their sequence).
    pub remote: Vec<NodePresence>,
    /// When the custom status or activity was last set here (ms; 0: never).
    pub detail_at: u64,
    /// In a cluster: calls to this user held by other nodes, ringing or
    /// answered here.
    pub remote_calls: Vec<RemoteCall>,
}

/// A notification kept for a user, with who made it (for the home shard's
/// [`Ledger`]).
#[derive(Debug, Clone)]
pub struct Kept {
    pub n: Notification,
    pub from: Option<Arc<str>>,
}

/// A call to a user held by another node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteCall {
    pub call: u64,
    pub node: u64,
    /// The connection here that answered it.
    pub answered_by: Option<ConnRef>,
}

/// Calls of other nodes remembered per user at most (the oldest go).
const REMOTE_CALLS: usize = 8;

/// A user's presence on one node of a cluster, for the others.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct NodePresence {
    pub node: u64,
    /// Grows with every view the node publishes of the user.
    pub seq: u64,
    /// When the custom status or activity was last set there (0: never).
    pub detail_at: u64,
    /// The presence the node's devices make (offline: none there, or all
    /// invisible).
    pub view: PresenceView,
    /// Whether the user has devices there (invisible ones too): a call can
    /// reach them.
    pub connected: bool,
}

/// In a published key, beyond the device kinds' bits: the user has devices
/// here (invisible ones count).
const CONNECTED: u8 = 0x80;

impl More {
    fn is_empty(&self) -> bool {
        self.custom_status.is_none()
            && self.activity.is_none()
            && self.subscribers.is_empty()
            && self.notifications.is_empty()
            && self.conversations.is_empty()
            && self.dm_nonces.is_empty()
            && self.voice.is_none()
            && self.calls.is_empty()
            && self.detached.is_empty()
            && self.remote.is_empty()
            && self.remote_calls.is_empty()
    }
}

fn hash_detail(custom: Option<&String>, activity: Option<&Activity>) -> u32 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    custom.hash(&mut h);
    activity
        .map(|a| (&a.kind, &a.name, &a.details))
        .hash(&mut h);
    h.finish() as u32
}

/// A timestamp as a non-zero value (0 ms is taken as 1 ms).
pub fn at(t: u64) -> NonZeroU64 {
    NonZeroU64::new(t.max(1)).expect("not zero")
}

impl UserState {
    /// The rarer part, made if missing.
    pub fn more(&mut self) -> &mut More {
        self.more.get_or_insert_with(Default::default)
    }

    /// The rarer part, if there is one.
    pub fn extra(&self) -> Option<&More> {
        self.more.as_deref()
    }

    pub fn extra_mut(&mut self) -> Option<&mut More> {
        self.more.as_deref_mut()
    }

    /// Drops the rarer part when nothing is in it.
    pub fn shrink(&mut self) {
        if self.more.as_ref().is_some_and(|m| m.is_empty()) {
            self.more = None;
        }
    }

    /// Whether nothing is left to keep (the state can be dropped). Custom
    /// status and activity alone do not keep a user without devices.
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
            && self.left_at.is_none()
            && self.extra().is_none_or(|m| {
                m.subscribers.is_empty()
                    && m.notifications.is_empty()
                    && m.conversations.is_empty()
                    && m.voice.is_none()
                    && m.calls.is_empty()
                    && m.detached.is_empty()
            })
    }

    pub fn add_device(&mut self, d: Device) {
        // Most users have one device: no room for four.
        self.devices.reserve_exact(1);
        self.devices.push(d);
    }

    /// The presence others see now: this node's devices, and in a cluster
    /// the other nodes' (the most available status wins, the devices add
    /// up, the custom status and activity set last are shown).
    pub fn view(&self, user: &str, now: u64) -> PresenceView {
        let local = self.local_view(user, now);
        match self.extra() {
            Some(m) if !m.remote.is_empty() => merge(local, m.detail_at, &m.remote),
            _ => local,
        }
    }

    /// The presence this node's devices make. During the grace period
    /// after the last device left, that is what others last saw of them.
    pub fn local_view(&self, user: &str, now: u64) -> PresenceView {
        let (custom_status, activity) = match self.extra() {
            Some(m) => (m.custom_status.clone(), m.activity.clone()),
            None => (None, None),
        };
        if self.devices.is_empty() {
            let before = self.published.or(self.announced);
            return match (self.left_at, before) {
                (Some(_), Some(shown)) if shown.status != Status::Offline => PresenceView {
                    user_id: user.to_string(),
                    status: shown.status,
                    custom_status,
                    activity,
                    devices: DeviceKind::ALL
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| shown.devices & (1 << i) != 0)
                        .map(|(_, k)| *k)
                        .collect(),
                    last_seen: self.last_seen,
                },
                _ => offline(user, self.last_seen),
            };
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
        let devices: Vec<DeviceKind> = DeviceKind::ALL
            .iter()
            .copied()
            .filter(|k| {
                self.devices
                    .iter()
                    .any(|d| d.kind == *k && d.status != Status::Invisible)
            })
            .collect();
        PresenceView {
            user_id: user.to_string(),
            status: best,
            custom_status,
            activity,
            devices,
            last_seen: now,
        }
    }

    /// The view to announce to subscribers, when it differs from what they
    /// last saw in anything but `lastSeen`; remembers it as announced.
    pub fn change(&mut self, user: &str, now: u64) -> Option<PresenceView> {
        let v = self.view(user, now);
        let shown = Shown::of(&v);
        if self.announced == Some(shown) {
            return None;
        }
        let first_offline = self.announced.is_none() && v.status == Status::Offline;
        self.announced = Some(shown);
        // A user nobody saw online going offline is no news.
        (!first_offline).then_some(v)
    }

    /// This node's part of the presence, to publish to the other nodes of
    /// a cluster, when it changed since last published.
    pub fn publish(&mut self, user: &str, now: u64, node: u64, seq: u64) -> Option<NodePresence> {
        let view = self.local_view(user, now);
        let connected = !self.devices.is_empty();
        let mut shown = Shown::of(&view);
        if connected {
            shown.devices |= CONNECTED;
        }
        if self.published == Some(shown)
            || (self.published.is_none() && view.status == Status::Offline && !connected)
        {
            return None;
        }
        self.published = Some(shown);
        Some(NodePresence {
            node,
            seq,
            detail_at: self.extra().map_or(0, |m| m.detail_at),
            view,
            connected,
        })
    }

    /// Takes another node's view of the user, unless a later one is here.
    pub fn set_remote(&mut self, p: NodePresence) {
        let m = self.more();
        match m.remote.iter_mut().find(|r| r.node == p.node) {
            Some(r) if r.seq < p.seq => *r = p,
            Some(_) => {}
            None => m.remote.push(p),
        }
    }

    /// Forgets what nodes that are gone showed; whether there was any.
    pub fn drop_nodes(&mut self, nodes: &[u64]) -> bool {
        let Some(m) = self.extra_mut() else {
            return false;
        };
        let before = m.remote.len();
        m.remote.retain(|r| !nodes.contains(&r.node));
        m.remote.len() != before
    }

    /// A call of another node rings this user's devices here.
    pub fn add_remote_call(&mut self, call: u64, node: u64) {
        let m = self.more();
        m.remote_calls.retain(|r| r.call != call);
        if m.remote_calls.len() >= REMOTE_CALLS {
            m.remote_calls.remove(0);
        }
        m.remote_calls.push(RemoteCall {
            call,
            node,
            answered_by: None,
        });
    }

    pub fn remote_call_over(&mut self, call: u64) {
        if let Some(m) = self.extra_mut() {
            m.remote_calls.retain(|r| r.call != call);
        }
    }

    /// Whether the node follows the user in a cluster: it has devices of
    /// the user, or subscribers to the user's presence.
    pub fn wants_following(&self) -> bool {
        !self.devices.is_empty() || self.extra().is_some_and(|m| !m.subscribers.is_empty())
    }

    pub fn device_mut(&mut self, conn: ConnRef) -> Option<&mut Device> {
        self.devices.iter_mut().find(|d| d.conn == conn)
    }

    /// Records a direct message in the conversation with `peer`, most
    /// recent first, at most `max` conversations.
    pub fn record_dm(&mut self, peer: &Arc<str>, msg: DmMessage, incoming: bool, max: usize) {
        let m = self.more();
        let unread = match m.conversations.iter().position(|c| c.peer == *peer) {
            Some(i) => m.conversations.remove(i).unread,
            None => 0,
        };
        m.conversations.insert(
            0,
            Conv {
                peer: peer.clone(),
                last: msg,
                // Writing in a conversation reads it.
                unread: if incoming { unread + 1 } else { 0 },
            },
        );
        m.conversations.truncate(max);
    }

    /// The message already sent with this nonce, if recent.
    pub fn dm_by_nonce(&self, nonce: &str) -> Option<&DmMessage> {
        self.extra()?
            .dm_nonces
            .iter()
            .find(|(n, _)| &**n == nonce)
            .map(|(_, m)| m)
    }

    pub fn remember_dm_nonce(&mut self, nonce: &str, msg: DmMessage) {
        let m = self.more();
        if m.dm_nonces.len() >= DM_NONCES {
            m.dm_nonces.pop_front();
        }
        m.dm_nonces.push_back((nonce.into(), msg));
    }

    /// Drops expired notifications; returns the next expiry.
    pub fn expire_notifications(&mut self, now: u64, ledger: &mut Ledger) -> Option<u64> {
        self.remove_notifications(|n| n.expires_at <= now, ledger);
        let m = self.more.as_ref()?;
        m.notifications.iter().map(|k| k.n.expires_at).min()
    }

    /// The notifications kept here, oldest first.
    pub fn notifications(&self) -> impl Iterator<Item = &Notification> {
        self.extra()
            .into_iter()
            .flat_map(|m| m.notifications.iter().map(|k| &k.n))
    }

    /// The notification kept here with this id.
    pub fn notification_mut(&mut self, id: &str) -> Option<&mut Notification> {
        self.extra_mut()?
            .notifications
            .iter_mut()
            .map(|k| &mut k.n)
            .find(|n| n.notification_id == id)
    }

    /// Adds a notification (counted in `ledger`), dropping the oldest past
    /// `max`.
    pub fn push_notification(&mut self, k: Kept, max: usize, ledger: &mut Ledger) {
        ledger.add(k.from.as_ref());
        let m = self.more();
        m.notifications.push_back(k);
        while m.notifications.len() > max {
            if let Some(old) = m.notifications.pop_front() {
                ledger.remove(old.from.as_ref());
            }
        }
    }

    /// Takes out the notifications `pick` chooses; returns them.
    pub fn remove_notifications(
        &mut self,
        mut pick: impl FnMut(&Notification) -> bool,
        ledger: &mut Ledger,
    ) -> Vec<Notification> {
        let Some(m) = self.more.as_mut() else {
            return Vec::new();
        };
        let mut out = Vec::new();
        m.notifications.retain(|k| {
            if !pick(&k.n) {
                return true;
            }
            ledger.remove(k.from.as_ref());
            out.push(k.n.clone());
            false
        });
        out
    }
}

impl Shown {
    fn of(v: &PresenceView) -> Shown {
        Shown {
            status: v.status,
            devices: device_bits(&v.devices),
            detail: hash_detail(v.custom_status.as_ref(), v.activity.as_ref()),
        }
    }
}

fn device_bits(devices: &[DeviceKind]) -> u8 {
    DeviceKind::ALL
        .iter()
        .enumerate()
        .filter(|(_, k)| devices.contains(k))
        .fold(0, |m, (i, _)| m | (1 << i))
}

/// A user's presence over the nodes of a cluster: this node's view
/// (`local`, its details set at `detail_at`) with the others'.
pub fn merge(local: PresenceView, detail_at: u64, remote: &[NodePresence]) -> PresenceView {
    let mut v = local;
    let mut bits = device_bits(&v.devices);
    let mut detail = (v.status != Status::Offline).then_some(detail_at);
    for r in remote {
        v.last_seen = v.last_seen.max(r.view.last_seen);
        if r.view.status == Status::Offline {
            continue;
        }
        if r.view.status.availability() > v.status.availability() {
            v.status = r.view.status;
        }
        bits |= device_bits(&r.view.devices);
        if detail.is_none_or(|d| r.detail_at > d) {
            detail = Some(r.detail_at);
            v.custom_status = r.view.custom_status.clone();
            v.activity = r.view.activity.clone();
        }
    }
    v.devices = DeviceKind::ALL
        .iter()
        .enumerate()
        .filter(|(i, _)| bits & (1 << i) != 0)
        .map(|(_, k)| *k)
        .collect();
    v
}

pub(super) fn offline(user: &str, last_seen: u64) -> PresenceView {
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
    fn an_online_users_state_stays_small() {
        // Every online user has one, on its home shard; cluster mode adds
        // its published part and follow flag (8 bytes) here, the rest only
        // to users that need it.
        assert_eq!(std::mem::size_of::<Option<Shown>>(), 8);
        assert_eq!(std::mem::size_of::<UserState>(), 80);
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
        u.more().custom_status = Some("secret".into());
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
        u.more().custom_status = Some("lunch".into());
        assert_eq!(
            u.change("a", 5).unwrap().custom_status.as_deref(),
            Some("lunch")
        );
        // The last device leaves: during the grace period nothing changes.
        u.devices.clear();
        u.left_at = Some(at(6));
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
        assert_eq!(u.more().conversations[1].unread, 2);
        u.record_dm(&b, dm("4"), false, 2);
        assert_eq!(
            (
                &*u.extra().unwrap().conversations[0].peer,
                u.extra().unwrap().conversations[0].unread
            ),
            ("b", 0)
        );
        u.record_dm(&d, dm("5"), true, 2);
        let peers: Vec<&str> = u.more().conversations.iter().map(|c| &*c.peer).collect();
        assert_eq!(peers, ["d", "b"], "bounded, oldest dropped");
    }

    #[test]
    fn notifications_are_bounded_and_expire() {
        let mut u = UserState::default();
        let mut ledger = Ledger::default();
        let from: Arc<str> = "carol".into();
        for i in 0..5 {
            let n = Notification {
                notification_id: i.to_string(),
                kind: "mention".into(),
                data: None,
                read: false,
                created_at: i,
                expires_at: 100 + i,
            };
            let k = Kept {
                n,
                from: Some(from.clone()),
            };
            u.push_notification(k, 3, &mut ledger);
        }
        let ids: Vec<&str> = u
            .notifications()
            .map(|n| n.notification_id.as_str())
            .collect();
        assert_eq!(ids, ["2", "3", "4"]);
        assert_eq!((ledger.total(), ledger.of("carol")), (3, 3));
        assert_eq!(u.expire_notifications(103, &mut ledger), Some(104));
        assert_eq!(u.more().notifications.len(), 1);
        assert_eq!(ledger.total(), 1);
        assert_eq!(u.expire_notifications(200, &mut ledger), None);
        assert_eq!((ledger.total(), ledger.of("carol")), (0, 0));
    }
}
