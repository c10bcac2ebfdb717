//! The events stream of a cluster, end to end: two nodes on one real
//! redis-server add every sequenced channel event to a Redis stream in the
//! step that orders it; a consumer group reads them in channel order; the
//! nodes trim what every group has read, and refuse new channel events
//! with `unavailable` while the stream is full.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::common::backend::{Backend, HOOK_SECRET};
use crate::common::redis::*;
use crate::common::*;
use serde_json::{json, Value};

const STREAM: &str = "corecast:events";

/// A node of the cluster on `redis` with the events stream, and `extra`.
fn stream_node(redis: &Redis, extra: &[&str]) -> Server {
    let url = redis.url();
    let mut args = vec!["--shards", "2", "--redis", &url, "--events-stream", STREAM];
    args.extend_from_slice(extra);
    Server::start(&args)
}

fn node(redis: &Redis) -> Server {
    stream_node(redis, &["--events-stream-max-len", "100"])
}

/// A connection of the test's own to `redis`.
fn connection(redis: &Redis) -> ::redis::Connection {
    ::redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap()
}

/// What a consumer of the group `backend` reads next (ids and events).
fn read(con: &mut ::redis::Connection, count: usize) -> Vec<(String, Value)> {
    let reply: ::redis::streams::StreamReadReply = ::redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("backend")
        .arg("b1")
        .arg("COUNT")
        .arg(count)
        .arg("STREAMS")
        .arg(STREAM)
        .arg(">")
        .query(con)
        .unwrap();
    reply
        .keys
        .into_iter()
        .flat_map(|k| k.ids)
        .map(|e| {
            let text: String = e.get("event").expect("an `event` field");
            (e.id, serde_json::from_str(&text).unwrap())
        })
        .collect()
}

fn ack(con: &mut ::redis::Connection, ids: &[String]) {
    let n: u64 = ::redis::cmd("XACK")
        .arg(STREAM)
        .arg("backend")
        .arg(ids)
        .query(con)
        .unwrap();
    assert_eq!(n, ids.len() as u64);
}

