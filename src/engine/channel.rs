//! The state a channel's owner shard keeps, sans-IO: the sequence and its
//! epoch, members per shard and per user, the event log that recovery
//! replays, the messages that history, edits, reactions and receipts read,
//! typing, voice participants and read markers.
//!
//! Every event that changes the channel's messages (`message:new`,
//! `message:edited`, `message:deleted`, `message:reaction`) takes the next
//! offset and goes into the log, so that a client that saw offset N can be
//! given exactly the events after N, in order, as long as the log still
//! holds them. The log and the message store are bounded by the same depth
//! and age ([`Settings::history_size`], [`Settings::history_ttl_ms`]).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;

use super::{ConnRef, Settings, ShardId};
use crate::protocol::socketio::Seq;
use crate::protocol::*;

/// One sequenced event of a channel, encoded lazily per protocol.
struct LogEntry {
    offset: u64,
    at: u64,
    msg: ServerMessage,
    frames: Frames,
}

/// A message as it stands now.
pub struct Stored {
    pub msg: MessageNew,
    pub edited_at: Option<u64>,
    /// Each emoji with the users who reacted with it, in reaction order.
    pub reactions: Vec<(String, Vec<Arc<str>>)>,
    pub at: u64,
}

impl Stored {
    fn history(&self) -> HistoryMessage {
        HistoryMessage {
            message: self.msg.clone(),
            edited_at: self.edited_at,
            reactions: self
                .reactions
                .iter()
                .map(|(emoji, users)| ReactionCount {
                    emoji: emoji.clone(),
                    count: users.len() as u32,
                    user_ids: users.iter().map(|u| u.to_string()).collect(),
                })
                .collect(),
        }
    }
}

/// Someone typing, and until when (unless refreshed).
pub struct Typing {
    pub user: Arc<str>,
    pub conn: ConnRef,
    pub until: u64,
}

/// Someone in the channel's voice room.
pub struct Participant {
    pub user: Arc<str>,
    pub conn: ConnRef,
    pub state: VoiceState,
    /// The join (on the user's home) that put it here.
    pub seq: u64,
}

/// The offset in a message id `<epoch>-<offset>` of this epoch.
pub fn offset_of(epoch: &str, message_id: &str) -> Option<u64> {
    let (e, o) = message_id.rsplit_once('-')?;
    (e == epoch).then_some(())?;
    o.parse().ok()
}

/// How many read markers a channel keeps; past it the lowest marker goes.
const MAX_READERS: usize = 10_000;

pub struct Owned {
    /// Offset of the last event sequenced (0: none yet).
    pub offset: u64,
    pub epoch: Arc<str>,
    /// Members per shard: `[json, binary]`.
    pub per_shard: Vec<[u32; Protocol::COUNT]>,
    /// Connections in the channel per user.
    pub users: HashMap<Arc<str>, u32>,
    log: VecDeque<LogEntry>,
    messages: VecDeque<Stored>,
    /// (user, nonce) of stored messages, to their offset.
    nonces: HashMap<(Arc<str>, Box<str>), u64>,
    pub typing: Vec<Typing>,
    pub voice: Vec<Participant>,
    /// Per user: the offset read up to, and when.
    read: HashMap<Arc<str>, (u64, u64)>,
    /// Whether the cluster sequences this channel (then offsets come from
    /// Redis) or this node does.
    pub link: Link,
    /// While the cluster is out of reach: the cluster's epoch and the last
    /// offset applied from it, so that what other nodes published meanwhile
    /// is delivered here once the channel is followed again.
    pub cluster_mark: Option<(Arc<str>, u64)>,
    /// In a cluster without Redis: the epochs under which this node
    /// sequenced messages alone, and how many under each (oldest first;
    /// more than one when Redis went away again before the channel was
    /// loaded, so that nothing of an earlier outage is forgotten).
    pub alone: Vec<(Arc<str>, usize)>,
    /// Messages sequenced alone, waiting for the cluster to take them
    /// (oldest first).
    pub handover: Vec<MessageNew>,
    /// The cluster refused something of the channel: asked again soon.
    pub retry_due: bool,
    /// The other nodes' connections in the channel (in a cluster).
    pub remote_members: Vec<(u64, u32)>,
    /// Sequenced events that came while the channel's state was loading.
    pub early: Vec<super::cluster::Incoming>,
    /// The last events relayed by several nodes that were delivered here
    /// (moderation events): each is delivered once.
    once: Vec<u64>,
}

