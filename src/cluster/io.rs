//! The bridge's IO loop: moves bytes between the node's mesh, the core
//! (`super::core`) and Redis, and decides nothing. Each round it takes
//! what the shards sent, lets the core gather it, and sends every
//! operation the core asks for at once: on one Redis, in one pipeline (one
//! write, one read); on a Redis Cluster, the operations of each key one
//! after the other and the keys side by side. One round is in flight at a
//! time, so what reaches Redis keeps the order the core gave it; what
//! comes in meanwhile makes the next round bigger. Answers and published
//! messages go back to the core.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use redis::{RedisError, Value};

use super::core::{Core, LinkCmd, OpId, Settings};
use super::keys;
use super::link::{Conn, Pushes, Subs, Target};
use super::ops::{Fault, Op, Outcome, Reply};
use crate::engine::ShardId;
use crate::node::Node;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The Lua scripts, loaded on every connection (on every master of a Redis
/// Cluster), and run by their digest.
#[derive(Clone)]
pub struct Scripts {
    pub sequence: Arc<redis::Script>,
    pub load: Arc<redis::Script>,
    pub members: Arc<redis::Script>,
    pub presence: Arc<redis::Script>,
    pub moderate: Arc<redis::Script>,
    pub heartbeat: Arc<redis::Script>,
    pub notifications: Arc<redis::Script>,
    pub conversation: Arc<redis::Script>,
    pub trim_stream: Arc<redis::Script>,
    pub stream_extras: Arc<redis::Script>,
}

impl Scripts {
    pub fn new() -> Scripts {
        let s = |src: &str| Arc::new(redis::Script::new(src));
        Scripts {
            sequence: s(include_str!("scripts/sequence.lua")),
            trim_stream: s(include_str!("scripts/trim_stream.lua")),
            stream_extras: s(include_str!("scripts/stream_extras.lua")),
            load: s(include_str!("scripts/load.lua")),
            members: s(include_str!("scripts/members.lua")),
            presence: s(include_str!("scripts/presence.lua")),
            moderate: s(include_str!("scripts/moderate.lua")),
            heartbeat: s(include_str!("scripts/heartbeat.lua")),
            notifications: s(include_str!("scripts/notifications.lua")),
            conversation: s(include_str!("scripts/conversation.lua")),
        }
    }

    fn all(&self) -> [&redis::Script; 8] {
        [
            &self.sequence,
            &self.load,
            &self.members,
            &self.presence,
            &self.moderate,
            &self.heartbeat,
            &self.notifications,
            &self.conversation,
        ]
    }
}

impl Default for Scripts {
    fn default() -> Self {
        Scripts::new()
    }
}

/// A link to Redis: commands, subscriptions, and what they receive.
struct Link {
    conn: Conn,
    sink: Subs,
    stream: Pushes,
    /// On one Redis, a round's operations go in one pipeline.
    pipelined: bool,
}

type Batch = Pin<Box<dyn Future<Output = Vec<(OpId, Result<Reply, Fault>)>>>>;

/// Starts the bridge's thread; `bell` is the receiving end of its mesh
/// doorbell. The thread ends when the node drains.
pub fn spawn(
    node: Arc<Node>,
    bell: std::os::unix::net::UnixStream,
) -> std::io::Result<std::thread::JoinHandle<std::io::Result<()>>> {
    std::thread::Builder::new()
        .name("corecast-bridge".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let bell = tokio::net::UnixStream::from_std(bell)?;
                run(node, bell).await;
                Ok(())
            })
        })
}

