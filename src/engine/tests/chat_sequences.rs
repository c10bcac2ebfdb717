//! Random sequences of every kind of client event against three shards,
//! with mesh messages delivered in random partial batches and the clock
//! jumping: nothing panics, every request of a connection still open
//! is answered exactly once, and once everyone has gone and every
//! window has passed, no state is left behind.

use super::*;
use proptest::prelude::*;

const USERS: usize = 4;
const CHANNELS: u8 = 3;

#[derive(Debug, Clone)]
enum Op {
    Connect {
        shard: u16,
        user: usize,
        binary: bool,
    },
    Close {
        conn: usize,
    },
    Event {
        conn: usize,
        what: What,
    },
    Step {
        shard: u16,
        n: u8,
    },
    Advance {
        ms: u32,
    },
    /// Cluster mode: one round of every bridge, taking up to `n` of
    /// its shards' messages.
    Bridge {
        n: u8,
    },
    /// Cluster mode: Redis becomes reachable, or not.
    Redis {
        up: bool,
    },
    /// Cluster mode: one node cut off from Redis, or back.
    Cut {
        node: usize,
        up: bool,
    },
    /// Cluster mode: one node dies (once per run).
    Die {
        node: usize,
    },
    /// Cluster mode: Redis is at its memory limit (it refuses writes,
    /// but answers), or no longer.
    Full {
        on: bool,
    },
    /// Every queue, the bridge's included, until nothing moves.
    Settle,
}

#[derive(Debug, Clone)]
enum What {
    Join {
        ch: u8,
        since: Option<u8>,
    },
    Leave {
        ch: u8,
    },
    Send {
        ch: u8,
        nonce: Option<u8>,
        mention: Option<usize>,
    },
    Edit {
        ch: u8,
        offset: u8,
    },
    Delete {
        ch: u8,
        offset: u8,
    },
    React {
        ch: u8,
        offset: u8,
        emoji: u8,
        add: bool,
    },
    History {
        ch: u8,
    },
    Members {
        ch: u8,
    },
    Typing {
        ch: u8,
        start: bool,
    },
    TypingActive {
        ch: u8,
    },
    Delivered {
        ch: u8,
        offset: u8,
    },
    MarkRead {
        ch: u8,
        offset: u8,
    },
    Receipts {
        ch: u8,
        offset: u8,
    },
    Dm {
        to: usize,
        nonce: Option<u8>,
    },
    Conversations,
    Presence {
        status: u8,
        custom: bool,
    },
    Subscribe {
        users: Vec<usize>,
    },
    Unsubscribe {
        users: Vec<usize>,
    },
    Bulk {
        users: Vec<usize>,
    },
    PresenceHeartbeat,
    VoiceJoin {
        ch: u8,
    },
    VoiceLeave,
    VoiceUpdate {
        muted: bool,
    },
    VoiceParticipants {
        ch: u8,
    },
    Call {
        to: usize,
    },
    Answer {
        call: usize,
    },
    Reject {
        call: usize,
    },
    End {
        call: usize,
    },
    Ice {
        call: usize,
    },
    Notifications {
        op: u8,
    },
    Resume {
        of: usize,
    },
    /// Only `u0` holds the roles; from anyone else it is refused.
    Kick {
        to: usize,
        ch: Option<u8>,
    },
    Ban {
        to: usize,
        ch: Option<u8>,
        ms: u16,
    },
}