/// Who sequences an owned channel.
#[derive(Default)]
pub enum Link {
    /// This node (a single node, or the cluster unreachable).
    #[default]
    Local,
    /// The cluster, once the bridge has loaded the channel's state; joins
    /// wait until then.
    Attaching(Vec<super::Join>),
    /// The cluster: sequenced events come back from the bridge in order.
    Attached,
}

impl Owned {
    pub fn new(epoch: Arc<str>, shards: usize) -> Owned {
        Owned {
            offset: 0,
            epoch,
            per_shard: vec![[0; Protocol::COUNT]; shards],
            users: HashMap::new(),
            log: VecDeque::new(),
            messages: VecDeque::new(),
            nonces: HashMap::new(),
            typing: Vec::new(),
            voice: Vec::new(),
            read: HashMap::new(),
            link: Link::Local,
            cluster_mark: None,
            alone: Vec::new(),
            handover: Vec::new(),
            retry_due: false,
            remote_members: Vec::new(),
            early: Vec::new(),
            once: Vec::new(),
        }
    }

    /// Whether the cluster sequences this channel.
    pub fn clustered(&self) -> bool {
        !matches!(self.link, Link::Local)
    }

    pub fn total(&self) -> u32 {
        self.per_shard.iter().flatten().sum()
    }

    /// Connections in the channel on every node.
    pub fn cluster_total(&self) -> u32 {
        self.total() + self.remote_members.iter().map(|(_, n)| n).sum::<u32>()
    }

    pub fn set_remote_members(&mut self, node: u64, count: u32) {
        self.remote_members.retain(|(n, _)| *n != node);
        if count > 0 {
            self.remote_members.push((node, count));
        }
    }

    /// Whether an event relayed by several nodes is new here (it is
    /// remembered).
    pub fn first_time(&mut self, once: u64) -> bool {
        if self.once.contains(&once) {
            return false;
        }
        if self.once.len() >= 32 {
            self.once.remove(0);
        }
        self.once.push(once);
        true
    }

    /// The shards with members of this channel.
    pub fn member_shards(&self) -> Vec<ShardId> {
        self.per_shard
            .iter()
            .enumerate()
            .filter(|(_, c)| c.iter().any(|&n| n > 0))
            .map(|(s, _)| s as ShardId)
            .collect()
    }

    /// Which protocols the members speak (by [`Protocol::index`]).
    pub fn protocols(&self) -> [bool; Protocol::COUNT] {
        let mut any = [false; Protocol::COUNT];
        for c in &self.per_shard {
            for (a, &n) in any.iter_mut().zip(c) {
                *a |= n > 0;
            }
        }
        any
    }

    /// Nothing left that anyone could ask for: no members, no voice, no
    /// history, nothing to hand over.
    pub fn is_idle(&self) -> bool {
        self.total() == 0
            && self.voice.is_empty()
            && self.log.is_empty()
            && self.handover.is_empty()
    }

    /// Messages sequenced alone and handed over to the cluster, or waiting
    /// to be: past `history_size` a channel takes no more until the
    /// cluster is back.
    pub fn waiting_for_cluster(&self) -> usize {
        self.alone.iter().map(|a| a.1).sum::<usize>() + self.handover.len()
    }

    /// Counts a message sequenced alone under the current epoch.
    pub fn sequenced_alone(&mut self) {
        match self.alone.last_mut() {
            Some((e, n)) if *e == self.epoch => *n += 1,
            _ => self.alone.push((self.epoch.clone(), 1)),
        }
    }

    /// The messages sequenced alone that the history still holds, as they
    /// stand now (edited; deleted ones are gone), to hand over.
    pub fn take_alone(&mut self) -> Vec<MessageNew> {
        let alone = std::mem::take(&mut self.alone);
        if alone.is_empty() {
            return Vec::new();
        }
        self.messages
            .iter()
            .filter(|m| {
                alone
                    .iter()
                    .any(|(epoch, _)| offset_of(epoch, &m.msg.message_id).is_some())
            })
            .map(|m| m.msg.clone())
            .collect()
    }

    pub fn message_id(&self, offset: u64) -> String {
        format!("{}-{offset}", self.epoch)
    }

    /// Forgets the history (the cluster's state replaces it).
    pub fn reset_history(&mut self) {
        self.log.clear();
        self.messages.clear();
        self.nonces.clear();
    }

