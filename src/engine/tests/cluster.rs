//! Cluster mode, driven in memory: two nodes of two shards each, and a
//! stand-in for the bridges and Redis that orders each channel's events the
//! way the Redis scripts do (an offset per channel, a log, pub/sub to the
//! nodes that follow the channel), and can be taken down.

use std::collections::{HashMap, HashSet};

use super::*;
use crate::cluster::proxy::{Proxies, Remote};

#[derive(Default)]
struct Chan {
    epoch: String,
    offset: u64,
    log: Vec<ServerMessage>,
}

/// Redis and the bridges of every node.
#[derive(Default)]
struct Cluster {
    up: bool,
    channels: HashMap<String, Chan>,
    /// Per node: the channels it follows.
    followed: Vec<HashSet<Arc<str>>>,
    /// Per node: the users it follows.
    users: Vec<HashSet<Arc<str>>>,
    /// Nodes whose bridge cannot reach Redis.
    cut: HashSet<usize>,
    next_epoch: u64,
    /// Per user: each node's presence (the `cc:p:{U}` hashes).
    presence: HashMap<Arc<str>, HashMap<u64, NodePresence>>,
    /// Per user: the notifications (the `cc:n:{U}` hashes).
    notifications: HashMap<Arc<str>, Vec<Notification>>,
    /// Per node: the connections of other nodes its bridge stands in for.
    proxies: Vec<Proxies>,
    /// Per user: the conversations (the `cc:c:{U}` hashes), latest first.
    conversations: HashMap<Arc<str>, Vec<Conversation>>,
}

const SHARDS: u16 = 2;
const BRIDGE: ShardId = SHARDS + 1;

fn nodes() -> (Vec<Sim>, Cluster) {
    let mut sims = Vec::new();
    for n in 0..2u64 {
        let mut sim = Sim::new(SHARDS);
        sim.mesh.0.push(VecDeque::new()); // the bridge's queue
        for e in &mut sim.shards {
            e.set_cluster(BRIDGE, n + 1);
        }
        sims.push(sim);
    }
    let mut c = Cluster {
        followed: vec![HashSet::new(), HashSet::new()],
        users: vec![HashSet::new(), HashSet::new()],
        proxies: vec![Proxies::new(BRIDGE), Proxies::new(BRIDGE)],
        ..Default::default()
    };
    set_up(&mut sims, &mut c, true);
    (sims, c)
}

fn to_owner(sim: &mut Sim, channel: &str, msg: ClusterMsg) {
    let owner = owner_of(channel, SHARDS) as usize;
    sim.mesh.0[owner].push_back(MeshMsg::Cluster(Box::new(msg)));
}

/// Cuts one node off Redis, or joins it again.
fn set_node(sims: &mut [Sim], c: &mut Cluster, n: usize, up: bool) {
    if up {
        c.cut.remove(&n);
    } else {
        c.cut.insert(n);
    }
    c.followed[n].clear();
    for s in 0..SHARDS as usize {
        let m = if up { ClusterMsg::Up } else { ClusterMsg::Down };
        sims[n].mesh.0[s].push_back(MeshMsg::Cluster(Box::new(m)));
    }
    pump(sims, c);
}

fn set_up(sims: &mut [Sim], c: &mut Cluster, up: bool) {
    c.up = up;
    for (n, sim) in sims.iter_mut().enumerate() {
        c.followed[n].clear();
        for s in 0..SHARDS as usize {
            let m = if up { ClusterMsg::Up } else { ClusterMsg::Down };
            sim.mesh.0[s].push_back(MeshMsg::Cluster(Box::new(m)));
        }
    }
    pump(sims, c);
}

