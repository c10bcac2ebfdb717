//! Cluster mode when Redis misbehaves, over real sockets: a publisher on
//! node a sends messages while members on both nodes count what they
//! receive, recovering the way docs/PROTOCOL.md says whenever they see a
//! gap or a new epoch; meanwhile Redis is paused past every timeout, hits
//! its memory limit, or restarts empty. Every acked message must reach
//! every member, once per epoch; what was not accepted was refused.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::redis::*;
use crate::common::*;
use serde_json::json;

const CHANNEL: &str = "live";
/// Short, so that a pause of a few seconds outlasts every timeout: the
/// link is given up after half of it.
const NODE_TIMEOUT_MS: &str = "2000";

fn fault_node(redis: &Redis) -> Server {
    let s = Server::start(&[
        "--shards",
        "2",
        "--redis",
        &redis.url(),
        "--node-timeout-ms",
        NODE_TIMEOUT_MS,
    ]);
    wait_cluster(&s, 1);
    s
}

/// What a member received: per epoch, offset to content.
#[derive(Default, Debug)]
struct Counted {
    epochs: BTreeMap<String, BTreeMap<u64, String>>,
    /// The same (epoch, offset) delivered twice, or the same content twice
    /// in one epoch.
    twice: Vec<String>,
    recoveries: u32,
}

impl Counted {
    fn record(&mut self, epoch: &str, offset: u64, content: &str) {
        let e = self.epochs.entry(epoch.to_string()).or_default();
        match e.get(&offset) {
            Some(c) if c == content => {}
            Some(c) => self
                .twice
                .push(format!("{epoch}-{offset} was {c}, now {content}")),
            None => {
                if e.values().any(|c| c == content) {
                    self.twice.push(format!("{content} twice in epoch {epoch}"));
                }
                e.insert(offset, content.to_string());
            }
        }
    }

    fn has(&self, content: &str) -> bool {
        self.epochs
            .values()
            .any(|e| e.values().any(|c| c == content))
    }
}

fn epoch_of(message_id: &str) -> String {
    message_id.rsplit_once('-').unwrap().0.to_string()
}

/// A member of `CHANNEL` until it has received `end`.
async fn member(mut p: Peer, label: &'static str) -> Counted {
    let mut c = Counted::default();
    let j = p.ok("channel:join", json!({"channelId": CHANNEL})).await;
    let mut epoch = j["epoch"].as_str().unwrap().to_string();
    let mut offset = j["offset"].as_u64().unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        assert!(Instant::now() < deadline, "{label} never got the end");
        let v = match p.inbox.pop_front() {
            Some(v) => v,
            None => recv(&mut p.ws).await,
        };
        if v["t"] != "message:new" {
            continue;
        }
        let d = &v["d"];
        let (e, off) = (
            epoch_of(d["messageId"].as_str().unwrap()),
            d["offset"].as_u64().unwrap(),
        );
        let content = d["content"].as_str().unwrap().to_string();
        if e == epoch && off <= offset {
            c.twice
                .push(format!("{label}: {e}-{off} ({content}) again"));
            continue;
        }
        if e == epoch && off == offset + 1 {
            c.record(&e, off, &content);
            offset = off;
            if content == "end" {
                return c;
            }
            continue;
        }
        // A gap or a new epoch: rejoin from the last position (what is
        // queued will come again or is in the history).
        c.recoveries += 1;
        p.inbox.retain(|v| v["t"] != "message:new");
        p.ok("channel:leave", json!({"channelId": CHANNEL})).await;
        p.inbox.retain(|v| v["t"] != "message:new");
        let j = p
            .ok(
                "channel:join",
                json!({"channelId": CHANNEL, "since": {"offset": offset, "epoch": epoch}}),
            )
            .await;
        if j["recovered"] == true {
            // The replay follows the ack.
            continue;
        }
        // Another epoch: its history, page by page.
        epoch = j["epoch"].as_str().unwrap().to_string();
        offset = j["offset"].as_u64().unwrap();
        let mut before: Option<u64> = Some(offset + 1);
        let mut end = false;
        while let Some(b) = before {
            let h = p
                .ok(
                    "channel:get_history",
                    json!({"channelId": CHANNEL, "limit": 100, "before": b}),
                )
                .await;
            let msgs = h["messages"].as_array().unwrap();
            for m in msgs {
                let (me, mo) = (
                    epoch_of(m["messageId"].as_str().unwrap()),
                    m["offset"].as_u64().unwrap(),
                );
                let mc = m["content"].as_str().unwrap();
                c.record(&me, mo, mc);
                end |= mc == "end";
            }
            before = match (h["hasMore"].as_bool(), msgs.first()) {
                (Some(true), Some(m)) => m["offset"].as_u64(),
                _ => None,
            };
        }
        if end {
            return c;
        }
    }
}

