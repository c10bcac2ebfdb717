//! Direct messages reach every device of both users.

use super::*;

#[test]
fn direct_messages_reach_every_device_of_both_users() {
    let mut sim = Sim::new(3);
    let (a1, ra1) = sim.connect(0, "alice", Protocol::Json);
    let (_a2, ra2) = sim.connect(1, "alice", Protocol::Binary);
    let (b1, rb1) = sim.connect(1, "bob", Protocol::Json);
    let (_b2, rb2) = sim.connect(2, "bob", Protocol::Json);
    let dm = |text: &str, nonce: &str| {
        ClientEvent::DmSend(DmSend {
            to_user_id: "bob".into(),
            content: text.into(),
            nonce: Some(nonce.into()),
        })
    };
    sim.send(a1, Some(1), dm("hi bob", "n1"));
    let got = ra1.take();
    let id = match ack_body(&got, 1) {
        AckBody::Dm(d) => {
            assert!(!d.duplicate);
            d.message_id
        }
        other => panic!("{other:?}"),
    };
    assert_eq!(
        names(&got),
        ["ack"],
        "the sending device gets the ack, not dm:sent"
    );
    let sent = picked(&ra2.take(), |e| match e {
        ServerEvent::DmSent(m) => Some(m.message_id.clone()),
        _ => None,
    });
    assert_eq!(sent, vec![id.clone()]);
    for r in [&rb1, &rb2] {
        let new = picked(&r.take(), |e| match e {
            ServerEvent::DmNew(m) => Some((
                m.message_id.clone(),
                m.from_user_id.clone(),
                m.content.clone(),
            )),
            _ => None,
        });
        assert_eq!(
            new,
            vec![(id.clone(), "alice".to_string(), "hi bob".to_string())]
        );
    }
    // A resend is recognised.
    sim.send(a1, Some(2), dm("hi bob", "n1"));
    assert!(
        matches!(ack_body(&ra1.take(), 2), AckBody::Dm(d) if d.duplicate && d.message_id == id)
    );
    assert!(rb1.take().is_empty() && rb2.take().is_empty());
    // Conversations: bob has one unread from alice; alice's is read.
    sim.send(
        b1,
        Some(3),
        ClientEvent::DmGetConversations(Limit { limit: None }),
    );
    match ack_body(&rb1.take(), 3) {
        AckBody::Conversations(c) => {
            assert_eq!(c.conversations.len(), 1);
            assert_eq!(
                (
                    c.conversations[0].user_id.as_str(),
                    c.conversations[0].unread
                ),
                ("alice", 1)
            );
            assert_eq!(c.conversations[0].last_message.content, "hi bob");
        }
        other => panic!("{other:?}"),
    }
    sim.send(
        a1,
        Some(4),
        ClientEvent::DmGetConversations(Limit { limit: None }),
    );
    match ack_body(&ra1.take(), 4) {
        AckBody::Conversations(c) => assert_eq!(
            (
                c.conversations[0].user_id.as_str(),
                c.conversations[0].unread
            ),
            ("bob", 0)
        ),
        other => panic!("{other:?}"),
    }
    // Bad input is refused with the field named.
    sim.send(
        a1,
        Some(5),
        ClientEvent::DmSend(DmSend {
            to_user_id: String::new(),
            content: "x".into(),
            nonce: None,
        }),
    );
    assert_eq!(error_code(&ra1.take(), 5), ErrorCode::BadRequest);
}
