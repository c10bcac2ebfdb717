//! Cluster mode, the engine's side. Several nodes serve one product through
//! Redis; each node's bridge thread is an endpoint of its mesh and speaks
//! Redis for the shards.
//!
//! A channel's owner shard on each node keeps the channel's state for that
//! node's members. While the cluster is reachable, Redis orders the
//! channel: a sequenced event (a message, an edit, a deletion, a reaction)
//! goes to the bridge instead of being fanned out, Redis gives it the
//! channel's next offset, keeps it in the channel's stream (the history
//! every node recovers from) and publishes it; every node, this one
//! included, applies and delivers it when it comes back, so every member
//! on every node sees one order. Unsequenced events (joins, typing, voice)
//! are delivered here at once and relayed to the other nodes.
//!
//! When the cluster is unreachable the owner sequences its channels itself
//! under a new epoch (local delivery goes on; a client recovering across the
//! gap is told `recovered: false`), and takes them back to the cluster,
//! reloading their state, once the bridge is up again.

use std::sync::Arc;

use super::channel::Link;
use super::*;

/// How long Redis gets before what it refused of a channel (its state,
/// messages sequenced alone) is asked again.
const RETRY_MS: u64 = 1_000;

/// This node's link to the cluster.
#[derive(Debug, Clone)]
pub struct ClusterLink {
    /// The bridge's mesh endpoint.
    pub bridge: ShardId,
    /// This node's id (random at start).
    pub node: u64,
    /// Whether the bridge reaches Redis (as it last said).
    pub up: bool,
    /// Users whose part published to Redis may still show them online
    /// although they left while Redis was out of reach (with when they
    /// were last seen): retracted once it is back.
    pub retract: HashMap<Arc<str>, u64>,
}

/// Where an answer to a sequenced event goes once Redis has ordered it.
#[derive(Debug, Clone, Copy)]
pub struct Reply {
    pub to: ConnRef,
    pub protocol: Protocol,
    pub id: Option<u64>,
}

impl Reply {
    pub fn to(to: ConnRef, protocol: Protocol, id: Option<u64>) -> Reply {
        Reply { to, protocol, id }
    }
}

impl<O: Outbound> Engine<O> {
    /// Sends `msg` where `reply` says.
    pub(super) fn send_reply(
        &mut self,
        reply: Reply,
        msg: ServerMessage,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        self.send_to(reply.to, reply.protocol, &msg, now, tx);
    }

    /// Puts this shard in cluster mode: `bridge` is the bridge's endpoint.
    /// The bridge says `Up` once it reaches Redis.
    pub fn set_cluster(&mut self, bridge: ShardId, node: u64) {
        self.cluster = Some(ClusterLink {
            bridge,
            node,
            up: false,
            retract: HashMap::new(),
        });
    }

    /// Whether new channels are sequenced by the cluster.
    pub(super) fn cluster_up(&self) -> bool {
        self.cluster.as_ref().is_some_and(|c| c.up)
    }

    pub(super) fn send_bridge(&mut self, msg: ToBridge, now: u64, tx: &mut impl MeshTx) {
        if let Some(c) = &self.cluster {
            let bridge = c.bridge;
            self.route(bridge, MeshMsg::ToBridge(Box::new(msg)), now, tx);
        }
    }

    /// Passes an event for a user's connections to the other nodes (the
    /// user's home on this node has delivered it here).
    pub(super) fn tell_other_nodes(
        &mut self,
        user: &Arc<str>,
        event: ServerEvent,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        if self.cluster_up() {
            let msg = ServerMessage { id: None, event };
            let user = user.clone();
            let except = None;
            self.send_bridge(ToBridge::ToUser { user, msg, except }, now, tx);
        }
    }

    /// A new owned channel: the cluster sequences it when it is up.
    pub(super) fn attach(&mut self, channel: &Arc<str>, now: u64, tx: &mut impl MeshTx) {
        if !self.cluster_up() {
            return;
        }
        if let Some(o) = self.owned.get_mut(channel) {
            o.link = Link::Attaching(Vec::new());
            let channel = channel.clone();
            self.send_bridge(ToBridge::Attach { channel }, now, tx);
        }
    }

