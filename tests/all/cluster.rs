//! Cluster mode over real sockets: a real redis-server of the test's own on
//! a free port, and two corecast nodes (two shards each) sharing it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::common::redis::*;
use crate::common::*;
use serde_json::{json, Value};

/// The next `count` `message:new` events: (offset, content).
async fn messages(p: &mut Peer, count: usize) -> Vec<(u64, String)> {
    messages_and_acks(p, count).await.0
}

/// The same, with the acks received meanwhile.
async fn messages_and_acks(p: &mut Peer, count: usize) -> (Vec<(u64, String)>, Vec<Value>) {
    let (mut out, mut acks) = (Vec::new(), Vec::new());
    while out.len() < count {
        let v = match p.inbox.pop_front() {
            Some(v) => v,
            None => recv(&mut p.ws).await,
        };
        if v["t"] == "ack" {
            acks.push(v);
        } else if v["t"] == "message:new" {
            out.push((
                v["d"]["offset"].as_u64().unwrap(),
                v["d"]["content"].as_str().unwrap().to_string(),
            ));
        }
    }
    (out, acks)
}

#[tokio::test]
async fn every_member_on_every_node_sees_one_order() {
    let (_redis, a, b) = two_nodes();
    let mut alice = Peer::on(&a, "alice", 0, "").await;
    let mut bob = Peer::on(&b, "bob", 1, "").await;
    let mut carol = Peer::on(&b, "carol", 0, "").await;
    let j = alice
        .ok("channel:join", json!({"channelId": "general"}))
        .await;
    let epoch = j["epoch"].as_str().unwrap().to_string();
    let j = bob
        .ok("channel:join", json!({"channelId": "general"}))
        .await;
    assert_eq!(j["epoch"], epoch.as_str(), "one epoch in the cluster");
    // Joins cross nodes too.
    let joined =
        tokio::time::timeout(Duration::from_secs(3), alice.event("channel:member_joined")).await;
    let Ok(joined) = joined else {
        panic!("no member:joined\nA:\n{}\nB:\n{}", a.log(), b.log());
    };
    assert_eq!(joined["d"]["userId"], "bob");
    carol
        .ok("channel:join", json!({"channelId": "general"}))
        .await;
    // Two nodes publish at once, without waiting for their acks.
    const N: usize = 25;
    for i in 0..N {
        alice
            .send(json!({"t": "message:send", "id": i, "d": {"channelId": "general", "content": format!("a{i}")}}))
            .await;
        bob.send(json!({"t": "message:send", "id": i, "d": {"channelId": "general", "content": format!("b{i}")}}))
            .await;
    }
    let (seen_a, mut acks) = messages_and_acks(&mut alice, 2 * N).await;
    let seen_b = messages(&mut bob, 2 * N).await;
    let seen_c = messages(&mut carol, 2 * N).await;
    assert_eq!(seen_a, seen_b, "one order on both nodes");
    assert_eq!(seen_a, seen_c);
    let offsets: Vec<u64> = seen_a.iter().map(|m| m.0).collect();
    assert_eq!(offsets, (1..=2 * N as u64).collect::<Vec<_>>());
    // Each node's messages keep their own order within the shared one.
    let mine: Vec<&str> = seen_a
        .iter()
        .map(|m| m.1.as_str())
        .filter(|c| c.starts_with('a'))
        .collect();
    assert_eq!(mine, (0..N).map(|i| format!("a{i}")).collect::<Vec<_>>());
    // Every sender had its ack, with the offset every member saw.
    while acks.len() < N {
        acks.push(recv(&mut alice.ws).await);
    }
    assert!(acks.iter().all(|v| v["t"] == "ack"), "{acks:?}");
    for ack in &acks {
        let i = ack["id"].as_u64().unwrap() as usize;
        let offset = ack["d"]["offset"].as_u64().unwrap();
        assert_eq!(seen_a[offset as usize - 1].1, format!("a{i}"));
    }
    // Edits and reactions cross nodes, in the same order.
    let id = format!("{epoch}-1");
    let first_author = if seen_a[0].1.starts_with('a') {
        &mut alice
    } else {
        &mut bob
    };
    first_author
        .ok(
            "message:edit",
            json!({"channelId": "general", "messageId": id, "content": "edited"}),
        )
        .await;
    carol
        .ok(
            "message:react",
            json!({"channelId": "general", "messageId": id, "emoji": "👍", "action": "add"}),
        )
        .await;
    for p in [&mut alice, &mut bob, &mut carol] {
        let e = p.event("message:edited").await;
        assert_eq!(
            (e["d"]["content"].as_str(), e["d"]["offset"].as_u64()),
            (Some("edited"), Some(51))
        );
        let r = p.event("message:reaction").await;
        assert_eq!(
            (r["d"]["count"].as_u64(), r["d"]["offset"].as_u64()),
            (Some(1), Some(52))
        );
    }
    // Typing is relayed, not sequenced.
    bob.ok("typing:start", json!({"channelId": "general"}))
        .await;
    assert_eq!(alice.event("typing:user_start").await["d"]["userId"], "bob");
    assert!(a.metric("corecast_cluster_sent_total") > 0);
    assert_eq!(a.metric("corecast_cluster_gaps_total"), 0);
}

#[tokio::test]
async fn history_and_recovery_work_on_another_node() {
    let (redis, a, b) = two_nodes();
    let mut alice = Peer::on(&a, "alice", 0, "").await;
    let mut bob = Peer::on(&b, "bob", 1, "").await;
    let j = alice.ok("channel:join", json!({"channelId": "news"})).await;
    let epoch = j["epoch"].as_str().unwrap().to_string();
    bob.ok("channel:join", json!({"channelId": "news"})).await;
    for i in 1..=3 {
        bob.ok(
            "message:send",
            json!({"channelId": "news", "content": format!("m{i}")}),
        )
        .await;
    }
    let seen = messages(&mut alice, 3).await;
    assert_eq!(seen.last().unwrap().0, 3);
    // Alice drops; more is said while she is away.
    drop(alice);
    for i in 4..=6 {
        bob.ok(
            "message:send",
            json!({"channelId": "news", "content": format!("m{i}")}),
        )
        .await;
    }
    // She comes back through the other node, on a shard that does not own
    // the channel or on one that does: either way it recovers from Redis.
    for shard in [0, 1] {
        let mut again = Peer::on(&b, "alice", shard, "").await;
        let j = again
            .ok(
                "channel:join",
                json!({"channelId": "news", "since": {"offset": 3, "epoch": epoch}}),
            )
            .await;
        assert_eq!(j["recovered"], true, "{j}");
        assert_eq!(j["epoch"], epoch.as_str());
        let replay = messages(&mut again, 3).await;
        assert_eq!(
            replay,
            (4..=6).map(|i| (i, format!("m{i}"))).collect::<Vec<_>>()
        );
        let h = again
            .ok("channel:get_history", json!({"channelId": "news"}))
            .await;
        assert_eq!(h["messages"].as_array().unwrap().len(), 6, "{h}");
        assert!(again.drain().await.iter().all(|v| v["t"] != "message:new"));
    }
    // A third node that never saw the channel serves its history too.
    let c = node(&redis);
    wait_cluster(&c, 1);
    let mut dave = Peer::on(&c, "dave", 0, "").await;
    let j = dave
        .ok(
            "channel:join",
            json!({"channelId": "news", "since": {"offset": 0, "epoch": epoch}}),
        )
        .await;
    assert_eq!(j["recovered"], true, "{j}");
    assert_eq!(j["offset"], 6);
    assert_eq!(messages(&mut dave, 6).await.len(), 6);
}

