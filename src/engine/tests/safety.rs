//! Authorization, roles, moderation and rate limits, driven in memory.

use super::*;
use crate::access::{Access, Grants, Patterns, Roles};

fn granted(channels: &[&str], users: Option<&[&str]>) -> Access {
    let list = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    Access {
        roles: Roles::NONE,
        grants: Some(Arc::new(Grants {
            channels: Some(Patterns::new("channels", &list(channels)).unwrap()),
            users: users.map(|u| Patterns::new("users", &list(u)).unwrap()),
        })),
    }
}

fn join_with(sim: &mut Sim, c: ConnRef, id: u64, channel: &str, token: Option<&str>) {
    sim.send(
        c,
        Some(id),
        ClientEvent::ChannelJoin(ChannelJoin {
            channel_id: channel.into(),
            since: None,
            token: token.map(Into::into),
        }),
    );
}

#[test]
fn channels_need_a_grant_or_a_subscription_token() {
    let mut sim = Sim::new(2);
    let (a, ra) = sim.connect_as(0, "alice", granted(&["team-1:*", "lobby"], None));
    let (b, rb) = sim.connect(1, "bob", Protocol::Json);
    for (i, ch) in ["lobby", "team-1:random", "team-2:secret"]
        .iter()
        .enumerate()
    {
        join_with(&mut sim, b, i as u64 + 1, ch, None);
    }
    rb.take();
    join_with(&mut sim, a, 1, "lobby", None);
    join_with(&mut sim, a, 2, "team-1:random", None);
    join_with(&mut sim, a, 3, "team-2:secret", None);
    join_with(
        &mut sim,
        a,
        4,
        "team-2:secret",
        Some("sub:mallory:team-2:secret"),
    );
    join_with(
        &mut sim,
        a,
        5,
        "team-2:secret",
        Some("sub:alice:team-2:other"),
    );
    let got = ra.take();
    assert!(matches!(ack_body(&got, 1), AckBody::Join(_)));
    assert!(matches!(ack_body(&got, 2), AckBody::Join(_)));
    for id in [3, 4, 5] {
        assert_eq!(error_code(&got, id), ErrorCode::Forbidden, "request {id}");
    }
    // Nothing it sends reaches the channel it was refused.
    sim.publish(a, "team-2:secret", "let me in");
    sim.send(
        a,
        Some(6),
        ClientEvent::TypingStart(ChannelRef {
            channel_id: "team-2:secret".into(),
        }),
    );
    sim.send(
        a,
        Some(7),
        ClientEvent::VoiceJoin(ChannelRef {
            channel_id: "team-2:secret".into(),
        }),
    );
    sim.send(
        a,
        Some(8),
        ClientEvent::VoiceGetParticipants(ChannelRef {
            channel_id: "team-2:secret".into(),
        }),
    );
    let got = ra.take();
    for id in [2, 6, 7, 8] {
        assert_eq!(error_code(&got, id), ErrorCode::Forbidden, "request {id}");
    }
    let seen = rb.take();
    assert!(
        !seen.iter().any(|m| matches!(
            &m.event,
            ServerEvent::MessageNew(_)
                | ServerEvent::TypingUserStart(_)
                | ServerEvent::VoiceUserJoined(_)
        ) || matches!(&m.event, ServerEvent::MemberJoined(j) if j.channel_id == "team-2:secret")),
        "{seen:?}"
    );
    // A subscription token for this user and channel lets it in.
    join_with(
        &mut sim,
        a,
        9,
        "team-2:secret",
        Some("sub:alice:team-2:secret"),
    );
    assert!(matches!(ack_body(&ra.take(), 9), AckBody::Join(_)));
    sim.publish(a, "team-2:secret", "hello");
    assert_eq!(contents(&rb.take()), [(1, "hello".to_string())]);
}

#[test]
fn direct_messages_and_calls_need_the_user_granted() {
    let mut sim = Sim::new(2);
    let (a, ra) = sim.connect_as(0, "alice", granted(&[], Some(&["support-*"])));
    let (_b, rb) = sim.connect(1, "bob", Protocol::Json);
    let (_s, rs) = sim.connect(1, "support-1", Protocol::Json);
    let dm = |to: &str| {
        ClientEvent::DmSend(DmSend {
            to_user_id: to.into(),
            content: "hi".into(),
            nonce: None,
        })
    };
    sim.send(a, Some(1), dm("bob"));
    sim.send(
        a,
        Some(2),
        ClientEvent::CallInitiate(CallInitiate {
            to_user_id: "bob".into(),
            call_type: CallType::Audio,
            sdp: None,
        }),
    );
    sim.send(a, Some(3), dm("support-1"));
    let got = ra.take();
    assert_eq!(error_code(&got, 1), ErrorCode::Forbidden);
    assert_eq!(error_code(&got, 2), ErrorCode::Forbidden);
    assert!(matches!(ack_body(&got, 3), AckBody::Dm(_)));
    let bob = rb.take();
    assert!(
        !bob.iter().any(|m| matches!(
            m.event,
            ServerEvent::DmNew(_) | ServerEvent::CallIncoming(_)
        )),
        "{bob:?}"
    );
    assert!(names(&rs.take()).contains(&"dm:new"));
}

#[test]
fn only_authors_edit_and_moderators_may_delete_others_messages() {
    let mut sim = Sim::new(2);
    let ch = channel_owned_by(1, 2);
    let (a, ra) = sim.connect(0, "alice", Protocol::Json);
    let (b, rb) = sim.connect(1, "bob", Protocol::Json);
    let moderator = Access {
        roles: Roles::MODERATOR,
        grants: None,
    };
    let (m, rm) = sim.connect_as(0, "mod", moderator);
    for c in [a, b, m] {
        sim.join(c, &ch);
    }
    sim.publish(a, &ch, "first");
    sim.publish(a, &ch, "second");
    let ids: Vec<String> = picked(&ra.take(), |e| match e {
        ServerEvent::MessageNew(n) => Some(n.message_id.clone()),
        _ => None,
    });
    rb.take();
    rm.take();
    let delete = |id: &str| {
        ClientEvent::MessageDelete(MessageRef {
            channel_id: ch.clone(),
            message_id: id.into(),
        })
    };
    sim.send(b, Some(1), delete(&ids[0]));
    sim.send(
        m,
        Some(2),
        ClientEvent::MessageEdit(MessageEdit {
            channel_id: ch.clone(),
            message_id: ids[0].clone(),
            content: "rewritten".into(),
        }),
    );
    assert_eq!(error_code(&rb.take(), 1), ErrorCode::Forbidden);
    assert_eq!(error_code(&rm.take(), 2), ErrorCode::Forbidden);
    sim.send(m, Some(3), delete(&ids[0]));
    assert!(matches!(ack_body(&rm.take(), 3), AckBody::Event(_)));
    let deleted = picked(&ra.take(), |e| match e {
        ServerEvent::MessageDeleted(d) => Some(d.message_id.clone()),
        _ => None,
    });
    assert_eq!(deleted, [ids[0].clone()]);
}
