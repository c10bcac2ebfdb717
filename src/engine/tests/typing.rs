//! Typing indicators: announced once, expiring, stopped by a message or a drop.

use super::*;

#[test]
fn typing_is_announced_once_expires_and_stops_with_a_message_or_a_drop() {
    let settings = Settings {
        typing_timeout_ms: 8000,
        ..unlimited()
    };
    let mut sim = Sim::with(2, settings);
    let ch = channel_owned_by(1, 2);
    let (a, ra) = sim.connect(0, "alice", Protocol::Json);
    let (b, rb) = sim.connect(1, "bob", Protocol::Json);
    sim.join(a, &ch);
    sim.join(b, &ch);
    ra.take();
    rb.take();
    let typing = |start| {
        let c = ChannelRef {
            channel_id: ch.clone(),
        };
        if start {
            ClientEvent::TypingStart(c)
        } else {
            ClientEvent::TypingStop(c)
        }
    };
    sim.send(a, Some(60), typing(true));
    assert_eq!(names(&rb.take()), ["typing:user_start"]);
    assert_eq!(
        names(&ra.take()),
        ["ack"],
        "the typist does not hear itself"
    );
    sim.advance(3000);
    sim.send(a, Some(61), typing(true));
    assert!(
        rb.take().is_empty(),
        "a repeated start is not broadcast again"
    );
    sim.send(
        b,
        Some(62),
        ClientEvent::TypingGetActive(ChannelRef {
            channel_id: ch.clone(),
        }),
    );
    match ack_body(&rb.take(), 62) {
        AckBody::Typing(t) => assert_eq!(t.user_ids, ["alice"]),
        other => panic!("{other:?}"),
    }
    // The refresh moved the expiry: 8 s after the first start it still runs.
    sim.advance(5500);
    assert!(rb.take().is_empty());
    sim.advance(3000);
    assert_eq!(names(&rb.take()), ["typing:user_stop"]);
    // A message stops typing, before it arrives.
    sim.send(a, Some(63), typing(true));
    rb.take();
    sim.publish(a, &ch, "done");
    assert_eq!(names(&rb.take()), ["typing:user_stop", "message:new"]);
    // So does dropping the connection.
    sim.send(a, Some(64), typing(true));
    rb.take();
    sim.close(a);
    assert_eq!(
        names(&rb.take()),
        ["typing:user_stop", "channel:member_left"]
    );
    sim.advance(10_000);
    assert!(rb.take().is_empty(), "nothing left to expire");
}
