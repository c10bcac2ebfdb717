//! The engine of several shards driven in memory: a mesh of queues, a
//! recording outbound queue per connection, and a clock that is a number.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;

use super::*;
use crate::protocol::json;

#[derive(Clone, Default)]
struct Recorder {
    frames: Rc<RefCell<Vec<Bytes>>>,
    refuse: Rc<std::cell::Cell<bool>>,
}

impl Outbound for Recorder {
    fn push(&self, frame: &Bytes) -> bool {
        if self.refuse.get() {
            return false;
        }
        self.frames.borrow_mut().push(frame.clone());
        true
    }
}

impl Recorder {
    fn take(&self) -> Vec<ServerMessage> {
        self.frames
            .borrow_mut()
            .drain(..)
            .map(|f| {
                let h = crate::ws::frame::parse_header(&f).unwrap().unwrap();
                let payload = &f[h.header_len..];
                if h.opcode == crate::ws::OpCode::Text {
                    json::decode_server(payload).unwrap()
                } else {
                    crate::protocol::binary::decode_server(payload).unwrap()
                }
            })
            .collect()
    }
}

#[derive(Default)]
struct Queues(Vec<VecDeque<MeshMsg>>);

impl MeshTx for Queues {
    fn send(&mut self, to: ShardId, msg: MeshMsg) {
        self.0[to as usize].push_back(msg);
    }
}

struct Sim {
    shards: Vec<Engine<Recorder>>,
    mesh: Queues,
    now: u64,
}

impl Sim {
    fn new(n: u16) -> Sim {
        Sim {
            shards: (0..n)
                .map(|i| {
                    Engine::new(
                        i,
                        n,
                        Limits::default(),
                        Arc::new(ShardMetrics::default()),
                        7 + i as u64,
                    )
                })
                .collect(),
            mesh: Queues((0..n).map(|_| VecDeque::new()).collect()),
            now: 1_000,
        }
    }

    fn connect(&mut self, shard: u16, user: &str, protocol: Protocol) -> (ConnRef, Recorder) {
        let rec = Recorder::default();
        let member = Member {
            user: user.into(),
            session: SessionId(
                shard as u64,
                user.bytes()
                    .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64)),
            ),
            protocol,
        };
        let conn = self.shards[shard as usize].open(rec.clone(), member);
        (ConnRef { shard, conn }, rec)
    }

    /// Delivers mesh messages until every queue is empty.
    fn settle(&mut self) {
        loop {
            let mut moved = false;
            for s in 0..self.shards.len() {
                while let Some(m) = self.mesh.0[s].pop_front() {
                    self.shards[s].handle_mesh(m, self.now, &mut self.mesh);
                    moved = true;
                }
            }
            if !moved {
                return;
            }
        }
    }

    fn send(&mut self, c: ConnRef, id: Option<u64>, event: ClientEvent) {
        self.shards[c.shard as usize].handle(
            c.conn,
            ClientMessage { id, event },
            self.now,
            &mut self.mesh,
        );
        self.settle();
    }

    fn join(&mut self, c: ConnRef, channel: &str) {
        self.send(
            c,
            Some(1),
            ClientEvent::ChannelJoin(ChannelJoin {
                channel_id: channel.into(),
                since: None,
            }),
        );
    }

    fn publish(&mut self, c: ConnRef, channel: &str, content: &str) {
        let m = MessageSend {
            channel_id: channel.into(),
            content: content.into(),
            reply_to: None,
            thread_id: None,
            mentions: Vec::new(),
            nonce: None,
        };
        self.send(c, Some(2), ClientEvent::MessageSend(m));
    }

    fn close(&mut self, c: ConnRef) {
        self.shards[c.shard as usize].close(c.conn, self.now, &mut self.mesh);
        self.settle();
    }
}

fn contents(msgs: &[ServerMessage]) -> Vec<(u64, String)> {
    msgs.iter()
        .filter_map(|m| match &m.event {
            ServerEvent::MessageNew(n) => Some((n.offset, n.content.clone())),
            _ => None,
        })
        .collect()
}