fn wait_metric(s: &Server, name: &str, ok: impl Fn(u64) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !ok(s.metric(name)) {
        assert!(Instant::now() < deadline, "{name}: {}", s.metrics());
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn a_cluster_streams_its_channels_events_in_order_and_refuses_when_full() {
    let redis = Redis::start();
    redis_cli(
        &redis,
        &["XGROUP", "CREATE", STREAM, "backend", "$", "MKSTREAM"],
    );
    let (a, b) = (node(&redis), node(&redis));
    wait_cluster(&a, 1);
    wait_cluster(&b, 1);
    let mut con = connection(&redis);
    let mut alice = Peer::on(&a, "alice", 0, "").await;
    let mut bob = Peer::on(&b, "bob", 1, "").await;
    for c in ["general", "random"] {
        alice.ok("channel:join", json!({"channelId": c})).await;
        bob.ok("channel:join", json!({"channelId": c})).await;
    }
    // From both nodes, interleaved; a resend of a nonce is not added twice.
    let mut ids = Vec::new();
    for i in 0..12 {
        let (peer, channel) = match i % 3 {
            0 => (&mut alice, "general"),
            1 => (&mut bob, "general"),
            _ => (&mut bob, "random"),
        };
        let send =
            json!({"channelId": channel, "content": format!("m{i}"), "nonce": format!("n{i}")});
        let first = peer.ok("message:send", send.clone()).await;
        let again = peer.ok("message:send", send).await;
        assert_eq!(again["duplicate"], true, "{again}");
        ids.push(first["messageId"].as_str().unwrap().to_owned());
    }
    bob.ok(
        "message:edit",
        json!({"channelId": "general", "messageId": ids[1], "content": "m1 (edited)"}),
    )
    .await;
    alice
        .ok(
            "message:react",
            json!({"channelId": "general", "messageId": ids[1], "emoji": "👍", "action": "add"}),
        )
        .await;
    alice
        .ok(
            "message:delete",
            json!({"channelId": "general", "messageId": ids[0]}),
        )
        .await;
    let entries = read(&mut con, 1000);
    assert_eq!(entries.len(), 12 + 3, "{entries:?}");
    let mut by_channel: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (_, e) in &entries {
        let channel = e["channel"].as_str().unwrap();
        let offset = e["offset"].as_u64().unwrap();
        let epoch = e["epoch"].as_str().unwrap();
        let d = &e["event"]["d"];
        // The event as clients received it, with the offset Redis gave.
        assert_eq!(d["offset"], offset, "{e}");
        assert_eq!(d["channelId"], channel, "{e}");
        if e["event"]["t"] == "message:new" {
            assert_eq!(d["messageId"], format!("{epoch}-{offset}"), "{e}");
            assert!(ids.contains(&d["messageId"].as_str().unwrap().to_owned()));
        }
        assert!(e["at"].as_u64().unwrap() > 1_700_000_000_000, "{e}");
        by_channel.entry(channel.into()).or_default().push(offset);
    }
    assert_eq!(by_channel["general"], (1..=11).collect::<Vec<u64>>());
    assert_eq!(by_channel["random"], (1..=4).collect::<Vec<u64>>());
    let kinds: Vec<&str> = entries[12..]
        .iter()
        .map(|(_, e)| e["event"]["t"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["message:edited", "message:reaction", "message:deleted"]
    );
    assert_eq!(entries[12].1["event"]["d"]["content"], "m1 (edited)");
    // Read and acknowledged: the nodes trim it.
    let read_ids: Vec<String> = entries.iter().map(|(id, _)| id.clone()).collect();
    ack(&mut con, &read_ids);
    wait_metric(&a, "corecast_events_stream_trimmed_total", |n| n > 0);
    let deadline = Instant::now() + Duration::from_secs(15);
    while redis_cli(&redis, &["XLEN", STREAM]) != "0" {
        assert!(Instant::now() < deadline, "never trimmed");
        std::thread::sleep(Duration::from_millis(50));
    }

    // Filled to its bound: new channel events are refused.
    let mut accepted = 0;
    let refusal = loop {
        let v = alice
            .request(
                "message:send",
                json!({"channelId": "general", "content": format!("fill {accepted}")}),
            )
            .await;
        if v["t"] == "ack" {
            accepted += 1;
            assert!(accepted <= 100, "never refused");
            continue;
        }
        break v;
    };
    assert_eq!(accepted, 100);
    assert_eq!(refusal["d"]["code"], "unavailable", "{refusal}");
    assert_eq!(refusal["d"]["retryAfterMs"], 1000, "{refusal}");
    assert_eq!(
        bob.refused(
            "message:react",
            json!({"channelId": "general", "messageId": ids[1], "emoji": "🎉", "action": "add"}),
        )
        .await,
        "unavailable"
    );
    assert!(a.metric("corecast_events_stream_refused_total") >= 1);
    assert!(b.metric("corecast_events_stream_refused_total") >= 1);
    // The backend reads half: room again once the nodes trimmed.
    let half = read(&mut con, 50);
    assert_eq!(half.len(), 50);
    let contents: Vec<&str> = half
        .iter()
        .map(|(_, e)| e["event"]["d"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(contents[0], "fill 0");
    assert_eq!(contents[49], "fill 49");
    let half_ids: Vec<String> = half.iter().map(|(id, _)| id.clone()).collect();
    ack(&mut con, &half_ids);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let v = bob
            .request(
                "message:send",
                json!({"channelId": "general", "content": "after"}),
            )
            .await;
        if v["t"] == "ack" {
            break;
        }
        assert_eq!(v["d"]["code"], "unavailable", "{v}");
        assert!(Instant::now() < deadline, "never accepted again");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Nothing was lost: the other 50, then the one accepted after.
    let rest = read(&mut con, 1000);
    assert_eq!(rest.len(), 51);
    assert_eq!(rest[0].1["event"]["d"]["content"], "fill 50");
    assert_eq!(rest[50].1["event"]["d"]["content"], "after");
    let offsets: Vec<u64> = half
        .iter()
        .chain(&rest)
        .map(|(_, e)| e["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, (12..=112).collect::<Vec<u64>>());
}

#[test]
fn the_events_stream_needs_a_single_redis() {
    let bin = env!("CARGO_BIN_EXE_corecast");
    for args in [
        vec!["check-config", "--events-stream", "s"],
        vec![
            "check-config",
            "--redis-cluster",
            "redis://127.0.0.1:7000",
            "--events-stream",
            "s",
        ],
        // Webhooks in a cluster come from the events stream.
        vec![
            "check-config",
            "--redis",
            "redis://127.0.0.1:7000",
            "--webhook-url",
            "http://127.0.0.1:9/e",
            "--webhook-secret",
            "webhook-secret-0123456789",
        ],
    ] {
        let out = std::process::Command::new(bin)
            .args(&args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("events_stream"),
            "{out:?}"
        );
    }
}

/// A node delivering the events stream to the example backend.
fn webhook_node(redis: &Redis, backend: &Backend) -> Server {
    let url = format!("http://{}/corecast/events", backend.addr);
    stream_node(
        redis,
        &["--webhook-url", &url, "--webhook-secret", HOOK_SECRET],
    )
}

#[tokio::test]
async fn one_node_at_a_time_posts_the_stream_and_another_takes_over() {
    let dir = crate::common::backend::tempdir("events", "relay");
    let backend = Backend::start(&dir.join("db.sqlite"), 0);
    let (_redis, a, b) = two_nodes_with(|r| webhook_node(r, &backend));
    // Exactly one of them delivers.
    wait_metric(&a, "corecast_webhook_leader", |_| {
        a.metric("corecast_webhook_leader") + b.metric("corecast_webhook_leader") == 1
    });
    let (mut leader, other) = if a.metric("corecast_webhook_leader") == 1 {
        (a, b)
    } else {
        (b, a)
    };
    let mut on_leader = Peer::on(&leader, "alice", 0, "").await;
    let mut on_other = Peer::on(&other, "bob", 1, "").await;
    on_leader
        .ok("channel:join", json!({"channelId": "general"}))
        .await;
    on_other
        .ok("channel:join", json!({"channelId": "general"}))
        .await;
    for i in 0..10 {
        let p = if i % 2 == 0 {
            &mut on_leader
        } else {
            &mut on_other
        };
        p.ok(
            "message:send",
            json!({"channelId": "general", "content": format!("m{i}")}),
        )
        .await;
    }
    backend.wait_stored(10, &other);
    // The delivering node dies; the other takes over (within the lease).
    drop(on_leader);
    leader.child.kill().unwrap();
    leader.child.wait().unwrap();
    for i in 10..20 {
        on_other
            .ok(
                "message:send",
                json!({"channelId": "general", "content": format!("m{i}")}),
            )
            .await;
    }
    backend.wait_stored(20, &other);
    assert_eq!(other.metric("corecast_webhook_leader"), 1);
    let events = backend.get("/events");
    let offsets: Vec<u64> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(
        offsets,
        (1..=20).collect::<Vec<u64>>(),
        "in order, once each"
    );
    drop(other);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The optional kinds (`--events-include`) in a cluster: each node adds
/// its own joins, leaves, read receipts and direct messages to the events
/// stream, without an offset and with an id each; a full stream skips
/// them (counted) instead of refusing the join or growing.
#[tokio::test]
async fn included_optional_kinds_join_the_stream_and_are_skipped_when_it_is_full() {
    let redis = Redis::start();
    redis_cli(
        &redis,
        &["XGROUP", "CREATE", STREAM, "backend", "$", "MKSTREAM"],
    );
    let extra = [
        "--events-stream-max-len",
        "100",
        "--events-include",
        "members,receipts,dms",
    ];
    let (a, b) = (stream_node(&redis, &extra), stream_node(&redis, &extra));
    wait_cluster(&a, 1);
    wait_cluster(&b, 1);
    let mut con = connection(&redis);
    let mut alice = Peer::on(&a, "alice", 0, "").await;
    let mut bob = Peer::on(&b, "bob", 1, "").await;
    joins_a_read_and_a_dm(&mut alice, &mut bob).await;
    // The stream takes them a round after the acks: read until all came.
    let mut entries = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while entries.len() < 5 {
        assert!(Instant::now() < deadline, "{entries:?}");
        entries.extend(read(&mut con, 100));
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    entries.extend(read(&mut con, 100));
    let kinds: Vec<(&str, &str)> = entries
        .iter()
        .map(|(_, e)| {
            let d = &e["event"]["d"];
            let who = d["userId"].as_str().or(d["fromUserId"].as_str()).unwrap();
            (e["event"]["t"].as_str().unwrap(), who)
        })
        .collect();
    let at = |k: (&str, &str)| {
        kinds
            .iter()
            .position(|&x| x == k)
            .unwrap_or_else(|| panic!("{k:?} not in {kinds:?}"))
    };
    assert_eq!(kinds.len(), 5, "{kinds:?}");
    let new = at(("message:new", "alice"));
    let receipt = at(("message:read_receipt", "bob"));
    assert!(at(("channel:member_joined", "alice")) < new, "{kinds:?}");
    assert!(at(("channel:member_joined", "bob")) < receipt, "{kinds:?}");
    assert!(new < receipt, "{kinds:?}");
    at(("dm:new", "alice"));
    let mut ids = std::collections::BTreeSet::new();
    for (_, e) in &entries {
        if e["event"]["t"] == "message:new" {
            assert_eq!(e["offset"], 1, "{e}");
        } else {
            assert!(e.get("offset").is_none(), "{e}");
            assert!(ids.insert(e["id"].as_str().unwrap().to_owned()), "{e}");
            assert!(e["at"].as_u64().unwrap() > 1_700_000_000_000, "{e}");
        }
    }
    assert_eq!(ids.len(), 4);

    // Filled to its bound (nothing acknowledged): a leave is still done,
    // and its event skipped.
    let mut accepted = 0;
    loop {
        let v = alice
            .request(
                "message:send",
                json!({"channelId": "general", "content": format!("fill {accepted}")}),
            )
            .await;
        if v["t"] != "ack" {
            assert_eq!(v["d"]["code"], "unavailable", "{v}");
            break;
        }
        accepted += 1;
        assert!(accepted <= 100, "never refused");
    }
    bob.ok("channel:leave", json!({"channelId": "general"}))
        .await;
    wait_metric(&b, "corecast_events_stream_skipped_total", |n| n == 1);
    assert_eq!(redis_cli(&redis, &["XLEN", STREAM]), "100");
}