    /// What the node's bridge tells this shard, by message: each has its
    /// handler (a feature's in the feature's file, a channel's state here).
    pub(super) fn on_cluster(&mut self, msg: FromBridge, now: u64, tx: &mut impl MeshTx) {
        match msg {
            FromBridge::Attached {
                channel,
                epoch,
                offset,
                entries,
                members,
            } => {
                let loaded = (epoch, offset, entries, members);
                self.on_attached(channel, loaded, now, tx)
            }
            FromBridge::Sequenced(out) => self.on_sequenced(out, now, tx),
            FromBridge::Refused(out, why) => self.on_refused(out, why, now, tx),
            FromBridge::StreamFull(out) => {
                if let Some(r) = out.reply {
                    let msg = super::event_stream::unavailable(r.id);
                    self.send_to(r.to, r.protocol, &msg, now, tx);
                }
            }
            // Never sent: still waiting, offered again when the channel is
            // followed again.
            FromBridge::Unsequenced(out) if out.handed_over.is_some() => {}
            FromBridge::Unsequenced(out) => self.on_unsequenced(out, now, tx),
            FromBridge::Event(inc) => self.on_cluster_event(*inc, now, tx),
            FromBridge::AttachFailed { channel, why } => {
                self.on_attach_failed(channel, why, now, tx)
            }
            FromBridge::Up => self.on_cluster_up(now, tx),
            FromBridge::Presences { user, views } => self.on_remote_presences(user, views, now, tx),
            FromBridge::PresenceLoaded(q, loaded) => self.presence_query(*q, Some(loaded), now, tx),
            FromBridge::SessionTaken { gather, points, .. } => {
                let g = Gathered {
                    gather,
                    part: GatherPart::Resume(points),
                };
                self.on_gathered(g, now, tx);
            }
            FromBridge::VoiceElsewhere { user, at, node, .. } => {
                self.on_voice_elsewhere(user, at, node, now, tx)
            }
            FromBridge::Members {
                channel,
                node,
                count,
            } => {
                if let Some(o) = self.owned.get_mut(&channel) {
                    o.set_remote_members(node, count);
                }
            }
            FromBridge::NodesGone(nodes) => self.on_nodes_gone(nodes, now, tx),
            FromBridge::Republish => self.on_republish(now, tx),
            FromBridge::NotificationsKept { asker, error } => {
                self.on_notifications_kept(asker, error, now, tx)
            }
            FromBridge::Notifications { user, change } => {
                self.on_remote_notifications(user, change, now, tx)
            }
            FromBridge::NotificationsLoaded {
                user,
                notifications,
                asker,
            } => self.on_notifications_loaded(user, notifications, asker, now, tx),
            FromBridge::ToUser {
                user,
                msg,
                except,
                origin,
            } => self.on_to_user(user, msg, except, origin, now, tx),
            FromBridge::CallReach(op, answer) => self.on_call_reach(*op, answer, now, tx),
            FromBridge::Subscribe {
                user,
                channel,
                join,
            } => self.subscribe_devices(&user, &channel, join, now, tx),
            FromBridge::CallGone(op) => self.on_call_gone(*op, now, tx),
            FromBridge::ChannelAnswer {
                channel,
                parts,
                then,
            } => self.on_channel_answer(channel, parts, then, now, tx),
            FromBridge::PartWanted {
                channel,
                like,
                origin,
                token,
            } => self.on_part_wanted(channel, like, origin, token, now, tx),
            FromBridge::ConversationsLoaded {
                user,
                limit,
                conversations,
                asker,
            } => self.on_conversations_loaded(user, limit, conversations, asker, now, tx),
            FromBridge::Down => self.cluster_down(now, tx),
            // Retracted when Redis is back.
            FromBridge::Unpublished { user, last_seen } => {
                if let Some(c) = &mut self.cluster {
                    c.retract.insert(user, last_seen);
                }
            }
            FromBridge::Bans(bans) => {
                self.bans.clear();
                self.load_bans(bans, now);
            }
            FromBridge::ModerationFailed(m, e) => {
                self.answer(m.from, &err(m.ack, ErrorCode::Internal, e), now, tx);
            }
        }
    }

    /// This node's part of a channel's state, of the kind of `like`.
    pub(super) fn local_part(&self, channel: &str, like: ChannelPart) -> ChannelPart {
        let Some(o) = self.owned.get(channel) else {
            return like.empty();
        };
        match like {
            ChannelPart::Members(_) => {
                let mut members: Vec<MemberInfo> = o
                    .users
                    .iter()
                    .map(|(u, n)| MemberInfo {
                        user_id: u.to_string(),
                        connections: *n,
                    })
                    .collect();
                members.sort_by(|a, b| a.user_id.cmp(&b.user_id));
                ChannelPart::Members(members)
            }
            ChannelPart::Typing(_) => {
                ChannelPart::Typing(o.typing.iter().map(|t| t.user.to_string()).collect())
            }
            ChannelPart::Voice(_) => ChannelPart::Voice(o.voice_participants()),
            // Readers of another epoch's message: none here.
            ChannelPart::Readers { epoch, offset, .. } => ChannelPart::Readers {
                readers: match *o.epoch == *epoch {
                    true => o.readers(offset),
                    false => Vec::new(),
                },
                epoch,
                offset,
            },
        }
    }

    /// Answers a query of a channel's state: with every node's part in a
    /// cluster (the bridge gathers them), with this node's otherwise.
    pub(super) fn channel_answer(
        &mut self,
        channel: &Arc<str>,
        part: ChannelPart,
        reply: Reply,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        // Also for a channel without members here: the query reaches the
        // nodes that follow it.
        let local_only = self.owned.get(channel).is_some_and(|o| !o.clustered());
        if self.cluster_up() && !local_only {
            let msg = ToBridge::ChannelQuery {
                channel: channel.clone(),
                parts: vec![part],
                then: QueryThen::Reply(reply),
            };
            return self.send_bridge(msg, now, tx);
        }
        let msg = ack_of(reply.id, part.into_body(channel));
        self.send_to(reply.to, reply.protocol, &msg, now, tx);
    }

    /// The cluster is out of reach: this node sequences its channels under
    /// new epochs (a recovery across the gap is refused, not wrong), and
    /// joins that waited for the cluster go on.
    /// Publishes that the user has nothing on this node any more, whatever
    /// this node published of them before.
    fn retract_presence(&mut self, user: Arc<str>, last_seen: u64, now: u64, tx: &mut impl MeshTx) {
        let Some(node) = self.cluster.as_ref().map(|c| c.node) else {
            return;
        };
        let p = NodePresence {
            node,
            seq: self.next_id(),
            detail_at: 0,
            view: super::user::offline(&user, last_seen),
            connected: false,
        };
        self.send_bridge(ToBridge::Presence(Box::new(p)), now, tx);
    }