/// Runs every node and the cluster until nothing moves. `lose` drops the
/// pub/sub copies of sequenced events for node 1 while it returns true.
fn pump_losing(sims: &mut [Sim], c: &mut Cluster, lose: &mut dyn FnMut(u64) -> bool) {
    loop {
        for sim in sims.iter_mut() {
            sim.settle();
        }
        let mut moved = false;
        for n in 0..sims.len() {
            while let Some(m) = sims[n].mesh.0[BRIDGE as usize].pop_front() {
                moved = true;
                match m {
                    MeshMsg::Cluster(m) => bridge(sims, c, n, *m, lose),
                    // Frames for connections of the other node.
                    MeshMsg::ToConn { conn, frame } => pass_frame(sims, c, n, conn, frame),
                    MeshMsg::ToConns(t) => {
                        for conn in t.conns {
                            let r = c.proxies[n].get(conn).expect("a stand-in");
                            let frame = t.frames.get(r.protocol).unwrap().clone();
                            pass_frame(sims, c, n, conn, frame);
                        }
                    }
                    _ => {}
                }
            }
        }
        if !moved {
            return;
        }
    }
}

fn pump(sims: &mut [Sim], c: &mut Cluster) {
    pump_losing(sims, c, &mut |_| false);
}

fn pass_frame(sims: &mut [Sim], c: &Cluster, n: usize, conn: ConnId, frame: Bytes) {
    let r = c.proxies[n].get(conn).expect("a stand-in");
    let to = r.node as usize - 1;
    let msg = MeshMsg::ToConn {
        conn: r.conn.conn,
        frame,
    };
    sims[to].mesh.0[r.conn.shard as usize].push_back(msg);
}