async fn run(node: Arc<Node>, mut bell: tokio::net::UnixStream) {
    let config = &node.config;
    let shown = config.redis_shown();
    let target = match Target::new(&config.redis, &config.redis_cluster) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(redis = %shown, error = %e, "cannot use the Redis URL; the node stays alone");
            return;
        }
    };
    let (id, metrics) = node.cluster.clone().expect("cluster mode");
    let round_trips = metrics.clone();
    let shards = node.shards();
    let me = crate::mesh::bridge_endpoint(shards);
    let started = Instant::now();
    let now = || started.elapsed().as_millis() as u64;
    let mut core = Core::new(
        id,
        shards,
        Settings::of(config),
        metrics,
        crate::clock::random_u64(),
    );
    let scripts = Scripts::new();
    let mut link: Option<Link> = None;
    let mut in_flight: FuturesUnordered<Batch> = FuturesUnordered::new();
    let mut queued: Vec<(OpId, Op)> = Vec::new();
    let mut leaving: Option<(OpId, Instant)> = None;
    loop {
        while let Some(cmd) = core.poll_link() {
            match cmd {
                LinkCmd::Connect { base } => match connect(&target, &scripts, &base).await {
                    Ok(l) => {
                        link = Some(l);
                        core.connected(now());
                    }
                    Err(e) => core.connect_failed(&e.to_string(), now()),
                },
                LinkCmd::Drop => {
                    link = None;
                    in_flight = FuturesUnordered::new();
                    queued.clear();
                }
            }
        }
        if node.is_draining() && leaving.is_none() {
            match core.leave(now()) {
                Some(op) => leaving = Some((op, Instant::now())),
                None => return,
            }
        }
        if let Some((op, since)) = leaving {
            if !core.is_pending(op) {
                tracing::info!("cluster: left the live nodes");
                return;
            }
            if since.elapsed() > Duration::from_secs(2) {
                tracing::warn!("cluster: leaving the live nodes timed out");
                return;
            }
        }
        let mut took = 0;
        if !core.busy() {
            let t = now();
            for from in 0..shards as ShardId {
                while let Some(m) = node.mesh.pop(from, me) {
                    core.from_shard(m, t);
                    took += 1;
                }
            }
        }
        let t = now();
        core.tick(t);
        core.flush(t);
        while let Some(op) = core.poll_op() {
            queued.push(op);
        }
        // One round in flight at a time: what the core asked meanwhile
        // goes in the next, in order.
        if !queued.is_empty() && in_flight.is_empty() {
            let ops = std::mem::take(&mut queued);
            match &link {
                Some(l) => {
                    round_trips.rounds.inc();
                    round_trips.ops.add(ops.len() as u64);
                    in_flight.push(run_ops(l, &scripts, ops))
                }
                None => {
                    for (id, _) in ops {
                        core.answered(id, Err(Fault::Lost("no link".into())), now());
                    }
                }
            }
        }
        while let Some((to, msg)) = core.poll_mesh() {
            send_mesh(&node, me, to, msg).await;
        }
        if took > 0 {
            // More may have come meanwhile: take it before sleeping.
            tokio::task::yield_now().await;
            continue;
        }
        let wait = core
            .next_deadline()
            .map(|d| Duration::from_millis(d.saturating_sub(now())))
            .unwrap_or(Duration::from_secs(1))
            .min(Duration::from_secs(1));
        let parked = !core.busy() && node.mesh.park(me);
        if !core.busy() && !parked {
            // A shard sent something between the last look and parking.
            tokio::task::yield_now().await;
            continue;
        }
        tokio::select! {
            biased;
            Some(answers) = in_flight.next(), if !in_flight.is_empty() => {
                node.mesh.unpark(me);
                let t = now();
                for (id, r) in answers {
                    core.answered(id, r, t);
                }
            }
            m = next_push(&mut link) => {
                node.mesh.unpark(me);
                match m {
                    Some(p) => core.pushed(p.channel(), p.payload(), now()),
                    None => {
                        link = None;
                        in_flight = FuturesUnordered::new();
                        queued.clear();
                        core.lost("the pub/sub connection closed", now());
                    }
                }
            }
            r = bell.readable(), if parked => {
                node.mesh.unpark(me);
                if r.is_err() || !drain_bell(&mut bell) {
                    return;
                }
            }
            _ = tokio::time::sleep(wait) => {
                node.mesh.unpark(me);
            }
        }
    }
}

/// The next published message, or `None` once the link's subscriptions
/// end; pending forever without a link.
async fn next_push(link: &mut Option<Link>) -> Option<super::link::Push> {
    match link {
        Some(l) => l.stream.next().await,
        None => std::future::pending().await,
    }
}

/// Empties the doorbell; false when the node's end is gone.
fn drain_bell(bell: &mut tokio::net::UnixStream) -> bool {
    let mut buf = [0u8; 64];
    loop {
        match bell.try_read(&mut buf) {
            Ok(0) => return false,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
            Err(_) => return false,
        }
    }
}