    /// Takes the next offset (0 when the cluster sequences the channel:
    /// Redis gives the offset, and the event is applied when it comes back).
    pub fn next_offset(&mut self) -> u64 {
        if self.clustered() {
            return 0;
        }
        self.offset += 1;
        self.offset
    }

    /// Applies a sequenced event that the cluster ordered (made here or on
    /// another node): the stored messages follow it, whoever made it.
    /// Idempotent, since the node that made it may have applied it already.
    pub fn apply(&mut self, msg: &ServerMessage, now: u64, s: &Settings) {
        match &msg.event {
            ServerEvent::MessageNew(m) if self.stored(m.offset).is_none() => {
                let user: Arc<str> = m.user_id.as_str().into();
                self.store(&user, m.clone(), now, s);
            }
            ServerEvent::MessageEdited(e) => {
                if let Some(m) = self.find_mut(&e.message_id) {
                    m.msg.content = e.content.clone();
                    m.edited_at = Some(e.edited_at);
                }
            }
            ServerEvent::MessageDeleted(d) => {
                if let Some(offset) = offset_of(&self.epoch, &d.message_id) {
                    self.remove(offset);
                }
            }
            ServerEvent::MessageReaction(r) => {
                if let Some(m) = self.find_mut(&r.message_id) {
                    let pos = m.reactions.iter().position(|(e, _)| *e == r.emoji);
                    let user: Arc<str> = r.user_id.as_str().into();
                    match (r.action, pos) {
                        (ReactAction::Add, Some(i)) => {
                            if !m.reactions[i].1.contains(&user) {
                                m.reactions[i].1.push(user);
                            }
                        }
                        (ReactAction::Add, None) => m.reactions.push((r.emoji.clone(), vec![user])),
                        (ReactAction::Remove, Some(i)) => {
                            m.reactions[i].1.retain(|u| *u != user);
                            if m.reactions[i].1.is_empty() {
                                m.reactions.remove(i);
                            }
                        }
                        (ReactAction::Remove, None) => {}
                    }
                }
            }
            _ => {}
        }
    }

    /// Logs a sequenced event (already encoded as `frames` for the
    /// protocols its recipients use) and trims the log.
    pub fn log(
        &mut self,
        offset: u64,
        now: u64,
        msg: ServerMessage,
        frames: &Frames,
        s: &Settings,
    ) {
        self.log.push_back(LogEntry {
            offset,
            at: now,
            msg,
            frames: frames.clone(),
        });
        self.trim(now, s);
    }

    /// Drops what is older than the history's depth or age.
    pub fn trim(&mut self, now: u64, s: &Settings) {
        let old = |at: u64| now.saturating_sub(at) > s.history_ttl_ms;
        while self
            .log
            .front()
            .is_some_and(|e| self.log.len() > s.history_size || old(e.at))
        {
            self.log.pop_front();
        }
        while let Some(m) = self.messages.front() {
            if self.messages.len() <= s.history_size && !old(m.at) {
                break;
            }
            let m = self.messages.pop_front().expect("checked");
            self.forget_nonce(&m.msg);
        }
    }

    /// When the oldest logged event leaves the history (for garbage
    /// collection of an empty channel).
    pub fn history_expires(&self, s: &Settings) -> Option<u64> {
        self.log.front().map(|e| e.at + s.history_ttl_ms)
    }

    fn forget_nonce(&mut self, m: &MessageNew) {
        if let Some(n) = &m.nonce {
            self.nonces
                .remove(&(Arc::from(m.user_id.as_str()), n.as_str().into()));
        }
    }

    /// The stored message published with this nonce by this user.
    pub fn by_nonce(&self, user: &Arc<str>, nonce: &str) -> Option<&Stored> {
        let offset = *self.nonces.get(&(user.clone(), nonce.into()))?;
        self.stored(offset)
    }

    pub fn store(&mut self, user: &Arc<str>, msg: MessageNew, now: u64, s: &Settings) {
        if let Some(n) = &msg.nonce {
            self.nonces
                .insert((user.clone(), n.as_str().into()), msg.offset);
        }
        self.messages.push_back(Stored {
            msg,
            edited_at: None,
            reactions: Vec::new(),
            at: now,
        });
        self.trim(now, s);
    }