/// A channel whose owner is `owner` among `n` shards.
fn channel_owned_by(owner: u16, n: u16) -> String {
    (0..)
        .map(|i| format!("room-{i}"))
        .find(|c| owner_of(c, n) == owner)
        .unwrap()
}

#[test]
fn members_on_every_shard_see_one_order() {
    let mut sim = Sim::new(3);
    let ch = channel_owned_by(2, 3);
    let (a, ra) = sim.connect(0, "alice", Protocol::Json);
    let (b, rb) = sim.connect(1, "bob", Protocol::Binary);
    let (c, rc) = sim.connect(2, "carol", Protocol::Json);
    for x in [a, b, c] {
        sim.join(x, &ch);
    }
    ra.take();
    rb.take();
    rc.take();
    // Publishers on three shards interleave; every member sees one order.
    for i in 0..30 {
        let from = [a, b, c][i % 3];
        sim.publish(from, &ch, &format!("m{i}"));
    }
    let (ma, mb, mc) = (ra.take(), rb.take(), rc.take());
    let want: Vec<(u64, String)> = (0..30).map(|i| (i as u64 + 1, format!("m{i}"))).collect();
    assert_eq!(contents(&ma), want);
    assert_eq!(contents(&mb), want);
    assert_eq!(contents(&mc), want);
    // Each publisher got an ack with the offset that was assigned to it.
    let acks: Vec<u64> = ma
        .iter()
        .filter_map(|m| match &m.event {
            ServerEvent::Ack(AckBody::Send(s)) => Some(s.offset),
            _ => None,
        })
        .collect();
    assert_eq!(
        acks,
        (1..=30).step_by(3).map(|o| o as u64).collect::<Vec<_>>()
    );
}

#[test]
fn frames_are_encoded_once_per_protocol_and_shared() {
    let mut sim = Sim::new(2);
    let ch = channel_owned_by(0, 2);
    let recs: Vec<(ConnRef, Recorder)> = (0..6)
        .map(|i| sim.connect(i % 2, &format!("u{i}"), Protocol::Json))
        .collect();
    for (c, _) in &recs {
        sim.join(*c, &ch);
    }
    for (_, r) in &recs {
        r.frames.borrow_mut().clear();
    }
    sim.publish(recs[0].0, &ch, "hello");
    let mut ptrs: Vec<*const u8> = recs
        .iter()
        .map(|(_, r)| {
            let f = r.frames.borrow();
            f.iter()
                .find(|b| b.windows(11).any(|w| w == b"message:new"))
                .unwrap()
                .as_ptr()
        })
        .collect();
    ptrs.dedup();
    assert_eq!(ptrs.len(), 1, "every recipient holds the same buffer");
    let delivered: u64 = sim.shards.iter().map(|s| s.metrics.deliveries.get()).sum();
    assert!(delivered >= 6);
}

#[test]
fn join_and_leave_are_announced_to_others() {
    let mut sim = Sim::new(2);
    let ch = channel_owned_by(1, 2);
    let (a, ra) = sim.connect(0, "alice", Protocol::Json);
    let (b, rb) = sim.connect(1, "bob", Protocol::Json);
    sim.join(a, &ch);
    let first = ra.take();
    assert!(
        matches!(&first[..], [ServerMessage { id: Some(1), event: ServerEvent::Ack(AckBody::Join(j)) }] if j.members == 1 && j.offset == 0)
    );
    sim.join(b, &ch);
    let to_a = ra.take();
    assert!(
        matches!(&to_a[..], [ServerMessage { event: ServerEvent::MemberJoined(m), .. }] if m.user_id == "bob")
    );
    let to_b = rb.take();
    assert!(
        matches!(&to_b[..], [ServerMessage { event: ServerEvent::Ack(AckBody::Join(j)), .. }] if j.members == 2)
    );
    sim.send(
        b,
        Some(5),
        ClientEvent::ChannelLeave(ChannelRef {
            channel_id: ch.clone(),
        }),
    );
    assert!(matches!(
        &rb.take()[..],
        [ServerMessage {
            id: Some(5),
            event: ServerEvent::Ack(AckBody::Empty(_))
        }]
    ));
    assert!(
        matches!(&ra.take()[..], [ServerMessage { event: ServerEvent::MemberLeft(m), .. }] if m.user_id == "bob")
    );
    // After leaving, bob no longer receives the channel's messages.
    sim.publish(a, &ch, "after");
    assert!(contents(&rb.take()).is_empty());
    assert_eq!(contents(&ra.take()), vec![(1, "after".into())]);
}