    fn cluster_down(&mut self, now: u64, tx: &mut impl MeshTx) {
        match &mut self.cluster {
            Some(c) if c.up => c.up = false,
            _ => return,
        }
        let channels: Vec<Arc<str>> = self.owned.keys().cloned().collect();
        for ch in channels {
            let epoch = self.next_epoch();
            let Some(o) = self.owned.get_mut(&ch) else {
                continue;
            };
            if !o.clustered() {
                continue;
            }
            if matches!(o.link, Link::Attached) {
                o.cluster_mark = Some((o.epoch.clone(), o.offset));
            }
            o.epoch = epoch;
            o.early.clear();
            let waiting = match std::mem::take(&mut o.link) {
                Link::Attaching(w) => w,
                _ => Vec::new(),
            };
            for j in waiting {
                self.channel_join(j, now, tx);
            }
        }
    }

    /// A channel's state loaded from Redis: its epoch, offset, history
    /// and every node's member count.
    #[allow(clippy::type_complexity)]
    fn on_attached(
        &mut self,
        channel: Arc<str>,
        (epoch, offset, entries, members): (Arc<str>, u64, Vec<ServerMessage>, Vec<(u64, u32)>),
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let s = &self.s;
        let Some(o) = self.owned.get_mut(&channel) else {
            return;
        };
        o.remote_members = members;
        if !matches!(o.link, Link::Attaching(_)) {
            return;
        }
        // What this node sequenced alone goes to the cluster.
        let alone = o.take_alone();
        o.handover.extend(alone);
        // Reloaded after a gap, or after the cluster was out of reach: the
        // members here get what other nodes published meanwhile.
        // An epoch that began while this node was away (Redis restarted
        // empty, or the channel's keys expired): all of it is new here.
        let missed_after = match o.cluster_mark.take() {
            Some((e, offset)) => Some(if *e == *epoch { offset } else { 0 }),
            None => (*o.epoch == *epoch).then_some(o.offset),
        };
        o.reset_history();
        o.epoch = epoch;
        let mut missed = Vec::new();
        for msg in entries {
            if let Some(off) = sequenced_offset(&msg) {
                o.apply(&msg, now, s);
                if missed_after.is_some_and(|after| off > after) {
                    missed.push((off, msg.clone()));
                }
                o.log(off, now, msg, &Frames::default(), s);
            }
        }
        o.offset = offset;
        let waiting = match std::mem::replace(&mut o.link, Link::Attached) {
            Link::Attaching(w) => w,
            _ => Vec::new(),
        };
        for (off, msg) in missed {
            self.fan_out_local(&channel, &msg, off, None, now, tx);
        }
        for j in waiting {
            self.channel_join(j, now, tx);
        }
        // What came while the state was loading, past what it holds.
        let early = self
            .owned
            .get_mut(&channel)
            .map(|o| std::mem::take(&mut o.early))
            .unwrap_or_default();
        for inc in early {
            self.on_cluster_event(inc, now, tx);
        }
        self.hand_over(&channel, now, tx);
        self.channel_gc(&channel, now, tx);
    }

    /// Offers the cluster the messages this node sequenced alone: Redis
    /// gives them offsets of the cluster's epoch and publishes them to
    /// every node (this one too), once each however often they are
    /// offered.
    pub(super) fn hand_over(&mut self, channel: &Arc<str>, now: u64, tx: &mut impl MeshTx) {
        let Some(o) = self.owned.get(channel) else {
            return;
        };
        if !matches!(o.link, Link::Attached) || !self.cluster_up() {
            return;
        }
        let msgs = o.handover.clone();
        for m in msgs {
            let out = Outgoing {
                channel: channel.clone(),
                handed_over: Some(m.message_id.as_str().into()),
                msg: ev(ServerEvent::MessageNew(m)),
                except: None,
                reply: None,
                duplicate: false,
                epoch: None,
                once: None,
            };
            self.send_bridge(ToBridge::Sequence(Box::new(out)), now, tx);
        }
    }

    /// Tells the other nodes how many connections this node has in a
    /// channel (the bridge sends the last count of a round).
    pub(super) fn members_changed(&mut self, channel: &Arc<str>, now: u64, tx: &mut impl MeshTx) {
        if self.cluster.is_none() {
            return;
        }
        if let Some(o) = self.owned.get(channel) {
            let count = o.total();
            let channel = channel.clone();
            self.send_bridge(ToBridge::Members { channel, count }, now, tx);
        }
    }

    /// Asks the cluster again in a while for what it refused of a channel
    /// (its state, or messages sequenced alone).
    fn retry_later(&mut self, channel: &Arc<str>, now: u64) {
        if let Some(o) = self.owned.get_mut(channel) {
            if !std::mem::replace(&mut o.retry_due, true) {
                let channel = channel.clone();
                self.timers
                    .at(now + RETRY_MS, Timer::ClusterRetry { channel });
            }
        }
    }

    /// What the cluster refused of a channel, asked again.
    pub(super) fn cluster_retry(&mut self, channel: &Arc<str>, now: u64, tx: &mut impl MeshTx) {
        let up = self.cluster_up();
        let Some(o) = self.owned.get_mut(channel) else {
            return;
        };
        o.retry_due = false;
        match o.link {
            Link::Attaching(_) if up => {
                let channel = channel.clone();
                self.send_bridge(ToBridge::Attach { channel }, now, tx);
            }
            Link::Attached => self.hand_over(channel, now, tx),
            _ => {}
        }
    }