fn bridge(
    sims: &mut [Sim],
    c: &mut Cluster,
    n: usize,
    m: ClusterMsg,
    lose: &mut dyn FnMut(u64) -> bool,
) {
    if !c.up || c.cut.contains(&n) {
        if let ClusterMsg::Notifications {
            asker: Some(asker), ..
        } = m
        {
            let to = asker.0.shard as usize;
            let m = ClusterMsg::NotificationsKept { asker, error: None };
            sims[n].mesh.0[to].push_back(MeshMsg::Cluster(Box::new(m)));
            return;
        }
        if let ClusterMsg::LoadConversations { user, limit, asker } = m {
            let home = home_of(&user, SHARDS) as usize;
            let m = ClusterMsg::ConversationsLoaded {
                user,
                limit,
                conversations: None,
                asker,
            };
            sims[n].mesh.0[home].push_back(MeshMsg::Cluster(Box::new(m)));
            return;
        }
        if let ClusterMsg::ChannelQuery { channel, .. } = &m {
            let owner = owner_of(channel, SHARDS) as usize;
            sims[n].mesh.0[owner].push_back(MeshMsg::Cluster(Box::new(m)));
            return;
        }
        if let ClusterMsg::LoadNotifications { user, asker } = m {
            let home = home_of(&user, SHARDS) as usize;
            let m = ClusterMsg::NotificationsLoaded {
                user,
                notifications: Vec::new(),
                asker,
            };
            sims[n].mesh.0[home].push_back(MeshMsg::Cluster(Box::new(m)));
            return;
        }
        if let ClusterMsg::LoadPresence(q) = m {
            // Answered with this node's presence only.
            let home = home_of(&q.users[0], SHARDS) as usize;
            let loaded = vec![Vec::new(); q.users.len()];
            let m = ClusterMsg::PresenceLoaded(q, loaded);
            sims[n].mesh.0[home].push_back(MeshMsg::Cluster(Box::new(m)));
            return;
        }
        if let ClusterMsg::Sequence(out) = m {
            // As the bridge does: the shards hear of it before the event
            // comes back to be sequenced.
            for s in 0..SHARDS as usize {
                let down = MeshMsg::Cluster(Box::new(ClusterMsg::Down));
                sims[n].mesh.0[s].push_back(down);
            }
            let ch = out.channel.clone();
            to_owner(&mut sims[n], &ch, ClusterMsg::Unsequenced(out));
        }
        return;
    }
    match m {
        ClusterMsg::Attach { channel } => {
            c.followed[n].insert(channel.clone());
            c.next_epoch += 1;
            let fresh = format!("e{}", c.next_epoch);
            let ch = c.channels.entry(channel.to_string()).or_default();
            if ch.epoch.is_empty() {
                ch.epoch = fresh;
            }
            let msg = ClusterMsg::Attached {
                channel: channel.clone(),
                epoch: ch.epoch.as_str().into(),
                offset: ch.offset,
                entries: ch.log.clone(),
            };
            to_owner(&mut sims[n], &channel, msg);
        }
        ClusterMsg::Detach { channel } => {
            c.followed[n].remove(&channel);
        }
        ClusterMsg::Sequence(mut out) => {
            c.next_epoch += 1;
            let fresh = format!("e{}", c.next_epoch);
            let ch = c.channels.entry(out.channel.to_string()).or_default();
            if ch.epoch.is_empty() {
                ch.epoch = fresh;
            }
            ch.offset += 1;
            let (offset, epoch) = (ch.offset, ch.epoch.clone());
            super::super::cluster::set_offset(&mut out.msg, &epoch, offset);
            ch.log.push(out.msg.clone());
            for (k, sim) in sims.iter_mut().enumerate() {
                if !c.followed[k].contains(&out.channel)
                    || (k == 1 && lose(offset))
                    || c.cut.contains(&k)
                {
                    continue;
                }
                let inc = Incoming {
                    channel: out.channel.clone(),
                    offset,
                    epoch: epoch.as_str().into(),
                    origin: n as u64 + 1,
                    except: None,
                    msg: out.msg.clone(),
                };
                to_owner(sim, &out.channel, ClusterMsg::Event(Box::new(inc)));
            }
            let ch = out.channel.clone();
            to_owner(&mut sims[n], &ch, ClusterMsg::Sequenced(out));
        }
        ClusterMsg::FollowUser { user } => {
            c.users[n].insert(user.clone());
            // Subscribed, then the others' presence read.
            let views = others(c, &user, n);
            if !views.is_empty() {
                let to = home_of(&user, SHARDS) as usize;
                let m = ClusterMsg::Presences { user, views };
                sims[n].mesh.0[to].push_back(MeshMsg::Cluster(Box::new(m)));
            }
        }
        ClusterMsg::Presence(p) => {
            let user: Arc<str> = p.view.user_id.as_str().into();
            let views = c.presence.entry(user.clone()).or_default();
            if p.view.status == Status::Offline && !p.connected {
                views.remove(&p.node);
            } else {
                views.insert(p.node, (*p).clone());
            }
            for (k, sim) in sims.iter_mut().enumerate() {
                if k == n || !c.users[k].contains(&user) {
                    continue;
                }
                let to = home_of(&user, SHARDS) as usize;
                let m = ClusterMsg::Presences {
                    user: user.clone(),
                    views: vec![(*p).clone()],
                };
                sim.mesh.0[to].push_back(MeshMsg::Cluster(Box::new(m)));
            }
        }
        ClusterMsg::ChannelQuery {
            channel,
            mut parts,
            then,
        } => {
            let owner = owner_of(&channel, SHARDS) as usize;
            let kind = parts[0].empty();
            for (k, sim) in sims.iter().enumerate() {
                if k != n && c.followed[k].contains(&channel) {
                    parts.push(sim.shards[owner].local_part(&channel, kind.clone()));
                }
            }
            let m = ClusterMsg::ChannelQuery {
                channel,
                parts,
                then,
            };
            sims[n].mesh.0[owner].push_back(MeshMsg::Cluster(Box::new(m)));
        }
        ClusterMsg::Conversation {
            user,
            peer,
            msg,
            incoming,
        } => {
            let convs = c.conversations.entry(user).or_default();
            let unread = convs
                .iter()
                .position(|x| x.user_id == *peer)
                .map_or(0, |i| convs.remove(i).unread);
            convs.insert(
                0,
                Conversation {
                    user_id: peer.to_string(),
                    last_message: *msg,
                    unread: if incoming { unread + 1 } else { 0 },
                },
            );
        }
        ClusterMsg::LoadConversations { user, limit, asker } => {
            let home = home_of(&user, SHARDS) as usize;
            let mut conversations = c.conversations.get(&user).cloned().unwrap_or_default();
            conversations.truncate(limit);
            let m = ClusterMsg::ConversationsLoaded {
                user,
                limit,
                conversations: Some(conversations),
                asker,
            };
            sims[n].mesh.0[home].push_back(MeshMsg::Cluster(Box::new(m)));
        }
        ClusterMsg::CallReach(op, _) => {
            let CallCmd::Create { callee, .. } = &op.op else {
                unreachable!("only new calls are checked")
            };
            let online = others(c, callee, n)
                .iter()
                .any(|p| p.connected || p.view.status != Status::Offline);
            let owner = (op.call >> 48) as usize;
            let m = ClusterMsg::CallReach(op, Some(online));
            sims[n].mesh.0[owner].push_back(MeshMsg::Cluster(Box::new(m)));
        }
        ClusterMsg::CallTo { node, mut op } => {
            let k = node as usize - 1;
            op.from = op.from.map(|(conn, protocol)| {
                let r = Remote {
                    node: n as u64 + 1,
                    conn,
                    protocol,
                };
                (c.proxies[k].stand_in(r), protocol)
            });
            let holder = (op.call >> 48) as usize;
            sims[k].mesh.0[holder].push_back(MeshMsg::CallOp(op));
        }
        ClusterMsg::LoadNotifications { user, asker } => {
            let home = home_of(&user, SHARDS) as usize;
            let notifications = c.notifications.get(&user).cloned().unwrap_or_default();
            let m = ClusterMsg::NotificationsLoaded {
                user,
                notifications,
                asker,
            };
            sims[n].mesh.0[home].push_back(MeshMsg::Cluster(Box::new(m)));
        }
        ClusterMsg::Notifications {
            user,
            change,
            keep,
            asker,
        } => {
            if let Some(asker) = asker {
                let to = asker.0.shard as usize;
                let m = ClusterMsg::NotificationsKept { asker, error: None };
                sims[n].mesh.0[to].push_back(MeshMsg::Cluster(Box::new(m)));
            }
            let kept = c.notifications.entry(user.clone()).or_default();
            match &change {
                NotificationChange::New(x) => kept.push(x.clone()),
                NotificationChange::Read(_) => {
                    for k in kept.iter_mut() {
                        if let Some(r) =
                            keep.iter().find(|r| r.notification_id == k.notification_id)
                        {
                            *k = r.clone();
                        }
                    }
                }
                NotificationChange::Clear(id) => kept.retain(|k| k.notification_id != *id),
                NotificationChange::ClearAll => kept.clear(),
            }
            for (k, sim) in sims.iter_mut().enumerate() {
                if k == n || !c.users[k].contains(&user) {
                    continue;
                }
                let to = home_of(&user, SHARDS) as usize;
                let m = ClusterMsg::Notifications {
                    user: user.clone(),
                    change: change.clone(),
                    keep: Vec::new(),
                    asker: None,
                };
                sim.mesh.0[to].push_back(MeshMsg::Cluster(Box::new(m)));
            }
        }
        ClusterMsg::LoadPresence(q) => {
            let loaded = q.users.iter().map(|u| others(c, u, n)).collect();
            let home = home_of(&q.users[0], SHARDS) as usize;
            let m = ClusterMsg::PresenceLoaded(q, loaded);
            sims[n].mesh.0[home].push_back(MeshMsg::Cluster(Box::new(m)));
        }
        ClusterMsg::UnfollowUser { user } => {
            c.users[n].remove(&user);
        }
        ClusterMsg::ToUser {
            user, msg, except, ..
        } => {
            let skip = except.and_then(|e| c.proxies[n].get(e.conn));
            for (k, sim) in sims.iter_mut().enumerate() {
                if k == n || !c.users[k].contains(&user) {
                    continue;
                }
                let to = home_of(&user, SHARDS) as usize;
                let m = ClusterMsg::ToUser {
                    user: user.clone(),
                    msg: msg.clone(),
                    except: skip.filter(|r| r.node == k as u64 + 1).map(|r| r.conn),
                    origin: n as u64 + 1,
                };
                sim.mesh.0[to].push_back(MeshMsg::Cluster(Box::new(m)));
            }
        }
        ClusterMsg::Moderate(m) => {
            for (k, sim) in sims.iter_mut().enumerate() {
                let mut m = (*m).clone();
                if k != n {
                    m.from = None;
                    m.ack = None;
                }
                let to = sim.shards[0].in_charge_of(&m) as usize;
                sim.mesh.0[to].push_back(MeshMsg::Moderate(Arc::new(m)));
            }
        }
        ClusterMsg::Relay(out) => {
            for (k, sim) in sims.iter_mut().enumerate() {
                if !c.followed[k].contains(&out.channel) {
                    continue;
                }
                let inc = Incoming {
                    channel: out.channel.clone(),
                    offset: 0,
                    epoch: "".into(),
                    origin: n as u64 + 1,
                    except: out.except.clone(),
                    msg: out.msg.clone(),
                };
                to_owner(sim, &out.channel, ClusterMsg::Event(Box::new(inc)));
            }
        }
        _ => {}
    }
}