    /// Where the message at `offset` is kept. The messages are in offset
    /// order with few gaps (deletions), so the newest one says where to
    /// look first: a new message (not yet kept) and a recent one cost one
    /// or two reads, not a search through a history that is mostly out of
    /// the cache.
    fn position(&self, offset: u64) -> Option<usize> {
        let newest = self.messages.back()?.msg.offset;
        if offset > newest {
            return None;
        }
        let back = usize::try_from(newest - offset).ok()?;
        let guess = self.messages.len().checked_sub(1 + back);
        if let Some(i) = guess.filter(|&i| self.messages[i].msg.offset == offset) {
            return Some(i);
        }
        self.messages
            .binary_search_by_key(&offset, |m| m.msg.offset)
            .ok()
    }

    pub fn stored(&self, offset: u64) -> Option<&Stored> {
        self.position(offset).map(|i| &self.messages[i])
    }

    pub fn stored_mut(&mut self, offset: u64) -> Option<&mut Stored> {
        self.position(offset).map(|i| &mut self.messages[i])
    }

    /// The message a client names, if the history still holds it.
    /// The offset of a message id of this epoch that has been sequenced
    /// (kept in the history or not).
    pub fn sequenced(&self, message_id: &str) -> Option<u64> {
        offset_of(&self.epoch, message_id).filter(|o| *o <= self.offset)
    }

    pub fn find(&self, message_id: &str) -> Option<&Stored> {
        self.stored(offset_of(&self.epoch, message_id)?)
    }

    pub fn find_mut(&mut self, message_id: &str) -> Option<&mut Stored> {
        let offset = offset_of(&self.epoch, message_id)?;
        self.stored_mut(offset)
    }

    pub fn remove(&mut self, offset: u64) -> Option<Stored> {
        let m = self.messages.remove(self.position(offset)?)?;
        self.forget_nonce(&m.msg);
        Some(m)
    }

    /// The events after `since`, encoded for `protocol`, or `None` when the
    /// log no longer reaches back that far (or `since` is of another epoch,
    /// unless its offset is 0: who saw nothing of any epoch misses all of
    /// this one).
    pub fn replay(
        &mut self,
        channel: &str,
        since: &Since,
        protocol: Protocol,
    ) -> Option<Vec<Bytes>> {
        let other_epoch = *since.epoch != *self.epoch && since.offset > 0;
        if other_epoch || since.offset > self.offset {
            return None;
        }
        let first = self.log.front().map_or(self.offset + 1, |e| e.offset);
        if since.offset + 1 < first {
            return None;
        }
        let mut out = Vec::new();
        for e in self.log.iter_mut().filter(|e| e.offset > since.offset) {
            let at = Seq {
                channel,
                offset: e.offset,
                epoch: &self.epoch,
            };
            let frame = e.frames.slot(protocol);
            out.push(
                frame
                    .get_or_insert_with(|| encode_frame_at(protocol, &e.msg, Some(at)))
                    .clone(),
            );
        }
        Some(out)
    }

    /// Up to `limit` messages before offset `before` (all when `None`),
    /// oldest first, and whether older ones remain.
    pub fn history(&self, before: Option<u64>, limit: usize) -> (Vec<HistoryMessage>, bool) {
        let end = match before {
            Some(b) => self.messages.partition_point(|m| m.msg.offset < b),
            None => self.messages.len(),
        };
        let start = end.saturating_sub(limit);
        let page = self
            .messages
            .range(start..end)
            .map(Stored::history)
            .collect();
        (page, start > 0)
    }

    /// Moves `user`'s read marker up to `offset`; returns whether it moved.
    pub fn mark_read(&mut self, user: &Arc<str>, offset: u64, now: u64) -> bool {
        if let Some(m) = self.read.get_mut(user) {
            if m.0 >= offset {
                return false;
            }
            *m = (offset, now);
            return true;
        }
        if self.read.len() >= MAX_READERS {
            if let Some(lowest) = self
                .read
                .iter()
                .min_by_key(|(_, (o, _))| *o)
                .map(|(u, _)| u.clone())
            {
                self.read.remove(&lowest);
            }
        }
        self.read.insert(user.clone(), (offset, now));
        true
    }

    /// Who has read up to `offset` or further, and when they got there.
    pub fn readers(&self, offset: u64) -> Vec<Reader> {
        let mut r: Vec<Reader> = self
            .read
            .iter()
            .filter(|(_, (o, _))| *o >= offset)
            .map(|(u, (_, at))| Reader {
                user_id: u.to_string(),
                timestamp: *at,
            })
            .collect();
        r.sort_by(|a, b| {
            a.timestamp
                .cmp(&b.timestamp)
                .then(a.user_id.cmp(&b.user_id))
        });
        r
    }