    /// The cluster took a message sequenced alone.
    fn handed_over(&mut self, channel: &Arc<str>, id: &str, now: u64, tx: &mut impl MeshTx) {
        if let Some(o) = self.owned.get_mut(channel) {
            o.handover.retain(|m| m.message_id != id);
            if o.handover.is_empty() {
                self.channel_gc(channel, now, tx);
            }
        }
    }

    /// An event relayed without an offset (typing, a member's event): to
    /// the members here, unless this node made it; an event several nodes
    /// relay (`once`), once.
    #[allow(clippy::too_many_arguments)]
    fn on_relayed(
        &mut self,
        channel: &Arc<str>,
        origin: u64,
        except: Option<Arc<str>>,
        once: Option<u64>,
        msg: &ServerMessage,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let me = self.cluster.as_ref().map_or(0, |c| c.node);
        let seen =
            once.is_some_and(|k| self.owned.get_mut(channel).is_none_or(|o| !o.first_time(k)));
        if origin != me && !seen {
            self.fan_out_local(channel, msg, 0, except.as_ref(), now, tx);
        }
    }

    /// An event sequenced by Redis, in channel order: applied and delivered
    /// here, kept while the channel loads, or a gap or a new epoch makes the
    /// channel load again.
    fn on_cluster_event(&mut self, inc: Incoming, now: u64, tx: &mut impl MeshTx) {
        let Incoming {
            channel,
            offset,
            epoch,
            origin,
            except,
            once,
            msg,
        } = inc;
        let me = self.cluster.as_ref().map_or(0, |c| c.node);
        if offset == 0 {
            return self.on_relayed(&channel, origin, except, once, &msg, now, tx);
        }
        let s = &self.s;
        let Some(o) = self.owned.get_mut(&channel) else {
            return;
        };
        if matches!(o.link, Link::Attaching(_)) {
            // Published after the state being loaded was read, maybe: kept
            // for when it is here (what the state has already is skipped).
            if o.early.len() < s.history_size {
                o.early.push(Incoming {
                    channel,
                    offset,
                    epoch,
                    origin,
                    except,
                    once,
                    msg,
                });
            }
            return;
        }
        if !matches!(o.link, Link::Attached) {
            // Not followed.
            return;
        }
        if *o.epoch != *epoch {
            // The channel started over in Redis (its keys expired, or
            // Redis restarted or failed over): reloaded, and everything
            // of the new epoch is delivered then.
            o.cluster_mark = Some((o.epoch.clone(), o.offset));
            o.link = Link::Attaching(Vec::new());
            return self.send_bridge(ToBridge::Attach { channel }, now, tx);
        }
        if offset <= o.offset {
            // Already loaded with the channel.
            return;
        }
        if offset != o.offset + 1 {
            // Events were lost between Redis and this node: load the
            // channel again; what was missed is delivered then.
            self.metrics.cluster_gaps.inc();
            tracing::warn!(%channel, expected = o.offset + 1, got = offset, "events of a channel were lost between Redis and this node; reloading it");
            o.link = Link::Attaching(Vec::new());
            return self.send_bridge(ToBridge::Attach { channel }, now, tx);
        }
        o.offset = offset;
        o.apply(&msg, now, s);
        let mentioned = match (&msg.event, origin == me) {
            (ServerEvent::MessageNew(m), true) => Some(m.clone()),
            _ => None,
        };
        let frames = self
            .fan_out_local(&channel, &msg, offset, None, now, tx)
            .unwrap_or_default();
        let s = &self.s;
        if let Some(o) = self.owned.get_mut(&channel) {
            o.log(offset, now, msg, &frames, s);
        }
        if let Some(m) = mentioned {
            self.notify_mentions(&channel, &m, now, tx);
        }
    }

    /// Redis ordered an event: its sender gets the ack (a handed-over
    /// message is taken off the list).
    pub(super) fn on_sequenced(&mut self, out: Box<Outgoing>, now: u64, tx: &mut impl MeshTx) {
        if let Some(id) = &out.handed_over {
            return self.handed_over(&out.channel, id, now, tx);
        }
        let id = out.reply.and_then(|r| r.id);
        let ack = out.reply.zip(ack_for(&out.msg, id, out.duplicate));
        if !out.duplicate {
            self.apply_own(*out, now, tx);
        }
        if let Some((r, ack)) = ack {
            self.send_to(r.to, r.protocol, &ack, now, tx);
        }
    }

    /// This node's own event, just sequenced: applied and delivered here
    /// before its sender hears it was taken, when it is the next in this
    /// node's order, so that a client holding its ack finds its message
    /// (Redis's publication of it, which comes on another connection, is
    /// then skipped as applied). Otherwise the publication applies it.
    fn apply_own(&mut self, out: Outgoing, now: u64, tx: &mut impl MeshTx) {
        let (Some(epoch), Some(offset)) = (out.epoch, sequenced_offset(&out.msg)) else {
            return;
        };
        let next = self.owned.get(&out.channel).is_some_and(|o| {
            matches!(o.link, Link::Attached) && *o.epoch == *epoch && o.offset + 1 == offset
        });
        if next {
            let origin = self.cluster.as_ref().map_or(0, |c| c.node);
            let inc = Incoming {
                channel: out.channel,
                offset,
                epoch,
                origin,
                except: out.except,
                once: out.once,
                msg: out.msg,
            };
            self.on_cluster_event(inc, now, tx);
        }
    }