fn what() -> impl Strategy<Value = What> {
    let ch = || 0..CHANNELS;
    let off = || 0u8..8;
    let user = || 0..USERS;
    let users = || proptest::collection::vec(0..USERS, 0..4);
    let a = prop_oneof![
        (ch(), proptest::option::of(off())).prop_map(|(ch, since)| What::Join { ch, since }),
        ch().prop_map(|ch| What::Leave { ch }),
        (
            ch(),
            proptest::option::of(0u8..3),
            proptest::option::of(user())
        )
            .prop_map(|(ch, nonce, mention)| What::Send { ch, nonce, mention }),
        (ch(), off()).prop_map(|(ch, offset)| What::Edit { ch, offset }),
        (ch(), off()).prop_map(|(ch, offset)| What::Delete { ch, offset }),
        (ch(), off(), 0u8..2, any::<bool>()).prop_map(|(ch, offset, emoji, add)| What::React {
            ch,
            offset,
            emoji,
            add
        }),
        ch().prop_map(|ch| What::History { ch }),
        ch().prop_map(|ch| What::Members { ch }),
        (ch(), any::<bool>()).prop_map(|(ch, start)| What::Typing { ch, start }),
        ch().prop_map(|ch| What::TypingActive { ch }),
        (ch(), off()).prop_map(|(ch, offset)| What::Delivered { ch, offset }),
        (ch(), off()).prop_map(|(ch, offset)| What::MarkRead { ch, offset }),
        (ch(), off()).prop_map(|(ch, offset)| What::Receipts { ch, offset }),
    ];
    let b = prop_oneof![
        (user(), proptest::option::of(0u8..3)).prop_map(|(to, nonce)| What::Dm { to, nonce }),
        Just(What::Conversations),
        (0u8..5, any::<bool>()).prop_map(|(status, custom)| What::Presence { status, custom }),
        users().prop_map(|users| What::Subscribe { users }),
        users().prop_map(|users| What::Unsubscribe { users }),
        users().prop_map(|users| What::Bulk { users }),
        Just(What::PresenceHeartbeat),
        ch().prop_map(|ch| What::VoiceJoin { ch }),
        Just(What::VoiceLeave),
        any::<bool>().prop_map(|muted| What::VoiceUpdate { muted }),
        ch().prop_map(|ch| What::VoiceParticipants { ch }),
    ];
    let c = prop_oneof![
        user().prop_map(|to| What::Call { to }),
        (0usize..6).prop_map(|call| What::Answer { call }),
        (0usize..6).prop_map(|call| What::Reject { call }),
        (0usize..6).prop_map(|call| What::End { call }),
        (0usize..6).prop_map(|call| What::Ice { call }),
        (0u8..4).prop_map(|op| What::Notifications { op }),
        (0usize..16).prop_map(|of| What::Resume { of }),
        (user(), proptest::option::of(ch())).prop_map(|(to, ch)| What::Kick { to, ch }),
        (user(), proptest::option::of(ch()), 1u16..30_000).prop_map(|(to, ch, ms)| What::Ban {
            to,
            ch,
            ms
        }),
    ];
    prop_oneof![4 => a, 3 => b, 2 => c]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (0u16..3, 0..USERS, any::<bool>())
            .prop_map(|(shard, user, binary)| Op::Connect { shard, user, binary }),
        1 => (0usize..16).prop_map(|conn| Op::Close { conn }),
        10 => ((0usize..16), what()).prop_map(|(conn, what)| Op::Event { conn, what }),
        3 => (0u16..3, 1u8..10).prop_map(|(shard, n)| Op::Step { shard, n }),
        1 => (0u32..40_000).prop_map(|ms| Op::Advance { ms }),
    ]
}

/// Fewer connections and more joins and messages than `op`, so that
/// channels get followed and events sequenced through the cluster.
fn cluster_op() -> impl Strategy<Value = Op> {
    let ch = || 0..CHANNELS;
    let busy = prop_oneof![
        3 => (ch(), proptest::option::of(0u8..8)).prop_map(|(ch, since)| What::Join { ch, since }),
        4 => (ch(), proptest::option::of(0u8..3), proptest::option::of(0..USERS))
            .prop_map(|(ch, nonce, mention)| What::Send { ch, nonce, mention }),
        6 => what(),
    ];
    prop_oneof![
        2 => (0u16..4, 0..USERS, any::<bool>())
            .prop_map(|(shard, user, binary)| Op::Connect { shard, user, binary }),
        1 => (0usize..6).prop_map(|conn| Op::Close { conn }),
        10 => ((0usize..6), busy).prop_map(|(conn, what)| Op::Event { conn, what }),
        3 => (0u16..4, 1u8..10).prop_map(|(shard, n)| Op::Step { shard, n }),
        1 => (0u32..40_000).prop_map(|ms| Op::Advance { ms }),
        3 => (1u8..20).prop_map(|n| Op::Bridge { n }),
        2 => Just(Op::Settle),
        1 => any::<bool>().prop_map(|up| Op::Redis { up }),
        1 => (0usize..2, any::<bool>()).prop_map(|(node, up)| Op::Cut { node, up }),
        1 => (0usize..2).prop_map(|node| Op::Die { node }),
        1 => any::<bool>().prop_map(|on| Op::Full { on }),
    ]
}

