//! Abuse over real sockets: forged and expired tokens, channels and users
//! not granted, kicks and bans across shards, bans across a restart.

use crate::common::*;
use corecast::auth::Claims;
use serde_json::{json, Value};

fn two_shards(extra: &[&str]) -> Server {
    let mut args = vec!["--shards", "2"];
    args.extend_from_slice(extra);
    Server::start(&args)
}

/// The status line of an upgrade request carrying `token`.
fn upgrade_status(s: &Server, token: &str) -> String {
    let (r, _) = http_head(
        s.addr,
        upgrade_request(&format!("/ws?token={token}"), "").as_bytes(),
    );
    r.lines().next().unwrap_or_default().to_string()
}

fn base64url(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

#[test]
fn forged_expired_unsigned_and_misused_tokens_are_refused() {
    let s = Server::start(&["--shards", "1"]);
    assert!(upgrade_status(&s, &token("alice", 600)).contains("101"));
    let other_key = {
        let cfg = corecast::config::AuthConfig {
            secret: Some("a-different-secret-of-some-length".into()),
            ..Default::default()
        };
        corecast::auth::mint(&cfg, "alice", 600, None, exp_in(0)).unwrap()
    };
    let expired = token("alice", -120);
    let claims = json!({"sub": "alice", "exp": exp_in(600), "channels": ["*"]});
    let alg_none = format!(
        "{}.{}.",
        base64url(br#"{"alg":"none","typ":"JWT"}"#),
        base64url(claims.to_string().as_bytes())
    );
    // HS384 with the right secret: the algorithm is pinned to HS256.
    let hs384 = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS384),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let subscription = token_with(&Claims::subscription("alice", "general", exp_in(600)));
    let no_sub = token_with(&Claims::new("", exp_in(600)));
    for (what, t) in [
        ("another key", other_key.as_str()),
        ("expired", expired.as_str()),
        ("alg none", alg_none.as_str()),
        ("HS384", hs384.as_str()),
        ("a subscription token", subscription.as_str()),
        ("an empty sub", no_sub.as_str()),
        ("garbage", "not-a-jwt"),
    ] {
        let status = upgrade_status(&s, t);
        assert!(status.contains("401"), "{what}: {status}");
    }
    // The same through an `auth` message: an error, then close 4001.
    let mut raw = Raw::connect(s.addr, "/ws", "");
    raw.json(json!({"t": "auth", "id": 1, "d": {"token": alg_none}}));
    let v = raw.recv_json();
    assert_eq!(
        (v["t"].as_str(), v["d"]["code"].as_str()),
        (Some("error"), Some("unauthorized"))
    );
    assert_eq!(raw.recv_close(), Some(4001));
    assert!(s.metric("corecast_auth_failures_total") >= 8);
}

/// Every client event that names a channel, aimed at `channel`.
fn channel_events(channel: &str) -> Vec<(&'static str, Value)> {
    let c = channel;
    vec![
        ("channel:join", json!({"channelId": c})),
        ("channel:get_history", json!({"channelId": c})),
        ("channel:get_members", json!({"channelId": c})),
        ("message:send", json!({"channelId": c, "content": "psst"})),
        (
            "message:edit",
            json!({"channelId": c, "messageId": "m", "content": "x"}),
        ),
        ("message:delete", json!({"channelId": c, "messageId": "m"})),
        (
            "message:react",
            json!({"channelId": c, "messageId": "m", "emoji": "👍"}),
        ),
        (
            "message:delivered",
            json!({"channelId": c, "messageId": "m"}),
        ),
        (
            "message:mark_read",
            json!({"channelId": c, "messageId": "m"}),
        ),
        (
            "message:get_read_receipts",
            json!({"channelId": c, "messageId": "m"}),
        ),
        ("typing:start", json!({"channelId": c})),
        ("typing:stop", json!({"channelId": c})),
        ("typing:get_active", json!({"channelId": c})),
        ("voice:join", json!({"channelId": c})),
        ("voice:get_participants", json!({"channelId": c})),
        (
            "moderation:kick_user",
            json!({"userId": "bob", "channelId": c}),
        ),
        (
            "moderation:ban_user",
            json!({"userId": "bob", "channelId": c}),
        ),
    ]
}

#[tokio::test]
async fn nothing_reaches_a_channel_or_a_user_that_was_not_granted() {
    let s = two_shards(&[]);
    let limited = token_with(
        &Claims::new("alice", exp_in(600))
            .channels(["public-*"])
            .users(["support"]),
    );
    let mut alice = Peer::with_token(&s, &limited, 0, "").await;
    let mut bob = Peer::on(&s, "bob", 1, "").await;
    let mut support = Peer::on(&s, "support", 1, "").await;
    bob.ok("channel:join", json!({"channelId": "secret"})).await;
    bob.ok("voice:join", json!({"channelId": "secret"})).await;
    alice
        .ok("channel:join", json!({"channelId": "public-1"}))
        .await;
    for (t, d) in channel_events("secret") {
        assert_eq!(alice.refused(t, d.clone()).await, "forbidden", "{t} {d}");
    }
    // Users: direct messages and calls only to those granted.
    for (t, d) in [
        ("dm:send", json!({"toUserId": "bob", "content": "hi"})),
        (
            "call:initiate",
            json!({"toUserId": "bob", "callType": "audio"}),
        ),
    ] {
        assert_eq!(alice.refused(t, d.clone()).await, "forbidden", "{t} {d}");
    }
    alice
        .ok("dm:send", json!({"toUserId": "support", "content": "help"}))
        .await;
    assert_eq!(support.event("dm:new").await["d"]["content"], "help");
    // Signaling on a call that is not one's own goes nowhere.
    assert_eq!(
        alice
            .refused(
                "call:ice_candidate",
                json!({"callId": "0001000000000001", "candidate": {"c": 1}})
            )
            .await,
        "not_found"
    );
    // Bob saw none of it: no event of alice's at all.
    let seen = bob.drain().await;
    assert!(
        seen.iter().all(|v| !v.to_string().contains("alice")),
        "{seen:?}"
    );
    // A subscription token from the backend opens the channel, for this
    // user only.
    let for_bob = token_with(&Claims::subscription("bob", "secret", exp_in(60)));
    let code = alice
        .refused(
            "channel:join",
            json!({"channelId": "secret", "token": for_bob}),
        )
        .await;
    assert_eq!(code, "forbidden");
    let for_alice = token_with(&Claims::subscription("alice", "secret", exp_in(60)));
    alice
        .ok(
            "channel:join",
            json!({"channelId": "secret", "token": for_alice}),
        )
        .await;
    alice
        .ok(
            "message:send",
            json!({"channelId": "secret", "content": "hello"}),
        )
        .await;
    assert_eq!(bob.event("message:new").await["d"]["content"], "hello");
}

#[tokio::test]
async fn kicks_and_bans_reach_every_connection_across_shards() {
    let s = two_shards(&[]);
    let moderator = token_with(
        &Claims::new("mod", exp_in(600))
            .channels(["*"])
            .roles(["moderator"]),
    );
    let admin = token_with(
        &Claims::new("root", exp_in(600))
            .channels(["*"])
            .roles(["admin"]),
    );
    let mut m = Peer::with_token(&s, &moderator, 0, "").await;
    let mut root = Peer::with_token(&s, &admin, 1, "").await;
    let mut t0 = Peer::on(&s, "troll", 0, "").await;
    let mut t1 = Peer::on(&s, "troll", 1, "").await;
    let mut bob = Peer::on(&s, "bob", 1, "").await;
    for p in [&mut m, &mut t0, &mut t1, &mut bob] {
        p.ok("channel:join", json!({"channelId": "general"})).await;
    }
    // Users without the role cannot.
    assert_eq!(
        bob.refused(
            "moderation:kick_user",
            json!({"userId": "troll", "channelId": "general"})
        )
        .await,
        "forbidden"
    );
    assert_eq!(
        m.refused("moderation:ban_user", json!({"userId": "troll"}))
            .await,
        "forbidden",
        "server-wide needs admin"
    );
    // A kick from the channel: both connections are taken out, the
    // channel is told once.
    m.ok(
        "moderation:kick_user",
        json!({"userId": "troll", "channelId": "general", "reason": "spam"}),
    )
    .await;
    for t in [&mut t0, &mut t1] {
        let k = t.event("moderation:kicked").await;
        assert_eq!(k["d"]["channelId"], "general");
        assert_eq!(k["d"]["by"], "mod");
        assert_eq!(k["d"]["reason"], "spam");
    }
    let told = bob.event("moderation:user_kicked").await;
    assert_eq!(told["d"]["userId"], "troll");
    m.ok(
        "message:send",
        json!({"channelId": "general", "content": "after"}),
    )
    .await;
    assert_eq!(bob.event("message:new").await["d"]["content"], "after");
    for t in [&mut t0, &mut t1] {
        let seen = t.drain().await;
        assert!(seen.iter().all(|v| v["t"] != "message:new"), "{seen:?}");
    }
    // A channel ban keeps it out.
    m.ok(
        "moderation:ban_user",
        json!({"userId": "troll", "channelId": "general", "durationMs": 600000}),
    )
    .await;
    assert_eq!(
        t1.refused("channel:join", json!({"channelId": "general"}))
            .await,
        "forbidden"
    );
    assert_eq!(
        bob.event("moderation:user_banned").await["d"]["userId"],
        "troll"
    );
    // A server ban closes every connection with 4004 and refuses new ones.
    root.ok(
        "moderation:ban_user",
        json!({"userId": "troll", "reason": "abuse"}),
    )
    .await;
    for t in [&mut t0, &mut t1] {
        let b = t.event("moderation:banned").await;
        assert_eq!(
            (b["d"]["by"].as_str(), b["d"]["reason"].as_str()),
            (Some("root"), Some("abuse"))
        );
        assert_eq!(recv_close(&mut t.ws).await.map(u16::from), Some(4004));
    }
    let status = upgrade_status(&s, &token("troll", 600));
    assert!(status.contains("403"), "{status}");
    let mut raw = Raw::connect(s.addr, "/ws", "");
    raw.json(json!({"t": "auth", "id": 1, "d": {"token": token("troll", 600)}}));
    let v = raw.recv_json();
    assert_eq!(v["d"]["code"], "forbidden", "{v}");
    assert!(v["d"]["message"].as_str().unwrap().contains("abuse"), "{v}");
    assert_eq!(raw.recv_close(), Some(4004));
    // Bob and the channel carry on.
    m.ok(
        "message:send",
        json!({"channelId": "general", "content": "still here"}),
    )
    .await;
    assert_eq!(bob.event("message:new").await["d"]["content"], "still here");
}

#[tokio::test]
async fn bans_survive_a_restart() {
    let dir = std::env::temp_dir().join(format!("corecast-safety-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bans.jsonl");
    let file = file.to_str().unwrap();
    let admin = token_with(
        &Claims::new("root", exp_in(600))
            .channels(["*"])
            .roles(["admin"]),
    );
    {
        let s = two_shards(&["--ban-file", file]);
        let mut root = Peer::with_token(&s, &admin, 0, "").await;
        root.ok("moderation:ban_user", json!({"userId": "troll"}))
            .await;
        root.ok(
            "moderation:ban_user",
            json!({"userId": "pest", "channelId": "general"}),
        )
        .await;
        root.ok(
            "moderation:ban_user",
            json!({"userId": "brief", "durationMs": 1}),
        )
        .await;
    }
    let s = two_shards(&["--ban-file", file]);
    assert!(upgrade_status(&s, &token("troll", 600)).contains("403"));
    assert!(upgrade_status(&s, &token("brief", 600)).contains("101"));
    let mut pest = Peer::on(&s, "pest", 1, "").await;
    assert_eq!(
        pest.refused("channel:join", json!({"channelId": "general"}))
            .await,
        "forbidden"
    );
    pest.ok("channel:join", json!({"channelId": "elsewhere"}))
        .await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_flood_is_rate_limited_then_closed_and_others_are_still_served() {
    let s = two_shards(&[
        "--rate-limit",
        "message:send=3/60s",
        "--rate-limit-strikes",
        "5",
    ]);
    let mut flood = Peer::on(&s, "flood", 0, "").await;
    let mut bob = Peer::on(&s, "bob", 0, "").await;
    let mut carol = Peer::on(&s, "carol", 1, "").await;
    for p in [&mut flood, &mut bob, &mut carol] {
        p.ok("channel:join", json!({"channelId": "general"})).await;
    }
    let send = json!({"channelId": "general", "content": "spam"});
    for _ in 0..3 {
        flood.ok("message:send", send.clone()).await;
    }
    let refused = flood.request("message:send", send.clone()).await;
    assert_eq!(refused["d"]["code"], "rate_limited", "{refused}");
    let retry = refused["d"]["retryAfterMs"].as_u64().unwrap();
    assert!((1..=20_000).contains(&retry), "{refused}");
    // Past the strikes: closed with 1008, without waiting for answers.
    for i in 0..20 {
        flood
            .send(json!({"t": "message:send", "id": 500 + i, "d": send}))
            .await;
    }
    assert_eq!(recv_close(&mut flood.ws).await.map(u16::from), Some(1008));
    // Bob, on the flooder's shard, and carol on the other, are served.
    bob.ok(
        "message:send",
        json!({"channelId": "general", "content": "hi"}),
    )
    .await;
    // Carol saw exactly the flooder's three accepted messages, then bob's.
    let seen: Vec<String> = carol
        .events_until("message:new")
        .await
        .into_iter()
        .filter(|v| v["t"] == "message:new")
        .map(|v| v["d"]["content"].as_str().unwrap().to_string())
        .collect();
    let mut all = seen;
    while all.last().map(String::as_str) != Some("hi") {
        let v = carol.event("message:new").await;
        all.push(v["d"]["content"].as_str().unwrap().to_string());
    }
    assert_eq!(all, ["spam", "spam", "spam", "hi"]);
    assert!(s.metric("corecast_rate_limited_total") >= 6);
    assert_eq!(s.metric("corecast_rate_limit_closes_total"), 1);
}

fn status_of(response: &str) -> &str {
    response.lines().next().unwrap_or_default()
}

#[tokio::test]
async fn a_user_past_its_connection_cap_is_refused_before_the_upgrade_io_uring() {
    user_cap("io_uring").await
}

#[tokio::test]
async fn a_user_past_its_connection_cap_is_refused_before_the_upgrade_epoll() {
    user_cap("epoll").await
}

async fn user_cap(driver: &str) {
    let s = two_shards(&["--max-connections-per-user", "2", "--io-driver", driver]);
    let t = token("alice", 600);
    let _a = ws_connect(&s.url(&format!("/ws?token={t}")), None).await;
    let mut b = ws_connect(&s.url(&format!("/ws?token={t}")), None).await;
    recv_event(&mut b, "ready").await;
    let (third, _) = http_head(
        s.addr,
        upgrade_request(&format!("/ws?token={t}"), "").as_bytes(),
    );
    assert!(status_of(&third).contains("429"), "{third}");
    assert!(third.ends_with("too_many_connections_for_user"), "{third}");
    // Authenticating with `auth` instead: an error, then close 1008.
    let mut raw = Raw::connect(s.addr, "/ws", "");
    raw.json(json!({"t": "auth", "id": 1, "d": {"token": t}}));
    let mut saw_error = false;
    let code = loop {
        match raw.recv() {
            Some(f) if f.opcode == corecast::ws::OpCode::Close => break f.close_code(),
            Some(f) => {
                let v: Value = serde_json::from_slice(&f.payload).unwrap();
                if v["t"] == "error" {
                    assert_eq!(v["d"]["code"], "forbidden", "{v}");
                    saw_error = true;
                }
            }
            None => break None,
        }
    };
    assert!(saw_error);
    assert_eq!(code, Some(1008));
    // Bob is not held back; and once one of alice's goes, she may again.
    let (_bob, _) = ws_user(&s, "bob").await;
    let _ = b.close(None).await;
    let _ = recv_close(&mut b).await;
    let mut again = None;
    for _ in 0..50 {
        let (r, _) = http_head(
            s.addr,
            upgrade_request(&format!("/ws?token={t}"), "").as_bytes(),
        );
        if status_of(&r).contains("101") {
            again = Some(r);
            break;
        }
        // The home shard may not have counted the close yet.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(again.is_some(), "never admitted again");
    assert!(
        s.metric("corecast_connections_refused_total{reason=\"too_many_connections_for_user\"}")
            >= 2
    );
}

#[test]
fn per_address_limits_count_the_client_behind_a_trusted_proxy() {
    let s = Server::start(&[
        "--shards",
        "2",
        "--max-connections-per-ip",
        "3",
        "--trusted-proxies",
        "127.0.0.0/8",
    ]);
    let connect = |xff: &str| {
        let header = if xff.is_empty() {
            String::new()
        } else {
            format!("X-Forwarded-For: {xff}\r\n")
        };
        let mut sock = std::net::TcpStream::connect(s.addr).unwrap();
        sock.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        use std::io::{Read, Write};
        sock.write_all(
            upgrade_request(&format!("/ws?token={}", token("u", 600)), &header).as_bytes(),
        )
        .unwrap();
        let mut head = vec![0u8; 256];
        let n = sock.read(&mut head).unwrap();
        (String::from_utf8_lossy(&head[..n]).into_owned(), sock)
    };
    let mut held = Vec::new();
    for _ in 0..3 {
        let (r, sock) = connect("203.0.113.1");
        assert!(status_of(&r).contains("101"), "{r}");
        held.push(sock);
    }
    let (r, _) = connect("203.0.113.1");
    assert!(status_of(&r).contains("429"), "{r}");
    assert!(r.contains("too_many_connections_from_ip"), "{r}");
    // Another client behind the same proxy has its own count.
    let (r, other) = connect("198.51.100.2, 203.0.113.99");
    assert!(status_of(&r).contains("101"), "{r}");
    held.push(other);
    // Closing one frees its place.
    drop(held.remove(0));
    let mut ok = false;
    for _ in 0..50 {
        let (r, sock) = connect("203.0.113.1");
        if status_of(&r).contains("101") {
            held.push(sock);
            ok = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(ok, "the place was never given back");
    assert!(
        s.metric("corecast_connections_refused_total{reason=\"too_many_connections_from_ip\"}")
            >= 1
    );
}

#[test]
fn handshake_floods_and_full_shards_are_refused_with_a_reason_io_uring() {
    floods_and_full_shards("io_uring")
}

#[test]
fn handshake_floods_and_full_shards_are_refused_with_a_reason_epoll() {
    floods_and_full_shards("epoll")
}

fn floods_and_full_shards(driver: &str) {
    let s = Server::start(&[
        "--shards",
        "1",
        "--max-handshakes-per-ip",
        "5",
        "--io-driver",
        driver,
    ]);
    let mut statuses = Vec::new();
    let mut open = Vec::new();
    let started = std::time::Instant::now();
    for i in 0..20 {
        let (r, sock) = http_head(
            s.addr,
            upgrade_request(&format!("/ws?token={}", token(&format!("u{i}"), 600)), "").as_bytes(),
        );
        open.push(sock);
        statuses.push(status_of(&r).to_string());
        if status_of(&r).contains("429") {
            assert!(r.contains("Retry-After: 1"), "{r}");
            assert!(r.ends_with("too_many_handshakes"), "{r}");
        }
    }
    let ok = statuses.iter().filter(|s| s.contains("101")).count();
    let refused = statuses.iter().filter(|s| s.contains("429")).count();
    // Five in each second the loop touched.
    let seconds = started.elapsed().as_secs() as usize + 2;
    assert!(
        ok >= 5 && ok <= 5 * seconds,
        "{statuses:?} in {seconds} seconds"
    );
    assert_eq!(ok + refused, 20);
    assert!(refused > 0, "{statuses:?}");
    let counted = s.metric("corecast_connections_refused_total{reason=\"too_many_handshakes\"}");
    assert_eq!(counted as usize, refused);
    // A shard holding its cap of sockets answers 503 to the next one,
    // whatever it sends.
    let s = Server::start(&[
        "--shards",
        "1",
        "--max-connections-per-shard",
        "3",
        "--io-driver",
        driver,
    ]);
    let idle: Vec<_> = (0..3)
        .map(|_| std::net::TcpStream::connect(s.addr).unwrap())
        .collect();
    // Once the shard has taken those three (a busy machine may take a
    // moment), the next socket is refused.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let r = loop {
        let r = http_raw(s.addr, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n");
        if !status_of(&r).contains("200") || std::time::Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(status_of(&r).contains("503"), "{r}");
    assert!(
        r.contains("Retry-After") && r.ends_with("server_full"),
        "{r}"
    );
    drop(idle);
    // Once the shard has seen those close, it has room again.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while http_get(s.addr, "/health").0 != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "the shard stayed full"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(s.metric("corecast_connections_refused_total{reason=\"server_full\"}") >= 1);
}

#[test]
fn a_trickled_request_head_does_not_extend_the_handshake_deadline() {
    use std::io::{Read, Write};
    let s = Server::start(&["--shards", "1", "--handshake-timeout-ms", "400"]);
    let mut c = std::net::TcpStream::connect(s.addr).unwrap();
    c.set_read_timeout(Some(std::time::Duration::from_millis(50)))
        .unwrap();
    let head = upgrade_request("/ws", "");
    let mut sent = 0;
    let mut closed = false;
    // One byte every 50 ms: the whole head would take over 8 seconds.
    for b in head.as_bytes() {
        if c.write_all(&[*b]).is_err() {
            closed = true;
            break;
        }
        sent += 1;
        let mut buf = [0u8; 64];
        match c.read(&mut buf) {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(_) => panic!("answered a head it never got"),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => {
                closed = true;
                break;
            }
        }
    }
    assert!(closed, "the trickle got through");
    assert!(sent < head.len(), "{sent} of {} bytes", head.len());
    assert_eq!(s.metric("corecast_handshake_timeouts_total"), 1);
}

#[tokio::test]
async fn oversize_and_malformed_payloads_never_disturb_others() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let s = two_shards(&["--max-message-size", "65536"]);
    let mut bob = Peer::on(&s, "bob", 1, "").await;
    bob.ok("channel:join", json!({"channelId": "general"}))
        .await;
    let mut alice = Peer::on(&s, "alice", 0, "").await;
    alice
        .ok("channel:join", json!({"channelId": "general"}))
        .await;
    // Too long, though within the frame size: a typed error.
    let long = "é".repeat(4001);
    assert_eq!(
        alice
            .refused(
                "message:send",
                json!({"channelId": "general", "content": long})
            )
            .await,
        "too_large"
    );
    // 4,000 characters of two bytes each is within the limit, verbatim.
    let fine = "é".repeat(4000);
    alice
        .ok(
            "message:send",
            json!({"channelId": "general", "content": fine}),
        )
        .await;
    assert_eq!(bob.event("message:new").await["d"]["content"], fine);
    // Markup is relayed as sent: escaping is the client's business.
    let markup = "<script>alert(1)</script> & \"quotes\"";
    alice
        .ok(
            "message:send",
            json!({"channelId": "general", "content": markup}),
        )
        .await;
    assert_eq!(bob.event("message:new").await["d"]["content"], markup);
    // Deeply nested JSON, a wrong type, an unknown event: errors naming
    // the problem, and the connection stays.
    let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    for (input, code) in [
        (format!(r#"{{"t":"message:send","id":1,"d":{{"channelId":"general","content":{deep}}}}}"#), "bad_request"),
        (r#"{"t":"presence:subscribe","id":2,"d":{"userIds":"bob"}}"#.to_string(), "bad_request"),
        (r#"{"t":"message:send","id":3,"d":{"channelId":"general","content":"x","mentions":[1]}}"#.to_string(), "bad_request"),
    ] {
        alice.ws.send(Message::Text(input.clone().into())).await.unwrap();
        let v = loop {
            let v = recv(&mut alice.ws).await;
            if v["t"] == "error" || v["t"] == "ack" {
                break v;
            }
        };
        assert_eq!((v["t"].as_str(), v["d"]["code"].as_str()), (Some("error"), Some(code)), "{input:.80}: {v}");
    }
    // A frame past max_message_size closes that connection with 1009.
    let huge = json!({"t": "message:send", "id": 9, "d": {"channelId": "general", "content": "x".repeat(70_000)}});
    alice
        .ws
        .send(Message::Text(huge.to_string().into()))
        .await
        .unwrap();
    assert_eq!(recv_close(&mut alice.ws).await.map(u16::from), Some(1009));
    // Invalid UTF-8 in a text frame: 1007, on a raw socket.
    let mut raw = Raw::connect(s.addr, &format!("/ws?token={}", token("carol", 600)), "");
    assert_eq!(raw.recv_json()["t"], "ready");
    raw.send(true, corecast::ws::OpCode::Text, &[b'{', 0xff, 0xfe, b'}']);
    assert_eq!(raw.recv_close(), Some(1007));
    // Bob saw only what was accepted, and is served.
    let seen: Vec<Value> = bob.drain().await;
    assert!(seen.iter().all(|v| v["t"] != "message:new"), "{seen:?}");
    bob.ok(
        "message:send",
        json!({"channelId": "general", "content": "still fine"}),
    )
    .await;
}