#[test]
fn close_leaves_every_channel_and_the_owner_forgets_empty_channels() {
    let mut sim = Sim::new(2);
    let ch = channel_owned_by(0, 2);
    let (a, ra) = sim.connect(1, "alice", Protocol::Json);
    let (b, _rb) = sim.connect(1, "bob", Protocol::Json);
    sim.join(a, &ch);
    sim.join(b, &ch);
    ra.take();
    sim.close(b);
    assert!(matches!(
        &ra.take()[..],
        [ServerMessage {
            event: ServerEvent::MemberLeft(_),
            ..
        }]
    ));
    sim.close(a);
    assert!(sim.shards[0].owned.is_empty());
    assert!(sim.shards[1].local.is_empty());
    assert_eq!(sim.shards[1].connections(), 0);
}

#[test]
fn close_while_join_in_flight_is_undone() {
    let mut sim = Sim::new(2);
    let ch = channel_owned_by(0, 2);
    let (a, _ra) = sim.connect(1, "alice", Protocol::Json);
    sim.shards[1].handle(
        a.conn,
        ClientMessage {
            id: None,
            event: ClientEvent::ChannelJoin(ChannelJoin {
                channel_id: ch.clone(),
                since: None,
            }),
        },
        0,
        &mut sim.mesh,
    );
    sim.shards[1].close(a.conn, 0, &mut sim.mesh);
    sim.settle();
    assert!(
        sim.shards[0].owned.is_empty(),
        "the owner's count went back to zero"
    );
    assert!(sim.shards[1].local.is_empty());
}

#[test]
fn typed_errors() {
    let mut sim = Sim::new(1);
    let (a, ra) = sim.connect(0, "alice", Protocol::Json);
    let code = |msgs: Vec<ServerMessage>| match &msgs[..] {
        [ServerMessage {
            event: ServerEvent::Error(e),
            id,
        }] => (e.code, *id),
        other => panic!("{other:?}"),
    };
    sim.publish(a, "nowhere", "x");
    assert_eq!(code(ra.take()), (ErrorCode::Forbidden, Some(2)));
    sim.send(
        a,
        Some(3),
        ClientEvent::ChannelLeave(ChannelRef {
            channel_id: "nowhere".into(),
        }),
    );
    assert_eq!(code(ra.take()), (ErrorCode::NotFound, Some(3)));
    sim.join(a, "bad channel");
    assert_eq!(code(ra.take()), (ErrorCode::BadRequest, Some(1)));
    sim.send(a, Some(4), ClientEvent::Unsupported("dm:send".into()));
    assert_eq!(code(ra.take()), (ErrorCode::Unsupported, Some(4)));
    sim.join(a, "ok");
    ra.take();
    sim.join(a, "ok");
    assert_eq!(code(ra.take()), (ErrorCode::BadRequest, Some(1)));
    sim.publish(a, "ok", &"x".repeat(4001));
    assert_eq!(code(ra.take()), (ErrorCode::TooLarge, Some(2)));
    sim.send(a, Some(9), ClientEvent::Heartbeat);
    assert!(
        matches!(&ra.take()[..], [ServerMessage { id: Some(9), event: ServerEvent::HeartbeatAck(h) }] if h.timestamp == sim.now)
    );
}

