//! The event stream to the application backend, end to end: a single node
//! POSTs its channels' events to the example backend
//! (`examples/backend/backend.py`, a real process storing them in SQLite),
//! in channel order, and loses none while the backend is down, the node
//! is killed, or the outbox is full.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::backend::{Backend, HOOK_SECRET};
use crate::common::*;
use serde_json::{json, Value};

fn tempdir(name: &str) -> PathBuf {
    crate::common::backend::tempdir("webhook", name)
}

const API_KEY: &str = "webhook-test-api-key-0123";

fn start(url: &str, outbox: &Path, max_bytes: Option<&str>) -> Server {
    let mut args = vec!["serve", "--listen", "127.0.0.1:0", "--auth-secret", SECRET];
    args.extend(["--api-listen", "127.0.0.1:0", "--api-key", API_KEY]);
    args.extend(["--shards", "2", "--webhook-url", url]);
    args.extend(["--webhook-secret", HOOK_SECRET]);
    args.extend(["--webhook-outbox-dir", outbox.to_str().unwrap()]);
    if let Some(m) = max_bytes {
        args.extend(["--webhook-outbox-max-bytes", m]);
    }
    Server::start_raw(&args, &[])
}

/// Lines in the outbox's segments.
fn outbox_lines(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".jsonl"))
        .map(|e| {
            std::fs::read(e.path())
                .unwrap()
                .iter()
                .filter(|&&b| b == b'\n')
                .count()
        })
        .sum()
}

