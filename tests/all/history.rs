//! A single node's history survives a kill: killed with SIGKILL and
//! started again on the same history file, a node keeps its channels'
//! epochs, offsets, messages (edits and reactions applied) and what
//! recovery by offset replays.

use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::json;

fn start(history: &str) -> Server {
    let mut args = vec!["serve", "--listen", "127.0.0.1:0", "--auth-secret", SECRET];
    args.extend(["--shards", "2"]);
    Server::start_raw(&args, &[("CORECAST_HISTORY_FILE", history)])
}

/// Lines in the file (what the store has written).
fn lines(path: &std::path::Path) -> usize {
    std::fs::read_to_string(path)
        .map(|t| t.lines().filter(|l| !l.trim().is_empty()).count())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_killed_node_keeps_its_history_and_recovery_by_offset() {
    let dir = std::env::temp_dir().join(format!("cc-history-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("history.jsonl");
    let file = path.to_str().unwrap().to_owned();
    let mut s = start(&file);
    let mut alice = Peer::on(&s, "alice", 0, "").await;
    let mut bob = Peer::on(&s, "bob", 1, "").await;
    let join = alice
        .ok("channel:join", json!({"channelId": "general"}))
        .await;
    let epoch = join["epoch"].as_str().unwrap().to_owned();
    bob.ok("channel:join", json!({"channelId": "general"}))
        .await;
    let mut ids = Vec::new();
    for m in ["one", "two", "three"] {
        let a = alice
            .ok(
                "message:send",
                json!({"channelId": "general", "content": m}),
            )
            .await;
        ids.push(a["messageId"].as_str().unwrap().to_owned());
    }
    let seen = bob.event("message:new").await;
    let bob_at = seen["d"]["offset"].as_u64().unwrap();
    assert_eq!(bob_at, 1);
    alice
        .ok(
            "message:edit",
            json!({"channelId": "general", "messageId": ids[1], "content": "two (edited)"}),
        )
        .await;
    alice
        .ok(
            "message:react",
            json!({"channelId": "general", "messageId": ids[2], "emoji": "👍", "action": "add"}),
        )
        .await;
    // Five sequenced events; wait until the store has written them.
    let deadline = Instant::now() + Duration::from_secs(10);
    while lines(&path) < 5 {
        assert!(
            Instant::now() < deadline,
            "the history file has {} lines",
            lines(&path)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // SIGKILL: no drain, nothing said to anyone.
    s.child.kill().unwrap();
    s.child.wait().unwrap();

    let s = start(&file);
    assert!(s.log().contains("history loaded"), "{}", s.log());
    let mut bob = Peer::on(&s, "bob", 0, "").await;
    let since = json!({"offset": bob_at, "epoch": epoch});
    let rejoin = bob
        .ok(
            "channel:join",
            json!({"channelId": "general", "since": since}),
        )
        .await;
    assert_eq!(rejoin["epoch"], epoch.as_str(), "{rejoin}");
    assert_eq!(rejoin["offset"], 5, "{rejoin}");
    assert_eq!(rejoin["recovered"], true, "{rejoin}");
    let replayed = bob.events_until("message:reaction").await;
    let names: Vec<&str> = replayed.iter().map(|e| e["t"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "message:new",
            "message:new",
            "message:edited",
            "message:reaction"
        ],
        "{replayed:?}"
    );
    let offsets: Vec<u64> = replayed
        .iter()
        .map(|e| e["d"]["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, [2, 3, 4, 5]);
    // The history, edits and reactions applied.
    let h = bob
        .ok("channel:get_history", json!({"channelId": "general"}))
        .await;
    let contents: Vec<&str> = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].as_str().unwrap())
        .collect();
    assert_eq!(contents, ["one", "two (edited)", "three"], "{h}");
    assert_eq!(h["messages"][2]["reactions"][0]["count"], 1, "{h}");
    // And the channel goes on from where it was.
    let next = bob
        .ok(
            "message:send",
            json!({"channelId": "general", "content": "four"}),
        )
        .await;
    assert_eq!(next["offset"], 6, "{next}");
    assert_eq!(next["messageId"], format!("{epoch}-6"));
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}