#[test]
fn refused_frames_are_counted_and_do_not_stop_others() {
    let mut sim = Sim::new(1);
    let (a, ra) = sim.connect(0, "a", Protocol::Json);
    let (b, rb) = sim.connect(0, "b", Protocol::Json);
    sim.join(a, "c");
    sim.join(b, "c");
    ra.take();
    rb.take();
    rb.refuse.set(true);
    sim.publish(a, "c", "hi");
    assert_eq!(contents(&ra.take()), vec![(1, "hi".into())]);
    assert!(sim.shards[0].metrics.queue_drops.get() >= 1);
}

#[test]
fn leave_and_rejoin_while_the_first_join_is_in_flight() {
    let mut sim = Sim::new(2);
    let ch = channel_owned_by(0, 2);
    let (a, ra) = sim.connect(1, "alice", Protocol::Json);
    let (b, rb) = sim.connect(0, "bob", Protocol::Json);
    sim.join(b, &ch);
    rb.take();
    let join = |id| ClientMessage {
        id: Some(id),
        event: ClientEvent::ChannelJoin(ChannelJoin {
            channel_id: ch.clone(),
            since: None,
        }),
    };
    let leave = ClientMessage {
        id: Some(2),
        event: ClientEvent::ChannelLeave(ChannelRef {
            channel_id: ch.clone(),
        }),
    };
    // Three events before the owner answers anything.
    for m in [join(1), leave, join(3)] {
        sim.shards[1].handle(a.conn, m, 0, &mut sim.mesh);
    }
    sim.settle();
    let ids: Vec<Option<u64>> = ra
        .take()
        .iter()
        .filter(|m| matches!(m.event, ServerEvent::Ack(_)))
        .map(|m| m.id)
        .collect();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        vec![Some(1), Some(2), Some(3)],
        "every event answered once"
    );
    // Alice is a member exactly once: she gets each message once.
    sim.publish(b, &ch, "once");
    assert_eq!(contents(&ra.take()), vec![(1, "once".into())]);
    assert_eq!(sim.shards[0].owned[&*ch].total(), 2);
}

