//! Every inbound message costs a rate token before its payload is read,
//! malformed ones included, and malformed input counts toward strikes.

use corecast::ws::OpCode;
use serde_json::json;

use crate::common::*;

/// A node with the default rate limits (the harness turns them off).
fn limited(extra: &[&str]) -> Server {
    let args = one_shard_args(extra);
    Server::start_raw(&args, &[("CORECAST_RATE_LIMITS", "default=100/60s")])
}

#[test]
fn a_flood_of_unparseable_frames_is_closed_after_its_strikes() {
    let s = limited(&[]);
    let mut bystander = Raw::connect(s.addr, &format!("/ws?token={}", token("bob", 600)), "");
    assert_eq!(bystander.recv_json()["t"], "ready");
    let mut raw = Raw::connect(s.addr, &format!("/ws?token={}", token("mallory", 600)), "");
    assert_eq!(raw.recv_json()["t"], "ready");
    for _ in 0..150 {
        raw.send(true, OpCode::Text, b"{not json");
    }
    let mut bad = 0;
    let code = loop {
        let f = raw.recv().expect("closed without a close frame");
        match f.opcode {
            OpCode::Text => {
                let v: serde_json::Value = serde_json::from_slice(&f.payload).unwrap();
                assert_eq!(v["d"]["code"], "bad_request");
                bad += 1;
            }
            OpCode::Close => break f.close_code(),
            _ => {}
        }
    };
    assert_eq!(code, Some(1008));
    assert_eq!(bad, 11, "answered until the eleventh strike closed it");
    assert_eq!(s.metric("corecast_malformed_total"), 11);
    assert_eq!(s.metric("corecast_rate_limit_closes_total"), 1);
    // Bob, on the same shard, is served.
    bystander.json(json!({"t": "heartbeat", "id": 1}));
    assert_eq!(bystander.recv_json()["t"], "heartbeat:ack");
}

#[test]
fn malformed_joins_spend_the_join_limit() {
    // Strikes off, to see the limit itself: 50 joins per minute.
    let s = limited(&["--rate-limit-strikes", "0"]);
    let mut raw = Raw::connect(s.addr, &format!("/ws?token={}", token("mallory", 600)), "");
    assert_eq!(raw.recv_json()["t"], "ready");
    for i in 0..60 {
        raw.json(json!({"t": "channel:join", "id": i, "d": {"channelId": 7}}));
    }
    let mut codes = Vec::new();
    while codes.len() < 60 {
        let v = raw.recv_json();
        codes.push(v["d"]["code"].as_str().unwrap().to_string());
    }
    assert_eq!(codes.iter().filter(|c| *c == "bad_request").count(), 50);
    assert_eq!(codes.iter().filter(|c| *c == "rate_limited").count(), 10);
    // The bucket is empty: a valid join is refused too.
    raw.json(json!({"t": "channel:join", "id": 99, "d": {"channelId": "general"}}));
    let v = raw.recv_json();
    assert_eq!(
        (v["id"].as_u64(), v["d"]["code"].as_str()),
        (Some(99), Some("rate_limited"))
    );
    // Another event has its own bucket.
    raw.json(json!({"t": "heartbeat", "id": 100}));
    assert_eq!(raw.recv_json()["t"], "heartbeat:ack");
}

#[test]
fn a_list_past_its_bound_is_too_large() {
    let s = limited(&[]);
    let mut raw = Raw::connect(s.addr, &format!("/ws?token={}", token("alice", 600)), "");
    assert_eq!(raw.recv_json()["t"], "ready");
    let ids: Vec<String> = (0..1001).map(|i| format!("u{i}")).collect();
    raw.json(json!({"t": "presence:subscribe", "id": 1, "d": {"userIds": ids}}));
    let v = raw.recv_json();
    assert_eq!(v["d"]["code"], "too_large", "{v}");
}
