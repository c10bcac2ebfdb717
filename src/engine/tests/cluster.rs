//! Cluster mode, driven in memory: two nodes of two shards each, each with
//! the real bridge core (`cluster::core`), over a model of Redis that runs
//! the core's operations as the Lua scripts and commands do (an offset per
//! channel, a log, nonces, presence and notification hashes, the live
//! nodes) and delivers what is published to the nodes that follow it. It
//! can be taken down, cut off from one node, or lose messages.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::*;
use crate::cluster::core::{Core, LinkCmd, Settings as CoreSettings};
use crate::cluster::keys;
use crate::cluster::ops::{Fault, Op, Outcome, Reply};
use crate::cluster::wire::{self, NodeMsg};

#[derive(Default)]
pub(super) struct Chan {
    pub epoch: String,
    pub offset: u64,
    /// (offset, archive), oldest first.
    pub log: Vec<(u64, Vec<u8>)>,
    pub nonces: HashMap<String, u64>,
}

/// Redis, in memory, at the level of the bridge's operations.
#[derive(Default)]
pub(super) struct Redis {
    pub up: bool,
    pub channels: HashMap<String, Chan>,
    pub members: HashMap<String, BTreeMap<String, u32>>,
    pub presence: HashMap<String, BTreeMap<String, Vec<u8>>>,
    pub notifications: HashMap<String, BTreeMap<String, String>>,
    pub conversations: HashMap<String, BTreeMap<String, String>>,
    pub bans: BTreeMap<String, String>,
    /// Dropped sessions: key, value and when they expire.
    pub sessions: HashMap<String, (String, u64)>,
    pub nodes: BTreeMap<String, u64>,
    pub beat: Option<u64>,
    pub sets: HashMap<String, HashSet<String>>,
    /// Per node: what its link follows, and what was published to it.
    pub subs: Vec<HashSet<String>>,
    pub inbox: Vec<VecDeque<(String, Vec<u8>)>>,
    /// Nodes whose link cannot reach Redis.
    pub cut: HashSet<usize>,
    /// Redis refuses what would write (a full Redis: `maxmemory` with
    /// `noeviction`), but answers.
    pub full: bool,
    /// Drops a published message for a node (`node`, channel, payload)
    /// while it returns true.
    #[allow(clippy::type_complexity)]
    pub lose: Option<Box<dyn FnMut(usize, &str, &[u8]) -> bool>>,
}

impl Redis {
    /// A channel's state, made under `fresh_epoch` if Redis has none.
    fn chan(&mut self, channel: &str, fresh_epoch: String) -> &mut Chan {
        let ch = self.channels.entry(channel.to_string()).or_default();
        if ch.epoch.is_empty() {
            *ch = Chan {
                epoch: fresh_epoch,
                ..Chan::default()
            };
        }
        ch
    }

    fn reaches(&self, n: usize) -> bool {
        self.up && !self.cut.contains(&n)
    }

    fn publish(&mut self, name: &str, payload: Vec<u8>) -> i64 {
        let mut heard = 0;
        for k in 0..self.subs.len() {
            if !self.subs[k].contains(name) || !self.reaches(k) {
                continue;
            }
            heard += 1;
            if let Some(lose) = &mut self.lose {
                if lose(k, name, &payload) {
                    continue;
                }
            }
            self.inbox[k].push_back((name.to_string(), payload.clone()));
        }
        heard
    }