mod sequences {
    //! Random operation sequences against three shards, with mesh messages
    //! delivered in random partial batches; then invariants.

    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Connect {
            shard: u16,
            binary: bool,
        },
        Join {
            conn: usize,
            ch: u8,
        },
        Leave {
            conn: usize,
            ch: u8,
        },
        Publish {
            conn: usize,
            ch: u8,
        },
        Close {
            conn: usize,
        },
        /// Handle up to `n` queued mesh messages of one shard.
        Step {
            shard: u16,
            n: u8,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u16..3, any::<bool>()).prop_map(|(shard, binary)| Op::Connect { shard, binary }),
            (0usize..12, 0u8..3).prop_map(|(conn, ch)| Op::Join { conn, ch }),
            (0usize..12, 0u8..3).prop_map(|(conn, ch)| Op::Leave { conn, ch }),
            (0usize..12, 0u8..3).prop_map(|(conn, ch)| Op::Publish { conn, ch }),
            (0usize..12, 0u8..3).prop_map(|(conn, ch)| Op::Publish { conn, ch }),
            (0usize..12).prop_map(|conn| Op::Close { conn }),
            (0u16..3, 1u8..8).prop_map(|(shard, n)| Op::Step { shard, n }),
            (0u16..3, 1u8..8).prop_map(|(shard, n)| Op::Step { shard, n }),
        ]
    }

    struct Client {
        at: ConnRef,
        rec: Recorder,
        open: bool,
        sent_ids: Vec<u64>,
        got: Vec<ServerMessage>,
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
        #[test]
        fn invariants_hold(ops in proptest::collection::vec(op(), 1..120)) {
            let mut sim = Sim::new(3);
            let mut clients: Vec<Client> = Vec::new();
            let mut next_id = 1u64;
            let channel = |c: u8| format!("ch-{c}");
            for op in ops {
                match op {
                    Op::Connect { shard, binary } => {
                        let p = if binary { Protocol::Binary } else { Protocol::Json };
                        let (at, rec) = sim.connect(shard, &format!("u{}", clients.len()), p);
                        clients.push(Client { at, rec, open: true, sent_ids: vec![], got: vec![] });
                    }
                    Op::Join { conn, ch } | Op::Leave { conn, ch } | Op::Publish { conn, ch } => {
                        let Some(c) = clients.get_mut(conn).filter(|c| c.open) else { continue };
                        let channel_id = channel(ch);
                        let event = match op {
                            Op::Join { .. } => ClientEvent::ChannelJoin(ChannelJoin { channel_id, since: None }),
                            Op::Leave { .. } => ClientEvent::ChannelLeave(ChannelRef { channel_id }),
                            _ => ClientEvent::MessageSend(MessageSend { channel_id, content: format!("m{next_id}"), reply_to: None, thread_id: None, mentions: Vec::new(), nonce: None }),
                        };
                        c.sent_ids.push(next_id);
                        let msg = ClientMessage { id: Some(next_id), event };
                        next_id += 1;
                        sim.shards[c.at.shard as usize].handle(c.at.conn, msg, 0, &mut sim.mesh);
                    }
                    Op::Close { conn } => {
                        let Some(c) = clients.get_mut(conn).filter(|c| c.open) else { continue };
                        c.open = false;
                        sim.shards[c.at.shard as usize].close(c.at.conn, 0, &mut sim.mesh);
                    }
                    Op::Step { shard, n } => {
                        for _ in 0..n {
                            let Some(m) = sim.mesh.0[shard as usize].pop_front() else { break };
                            sim.shards[shard as usize].handle_mesh(m, 0, &mut sim.mesh);
                        }
                    }
                }
                for c in clients.iter_mut() {
                    c.got.extend(c.rec.take());
                }
            }
            sim.settle();
            for c in clients.iter_mut() {
                c.got.extend(c.rec.take());
            }

            // Every event of a connection still open got exactly one answer.
            for c in clients.iter().filter(|c| c.open) {
                let mut answered: Vec<u64> = c.got.iter().filter(|m| matches!(m.event, ServerEvent::Ack(_) | ServerEvent::Error(_))).filter_map(|m| m.id).collect();
                answered.sort();
                prop_assert_eq!(&answered, &c.sent_ids);
            }
            // Each connection sees each channel's messages once, in offset order.
            for c in &clients {
                for ch in 0..3u8 {
                    let offsets: Vec<u64> = c.got.iter().filter_map(|m| match &m.event {
                        ServerEvent::MessageNew(n) if n.channel_id == channel(ch) => Some(n.offset),
                        _ => None,
                    }).collect();
                    prop_assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{:?}", offsets);
                }
            }
            // The owners' member counts match the shards' member lists.
            for ch in 0..3u8 {
                let name = channel(ch);
                let owner = owner_of(&name, 3) as usize;
                let counted: Vec<[u32; 2]> = sim.shards[owner].owned.get(&*name).map(|o| o.per_shard.clone()).unwrap_or_else(|| vec![[0, 0]; 3]);
                for (s, engine) in sim.shards.iter().enumerate() {
                    let mut actual = [0u32; 2];
                    for m in engine.local.get(&*name).into_iter().flatten() {
                        actual[proto_index(m.protocol)] += 1;
                    }
                    prop_assert_eq!(counted[s], actual, "channel {} shard {}", name, s);
                }
            }
            // And a message published now reaches every member exactly once.
            for ch in 0..3u8 {
                let name = channel(ch);
                let members: Vec<usize> = clients.iter().enumerate().filter(|(_, c)| {
                    c.open && sim.shards[c.at.shard as usize].local.get(&*name).is_some_and(|l| l.iter().any(|m| m.conn == c.at.conn))
                }).map(|(i, _)| i).collect();
                let Some(&first) = members.first() else { continue };
                sim.publish(clients[first].at, &name, "final");
                for (i, c) in clients.iter().enumerate() {
                    let finals = contents(&c.rec.take()).into_iter().filter(|(_, t)| t == "final").count();
                    prop_assert_eq!(finals, usize::from(members.contains(&i)), "client {} channel {}", i, name);
                }
            }
        }
    }
}
