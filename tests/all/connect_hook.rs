//! The connect hook end to end, against the example backend (a real
//! process): it refuses users (an upgrade gets the HTTP status, an `auth`
//! its error and close code), names moderators, joins connections to
//! channels as they open; a slow answer holds up only its own connection,
//! whose messages wait in order; with `connect_auth = backend` the backend
//! reads the token itself; on one node and across a cluster.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::common::backend::{Backend, HOOK_SECRET};
use crate::common::redis::two_nodes_with;
use crate::common::*;
use futures_util::SinkExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

fn tempdir(name: &str) -> PathBuf {
    crate::common::backend::tempdir("connect", name)
}

/// A node of one shard: each connection is one question to the backend
/// (tests that want a connection on a given shard of several retry).
fn start(backend: &Backend, extra: &[&str]) -> Server {
    let url = format!("http://{}/corecast/connect", backend.addr);
    let mut args = vec!["--shards", "1", "--hooks-connect-url", &url];
    args.extend(["--hooks-secret", HOOK_SECRET]);
    args.extend_from_slice(extra);
    Server::start(&args)
}

/// The channels of the `channel:joined` events among `events`.
fn joined(events: &[Value]) -> Vec<String> {
    let mut out: Vec<String> = events
        .iter()
        .filter(|e| e["t"] == "channel:joined")
        .map(|e| e["d"]["channelId"].as_str().unwrap().to_owned())
        .collect();
    out.sort();
    out
}

