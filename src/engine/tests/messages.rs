//! History pages, edits, deletions, reactions, and nonces answered once.

use super::*;

#[test]
fn history_pages_through_what_the_channel_keeps() {
    let mut sim = Sim::new(2);
    let ch = channel_owned_by(1, 2);
    let (a, ra) = sim.connect(0, "alice", Protocol::Json);
    sim.join(a, &ch);
    for i in 1..=7 {
        sim.publish(a, &ch, &format!("m{i}"));
    }
    ra.take();
    let page = |sim: &mut Sim, id: u64, limit: u32, before: Option<u64>| {
        sim.send(
            a,
            Some(id),
            ClientEvent::ChannelGetHistory(GetHistory {
                channel_id: ch.clone(),
                limit: Some(limit),
                before,
            }),
        );
        match ack_body(&ra.take(), id) {
            AckBody::History(h) => (
                h.messages
                    .iter()
                    .map(|m| m.message.content.clone())
                    .collect::<Vec<_>>(),
                h.has_more,
            ),
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(
        page(&mut sim, 10, 3, None),
        (vec!["m5".into(), "m6".into(), "m7".into()], true)
    );
    assert_eq!(
        page(&mut sim, 11, 3, Some(5)),
        (vec!["m2".into(), "m3".into(), "m4".into()], true)
    );
    assert_eq!(page(&mut sim, 12, 3, Some(2)), (vec!["m1".into()], false));
    // Only members read a channel's history.
    let (b, rb) = sim.connect(1, "bob", Protocol::Json);
    sim.send(
        b,
        Some(13),
        ClientEvent::ChannelGetHistory(GetHistory {
            channel_id: ch.clone(),
            limit: None,
            before: None,
        }),
    );
    assert_eq!(error_code(&rb.take(), 13), ErrorCode::Forbidden);
}

#[test]
fn edits_deletes_and_reactions_are_sequenced_and_recoverable() {
    let mut sim = Sim::new(2);
    let ch = channel_owned_by(0, 2);
    let (a, ra) = sim.connect(0, "alice", Protocol::Json);
    let (b, rb) = sim.connect(1, "bob", Protocol::Binary);
    sim.join(a, &ch);
    sim.join(b, &ch);
    sim.publish(a, &ch, "hello");
    let id = match ack_body(&ra.take(), 2) {
        AckBody::Send(s) => s.message_id,
        other => panic!("{other:?}"),
    };
    rb.take();
    let edit = |content: &str| {
        ClientEvent::MessageEdit(MessageEdit {
            channel_id: ch.clone(),
            message_id: id.clone(),
            content: content.into(),
        })
    };
    let react = |emoji: &str, action| {
        ClientEvent::MessageReact(MessageReact {
            channel_id: ch.clone(),
            message_id: id.clone(),
            emoji: emoji.into(),
            action,
        })
    };
    // Only the author edits.
    sim.send(b, Some(20), edit("hacked"));
    assert_eq!(error_code(&rb.take(), 20), ErrorCode::Forbidden);
    sim.send(a, Some(21), edit("hello, world"));
    match ack_body(&ra.take(), 21) {
        AckBody::Event(e) => assert_eq!(e.offset, 2),
        other => panic!("{other:?}"),
    }
    let edited = picked(&rb.take(), |e| match e {
        ServerEvent::MessageEdited(m) => Some((m.offset, m.content.clone())),
        _ => None,
    });
    assert_eq!(edited, vec![(2, "hello, world".to_string())]);
    // One reaction per user per emoji; counts per emoji.
    sim.send(b, Some(22), react("👍", ReactAction::Add));
    sim.send(b, Some(23), react("👍", ReactAction::Add));
    sim.send(a, Some(24), react("👍", ReactAction::Add));
    sim.send(b, Some(25), react("👍", ReactAction::Remove));
    sim.send(b, Some(26), react("🎉", ReactAction::Remove));
    let reactions = picked(&ra.take(), |e| match e {
        ServerEvent::MessageReaction(r) => Some((r.user_id.clone(), r.action, r.count, r.offset)),
        _ => None,
    });
    assert_eq!(
        reactions,
        vec![
            ("bob".to_string(), ReactAction::Add, 1, 3),
            ("alice".to_string(), ReactAction::Add, 2, 4),
            ("bob".to_string(), ReactAction::Remove, 1, 5),
        ],
        "a repeated add and a remove of nothing change nothing"
    );
    let bob_acks = rb.take();
    for id in [22, 23, 25, 26] {
        assert!(matches!(ack_body(&bob_acks, id), AckBody::Event(_)));
    }
    // History shows the message as it stands.
    sim.send(
        a,
        Some(27),
        ClientEvent::ChannelGetHistory(GetHistory {
            channel_id: ch.clone(),
            limit: None,
            before: None,
        }),
    );
    match ack_body(&ra.take(), 27) {
        AckBody::History(h) => {
            let m = &h.messages[0];
            assert_eq!(m.message.content, "hello, world");
            assert_eq!(m.edited_at, Some(sim.now));
            assert_eq!(m.reactions.len(), 1);
            assert_eq!(
                (m.reactions[0].count, m.reactions[0].user_ids.clone()),
                (1, vec!["alice".to_string()])
            );
        }
        other => panic!("{other:?}"),
    }
    // Only the author deletes; then the message is gone.
    sim.send(
        b,
        Some(28),
        ClientEvent::MessageDelete(message_ref(&ch, &id)),
    );
    assert_eq!(error_code(&rb.take(), 28), ErrorCode::Forbidden);
    sim.send(
        a,
        Some(29),
        ClientEvent::MessageDelete(message_ref(&ch, &id)),
    );
    assert_eq!(names(&rb.take()), ["message:deleted"]);
    sim.send(a, Some(30), edit("again"));
    assert_eq!(error_code(&ra.take(), 30), ErrorCode::NotFound);
    // A client that saw only the message gets every later event, in order.
    let epoch = epoch_of(&sim, &ch);
    let (c, rc) = sim.connect(1, "carol", Protocol::Json);
    sim.send(c, Some(31), join_since(&ch, 1, &epoch));
    let replayed: Vec<String> = names(&rc.take()).into_iter().skip(1).collect();
    assert_eq!(
        replayed,
        [
            "message:edited",
            "message:reaction",
            "message:reaction",
            "message:reaction",
            "message:deleted"
        ]
    );
}

#[test]
fn a_resent_nonce_is_answered_but_not_published_twice() {
    let mut sim = Sim::new(2);
    let ch = channel_owned_by(1, 2);
    let (a, ra) = sim.connect(0, "alice", Protocol::Json);
    let (b, rb) = sim.connect(1, "bob", Protocol::Json);
    sim.join(a, &ch);
    sim.join(b, &ch);
    ra.take();
    rb.take();
    let send = MessageSend {
        nonce: Some("n-1".into()),
        ..MessageSend::new(ch.as_str(), "once")
    };
    sim.send(a, Some(40), ClientEvent::MessageSend(send.clone()));
    sim.send(a, Some(41), ClientEvent::MessageSend(send));
    let got = ra.take();
    let (first, second) = match (ack_body(&got, 40), ack_body(&got, 41)) {
        (AckBody::Send(x), AckBody::Send(y)) => (x, y),
        other => panic!("{other:?}"),
    };
    assert!(!first.duplicate && second.duplicate);
    assert_eq!(first.message_id, second.message_id);
    assert_eq!(second.nonce.as_deref(), Some("n-1"));
    let news = picked(&rb.take(), |e| match e {
        ServerEvent::MessageNew(m) => Some(m.nonce.clone()),
        _ => None,
    });
    assert_eq!(
        news,
        vec![Some("n-1".to_string())],
        "published once, nonce echoed"
    );
}