    /// Redis refused an event: its sender hears why (a handed-over message
    /// is offered again later).
    pub(super) fn on_refused(
        &mut self,
        out: Box<Outgoing>,
        why: String,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        if out.handed_over.is_some() {
            // Offered again in a second (Redis dedupes it).
            return self.retry_later(&out.channel, now);
        }
        if let Some(r) = out.reply {
            let msg = err(r.id, ErrorCode::Internal, why);
            self.send_to(r.to, r.protocol, &msg, now, tx);
        }
    }

    /// An event never reached Redis (the link went down first): this node
    /// sequences it alone, within what it can hand over later.
    pub(super) fn on_unsequenced(&mut self, out: Box<Outgoing>, now: u64, tx: &mut impl MeshTx) {
        let Outgoing {
            channel,
            msg,
            reply,
            ..
        } = *out;
        // The channel may have gone meanwhile (a publish of the
        // server API to a channel without members here).
        self.ensure_owned(&channel, now, tx);
        let owned = self.owned.get_mut(&channel).expect("owned above");
        if owned.clustered() {
            // Back in the cluster already: the sender may retry.
            if let Some(r) = reply {
                let e = "the cluster's Redis went away for a moment: try again";
                let msg = err(r.id, ErrorCode::Internal, e);
                self.send_to(r.to, r.protocol, &msg, now, tx);
            }
            return;
        }
        let full = owned.waiting_for_cluster() >= self.s.history_size;
        if full && matches!(msg.event, ServerEvent::MessageNew(_)) {
            if let Some(r) = reply {
                let msg = err(r.id, ErrorCode::Internal, super::owner::FULL_ALONE);
                self.send_to(r.to, r.protocol, &msg, now, tx);
            }
            return;
        }
        let offset = owned.next_offset();
        let mut msg = msg;
        set_offset(&mut msg, &owned.epoch.clone(), offset);
        if let ServerEvent::MessageNew(m) = &msg.event {
            let m = m.clone();
            self.notify_mentions(&channel, &m, now, tx);
        }
        self.sequence(&channel, offset, msg, reply, now, tx);
        self.channel_gc(&channel, now, tx);
    }

    /// The channel's state could not be loaded: the joins that waited are
    /// refused, and it is tried again.
    pub(super) fn on_attach_failed(
        &mut self,
        channel: Arc<str>,
        why: String,
        now: u64,
        tx: &mut impl MeshTx,
    ) {
        let Some(o) = self.owned.get_mut(&channel) else {
            return;
        };
        let Link::Attaching(waiting) = &mut o.link else {
            return;
        };
        // The joins that waited are refused (they may try again);
        // members already here wait for the next try.
        let waiting = std::mem::take(waiting);
        for j in waiting {
            let joined = MeshMsg::Joined(Box::new(Joined {
                channel: j.channel,
                conn: j.from.conn,
                member: j.member,
                ack: j.ack,
                offset: 0,
                epoch: "".into(),
                members: 0,
                recovered: None,
                replay: Vec::new(),
                refused: Some((ErrorCode::Internal, why.clone())),
            }));
            self.route(j.from.shard, joined, now, tx);
        }
        self.retry_later(&channel, now);
        self.channel_gc(&channel, now, tx);
    }

    /// Redis is back: every channel is loaded again, users followed and
    /// published again, what went offline meanwhile retracted.
    pub(super) fn on_cluster_up(&mut self, now: u64, tx: &mut impl MeshTx) {
        if let Some(c) = &mut self.cluster {
            c.up = true;
        }
        let channels: Vec<Arc<str>> = self.owned.keys().cloned().collect();
        for ch in channels {
            self.attach(&ch, now, tx);
        }
        // Followed again (the bridge's subscriptions went with the
        // link), and published again: Redis may have lost this
        // node's presence, or other nodes taken it for gone. What
        // Redis may still show of users gone offline meanwhile is
        // retracted.
        let mut retract = self
            .cluster
            .as_mut()
            .map(|c| std::mem::take(&mut c.retract))
            .unwrap_or_default();
        let users: Vec<Arc<str>> = self.users.keys().cloned().collect();
        for user in users {
            if let Some(st) = self.users.get_mut(&user) {
                st.following = false;
                if st.published.take().is_some() {
                    retract.insert(user.clone(), st.last_seen);
                }
            }
            self.announce(&user, now, tx);
            self.maintain_user(&user, now, tx);
        }
        for (user, last_seen) in retract {
            // Published again just now: nothing to retract.
            if self
                .users
                .get(&user)
                .is_some_and(|st| st.published.is_some())
            {
                continue;
            }
            self.retract_presence(user, last_seen, now, tx);
        }
    }
}

/// A channel event on its way to, or back from, the cluster.
#[derive(Debug)]
pub struct Outgoing {
    pub channel: Arc<str>,
    pub msg: ServerMessage,
    /// Members of this user do not get it (typing).
    pub except: Option<Arc<str>>,
    pub reply: Option<Reply>,
    /// Redis had it already (a message sent again with its nonce): it was
    /// not published twice.
    pub duplicate: bool,
    /// A message this node sequenced alone while Redis was out of reach,
    /// handed to the cluster once it is back: its id then.
    pub handed_over: Option<Arc<str>>,
    /// A relayed event several nodes may relay too (a moderation event):
    /// its id, by which every node delivers it once.
    pub once: Option<u64>,
    /// The epoch Redis sequenced it under (set with its offset).
    pub epoch: Option<Arc<str>>,
}