/// Sends a message to a shard, waiting while its queue is full.
async fn send_mesh(node: &Node, me: ShardId, to: ShardId, mut msg: crate::engine::MeshMsg) {
    while let Err(back) = node.mesh.send(me, to, msg) {
        if node.is_draining() {
            return;
        }
        msg = back;
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

async fn connect(
    target: &Target,
    scripts: &Scripts,
    base: &[(String, bool)],
) -> Result<Link, RedisError> {
    // Operations are timed by the core (an answer late by half the node
    // timeout drops the link); the connection's own limit is a backstop.
    let (mut conn, mut sink, stream) = target
        .connect(CONNECT_TIMEOUT, Duration::from_secs(60))
        .await?;
    // Loaded up front (on every master of a cluster): a script loaded on
    // first use would run some events after others sent later.
    for s in scripts.all() {
        s.load_async(&mut conn).await?;
    }
    for (name, sharded) in base {
        if *sharded {
            sink.follow(name).await?;
        } else {
            sink.subscribe_all(name).await?;
        }
    }
    let pipelined = matches!(conn, Conn::One(_));
    Ok(Link {
        conn,
        sink,
        stream,
        pipelined,
    })
}

fn fault(e: &RedisError) -> Fault {
    if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() || e.is_unrecoverable_error()
    {
        Fault::Lost(e.to_string())
    } else {
        Fault::Refused(e.to_string())
    }
}

/// Runs a round's operations; answers each (in any order). Operations
/// touching the same key reach Redis in the order given: on one Redis the
/// pipeline keeps it; on a Redis Cluster those with the same key run one
/// after the other, the rest side by side. The loop sends the next round
/// only once this one is answered, so rounds keep their order too.
/// Subscriptions go on the pub/sub connection meanwhile.
fn run_ops(link: &Link, scripts: &Scripts, ops: Vec<(OpId, Op)>) -> Batch {
    let conn = link.conn.clone();
    let sink = link.sink.clone();
    let scripts = scripts.clone();
    let pipelined = link.pipelined;
    Box::pin(async move {
        let mut subs = Vec::new();
        let mut nodes = Vec::new();
        let mut data = Vec::new();
        for (id, op) in ops {
            match op {
                Op::Subscribe { .. } | Op::Unsubscribe { .. } => subs.push((id, op)),
                Op::ForgetNode { .. } | Op::Leave { .. } => nodes.push((id, op)),
                op => data.push((id, op)),
            }
        }
        let subscriptions = async {
            let mut out = Vec::with_capacity(subs.len());
            for (id, op) in subs {
                let r = match op {
                    Op::Subscribe { names, .. } => subscribe(sink.clone(), &names, true).await,
                    Op::Unsubscribe { names, .. } => subscribe(sink.clone(), &names, false).await,
                    _ => unreachable!("only subscriptions here"),
                };
                out.push((id, r));
            }
            out
        };
        let commands = async {
            let mut out = match pipelined {
                true => pipeline(conn.clone(), &scripts, data).await,
                false => each_key(conn.clone(), &scripts, data).await,
            };
            // Cleaning up after nodes spans many keys: after the rest.
            for (id, op) in nodes {
                let r = match op {
                    Op::ForgetNode { node } => forget_node(conn.clone(), node).await,
                    Op::Leave { node } => leave(conn.clone(), node).await,
                    _ => unreachable!("only nodes here"),
                };
                out.push((id, r.map(|_| Reply::Done).map_err(|e| fault(&e))));
            }
            out
        };
        let (mut a, b) = futures_util::future::join(subscriptions, commands).await;
        a.extend(b);
        a
    })
}

/// On a Redis Cluster: the operations of each key in order, the keys side
/// by side.
async fn each_key(
    conn: Conn,
    scripts: &Scripts,
    ops: Vec<(OpId, Op)>,
) -> Vec<(OpId, Result<Reply, Fault>)> {
    let mut runs: Vec<Vec<(OpId, Op)>> = Vec::new();
    let mut index: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for (id, op) in ops {
        match op.order_key().map(str::to_string) {
            Some(k) => match index.get(&k) {
                Some(&i) => runs[i].push((id, op)),
                None => {
                    index.insert(k, runs.len());
                    runs.push(vec![(id, op)]);
                }
            },
            None => runs.push(vec![(id, op)]),
        }
    }
    let mut each: FuturesUnordered<_> = runs
        .into_iter()
        .map(|run| {
            let (mut conn, scripts) = (conn.clone(), scripts.clone());
            async move {
                let mut out = Vec::with_capacity(run.len());
                for (id, op) in run {
                    out.push((id, one(&mut conn, &scripts, &op).await));
                }
                out
            }
        })
        .collect();
    let mut out = Vec::new();
    while let Some(r) = each.next().await {
        out.extend(r);
    }
    out
}

/// One operation's commands one after the other (a script Redis does not
/// have is sent again with its text).
async fn one(conn: &mut Conn, scripts: &Scripts, op: &Op) -> Result<Reply, Fault> {
    let mut values = Vec::new();
    let mut text = false;
    let mut cmds = commands(op, scripts).into_iter();
    while let Some(c) = cmds.next() {
        match c.query_async::<Value>(conn).await {
            Ok(v) => values.push(v),
            Err(e) if e.code() == Some("NOSCRIPT") && !text => {
                text = true;
                let again = commands_with_source(op, scripts);
                let skip = values.len();
                cmds = again.into_iter().skip(skip).collect::<Vec<_>>().into_iter();
            }
            Err(e) => return Err(fault(&e)),
        }
    }
    parse(op, values)
}

/// Leaves the live nodes (on its own: it runs when the node stops).
pub async fn leave(mut conn: Conn, node: u64) -> Result<(), RedisError> {
    redis::cmd("ZREM")
        .arg(keys::NODES)
        .arg(keys::node_name(node))
        .query_async::<i64>(&mut conn)
        .await?;
    forget_node(conn, node).await
}

/// Follows or stops following (`on`) channels and users: sharded pub/sub
/// on a Redis Cluster (the link knows which it is).
async fn subscribe(mut sink: Subs, names: &[String], on: bool) -> Result<Reply, Fault> {
    sink.follow_many(names, on).await.map_err(|e| fault(&e))?;
    Ok(Reply::Done)
}

/// One pipeline for every operation of the round (one Redis): one write,
/// one read. Commands Redis refused are answered one by one; a script
/// Redis does not have (a fresh Redis, a promoted replica) is sent again
/// whole.
async fn pipeline(
    mut conn: Conn,
    scripts: &Scripts,
    ops: Vec<(OpId, Op)>,
) -> Vec<(OpId, Result<Reply, Fault>)> {
    if ops.is_empty() {
        return Vec::new();
    }
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    let mut counts = Vec::with_capacity(ops.len());
    for (_, op) in &ops {
        let cmds = commands(op, scripts);
        counts.push(cmds.len());
        for c in cmds {
            pipe.add_command(c);
        }
    }
    let values: Vec<Value> = match pipe.query_async(&mut conn).await {
        Ok(v) => v,
        Err(e) => {
            let f = fault(&e);
            return ops
                .into_iter()
                .map(|(id, _)| (id, Err(f.clone())))
                .collect();
        }
    };
    let mut values = values.into_iter();
    let mut out = Vec::with_capacity(ops.len());
    for ((id, op), n) in ops.into_iter().zip(counts) {
        let vs: Vec<Value> = values.by_ref().take(n).collect();
        let noscript = vs
            .iter()
            .any(|v| matches!(v, Value::ServerError(e) if e.code() == "NOSCRIPT"));
        if noscript {
            // Sent again with the scripts' text (which also loads them).
            let mut again = Vec::with_capacity(n);
            for c in commands_with_source(&op, scripts) {
                match c.query_async::<Value>(&mut conn).await {
                    Ok(v) => again.push(v),
                    Err(e) => {
                        out.push((id, Err(fault(&e))));
                        continue;
                    }
                }
            }
            out.push((id, parse(&op, again)));
        } else {
            out.push((id, parse(&op, vs)));
        }
    }
    out
}

fn evalsha(script: &redis::Script, keys: &[&str]) -> redis::Cmd {
    let mut c = redis::cmd("EVALSHA");
    c.arg(script.get_hash()).arg(keys.len()).arg(keys);
    c
}

/// The commands of an operation (scripts by digest).
fn commands(op: &Op, s: &Scripts) -> Vec<redis::Cmd> {
    commands_of(op, s, false)
}

/// The same, scripts by their text.
fn commands_with_source(op: &Op, s: &Scripts) -> Vec<redis::Cmd> {
    commands_of(op, s, true)
}

fn script_cmd(script: &redis::Script, source: Option<&str>, keys: &[&str]) -> redis::Cmd {
    match source {
        Some(src) => {
            let mut c = redis::cmd("EVAL");
            c.arg(src).arg(keys.len()).arg(keys);
            c
        }
        None => evalsha(script, keys),
    }
}

fn commands_of(op: &Op, s: &Scripts, text: bool) -> Vec<redis::Cmd> {
    let script = |sc: &redis::Script, source: &'static str, keys: &[&str]| {
        script_cmd(sc, text.then_some(source), keys)
    };
    let publish = |sharded: bool| if sharded { "SPUBLISH" } else { "PUBLISH" };
    match op {
        Op::Sequence {
            channel,
            fresh_epoch,
            depth,
            ttl_ms,
            sharded,
            stream,
            events,
        } => {
            let [meta, log, nonces] = keys::channel_keys(channel);
            let stream_key = stream.as_ref().map_or("", |(k, _)| &**k);
            let keys: &[&str] = match stream {
                Some(_) => &[&meta, &log, &nonces, stream_key],
                None => &[&meta, &log, &nonces],
            };
            let mut c = script(&s.sequence, include_str!("scripts/sequence.lua"), keys);
            c.arg(keys::channel(channel))
                .arg(fresh_epoch)
                .arg(depth)
                .arg(ttl_ms)
                .arg(publish(*sharded))
                .arg(stream.as_ref().map_or(0, |(_, max)| *max))
                .arg(serde_json::to_string(&**channel).expect("a string"));
            for (archive, nonce, line) in events {
                c.arg(archive.as_slice()).arg(nonce);
                if stream.is_some() {
                    match line {
                        Some(l) => c
                            .arg(l.line.json.as_slice())
                            .arg(l.line.id_at)
                            .arg(l.line.offset_at)
                            .arg(l.line.at)
                            .arg(l.must as u8),
                        // Not a sequenced kind: not in the stream.
                        None => c.arg("").arg(0).arg(0).arg(0).arg(1),
                    };
                }
            }
            vec![c]
        }
        Op::Load {
            channel,
            fresh_epoch,
            depth,
            ttl_ms,
        } => {
            let [meta, log, nonces] = keys::channel_keys(channel);
            let members = keys::members(channel);
            let mut c = script(
                &s.load,
                include_str!("scripts/load.lua"),
                &[&meta, &log, &members, &nonces],
            );
            c.arg(depth).arg(fresh_epoch).arg(ttl_ms);
            vec![c]
        }
        Op::Publish {
            name,
            payload,
            sharded,
        } => {
            let mut c = redis::cmd(publish(*sharded));
            c.arg(name).arg(payload.as_slice());
            vec![c]
        }
        Op::Members {
            channel,
            node,
            count,
            sharded,
            payload,
        } => {
            let name = keys::node_name(*node);
            let mut c = script(
                &s.members,
                include_str!("scripts/members.lua"),
                &[&keys::members(channel)],
            );
            c.arg(&name)
                .arg(count)
                .arg(publish(*sharded))
                .arg(keys::channel(channel))
                .arg(payload.as_slice());
            let mut set = redis::cmd(if *count == 0 { "SREM" } else { "SADD" });
            set.arg(keys::node_channels(&name)).arg(&**channel);
            vec![c, set]
        }
        Op::Presence {
            user,
            node,
            archive,
            offline,
            sharded,
            payload,
        } => {
            let name = keys::node_name(*node);
            let mut c = script(
                &s.presence,
                include_str!("scripts/presence.lua"),
                &[&keys::presence(user)],
            );
            c.arg(&name)
                .arg(archive.as_slice())
                .arg(if *offline { "1" } else { "0" })
                .arg(publish(*sharded))
                .arg(keys::user(user))
                .arg(payload.as_slice());
            let mut set = redis::cmd(if *offline { "SREM" } else { "SADD" });
            set.arg(keys::node_users(&name)).arg(&**user);
            vec![c, set]
        }
        Op::ReadPresence { users } => users
            .iter()
            .map(|u| {
                let mut c = redis::cmd("HGETALL");
                c.arg(keys::presence(u));
                c
            })
            .collect(),
        Op::Notifications {
            user,
            op,
            sharded,
            payload,
            max,
            ttl_ms,
            args,
        } => {
            let mut c = script(
                &s.notifications,
                include_str!("scripts/notifications.lua"),
                &[&keys::notifications(user)],
            );
            c.arg(*op)
                .arg(publish(*sharded))
                .arg(keys::user(user))
                .arg(payload.as_slice())
                .arg(max)
                .arg(ttl_ms);
            for a in args {
                c.arg(a);
            }
            vec![c]
        }
        Op::ReadNotifications { user } => {
            let mut c = redis::cmd("HVALS");
            c.arg(keys::notifications(user));
            vec![c]
        }
        Op::Conversation {
            user,
            peer,
            timestamp,
            json,
            incoming,
            max,
            ttl_ms,
        } => {
            let mut c = script(
                &s.conversation,
                include_str!("scripts/conversation.lua"),
                &[&keys::conversations(user)],
            );
            c.arg(&**peer)
                .arg(timestamp)
                .arg(json)
                .arg(if *incoming { "1" } else { "0" })
                .arg(max)
                .arg(ttl_ms);
            vec![c]
        }
        Op::ReadConversations { user } => {
            let mut c = redis::cmd("HGETALL");
            c.arg(keys::conversations(user));
            vec![c]
        }
        Op::KeepSession {
            user,
            session,
            points,
            ttl_ms,
        } => {
            let mut c = redis::cmd("SET");
            c.arg(keys::session(user, session))
                .arg(points)
                .arg("PX")
                .arg((*ttl_ms).max(1));
            vec![c]
        }
        Op::TakeSession { user, session } => {
            let mut c = redis::cmd("GETDEL");
            c.arg(keys::session(user, session));
            vec![c]
        }
        Op::Moderate {
            field,
            op,
            json,
            payload,
        } => {
            let mut c = script(
                &s.moderate,
                include_str!("scripts/moderate.lua"),
                &[keys::BANS],
            );
            c.arg(field).arg(*op).arg(json).arg(payload.as_slice());
            vec![c]
        }
        Op::ReadBans => {
            let mut c = redis::cmd("HGETALL");
            c.arg(keys::BANS);
            vec![c]
        }
        Op::DropBans { fields } => {
            let mut c = redis::cmd("HDEL");
            c.arg(keys::BANS).arg(fields);
            vec![c]
        }
        Op::StreamExtras { key, max, lines } => {
            let mut c = script(
                &s.stream_extras,
                include_str!("scripts/stream_extras.lua"),
                &[key],
            );
            c.arg(max);
            for l in lines {
                c.arg(l.as_slice());
            }
            vec![c]
        }
        Op::TrimStream { key } => {
            vec![script(
                &s.trim_stream,
                include_str!("scripts/trim_stream.lua"),
                &[key],
            )]
        }
        Op::Heartbeat { node, silent_ms } => {
            let mut c = script(
                &s.heartbeat,
                include_str!("scripts/heartbeat.lua"),
                &[keys::NODES, keys::NODES_BEAT],
            );
            c.arg(keys::node_name(*node)).arg(silent_ms);
            vec![c]
        }
        // Run on their own (`run_ops`).
        Op::Subscribe { .. }
        | Op::Unsubscribe { .. }
        | Op::ForgetNode { .. }
        | Op::Leave { .. } => Vec::new(),
    }
}

/// An operation's reply from its commands' values.
fn parse(op: &Op, values: Vec<Value>) -> Result<Reply, Fault> {
    let bad = |what: &str| Fault::Refused(format!("an unexpected answer from Redis: {what}"));
    for v in &values {
        if let Value::ServerError(e) = v {
            return Err(Fault::Refused(format!(
                "{} {}",
                e.code(),
                e.details().unwrap_or("")
            )));
        }
    }
    let mut values = values.into_iter();
    let first = values.next().unwrap_or(Value::Nil);
    let conv = |v: Value| -> Result<Value, Fault> { Ok(v) };
    match op {
        Op::Sequence { .. } => {
            let Value::Array(parts) = conv(first)? else {
                return Err(bad("sequence"));
            };
            let mut parts = parts.into_iter();
            let epoch: String = parts
                .next()
                .and_then(|v| redis::from_redis_value(v).ok())
                .ok_or_else(|| bad("sequence epoch"))?;
            let nums: Vec<i64> = parts
                .map(redis::from_redis_value)
                .collect::<Result<_, _>>()
                .map_err(|_| bad("sequence offsets"))?;
            let results = nums
                .chunks(2)
                .map(|c| match c.get(1) {
                    Some(1) => Outcome::Again(c[0].max(0) as u64),
                    Some(2) => Outcome::Full,
                    _ => Outcome::New(c[0].max(0) as u64),
                })
                .collect();
            Ok(Reply::Sequenced { epoch, results })
        }
        Op::Load { .. } => parse_load(first).map_err(|e| bad(&e)),
        Op::Publish { .. } | Op::StreamExtras { .. } => redis::from_redis_value::<i64>(first)
            .map(Reply::Count)
            .map_err(|_| bad("publish")),
        Op::ReadPresence { .. } => {
            let all = std::iter::once(first)
                .chain(values)
                .map(redis::from_redis_value::<Vec<(String, Vec<u8>)>>)
                .collect::<Result<_, _>>()
                .map_err(|_| bad("presence"))?;
            Ok(Reply::Presences(all))
        }
        Op::TakeSession { .. } => redis::from_redis_value::<Option<String>>(first)
            .map(Reply::Taken)
            .map_err(|_| bad("session")),
        Op::ReadNotifications { .. } => redis::from_redis_value::<Vec<String>>(first)
            .map(Reply::Strings)
            .map_err(|_| bad("notifications")),
        Op::ReadConversations { .. } | Op::ReadBans => {
            redis::from_redis_value::<Vec<(String, String)>>(first)
                .map(Reply::Pairs)
                .map_err(|_| bad("hash"))
        }
        Op::TrimStream { .. } => {
            let (length, trimmed): (u64, u64) =
                redis::from_redis_value(first).map_err(|_| bad("trim"))?;
            Ok(Reply::Trimmed { length, trimmed })
        }
        Op::Heartbeat { .. } => {
            let (new, removed, live): (i64, Vec<String>, Vec<String>) =
                redis::from_redis_value(first).map_err(|_| bad("heartbeat"))?;
            Ok(Reply::Beat {
                new: new == 1,
                removed,
                live,
            })
        }
        _ => Ok(Reply::Done),
    }
}

/// Reads the answer of the `load` script.
fn parse_load(v: Value) -> Result<Reply, String> {
    let Value::Array(parts) = v else {
        return Err("not an array".into());
    };
    let [offset, epoch, entries, members] =
        <[Value; 4]>::try_from(parts).map_err(|_| "length".to_string())?;
    let offset: u64 = redis::from_redis_value(offset).map_err(|e| e.to_string())?;
    let epoch: String = redis::from_redis_value(epoch).map_err(|e| e.to_string())?;
    let Value::Array(entries) = entries else {
        return Err("entries".into());
    };
    let mut out = Vec::with_capacity(entries.len());
    for e in entries {
        let (id, fields): (String, Vec<Vec<u8>>) =
            redis::from_redis_value(e).map_err(|e| e.to_string())?;
        let offset: u64 = id
            .split('-')
            .next()
            .and_then(|o| o.parse().ok())
            .ok_or("entry id")?;
        let archive = fields.into_iter().nth(1).ok_or("entry fields")?;
        out.push((offset, archive));
    }
    let members: Vec<(String, u32)> =
        redis::from_redis_value(members).map_err(|e| e.to_string())?;
    Ok(Reply::Loaded {
        offset,
        epoch,
        entries: out,
        members,
    })
}

/// Removes a gone node's parts from Redis and tells the other nodes.
async fn forget_node(mut conn: Conn, node: u64) -> Result<(), RedisError> {
    let name = keys::node_name(node);
    let users: Vec<String> = redis::cmd("SMEMBERS")
        .arg(keys::node_users(&name))
        .query_async(&mut conn)
        .await?;
    let channels: Vec<String> = redis::cmd("SMEMBERS")
        .arg(keys::node_channels(&name))
        .query_async(&mut conn)
        .await?;
    // Many at once (a node may have had many users), in no order.
    let mut dels: FuturesUnordered<_> = users
        .iter()
        .map(|u| keys::presence(u))
        .chain(channels.iter().map(|c| keys::members(c)))
        .map(|key| {
            let (mut conn, name) = (conn.clone(), name.clone());
            async move {
                redis::cmd("HDEL")
                    .arg(key)
                    .arg(name)
                    .query_async::<i64>(&mut conn)
                    .await
            }
        })
        .collect();
    while let Some(r) = dels.next().await {
        r?;
    }
    redis::cmd("DEL")
        .arg(keys::node_users(&name))
        .arg(keys::node_channels(&name))
        .query_async::<i64>(&mut conn)
        .await?;
    let gone = super::wire::payload(&[super::wire::NodeMsg::Gone(node)]);
    redis::cmd("PUBLISH")
        .arg(keys::GONE)
        .arg(gone)
        .query_async::<i64>(&mut conn)
        .await?;
    Ok(())
}