    pub fn voice_participants(&self) -> Vec<VoiceParticipant> {
        self.voice
            .iter()
            .map(|p| VoiceParticipant {
                user_id: p.user.to_string(),
                state: p.state,
            })
            .collect()
    }

    /// Counts a connection of `user` in or out.
    pub fn count_user(&mut self, user: &Arc<str>, delta: i32) {
        if delta > 0 {
            *self.users.entry(user.clone()).or_default() += delta as u32;
        } else if let Some(n) = self.users.get_mut(user) {
            *n = n.saturating_sub((-delta) as u32);
            if *n == 0 {
                self.users.remove(user);
            }
        }
    }
}

/// Applies a `voice:update` to a state; returns whether anything changed.
pub fn apply_voice(state: &mut VoiceState, u: &VoiceUpdate) -> bool {
    let before = *state;
    if let Some(v) = u.muted {
        state.muted = v;
    }
    if let Some(v) = u.deafened {
        state.deafened = v;
    }
    if let Some(v) = u.speaking {
        state.speaking = v;
    }
    if let Some(v) = u.video {
        state.video = v;
    }
    if let Some(v) = u.screen_share {
        state.screen_share = v;
    }
    *state != before
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(size: usize, ttl: u64) -> Settings {
        Settings {
            history_size: size,
            history_ttl_ms: ttl,
            ..Settings::default()
        }
    }

    fn publish(
        c: &mut Owned,
        user: &str,
        text: &str,
        nonce: Option<&str>,
        now: u64,
        s: &Settings,
    ) -> u64 {
        let offset = c.next_offset();
        let m = MessageNew {
            message_id: c.message_id(offset),
            channel_id: "ch".into(),
            user_id: user.into(),
            content: text.into(),
            reply_to: None,
            thread_id: None,
            mentions: vec![],
            nonce: nonce.map(Into::into),
            offset,
            timestamp: now,
            meta: None,
        };
        let msg = ServerMessage::event(ServerEvent::MessageNew(m.clone()));
        let frames = Frames::encode(&msg, [true, false, false, false]);
        c.log(offset, now, msg, &frames, s);
        c.store(&Arc::from(user), m, now, s);
        offset
    }

    fn contents(frames: &[Bytes]) -> Vec<String> {
        frames
            .iter()
            .map(|f| {
                let h = crate::ws::frame::parse_header(f).unwrap().unwrap();
                let p = &f[h.header_len..];
                let m = if h.opcode == crate::ws::OpCode::Text {
                    crate::protocol::json::decode_server(p).unwrap()
                } else {
                    crate::protocol::binary::decode_server(p).unwrap()
                };
                match m.event {
                    ServerEvent::MessageNew(n) => n.content,
                    other => panic!("{other:?}"),
                }
            })
            .collect()
    }

    #[test]
    fn replay_gives_exactly_what_came_after_or_nothing() {
        let s = settings(3, 60_000);
        let mut c = Owned::new("ep".into(), 1);
        for i in 1..=5 {
            publish(&mut c, "a", &format!("m{i}"), None, 1000 + i, &s);
        }
        // The log holds offsets 3..=5.
        let since = |offset| Since {
            offset,
            epoch: "ep".into(),
        };
        assert_eq!(
            contents(&c.replay("c", &since(2), Protocol::Json).unwrap()),
            ["m3", "m4", "m5"]
        );
        assert_eq!(
            contents(&c.replay("c", &since(4), Protocol::Json).unwrap()),
            ["m5"]
        );
        assert!(c.replay("c", &since(5), Protocol::Json).unwrap().is_empty());
        assert!(
            c.replay("c", &since(1), Protocol::Json).is_none(),
            "gap older than the log"
        );
        assert!(
            c.replay("c", &since(6), Protocol::Json).is_none(),
            "ahead of the channel"
        );
        let other = Since {
            offset: 4,
            epoch: "other".into(),
        };
        assert!(
            c.replay("c", &other, Protocol::Json).is_none(),
            "another epoch"
        );
        // Nothing seen of another epoch: all of this one, if the log still
        // starts at its beginning.
        let nothing = Since {
            offset: 0,
            epoch: "other".into(),
        };
        assert!(
            c.replay("c", &nothing, Protocol::Json).is_none(),
            "log trimmed"
        );
        let mut young = Owned::new("ep".into(), 1);
        publish(&mut young, "a", "y1", None, 1000, &s);
        assert_eq!(
            contents(&young.replay("c", &nothing, Protocol::Json).unwrap()),
            ["y1"]
        );
        // A protocol nobody spoke at publish time is encoded on demand.
        assert_eq!(
            contents(&c.replay("c", &since(3), Protocol::Binary).unwrap()),
            ["m4", "m5"]
        );
    }

    #[test]
    fn history_pages_back_and_ages_out() {
        let s = settings(100, 1_000);
        let mut c = Owned::new("ep".into(), 1);
        for i in 1..=10 {
            publish(&mut c, "a", &format!("m{i}"), None, 100 * i, &s);
        }
        let (page, more) = c.history(None, 3);
        let texts: Vec<_> = page.iter().map(|m| m.message.content.as_str()).collect();
        assert_eq!((texts, more), (vec!["m8", "m9", "m10"], true));
        let (page, more) = c.history(Some(8), 3);
        let texts: Vec<_> = page.iter().map(|m| m.message.content.as_str()).collect();
        assert_eq!((texts, more), (vec!["m5", "m6", "m7"], true));
        let (page, more) = c.history(Some(3), 50);
        assert_eq!((page.len(), more), (2, false));
        // At 1,500 ms the messages older than 1,000 ms go (published at
        // 100-400 ms); the one at exactly 1,000 ms of age stays.
        c.trim(1_500, &s);
        assert_eq!(c.history(None, 50).0.len(), 6);
        assert!(c.find(&c.message_id(4)).is_none());
        assert!(c.find(&c.message_id(5)).is_some());
        assert_eq!(c.history_expires(&s), Some(500 + 1_000));
    }

    #[test]
    fn messages_are_found_by_offset_around_deletions() {
        let s = settings(100, 60_000);
        let mut c = Owned::new("ep".into(), 1);
        for i in 1..=10 {
            publish(&mut c, "a", &format!("m{i}"), None, i, &s);
        }
        assert!(c.remove(5).is_some());
        assert!(c.remove(9).is_some());
        for offset in 0..=12 {
            let found = c.stored(offset).map(|m| m.msg.content.clone());
            let want = (1..=10)
                .contains(&offset)
                .then(|| format!("m{offset}"))
                .filter(|_| offset != 5 && offset != 9);
            assert_eq!(found, want, "offset {offset}");
        }
    }

    #[test]
    fn nonces_are_remembered_while_the_message_is() {
        let s = settings(2, 60_000);
        let mut c = Owned::new("ep".into(), 1);
        let a: Arc<str> = "a".into();
        publish(&mut c, "a", "first", Some("n1"), 1, &s);
        assert_eq!(c.by_nonce(&a, "n1").unwrap().msg.content, "first");
        assert!(
            c.by_nonce(&"b".into(), "n1").is_none(),
            "nonces are per user"
        );
        publish(&mut c, "a", "x", None, 2, &s);
        publish(&mut c, "a", "y", None, 3, &s);
        assert!(c.by_nonce(&a, "n1").is_none(), "evicted with its message");
    }

    #[test]
    fn message_ids_belong_to_one_epoch() {
        assert_eq!(offset_of("ep", "ep-42"), Some(42));
        assert_eq!(offset_of("ep", "other-42"), None);
        assert_eq!(offset_of("a-b", "a-b-7"), Some(7));
        assert_eq!(offset_of("ep", "ep-x"), None);
        assert_eq!(offset_of("ep", "42"), None);
    }

    #[test]
    fn read_markers_only_move_forward() {
        let mut c = Owned::new("ep".into(), 1);
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        assert!(c.mark_read(&a, 5, 10));
        assert!(!c.mark_read(&a, 3, 11));
        assert!(c.mark_read(&b, 2, 12));
        let names = |r: Vec<Reader>| r.into_iter().map(|r| r.user_id).collect::<Vec<_>>();
        assert_eq!(names(c.readers(2)), ["a", "b"]);
        assert_eq!(names(c.readers(4)), ["a"]);
        assert!(names(c.readers(6)).is_empty());
    }

    #[test]
    fn voice_updates_report_change() {
        let mut v = VoiceState::default();
        assert!(!apply_voice(&mut v, &VoiceUpdate::default()));
        let mute = VoiceUpdate {
            muted: Some(true),
            ..VoiceUpdate::default()
        };
        assert!(apply_voice(&mut v, &mute));
        assert!(!apply_voice(&mut v, &mute), "a no-op is no change");
        assert!(v.muted);
    }
}