/// From a shard to its node's bridge: what to ask of Redis and the other
/// nodes.
#[derive(Debug)]
pub enum ToBridge {
    /// An optional event for the events stream (see
    /// `event_stream::Extras`), in order with the channel's others.
    StreamExtra {
        channel: Option<Arc<str>>,
        line: Vec<u8>,
    },
    /// Follow a channel (subscribe, then load its state).
    Attach {
        channel: Arc<str>,
    },
    /// This node no longer has the channel's members.
    Detach {
        channel: Arc<str>,
    },
    /// This node's connections in a channel (kept in Redis for the other
    /// nodes' join acks).
    Members {
        channel: Arc<str>,
        count: u32,
    },
    /// A dropped session, kept in Redis for `ttl_ms` so that any node may
    /// resume it.
    KeepSession {
        user: Arc<str>,
        session: SessionId,
        points: ResumePoints,
        ttl_ms: u64,
    },
    /// Takes a dropped session out of Redis; `asker` (the resuming
    /// connection and its gather) gets what was there.
    TakeSession {
        user: Arc<str>,
        session: SessionId,
        asker: Option<(ConnRef, u64)>,
    },
    /// A user joined a voice channel here: any other node where the user
    /// is in one takes it out (one voice channel per user).
    VoiceJoined {
        user: Arc<str>,
        channel: Arc<str>,
        at: u64,
    },
    /// Order, keep and publish a sequenced event.
    Sequence(Box<Outgoing>),
    /// An unsequenced event for the other nodes.
    Relay(Box<Outgoing>),
    /// A kick, ban or unban allowed here, for every node (bans and unbans
    /// are kept in Redis).
    Moderate(Box<Moderation>),
    /// This node has (or no longer has) connections of a user, or watchers
    /// of its presence: follow (or stop following) what reaches the user.
    FollowUser {
        user: Arc<str>,
    },
    UnfollowUser {
        user: Arc<str>,
    },
    /// An event for the user's connections on the other nodes (`dm:new`,
    /// `dm:sent`, `message:delivery`, call events), but `except` (a
    /// connection of another node the bridge stands in for).
    ToUser {
        user: Arc<str>,
        msg: ServerMessage,
        except: Option<ConnRef>,
    },
    /// The backend joins a user's connections to a channel (or takes them
    /// out): the other nodes' connections too.
    Subscribe {
        user: Arc<str>,
        channel: Arc<str>,
        join: bool,
    },
    /// A call operation of a connection here, for the node that holds the
    /// call (it comes in there as a `CallOp` from a connection the bridge
    /// stands in for).
    CallTo {
        node: u64,
        op: Box<CallOp>,
    },
    /// Is the callee of this new call connected to another node? Answered
    /// with `FromBridge::CallReach`.
    CallReach(Box<CallOp>),
    /// This node's part of a user's presence changed (to keep in Redis and
    /// publish to the nodes that follow the user).
    Presence(Box<NodePresence>),
    /// Read the other nodes' presence of these users (answered with
    /// `FromBridge::PresenceLoaded`).
    LoadPresence(Box<PresenceQuery>),
    /// A change of a user's notifications made here, to keep in Redis
    /// (`keep`: the notifications to write again) and publish to the nodes
    /// that follow the user; its asker is answered once Redis has it.
    Notifications {
        user: Arc<str>,
        change: NotificationChange,
        keep: Vec<Notification>,
        asker: Option<Asker>,
    },
    /// Read the user's notifications from Redis (a node's first device of
    /// the user connected, or `asker` wants them all).
    LoadNotifications {
        user: Arc<str>,
        asker: Option<Asker>,
    },
    /// A query of a channel's state (members, typing, voice participants,
    /// readers) to answer with every node's part; `parts` holds this
    /// node's.
    ChannelQuery {
        channel: Arc<str>,
        parts: Vec<ChannelPart>,
        then: QueryThen,
    },
    /// This node's part of another node's query.
    ChannelPart {
        channel: Arc<str>,
        part: ChannelPart,
        origin: u64,
        token: u64,
    },
    /// A direct message in `user`'s conversation with `peer`, to keep in
    /// Redis (`incoming`: to the user, one more unread).
    Conversation {
        user: Arc<str>,
        peer: Arc<str>,
        msg: Box<DmMessage>,
        incoming: bool,
    },
    /// Read a user's conversations from Redis for `asker`.
    LoadConversations {
        user: Arc<str>,
        limit: usize,
        asker: Asker,
    },
}

