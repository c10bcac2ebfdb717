//! Random operation sequences against three shards, with mesh messages
//! delivered in random partial batches; then invariants.

use super::*;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Connect {
        shard: u16,
        /// Which of [`Protocol::ALL`].
        protocol: u8,
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
        (0u16..3, 0u8..4).prop_map(|(shard, protocol)| Op::Connect { shard, protocol }),
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
                Op::Connect { shard, protocol } => {
                    let p = Protocol::ALL[protocol as usize];
                    let (at, rec) = sim.connect(shard, &format!("u{}", clients.len()), p);
                    clients.push(Client { at, rec, open: true, sent_ids: vec![], got: vec![] });
                }
                Op::Join { conn, ch } | Op::Leave { conn, ch } | Op::Publish { conn, ch } => {
                    let Some(c) = clients.get_mut(conn).filter(|c| c.open) else { continue };
                    let channel_id = channel(ch);
                    let event = match op {
                        Op::Join { .. } => ClientEvent::ChannelJoin(ChannelJoin::new(channel_id)),
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
            let counted: Vec<[u32; Protocol::COUNT]> = sim.shards[owner].owned.get(&*name).map(|o| o.per_shard.clone()).unwrap_or_else(|| vec![[0; Protocol::COUNT]; 3]);
            for (s, engine) in sim.shards.iter().enumerate() {
                let mut actual = [0u32; Protocol::COUNT];
                for m in engine.local.get(&*name).into_iter().flat_map(|l| l.members.iter()) {
                    actual[m.protocol.index()] += 1;
                }
                prop_assert_eq!(counted[s], actual, "channel {} shard {}", name, s);
            }
        }
        // And a message published now reaches every member exactly once.
        for ch in 0..3u8 {
            let name = channel(ch);
            let members: Vec<usize> = clients.iter().enumerate().filter(|(_, c)| {
                c.open && sim.shards[c.at.shard as usize].local.get(&*name).is_some_and(|l| l.members.iter().any(|m| m.conn == c.at.conn))
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