/// The nodes of a run: one node of three shards, or two nodes of two
/// shards each with their bridge cores over the in-memory Redis of the
/// cluster tests.
struct World {
    sims: Vec<Sim>,
    cluster: Option<super::cluster::Cluster>,
    /// A node that died: its connections are gone with it.
    dead: Option<usize>,
}

impl World {
    fn new(settings: Settings, cluster: bool) -> World {
        if !cluster {
            let sims = vec![Sim::with(3, settings)];
            return World {
                sims,
                cluster: None,
                dead: None,
            };
        }
        let (sims, c) = super::cluster::nodes_with(2, settings);
        World {
            sims,
            cluster: Some(c),
            dead: None,
        }
    }

    /// The node and shard a random shard number stands for.
    fn place(&self, shard: u16) -> (usize, u16) {
        let nodes = self.sims.len() as u16;
        let n = (shard % nodes) as usize;
        (n, (shard / nodes) % self.sims[n].shards.len() as u16)
    }

    fn alive(&self, n: usize) -> bool {
        self.dead != Some(n)
    }

    /// Every shard of every node, and the bridges, until nothing moves.
    fn pump(&mut self) {
        match &mut self.cluster {
            Some(c) => super::cluster::pump(&mut self.sims, c),
            None => self.sims[0].settle(),
        }
    }

    fn advance(&mut self, ms: u64) {
        for sim in &mut self.sims {
            sim.now += ms;
            for s in 0..sim.shards.len() {
                sim.shards[s].tick(sim.now, &mut sim.mesh);
            }
        }
        if let Some(c) = &mut self.cluster {
            c.clock += ms;
        }
    }
}

struct Client {
    node: usize,
    at: ConnRef,
    rec: Recorder,
    open: bool,
    session: String,
    sent: Vec<u64>,
    answers: Vec<u64>,
}

fn epoch(sim: &Sim, ch: &str) -> String {
    let owner = owner_of(ch, sim.shards.len() as u16) as usize;
    sim.shards[owner]
        .owned
        .get(ch)
        .map_or("0000000000000000".to_string(), |o| o.epoch.to_string())
}