#[tokio::test]
async fn without_redis_local_delivery_goes_on_and_the_cluster_comes_back() {
    let (mut redis, a, b) = two_nodes();
    let port = redis.port;
    let mut alice = Peer::on(&a, "alice", 0, "").await;
    let mut anna = Peer::on(&a, "anna", 1, "").await;
    let mut bob = Peer::on(&b, "bob", 0, "").await;
    for p in [&mut alice, &mut anna, &mut bob] {
        p.ok("channel:join", json!({"channelId": "ops"})).await;
    }
    alice
        .ok(
            "message:send",
            json!({"channelId": "ops", "content": "before"}),
        )
        .await;
    for p in [&mut anna, &mut bob] {
        assert_eq!(messages(p, 1).await[0].1, "before");
    }
    redis.kill();
    wait_cluster(&a, 0);
    // Redis is gone: node a's members still hear each other at once.
    for i in 0..5 {
        let ack = alice
            .ok(
                "message:send",
                json!({"channelId": "ops", "content": format!("alone{i}")}),
            )
            .await;
        assert!(ack["offset"].as_u64().unwrap() > 0);
    }
    let got: Vec<String> = messages(&mut anna, 5)
        .await
        .into_iter()
        .map(|m| m.1)
        .collect();
    assert_eq!(got, (0..5).map(|i| format!("alone{i}")).collect::<Vec<_>>());
    assert!(a.metrics().contains("corecast_cluster_up 0"));
    assert_eq!(
        http_get(a.addr, "/ready").0,
        200,
        "a node without Redis still serves"
    );
    // Redis is back: the bridges reconnect and the nodes talk again.
    let _redis = Redis::start_on(port);
    wait_cluster(&a, 1);
    wait_cluster(&b, 1);
    // The channels are followed again once their owners re-attach them;
    // what node a sequenced alone is handed over to node b then.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen: Vec<String> = Vec::new();
    let mut sent = 0;
    while !seen.iter().any(|m| m.starts_with("after")) {
        alice
            .ok(
                "message:send",
                json!({"channelId": "ops", "content": format!("after{sent}")}),
            )
            .await;
        sent += 1;
        while let Ok(v) =
            tokio::time::timeout(Duration::from_millis(300), bob.event("message:new")).await
        {
            seen.push(v["d"]["content"].as_str().unwrap().to_string());
        }
        assert!(
            Instant::now() < deadline,
            "cross-node delivery did not resume:\n{}",
            a.log()
        );
    }
    // A last one, after which nothing else is on its way.
    alice
        .ok(
            "message:send",
            json!({"channelId": "ops", "content": "sync"}),
        )
        .await;
    let last = loop {
        let v = bob.event("message:new").await;
        if v["d"]["content"] == "sync" {
            break v;
        }
        seen.push(v["d"]["content"].as_str().unwrap().to_string());
    };
    let alone: Vec<&String> = seen.iter().filter(|m| m.starts_with("alone")).collect();
    assert_eq!(
        alone,
        (0..5)
            .map(|i| format!("alone{i}"))
            .collect::<Vec<_>>()
            .iter()
            .collect::<Vec<_>>(),
        "handed over once each, in order: {seen:?}"
    );
    assert!(a.metric("corecast_cluster_reconnects_total") >= 1);
    // Bob drops, misses three messages, and recovers them exactly through
    // the other node (from the history in the restarted Redis).
    let (offset, epoch) = (
        last["d"]["offset"].as_u64().unwrap(),
        last["d"]["messageId"]
            .as_str()
            .unwrap()
            .rsplit_once('-')
            .unwrap()
            .0
            .to_string(),
    );
    drop(bob);
    for i in 0..3 {
        alice
            .ok(
                "message:send",
                json!({"channelId": "ops", "content": format!("missed{i}")}),
            )
            .await;
    }
    let mut again = Peer::on(&a, "bob", 1, "").await;
    let j = again
        .ok(
            "channel:join",
            json!({"channelId": "ops", "since": {"offset": offset, "epoch": epoch}}),
        )
        .await;
    assert_eq!(j["recovered"], true, "{j}");
    let got = messages(&mut again, 3).await;
    assert_eq!(
        got,
        (0..3)
            .map(|i| (offset + 1 + i as u64, format!("missed{i}")))
            .collect::<Vec<_>>()
    );
    assert!(again.drain().await.iter().all(|v| v["t"] != "message:new"));
}

fn upgrade_status(s: &Server, token: &str) -> String {
    let (head, _) = http_head(
        s.addr,
        upgrade_request(&format!("/ws?token={token}"), "").as_bytes(),
    );
    head.lines().next().unwrap_or("").to_string()
}

