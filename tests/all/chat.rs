//! The chat features end to end, over real sockets, against the real binary
//! with two shards: every test puts its participants on both shards, so
//! what it checks crosses the mesh (channel owners and users' home shards
//! on one side, connections on the other).

use crate::common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

fn names(events: &[Value]) -> Vec<&str> {
    events.iter().map(|e| e["t"].as_str().unwrap()).collect()
}

fn two_shards(extra: &[&str]) -> Server {
    let mut args = vec!["--shards", "2"];
    args.extend_from_slice(extra);
    Server::start(&args)
}

#[tokio::test]
async fn messages_edits_reactions_receipts_history_and_recovery() {
    let s = two_shards(&[]);
    let mut alice = Peer::on(&s, "alice", 0, "").await;
    let mut bob = Peer::on(&s, "bob", 1, "").await;
    let join = alice
        .ok("channel:join", json!({"channelId": "general"}))
        .await;
    let epoch = join["epoch"].as_str().unwrap().to_string();
    bob.ok("channel:join", json!({"channelId": "general"}))
        .await;
    alice.event("channel:member_joined").await;

    // A message with a reply, a thread, mentions and a nonce; the nonce
    // comes back, and a resend is not published twice.
    let m = json!({"channelId": "general", "content": "first", "nonce": "n-1",
                   "replyTo": "x-0", "threadId": "t-1", "mentions": ["bob"]});
    let first = alice.ok("message:send", m.clone()).await;
    assert_eq!(first["nonce"], "n-1");
    let again = alice.ok("message:send", m).await;
    assert_eq!(
        (again["duplicate"].as_bool(), &again["messageId"]),
        (Some(true), &first["messageId"])
    );
    let id = first["messageId"].as_str().unwrap().to_string();
    let new = bob.event("message:new").await;
    assert_eq!(new["d"]["content"], "first");
    assert_eq!(
        (new["d"]["threadId"].as_str(), new["d"]["replyTo"].as_str()),
        (Some("t-1"), Some("x-0"))
    );
    assert_eq!(new["d"]["mentions"], json!(["bob"]));
    alice
        .ok(
            "message:send",
            json!({"channelId": "general", "content": "second"}),
        )
        .await;
    let second = bob.event("message:new").await;
    assert_eq!(
        second["d"]["content"], "second",
        "the resend was not delivered in between"
    );

    // Only the author edits or deletes; everyone sees the edit.
    let target = json!({"channelId": "general", "messageId": id});
    let mut edit = target.clone();
    edit["content"] = json!("first, edited");
    assert_eq!(bob.refused("message:edit", edit.clone()).await, "forbidden");
    alice.ok("message:edit", edit).await;
    assert_eq!(
        bob.event("message:edited").await["d"]["content"],
        "first, edited"
    );

    // Reactions: one per user per emoji, counted.
    let mut react = target.clone();
    react["emoji"] = json!("👍");
    bob.ok("message:react", react.clone()).await;
    bob.ok("message:react", react.clone()).await;
    alice.ok("message:react", react.clone()).await;
    react["action"] = json!("remove");
    bob.ok("message:react", react).await;
    let mut counts = Vec::new();
    for _ in 0..3 {
        let r = alice.event("message:reaction").await;
        counts.push((
            r["d"]["userId"].as_str().unwrap().to_string(),
            r["d"]["count"].as_u64().unwrap(),
        ));
    }
    assert_eq!(
        counts,
        [("bob".into(), 1), ("alice".into(), 2), ("bob".into(), 1)]
    );

    // Receipts: delivery to the author, reads to the channel.
    bob.ok("message:delivered", target.clone()).await;
    let d = alice.event("message:delivery").await;
    assert_eq!(
        (d["d"]["userId"].as_str(), d["d"]["messageId"].as_str()),
        (Some("bob"), Some(id.as_str()))
    );
    bob.ok("message:mark_read", target.clone()).await;
    assert_eq!(
        alice.event("message:read_receipt").await["d"]["userId"],
        "bob"
    );
    let readers = alice.ok("message:get_read_receipts", target.clone()).await;
    assert_eq!(readers["readers"][0]["userId"], "bob");

    // History shows the message as it stands.
    let h = bob
        .ok(
            "channel:get_history",
            json!({"channelId": "general", "limit": 10}),
        )
        .await;
    let msgs = h["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 2);
    assert_eq!(msgs[0]["content"], "first, edited");
    assert!(msgs[0]["editedAt"].as_u64().is_some());
    assert_eq!(msgs[0]["reactions"][0]["count"], 1);
    assert_eq!(h["hasMore"], false);

    alice.ok("message:delete", target.clone()).await;
    assert_eq!(
        bob.event("message:deleted").await["d"]["messageId"],
        id.as_str()
    );
    assert_eq!(
        alice
            .refused(
                "message:edit",
                json!({"channelId": "general", "messageId": id, "content": "x"})
            )
            .await,
        "not_found"
    );

    // A client that last saw offset 1 recovers every later event, in order.
    let mut carol = Peer::on(&s, "carol", 1, "").await;
    let j = carol
        .ok(
            "channel:join",
            json!({"channelId": "general", "since": {"offset": 1, "epoch": epoch}}),
        )
        .await;
    assert_eq!(j["recovered"], true);
    let replay = carol.events_until("message:deleted").await;
    assert_eq!(
        names(&replay),
        [
            "message:new",
            "message:edited",
            "message:reaction",
            "message:reaction",
            "message:reaction",
            "message:deleted"
        ]
    );
    let offsets: Vec<u64> = replay
        .iter()
        .map(|e| e["d"]["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, (2..=7).collect::<Vec<_>>());
    // And from another epoch there is nothing to recover.
    let mut dave = Peer::on(&s, "dave", 0, "").await;
    let j = dave
        .ok(
            "channel:join",
            json!({"channelId": "general", "since": {"offset": 1, "epoch": "0000000000000000"}}),
        )
        .await;
    assert_eq!(j["recovered"], false);
}

#[tokio::test]
async fn a_dropped_client_resumes_its_session_and_gets_exactly_what_it_missed() {
    let s = two_shards(&["--resume-window-ms", "30000"]);
    let mut alice = Peer::on(&s, "alice", 0, "").await;
    let mut bob = Peer::on(&s, "bob", 1, "").await;
    for c in ["news", "chat"] {
        alice.ok("channel:join", json!({"channelId": c})).await;
        bob.ok("channel:join", json!({"channelId": c})).await;
    }
    bob.ok(
        "message:send",
        json!({"channelId": "news", "content": "seen"}),
    )
    .await;
    assert_eq!(alice.event("message:new").await["d"]["content"], "seen");
    let session = alice.session();
    // The connection drops without a closing handshake.
    drop(alice);
    bob.event("channel:member_left").await;
    for i in 0..5 {
        bob.ok(
            "message:send",
            json!({"channelId": "news", "content": format!("missed {i}")}),
        )
        .await;
    }
    bob.ok(
        "message:send",
        json!({"channelId": "chat", "content": "missed in chat"}),
    )
    .await;

    let mut back = Peer::on(&s, "alice", 1, "").await;
    let r = back
        .ok("session:resume", json!({"sessionId": session}))
        .await;
    assert_eq!(r["sessionId"], session.as_str());
    let mut chans: Vec<(String, bool)> = r["channels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["channelId"].as_str().unwrap().to_string(),
                c["recovered"].as_bool().unwrap(),
            )
        })
        .collect();
    chans.sort();
    assert_eq!(chans, [("chat".into(), true), ("news".into(), true)]);
    let mut got: Vec<(String, String)> = Vec::new();
    while got.len() < 6 {
        let m = back.event("message:new").await;
        got.push((
            m["d"]["channelId"].as_str().unwrap().into(),
            m["d"]["content"].as_str().unwrap().into(),
        ));
    }
    let news: Vec<&str> = got
        .iter()
        .filter(|(c, _)| c == "news")
        .map(|(_, t)| t.as_str())
        .collect();
    assert_eq!(
        news,
        ["missed 0", "missed 1", "missed 2", "missed 3", "missed 4"],
        "exactly the missed ones, in order"
    );
    assert!(got
        .iter()
        .any(|(c, t)| c == "chat" && t == "missed in chat"));
    // Live delivery goes on, once.
    bob.ok(
        "message:send",
        json!({"channelId": "news", "content": "live"}),
    )
    .await;
    assert_eq!(back.event("message:new").await["d"]["content"], "live");
    let rest = back.drain().await;
    assert!(
        rest.iter().all(|e| e["t"] != "message:new"),
        "nothing twice: {rest:?}"
    );
    // A session is resumed once.
    let mut third = Peer::on(&s, "alice", 0, "").await;
    assert_eq!(
        third
            .refused("session:resume", json!({"sessionId": session}))
            .await,
        "not_found"
    );
    assert_eq!(
        third
            .refused("session:resume", json!({"sessionId": "short"}))
            .await,
        "bad_request"
    );
}

#[tokio::test]
async fn direct_messages_presence_and_typing_across_devices_and_shards() {
    let s = two_shards(&["--presence-grace-ms", "300", "--typing-timeout-ms", "1500"]);
    let mut watcher = Peer::on(&s, "watcher", 0, "").await;
    let sub = watcher
        .ok("presence:subscribe", json!({"userIds": ["alice"]}))
        .await;
    assert_eq!(sub["presences"][0]["status"], "offline");

    let mut a1 = Peer::on(&s, "alice", 0, "&device=desktop").await;
    let p = watcher.event("presence:changed").await;
    assert_eq!(p["d"]["status"], "online");
    let mut a2 = Peer::on(&s, "alice", 1, "&device=mobile").await;
    // Landing on a given shard may take a few connections, each a device
    // that comes and goes: settle on the two that stay.
    let now = watcher.settle_presence("alice").await;
    assert_eq!(
        (now["status"].as_str(), &now["devices"]),
        (Some("online"), &json!(["desktop", "mobile"]))
    );
    // The most available device wins; a no-op update is not announced.
    a1.ok("presence:update", json!({"status": "dnd"})).await;
    a2.ok(
        "presence:update",
        json!({"status": "idle", "customStatus": "on the train"}),
    )
    .await;
    a2.ok("presence:update", json!({"customStatus": "on the train"}))
        .await;
    a2.ok(
        "presence:update",
        json!({"activity": {"type": "listening", "name": "Radio"}}),
    )
    .await;
    let seen = watcher.events_until("presence:changed").await;
    assert_eq!(seen.last().unwrap()["d"]["status"], "idle", "{seen:?}");
    let next = watcher.event("presence:changed").await;
    assert_eq!(
        next["d"]["activity"]["name"], "Radio",
        "the repeated custom status made no event"
    );
    assert_eq!(
        a1.refused("presence:update", json!({"status": "offline"}))
            .await,
        "bad_request"
    );
    let bulk = watcher
        .ok("presence:get_bulk", json!({"userIds": ["nobody", "alice"]}))
        .await;
    assert_eq!(bulk["presences"][0]["status"], "offline");
    assert_eq!(bulk["presences"][1]["customStatus"], "on the train");

    // Direct messages reach every device of the recipient and the sender's
    // other devices.
    let mut b1 = Peer::on(&s, "bob", 1, "").await;
    let mut b2 = Peer::on(&s, "bob", 0, "").await;
    let sent = a1
        .ok(
            "dm:send",
            json!({"toUserId": "bob", "content": "hi bob", "nonce": "d-1"}),
        )
        .await;
    let id = sent["messageId"].as_str().unwrap().to_string();
    for b in [&mut b1, &mut b2] {
        let m = b.event("dm:new").await;
        assert_eq!(
            (m["d"]["messageId"].as_str(), m["d"]["fromUserId"].as_str()),
            (Some(id.as_str()), Some("alice"))
        );
    }
    assert_eq!(a2.event("dm:sent").await["d"]["messageId"], id.as_str());
    let dup = a1
        .ok(
            "dm:send",
            json!({"toUserId": "bob", "content": "hi bob", "nonce": "d-1"}),
        )
        .await;
    assert_eq!(
        (dup["duplicate"].as_bool(), dup["messageId"].as_str()),
        (Some(true), Some(id.as_str()))
    );
    b2.ok(
        "dm:send",
        json!({"toUserId": "alice", "content": "hello alice"}),
    )
    .await;
    assert_eq!(a1.event("dm:new").await["d"]["content"], "hello alice");
    let convs = b1.ok("dm:get_conversations", json!({})).await;
    assert_eq!(convs["conversations"][0]["userId"], "alice");
    assert_eq!(
        convs["conversations"][0]["lastMessage"]["content"],
        "hello alice"
    );
    assert_eq!(convs["conversations"][0]["unread"], 0, "bob wrote last");

    // Typing: announced once to the others, expiring on its own.
    a1.ok("channel:join", json!({"channelId": "room"})).await;
    b1.ok("channel:join", json!({"channelId": "room"})).await;
    a1.ok("typing:start", json!({"channelId": "room"})).await;
    a1.ok("typing:start", json!({"channelId": "room"})).await;
    let active = b1
        .ok("typing:get_active", json!({"channelId": "room"}))
        .await;
    assert_eq!(active["userIds"], json!(["alice"]));
    let typing = b1.events_until("typing:user_stop").await;
    let typing: Vec<&str> = names(&typing)
        .into_iter()
        .filter(|t| t.starts_with("typing:"))
        .collect();
    assert_eq!(
        typing,
        ["typing:user_start", "typing:user_stop"],
        "one start, then the expiry"
    );
    // Sending a message stops typing before the message arrives.
    a1.ok("typing:start", json!({"channelId": "room"})).await;
    a1.ok(
        "message:send",
        json!({"channelId": "room", "content": "typed"}),
    )
    .await;
    let seq = b1.events_until("message:new").await;
    let seq: Vec<&str> = names(&seq)
        .into_iter()
        .filter(|t| t.starts_with("typing:") || *t == "message:new")
        .collect();
    assert_eq!(
        seq,
        ["typing:user_start", "typing:user_stop", "message:new"]
    );
    let mine = a1.drain().await;
    assert!(
        mine.iter()
            .all(|e| !e["t"].as_str().unwrap().starts_with("typing:user")),
        "no echo to the typist"
    );

    // Alice leaves entirely: offline after the grace period.
    drop(a1);
    drop(a2);
    let p = watcher.presence_until(|d| d["status"] == "offline").await;
    assert!(p["d"]["lastSeen"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn voice_rooms_and_calls_across_shards() {
    let s = two_shards(&[
        "--call-ring-timeout-ms",
        "400",
        "--livekit-url",
        "wss://livekit.example",
        "--livekit-api-key",
        "APItest",
        "--livekit-api-secret",
        "livekit-secret-for-the-tests",
    ]);
    let mut alice = Peer::on(&s, "alice", 0, "").await;
    let mut bob = Peer::on(&s, "bob", 1, "").await;
    let mut bob2 = Peer::on(&s, "bob", 0, "").await;
    bob.ok("channel:join", json!({"channelId": "lounge"})).await;

    // Voice: the join's ack carries a LiveKit token for that room.
    let v = alice.ok("voice:join", json!({"channelId": "lounge"})).await;
    assert_eq!(v["serverUrl"], "wss://livekit.example");
    assert_eq!(v["participants"][0]["userId"], "alice");
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.set_issuer(&["APItest"]);
    let claims = jsonwebtoken::decode::<Value>(
        v["token"].as_str().unwrap(),
        &jsonwebtoken::DecodingKey::from_secret(b"livekit-secret-for-the-tests"),
        &validation,
    )
    .expect("a valid LiveKit token")
    .claims;
    assert_eq!(
        (claims["sub"].as_str(), claims["video"]["room"].as_str()),
        (Some("alice"), Some("lounge"))
    );
    assert_eq!(claims["video"]["canSubscribe"], true);
    assert_eq!(bob.event("voice:user_joined").await["d"]["userId"], "alice");
    alice
        .ok("voice:update", json!({"muted": true, "video": true}))
        .await;
    let st = bob.event("voice:state_update").await;
    assert_eq!(
        (
            st["d"]["state"]["muted"].as_bool(),
            st["d"]["state"]["video"].as_bool()
        ),
        (Some(true), Some(true))
    );
    let parts = bob
        .ok("voice:get_participants", json!({"channelId": "lounge"}))
        .await;
    assert_eq!(parts["participants"][0]["state"]["muted"], true);
    alice.ok("voice:leave", json!({})).await;
    assert_eq!(bob.event("voice:user_left").await["d"]["userId"], "alice");
    assert_eq!(
        alice.refused("voice:update", json!({"muted": false})).await,
        "not_found"
    );

    // A call rings every device of the callee; the first answer wins.
    let c = alice
        .ok(
            "call:initiate",
            json!({"toUserId": "bob", "callType": "video", "sdp": "v=0 offer"}),
        )
        .await;
    let call = c["callId"].as_str().unwrap().to_string();
    for b in [&mut bob, &mut bob2] {
        let inc = b.event("call:incoming").await;
        assert_eq!(
            (inc["d"]["callId"].as_str(), inc["d"]["sdp"].as_str()),
            (Some(call.as_str()), Some("v=0 offer"))
        );
    }
    bob2.ok("call:answer", json!({"callId": call, "sdp": "v=0 answer"}))
        .await;
    assert_eq!(alice.event("call:answered").await["d"]["sdp"], "v=0 answer");
    assert_eq!(
        bob.event("call:ended").await["d"]["reason"],
        "answered_elsewhere"
    );
    assert_eq!(
        bob.refused("call:answer", json!({"callId": call})).await,
        "bad_request"
    );
    // Candidates travel between the two parties, as they were sent.
    let cand = json!({"candidate": "candidate:1 1 UDP 2122252543 10.0.0.2 50000 typ host", "sdpMLineIndex": 0});
    alice
        .ok(
            "call:ice_candidate",
            json!({"callId": call, "candidate": cand}),
        )
        .await;
    assert_eq!(
        bob2.event("call:ice_candidate").await["d"]["candidate"],
        cand
    );
    bob2.ok(
        "call:ice_candidate",
        json!({"callId": call, "candidate": {"x": 1}}),
    )
    .await;
    assert_eq!(
        alice.event("call:ice_candidate").await["d"]["fromUserId"],
        "bob"
    );
    let mut eve = Peer::on(&s, "eve", 1, "").await;
    assert_eq!(
        eve.refused(
            "call:ice_candidate",
            json!({"callId": call, "candidate": {}})
        )
        .await,
        "forbidden"
    );
    alice.ok("call:end", json!({"callId": call})).await;
    assert_eq!(bob2.event("call:ended").await["d"]["reason"], "ended");

    // Nobody answers: missed for the caller, a notification for the callee.
    alice.ok("call:initiate", json!({"toUserId": "bob"})).await;
    bob.event("call:incoming").await;
    assert_eq!(alice.event("call:missed").await["d"]["reason"], "no_answer");
    assert_eq!(bob.event("call:ended").await["d"]["reason"], "missed");
    assert_eq!(
        bob.event("notification:new").await["d"]["kind"],
        "missed_call"
    );
    // The caller hangs up by dropping: the callee stops ringing.
    let c = alice.ok("call:initiate", json!({"toUserId": "bob"})).await;
    let call = c["callId"].as_str().unwrap().to_string();
    bob2.event_for("call:incoming", "callId", &call).await;
    drop(alice);
    let ended = bob2.event_for("call:ended", "callId", &call).await;
    assert_eq!(ended["d"]["reason"], "disconnected");
}

#[tokio::test]
async fn mentions_reach_absent_users_as_notifications() {
    let s = two_shards(&[]);
    let mut alice = Peer::on(&s, "alice", 0, "").await;
    alice.ok("channel:join", json!({"channelId": "team"})).await;
    let mut carol = Peer::on(&s, "carol", 1, "").await;
    alice
        .ok("message:send", json!({"channelId": "team", "content": "@carol @dave look", "mentions": ["carol", "dave"]}))
        .await;
    let n = carol.event("notification:new").await;
    assert_eq!(n["d"]["kind"], "mention");
    assert_eq!(
        (
            n["d"]["data"]["channelId"].as_str(),
            n["d"]["data"]["fromUserId"].as_str()
        ),
        (Some("team"), Some("alice"))
    );
    // Dave was offline: the notification waits for him.
    let mut dave = Peer::on(&s, "dave", 0, "").await;
    let n = dave.event("notification:new").await;
    let nid = n["d"]["notificationId"].as_str().unwrap().to_string();
    let pending = dave.ok("notification:get_pending", json!({})).await;
    assert_eq!(pending["notifications"][0]["read"], false);
    dave.ok("notification:read", json!({"notificationIds": [nid]}))
        .await;
    let pending = dave.ok("notification:get_pending", json!({})).await;
    assert_eq!(pending["notifications"][0]["read"], true);
    dave.ok("notification:clear", json!({"notificationId": nid}))
        .await;
    assert_eq!(
        dave.refused("notification:clear", json!({"notificationId": nid}))
            .await,
        "not_found"
    );
    carol.ok("notification:clear_all", json!({})).await;
    let pending = carol.ok("notification:get_pending", json!({})).await;
    assert_eq!(pending["notifications"], json!([]));
}

#[tokio::test]
async fn the_binary_protocol_carries_the_same_events() {
    use corecast::protocol::{
        binary, ClientEvent, ClientMessage, DmSend, MessageReact, ReactAction, ServerEvent,
    };
    let s = two_shards(&[]);
    let mut json_side = Peer::on(&s, "alice", 0, "").await;
    json_side
        .ok("channel:join", json!({"channelId": "mixed"}))
        .await;
    // A binary client (rkyv archives) on the other shard.
    let mut bin = loop {
        let mut ws = ws_connect(
            &s.url(&format!("/ws?token={}", token("bob", 600))),
            Some("corecast.bin"),
        )
        .await;
        let ready = loop {
            match ws.next().await.unwrap().unwrap() {
                Message::Binary(b) => break binary::decode_server(&b).unwrap(),
                _ => continue,
            }
        };
        if matches!(&ready.event, ServerEvent::Ready(r) if r.shard == 1) {
            break ws;
        }
    };
    async fn call(ws: &mut Ws, id: u64, event: ClientEvent) -> Vec<ServerEvent> {
        let msg = ClientMessage {
            id: Some(id),
            event,
        };
        ws.send(Message::Binary(binary::encode_client(&msg).into()))
            .await
            .unwrap();
        let mut before = Vec::new();
        loop {
            let Message::Binary(b) = ws.next().await.unwrap().unwrap() else {
                continue;
            };
            let m = binary::decode_server(&b).unwrap();
            if m.id == Some(id) {
                assert!(
                    matches!(m.event, ServerEvent::Ack(_) | ServerEvent::HeartbeatAck(_)),
                    "{m:?}"
                );
                return before;
            }
            before.push(m.event);
        }
    }
    call(
        &mut bin,
        1,
        ClientEvent::ChannelJoin(corecast::protocol::ChannelJoin::new("mixed")),
    )
    .await;
    let sent = json_side
        .ok(
            "message:send",
            json!({"channelId": "mixed", "content": "hi"}),
        )
        .await;
    let id = sent["messageId"].as_str().unwrap().to_string();
    let react = MessageReact {
        channel_id: "mixed".into(),
        message_id: id.clone(),
        emoji: "🎉".into(),
        action: ReactAction::Add,
    };
    let before = call(&mut bin, 2, ClientEvent::MessageReact(react)).await;
    assert!(before
        .iter()
        .any(|e| matches!(e, ServerEvent::MessageNew(m) if m.content == "hi")));
    let r = json_side.event("message:reaction").await;
    assert_eq!(
        (r["d"]["userId"].as_str(), r["d"]["emoji"].as_str()),
        (Some("bob"), Some("🎉"))
    );
    call(
        &mut bin,
        3,
        ClientEvent::DmSend(DmSend {
            to_user_id: "alice".into(),
            content: "from binary".into(),
            nonce: None,
        }),
    )
    .await;
    assert_eq!(
        json_side.event("dm:new").await["d"]["content"],
        "from binary"
    );
    json_side
        .ok(
            "dm:send",
            json!({"toUserId": "bob", "content": "to binary"}),
        )
        .await;
    // It crosses two home shards: wait for it.
    loop {
        let Message::Binary(b) = bin.next().await.unwrap().unwrap() else {
            continue;
        };
        if let ServerEvent::DmNew(m) = binary::decode_server(&b).unwrap().event {
            assert_eq!(
                (m.content.as_str(), m.from_user_id.as_str()),
                ("to binary", "alice")
            );
            break;
        }
    }
}