/// From the bridge to a shard.
#[derive(Debug)]
pub enum FromBridge {
    /// A channel's state in the cluster (its recent sequenced events,
    /// oldest first, and the other nodes' connections in it).
    Attached {
        channel: Arc<str>,
        epoch: Arc<str>,
        offset: u64,
        entries: Vec<ServerMessage>,
        members: Vec<(u64, u32)>,
    },
    /// What Redis kept of a dropped session, for the connection resuming
    /// it (`None`: nothing).
    SessionTaken {
        conn: ConnRef,
        gather: u64,
        points: Option<ResumePoints>,
    },
    /// The user joined a voice channel on another node: out of any here.
    /// The user joined a voice channel on node `node` at `at`: out of
    /// any here joined before (the later join wins on every node).
    VoiceElsewhere {
        user: Arc<str>,
        channel: Arc<str>,
        at: u64,
        node: u64,
    },
    /// Another node's connections in a channel.
    Members {
        channel: Arc<str>,
        node: u64,
        count: u32,
    },
    /// Redis ordered an event of this shard (`msg` carries its offset);
    /// answer its sender.
    Sequenced(Box<Outgoing>),
    /// The cluster is out of reach and the event was never sent: it is
    /// sequenced here.
    Unsequenced(Box<Outgoing>),
    /// Redis did not take an event (it refused it, or did not answer: then
    /// it may still be published); its sender is told.
    Refused(Box<Outgoing>, String),
    /// Refused because the events stream is full: its sender is told to
    /// try again later (`unavailable`).
    StreamFull(Box<Outgoing>),
    /// Redis refused to load a channel's state (it is full).
    AttachFailed {
        channel: Arc<str>,
        why: String,
    },
    /// An event of a channel, from any node.
    Event(Box<Incoming>),
    /// Redis did not take a moderation action.
    ModerationFailed(Box<Moderation>, String),
    /// The bans in force in the cluster (they replace the shard's table).
    Bans(Vec<Moderation>),
    /// An event for a user's connections from node `origin` (`except` a
    /// connection here).
    ToUser {
        user: Arc<str>,
        msg: ServerMessage,
        except: Option<ConnRef>,
        origin: u64,
    },
    /// The backend joins a user's connections to a channel (or takes them
    /// out), asked on another node.
    Subscribe {
        user: Arc<str>,
        channel: Arc<str>,
        join: bool,
    },
    /// No node holds the call any more.
    CallGone(Box<CallOp>),
    /// A user's presence from this node may not have reached Redis: it is
    /// published again, or retracted, when Redis is back.
    Unpublished {
        user: Arc<str>,
        last_seen: u64,
    },
    /// Whether a new call's callee is online on another node.
    CallReach(Box<CallOp>, bool),
    /// Other nodes' parts of a user's presence (published, or read when the
    /// node began to follow the user).
    Presences {
        user: Arc<str>,
        views: Vec<NodePresence>,
    },
    /// The other nodes' presence of a query's users (one list per user, in
    /// order; empty lists when Redis cannot be read).
    PresenceLoaded(Box<PresenceQuery>, Vec<Vec<NodePresence>>),
    /// These nodes stopped (or stopped refreshing their liveness in Redis);
    /// what they showed is dropped.
    NodesGone(Vec<u64>),
    /// The other nodes took this one for gone: publish every user's
    /// presence again.
    Republish,
    /// A change of a user's notifications made on another node.
    Notifications {
        user: Arc<str>,
        change: NotificationChange,
    },
    /// Redis has (or, with an error, did not take) a change of
    /// notifications; its asker is answered.
    NotificationsKept {
        asker: Asker,
        error: Option<String>,
    },
    /// A user's notifications read from Redis (none when it cannot be
    /// read), to add to those here.
    NotificationsLoaded {
        user: Arc<str>,
        notifications: Vec<Notification>,
        asker: Option<Asker>,
    },
    /// Every node's part of a query (those that answered within a second),
    /// to merge and answer.
    ChannelAnswer {
        channel: Arc<str>,
        parts: Vec<ChannelPart>,
        then: QueryThen,
    },
    /// Another node's query wants this node's part (of the kind of `like`).
    PartWanted {
        channel: Arc<str>,
        like: ChannelPart,
        origin: u64,
        token: u64,
    },
    /// A user's conversations, most recent first (`None` when Redis could
    /// not be read: the home answers with its own).
    ConversationsLoaded {
        user: Arc<str>,
        limit: usize,
        conversations: Option<Vec<Conversation>>,
        asker: Asker,
    },
    /// Redis is reachable again, or no longer.
    Up,
    Down,
}

/// What to do with the answer to a query of a channel's state.
#[derive(Debug)]
pub enum QueryThen {
    /// Answer a connection (or the server API).
    Reply(Reply),
    /// Notify the users a message mentions who are members on no node.
    Mentions(Box<MessageNew>),
}

/// One node's part of a channel's state, for a query made on another node.
#[derive(Debug, Clone, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum ChannelPart {
    Members(Vec<MemberInfo>),
    Typing(Vec<String>),
    Voice(Vec<VoiceParticipant>),
    /// Who has read up to message `<epoch>-<offset>`.
    Readers {
        epoch: String,
        offset: u64,
        readers: Vec<Reader>,
    },
}

impl ChannelPart {
    /// An empty part of the same kind.
    pub fn empty(&self) -> ChannelPart {
        match self {
            ChannelPart::Members(_) => ChannelPart::Members(Vec::new()),
            ChannelPart::Typing(_) => ChannelPart::Typing(Vec::new()),
            ChannelPart::Voice(_) => ChannelPart::Voice(Vec::new()),
            ChannelPart::Readers { epoch, offset, .. } => ChannelPart::Readers {
                epoch: epoch.clone(),
                offset: *offset,
                readers: Vec::new(),
            },
        }
    }

