//! Server-side subscriptions: the backend joins every connection of a
//! user to a channel, on every shard, without the token's grants (bans
//! still apply), and takes them out again; each connection is told with
//! `channel:joined` / `channel:left`, and the members see the usual
//! member events.

use super::*;

const N: u16 = 3;

fn api(sim: &mut Sim, user: &str, channel: &str, join: bool) -> Vec<ServerMessage> {
    let n = sim.shards.len();
    let from = ConnRef {
        shard: n as u16,
        conn: ConnId { slot: 1, gen: 0 },
    };
    let op = ApiOp::Subscribe {
        user: user.into(),
        channel: channel.into(),
        join,
    };
    let call = MeshMsg::Api(Box::new(ApiCall { from, id: 1, op }));
    let home = home_of(user, n as u16);
    sim.shards[home as usize].handle_mesh(call, sim.now, &mut sim.mesh);
    sim.settle();
    sim.mesh.0[n]
        .drain(..)
        .map(|m| match m {
            MeshMsg::ToConn { frame, .. } => {
                let h = crate::ws::frame::parse_header(&frame).unwrap().unwrap();
                json::decode_server(&frame[h.header_len..]).unwrap()
            }
            other => panic!("unexpected {other:?}"),
        })
        .collect()
}

fn joined(msgs: &[ServerMessage]) -> Vec<JoinAck> {
    picked(msgs, |e| match e {
        ServerEvent::ChannelJoined(j) => Some(j.clone()),
        _ => None,
    })
}

fn left(msgs: &[ServerMessage]) -> Vec<String> {
    picked(msgs, |e| match e {
        ServerEvent::ChannelLeft(c) => Some(c.channel_id.clone()),
        _ => None,
    })
}

#[test]
fn the_backend_joins_and_removes_every_connection_of_a_user() {
    let mut sim = Sim::new(N);
    // Alice's token grants only `lobby`; two devices on two shards.
    let none = Access {
        grants: Some(std::sync::Arc::new(crate::access::Grants {
            channels: Some(crate::access::Patterns::new("channels", &["lobby".into()]).unwrap()),
            users: None,
        })),
        ..Access::default()
    };
    let (a1, r1) = sim.connect_as(0, "alice", none.clone());
    let (_a2, r2) = sim.connect_as(1, "alice", none);
    let (b, rb) = sim.connect(2, "bob", Protocol::Json);
    sim.join(b, "vip");
    rb.take();
    // She may not join by herself.
    sim.send(
        a1,
        Some(5),
        ClientEvent::ChannelJoin(ChannelJoin {
            channel_id: "vip".into(),
            since: None,
            token: None,
        }),
    );
    assert_eq!(error_code(&r1.take(), 5), ErrorCode::Forbidden);
    // The backend joins her.
    let answer = api(&mut sim, "alice", "vip", true);
    assert!(matches!(&answer[..], [m] if matches!(m.event, ServerEvent::Ack(_))));
    for r in [&r1, &r2] {
        let j = joined(&r.take());
        assert_eq!(j.len(), 1);
        assert_eq!(j[0].channel_id, "vip");
        assert!(j[0].members >= 2, "{j:?}");
    }
    let members_seen = picked(&rb.take(), |e| match e {
        ServerEvent::MemberJoined(m) => Some(m.user_id.clone()),
        _ => None,
    });
    assert!(
        !members_seen.is_empty() && members_seen.iter().all(|u| u == "alice"),
        "{members_seen:?}"
    );
    // Messages reach both devices.
    sim.publish(b, "vip", "welcome");
    assert_eq!(contents(&r1.take()), [(1, "welcome".to_string())]);
    assert_eq!(contents(&r2.take()), [(1, "welcome".to_string())]);
    // Again: nothing changes.
    api(&mut sim, "alice", "vip", true);
    assert!(r1.take().is_empty() && r2.take().is_empty());
    // Out again: told, and nothing more arrives.
    api(&mut sim, "alice", "vip", false);
    assert_eq!(left(&r1.take()), ["vip"]);
    assert_eq!(left(&r2.take()), ["vip"]);
    sim.publish(b, "vip", "bye");
    assert!(contents(&r1.take()).is_empty() && contents(&r2.take()).is_empty());
    // A user without connections, and a bad channel id.
    assert!(matches!(
        api(&mut sim, "nobody", "vip", true)[0].event,
        ServerEvent::Ack(_)
    ));
    let bad = api(&mut sim, "alice", "has space", true);
    assert!(matches!(&bad[0].event, ServerEvent::Error(e) if e.code == ErrorCode::BadRequest));
}
