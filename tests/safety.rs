//! Abuse over real sockets: forged and expired tokens, channels and users
//! not granted, kicks and bans across shards, bans across a restart.

mod common;

use common::*;
use corecast::auth::Claims;
use serde_json::{json, Value};

fn two_shards(extra: &[&str]) -> Server {
    let mut args = vec!["--shards", "2"];
    args.extend_from_slice(extra);
    Server::start(&args)
}

/// The status line of an upgrade request carrying `token`.
fn upgrade_status(s: &Server, token: &str) -> String {
    let r = http_raw(
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