    fn run(&mut self, n: usize, op: Op, now: u64) -> Result<Reply, Fault> {
        if !self.reaches(n) {
            return Err(Fault::Lost("Redis is out of reach".into()));
        }
        // What takes memory (removing runs at the limit too).
        let writes = match &op {
            Op::Sequence { .. }
            | Op::Conversation { .. }
            | Op::Moderate { .. }
            | Op::KeepSession { .. }
            | Op::Presence { offline: false, .. } => true,
            Op::Members { count, .. } => *count > 0,
            Op::Notifications { op, .. } => matches!(*op, "add" | "set"),
            _ => false,
        };
        // Loading a channel Redis has no epoch for writes one.
        let new_channel = match &op {
            Op::Load { channel, .. } => !self.channels.contains_key(&**channel),
            _ => false,
        };
        if self.full && (writes || new_channel) {
            return Err(Fault::Refused(
                "OOM command not allowed when used memory > 'maxmemory'".into(),
            ));
        }
        Ok(match op {
            Op::Subscribe { names, .. } => {
                self.subs[n].extend(names);
                Reply::Done
            }
            // The events stream lives in the real Redis only
            // (`tests/all/events_stream.rs`).
            Op::TrimStream { .. } => Reply::Trimmed {
                length: 0,
                trimmed: 0,
            },
            Op::StreamExtras { lines, .. } => Reply::Count(lines.len() as i64),
            Op::Unsubscribe { names, .. } => {
                for name in names {
                    self.subs[n].remove(&name);
                }
                Reply::Done
            }
            Op::Sequence {
                channel,
                fresh_epoch,
                depth,
                events,
                ..
            } => {
                let ch = self.chan(&channel, fresh_epoch);
                let mut results = Vec::new();
                let mut frames = Vec::new();
                let mut first = None;
                for (archive, nonce, _) in events {
                    if let Some(&known) =
                        (!nonce.is_empty()).then(|| ch.nonces.get(&nonce)).flatten()
                    {
                        results.push(Outcome::Again(known));
                        continue;
                    }
                    ch.offset += 1;
                    ch.log.push((ch.offset, archive.clone()));
                    if ch.log.len() > depth {
                        ch.log.remove(0);
                    }
                    if !nonce.is_empty() {
                        ch.nonces.insert(nonce, ch.offset);
                    }
                    first.get_or_insert(ch.offset);
                    wire::push_frame(&mut frames, &archive);
                    results.push(Outcome::New(ch.offset));
                }
                let epoch = ch.epoch.clone();
                if let Some(first) = first {
                    let mut payload = format!("{first}:{epoch}:").into_bytes();
                    payload.extend(frames);
                    self.publish(&keys::channel(&channel), payload);
                }
                Reply::Sequenced { epoch, results }
            }
            Op::Load {
                channel,
                fresh_epoch,
                depth,
                ..
            } => {
                let members = self
                    .members
                    .get(&*channel)
                    .map(|m| m.iter().map(|(k, v)| (k.clone(), *v)).collect())
                    .unwrap_or_default();
                let ch = self.chan(&channel, fresh_epoch);
                let entries = ch.log.iter().rev().take(depth).cloned().collect();
                Reply::Loaded {
                    offset: ch.offset,
                    epoch: ch.epoch.clone(),
                    entries,
                    members,
                }
            }
            Op::Publish { name, payload, .. } => Reply::Count(self.publish(&name, payload)),
            Op::Members {
                channel,
                node,
                count,
                payload,
                ..
            } => {
                let name = keys::node_name(node);
                let m = self.members.entry(channel.to_string()).or_default();
                let set = self.sets.entry(keys::node_channels(&name)).or_default();
                if count == 0 {
                    m.remove(&name);
                    set.remove(&*channel);
                } else {
                    m.insert(name, count);
                    set.insert(channel.to_string());
                }
                self.publish(&keys::channel(&channel), payload);
                Reply::Done
            }
            Op::Presence {
                user,
                node,
                archive,
                offline,
                payload,
                ..
            } => {
                let name = keys::node_name(node);
                let fields = self.presence.entry(user.to_string()).or_default();
                let set = self.sets.entry(keys::node_users(&name)).or_default();
                if offline {
                    fields.remove(&name);
                    set.remove(&*user);
                } else {
                    fields.insert(name, archive);
                    set.insert(user.to_string());
                }
                self.publish(&keys::user(&user), payload);
                Reply::Done
            }
            Op::ReadPresence { users } => Reply::Presences(
                users
                    .iter()
                    .map(|u| {
                        self.presence
                            .get(&**u)
                            .map(|f| f.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                            .unwrap_or_default()
                    })
                    .collect(),
            ),
            Op::Notifications {
                user,
                op,
                payload,
                max,
                args,
                ..
            } => {
                let kept = self.notifications.entry(user.to_string()).or_default();
                match op {
                    "clear" => kept.clear(),
                    "del" => {
                        for f in &args {
                            kept.remove(f);
                        }
                    }
                    _ => {
                        for pair in args.chunks(2) {
                            if op == "add" || kept.contains_key(&pair[0]) {
                                kept.insert(pair[0].clone(), pair[1].clone());
                            }
                        }
                        while kept.len() > max {
                            let oldest = kept.keys().next().cloned().unwrap();
                            kept.remove(&oldest);
                        }
                    }
                }
                self.publish(&keys::user(&user), payload);
                Reply::Done
            }
            Op::ReadNotifications { user } => Reply::Strings(
                self.notifications
                    .get(&*user)
                    .map(|k| k.values().cloned().collect())
                    .unwrap_or_default(),
            ),
            Op::Conversation {
                user,
                peer,
                timestamp,
                json,
                incoming,
                ..
            } => {
                let convs = self.conversations.entry(user.to_string()).or_default();
                let unread = match incoming {
                    true => {
                        convs
                            .get(&*peer)
                            .and_then(|v| v.split(':').next()?.parse::<u32>().ok())
                            .unwrap_or(0)
                            + 1
                    }
                    false => 0,
                };
                convs.insert(peer.to_string(), format!("{unread}:{timestamp}:{json}"));
                Reply::Done
            }
            Op::KeepSession {
                user,
                session,
                points,
                ttl_ms,
            } => {
                self.sessions
                    .insert(keys::session(&user, &session), (points, now + ttl_ms));
                Reply::Done
            }
            Op::TakeSession { user, session } => Reply::Taken(
                self.sessions
                    .remove(&keys::session(&user, &session))
                    .filter(|(_, until)| *until > now)
                    .map(|(v, _)| v),
            ),
            Op::ReadConversations { user } => Reply::Pairs(
                self.conversations
                    .get(&*user)
                    .map(|c| c.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                    .unwrap_or_default(),
            ),
            Op::Moderate {
                field,
                op,
                json,
                payload,
            } => {
                match op {
                    "ban" => {
                        self.bans.insert(field, json);
                    }
                    "unban" => {
                        self.bans.remove(&field);
                    }
                    _ => {}
                }
                self.publish(keys::MODERATION, payload);
                Reply::Done
            }
            Op::ReadBans => Reply::Pairs(
                self.bans
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            ),
            Op::DropBans { fields } => {
                for f in fields {
                    self.bans.remove(&f);
                }
                Reply::Done
            }
            Op::Heartbeat { node, silent_ms } => {
                let last = self.beat.unwrap_or(now);
                self.beat = Some(now);
                if now.saturating_sub(last) > silent_ms {
                    for t in self.nodes.values_mut() {
                        *t = now;
                    }
                }
                let new = self.nodes.insert(keys::node_name(node), now).is_none();
                let removed: Vec<String> = self
                    .nodes
                    .iter()
                    .filter(|(_, t)| now.saturating_sub(**t) >= silent_ms)
                    .map(|(n, _)| n.clone())
                    .collect();
                for r in &removed {
                    self.nodes.remove(r);
                }
                let live = self.nodes.keys().cloned().collect();
                Reply::Beat { new, removed, live }
            }
            Op::ForgetNode { node } => {
                self.forget(node);
                Reply::Done
            }
            Op::Leave { node } => {
                self.nodes.remove(&keys::node_name(node));
                self.forget(node);
                Reply::Done
            }
        })
    }

    /// Removes a node's parts and tells every node (`forget_node`).
    pub fn forget(&mut self, node: u64) {
        let name = keys::node_name(node);
        for fields in self.presence.values_mut() {
            fields.remove(&name);
        }
        for m in self.members.values_mut() {
            m.remove(&name);
        }
        self.sets.remove(&keys::node_users(&name));
        self.sets.remove(&keys::node_channels(&name));
        self.publish(keys::GONE, wire::payload(&[NodeMsg::Gone(node)]));
    }
}

/// Redis, and the bridge cores of every node.
pub(super) struct Cluster {
    pub redis: Redis,
    pub cores: Vec<Core>,
    /// The cores' clock (ms): it moves when a test lets time pass.
    pub clock: u64,
}

impl Cluster {
    /// The channels node `n` follows.
    pub fn followed(&self, n: usize) -> HashSet<String> {
        self.redis.subs[n]
            .iter()
            .filter_map(|s| keys::channel_of(s).map(str::to_string))
            .collect()
    }

    /// The users node `n` follows.
    pub fn users(&self, n: usize) -> HashSet<String> {
        self.redis.subs[n]
            .iter()
            .filter_map(|s| keys::user_of(s).map(str::to_string))
            .collect()
    }
}

pub(super) const SHARDS: u16 = 2;
pub(super) const BRIDGE: ShardId = SHARDS + 1;

pub(super) fn settings() -> CoreSettings {
    CoreSettings {
        history_size: 1000,
        history_ttl_ms: 86_400_000,
        max_notifications: 100,
        notification_ttl_ms: 604_800_000,
        max_conversations: 100,
        node_timeout_ms: 30_000,
        redis_cluster: false,
        events_stream: None,
    }
}

pub(super) fn nodes() -> (Vec<Sim>, Cluster) {
    nodes_with(2, unlimited())
}

pub(super) fn nodes_with(count: usize, engine: Settings) -> (Vec<Sim>, Cluster) {
    let mut sims = Vec::new();
    let mut cores = Vec::new();
    for n in 0..count as u64 {
        let mut sim = Sim::with(SHARDS, engine.clone());
        sim.mesh.0.push(VecDeque::new()); // the bridge's queue
        for e in &mut sim.shards {
            e.set_cluster(BRIDGE, n + 1);
        }
        sims.push(sim);
        let metrics = Arc::new(crate::metrics::ClusterMetrics::default());
        cores.push(Core::new(
            n + 1,
            SHARDS as usize,
            settings(),
            metrics,
            99 + n,
        ));
    }
    let mut c = Cluster {
        redis: Redis {
            up: true,
            subs: vec![HashSet::new(); count],
            inbox: vec![VecDeque::new(); count],
            ..Redis::default()
        },
        cores,
        clock: 1_000,
    };
    pump(&mut sims, &mut c);
    (sims, c)
}

/// Cuts one node off Redis, or lets it reach Redis again.
pub(super) fn set_node(sims: &mut [Sim], c: &mut Cluster, n: usize, up: bool) {
    if up {
        c.redis.cut.remove(&n);
        c.clock += 10_000;
    } else {
        c.redis.cut.insert(n);
        let now = c.clock;
        c.cores[n].lost("cut off", now);
        c.redis.subs[n].clear();
        c.redis.inbox[n].clear();
    }
    pump(sims, c);
}

/// Takes Redis down for every node, or brings it back.
pub(super) fn set_up(sims: &mut [Sim], c: &mut Cluster, up: bool) {
    c.redis.up = up;
    if up {
        c.clock += 10_000;
    } else {
        let now = c.clock;
        for n in 0..c.cores.len() {
            c.cores[n].lost("Redis went away", now);
            c.redis.subs[n].clear();
            c.redis.inbox[n].clear();
        }
    }
    pump(sims, c);
}

/// Runs every node, its bridge core and Redis until nothing moves.
pub(super) fn pump(sims: &mut [Sim], c: &mut Cluster) {
    loop {
        for sim in sims.iter_mut() {
            sim.settle();
        }
        let mut moved = false;
        let now = c.clock;
        for (n, sim) in sims.iter_mut().enumerate() {
            let core = &mut c.cores[n];
            core.tick(now);
            while let Some(cmd) = core.poll_link() {
                moved = true;
                match cmd {
                    LinkCmd::Connect { base } if c.redis.reaches(n) => {
                        c.redis.subs[n] = base.into_iter().map(|(name, _)| name).collect();
                        core.connected(now);
                    }
                    LinkCmd::Connect { .. } => core.connect_failed("out of reach", now),
                    LinkCmd::Drop => {
                        c.redis.subs[n].clear();
                        c.redis.inbox[n].clear();
                    }
                }
            }
            while let Some(m) = sim.mesh.0[BRIDGE as usize].pop_front() {
                moved = true;
                core.from_shard(m, now);
            }
            core.flush(now);
            while let Some((id, op)) = core.poll_op() {
                moved = true;
                let r = c.redis.run(n, op, now);
                core.answered(id, r, now);
            }
            while let Some((name, payload)) = c.redis.inbox[n].pop_front() {
                moved = true;
                core.pushed(&name, &payload, now);
            }
            while let Some((to, msg)) = core.poll_mesh() {
                moved = true;
                sim.mesh.0[to as usize].push_back(msg);
            }
        }
        if !moved {
            return;
        }
    }
}

/// One round of every bridge, taking at most `max` of its shards'
/// messages: what Redis answers and publishes goes back, but the shards do
/// not run (the random sequences interleave this with them).
pub(super) fn bridge_round(sims: &mut [Sim], c: &mut Cluster, max: usize) {
    let now = c.clock;
    for (n, sim) in sims.iter_mut().enumerate() {
        let core = &mut c.cores[n];
        core.tick(now);
        while let Some(cmd) = core.poll_link() {
            match cmd {
                LinkCmd::Connect { base } if c.redis.reaches(n) => {
                    c.redis.subs[n] = base.into_iter().map(|(name, _)| name).collect();
                    core.connected(now);
                }
                LinkCmd::Connect { .. } => core.connect_failed("out of reach", now),
                LinkCmd::Drop => {
                    c.redis.subs[n].clear();
                    c.redis.inbox[n].clear();
                }
            }
        }
        for _ in 0..max {
            let Some(m) = sim.mesh.0[BRIDGE as usize].pop_front() else {
                break;
            };
            core.from_shard(m, now);
        }
        core.flush(now);
        while let Some((id, op)) = core.poll_op() {
            let r = c.redis.run(n, op, now);
            core.answered(id, r, now);
        }
        while let Some((name, payload)) = c.redis.inbox[n].pop_front() {
            core.pushed(&name, &payload, now);
        }
        while let Some((to, msg)) = core.poll_mesh() {
            sim.mesh.0[to as usize].push_back(msg);
        }
    }
}

/// Node `n` dies: it is cut off, and the node that finds it silent
/// removes its parts from Redis and tells the others.
pub(super) fn node_dies(sims: &mut [Sim], c: &mut Cluster, n: usize) {
    c.redis.cut.insert(n);
    c.redis.subs[n].clear();
    c.redis.forget(n as u64 + 1);
    pump(sims, c);
}

fn publish(sims: &mut [Sim], c: &mut Cluster, node: usize, who: ConnRef, text: &str) {
    sims[node].publish(who, "general", text);
    pump(sims, c);
}

#[test]
fn nodes_share_one_order_history_and_recovery() {
    let (mut sims, mut c) = nodes();
    let (a, ra) = sims[0].connect(0, "alice", Protocol::Json);
    let (b, rb) = sims[1].connect(1, "bob", Protocol::Json);
    sims[0].join(a, "general");
    pump(&mut sims, &mut c);
    sims[1].join(b, "general");
    pump(&mut sims, &mut c);
    assert!(names(&ra.take())
        .iter()
        .any(|n| n == "channel:member_joined"));
    rb.take();
    // Interleaved publishes from both nodes, pumped only at the end.
    for i in 0..4 {
        let sim = &mut sims[0];
        sim.shards[0].handle(
            a.conn,
            ClientMessage {
                id: Some(10 + i),
                event: ClientEvent::MessageSend(MessageSend {
                    channel_id: "general".into(),
                    content: format!("a{i}"),
                    reply_to: None,
                    thread_id: None,
                    mentions: Vec::new(),
                    nonce: None,
                }),
            },
            sim.now,
            &mut sim.mesh,
        );
        publish(&mut sims, &mut c, 1, b, &format!("b{i}"));
    }
    pump(&mut sims, &mut c);
    let (got_a, got_b) = (ra.take(), rb.take());
    assert_eq!(contents(&got_a), contents(&got_b));
    assert_eq!(
        contents(&got_a).iter().map(|m| m.0).collect::<Vec<_>>(),
        (1..=8).collect::<Vec<_>>()
    );
    // Alice's acks carry the offsets Redis gave.
    for i in 0..4 {
        let AckBody::Send(s) = ack_body(&got_a, 10 + i) else {
            panic!("no send ack");
        };
        let seen = contents(&got_a);
        assert_eq!(seen[s.offset as usize - 1].1, format!("a{i}"));
    }
    // A third connection on node 1 recovers from offset 2 of the epoch.
    let epoch = c.redis.channels["general"].epoch.clone();
    let (d, rd) = sims[1].connect(0, "dave", Protocol::Json);
    sims[1].send(
        d,
        Some(5),
        ClientEvent::ChannelJoin(ChannelJoin {
            channel_id: "general".into(),
            since: Some(Since {
                offset: 2,
                epoch: epoch.clone(),
            }),
            token: None,
        }),
    );
    pump(&mut sims, &mut c);
    let got = rd.take();
    let AckBody::Join(j) = ack_body(&got, 5) else {
        panic!("no join ack: {got:?}");
    };
    assert_eq!((j.recovered, j.offset), (Some(true), 8));
    assert_eq!(
        contents(&got).iter().map(|m| m.0).collect::<Vec<_>>(),
        (3..=8).collect::<Vec<_>>()
    );
}

#[test]
fn lost_events_are_reloaded_and_delivered() {
    let (mut sims, mut c) = nodes();
    let (a, _ra) = sims[0].connect(0, "alice", Protocol::Json);
    let (b, rb) = sims[1].connect(1, "bob", Protocol::Json);
    sims[0].join(a, "general");
    sims[1].join(b, "general");
    pump(&mut sims, &mut c);
    rb.take();
    // Node 1 misses offsets 2 and 3; offset 4 shows the gap.
    c.redis.lose = Some(Box::new(|node, name, payload| {
        let offset = wire::read_payload(payload).map_or(0, |p| p.offset);
        node == 1 && name == keys::channel("general") && (offset == 2 || offset == 3)
    }));
    for i in 1..=4 {
        sims[0].publish(a, "general", &format!("m{i}"));
        pump(&mut sims, &mut c);
    }
    let got = contents(&rb.take());
    assert_eq!(
        got,
        (1..=4).map(|i| (i, format!("m{i}"))).collect::<Vec<_>>()
    );
    let gaps: u64 = sims[1]
        .shards
        .iter()
        .map(|e| e.metrics.cluster_gaps.get())
        .sum();
    assert_eq!(gaps, 1);
}

#[test]
fn without_the_cluster_a_node_goes_on_alone_and_comes_back() {
    let (mut sims, mut c) = nodes();
    let (a, ra) = sims[0].connect(0, "alice", Protocol::Json);
    let (a2, ra2) = sims[0].connect(1, "anna", Protocol::Json);
    let (b, rb) = sims[1].connect(1, "bob", Protocol::Json);
    for (k, who) in [(0, a), (0, a2), (1, b)] {
        sims[k].join(who, "general");
    }
    pump(&mut sims, &mut c);
    publish(&mut sims, &mut c, 0, a, "together");
    assert_eq!(contents(&rb.take())[0].1, "together");
    // A publish sent to Redis when Redis goes away may still be published
    // by Redis: its sender is told so, and it is not sequenced here too.
    let sim = &mut sims[0];
    sim.shards[0].handle(
        a.conn,
        ClientMessage {
            id: Some(40),
            event: ClientEvent::MessageSend(MessageSend::new("general", "in flight")),
        },
        sim.now,
        &mut sim.mesh,
    );
    c.redis.up = false;
    pump(&mut sims, &mut c);
    let got = ra.take();
    assert_eq!(error_code(&got, 40), ErrorCode::Internal, "{got:?}");
    set_up(&mut sims, &mut c, false);
    // Redis out of reach: sequenced here, and acked.
    sims[0].send(
        a,
        Some(41),
        ClientEvent::MessageSend(MessageSend::new("general", "alone")),
    );
    pump(&mut sims, &mut c);
    let here = contents(&ra2.take());
    assert_eq!(
        here.iter().map(|m| m.1.as_str()).collect::<Vec<_>>(),
        ["together", "alone"]
    );
    let acks = ra.take();
    assert!(matches!(ack_body(&acks, 41), AckBody::Send(_)));
    assert!(rb.take().is_empty(), "node 1 hears nothing while apart");
    // A join while apart is answered at once, under the node's own epoch.
    let (d, rd) = sims[0].connect(0, "dave", Protocol::Json);
    sims[0].join(d, "general");
    pump(&mut sims, &mut c);
    let AckBody::Join(j) = ack_body(&rd.take(), 1) else {
        panic!("no join ack");
    };
    assert_ne!(*j.epoch, *c.redis.channels["general"].epoch);
    // Back together: both nodes follow the channel again.
    set_up(&mut sims, &mut c, true);
    publish(&mut sims, &mut c, 1, b, "again");
    assert_eq!(contents(&ra2.take()).last().unwrap().1, "again");
    assert_eq!(contents(&rb.take()).last().unwrap().1, "again");
}

/// The messages of `general` in Redis's log, oldest first.
fn logged(c: &Cluster) -> Vec<String> {
    c.redis.channels["general"]
        .log
        .iter()
        .filter_map(|(_, a)| match wire::decode(a) {
            Ok(NodeMsg::Event { msg, .. }) => match msg.event {
                ServerEvent::MessageNew(m) => Some(m.content),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

#[test]
fn a_sender_finds_its_message_as_soon_as_it_is_acked() {
    // Redis answers the sequencing and publishes the event on two
    // connections: the answer may come first. The message is applied on
    // the sender's node before the ack goes, so an edit (or a receipt) right
    // after the ack finds it, and the publication delivers nothing twice.
    let (mut sims, mut c) = nodes();
    let (a, ra) = sims[0].connect(0, "alice", Protocol::Json);
    sims[0].join(a, "general");
    pump(&mut sims, &mut c);
    ra.take();
    sims[0].send(
        a,
        Some(7),
        ClientEvent::MessageSend(MessageSend::new("general", "hi")),
    );
    bridge_round(&mut sims, &mut c, usize::MAX);
    let owner = owner_of("general", SHARDS) as usize;
    let queued: Vec<MeshMsg> = sims[0].mesh.0[owner].drain(..).collect();
    let (answers, rest): (Vec<MeshMsg>, Vec<MeshMsg>) = queued.into_iter().partition(
        |m| matches!(m, MeshMsg::FromBridge(b) if matches!(**b, FromBridge::Sequenced(_))),
    );
    assert_eq!(answers.len(), 1, "the answer is queued: {rest:?}");
    assert!(
        rest.iter()
            .any(|m| matches!(m, MeshMsg::FromBridge(b) if matches!(**b, FromBridge::Event(_)))),
        "and the publication after it"
    );
    // Only the answer is read; then the ack reaches alice's shard.
    let sim = &mut sims[0];
    for m in answers {
        sim.shards[owner].handle_mesh(m, sim.now, &mut sim.mesh);
    }
    sim.settle();
    let got = ra.take();
    let AckBody::Send(sent) = ack_body(&got, 7) else {
        panic!("{got:?}")
    };
    assert_eq!(contents(&got), [(1, "hi".to_string())]);
    let channel: Arc<str> = "general".into();
    let o = &sim.shards[owner].owned[&channel];
    assert!(o.find(&sent.message_id).is_some(), "found once acked");
    // The publication comes now: nothing twice.
    sim.mesh.0[owner].extend(rest);
    pump(&mut sims, &mut c);
    assert!(contents(&ra.take()).is_empty());
}

#[test]
fn what_a_node_sequenced_alone_is_handed_over_once_when_redis_is_back() {
    let (mut sims, mut c) = nodes();
    let (a, ra) = sims[0].connect(0, "alice", Protocol::Json);
    let (a2, ra2) = sims[0].connect(1, "anna", Protocol::Json);
    let (b, rb) = sims[1].connect(1, "bob", Protocol::Json);
    for (k, who) in [(0, a), (0, a2), (1, b)] {
        sims[k].join(who, "general");
    }
    pump(&mut sims, &mut c);
    publish(&mut sims, &mut c, 0, a, "before");
    rb.take();
    set_up(&mut sims, &mut c, false);
    for text in ["alone-1", "alone-2", "alone-3"] {
        publish(&mut sims, &mut c, 0, a, text);
    }
    // Edited and deleted while alone: handed over as they stand.
    let seen = ra2.take();
    let id_of = |text: &str| {
        seen.iter()
            .find_map(|m| match &m.event {
                ServerEvent::MessageNew(n) if n.content == text => Some(n.clone()),
                _ => None,
            })
            .unwrap()
    };
    let (one, two, three) = (id_of("alone-1"), id_of("alone-2"), id_of("alone-3"));
    sims[0].send(
        a,
        Some(50),
        ClientEvent::MessageEdit(MessageEdit {
            channel_id: "general".into(),
            message_id: two.message_id,
            content: "alone-2, edited".into(),
        }),
    );
    sims[0].send(
        a,
        Some(51),
        ClientEvent::MessageDelete(message_ref("general", &three.message_id)),
    );
    pump(&mut sims, &mut c);
    ra.take();
    ra2.take();
    assert!(
        contents(&rb.take()).is_empty(),
        "node 1 hears nothing while apart"
    );
    // Back: node 1's member gets them once, after what it had, under the
    // cluster's epoch; Redis keeps them in its history.
    set_up(&mut sims, &mut c, true);
    let got = contents(&rb.take());
    assert_eq!(
        got,
        [
            (2, "alone-1".to_string()),
            (3, "alone-2, edited".to_string())
        ]
    );
    assert_eq!(logged(&c), ["before", "alone-1", "alone-2, edited"]);
    // Node 0's members get them under the cluster's epoch too.
    assert_eq!(contents(&ra2.take()), got);
    // Offered again (as after a lost answer): Redis knows it by the id it
    // had alone, and publishes nothing twice.
    let channel: Arc<str> = "general".into();
    let owner = owner_of("general", SHARDS) as usize;
    let sim = &mut sims[0];
    let o = sim.shards[owner].owned.get_mut(&channel).unwrap();
    assert!(o.handover.is_empty(), "taken, so no longer waiting");
    o.handover = vec![one];
    sim.shards[owner].hand_over(&channel, sim.now, &mut sim.mesh);
    pump(&mut sims, &mut c);
    assert!(contents(&rb.take()).is_empty());
    assert_eq!(logged(&c), ["before", "alone-1", "alone-2, edited"]);
    let o = &sims[0].shards[owner].owned[&channel];
    assert!(o.handover.is_empty());
}

#[test]
fn what_a_node_sequenced_alone_over_two_outages_is_all_handed_over() {
    // Redis comes back for a moment and goes again before the channel's
    // state is loaded (a failover in progress): the second outage starts
    // another epoch here, and what the first one sequenced is handed over
    // all the same.
    let (mut sims, mut c) = nodes();
    let (a, _ra) = sims[0].connect(0, "alice", Protocol::Json);
    let (b, rb) = sims[1].connect(1, "bob", Protocol::Json);
    sims[0].join(a, "general");
    sims[1].join(b, "general");
    pump(&mut sims, &mut c);
    publish(&mut sims, &mut c, 0, a, "before");
    rb.take();
    set_up(&mut sims, &mut c, false);
    publish(&mut sims, &mut c, 0, a, "first outage");
    // The link comes up and the shards hear it, but it is lost before
    // the bridge loads the channel.
    c.redis.up = true;
    c.clock += 10_000;
    bridge_round(&mut sims, &mut c, usize::MAX);
    for sim in sims.iter_mut() {
        sim.settle();
    }
    set_up(&mut sims, &mut c, false);
    publish(&mut sims, &mut c, 0, a, "second outage");
    set_up(&mut sims, &mut c, true);
    assert_eq!(
        contents(&rb.take()),
        [
            (2, "first outage".to_string()),
            (3, "second outage".to_string())
        ]
    );
    assert_eq!(logged(&c), ["before", "first outage", "second outage"]);
}

#[test]
fn a_channel_that_starts_over_in_redis_is_reloaded_and_nothing_is_missed() {
    let (mut sims, mut c) = nodes();
    let (a, ra) = sims[0].connect(0, "alice", Protocol::Json);
    let (b, rb) = sims[1].connect(1, "bob", Protocol::Json);
    sims[0].join(a, "general");
    sims[1].join(b, "general");
    pump(&mut sims, &mut c);
    for text in ["one", "two", "three"] {
        publish(&mut sims, &mut c, 1, b, text);
    }
    assert_eq!(contents(&ra.take()).len(), 3);
    rb.take();
    // Redis forgets the channel (its keys expired, or a replica that
    // lacked them took over): the next events start over at offset 1.
    c.redis.channels.remove("general");
    publish(&mut sims, &mut c, 1, b, "four");
    publish(&mut sims, &mut c, 1, b, "five");
    let got = contents(&ra.take());
    assert_eq!(
        got,
        [(1, "four".to_string()), (2, "five".to_string())],
        "the new epoch, whole, on the node that had more"
    );
    let epoch = c.redis.channels["general"].epoch.clone();
    let owner = owner_of("general", SHARDS) as usize;
    assert_eq!(
        &*sims[0].shards[owner].owned[&Arc::<str>::from("general")].epoch,
        epoch.as_str()
    );
}

#[test]
fn a_full_redis_refuses_and_takes_what_was_sequenced_alone_once_it_has_room() {
    let (mut sims, mut c) = nodes();
    let (a, ra) = sims[0].connect(0, "alice", Protocol::Json);
    let (b, rb) = sims[1].connect(1, "bob", Protocol::Json);
    sims[0].join(a, "general");
    sims[1].join(b, "general");
    pump(&mut sims, &mut c);
    set_up(&mut sims, &mut c, false);
    publish(&mut sims, &mut c, 0, a, "alone");
    assert!(matches!(ack_body(&ra.take(), 2), AckBody::Send(_)));
    // Back, but full: the link stays up, new messages are refused (not
    // sequenced here), the handover waits.
    c.redis.full = true;
    set_up(&mut sims, &mut c, true);
    assert!(c.cores[0].is_up(), "a full Redis is no lost Redis");
    sims[0].send(
        a,
        Some(7),
        ClientEvent::MessageSend(MessageSend::new("general", "refused")),
    );
    pump(&mut sims, &mut c);
    assert_eq!(error_code(&ra.take(), 7), ErrorCode::Internal);
    assert!(contents(&rb.take()).is_empty());
    // A join of a channel Redis would have to create: refused, not left
    // waiting.
    sims[1].send(
        b,
        Some(8),
        ClientEvent::ChannelJoin(ChannelJoin {
            channel_id: "new".into(),
            since: None,
            token: None,
        }),
    );
    pump(&mut sims, &mut c);
    assert_eq!(error_code(&rb.take(), 8), ErrorCode::Internal);
    // Room again: the next retry hands it over.
    c.redis.full = false;
    for sim in sims.iter_mut() {
        sim.advance(1_500);
    }
    c.clock += 1_500;
    pump(&mut sims, &mut c);
    assert_eq!(contents(&rb.take()), [(1, "alone".to_string())]);
    assert_eq!(logged(&c), ["alone"]);
    sims[1].join(b, "new");
    pump(&mut sims, &mut c);
    assert!(matches!(ack_body(&rb.take(), 1), AckBody::Join(_)));
}

#[test]
fn alone_a_channel_takes_no_more_than_it_can_hand_over() {
    let settings = Settings {
        history_size: 3,
        ..unlimited()
    };
    let (mut sims, mut c) = nodes_with(2, settings);
    let (a, ra) = sims[0].connect(0, "alice", Protocol::Json);
    let (b, rb) = sims[1].connect(1, "bob", Protocol::Json);
    sims[0].join(a, "general");
    sims[1].join(b, "general");
    pump(&mut sims, &mut c);
    set_up(&mut sims, &mut c, false);
    ra.take();
    for i in 0..4u64 {
        sims[0].send(
            a,
            Some(10 + i),
            ClientEvent::MessageSend(MessageSend::new("general", format!("m{i}"))),
        );
    }
    pump(&mut sims, &mut c);
    let got = ra.take();
    for i in 0..3 {
        assert!(
            matches!(ack_body(&got, 10 + i), AckBody::Send(_)),
            "{got:?}"
        );
    }
    assert_eq!(error_code(&got, 13), ErrorCode::Internal);
    set_up(&mut sims, &mut c, true);
    let delivered = contents(&rb.take());
    assert_eq!(
        delivered.iter().map(|m| m.1.as_str()).collect::<Vec<_>>(),
        ["m0", "m1", "m2"]
    );
}

#[test]
fn a_node_without_members_stops_following_a_channel() {
    let (mut sims, mut c) = nodes();
    let (a, _ra) = sims[0].connect(0, "alice", Protocol::Json);
    sims[0].join(a, "general");
    pump(&mut sims, &mut c);
    assert!(c.followed(0).contains("general"));
    sims[0].send(
        a,
        Some(3),
        ClientEvent::ChannelLeave(ChannelRef {
            channel_id: "general".into(),
        }),
    );
    pump(&mut sims, &mut c);
    assert!(!c.followed(0).contains("general"));
    // The history stays in the cluster for whoever comes next.
    assert_eq!(c.redis.channels["general"].offset, 0);
}

#[test]
fn kicks_and_bans_reach_every_node_and_wait_for_the_cluster() {
    let (mut sims, mut c) = nodes();
    let admin = crate::access::Access {
        roles: crate::access::Roles::ADMIN,
        grants: None,
        expires: 0,
    };
    let (root, rroot) = sims[0].connect_as(0, "root", admin);
    let (t, rt) = sims[1].connect(1, "troll", Protocol::Json);
    let ban = |user: &str| {
        ClientEvent::ModerationBanUser(BanUser {
            user_id: user.into(),
            channel_id: None,
            duration_ms: None,
            reason: None,
        })
    };
    sims[0].send(root, Some(1), ban("troll"));
    pump(&mut sims, &mut c);
    assert!(matches!(ack_body(&rroot.take(), 1), AckBody::Empty(_)));
    assert_eq!(rt.closed.get(), Some(crate::ws::close::BANNED));
    assert!(sims[1].shards[1].conn(t.conn).is_none());
    for sim in &sims {
        assert!(sim
            .shards
            .iter()
            .all(|e| e.server_ban("troll", sim.now).is_some()));
    }
    // A kick of a user on no node is not an error in a cluster: another
    // node may hold it.
    sims[0].send(
        root,
        Some(2),
        ClientEvent::ModerationKickUser(KickUser {
            user_id: "nobody".into(),
            channel_id: None,
            reason: None,
        }),
    );
    pump(&mut sims, &mut c);
    assert!(matches!(ack_body(&rroot.take(), 2), AckBody::Empty(_)));
    // Without Redis a ban cannot be kept for the cluster: it is refused.
    set_up(&mut sims, &mut c, false);
    sims[0].send(root, Some(3), ban("pest"));
    pump(&mut sims, &mut c);
    assert_eq!(error_code(&rroot.take(), 3), ErrorCode::Internal);
    assert!(sims[0].shards[0].server_ban("pest", sims[0].now).is_none());
    // Coming back, the bridge hands every shard the cluster's bans.
    set_up(&mut sims, &mut c, true);
    assert!(sims[1].shards[0].server_ban("troll", sims[1].now).is_some());
    assert_eq!(sims[1].shards[0].ban_count(), 1);
}

#[test]
fn channel_members_hear_of_a_kick_or_ban_once_whatever_the_nodes() {
    let (mut sims, mut c) = nodes();
    let admin = crate::access::Access {
        roles: crate::access::Roles::ADMIN,
        grants: None,
        expires: 0,
    };
    let (root, rroot) = sims[0].connect_as(0, "root", admin);
    // Bob is in the channel through both nodes; a watcher on each.
    let (b0, _) = sims[0].connect(1, "bob", Protocol::Json);
    let (b1, _) = sims[1].connect(0, "bob", Protocol::Json);
    let (w0, rw0) = sims[0].connect(1, "wendy", Protocol::Json);
    let (w1, rw1) = sims[1].connect(1, "walt", Protocol::Json);
    for (n, who) in [(0, b0), (1, b1), (0, w0), (1, w1)] {
        sims[n].join(who, "general");
    }
    pump(&mut sims, &mut c);
    rw0.take();
    rw1.take();
    let heard = |r: &Recorder, name: &str| names(&r.take()).iter().filter(|n| **n == name).count();
    sims[0].send(
        root,
        Some(1),
        ClientEvent::ModerationKickUser(KickUser {
            user_id: "bob".into(),
            channel_id: Some("general".into()),
            reason: None,
        }),
    );
    pump(&mut sims, &mut c);
    assert!(matches!(ack_body(&rroot.take(), 1), AckBody::Empty(_)));
    assert_eq!(heard(&rw0, "moderation:user_kicked"), 1);
    assert_eq!(heard(&rw1, "moderation:user_kicked"), 1);
    // Back in, then banned from the whole server: each channel hears it
    // once.
    for (n, who) in [(0, b0), (1, b1)] {
        sims[n].join(who, "general");
    }
    pump(&mut sims, &mut c);
    rw0.take();
    rw1.take();
    sims[0].send(
        root,
        Some(2),
        ClientEvent::ModerationBanUser(BanUser {
            user_id: "bob".into(),
            channel_id: None,
            duration_ms: None,
            reason: None,
        }),
    );
    pump(&mut sims, &mut c);
    assert!(matches!(ack_body(&rroot.take(), 2), AckBody::Empty(_)));
    assert_eq!(heard(&rw0, "moderation:user_banned"), 1);
    assert_eq!(heard(&rw1, "moderation:user_banned"), 1);
}

#[test]
fn a_node_cut_off_gets_what_the_others_said_meanwhile() {
    let (mut sims, mut c) = nodes();
    let (a, ra) = sims[0].connect(0, "alice", Protocol::Json);
    let (b, rb) = sims[1].connect(1, "bob", Protocol::Json);
    sims[0].join(a, "general");
    sims[1].join(b, "general");
    pump(&mut sims, &mut c);
    publish(&mut sims, &mut c, 1, b, "one");
    assert_eq!(contents(&ra.take()), [(1, "one".to_string())]);
    set_node(&mut sims, &mut c, 0, false);
    publish(&mut sims, &mut c, 1, b, "two");
    publish(&mut sims, &mut c, 1, b, "three");
    assert!(contents(&ra.take()).is_empty());
    set_node(&mut sims, &mut c, 0, true);
    assert_eq!(
        contents(&ra.take()),
        [(2, "two".to_string()), (3, "three".to_string())]
    );
    // And on from there in the cluster's order.
    publish(&mut sims, &mut c, 0, a, "four");
    assert_eq!(
        contents(&rb.take()).last().unwrap(),
        &(4, "four".to_string())
    );
}

#[test]
fn read_receipts_know_the_readers_of_every_node() {
    let (mut sims, mut c) = nodes();
    let (a, ra) = sims[0].connect(0, "alice", Protocol::Json);
    let (b, rb) = sims[1].connect(1, "bob", Protocol::Json);
    let (d, _) = sims[1].connect(0, "dora", Protocol::Json);
    for (n, who) in [(0, a), (1, b), (1, d)] {
        sims[n].join(who, "general");
    }
    pump(&mut sims, &mut c);
    publish(&mut sims, &mut c, 0, a, "read me");
    let id = rb
        .take()
        .iter()
        .find_map(|m| match &m.event {
            ServerEvent::MessageNew(n) => Some(n.message_id.clone()),
            _ => None,
        })
        .unwrap();
    for who in [b, d] {
        sims[1].send(
            who,
            Some(5),
            ClientEvent::MessageMarkRead(message_ref("general", &id)),
        );
    }
    pump(&mut sims, &mut c);
    ra.take();
    sims[0].send(
        a,
        Some(6),
        ClientEvent::MessageGetReadReceipts(message_ref("general", &id)),
    );
    pump(&mut sims, &mut c);
    match ack_body(&ra.take(), 6) {
        AckBody::ReadReceipts(r) => {
            let mut who: Vec<&str> = r.readers.iter().map(|r| r.user_id.as_str()).collect();
            who.sort();
            assert_eq!(who, ["bob", "dora"]);
            assert_eq!(r.message_id, id);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_session_dropped_on_one_node_resumes_on_another_once() {
    let (mut sims, mut c) = nodes();
    let (a, _) = sims[0].connect(0, "alice", Protocol::Json);
    let (b, _) = sims[1].connect(1, "bob", Protocol::Json);
    sims[0].join(a, "general");
    sims[1].join(b, "general");
    pump(&mut sims, &mut c);
    publish(&mut sims, &mut c, 1, b, "m1");
    let session = sims[0].shards[0]
        .conn(a.conn)
        .unwrap()
        .member
        .session
        .to_string();
    sims[0].close(a);
    pump(&mut sims, &mut c);
    publish(&mut sims, &mut c, 1, b, "m2");
    publish(&mut sims, &mut c, 1, b, "m3");
    let resume = || {
        ClientEvent::SessionResume(SessionResume {
            session_id: session.clone(),
            positions: vec![],
        })
    };
    // Alice comes back through the other node.
    let (a2, ra2) = sims[1].connect(0, "alice", Protocol::Json);
    sims[1].send(a2, Some(9), resume());
    pump(&mut sims, &mut c);
    let got = ra2.take();
    match ack_body(&got, 9) {
        AckBody::Resume(r) => {
            let chans: Vec<(&str, bool, u64)> = r
                .channels
                .iter()
                .map(|c| (c.channel_id.as_str(), c.recovered, c.offset))
                .collect();
            assert_eq!(chans, [("general", true, 3)]);
        }
        other => panic!("{other:?}"),
    }
    let missed: Vec<(u64, String)> = contents(&got);
    assert_eq!(missed, [(2, "m2".to_string()), (3, "m3".to_string())]);
    publish(&mut sims, &mut c, 1, b, "m4");
    assert_eq!(contents(&ra2.take()), [(4, "m4".to_string())]);
    // Once: neither node resumes it again.
    for n in [0, 1] {
        let (a3, ra3) = sims[n].connect(1, "alice", Protocol::Json);
        sims[n].send(a3, Some(10), resume());
        pump(&mut sims, &mut c);
        assert_eq!(error_code(&ra3.take(), 10), ErrorCode::NotFound, "node {n}");
    }
    assert!(c.redis.sessions.is_empty());
}

#[test]
fn a_user_is_in_one_voice_channel_across_nodes() {
    let (mut sims, mut c) = nodes();
    let (b1, rb1) = sims[1].connect(1, "bob", Protocol::Json);
    let (b0, rb0) = sims[0].connect(0, "bob", Protocol::Json);
    let (w, rw) = sims[0].connect(1, "wendy", Protocol::Json);
    let voice = |ch: &str| {
        ClientEvent::VoiceJoin(ChannelRef {
            channel_id: ch.into(),
        })
    };
    sims[1].send(b1, Some(1), voice("lounge"));
    pump(&mut sims, &mut c);
    assert!(matches!(ack_body(&rb1.take(), 1), AckBody::Voice(_)));
    // The later join wins (at the same millisecond, the node with the
    // higher id).
    for sim in sims.iter_mut() {
        sim.advance(5);
    }
    sims[0].send(b0, Some(2), voice("den"));
    pump(&mut sims, &mut c);
    assert!(matches!(ack_body(&rb0.take(), 2), AckBody::Voice(_)));
    let participants = |sims: &mut [Sim], c: &mut Cluster, ch: &str| {
        sims[0].send(
            w,
            Some(3),
            ClientEvent::VoiceGetParticipants(ChannelRef {
                channel_id: ch.into(),
            }),
        );
        pump(sims, c);
        match ack_body(&rw.take(), 3) {
            AckBody::Voice(v) => v
                .participants
                .iter()
                .map(|p| p.user_id.clone())
                .collect::<Vec<_>>(),
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(participants(&mut sims, &mut c, "den"), ["bob"]);
    assert!(participants(&mut sims, &mut c, "lounge").is_empty());
    // Node 1's device is out of it: leaving again is refused.
    sims[1].send(b1, Some(4), ClientEvent::VoiceLeave);
    pump(&mut sims, &mut c);
    assert_eq!(error_code(&rb1.take(), 4), ErrorCode::NotFound);
}

#[test]
fn direct_messages_reach_a_users_connections_on_every_node() {
    let (mut sims, mut c) = nodes();
    let (a, _ra) = sims[0].connect(0, "alice", Protocol::Json);
    let (_a2, ra2) = sims[1].connect(0, "alice", Protocol::Json);
    let (_b, rb) = sims[1].connect(1, "bob", Protocol::Json);
    pump(&mut sims, &mut c);
    assert!(c.users(0).contains("alice") && c.users(1).contains("alice"));
    assert!(c.users(1).contains("bob") && !c.users(0).contains("bob"));
    sims[0].send(
        a,
        Some(4),
        ClientEvent::DmSend(DmSend {
            to_user_id: "bob".into(),
            content: "hi".into(),
            nonce: None,
        }),
    );
    pump(&mut sims, &mut c);
    assert_eq!(names(&rb.take()), ["dm:new"]);
    assert_eq!(names(&ra2.take()), ["dm:sent"]);
    // Bob's conversations on node 1 have it.
    let convs = sims[1].shards[home_of("bob", SHARDS) as usize]
        .users
        .get("bob")
        .and_then(|st| st.extra())
        .map_or(0, |m| m.conversations.len());
    assert_eq!(convs, 1);
    // And so does a node bob had no device on when it was sent.
    let (b0, rb0) = sims[0].connect(1, "bob", Protocol::Json);
    pump(&mut sims, &mut c);
    sims[0].send(
        b0,
        Some(5),
        ClientEvent::DmGetConversations(Limit { limit: None }),
    );
    pump(&mut sims, &mut c);
    match super::ack_body(&rb0.take(), 5) {
        AckBody::Conversations(cs) => {
            assert_eq!(cs.conversations.len(), 1);
            assert_eq!(
                (
                    cs.conversations[0].user_id.as_str(),
                    cs.conversations[0].unread
                ),
                ("alice", 1)
            );
        }
        other => panic!("{other:?}"),
    }
}

fn presences(msgs: &[ServerMessage]) -> Vec<(Status, Vec<DeviceKind>, Option<String>)> {
    msgs.iter()
        .filter_map(|m| match &m.event {
            ServerEvent::PresenceChanged(p) => {
                Some((p.status, p.devices.clone(), p.custom_status.clone()))
            }
            _ => None,
        })
        .collect()
}

fn bulk(
    sims: &mut [Sim],
    c: &mut Cluster,
    n: usize,
    who: ConnRef,
    rec: &Recorder,
    user: &str,
) -> PresenceView {
    sims[n].send(
        who,
        Some(77),
        ClientEvent::PresenceGetBulk(UserIds {
            user_ids: vec![user.into()],
        }),
    );
    pump(sims, c);
    match super::ack_body(&rec.take(), 77) {
        AckBody::Presences(mut p) => p.presences.remove(0),
        other => panic!("{other:?}"),
    }
}

#[test]
fn presence_adds_up_over_nodes_and_a_dead_node_goes_offline() {
    use DeviceKind::{Mobile, Web};
    let (mut sims, mut c) = nodes();
    let (w, rw) = sims[0].connect(0, "watcher", Protocol::Json);
    sims[0].send(
        w,
        Some(1),
        ClientEvent::PresenceSubscribe(UserIds {
            user_ids: vec!["dana".into()],
        }),
    );
    pump(&mut sims, &mut c);
    rw.take();
    assert!(c.users(0).contains("dana"), "a watched user is followed");
    // Dana on node 1: the watcher on node 0 sees her.
    let (d1, _) = sims[1].connect_device(1, "dana", Protocol::Json, Web);
    pump(&mut sims, &mut c);
    assert_eq!(presences(&rw.take()), [(Status::Online, vec![Web], None)]);
    // And on node 0 too, with a custom status set there.
    let (d0, _) = sims[0].connect_device(1, "dana", Protocol::Json, Mobile);
    pump(&mut sims, &mut c);
    sims[0].send(
        d0,
        Some(2),
        super::presence_update(Some(Status::Dnd), Some(Some("busy"))),
    );
    sims[1].send(
        d1,
        Some(3),
        super::presence_update(Some(Status::Idle), None),
    );
    pump(&mut sims, &mut c);
    let seen = presences(&rw.take());
    assert_eq!(
        seen.last().unwrap(),
        &(Status::Idle, vec![Mobile, Web], Some("busy".into())),
        "{seen:?}"
    );
    // A node that follows nobody reads the presence on demand.
    let (e, re) = sims[1].connect(0, "eve", Protocol::Json);
    pump(&mut sims, &mut c);
    let v = bulk(&mut sims, &mut c, 1, e, &re, "dana");
    assert_eq!((v.status, v.devices.len()), (Status::Idle, 2));
    let v = bulk(&mut sims, &mut c, 1, e, &re, "nobody");
    assert_eq!(v.status, Status::Offline);
    // Node 1 dies: only node 0's mobile is left.
    node_dies(&mut sims, &mut c, 1);
    assert_eq!(
        presences(&rw.take()),
        [(Status::Dnd, vec![Mobile], Some("busy".into()))]
    );
    // The last device leaves: offline once the grace is over, and Redis
    // no longer holds the user.
    sims[0].close(d0);
    pump(&mut sims, &mut c);
    sims[0].advance(60_000);
    pump(&mut sims, &mut c);
    assert_eq!(presences(&rw.take()), [(Status::Offline, vec![], None)]);
    assert!(c.redis.presence.get("dana").is_none_or(|v| v.is_empty()));
    // The watcher leaves: nothing is followed any more.
    sims[0].close(w);
    pump(&mut sims, &mut c);
    sims[0].advance(60_000);
    pump(&mut sims, &mut c);
    assert!(c.users(0).is_empty(), "{:?}", c.users(0));
    // Once the resume window is over, nothing is left.
    sims[0].advance(200_000);
    pump(&mut sims, &mut c);
    assert!(sims[0].shards.iter().all(|e| e.users.is_empty()));
}

#[test]
fn an_older_view_of_a_node_does_not_replace_a_newer_one() {
    let mut st = UserState::default();
    let view = |status| PresenceView {
        user_id: "u".into(),
        status,
        custom_status: None,
        activity: None,
        devices: vec![],
        last_seen: 1,
    };
    let p = |seq, status| NodePresence {
        node: 9,
        seq,
        detail_at: 0,
        view: view(status),
        connected: status != Status::Offline,
    };
    st.set_remote(p(5, Status::Offline));
    st.set_remote(p(4, Status::Online));
    assert_eq!(
        st.view("u", 10).status,
        Status::Offline,
        "the later offline stays"
    );
    st.set_remote(p(6, Status::Idle));
    assert_eq!(st.view("u", 10).status, Status::Idle);
    assert!(st.drop_nodes(&[9]));
    assert_eq!(st.view("u", 10).status, Status::Offline);
}

#[test]
fn notifications_reach_every_node_and_wait_for_a_user_away() {
    let (mut sims, mut c) = nodes();
    let (_b1, rb1) = sims[1].connect(0, "bob", Protocol::Json);
    pump(&mut sims, &mut c);
    // Made on node 0 (the server API), where bob has no device: node 1
    // delivers it, node 0 does not keep it.
    let notify = |sims: &mut [Sim], user: &str| {
        let op = UserCmd::Notify {
            kind: "invite".into(),
            data: None,
            from: None,
        };
        let sim = &mut sims[0];
        sim.shards[0].send_user_op(user.into(), None, None, op, 0, &mut sim.mesh);
    };
    notify(&mut sims, "bob");
    pump(&mut sims, &mut c);
    assert_eq!(names(&rb1.take()), ["notification:new"]);
    assert!(sims[0].shards.iter().all(|e| !e.users.contains_key("bob")));
    // Carol is away: the next node she connects to delivers hers.
    notify(&mut sims, "carol");
    pump(&mut sims, &mut c);
    let (c0, rc0) = sims[0].connect(1, "carol", Protocol::Json);
    pump(&mut sims, &mut c);
    let got = rc0.take();
    let ids: Vec<String> = got
        .iter()
        .filter_map(|m| match &m.event {
            ServerEvent::NotificationNew(n) => Some(n.notification_id.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(ids.len(), 1, "{got:?}");
    // Read on node 0: pending on node 1 (read from Redis) shows it read.
    sims[0].send(
        c0,
        Some(5),
        ClientEvent::NotificationRead(NotificationIds {
            notification_ids: ids.clone(),
        }),
    );
    pump(&mut sims, &mut c);
    let (c1, rc1) = sims[1].connect(1, "carol", Protocol::Json);
    pump(&mut sims, &mut c);
    assert!(names(&rc1.take()).is_empty(), "nothing unread");
    sims[1].send(c1, Some(6), ClientEvent::NotificationGetPending);
    pump(&mut sims, &mut c);
    match super::ack_body(&rc1.take(), 6) {
        AckBody::Notifications(n) => {
            assert_eq!(n.notifications.len(), 1);
            assert!(n.notifications[0].read);
        }
        other => panic!("{other:?}"),
    }
    // Cleared on node 1: gone on node 0 too.
    sims[1].send(c1, Some(7), ClientEvent::NotificationClearAll);
    pump(&mut sims, &mut c);
    sims[0].send(c0, Some(8), ClientEvent::NotificationGetPending);
    pump(&mut sims, &mut c);
    match super::ack_body(&rc0.take(), 8) {
        AckBody::Notifications(n) => assert!(n.notifications.is_empty()),
        other => panic!("{other:?}"),
    }
}

fn call_events(msgs: &[ServerMessage]) -> Vec<(&'static str, Option<String>)> {
    msgs.iter()
        .filter_map(|m| match &m.event {
            ServerEvent::CallIncoming(_) => Some(("call:incoming", None)),
            ServerEvent::CallAnswered(_) => Some(("call:answered", None)),
            ServerEvent::CallEnded(e) => Some(("call:ended", e.reason.clone())),
            ServerEvent::CallRejected(_) => Some(("call:rejected", None)),
            ServerEvent::CallMissed(e) => Some(("call:missed", e.reason.clone())),
            ServerEvent::CallIceCandidate(_) => Some(("call:ice_candidate", None)),
            _ => None,
        })
        .collect()
}

#[test]
fn a_call_held_by_one_node_is_answered_and_ended_on_another() {
    let (mut sims, mut c) = nodes();
    let (a, ra) = sims[0].connect(0, "alice", Protocol::Json);
    let (_b0, rb0) = sims[0].connect(1, "bob", Protocol::Json);
    let (b1, rb1) = sims[1].connect(1, "bob", Protocol::Binary);
    pump(&mut sims, &mut c);
    sims[0].send(
        a,
        Some(1),
        ClientEvent::CallInitiate(CallInitiate {
            to_user_id: "bob".into(),
            call_type: CallType::Audio,
            sdp: None,
        }),
    );
    pump(&mut sims, &mut c);
    let call = match super::ack_body(&ra.take(), 1) {
        AckBody::Call(c) => c.call_id,
        other => panic!("{other:?}"),
    };
    assert_eq!(call_events(&rb0.take()), [("call:incoming", None)]);
    assert_eq!(call_events(&rb1.take()), [("call:incoming", None)]);
    // Node 1's device answers (the call is held by node 0).
    let id = |call: &str| CallRef {
        call_id: call.to_string(),
    };
    sims[1].send(
        b1,
        Some(2),
        ClientEvent::CallAnswer(CallAnswer {
            call_id: call.clone(),
            sdp: None,
        }),
    );
    pump(&mut sims, &mut c);
    let got = rb1.take();
    assert!(
        matches!(super::ack_body(&got, 2), AckBody::Empty(_)),
        "{got:?}"
    );
    assert!(
        call_events(&got).is_empty(),
        "the answering device: {got:?}"
    );
    assert_eq!(call_events(&ra.take()), [("call:answered", None)]);
    assert_eq!(
        call_events(&rb0.take()),
        [("call:ended", Some("answered_elsewhere".into()))]
    );
    // Its connection drops: the call ends for the caller.
    sims[1].close(b1);
    pump(&mut sims, &mut c);
    assert_eq!(
        call_events(&ra.take()),
        [("call:ended", Some("disconnected".into()))]
    );
    assert!(sims[0].shards.iter().all(|e| e.calls.is_empty()));
    // A call no node holds: not found, from node 1.
    let (b2, rb2) = sims[1].connect(0, "bob", Protocol::Json);
    pump(&mut sims, &mut c);
    sims[1].send(b2, Some(3), ClientEvent::CallEnd(id(&call)));
    pump(&mut sims, &mut c);
    let got = rb2.take();
    assert!(
        got.iter().any(|m| m.id == Some(3)
            && matches!(&m.event, ServerEvent::Error(e) if e.code == ErrorCode::NotFound)),
        "{got:?}"
    );
}

#[test]
fn members_typing_and_voice_add_up_over_nodes() {
    let (mut sims, mut c) = nodes();
    let (a, ra) = sims[0].connect(0, "alice", Protocol::Json);
    let (b, rb) = sims[1].connect(1, "bob", Protocol::Json);
    let (b2, rb2) = sims[0].connect(1, "bob", Protocol::Json);
    // A join's ack counts the connections on every node.
    let mut counts = Vec::new();
    for (n, who, rec) in [(0, a, &ra), (1, b, &rb), (0, b2, &rb2)] {
        sims[n].join(who, "general");
        pump(&mut sims, &mut c);
        match super::ack_body(&rec.take(), 1) {
            AckBody::Join(j) => counts.push(j.members),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(counts, [1, 2, 3]);
    let name = |n: u64| keys::node_name(n);
    let kept: Vec<(String, u32)> = c.redis.members["general"]
        .iter()
        .map(|(k, v)| (k.clone(), *v))
        .collect();
    assert_eq!(kept, [(name(1), 2), (name(2), 1)]);
    sims[1].send(
        b,
        Some(1),
        ClientEvent::TypingStart(ChannelRef {
            channel_id: "general".into(),
        }),
    );
    pump(&mut sims, &mut c);
    ra.take();
    let ask = |sims: &mut [Sim], c: &mut Cluster, e: ClientEvent| {
        sims[0].send(a, Some(9), e);
        pump(sims, c);
        super::ack_body(&ra.take(), 9)
    };
    let general = || ChannelRef {
        channel_id: "general".into(),
    };
    match ask(&mut sims, &mut c, ClientEvent::ChannelGetMembers(general())) {
        AckBody::Members(m) => {
            let got: Vec<(&str, u32)> = m
                .members
                .iter()
                .map(|m| (m.user_id.as_str(), m.connections))
                .collect();
            assert_eq!(got, [("alice", 1), ("bob", 2)]);
        }
        other => panic!("{other:?}"),
    }
    match ask(&mut sims, &mut c, ClientEvent::TypingGetActive(general())) {
        AckBody::Typing(t) => assert_eq!(t.user_ids, ["bob"]),
        other => panic!("{other:?}"),
    }
    // A node that dies takes its connections out of the counts.
    node_dies(&mut sims, &mut c, 1);
    let (d, rd) = sims[0].connect(0, "dave", Protocol::Json);
    sims[0].join(d, "general");
    pump(&mut sims, &mut c);
    match super::ack_body(&rd.take(), 1) {
        AckBody::Join(j) => assert_eq!(j.members, 3),
        other => panic!("{other:?}"),
    }
}
