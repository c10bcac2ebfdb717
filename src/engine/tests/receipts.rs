//! Delivery and read receipts.

use super::*;

#[test]
fn delivery_and_read_receipts() {
    let mut sim = Sim::new(2);
    let ch = channel_owned_by(1, 2);
    let (a, ra) = sim.connect(0, "alice", Protocol::Json);
    let (a2, ra2) = sim.connect(1, "alice", Protocol::Json);
    let (b, rb) = sim.connect(1, "bob", Protocol::Json);
    sim.join(a, &ch);
    sim.join(b, &ch);
    sim.publish(a, &ch, "read me");
    let id = match ack_body(&ra.take(), 2) {
        AckBody::Send(s) => s.message_id,
        other => panic!("{other:?}"),
    };
    rb.take();
    sim.send(
        b,
        Some(10),
        ClientEvent::MessageDelivered(message_ref(&ch, &id)),
    );
    // The author hears of it on every device, even one not in the channel.
    for r in [&ra, &ra2] {
        let d = picked(&r.take(), |e| match e {
            ServerEvent::MessageDelivery(d) => Some((d.message_id.clone(), d.user_id.clone())),
            _ => None,
        });
        assert_eq!(d, vec![(id.clone(), "bob".to_string())]);
    }
    let _ = a2;
    sim.send(
        b,
        Some(11),
        ClientEvent::MessageMarkRead(message_ref(&ch, &id)),
    );
    sim.send(
        b,
        Some(12),
        ClientEvent::MessageMarkRead(message_ref(&ch, &id)),
    );
    let receipts = picked(&ra.take(), |e| match e {
        ServerEvent::MessageReadReceipt(r) => Some((r.user_id.clone(), r.offset)),
        _ => None,
    });
    assert_eq!(
        receipts,
        vec![("bob".to_string(), 1)],
        "marking again changes nothing"
    );
    sim.send(
        a,
        Some(13),
        ClientEvent::MessageGetReadReceipts(message_ref(&ch, &id)),
    );
    match ack_body(&ra.take(), 13) {
        AckBody::ReadReceipts(r) => assert_eq!(
            r.readers
                .iter()
                .map(|r| r.user_id.as_str())
                .collect::<Vec<_>>(),
            ["bob"]
        ),
        other => panic!("{other:?}"),
    }
    sim.send(
        b,
        Some(14),
        ClientEvent::MessageMarkRead(message_ref(&ch, "nope-1")),
    );
    assert_eq!(error_code(&rb.take(), 14), ErrorCode::NotFound);
}