/// Sends `m<i>` (with a nonce) every 5 ms until `stop`, without waiting
/// for answers (as a busy client does); returns what was acked and what
/// was refused once every message is answered.
async fn publisher(mut p: Peer, stop: Arc<AtomicBool>) -> (Vec<String>, Vec<String>, Peer) {
    let (mut acked, mut refused) = (Vec::new(), Vec::new());
    let mut waiting: HashMap<u64, String> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    let mut i: u64 = 0;
    let mut deadline = None;
    loop {
        let sending = !stop.load(Ordering::Relaxed);
        if !sending {
            if waiting.is_empty() {
                break;
            }
            let d = *deadline.get_or_insert(Instant::now() + Duration::from_secs(30));
            assert!(
                Instant::now() < d,
                "{} messages never answered",
                waiting.len()
            );
        }
        tokio::select! {
            _ = tick.tick(), if sending => {
                let (id, content) = (100_000 + i, format!("m{i}"));
                p.send(json!({
                    "t": "message:send",
                    "id": id,
                    "d": {"channelId": CHANNEL, "content": content, "nonce": format!("n{i}")}
                }))
                .await;
                waiting.insert(id, content);
                i += 1;
            }
            v = recv(&mut p.ws) => {
                let Some(content) = v["id"].as_u64().and_then(|id| waiting.remove(&id)) else {
                    continue;
                };
                match v["t"].as_str() {
                    Some("ack") => acked.push(content),
                    _ => refused.push(format!("{content}: {}", v["d"]["message"])),
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(100)), if !sending => {}
        }
    }
    (acked, refused, p)
}

/// Runs the publisher and a member on each node around `fault`, then
/// checks that every acked message reached both members, once per epoch.
/// Returns what was refused, and what `fault` gave.
async fn around<T>(
    a: &Server,
    b: &Server,
    fault: impl std::future::Future<Output = T>,
) -> (Vec<String>, T) {
    let pubr = Peer::on(a, "publisher", 0, "").await;
    let ma = Peer::on(a, "member-a", 1, "").await;
    let mb = Peer::on(b, "member-b", 0, "").await;
    let ma = tokio::spawn(member(ma, "member on node a"));
    let mb = tokio::spawn(member(mb, "member on node b"));
    // The members are in before anything is published.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut pubr = pubr;
    pubr.ok("channel:join", json!({"channelId": CHANNEL})).await;
    let stop = Arc::new(AtomicBool::new(false));
    let sender = tokio::spawn(publisher(pubr, stop.clone()));
    tokio::time::sleep(Duration::from_millis(800)).await;
    let out = fault.await;
    wait_cluster(a, 1);
    wait_cluster(b, 1);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let (acked, refused, mut pubr) = sender.await.unwrap();
    // The end, once Redis takes it.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = pubr
            .request(
                "message:send",
                json!({"channelId": CHANNEL, "content": "end"}),
            )
            .await;
        if v["t"] == "ack" {
            break;
        }
        assert!(Instant::now() < deadline, "the end was never taken: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let wait = Duration::from_secs(60);
    let logs = || format!("node a:\n{}\nnode b:\n{}", a.log(), b.log());
    let ca = tokio::time::timeout(wait, ma)
        .await
        .unwrap_or_else(|_| panic!("the member on node a never got the end\n{}", logs()))
        .unwrap();
    let cb = tokio::time::timeout(wait, mb)
        .await
        .unwrap_or_else(|_| panic!("the member on node b never got the end\n{}", logs()))
        .unwrap();
    assert!(acked.len() > 100, "too few acked: {}", acked.len());
    for (label, c) in [("node a", &ca), ("node b", &cb)] {
        assert!(c.twice.is_empty(), "{label}: {:?}", c.twice);
        let missing: Vec<&String> = acked.iter().filter(|m| !c.has(m)).collect();
        assert!(
            missing.is_empty(),
            "{label} never got {} acked messages ({} acked, {} refused, {} recoveries), first {:?}\n{}",
            missing.len(),
            acked.len(),
            refused.len(),
            c.recoveries,
            &missing[..missing.len().min(5)],
            logs()
        );
    }
    eprintln!(
        "acked {}, refused {}, recoveries a {} b {}",
        acked.len(),
        refused.len(),
        ca.recoveries,
        cb.recoveries
    );
    (refused, out)
}

#[tokio::test]
async fn redis_paused_past_every_timeout_loses_no_acked_message() {
    let redis = Redis::start();
    let (a, b) = (fault_node(&redis), fault_node(&redis));
    around(&a, &b, async {
        signal(&redis, "STOP");
        // Past the link's timeout (1 s), the node timeout (2 s) and any
        // request's timeout (5 s).
        tokio::time::sleep(Duration::from_secs(6)).await;
        signal(&redis, "CONT");
    })
    .await;
}

#[tokio::test]
async fn redis_at_its_memory_limit_refuses_and_loses_no_acked_message() {
    let redis = Redis::start();
    let (a, b) = (fault_node(&redis), fault_node(&redis));
    let (refused, ()) = around(&a, &b, async {
        // Just above what Redis uses now: the log soon fills it.
        let used: u64 = redis_cli(&redis, &["MEMORY", "STATS"])
            .lines()
            .skip_while(|l| *l != "total.allocated")
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or(1 << 20);
        let limit = (used + 64 * 1024).to_string();
        redis_cli(&redis, &["CONFIG", "SET", "maxmemory", &limit]);
        redis_cli(&redis, &["CONFIG", "SET", "maxmemory-policy", "noeviction"]);
        tokio::time::sleep(Duration::from_secs(3)).await;
        redis_cli(&redis, &["CONFIG", "SET", "maxmemory", "0"]);
    })
    .await;
    assert!(
        refused.iter().any(|r| r.contains("OOM")),
        "a full Redis refuses: {:?}",
        &refused[..refused.len().min(3)]
    );
}

#[tokio::test]
async fn redis_restarted_empty_loses_no_acked_message() {
    let mut redis = Redis::start();
    let (a, b) = (fault_node(&redis), fault_node(&redis));
    let port = redis.port;
    let (_, _redis) = around(&a, &b, async move {
        redis.kill();
        tokio::time::sleep(Duration::from_secs(3)).await;
        Redis::start_on(port)
    })
    .await;
}

#[tokio::test]
async fn a_redis_cluster_master_killed_mid_stream_fails_over_and_loses_no_acked_message() {
    // Three masters with a replica each; a replica takes over a second
    // after its master stops answering.
    let mut rc = RedisCluster::start_with(1, &["--cluster-node-timeout", "1000"]);
    let start = || {
        let s = Server::start(&[
            "--shards",
            "2",
            "--redis-cluster",
            &rc.urls(),
            "--node-timeout-ms",
            NODE_TIMEOUT_MS,
        ]);
        wait_cluster(&s, 1);
        s
    };
    let (a, b) = (start(), start());
    let port = rc.master_of(CHANNEL).port;
    let rc = &mut rc;
    around(&a, &b, async move {
        // The master of the channel's slot dies without a word.
        let dead = rc.masters.iter_mut().find(|m| m.port == port).unwrap();
        dead.kill();
        let deadline = Instant::now() + Duration::from_secs(30);
        while rc.try_master_of(CHANNEL).is_none_or(|m| m.port == port) {
            assert!(Instant::now() < deadline, "no replica took over");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
}

fn signal(redis: &Redis, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &redis.child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig}");
}

/// Runs `sequence.lua` once on `redis` for channel `c` with one event;
/// returns the epoch it answered.
fn sequence_once(redis: &Redis, fresh_epoch: &str) -> String {
    let script = include_str!("../../src/cluster/scripts/sequence.lua");
    let out = redis_cli(
        redis,
        &[
            "EVAL",
            script,
            "3",
            "cc:{c}:meta",
            "cc:{c}:log",
            "cc:{c}:nonces",
            "cc:{c}",
            fresh_epoch,
            "100",
            "60000",
            "PUBLISH",
            "0",
            "\"c\"",
            "an event",
            "",
        ],
    );
    out.lines().next().unwrap().to_string()
}

#[test]
fn a_promoted_replica_starts_each_channel_over_under_a_new_epoch() {
    // What a replica lacks of its dead master's last writes must not be
    // given again under the same epoch: on a promoted replica (a new
    // replication id) the channel starts over.
    let mut master = Redis::start();
    let replica = Redis::start();
    assert_eq!(sequence_once(&master, "e1"), "e1");
    assert_eq!(
        sequence_once(&master, "unused"),
        "e1",
        "the same Redis keeps it"
    );
    redis_cli(
        &replica,
        &["REPLICAOF", "127.0.0.1", &master.port.to_string()],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !redis_cli(&replica, &["INFO", "replication"]).contains("master_link_status:up") {
        assert!(Instant::now() < deadline, "the replica never synced");
        std::thread::sleep(Duration::from_millis(50));
    }
    while redis_cli(&replica, &["EXISTS", "cc:{c}:meta"]) != "1" {
        assert!(
            Instant::now() < deadline,
            "the channel never reached the replica"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    master.kill();
    redis_cli(&replica, &["REPLICAOF", "NO", "ONE"]);
    assert_eq!(sequence_once(&replica, "e2"), "e2", "promoted: a new epoch");
    assert_eq!(
        redis_cli(&replica, &["XLEN", "cc:{c}:log"]),
        "1",
        "started over"
    );
    assert_eq!(sequence_once(&replica, "unused"), "e2");
}