/// The status line of an upgrade request's answer.
fn upgrade_status(s: &Server, query: &str) -> String {
    let resp = http_raw(
        s.addr,
        upgrade_request(&format!("/ws?{query}"), "").as_bytes(),
    );
    resp.lines().next().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn the_backend_decides_who_connects_and_what_they_join() {
    let dir = tempdir("one");
    let backend = Backend::start(&dir.join("db.sqlite"), 0);
    let s = start(&backend, &[]);
    // Alice is let in, and joined to `lobby` and her inbox as she opens.
    let mut alice = Peer::on(&s, "alice", 0, "").await;
    assert_eq!(alice.ready["d"]["userId"], "alice");
    let mut seen = Vec::new();
    while joined(&seen).len() < 2 {
        seen.push(alice.event("channel:joined").await);
    }
    assert_eq!(joined(&seen), ["inbox-alice", "lobby"]);
    // Opened, she may send what an unauthenticated connection may not (more
    // than max_unauthenticated_message_size, 16 KiB), from her first message.
    let big = format!(r#"{{"t":"heartbeat","id":9}}{}"#, " ".repeat(20_000));
    alice.ws.send(Message::Text(big.into())).await.unwrap();
    assert_eq!(alice.event("heartbeat:ack").await["id"], 9);
    let sent = alice
        .ok(
            "message:send",
            json!({"channelId": "lobby", "content": "hello"}),
        )
        .await;
    // The backend made mia a moderator: she may delete alice's message,
    // and alice may not delete hers.
    let mut mia = Peer::on(&s, "mod-mia", 0, "").await;
    mia.event_for("channel:joined", "channelId", "lobby").await;
    let mine = mia
        .ok(
            "message:send",
            json!({"channelId": "lobby", "content": "mine"}),
        )
        .await;
    assert_eq!(
        alice
            .refused(
                "message:delete",
                json!({"channelId": "lobby", "messageId": mine["messageId"]}),
            )
            .await,
        "forbidden"
    );
    mia.ok(
        "message:delete",
        json!({"channelId": "lobby", "messageId": sent["messageId"]}),
    )
    .await;
    // Refused at the upgrade: the backend's status and reason.
    let resp = http_raw(
        s.addr,
        upgrade_request(&format!("/ws?token={}", token("suspended-sam", 600)), "").as_bytes(),
    );
    assert!(resp.starts_with("HTTP/1.1 403 "), "{resp}");
    assert!(resp.ends_with("account suspended"), "{resp}");
    // The backend failing: 503, try again later.
    let status = upgrade_status(&s, &format!("token={}", token("fail-fred", 600)));
    assert!(status.starts_with("HTTP/1.1 503 "), "{status}");
    // Refused after `auth`: its error, then close 4004.
    let mut ws = ws_connect(&s.url("/ws"), None).await;
    let auth = json!({"t": "auth", "id": 1, "d": {"token": token("suspended-sue", 600)}});
    send(&mut ws, auth).await;
    let e = recv(&mut ws).await;
    assert_eq!(
        (&e["t"], &e["id"], &e["d"]["code"], &e["d"]["message"]),
        (
            &json!("error"),
            &json!(1),
            &json!("forbidden"),
            &json!("account suspended")
        ),
        "{e}"
    );
    assert_eq!(recv_close(&mut ws).await, Some(CloseCode::from(4004)));
    // A token corecast refuses never reaches the backend.
    let status = upgrade_status(&s, &format!("token={}", token("alice", -3600)));
    assert!(status.starts_with("HTTP/1.1 401 "), "{status}");
    // alice, mia, sam, fred, sue: five questions, two refused, one failed.
    assert_eq!(backend.stat("connect_hooks"), 5);
    assert_eq!(s.metric("corecast_hook_calls_total"), 5);
    assert_eq!(s.metric("corecast_hook_rejected_total"), 2);
    assert_eq!(s.metric("corecast_hook_failures_total"), 1);
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_slow_answer_holds_only_its_connection_and_keeps_its_messages_in_order() {
    let dir = tempdir("slow");
    let backend = Backend::start(&dir.join("db.sqlite"), 0);
    let s = start(&backend, &[]);
    let order = Arc::new(Mutex::new(Vec::new()));
    // Slow-sid authenticates with `auth` and, without waiting, joins and
    // sends: the backend takes 1.5 s to let him in.
    let mut ws = ws_connect(&s.url("/ws"), None).await;
    let first = [
        json!({"t": "auth", "id": 1, "d": {"token": token("slow-sid", 600)}}),
        json!({"t": "channel:join", "id": 2, "d": {"channelId": "general"}}),
        json!({"t": "message:send", "id": 3, "d": {"channelId": "general", "content": "early"}}),
        json!({"t": "heartbeat", "id": 4}),
    ];
    for m in first {
        send(&mut ws, m).await;
    }
    let slow = {
        let order = order.clone();
        tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                let v = recv(&mut ws).await;
                let last = v["t"] == "heartbeat:ack";
                got.push(v);
                if last {
                    break;
                }
            }
            order.lock().unwrap().push("sid");
            got
        })
    };
    // Bob connects, joins and sends meanwhile, on the same shard.
    let mut bob = Peer::on(&s, "bob", 0, "").await;
    bob.ok("channel:join", json!({"channelId": "general"}))
        .await;
    let ack = bob
        .ok(
            "message:send",
            json!({"channelId": "general", "content": "bob first"}),
        )
        .await;
    assert_eq!(ack["offset"], 1, "{ack}");
    order.lock().unwrap().push("bob");
    let got = slow.await.unwrap();
    assert_eq!(*order.lock().unwrap(), ["bob", "sid"]);
    // Sid's answers in the order he sent: the auth's ack, `ready`, then
    // each request's answer; his message after bob's.
    let answers: Vec<(Value, Value)> = got
        .iter()
        .filter(|v| ["ack", "ready", "error", "heartbeat:ack"].contains(&v["t"].as_str().unwrap()))
        .map(|v| (v["t"].clone(), v["id"].clone()))
        .collect();
    assert_eq!(
        answers,
        [
            (json!("ack"), json!(1)),
            (json!("ready"), Value::Null),
            (json!("ack"), json!(2)),
            (json!("ack"), json!(3)),
            (json!("heartbeat:ack"), json!(4)),
        ],
        "{got:?}"
    );
    let early = got
        .iter()
        .find(|v| v["t"] == "ack" && v["id"] == 3)
        .unwrap();
    assert_eq!(early["d"]["offset"], 2, "{early}");
    // Waiting, a connection holds no more than an unauthenticated one may
    // send (16 KiB): past it, it is closed.
    let mut ws = ws_connect(&s.url("/ws"), None).await;
    let auth = json!({"t": "auth", "id": 1, "d": {"token": token("slow-sam", 600)}});
    send(&mut ws, auth).await;
    for id in 2..4 {
        let padded = format!(r#"{{"t":"heartbeat","id":{id}}}{}"#, " ".repeat(10_000));
        ws.send(Message::Text(padded.into())).await.unwrap();
    }
    assert_eq!(recv_close(&mut ws).await, Some(CloseCode::Policy));
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn with_backend_auth_the_backend_reads_the_token() {
    let dir = tempdir("backend");
    let backend = Backend::start(&dir.join("db.sqlite"), 0);
    let s = start(&backend, &["--hooks-connect-auth", "backend"]);
    // A session token of the application's own, not a JWT.
    let mut zoe = Peer::with_token(&s, "sess-zoe", 0, "").await;
    assert_eq!(zoe.ready["d"]["userId"], "zoe");
    zoe.event_for("channel:joined", "channelId", "inbox-zoe")
        .await;
    // What the backend does not know is refused, a JWT included.
    for bad in ["sess-".to_owned(), "nope".to_owned(), token("zoe", 600)] {
        let status = upgrade_status(&s, &format!("token={bad}"));
        assert!(status.starts_with("HTTP/1.1 401 "), "{bad}: {status}");
    }
    // Through `auth` as well.
    let mut ws = ws_connect(&s.url("/ws"), None).await;
    send(
        &mut ws,
        json!({"t": "auth", "id": 7, "d": {"token": "sess-yan"}}),
    )
    .await;
    assert_eq!(recv(&mut ws).await, json!({"t": "ack", "id": 7, "d": {}}));
    assert_eq!(recv(&mut ws).await["d"]["userId"], "yan");
    assert_eq!(backend.stat("connect_hooks"), 5);
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn connections_the_backend_joins_meet_across_a_cluster() {
    let dir = tempdir("cluster");
    let backend = Backend::start(&dir.join("db.sqlite"), 0);
    let (redis, a, b) = two_nodes_with(|r| start(&backend, &["--redis", &r.url()]));
    let mut alice = Peer::on(&a, "alice", 0, "").await;
    let mut bob = Peer::on(&b, "bob", 0, "").await;
    alice
        .event_for("channel:joined", "channelId", "lobby")
        .await;
    bob.event_for("channel:joined", "channelId", "lobby").await;
    alice
        .ok(
            "message:send",
            json!({"channelId": "lobby", "content": "from node a"}),
        )
        .await;
    let got = bob.event("message:new").await;
    assert_eq!(
        (&got["d"]["content"], &got["d"]["userId"]),
        (&json!("from node a"), &json!("alice")),
        "{got}"
    );
    assert_eq!(backend.stat("connect_hooks"), 2);
    drop((a, b, redis));
    let _ = std::fs::remove_dir_all(&dir);
}