fn eventually_refused(s: &Server, user: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = upgrade_status(s, &token(user, 600));
        if status.contains("403") {
            return;
        }
        assert!(Instant::now() < deadline, "{user} still let in: {status}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[tokio::test]
async fn kicks_and_bans_reach_every_node_and_bans_live_in_redis() {
    use corecast::auth::Claims;
    let (redis, a, b) = two_nodes();
    let admin = token_with(
        &Claims::new("root", exp_in(600))
            .channels(["*"])
            .roles(["admin"]),
    );
    let mut root = Peer::with_token(&a, &admin, 0, "").await;
    let mut troll = Peer::on(&b, "troll", 1, "").await;
    let mut pest = Peer::on(&b, "pest", 0, "").await;
    let mut bob = Peer::on(&b, "bob", 1, "").await;
    for p in [&mut troll, &mut pest, &mut bob] {
        p.ok("channel:join", json!({"channelId": "general"})).await;
    }
    // A kick from the channel, made on node a, for a user on node b.
    root.ok(
        "moderation:kick_user",
        json!({"userId": "pest", "channelId": "general"}),
    )
    .await;
    assert_eq!(pest.event("moderation:kicked").await["d"]["by"], "root");
    assert_eq!(
        bob.event("moderation:user_kicked").await["d"]["userId"],
        "pest"
    );
    // A server ban: the user's session on node b is closed, and no node
    // lets it in again.
    root.ok(
        "moderation:ban_user",
        json!({"userId": "troll", "reason": "spam"}),
    )
    .await;
    assert_eq!(
        troll.event("moderation:banned").await["d"]["reason"],
        "spam"
    );
    assert_eq!(recv_close(&mut troll.ws).await.map(u16::from), Some(4004));
    // The node that made it enforces it once it answered; the others as
    // soon as Redis's message reaches them.
    assert!(upgrade_status(&a, &token("troll", 600)).contains("403"));
    eventually_refused(&b, "troll");
    // Kept in Redis: a node started later knows it.
    let c = node(&redis);
    wait_cluster(&c, 1);
    assert!(upgrade_status(&c, &token("troll", 600)).contains("403"));
    // A timed ban made on node b holds on every node.
    let mut root_b = Peer::with_token(&b, &admin, 0, "").await;
    root_b
        .ok(
            "moderation:ban_user",
            json!({"userId": "pest", "durationMs": 60000}),
        )
        .await;
    assert!(upgrade_status(&b, &token("pest", 600)).contains("403"));
    eventually_refused(&a, "pest");
    eventually_refused(&c, "pest");
    drop(c);
    drop(root_b);
    // Every node restarted: the bans are still there.
    drop(a);
    drop(b);
    let a = node(&redis);
    wait_cluster(&a, 1);
    assert!(upgrade_status(&a, &token("troll", 600)).contains("403"));
    assert!(upgrade_status(&a, &token("bob", 600)).contains("101"));
}

#[tokio::test]
async fn direct_messages_and_receipts_reach_devices_on_every_node() {
    let (redis, a, b) = two_nodes();
    let mut alice_a = Peer::on(&a, "alice", 0, "").await;
    let mut alice_b = Peer::on(&b, "alice", 1, "").await;
    let mut bob_b = Peer::on(&b, "bob", 0, "").await;
    let mut bob_a = Peer::on(&a, "bob", 1, "").await;
    // A node follows a user once the user's connection is registered:
    // wait until both nodes follow both users.
    let deadline = Instant::now() + Duration::from_secs(5);
    while redis_numsub(&redis, &["cc:u:{alice}", "cc:u:{bob}"]) != [2, 2] {
        assert!(Instant::now() < deadline, "users not followed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let sent = alice_a
        .ok("dm:send", json!({"toUserId": "bob", "content": "hi bob"}))
        .await;
    let id = sent["messageId"].as_str().unwrap().to_string();
    for bob in [&mut bob_b, &mut bob_a] {
        let m = bob.event("dm:new").await;
        assert_eq!(
            (m["d"]["messageId"].as_str(), m["d"]["content"].as_str()),
            (Some(id.as_str()), Some("hi bob"))
        );
    }
    assert_eq!(
        alice_b.event("dm:sent").await["d"]["messageId"],
        id.as_str()
    );
    // The conversation is listed on every node, from Redis: also on a node
    // where carol had no device when alice wrote to her.
    let convs = bob_b.ok("dm:get_conversations", json!({})).await;
    assert_eq!(convs["conversations"][0]["userId"], "alice", "{convs}");
    assert_eq!(convs["conversations"][0]["unread"], 1, "{convs}");
    alice_a
        .ok("dm:send", json!({"toUserId": "carol", "content": "one"}))
        .await;
    alice_a
        .ok("dm:send", json!({"toUserId": "carol", "content": "two"}))
        .await;
    let mut carol_b = Peer::on(&b, "carol", 0, "").await;
    // Written to Redis right after the sender's ack: wait for it.
    let deadline = Instant::now() + Duration::from_secs(5);
    let convs = loop {
        let convs = carol_b.ok("dm:get_conversations", json!({})).await;
        if convs["conversations"][0]["unread"] == 2 || Instant::now() > deadline {
            break convs;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let c = &convs["conversations"][0];
    assert_eq!(
        (
            c["userId"].as_str(),
            c["unread"].as_u64(),
            c["lastMessage"]["content"].as_str()
        ),
        (Some("alice"), Some(2), Some("two")),
        "{convs}"
    );
    let convs = alice_b.ok("dm:get_conversations", json!({})).await;
    let peers: Vec<&str> = convs["conversations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["userId"].as_str().unwrap())
        .collect();
    assert_eq!(peers, ["carol", "bob"], "latest first: {convs}");
    // Nothing arrives twice on the node that made it.
    let again: Vec<Value> = bob_a.drain().await;
    assert!(again.iter().all(|v| v["t"] != "dm:new"), "{again:?}");
    // A delivery receipt made on node b reaches the author on node a.
    alice_a
        .ok("channel:join", json!({"channelId": "room"}))
        .await;
    bob_b.ok("channel:join", json!({"channelId": "room"})).await;
    let m = alice_a
        .ok(
            "message:send",
            json!({"channelId": "room", "content": "ping"}),
        )
        .await;
    let target = json!({"channelId": "room", "messageId": m["messageId"]});
    bob_b.event("message:new").await;
    bob_b.ok("message:delivered", target).await;
    let d = alice_a.event("message:delivery").await;
    assert_eq!(d["d"]["userId"], "bob");
    // A user gone from a node is no longer followed there.
    drop(bob_a);
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis_numsub(&redis, &["cc:u:{bob}"]) != [1] {
        assert!(Instant::now() < deadline, "bob still followed by node a");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Subscribers per pub/sub channel (`PUBSUB NUMSUB`).
fn redis_numsub(redis: &Redis, channels: &[&str]) -> Vec<u64> {
    let mut s = TcpStream::connect(("127.0.0.1", redis.port)).unwrap();
    let mut cmd = format!(
        "*{}\r\n$6\r\nPUBSUB\r\n$6\r\nNUMSUB\r\n",
        channels.len() + 2
    );
    for c in channels {
        cmd.push_str(&format!("${}\r\n{c}\r\n", c.len()));
    }
    s.write_all(cmd.as_bytes()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = vec![0u8; 4096];
    let mut text = String::new();
    // *2n, then $len name, :count for each channel.
    let counts = |t: &str| t.lines().filter(|l| l.starts_with(':')).count();
    while counts(&text) < channels.len() || !text.ends_with("\r\n") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "redis closed");
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    text.lines()
        .filter_map(|l| l.strip_prefix(':'))
        .map(|n| n.trim().parse().unwrap())
        .collect()
}

#[tokio::test]
async fn the_server_api_of_any_node_publishes_kicks_and_bans_for_the_cluster() {
    const KEY: &str = "api-key-for-the-cluster-0123";
    let redis = Redis::start();
    let a = Server::start(&[
        "--shards",
        "2",
        "--redis",
        &redis.url(),
        "--api-listen",
        "127.0.0.1:0",
        "--api-key",
        KEY,
    ]);
    let b = node(&redis);
    wait_cluster(&a, 1);
    wait_cluster(&b, 1);
    let api = a.api_addr();
    let post = |path: &str, body: Value| {
        let body = body.to_string();
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let mut s = TcpStream::connect(api).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
        let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
        (head.get(9..12).unwrap_or("").to_string(), v)
    };
    // Node a has no member of the channel: its API still publishes there,
    // in the cluster's order.
    let mut bob = Peer::on(&b, "bob", 0, "").await;
    bob.ok("channel:join", json!({"channelId": "news"})).await;
    let (status, v) = post(
        "/api/publish",
        json!({"channelId": "news", "userId": "backend", "content": "from the api"}),
    );
    assert_eq!(status, "200", "{v}");
    assert_eq!(v["offset"], 1, "{v}");
    let m = bob.event("message:new").await;
    assert_eq!(
        (m["d"]["content"].as_str(), m["d"]["offset"].as_u64()),
        (Some("from the api"), Some(1))
    );
    // Node a's API lists the channel's members on every node.
    let get = |path: &str| {
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer {KEY}\r\nConnection: close\r\n\r\n"
        );
        let mut s = TcpStream::connect(api).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let (_, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
        serde_json::from_str::<Value>(body).unwrap_or(Value::Null)
    };
    let v = get("/api/channels/news/members");
    assert_eq!(
        v["members"],
        json!([{"userId": "bob", "connections": 1}]),
        "{v}"
    );
    let v = get("/api/presence?userIds=bob");
    assert_eq!(v["presences"][0]["status"], "online", "{v}");
    // A ban through node a's API closes bob's session on node b.
    let (status, v) = post("/api/ban", json!({"userId": "bob", "reason": "api"}));
    assert_eq!(status, "200", "{v}");
    assert_eq!(recv_close(&mut bob.ws).await.map(u16::from), Some(4004));
}

/// A TCP proxy to Redis that can cut a node off (its connections dropped,
/// new ones closed at once) and let it back.
struct Proxy {
    port: u16,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn start(target: u16) -> Proxy {
        use std::sync::atomic::Ordering::SeqCst;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::<TcpStream>::new()));
        let (o, c) = (open.clone(), conns.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                if !o.load(SeqCst) {
                    continue; // dropped: closed at once
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                let mut held = c.lock().unwrap();
                held.push(client.try_clone().unwrap());
                held.push(server.try_clone().unwrap());
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Proxy { port, open, conns }
    }

    fn cut(&self) {
        self.open.store(false, std::sync::atomic::Ordering::SeqCst);
        for s in self.conns.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    fn restore(&self) {
        self.open.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[tokio::test]
async fn a_node_cut_off_from_redis_gets_what_the_others_said_meanwhile() {
    let redis = Redis::start();
    let proxy = Proxy::start(redis.port);
    let via_proxy = format!("redis://127.0.0.1:{}", proxy.port);
    let a = Server::start(&["--shards", "2", "--redis", &via_proxy]);
    let b = node(&redis);
    wait_cluster(&a, 1);
    wait_cluster(&b, 1);
    let mut alice = Peer::on(&a, "alice", 0, "").await;
    let mut bob = Peer::on(&b, "bob", 1, "").await;
    alice.ok("channel:join", json!({"channelId": "ops"})).await;
    bob.ok("channel:join", json!({"channelId": "ops"})).await;
    bob.ok(
        "message:send",
        json!({"channelId": "ops", "content": "one"}),
    )
    .await;
    assert_eq!(messages(&mut alice, 1).await, [(1, "one".to_string())]);
    // Node a loses Redis; node b carries on.
    proxy.cut();
    wait_cluster(&a, 0);
    for text in ["two", "three"] {
        bob.ok("message:send", json!({"channelId": "ops", "content": text}))
            .await;
    }
    // Node a comes back: alice gets what bob said meanwhile, in order.
    proxy.restore();
    wait_cluster(&a, 1);
    let got = tokio::time::timeout(Duration::from_secs(10), messages(&mut alice, 2))
        .await
        .unwrap_or_else(|_| panic!("alice never got what she missed:\n{}", a.log()));
    assert_eq!(got, [(2, "two".to_string()), (3, "three".to_string())]);
    // And the nodes share one order again.
    alice
        .ok(
            "message:send",
            json!({"channelId": "ops", "content": "four"}),
        )
        .await;
    let m = bob.event_for("message:new", "content", "four").await;
    assert_eq!(m["d"]["offset"], 4);
}

/// A Redis command through `redis-cli` (installed with redis-server).
fn devices(d: &Value) -> Vec<&str> {
    d["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn presence_adds_up_over_nodes_and_a_killed_node_takes_its_users_offline() {
    const TIMEOUT_MS: u64 = 2000;
    let redis = Redis::start();
    let start = || {
        let s = Server::start(&[
            "--shards",
            "2",
            "--redis",
            &redis.url(),
            "--node-timeout-ms",
            &TIMEOUT_MS.to_string(),
            "--presence-grace-ms",
            "300",
        ]);
        wait_cluster(&s, 1);
        s
    };
    let (a, mut b, mut c) = (start(), start(), start());
    // A watcher on node a, subscribed before dana connects anywhere.
    let mut watcher = Peer::on(&a, "watcher", 0, "").await;
    let sub = watcher
        .ok("presence:subscribe", json!({"userIds": ["dana"]}))
        .await;
    assert_eq!(sub["presences"][0]["status"], "offline");
    // Dana on node b (web), then on node c (mobile): one presence.
    let mut web = Peer::on(&b, "dana", 0, "&device=web").await;
    let v = watcher.presence_until(|d| d["status"] == "online").await;
    assert_eq!(devices(&v["d"]), ["web"]);
    let mut mobile = Peer::on(&c, "dana", 1, "&device=mobile").await;
    watcher
        .presence_until(|d| devices(d) == ["mobile", "web"] || devices(d) == ["web", "mobile"])
        .await;
    // The status set last on any node shows, and the most available wins.
    mobile
        .ok("presence:update", json!({"customStatus": "on the train"}))
        .await;
    watcher
        .presence_until(|d| d["customStatus"] == "on the train")
        .await;
    web.ok("presence:update", json!({"status": "dnd"})).await;
    mobile
        .ok("presence:update", json!({"status": "idle"}))
        .await;
    let v = watcher.presence_until(|d| d["status"] == "idle").await;
    assert_eq!(v["d"]["customStatus"], "on the train");
    // A node that never saw dana reads her presence from Redis.
    let mut eve = Peer::on(&b, "eve", 1, "").await;
    let bulk = eve
        .ok("presence:get_bulk", json!({"userIds": ["dana", "nobody"]}))
        .await;
    assert_eq!(bulk["presences"][0]["status"], "idle", "{bulk}");
    assert_eq!(bulk["presences"][0]["customStatus"], "on the train");
    assert_eq!(bulk["presences"][0]["devices"].as_array().unwrap().len(), 2);
    assert_eq!(bulk["presences"][1]["status"], "offline");
    // Web leaves node b: after the grace period only the mobile is left.
    drop(web);
    let v = watcher.presence_until(|d| devices(d) == ["mobile"]).await;
    assert_eq!(v["d"]["status"], "idle");
    // Node c dies without a word: its users go offline everywhere within
    // the node timeout (here 2 s; the test allows for a slow machine).
    let _ = c.child.kill();
    let _ = c.child.wait();
    drop(mobile);
    let offline = tokio::time::timeout(
        Duration::from_millis(TIMEOUT_MS * 5),
        watcher.presence_until(|d| d["status"] == "offline"),
    )
    .await
    .unwrap_or_else(|_| panic!("dana stayed online after her node died:\n{}", a.log()));
    assert!(devices(&offline["d"]).is_empty());
    // The node that found it silent says so (its log may lag a moment
    // behind the event it sent).
    let deadline = Instant::now() + Duration::from_secs(5);
    while !(a.log().contains("a node went silent") || b.log().contains("a node went silent")) {
        assert!(Instant::now() < deadline, "no node said a node went silent");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Redis forgets the dead node and what it showed.
    let deadline = Instant::now() + Duration::from_secs(5);
    while redis_cli(&redis, &["HLEN", "cc:p:{dana}"]) != "0"
        || redis_cli(&redis, &["ZCARD", "{cc}:nodes"]) != "2"
    {
        assert!(
            Instant::now() < deadline,
            "the dead node's presence stayed in Redis"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // A node that stops properly takes its users offline at once.
    let _frank = Peer::on(&b, "frank", 0, "").await;
    // (Written to Redis right after his connection: wait for it.)
    let deadline = Instant::now() + Duration::from_secs(5);
    while redis_cli(&redis, &["HLEN", "cc:p:{frank}"]) != "1" {
        assert!(
            Instant::now() < deadline,
            "frank's presence never reached Redis"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let sub = watcher
        .ok("presence:subscribe", json!({"userIds": ["frank"]}))
        .await;
    assert_eq!(sub["presences"][0]["status"], "online");
    b.sigterm();
    // It leaves before it exits, not a node timeout later: by then Redis
    // no longer counts it among the live nodes nor shows frank on it.
    assert_eq!(b.wait_exit(Duration::from_secs(20)), Some(0), "{}", b.log());
    assert_eq!(redis_cli(&redis, &["ZCARD", "{cc}:nodes"]), "1");
    assert_eq!(redis_cli(&redis, &["HLEN", "cc:p:{frank}"]), "0");
    // And the other nodes hear it (the bound allows for a loaded machine).
    tokio::time::timeout(
        Duration::from_millis(TIMEOUT_MS * 5),
        watcher.presence_until(|d| d["userId"] == "frank" && d["status"] == "offline"),
    )
    .await
    .unwrap_or_else(|_| panic!("frank stayed online after his node stopped:\n{}", b.log()));
}

#[tokio::test]
async fn on_a_redis_cluster_channels_and_users_use_sharded_pub_sub() {
    let rc = RedisCluster::start();
    let start = || {
        let s = Server::start(&["--shards", "2", "--redis-cluster", &rc.urls()]);
        wait_cluster(&s, 1);
        s
    };
    let (a, b) = (start(), start());
    let mut alice = Peer::on(&a, "alice", 0, "").await;
    let mut bob = Peer::on(&b, "bob", 1, "").await;
    // Channels spread over the masters' slots: each one ordered by the
    // master that owns it, and delivered through sharded pub/sub.
    let channels: Vec<String> = (0..6).map(|i| format!("room-{i}")).collect();
    let mut epochs = Vec::new();
    for ch in &channels {
        let j = alice.ok("channel:join", json!({"channelId": ch})).await;
        epochs.push(j["epoch"].as_str().unwrap().to_string());
        bob.ok("channel:join", json!({"channelId": ch})).await;
    }
    let mut owners = std::collections::HashSet::new();
    for ch in &channels {
        let subs = rc.shard_subscribers(&format!("cc:{{{ch}}}"));
        assert_eq!(subs.iter().sum::<u64>(), 2, "{ch}: {subs:?}");
        owners.insert(subs.iter().position(|n| *n == 2).unwrap());
        let classic = redis_cli(
            &rc.masters[0],
            &["PUBSUB", "NUMSUB", &format!("cc:{{{ch}}}")],
        );
        assert_eq!(classic.lines().nth(1), Some("0"), "not classic pub/sub");
    }
    assert!(owners.len() > 1, "the channels all landed on one master");
    const N: usize = 10;
    for i in 0..N {
        for ch in &channels {
            alice
                .send(json!({"t": "message:send", "d": {"channelId": ch, "content": format!("a{i}")}}))
                .await;
            bob.send(
                json!({"t": "message:send", "d": {"channelId": ch, "content": format!("b{i}")}}),
            )
            .await;
        }
    }
    // Per channel: both nodes see the same order, offsets 1..=2N.
    let mut seen_a: std::collections::HashMap<String, Vec<(u64, String)>> = Default::default();
    let mut seen_b = seen_a.clone();
    for (p, seen) in [(&mut alice, &mut seen_a), (&mut bob, &mut seen_b)] {
        while seen.values().map(Vec::len).sum::<usize>() < 2 * N * channels.len() {
            let v = match p.inbox.pop_front() {
                Some(v) => v,
                None => recv(&mut p.ws).await,
            };
            if v["t"] == "message:new" {
                seen.entry(v["d"]["channelId"].as_str().unwrap().to_string())
                    .or_default()
                    .push((
                        v["d"]["offset"].as_u64().unwrap(),
                        v["d"]["content"].as_str().unwrap().to_string(),
                    ));
            }
        }
    }
    for ch in &channels {
        assert_eq!(seen_a[ch], seen_b[ch], "{ch}: one order on both nodes");
        let offsets: Vec<u64> = seen_a[ch].iter().map(|m| m.0).collect();
        assert_eq!(offsets, (1..=2 * N as u64).collect::<Vec<_>>());
    }
    // History and recovery on the other node, from the channel's master.
    drop(alice);
    let mut again = Peer::on(&b, "alice", 0, "").await;
    let j = again
        .ok(
            "channel:join",
            json!({"channelId": "room-3", "since": {"offset": 15, "epoch": epochs[3]}}),
        )
        .await;
    assert_eq!(j["recovered"], true, "{j}");
    assert_eq!(messages(&mut again, 5).await, seen_a["room-3"][15..]);
    // Users: a direct message and presence cross nodes on the users'
    // sharded channels.
    let mut carol = Peer::on(&a, "carol", 1, "").await;
    let sub = carol
        .ok("presence:subscribe", json!({"userIds": ["bob"]}))
        .await;
    assert_eq!(sub["presences"][0]["status"], "online");
    again
        .ok("dm:send", json!({"toUserId": "carol", "content": "psst"}))
        .await;
    assert_eq!(carol.event("dm:new").await["d"]["content"], "psst");
    assert_eq!(rc.shard_subscribers("cc:u:{bob}").iter().sum::<u64>(), 2);
    drop(bob);
    let v = tokio::time::timeout(
        Duration::from_secs(10),
        carol.presence_until(|d| d["userId"] == "bob" && d["status"] == "offline"),
    )
    .await
    .unwrap_or_else(|_| panic!("bob stayed online:\n{}", b.log()));
    assert!(devices(&v["d"]).is_empty());
    // A kick made on node a reaches alice on node b.
    use corecast::auth::Claims;
    let admin = token_with(
        &Claims::new("root", exp_in(600))
            .channels(["*"])
            .roles(["admin"]),
    );
    let mut root = Peer::with_token(&a, &admin, 0, "").await;
    root.ok(
        "moderation:kick_user",
        json!({"userId": "alice", "channelId": "room-3"}),
    )
    .await;
    assert_eq!(again.event("moderation:kicked").await["d"]["by"], "root");
    assert_eq!(a.metric("corecast_cluster_gaps_total"), 0);
    assert_eq!(b.metric("corecast_cluster_failed_total"), 0);
}

#[tokio::test]
async fn notifications_reach_every_node_and_wait_in_redis_for_a_user_away() {
    let (redis, a, b) = two_nodes();
    let mut alice = Peer::on(&a, "alice", 0, "").await;
    alice.ok("channel:join", json!({"channelId": "team"})).await;
    // Bob is connected to node b only: a mention made on node a reaches him.
    let mut bob = Peer::on(&b, "bob", 1, "").await;
    alice
        .ok("message:send", json!({"channelId": "team", "content": "@bob @carol look", "mentions": ["bob", "carol"]}))
        .await;
    let n = bob.event("notification:new").await;
    assert_eq!(n["d"]["kind"], "mention");
    assert_eq!(n["d"]["data"]["fromUserId"], "alice");
    // Carol is connected nowhere: Redis keeps hers, and the node she
    // connects to later gives it to her.
    assert_eq!(redis_cli(&redis, &["HLEN", "cc:n:{carol}"]), "1");
    let mut carol_b = Peer::on(&b, "carol", 0, "").await;
    let n = tokio::time::timeout(Duration::from_secs(5), carol_b.event("notification:new"))
        .await
        .unwrap_or_else(|_| panic!("no notification for carol:\n{}", b.log()));
    let nid = n["d"]["notificationId"].as_str().unwrap().to_string();
    assert_eq!(n["d"]["data"]["channelId"], "team");
    // Read on node b: her device on node a sees it read, with nothing
    // pending to deliver.
    carol_b
        .ok("notification:read", json!({"notificationIds": [nid]}))
        .await;
    let mut carol_a = Peer::on(&a, "carol", 1, "").await;
    let pending = carol_a.ok("notification:get_pending", json!({})).await;
    assert_eq!(pending["notifications"][0]["read"], true, "{pending}");
    assert!(carol_a
        .drain()
        .await
        .iter()
        .all(|v| v["t"] != "notification:new"));
    // A new one reaches both of her devices, one on each node: a
    // reference and an excerpt of a long message, in Redis too.
    let long = format!("@carol again {}", "z".repeat(3900));
    alice
        .ok(
            "message:send",
            json!({"channelId": "team", "content": long, "mentions": ["carol"]}),
        )
        .await;
    for p in [&mut carol_a, &mut carol_b] {
        let n = p.event("notification:new").await;
        let excerpt = n["d"]["data"]["excerpt"].as_str().unwrap();
        assert!(excerpt.starts_with("@carol again"), "{n}");
        assert_eq!(excerpt.chars().count(), 101);
        assert!(n["d"]["data"].get("content").is_none());
    }
    let kept = redis_cli(&redis, &["HVALS", "cc:n:{carol}"]);
    assert!(
        kept.len() < 1500,
        "Redis keeps {} bytes for carol",
        kept.len()
    );
    // A member of the channel through another node is not notified of a
    // mention; a user who is no member anywhere is.
    let mut dave = Peer::on(&b, "dave", 0, "").await;
    dave.ok("channel:join", json!({"channelId": "team"})).await;
    alice
        .ok(
            "message:send",
            json!({"channelId": "team", "content": "@dave @bob", "mentions": ["dave", "bob"]}),
        )
        .await;
    let n = bob.event("notification:new").await;
    assert_eq!(n["d"]["data"]["excerpt"], "@dave @bob");
    let pending = dave.ok("notification:get_pending", json!({})).await;
    assert_eq!(pending["notifications"], json!([]), "{pending}");
    assert_eq!(redis_cli(&redis, &["EXISTS", "cc:n:{dave}"]), "0");
    // Cleared on node a: gone on node b and in Redis.
    carol_a.ok("notification:clear_all", json!({})).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let pending = carol_b.ok("notification:get_pending", json!({})).await;
        if pending["notifications"] == json!([]) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still pending on node b: {pending}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(redis_cli(&redis, &["EXISTS", "cc:n:{carol}"]), "0");
}

#[tokio::test]
async fn calls_ring_answer_and_signal_across_nodes() {
    let (_redis, a, b) = two_nodes();
    let mut alice = Peer::on(&a, "alice", 0, "").await;
    // Bob on both nodes; Carol on node b only.
    let mut bob_a = Peer::on(&a, "bob", 1, "&device=desktop").await;
    let mut bob_b = Peer::on(&b, "bob", 0, "&device=mobile").await;
    let mut carol = Peer::on(&b, "carol", 1, "").await;
    // Rings on every node; the device on node b answers.
    let c = alice
        .ok(
            "call:initiate",
            json!({"toUserId": "bob", "callType": "video", "sdp": "v=0 offer"}),
        )
        .await;
    let call = c["callId"].as_str().unwrap().to_string();
    for p in [&mut bob_a, &mut bob_b] {
        let inc = p.event_for("call:incoming", "callId", &call).await;
        assert_eq!(inc["d"]["sdp"], "v=0 offer");
        assert_eq!(inc["d"]["fromUserId"], "alice");
    }
    bob_b
        .ok("call:answer", json!({"callId": call, "sdp": "v=0 answer"}))
        .await;
    assert_eq!(alice.event("call:answered").await["d"]["sdp"], "v=0 answer");
    let ended = bob_a.event_for("call:ended", "callId", &call).await;
    assert_eq!(ended["d"]["reason"], "answered_elsewhere");
    assert_eq!(
        bob_a.refused("call:answer", json!({"callId": call})).await,
        "bad_request"
    );
    // Candidates travel between the parties, whichever node they are on.
    let cand = json!({"candidate": "candidate:1 1 UDP 2122252543 10.0.0.2 50000 typ host", "sdpMLineIndex": 0});
    alice
        .ok(
            "call:ice_candidate",
            json!({"callId": call, "candidate": cand}),
        )
        .await;
    assert_eq!(
        bob_b.event("call:ice_candidate").await["d"]["candidate"],
        cand
    );
    bob_b
        .ok(
            "call:ice_candidate",
            json!({"callId": call, "candidate": {"x": 1}}),
        )
        .await;
    let ice = alice.event("call:ice_candidate").await;
    assert_eq!(
        (
            ice["d"]["fromUserId"].as_str(),
            ice["d"]["candidate"]["x"].as_u64()
        ),
        (Some("bob"), Some(1))
    );
    // The answering device did not hear "answered elsewhere".
    assert!(bob_b.drain().await.iter().all(|v| v["t"] != "call:ended"));
    // The callee hangs up on node b.
    bob_b.ok("call:end", json!({"callId": call})).await;
    assert_eq!(alice.event("call:ended").await["d"]["reason"], "ended");
    assert_eq!(
        bob_b.refused("call:end", json!({"callId": call})).await,
        "not_found"
    );
    // A callee connected to another node only: rejected there.
    let c = alice
        .ok("call:initiate", json!({"toUserId": "carol"}))
        .await;
    let call = c["callId"].as_str().unwrap().to_string();
    carol.event_for("call:incoming", "callId", &call).await;
    carol
        .ok("call:reject", json!({"callId": call, "reason": "busy"}))
        .await;
    assert_eq!(alice.event("call:rejected").await["d"]["reason"], "busy");
    // Answered on node b, then that connection drops: the caller hears so.
    let c = alice
        .ok("call:initiate", json!({"toUserId": "carol"}))
        .await;
    let call = c["callId"].as_str().unwrap().to_string();
    carol.event_for("call:incoming", "callId", &call).await;
    carol.ok("call:answer", json!({"callId": call})).await;
    alice.event("call:answered").await;
    drop(carol);
    let ended = alice.event_for("call:ended", "callId", &call).await;
    assert_eq!(ended["d"]["reason"], "disconnected");
    // Invisible on node b only: others see her offline, a call reaches her.
    let mut erin = Peer::on(&b, "erin", 0, "").await;
    erin.ok("presence:update", json!({"status": "invisible"}))
        .await;
    // (Written to Redis right after her ack: wait for it.)
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let seen = alice
            .ok("presence:get_bulk", json!({"userIds": ["erin"]}))
            .await;
        if seen["presences"][0]["status"] == "offline" {
            break;
        }
        assert!(Instant::now() < deadline, "erin still shown: {seen}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let c = alice.ok("call:initiate", json!({"toUserId": "erin"})).await;
    let call = c["callId"].as_str().unwrap().to_string();
    erin.event_for("call:incoming", "callId", &call).await;
    erin.ok("call:reject", json!({"callId": call})).await;
    alice.event("call:rejected").await;
    // Nobody anywhere: missed at once.
    alice.ok("call:initiate", json!({"toUserId": "dave"})).await;
    assert_eq!(alice.event("call:missed").await["d"]["reason"], "offline");
}

#[tokio::test]
async fn members_typing_and_voice_participants_add_up_over_nodes() {
    let (_redis, a, b) = two_nodes();
    let mut alice = Peer::on(&a, "alice", 0, "").await;
    let mut bob = Peer::on(&b, "bob", 1, "").await;
    let mut bob2 = Peer::on(&a, "bob", 1, "").await;
    for p in [&mut alice, &mut bob, &mut bob2] {
        p.ok("channel:join", json!({"channelId": "general"})).await;
    }
    let m = alice
        .ok("channel:get_members", json!({"channelId": "general"}))
        .await;
    assert_eq!(
        m["members"],
        json!([{"userId": "alice", "connections": 1}, {"userId": "bob", "connections": 2}])
    );
    bob.ok("typing:start", json!({"channelId": "general"}))
        .await;
    alice.event("typing:user_start").await;
    let t = alice
        .ok("typing:get_active", json!({"channelId": "general"}))
        .await;
    assert_eq!(t["userIds"], json!(["bob"]));
    // A voice channel with a participant on node b only (node b follows
    // the new channel right after the join).
    bob.ok("voice:join", json!({"channelId": "lounge"})).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let v = loop {
        let v = alice
            .ok("voice:get_participants", json!({"channelId": "lounge"}))
            .await;
        if v["participants"] != json!([]) || Instant::now() > deadline {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(v["participants"][0]["userId"], "bob", "{v}");
    assert_eq!(v["participants"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn a_session_dropped_on_one_node_resumes_on_the_other_once() {
    let (_redis, a, b) = two_nodes();
    let mut alice = Peer::on(&a, "alice", 0, "").await;
    let mut bob = Peer::on(&b, "bob", 1, "").await;
    alice.ok("channel:join", json!({"channelId": "news"})).await;
    bob.ok("channel:join", json!({"channelId": "news"})).await;
    bob.ok(
        "message:send",
        json!({"channelId": "news", "content": "m1"}),
    )
    .await;
    assert_eq!(messages(&mut alice, 1).await, [(1, "m1".to_string())]);
    let session = alice.session();
    // Her connection drops; the load balancer sends her back to node b.
    drop(alice);
    for i in 2..=3 {
        bob.ok(
            "message:send",
            json!({"channelId": "news", "content": format!("m{i}")}),
        )
        .await;
    }
    let resume = json!({"sessionId": session, "positions": []});
    let mut again = Peer::on(&b, "alice", 0, "").await;
    // (The drop reaches node a's home and Redis right after the close.)
    let deadline = Instant::now() + Duration::from_secs(5);
    let r = loop {
        let v = again.request("session:resume", resume.clone()).await;
        if v["t"] == "ack" || Instant::now() > deadline {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(r["t"], "ack", "{r}");
    assert_eq!(r["d"]["channels"][0]["channelId"], "news", "{r}");
    assert_eq!(r["d"]["channels"][0]["recovered"], true, "{r}");
    assert_eq!(
        messages(&mut again, 2).await,
        [(2, "m2".to_string()), (3, "m3".to_string())]
    );
    bob.ok(
        "message:send",
        json!({"channelId": "news", "content": "m4"}),
    )
    .await;
    assert_eq!(messages(&mut again, 1).await, [(4, "m4".to_string())]);
    // Once: neither node resumes it again.
    for s in [&a, &b] {
        let mut third = Peer::on(s, "alice", 1, "").await;
        assert_eq!(
            third.refused("session:resume", resume.clone()).await,
            "not_found"
        );
    }
}

#[tokio::test]
async fn a_join_ack_counts_the_members_of_every_node() {
    let (redis, a, b) = two_nodes();
    let mut alice = Peer::on(&a, "alice", 0, "").await;
    let mut bob = Peer::on(&b, "bob", 1, "").await;
    let mut carol = Peer::on(&a, "carol", 1, "").await;
    let j = alice.ok("channel:join", json!({"channelId": "room"})).await;
    assert_eq!(j["members"], 1);
    // Node a's count reaches Redis in its bridge's next round (a join ack
    // does not wait for Redis).
    let deadline = Instant::now() + Duration::from_secs(5);
    while redis_cli(&redis, &["HLEN", "cc:{room}:members"]) != "1" {
        assert!(
            Instant::now() < deadline,
            "node a's count never reached Redis"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let j = bob.ok("channel:join", json!({"channelId": "room"})).await;
    assert_eq!(j["members"], 2, "{j}");
    // Node b's count reaches node a through Redis right after bob's join.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let j = carol.ok("channel:join", json!({"channelId": "room"})).await;
        if j["members"] == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node b's member never counted: {j}"
        );
        carol
            .ok("channel:leave", json!({"channelId": "room"}))
            .await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        redis_cli(&redis, &["HLEN", "cc:{room}:members"]),
        "2",
        "one field per node"
    );
    // Everyone leaves: Redis keeps no count.
    for p in [&mut alice, &mut bob, &mut carol] {
        p.ok("channel:leave", json!({"channelId": "room"})).await;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while redis_cli(&redis, &["EXISTS", "cc:{room}:members"]) != "0" {
        assert!(Instant::now() < deadline, "counts left in Redis");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn read_receipts_and_one_voice_channel_hold_across_nodes() {
    let (_redis, a, b) = two_nodes();
    let mut alice = Peer::on(&a, "alice", 0, "").await;
    let mut bob = Peer::on(&b, "bob", 1, "").await;
    let mut dora = Peer::on(&b, "dora", 0, "").await;
    for p in [&mut alice, &mut bob, &mut dora] {
        p.ok("channel:join", json!({"channelId": "room"})).await;
    }
    let sent = alice
        .ok(
            "message:send",
            json!({"channelId": "room", "content": "read me"}),
        )
        .await;
    let id = sent["messageId"].as_str().unwrap().to_string();
    for p in [&mut bob, &mut dora] {
        p.event("message:new").await;
        p.ok(
            "message:mark_read",
            json!({"channelId": "room", "messageId": id}),
        )
        .await;
    }
    let r = alice
        .ok(
            "message:get_read_receipts",
            json!({"channelId": "room", "messageId": id}),
        )
        .await;
    let mut readers: Vec<&str> = r["readers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["userId"].as_str().unwrap())
        .collect();
    readers.sort();
    assert_eq!(readers, ["bob", "dora"], "{r}");
    // Bob in a voice channel on node b, then in another on node a: out of
    // the first.
    let mut bob_a = Peer::on(&a, "bob", 1, "").await;
    bob.ok("voice:join", json!({"channelId": "lounge"})).await;
    // Later by the nodes' clocks, whatever a busy machine does to them
    // (joins a few milliseconds apart are concurrent: either may win).
    tokio::time::sleep(Duration::from_millis(100)).await;
    bob_a.ok("voice:join", json!({"channelId": "den"})).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let v = alice
            .ok("voice:get_participants", json!({"channelId": "lounge"}))
            .await;
        if v["participants"] == json!([]) {
            break;
        }
        assert!(Instant::now() < deadline, "bob still in lounge: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let v = alice
        .ok("voice:get_participants", json!({"channelId": "den"}))
        .await;
    assert_eq!(v["participants"][0]["userId"], "bob", "{v}");
    assert_eq!(bob.refused("voice:leave", json!({})).await, "not_found");
}

#[tokio::test]
async fn members_hear_of_a_kick_once_whichever_nodes_hold_the_user() {
    use corecast::auth::Claims;
    let (_redis, a, b) = two_nodes();
    let admin = token_with(
        &Claims::new("root", exp_in(600))
            .channels(["*"])
            .roles(["admin"]),
    );
    let mut root = Peer::with_token(&a, &admin, 0, "").await;
    let mut troll_a = Peer::on(&a, "troll", 1, "").await;
    let mut troll_b = Peer::on(&b, "troll", 0, "").await;
    let mut wa = Peer::on(&a, "wendy", 0, "").await;
    let mut wb = Peer::on(&b, "walt", 1, "").await;
    for p in [&mut troll_a, &mut troll_b, &mut wa, &mut wb] {
        p.ok("channel:join", json!({"channelId": "room"})).await;
    }
    root.ok(
        "moderation:kick_user",
        json!({"userId": "troll", "channelId": "room"}),
    )
    .await;
    // Then a marker: everything about the kick came before it.
    for p in [&mut troll_a, &mut troll_b] {
        p.event("moderation:kicked").await;
    }
    wa.ok(
        "message:send",
        json!({"channelId": "room", "content": "marker"}),
    )
    .await;
    // (A second copy relayed late would come within moments.)
    tokio::time::sleep(Duration::from_millis(300)).await;
    for p in [&mut wa, &mut wb] {
        let mut events = p.events_until("message:new").await;
        events.extend(p.drain().await);
        let kicks = events
            .iter()
            .filter(|v| v["t"] == "moderation:user_kicked")
            .count();
        assert_eq!(kicks, 1, "{events:?}");
    }
}

#[tokio::test]
async fn a_reconnect_storm_joins_everyone_without_a_redis_round_trip_on_the_way() {
    // 10 rooms followed by both nodes, then Redis paused: a storm of
    // clients, each its own user, connects, authenticates and joins while
    // Redis answers nothing. Every one is joined (nothing on the way waited
    // for Redis); once Redis runs again, what the storm needs of it goes in
    // a few rounds, not one per connection, and every user is online on
    // both nodes.
    const N: usize = 300;
    const ROOMS: usize = 10;
    let (redis, a, b) = two_nodes();
    let mut anchors = Vec::new();
    for (k, s) in [(0, &a), (1, &b)] {
        for r in 0..ROOMS {
            let mut p = Peer::on(s, &format!("anchor{k}-{r}"), 0, "").await;
            p.ok("channel:join", json!({"channelId": format!("room{r}")}))
                .await;
            anchors.push(p);
        }
    }
    let rounds =
        || a.metric("corecast_cluster_rounds_total") + b.metric("corecast_cluster_rounds_total");
    let ops = || a.metric("corecast_cluster_ops_total") + b.metric("corecast_cluster_ops_total");
    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill")
            .args([sig, &redis.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    };
    signal("-STOP");
    let (rounds_before, ops_before) = (rounds(), ops());
    let clients = futures_util::future::join_all((0..N).map(|i| {
        let server = if i % 2 == 0 { &a } else { &b };
        async move {
            let (mut ws, _) = ws_user(server, &format!("storm{i}")).await;
            let ack = join(&mut ws, &format!("room{}", i % ROOMS), 1).await;
            (ws, ack)
        }
    }))
    .await;
    let joined = clients.iter().filter(|(_, ack)| ack["t"] == "ack").count();
    assert_eq!(joined, N, "every client joined while Redis was paused");
    // With Redis paused at most one round per node is in flight.
    assert!(
        rounds() - rounds_before <= 2,
        "{} rounds",
        rounds() - rounds_before
    );
    signal("-CONT");
    let deadline = Instant::now() + Duration::from_secs(20);
    let online = |v: &Value| {
        v["presences"]
            .as_array()
            .map_or(0, |a| a.iter().filter(|p| p["status"] == "online").count())
    };
    // Each node sees the users connected to the other one online.
    let (on_a, on_b) = anchors.split_at_mut(ROOMS);
    for (k, watcher) in [(0usize, &mut on_a[0]), (1, &mut on_b[0])] {
        let others: Vec<String> = (0..N)
            .filter(|i| i % 2 != k)
            .map(|i| format!("storm{i}"))
            .collect();
        loop {
            let v = watcher
                .ok("presence:get_bulk", json!({"userIds": others}))
                .await;
            if online(&v) == others.len() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node {k} sees {} of {} online",
                online(&v),
                others.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let (r, o) = (rounds() - rounds_before, ops() - ops_before);
    eprintln!("{N} connections: {r} rounds to Redis, {o} operations");
    assert!(
        r * 10 < N as u64,
        "{r} rounds to Redis for {N} connections ({o} operations)"
    );
    drop(clients);
}