/// Other nodes' presence of a user, as Redis holds it.
fn others(c: &Cluster, user: &str, n: usize) -> Vec<NodePresence> {
    c.presence.get(user).map_or(Vec::new(), |v| {
        v.values()
            .filter(|p| p.node != n as u64 + 1)
            .cloned()
            .collect()
    })
}

/// Node `n` dies: Redis forgets its presence and the others hear of it.
fn node_dies(sims: &mut [Sim], c: &mut Cluster, n: usize) {
    c.cut.insert(n);
    for views in c.presence.values_mut() {
        views.remove(&(n as u64 + 1));
    }
    for (k, sim) in sims.iter_mut().enumerate() {
        if k != n {
            for s in 0..SHARDS as usize {
                let m = ClusterMsg::NodesGone(vec![n as u64 + 1]);
                sim.mesh.0[s].push_back(MeshMsg::Cluster(Box::new(m)));
            }
        }
    }
    pump(sims, c);
}

fn contents(msgs: &[ServerMessage]) -> Vec<(u64, String)> {
    msgs.iter()
        .filter_map(|m| match &m.event {
            ServerEvent::MessageNew(n) => Some((n.offset, n.content.clone())),
            _ => None,
        })
        .collect()
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
    assert!(names(&ra.take()).contains(&"channel:member_joined"));
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
    let epoch = c.channels["general"].epoch.clone();
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
    let mut lose = |offset: u64| offset == 2 || offset == 3;
    for i in 1..=4 {
        sims[0].publish(a, "general", &format!("m{i}"));
        pump_losing(&mut sims, &mut c, &mut lose);
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
    // A publish in flight when Redis goes away is sequenced by its owner.
    sims[0].publish(a, "general", "in flight");
    c.up = false;
    pump(&mut sims, &mut c);
    set_up(&mut sims, &mut c, false);
    publish(&mut sims, &mut c, 0, a, "alone");
    let here = contents(&ra2.take());
    assert_eq!(
        here.iter().map(|m| m.1.as_str()).collect::<Vec<_>>(),
        ["together", "in flight", "alone"]
    );
    let acks = ra.take();
    assert!(acks.iter().any(|m| matches!(&m.event, ServerEvent::Ack(_))));
    assert!(rb.take().is_empty(), "node 1 hears nothing while apart");
    // A join while apart is answered at once, under the node's own epoch.
    let (d, rd) = sims[0].connect(0, "dave", Protocol::Json);
    sims[0].join(d, "general");
    pump(&mut sims, &mut c);
    let AckBody::Join(j) = ack_body(&rd.take(), 1) else {
        panic!("no join ack");
    };
    assert_ne!(*j.epoch, *c.channels["general"].epoch);
    // Back together: both nodes follow the channel again.
    set_up(&mut sims, &mut c, true);
    publish(&mut sims, &mut c, 1, b, "again");
    assert_eq!(contents(&ra2.take()).last().unwrap().1, "again");
    assert_eq!(contents(&rb.take()).last().unwrap().1, "again");
}

#[test]
fn a_node_without_members_stops_following_a_channel() {
    let (mut sims, mut c) = nodes();
    let (a, _ra) = sims[0].connect(0, "alice", Protocol::Json);
    sims[0].join(a, "general");
    pump(&mut sims, &mut c);
    assert!(c.followed[0].contains("general"));
    sims[0].send(
        a,
        Some(3),
        ClientEvent::ChannelLeave(ChannelRef {
            channel_id: "general".into(),
        }),
    );
    pump(&mut sims, &mut c);
    assert!(!c.followed[0].contains("general"));
    // The history stays in the cluster for whoever comes next.
    assert_eq!(c.channels["general"].offset, 0);
}

#[test]
fn kicks_and_bans_reach_every_node_and_wait_for_the_cluster() {
    let (mut sims, mut c) = nodes();
    let admin = crate::access::Access {
        roles: crate::access::Roles::ADMIN,
        grants: None,
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
    let m = Moderation {
        kind: ModKind::Ban { until: None },
        user: "troll".into(),
        channel: None,
        reason: None,
        by: "root".into(),
        at: 1,
        from: None,
        ack: None,
    };
    for sim in sims.iter_mut() {
        for e in sim.shards.iter_mut() {
            e.handle_mesh(
                MeshMsg::Cluster(Box::new(ClusterMsg::Bans(vec![m.clone()]))),
                sim.now,
                &mut sim.mesh,
            );
        }
    }
    set_up(&mut sims, &mut c, true);
    assert!(sims[1].shards[0].server_ban("troll", sims[1].now).is_some());
    assert_eq!(sims[1].shards[0].ban_count(), 1);
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
fn direct_messages_reach_a_users_connections_on_every_node() {
    let (mut sims, mut c) = nodes();
    let (a, _ra) = sims[0].connect(0, "alice", Protocol::Json);
    let (_a2, ra2) = sims[1].connect(0, "alice", Protocol::Json);
    let (_b, rb) = sims[1].connect(1, "bob", Protocol::Json);
    pump(&mut sims, &mut c);
    assert!(c.users[0].contains("alice") && c.users[1].contains("alice"));
    assert!(c.users[1].contains("bob") && !c.users[0].contains("bob"));
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
    assert!(c.users[0].contains("dana"), "a watched user is followed");
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
    assert!(c.presence.get("dana").is_none_or(|v| v.is_empty()));
    // The watcher leaves: nothing is followed any more.
    sims[0].close(w);
    pump(&mut sims, &mut c);
    sims[0].advance(60_000);
    pump(&mut sims, &mut c);
    assert!(c.users[0].is_empty(), "{:?}", c.users[0]);
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
    let (b, _) = sims[1].connect(1, "bob", Protocol::Json);
    let (b2, _) = sims[0].connect(1, "bob", Protocol::Json);
    for (n, who) in [(0, a), (1, b), (0, b2)] {
        sims[n].join(who, "general");
    }
    pump(&mut sims, &mut c);
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
}
