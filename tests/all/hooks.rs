//! The publish hook end to end, against the example backend (a real
//! process): it lets messages through, rewrites them or rejects them
//! before they are sequenced; a slow answer holds up only its own
//! connection, whose events keep their order; a backend down refuses the
//! message (`unavailable`); on one node and across a cluster.

use std::path::PathBuf;

use crate::common::backend::{Backend, HOOK_SECRET};
use crate::common::redis::two_nodes_with;
use crate::common::*;
use serde_json::{json, Value};

fn tempdir(name: &str) -> PathBuf {
    crate::common::backend::tempdir("hooks", name)
}

fn start(backend: &Backend, extra: &[&str]) -> Server {
    let url = format!("http://{}/corecast/publish", backend.addr);
    let mut args = vec!["--shards", "2", "--hooks-publish-url", &url];
    args.extend(["--hooks-secret", HOOK_SECRET]);
    args.extend(["--hooks-publish-channels", "team-*,lobby"]);
    args.extend_from_slice(extra);
    Server::start(&args)
}

/// The contents of the `message:new` events in `events`.
fn contents(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["t"] == "message:new")
        .map(|e| e["d"]["content"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn the_publish_hook_allows_rewrites_and_rejects_without_holding_up_others() {
    let dir = tempdir("one");
    let backend = Backend::start(&dir.join("db.sqlite"), 0);
    let s = start(&backend, &[]);
    let mut alice = Peer::on(&s, "alice", 0, "").await;
    let mut bob = Peer::on(&s, "bob", 1, "").await;
    for c in ["team-1", "general"] {
        alice.ok("channel:join", json!({"channelId": c})).await;
        bob.ok("channel:join", json!({"channelId": c})).await;
    }
    // Alice: a message the backend takes 1.5 s over, then three more
    // without waiting (one to a channel without the hook).
    let sent = [
        ("team-1", "/slow but sure"),
        ("team-1", "/shout hello"),
        ("general", "no hook here"),
        ("team-1", "plain"),
    ];
    for (i, (c, text)) in sent.iter().enumerate() {
        let m = json!({"t": "message:send", "id": i + 1, "d": {"channelId": c, "content": text}});
        alice.send(m).await;
    }
    // Bob is not held up: his hooked message is answered and delivered
    // while alice's first waits.
    let fast = bob
        .ok(
            "message:send",
            json!({"channelId": "team-1", "content": "bob is quick"}),
        )
        .await;
    assert_eq!(fast["offset"], 1, "before alice's slow one: {fast}");
    // Alice's answers come in the order she sent, with the rewrite.
    let mut acks = Vec::new();
    let mut seen = Vec::new();
    while acks.len() < 4 {
        let v = alice.events_until("ack").await;
        acks.push(v.last().unwrap()["id"].as_u64().unwrap());
        seen.extend(v);
    }
    assert_eq!(acks, [1, 2, 3, 4]);
    seen.extend(alice.drain().await);
    assert_eq!(
        contents(&seen),
        [
            "bob is quick",
            "/slow but sure",
            "HELLO",
            "no hook here",
            "plain"
        ]
    );
    // Rejected with the backend's reason, and nothing delivered.
    let v = alice
        .request(
            "message:send",
            json!({"channelId": "team-1", "content": "buy spam now"}),
        )
        .await;
    assert_eq!(v["d"]["code"], "forbidden", "{v}");
    assert_eq!(v["d"]["message"], "that word is not allowed here", "{v}");
    // The backend failing: refused, `unavailable`.
    let v = alice
        .request(
            "message:send",
            json!({"channelId": "team-1", "content": "/fail"}),
        )
        .await;
    assert_eq!(v["d"]["code"], "unavailable", "{v}");
    let bob_saw = contents(&bob.drain().await);
    assert!(!bob_saw.iter().any(|c| c.contains("spam") || c == "/fail"));
    // Only hooked channels were asked about: 5 of alice's, 1 of bob's.
    assert_eq!(backend.stat("publish_hooks"), 6);
    assert_eq!(s.metric("corecast_hook_calls_total"), 6);
    assert_eq!(s.metric("corecast_hook_rejected_total"), 1);
    assert_eq!(s.metric("corecast_hook_failures_total"), 1);
    // The backend gone: refused, and the connection goes on.
    backend.kill();
    bob.ok("channel:join", json!({"channelId": "lobby"})).await;
    let v = bob
        .request(
            "message:send",
            json!({"channelId": "lobby", "content": "anyone?"}),
        )
        .await;
    assert_eq!(v["d"]["code"], "unavailable", "{v}");
    bob.ok(
        "message:send",
        json!({"channelId": "general", "content": "still here"}),
    )
    .await;
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_message_allowed_on_one_node_reaches_the_other_rewritten() {
    let dir = tempdir("cluster");
    let backend = Backend::start(&dir.join("db.sqlite"), 0);
    let (redis, a, b) = two_nodes_with(|r| start(&backend, &["--redis", &r.url()]));
    let mut alice = Peer::on(&a, "alice", 0, "").await;
    let mut bob = Peer::on(&b, "bob", 1, "").await;
    alice
        .ok("channel:join", json!({"channelId": "team-9"}))
        .await;
    bob.ok("channel:join", json!({"channelId": "team-9"})).await;
    let ack = alice
        .ok(
            "message:send",
            json!({"channelId": "team-9", "content": "/shout across"}),
        )
        .await;
    assert_eq!(ack["offset"], 1, "{ack}");
    let got = bob.event("message:new").await;
    assert_eq!(got["d"]["content"], "ACROSS", "{got}");
    assert_eq!(got["d"]["userId"], "alice", "{got}");
    assert_eq!(
        bob.refused(
            "message:send",
            json!({"channelId": "team-9", "content": "forbidden fruit"}),
        )
        .await,
        "forbidden"
    );
    // Metadata the backend attached reaches the other node, its history
    // and a recovery.
    let ack = alice
        .ok(
            "message:send",
            json!({"channelId": "team-9", "content": "see https://example.com/a"}),
        )
        .await;
    assert_eq!(ack["offset"], 2, "{ack}");
    let got = bob.event("message:new").await;
    let meta = json!({"links": ["https://example.com/a"]});
    assert_eq!(got["d"]["meta"], meta, "{got}");
    let history = bob
        .ok(
            "channel:get_history",
            json!({"channelId": "team-9", "limit": 10}),
        )
        .await;
    let metas: Vec<&Value> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| &m["meta"])
        .collect();
    assert_eq!(metas, [&Value::Null, &meta], "{history}");
    // A client cannot set it: `meta` in a client's message is not read.
    alice
        .ok(
            "message:send",
            json!({"channelId": "team-9", "content": "mine", "meta": {"verified": true}}),
        )
        .await;
    let got = bob.event("message:new").await;
    assert_eq!(got["d"]["content"], "mine", "{got}");
    assert!(got["d"].get("meta").is_none(), "{got}");
    assert_eq!(backend.stat("publish_hooks"), 4);
    drop((a, b, redis));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn an_rpc_is_answered_by_the_backend_in_the_ack() {
    let dir = tempdir("rpc");
    let backend = Backend::start(&dir.join("db.sqlite"), 0);
    let url = format!("http://{}/corecast/rpc", backend.addr);
    let s = Server::start(&[
        "--shards",
        "2",
        "--hooks-rpc-url",
        &url,
        "--hooks-secret",
        HOOK_SECRET,
    ]);
    let mut alice = Peer::on(&s, "alice", 0, "").await;
    let sum = alice
        .ok("rpc", json!({"method": "add", "data": [1, 2, 39]}))
        .await;
    assert_eq!(sum, json!({"data": 42}));
    let me = alice.ok("rpc", json!({"method": "whoami"})).await;
    assert_eq!(me, json!({"data": {"userId": "alice"}}));
    let v = alice
        .request("rpc", json!({"method": "nope", "data": {"x": 1}}))
        .await;
    assert_eq!(v["t"], "error", "{v}");
    assert_eq!(v["d"]["code"], "not_found", "{v}");
    assert_eq!(v["d"]["message"], "no method nope", "{v}");
    // A slow call holds its connection's next requests behind it, in
    // order; another connection's call is answered meanwhile.
    let mut bob = Peer::on(&s, "bob", 1, "").await;
    alice
        .send(json!({"t": "rpc", "id": 1, "d": {"method": "slow", "data": "first"}}))
        .await;
    alice
        .send(json!({"t": "rpc", "id": 2, "d": {"method": "echo", "data": "second"}}))
        .await;
    alice.send(json!({"t": "heartbeat", "id": 3})).await;
    let quick = bob
        .ok("rpc", json!({"method": "echo", "data": "bob"}))
        .await;
    assert_eq!(quick["data"], "bob");
    let mut answers = Vec::new();
    while answers.len() < 3 {
        let v = recv(&mut alice.ws).await;
        if v["t"] == "ack" || v["t"] == "heartbeat:ack" {
            answers.push((v["id"].as_u64().unwrap(), v["d"]["data"].clone()));
        }
    }
    assert_eq!(answers[0], (1, json!("first")));
    assert_eq!(answers[1], (2, json!("second")));
    assert_eq!(answers[2].0, 3);
    assert_eq!(backend.stat("rpc"), 6);
    // The method must be an id.
    assert_eq!(
        alice.refused("rpc", json!({"method": ""})).await,
        "bad_request"
    );
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}