/// Waits until the node's metric `name` passes `ok`.
fn wait_metric(s: &Server, name: &str, ok: impl Fn(u64) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ok(s.metric(name)) {
        assert!(Instant::now() < deadline, "{name}: {}", s.metrics());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every channel's events in the order the backend stored them: each
/// channel's offsets must run 1, 2, 3, … without a gap or a repeat.
fn assert_in_channel_order(events: &Value) -> BTreeMap<String, Vec<u64>> {
    let mut by_channel: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for e in events.as_array().unwrap() {
        by_channel
            .entry(e["channel"].as_str().unwrap().to_owned())
            .or_default()
            .push(e["offset"].as_u64().unwrap());
    }
    for (channel, offsets) in &by_channel {
        let want: Vec<u64> = (1..=offsets.len() as u64).collect();
        assert_eq!(offsets, &want, "channel {channel}");
    }
    by_channel
}

#[tokio::test]
async fn events_reach_the_backend_in_order_through_an_outage_and_a_kill() {
    let dir = tempdir("order");
    let backend = Backend::start(&dir.join("db.sqlite"), 0);
    let port = backend.addr.port();
    let url = format!("http://{}/corecast/events", backend.addr);
    let outbox = dir.join("outbox");
    let s = start(&url, &outbox, None);
    let mut alice = Peer::on(&s, "alice", 0, "").await;
    let mut bob = Peer::on(&s, "bob", 1, "").await;
    for c in ["general", "random"] {
        alice.ok("channel:join", json!({"channelId": c})).await;
        bob.ok("channel:join", json!({"channelId": c})).await;
    }
    // Messages on two channels from two users, an edit, a reaction and a
    // deletion.
    let mut ids = Vec::new();
    for i in 0..20 {
        let (peer, channel) = match i % 3 {
            0 => (&mut alice, "general"),
            1 => (&mut bob, "general"),
            _ => (&mut alice, "random"),
        };
        let a = peer
            .ok(
                "message:send",
                json!({"channelId": channel, "content": format!("m{i}")}),
            )
            .await;
        ids.push(a["messageId"].as_str().unwrap().to_owned());
    }
    alice
        .ok(
            "message:edit",
            json!({"channelId": "general", "messageId": ids[0], "content": "m0 (edited)"}),
        )
        .await;
    bob.ok(
        "message:react",
        json!({"channelId": "general", "messageId": ids[0], "emoji": "👍", "action": "add"}),
    )
    .await;
    bob.ok(
        "message:delete",
        json!({"channelId": "general", "messageId": ids[1]}),
    )
    .await;
    backend.wait_stored(23, &s);
    let events = backend.get("/events");
    let by_channel = assert_in_channel_order(&events);
    assert_eq!(by_channel["general"].len(), 14 + 3);
    assert_eq!(by_channel["random"].len(), 6);
    // What the backend made of them.
    let stored = backend.get("/messages?channel=general");
    let contents: Vec<&str> = stored
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(contents.len(), 13, "{stored}");
    assert_eq!(contents[0], "m0 (edited)");
    assert!(!contents.contains(&"m1"), "deleted: {stored}");
    assert_eq!(stored[0]["reactions"]["👍"], 1, "{stored}");
    // The node hears the backend's answer after the backend stored.
    wait_metric(&s, "corecast_webhook_waiting_bytes", |v| v == 0);
    assert!(s.metric("corecast_webhook_delivered_total") >= 23);
    assert!(s.metric("corecast_webhook_requests_total") >= 1);

    // The backend goes down: messages are still accepted, and wait.
    backend.kill();
    for i in 0..30 {
        let channel = if i % 2 == 0 { "general" } else { "random" };
        alice
            .ok(
                "message:send",
                json!({"channelId": channel, "content": format!("down{i}")}),
            )
            .await;
    }
    wait_metric(&s, "corecast_webhook_failures_total", |v| v > 0);
    assert!(s.metric("corecast_webhook_waiting_bytes") > 0);
    // Once the store has written them all (a kill loses what it has not).
    let deadline = Instant::now() + Duration::from_secs(10);
    while outbox_lines(&outbox) < 23 + 30 {
        assert!(Instant::now() < deadline, "{}", outbox_lines(&outbox));
        std::thread::sleep(Duration::from_millis(20));
    }
    // The node is killed too (no drain); it starts again on its outbox.
    drop((alice, bob));
    let mut s = s;
    s.child.kill().unwrap();
    s.child.wait().unwrap();
    let s = start(&url, &outbox, None);
    assert!(
        s.log().contains("events wait for the backend"),
        "{}",
        s.log()
    );
    // A channel's epoch starts over on a node without a history file:
    // the backend tells events apart by epoch.
    let mut carol = Peer::on(&s, "carol", 0, "").await;
    carol
        .ok("channel:join", json!({"channelId": "general"}))
        .await;
    carol
        .ok(
            "message:send",
            json!({"channelId": "general", "content": "after"}),
        )
        .await;
    // The backend is back on its port: everything arrives, once.
    let backend = Backend::start(&dir.join("db.sqlite"), port);
    backend.wait_stored(23 + 30 + 1, &s);
    let events = backend.get("/events");
    let list = events.as_array().unwrap();
    assert_eq!(list.len(), 54);
    let keys: BTreeSet<(String, String, u64)> = list
        .iter()
        .map(|e| {
            (
                e["channel"].as_str().unwrap().to_owned(),
                e["epoch"].as_str().unwrap().to_owned(),
                e["offset"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(keys.len(), 54, "stored once each");
    // Per epoch of each channel, in order and without a gap.
    let mut by_epoch: BTreeMap<(String, String), Vec<u64>> = BTreeMap::new();
    for (c, e, o) in list.iter().map(|e| {
        (
            e["channel"].as_str().unwrap().to_owned(),
            e["epoch"].as_str().unwrap().to_owned(),
            e["offset"].as_u64().unwrap(),
        )
    }) {
        by_epoch.entry((c, e)).or_default().push(o);
    }
    let mut lengths: Vec<usize> = by_epoch.values().map(Vec::len).collect();
    lengths.sort_unstable();
    assert_eq!(lengths, [1, 6 + 15, 17 + 15], "{by_epoch:?}");
    for offsets in by_epoch.values() {
        assert_eq!(offsets, &(1..=offsets.len() as u64).collect::<Vec<_>>());
    }
    wait_metric(&s, "corecast_webhook_waiting_bytes", |v| v == 0);
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_full_outbox_refuses_new_messages_until_the_backend_takes_them() {
    let dir = tempdir("full");
    // Nothing listens there yet.
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/corecast/events");
    let s = start(&url, &dir.join("outbox"), Some("1048576"));
    let mut alice = Peer::on(&s, "alice", 0, "").await;
    alice
        .ok("channel:join", json!({"channelId": "general"}))
        .await;
    let content = "x".repeat(3000);
    let mut accepted = 0u64;
    let refusal = loop {
        let v = alice
            .request(
                "message:send",
                json!({"channelId": "general", "content": content}),
            )
            .await;
        if v["t"] == "ack" {
            accepted += 1;
            assert!(accepted < 1000, "never refused");
            continue;
        }
        break v;
    };
    assert_eq!(refusal["d"]["code"], "unavailable", "{refusal}");
    assert_eq!(refusal["d"]["retryAfterMs"], 1000, "{refusal}");
    // About 1 MiB of 3 KB messages.
    assert!((300..400).contains(&accepted), "{accepted}");
    assert_eq!(s.metric("corecast_webhook_outbox_full"), 1);
    assert_eq!(s.metric("corecast_webhook_refused_total"), 1);
    // The server API's publish too (503), and edits and reactions;
    // reading is not.
    let (status, body) = api_call(
        s.api_addr(),
        "POST",
        "/api/publish",
        API_KEY,
        Some(json!({"channelId": "general", "content": "from the backend"})),
    );
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "unavailable", "{body}");
    let h = alice
        .ok("channel:get_history", json!({"channelId": "general"}))
        .await;
    let last = h["messages"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(
        alice
            .refused(
                "message:react",
                json!({"channelId": "general", "messageId": last["messageId"], "emoji": "🎉", "action": "add"}),
            )
            .await,
        "unavailable"
    );
    // The backend comes: what was accepted arrives, and messages are
    // accepted again.
    let backend = Backend::start(&dir.join("db.sqlite"), port);
    backend.wait_stored(accepted, &s);
    assert_in_channel_order(&backend.get("/events"));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = alice
            .request(
                "message:send",
                json!({"channelId": "general", "content": "again"}),
            )
            .await;
        if v["t"] == "ack" {
            assert_eq!(v["d"]["offset"], accepted + 1, "{v}");
            break;
        }
        assert!(Instant::now() < deadline, "{v}");
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_metric(&s, "corecast_webhook_outbox_full", |v| v == 0);
    backend.wait_stored(accepted + 1, &s);
    assert_eq!(backend.stat("stored"), backend.stat("received"));
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_backend_refuses_a_bad_signature() {
    let dir = tempdir("sig");
    let backend = Backend::start(&dir.join("db.sqlite"), 0);
    let body = r#"{"events":[]}"#;
    let mut s = TcpStream::connect(backend.addr).unwrap();
    write!(
        s,
        "POST /corecast/events HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: {}\r\nX-Corecast-Signature: t=1,v1=00\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 401"), "{out}");
    drop(backend);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The optional kinds (`--events-include`): joins and leaves, read
/// receipts and direct messages reach the backend too, each channel's in
/// their places among its messages, each with an id of its own, a
/// resent direct message once.
#[tokio::test]
async fn included_joins_receipts_and_direct_messages_reach_the_backend() {
    let dir = tempdir("extras");
    let backend = Backend::start(&dir.join("db.sqlite"), 0);
    let url = format!("http://{}/corecast/events", backend.addr);
    let outbox = dir.join("outbox");
    let mut args = vec!["serve", "--listen", "127.0.0.1:0", "--auth-secret", SECRET];
    args.extend(["--shards", "2", "--webhook-url", &url]);
    args.extend(["--webhook-secret", HOOK_SECRET]);
    args.extend(["--webhook-outbox-dir", outbox.to_str().unwrap()]);
    args.extend(["--events-include", "members,receipts,dms"]);
    let s = Server::start_raw(&args, &[]);
    let mut alice = Peer::on(&s, "alice", 0, "").await;
    let mut bob = Peer::on(&s, "bob", 1, "").await;
    let (id, first) = joins_a_read_and_a_dm(&mut alice, &mut bob).await;
    bob.ok("channel:leave", json!({"channelId": "general"}))
        .await;
    // 1 message, 2 joins, 1 receipt, 1 direct message, 1 leave.
    backend.wait_stored(6, &s);
    let events = backend.get("/events");
    assert_eq!(events.as_array().unwrap().len(), 1, "{events}");
    assert_eq!(events[0]["type"], "message:new");
    let activity = backend.get("/activity");
    let all = activity.as_array().unwrap();
    assert_eq!(all.len(), 5, "{activity}");
    let ids: BTreeSet<&str> = all.iter().map(|a| a["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 5, "an id each: {activity}");
    // The channel's, in the order the channel had them.
    let general: Vec<(&str, &str)> = all
        .iter()
        .filter(|a| a["channel"] == "general")
        .map(|a| {
            let who = a["data"]["userId"].as_str().unwrap();
            (a["type"].as_str().unwrap(), who)
        })
        .collect();
    assert_eq!(
        general,
        [
            ("channel:member_joined", "alice"),
            ("channel:member_joined", "bob"),
            ("message:read_receipt", "bob"),
            ("channel:member_left", "bob"),
        ]
    );
    let receipt = all
        .iter()
        .find(|a| a["type"] == "message:read_receipt")
        .unwrap();
    assert_eq!(receipt["data"]["messageId"], id);
    let dms = backend.get("/dms?user=bob");
    assert_eq!(
        dms,
        json!([{"messageId": first["messageId"], "fromUserId": "alice", "toUserId": "bob", "content": "psst"}])
    );
    assert_eq!(s.metric("corecast_webhook_skipped_total"), 0);
}

#[test]
fn an_unknown_optional_kind_or_no_stream_is_refused() {
    let check = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_corecast"))
            .arg("check-config")
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} accepted");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let hook = [
        "--webhook-url",
        "http://127.0.0.1:9/e",
        "--webhook-secret",
        HOOK_SECRET,
    ];
    let err = check(&[&["--events-include", "members,typing"][..], &hook].concat());
    assert!(err.contains("unknown kind `typing`"), "{err}");
    let err = check(&["--events-include", "dms"]);
    assert!(err.contains("the event stream is off"), "{err}");
    let ok = std::process::Command::new(env!("CARGO_BIN_EXE_corecast"))
        .arg("check-config")
        .args([&["--events-include", "members, receipts,dms"][..], &hook].concat())
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let shown = String::from_utf8_lossy(&ok.stdout);
    assert!(shown.contains("events_include"), "{shown}");
}
