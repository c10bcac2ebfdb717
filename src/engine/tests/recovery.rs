//! Recovery after a gap: exactly what was missed, or a clear refusal, and
//! how long an emptied channel keeps its history for it.

use super::*;

#[test]
fn recovery_replays_exactly_what_was_missed_or_says_it_cannot() {
    let settings = Settings {
        history_size: 4,
        ..unlimited()
    };
    let mut sim = Sim::with(3, settings);
    let ch = channel_owned_by(2, 3);
    let (a, ra) = sim.connect(0, "alice", Protocol::Json);
    sim.join(a, &ch);
    for i in 1..=5 {
        sim.publish(a, &ch, &format!("m{i}"));
    }
    ra.take();
    let epoch = epoch_of(&sim, &ch);
    // A client that saw offset 2 comes back on another shard, in binary.
    let (b, rb) = sim.connect(1, "bob", Protocol::Binary);
    sim.send(b, Some(7), join_since(&ch, 2, &epoch));
    let got = rb.take();
    match ack_body(&got, 7) {
        AckBody::Join(j) => assert_eq!((j.recovered, j.offset), (Some(true), 5)),
        other => panic!("{other:?}"),
    }
    assert_eq!(names(&got)[0], "ack", "the answer comes before the replay");
    assert_eq!(
        contents(&got),
        vec![(3, "m3".into()), (4, "m4".into()), (5, "m5".into())]
    );
    // Live messages follow the replay, once.
    sim.publish(a, &ch, "m6");
    assert_eq!(contents(&rb.take()), vec![(6, "m6".into())]);
    // The history keeps 4 events: offset 1 is too old to recover from.
    let (c, rc) = sim.connect(2, "carol", Protocol::Json);
    sim.send(c, Some(8), join_since(&ch, 1, &epoch));
    let got = rc.take();
    match ack_body(&got, 8) {
        AckBody::Join(j) => assert_eq!(j.recovered, Some(false)),
        other => panic!("{other:?}"),
    }
    assert!(contents(&got).is_empty(), "nothing is papered over");
    // Another epoch (the channel restarted) cannot be recovered either.
    let (d, rd) = sim.connect(0, "dave", Protocol::Json);
    sim.send(d, Some(9), join_since(&ch, 5, "0000000000000000"));
    match ack_body(&rd.take(), 9) {
        AckBody::Join(j) => assert_eq!(j.recovered, Some(false)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_emptied_channel_keeps_its_history_for_recovery_then_goes() {
    let settings = Settings {
        history_ttl_ms: 10_000,
        ..unlimited()
    };
    let mut sim = Sim::with(2, settings);
    let ch = channel_owned_by(1, 2);
    let (a, _ra) = sim.connect(0, "alice", Protocol::Json);
    sim.join(a, &ch);
    sim.publish(a, &ch, "kept");
    let epoch = epoch_of(&sim, &ch);
    sim.close(a);
    sim.advance(5000);
    let (b, rb) = sim.connect(0, "alice", Protocol::Json);
    sim.send(b, Some(1), join_since(&ch, 0, &epoch));
    let got = rb.take();
    assert!(
        matches!(ack_body(&got, 1), AckBody::Join(j) if j.recovered == Some(true) && j.epoch == epoch)
    );
    assert_eq!(contents(&got), vec![(1, "kept".into())]);
    sim.close(b);
    sim.advance(10_001);
    assert!(
        sim.shards[1].owned.is_empty(),
        "gone once its history expired"
    );
}