fn event(sim: &Sim, what: &What, calls: &[String], clients: &[Client]) -> ClientEvent {
    use ClientEvent as E;
    let chan = |ch: u8| format!("ch-{ch}");
    let mid = |ch: u8, offset: u8| format!("{}-{offset}", epoch(sim, &chan(ch)));
    let user = |u: usize| format!("u{u}");
    let call = |i: usize| {
        calls
            .get(i)
            .cloned()
            .unwrap_or_else(|| "00000000000000ff".into())
    };
    let users = |us: &Vec<usize>| UserIds {
        user_ids: us.iter().map(|u| user(*u)).collect(),
    };
    match what.clone() {
        What::Join { ch, since } => E::ChannelJoin(ChannelJoin {
            channel_id: chan(ch),
            since: since.map(|o| Since {
                offset: o as u64,
                epoch: epoch(sim, &chan(ch)),
            }),
            token: None,
        }),
        What::Leave { ch } => E::ChannelLeave(ChannelRef {
            channel_id: chan(ch),
        }),
        What::Send { ch, nonce, mention } => E::MessageSend(MessageSend {
            nonce: nonce.map(|n| format!("n{n}")),
            mentions: mention.map(|u| vec![user(u)]).unwrap_or_default(),
            ..MessageSend::new(chan(ch), "x")
        }),
        What::Edit { ch, offset } => E::MessageEdit(MessageEdit {
            channel_id: chan(ch),
            message_id: mid(ch, offset),
            content: "y".into(),
        }),
        What::Delete { ch, offset } => E::MessageDelete(message_ref(&chan(ch), &mid(ch, offset))),
        What::React {
            ch,
            offset,
            emoji,
            add,
        } => E::MessageReact(MessageReact {
            channel_id: chan(ch),
            message_id: mid(ch, offset),
            emoji: ["👍", "🎉"][emoji as usize].into(),
            action: if add {
                ReactAction::Add
            } else {
                ReactAction::Remove
            },
        }),
        What::History { ch } => E::ChannelGetHistory(GetHistory {
            channel_id: chan(ch),
            limit: Some(3),
            before: None,
        }),
        What::Members { ch } => E::ChannelGetMembers(ChannelRef {
            channel_id: chan(ch),
        }),
        What::Typing { ch, start } => {
            let c = ChannelRef {
                channel_id: chan(ch),
            };
            if start {
                E::TypingStart(c)
            } else {
                E::TypingStop(c)
            }
        }
        What::TypingActive { ch } => E::TypingGetActive(ChannelRef {
            channel_id: chan(ch),
        }),
        What::Delivered { ch, offset } => {
            E::MessageDelivered(message_ref(&chan(ch), &mid(ch, offset)))
        }
        What::MarkRead { ch, offset } => {
            E::MessageMarkRead(message_ref(&chan(ch), &mid(ch, offset)))
        }
        What::Receipts { ch, offset } => {
            E::MessageGetReadReceipts(message_ref(&chan(ch), &mid(ch, offset)))
        }
        What::Dm { to, nonce } => E::DmSend(DmSend {
            to_user_id: user(to),
            content: "dm".into(),
            nonce: nonce.map(|n| format!("d{n}")),
        }),
        What::Conversations => E::DmGetConversations(Limit { limit: Some(5) }),
        What::Presence { status, custom } => E::PresenceUpdate(PresenceUpdate {
            status: Some(Status::ALL[status as usize]),
            custom_status: Some(custom.then(|| "busy".to_string())),
            activity: None,
            device: None,
        }),
        What::Subscribe { users: u } => E::PresenceSubscribe(users(&u)),
        What::Unsubscribe { users: u } => E::PresenceUnsubscribe(users(&u)),
        What::Bulk { users: u } => E::PresenceGetBulk(users(&u)),
        What::PresenceHeartbeat => E::PresenceHeartbeat,
        What::VoiceJoin { ch } => E::VoiceJoin(ChannelRef {
            channel_id: chan(ch),
        }),
        What::VoiceLeave => E::VoiceLeave,
        What::VoiceUpdate { muted } => E::VoiceUpdate(VoiceUpdate {
            muted: Some(muted),
            ..VoiceUpdate::default()
        }),
        What::VoiceParticipants { ch } => E::VoiceGetParticipants(ChannelRef {
            channel_id: chan(ch),
        }),
        What::Call { to } => E::CallInitiate(CallInitiate {
            to_user_id: user(to),
            call_type: CallType::Audio,
            sdp: None,
        }),
        What::Answer { call: c } => E::CallAnswer(CallAnswer {
            call_id: call(c),
            sdp: None,
        }),
        What::Reject { call: c } => E::CallReject(CallReject {
            call_id: call(c),
            reason: None,
        }),
        What::End { call: c } => E::CallEnd(CallRef { call_id: call(c) }),
        What::Ice { call: c } => E::CallIceCandidate(CallIce {
            call_id: call(c),
            candidate: Json("{}".into()),
        }),
        What::Notifications { op } => match op {
            0 => E::NotificationGetPending,
            1 => E::NotificationRead(NotificationIds {
                notification_ids: vec!["x".into()],
            }),
            2 => E::NotificationClear(NotificationRef {
                notification_id: "x".into(),
            }),
            _ => E::NotificationClearAll,
        },
        What::Resume { of } => E::SessionResume(SessionResume {
            session_id: clients
                .get(of)
                .map_or("00000000000000000000000000000000".into(), |c| {
                    c.session.clone()
                }),
            positions: vec![],
        }),
        What::Kick { to, ch } => E::ModerationKickUser(KickUser {
            user_id: user(to),
            channel_id: ch.map(chan),
            reason: None,
        }),
        What::Ban { to, ch, ms } => E::ModerationBanUser(BanUser {
            user_id: user(to),
            channel_id: ch.map(chan),
            duration_ms: Some(ms as u64),
            reason: None,
        }),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
    #[test]
    fn every_request_is_answered_once_and_nothing_is_left_behind(
        ops in proptest::collection::vec(op(), 1..150)
    ) {
        run(ops, false)?;
    }

    /// The same on two nodes of a cluster, with Redis coming and going,
    /// a node cut off and back, or dying.
    #[test]
    fn in_a_cluster_too(
        ops in proptest::collection::vec(cluster_op(), 1..150),
    ) {
        run(ops, true)?;
    }
}

/// Runs `ops`, on one node or on two nodes of a cluster.
fn run(ops: Vec<Op>, cluster: bool) -> Result<(), TestCaseError> {
    {
        let settings = Settings {
            max_channels_per_connection: 2,
            history_size: 5,
            history_ttl_ms: 20_000,
            typing_timeout_ms: 1_000,
            presence_grace_ms: 500,
            resume_window_ms: 5_000,
            call_ring_timeout_ms: 3_000,
            notification_ttl_ms: 30_000,
            max_subscriptions: 3,
            ..Settings::default()
        };
        let mut w = World::new(settings, cluster);
        let mut clients: Vec<Client> = Vec::new();
        let mut calls: Vec<String> = Vec::new();
        let mut next_id = 1u64;
        let collect = |clients: &mut Vec<Client>, calls: &mut Vec<String>| {
            for c in clients.iter_mut() {
                // Kicked or banned: the engine closed it.
                if c.rec.closed.get().is_some() {
                    c.open = false;
                }
                for m in c.rec.take() {
                    if let ServerEvent::Ack(AckBody::Call(a)) = &m.event {
                        calls.push(a.call_id.clone());
                    }
                    if let ServerEvent::CallIncoming(i) = &m.event {
                        calls.push(i.call_id.clone());
                    }
                    let answer = matches!(
                        m.event,
                        ServerEvent::Ack(_) | ServerEvent::Error(_) | ServerEvent::HeartbeatAck(_)
                    );
                    if let (true, Some(id)) = (answer, m.id) {
                        c.answers.push(id);
                    }
                }
            }
        };
        for op in ops {
            match op {
                Op::Connect {
                    shard,
                    user,
                    binary,
                } => {
                    let (node, shard) = w.place(shard);
                    if !w.alive(node) {
                        continue;
                    }
                    let p = if binary {
                        Protocol::Binary
                    } else {
                        Protocol::Json
                    };
                    let roles = if user == 0 { Roles::ADMIN } else { Roles::NONE };
                    let access = Access {
                        roles,
                        grants: None,
                        expires: 0,
                    };
                    let sim = &mut w.sims[node];
                    let (at, rec) =
                        sim.connect_with(shard, &format!("u{user}"), p, DeviceKind::Web, access);
                    // A banned user's connection is closed at once.
                    let session = sim.shards[shard as usize]
                        .conn(at.conn)
                        .map_or(String::new(), |c| c.member.session.to_string());
                    clients.push(Client {
                        node,
                        at,
                        rec,
                        open: true,
                        session,
                        sent: vec![],
                        answers: vec![],
                    });
                }
                Op::Close { conn } => {
                    let Some(c) = clients.get_mut(conn).filter(|c| c.open) else {
                        continue;
                    };
                    c.open = false;
                    let sim = &mut w.sims[c.node];
                    sim.shards[c.at.shard as usize].close(c.at.conn, sim.now, &mut sim.mesh);
                }
                Op::Event { conn, what } => {
                    if !clients.get(conn).is_some_and(|c| c.open) {
                        continue;
                    }
                    let event = event(&w.sims[clients[conn].node], &what, &calls, &clients);
                    let c = &mut clients[conn];
                    c.sent.push(next_id);
                    let msg = ClientMessage {
                        id: Some(next_id),
                        event,
                    };
                    next_id += 1;
                    let sim = &mut w.sims[c.node];
                    sim.shards[c.at.shard as usize].handle(c.at.conn, msg, sim.now, &mut sim.mesh);
                }
                Op::Step { shard, n } => {
                    let (node, shard) = w.place(shard);
                    if !w.alive(node) {
                        continue;
                    }
                    let sim = &mut w.sims[node];
                    for _ in 0..n {
                        let Some(m) = sim.mesh.0[shard as usize].pop_front() else {
                            break;
                        };
                        sim.shards[shard as usize].handle_mesh(m, sim.now, &mut sim.mesh);
                    }
                }
                Op::Advance { ms } => w.advance(ms as u64),
                Op::Bridge { n } => {
                    if let Some(c) = &mut w.cluster {
                        super::cluster::bridge_round(&mut w.sims, c, n as usize);
                    }
                }
                Op::Redis { up } => {
                    if let Some(c) = &mut w.cluster {
                        if up != c.redis.up {
                            super::cluster::set_up(&mut w.sims, c, up);
                        }
                    }
                }
                Op::Cut { node, up } => {
                    let Some(c) = &mut w.cluster else { continue };
                    if w.dead != Some(node) && up == c.redis.cut.contains(&node) {
                        super::cluster::set_node(&mut w.sims, c, node, up);
                    }
                }
                Op::Die { node } => {
                    let Some(c) = &mut w.cluster else { continue };
                    if w.dead.is_some() {
                        continue;
                    }
                    w.dead = Some(node);
                    for cl in clients.iter_mut().filter(|cl| cl.node == node) {
                        cl.open = false;
                    }
                    super::cluster::node_dies(&mut w.sims, c, node);
                }
                Op::Full { on } => {
                    if let Some(c) = &mut w.cluster {
                        c.redis.full = on;
                    }
                }
                Op::Settle => w.pump(),
            }
            collect(&mut clients, &mut calls);
        }
        // The cluster comes back whole: Redis up with room, no node cut
        // off.
        if let Some(c) = &mut w.cluster {
            c.redis.full = false;
            if !c.redis.up {
                super::cluster::set_up(&mut w.sims, c, true);
            }
            for n in 0..2 {
                if w.dead != Some(n) && c.redis.cut.contains(&n) {
                    super::cluster::set_node(&mut w.sims, c, n, true);
                }
            }
        }
        w.pump();
        // What the cluster refused is asked again within a second.
        w.advance(1_000);
        w.pump();
        collect(&mut clients, &mut calls);
        for c in clients.iter().filter(|c| c.open) {
            let mut answers = c.answers.clone();
            answers.sort();
            prop_assert_eq!(&answers, &c.sent, "every request answered exactly once");
        }
        // Everyone leaves and every window passes: nothing is left.
        for c in clients.iter_mut().filter(|c| c.open) {
            c.open = false;
            let sim = &mut w.sims[c.node];
            sim.shards[c.at.shard as usize].close(c.at.conn, sim.now, &mut sim.mesh);
        }
        w.pump();
        for _ in 0..3 {
            w.advance(100_000);
            w.pump();
        }
        for (n, sim) in w.sims.iter().enumerate() {
            if !w.alive(n) {
                continue;
            }
            for (i, s) in sim.shards.iter().enumerate() {
                prop_assert_eq!(s.connections(), 0, "node {} shard {}", n, i);
                prop_assert!(
                    s.local.is_empty(),
                    "node {} shard {} local {:?}",
                    n,
                    i,
                    s.local.keys().collect::<Vec<_>>()
                );
                prop_assert!(
                    s.owned.is_empty(),
                    "node {} shard {} owned {:?}",
                    n,
                    i,
                    s.owned.keys().collect::<Vec<_>>()
                );
                prop_assert!(
                    s.users.is_empty(),
                    "node {} shard {} users {:?}",
                    n,
                    i,
                    s.users.keys().collect::<Vec<_>>()
                );
                prop_assert!(s.calls.is_empty(), "node {} shard {} calls", n, i);
                prop_assert!(s.gathers.is_empty(), "node {} shard {} gathers", n, i);
                prop_assert!(
                    s.timers.is_empty(),
                    "node {} shard {} timers {}",
                    n,
                    i,
                    s.timers.len()
                );
                // In a cluster, bans are kept in Redis until they end.
                if w.cluster.is_none() {
                    prop_assert!(s.bans.is_empty(), "shard {} bans {}", i, s.bans.len());
                }
                prop_assert_eq!(s.stats().online_users, 0, "node {} shard {}", n, i);
                prop_assert!(
                    s.limiter.buckets.is_empty() && s.limiter.spread.is_empty(),
                    "node {} shard {} limiter",
                    n,
                    i
                );
            }
        }
        if let Some(c) = &w.cluster {
            for n in (0..2).filter(|n| w.alive(*n)) {
                prop_assert!(c.cores[n].is_idle(), "node {} bridge busy", n);
                prop_assert!(
                    c.followed(n).is_empty(),
                    "node {} follows {:?}",
                    n,
                    c.followed(n)
                );
                prop_assert!(c.users(n).is_empty(), "node {} follows {:?}", n, c.users(n));
            }
            for (user, fields) in &c.redis.presence {
                prop_assert!(
                    fields.is_empty(),
                    "presence of {} left: {:?}",
                    user,
                    fields.keys()
                );
            }
            for (channel, m) in &c.redis.members {
                prop_assert!(m.is_empty(), "members of {} left: {:?}", channel, m);
            }
        }
    }
    Ok(())
}