    /// Every node's parts as one (the first one's kind): a user's
    /// connections add up, users and participants appear once, sorted.
    pub fn merge(parts: Vec<ChannelPart>) -> Option<ChannelPart> {
        let mut parts = parts.into_iter();
        let mut all = parts.next()?;
        for p in parts {
            match (&mut all, p) {
                (ChannelPart::Members(all), ChannelPart::Members(more)) => {
                    for m in more {
                        match all.iter_mut().find(|a| a.user_id == m.user_id) {
                            Some(a) => a.connections += m.connections,
                            None => all.push(m),
                        }
                    }
                }
                (ChannelPart::Typing(all), ChannelPart::Typing(more)) => all.extend(more),
                (ChannelPart::Voice(all), ChannelPart::Voice(more)) => {
                    for v in more {
                        if !all.iter().any(|a| a.user_id == v.user_id) {
                            all.push(v);
                        }
                    }
                }
                // A reader on two nodes: when it first read there.
                (
                    ChannelPart::Readers { readers: all, .. },
                    ChannelPart::Readers { readers: more, .. },
                ) => {
                    for r in more {
                        match all.iter_mut().find(|a| a.user_id == r.user_id) {
                            Some(a) => a.timestamp = a.timestamp.min(r.timestamp),
                            None => all.push(r),
                        }
                    }
                }
                _ => {}
            }
        }
        match &mut all {
            ChannelPart::Members(m) => m.sort_by(|a, b| a.user_id.cmp(&b.user_id)),
            ChannelPart::Typing(t) => {
                t.sort();
                t.dedup();
            }
            ChannelPart::Voice(v) => v.sort_by(|a, b| a.user_id.cmp(&b.user_id)),
            ChannelPart::Readers { readers, .. } => readers.sort_by(|a, b| {
                a.timestamp
                    .cmp(&b.timestamp)
                    .then(a.user_id.cmp(&b.user_id))
            }),
        }
        Some(all)
    }

    pub fn into_body(self, channel: &str) -> AckBody {
        let channel_id = channel.to_string();
        match self {
            ChannelPart::Members(members) => AckBody::Members(MembersAck {
                channel_id,
                members,
            }),
            ChannelPart::Typing(user_ids) => AckBody::Typing(TypingAck {
                channel_id,
                user_ids,
            }),
            ChannelPart::Voice(participants) => AckBody::Voice(VoiceAck {
                channel_id,
                participants,
                token: None,
                server_url: None,
            }),
            ChannelPart::Readers {
                epoch,
                offset,
                readers,
            } => AckBody::ReadReceipts(ReadReceiptsAck {
                channel_id,
                message_id: format!("{epoch}-{offset}"),
                readers,
            }),
        }
    }
}

/// A connection waiting for an answer: where, in which protocol, its id.
pub type Asker = (ConnRef, Protocol, Option<u64>);

/// A change of a user's notifications, for the other nodes.
#[derive(
    Debug,
    Clone,
    PartialEq,
    serde::Serialize,
    serde::Deserialize,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub enum NotificationChange {
    New(Notification),
    Read(Vec<String>),
    Clear(String),
    ClearAll,
}

/// A channel event as the cluster delivered it.
#[derive(Debug)]
pub struct Incoming {
    pub channel: Arc<str>,
    /// 0 for unsequenced events.
    pub offset: u64,
    pub epoch: Arc<str>,
    /// The node that made it.
    pub origin: u64,
    pub except: Option<Arc<str>>,
    /// An event several nodes may relay: its id (delivered once).
    pub once: Option<u64>,
    pub msg: ServerMessage,
}

/// Puts the offset Redis gave into a sequenced event (and, for a new
/// message, the id made of it).
pub fn set_offset(msg: &mut ServerMessage, epoch: &str, offset: u64) {
    match &mut msg.event {
        ServerEvent::MessageNew(m) => {
            m.offset = offset;
            m.message_id = format!("{epoch}-{offset}");
        }
        ServerEvent::MessageEdited(m) => m.offset = offset,
        ServerEvent::MessageDeleted(m) => m.offset = offset,
        ServerEvent::MessageReaction(m) => m.offset = offset,
        _ => {}
    }
}

/// The offset of a sequenced event.
pub fn sequenced_offset(msg: &ServerMessage) -> Option<u64> {
    match &msg.event {
        ServerEvent::MessageNew(m) => Some(m.offset),
        ServerEvent::MessageEdited(m) => Some(m.offset),
        ServerEvent::MessageDeleted(m) => Some(m.offset),
        ServerEvent::MessageReaction(m) => Some(m.offset),
        _ => None,
    }
}

/// The answer to the sender of a sequenced event.
pub fn ack_for(msg: &ServerMessage, id: Option<u64>, duplicate: bool) -> Option<ServerMessage> {
    let body = match &msg.event {
        ServerEvent::MessageNew(m) => AckBody::Send(SendAck {
            message_id: m.message_id.clone(),
            channel_id: m.channel_id.clone(),
            offset: m.offset,
            timestamp: m.timestamp,
            nonce: m.nonce.clone(),
            duplicate,
        }),
        ServerEvent::MessageEdited(m) => event_ack_body(&m.channel_id, &m.message_id, m.offset),
        ServerEvent::MessageDeleted(m) => event_ack_body(&m.channel_id, &m.message_id, m.offset),
        ServerEvent::MessageReaction(m) => event_ack_body(&m.channel_id, &m.message_id, m.offset),
        _ => return None,
    };
    Some(ack_of(id, body))
}

fn event_ack_body(channel: &str, message_id: &str, offset: u64) -> AckBody {
    AckBody::Event(EventAck {
        channel_id: channel.to_string(),
        message_id: message_id.to_string(),
        offset,
    })
}
