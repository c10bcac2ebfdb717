//! The cluster bridge: one thread per node that talks to Redis for the
//! shards (the `redis` crate on a tokio current-thread runtime). It is an
//! endpoint of the node's mesh, like the server API's thread; the engine's
//! side of cluster mode is in `engine::cluster`.
//!
//! Redis keys and channels, for a corecast channel `C`, a user `U` and a
//! node `N` (the braces are hash tags: a channel's or a user's keys and
//! channels share a Redis Cluster slot):
//!
//! | key | type | holds | bounded by |
//! |---|---|---|---|
//! | `cc:{C}:meta` | hash | the channel's `epoch` and last `offset` | expires `history_ttl_ms` after the last event |
//! | `cc:{C}:log` | stream | the last `history_size` sequenced events (entry id `offset-1`) | `MAXLEN ~ history_size`, the same expiry |
//! | `cc:{C}` | pub/sub channel | every event of the channel, and queries of its state, for the nodes that follow it | not stored |
//! | `cc:bans` | hash | the bans in force: field `["user","channel"]` (JSON; channel `null` for the server), value the ban as JSON | one field per ban; expired ones are dropped when a node connects |
//! | `cc:moderation` | pub/sub channel | kicks, bans and unbans, for every node | not stored |
//! | `cc:u:{U}` | pub/sub channel | events for user `U`'s connections (`dm:new`, `dm:sent`, `message:delivery`) and changes of `U`'s presence, followed by the nodes where `U` is connected or watched | not stored |
//! | `cc:p:{U}` | hash | user `U`'s presence on each node where it is connected: field the node's id, value the node's view (archive) | one field per node with devices of `U`; a node's fields are removed when it goes offline there, stops, or is taken for gone |
//! | `cc:n:{U}` | hash | user `U`'s notifications: field `<created_at hex>.<id>`, value JSON | at most `max_notifications`, the oldest dropped; expires `notification_ttl_ms` after the newest |
//! | `cc:c:{U}` | hash | user `U`'s conversations: field the peer, value `<unread>:<timestamp>:<last message as JSON>` | at most `max_conversations`, the oldest dropped; expires `notification_ttl_ms` after the last message |
//! | `cc:nodes` | sorted set | the live nodes, scored by their last heartbeat (Redis time, ms) | one member per node; silent ones removed after `node_timeout_ms` × 3/4 |
//! | `cc:node:{N}:users` | set | the users node `N` has a field of in `cc:p:{U}` (to clean up after it) | one member per user online there; removed with the node |
//! | `cc:to:{N}` | pub/sub channel | node `N`'s own: call operations for the calls it holds, events for its connections from calls held elsewhere, other nodes' parts of its queries | not stored |
//! | `cc:gone` | pub/sub channel | ids of nodes that stopped or were taken for gone | not stored |
//!
//! A published payload is `offset:epoch:` then the node-to-node archive
//! (offset 0 and no epoch for unsequenced events); the archive is rkyv, as
//! the binary protocol, and carries the event itself, so a receiving node
//! encodes each frame once for its members.

use std::collections::HashSet;
use std::io;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use futures_util::stream::{FuturesOrdered, StreamExt};
use redis::{RedisError, Script, Value};
use rkyv::rancor;

mod link;
pub(crate) mod proxy;
use link::{Conn, Push, Pushes, Subs, Target};
use proxy::{Proxies, Remote};

use crate::engine::cluster::{set_offset, ClusterMsg, Incoming, Outgoing};
use crate::engine::user::NodePresence;
use crate::engine::NotificationChange;
use crate::engine::{
    home_of, in_charge, owner_of, CallCmd, CallOp, ChannelPart, ConnId, ConnRef, MeshMsg, ModKind,
    Moderation, PresenceQuery, ShardId,
};
use crate::metrics::ClusterMetrics;
use crate::node::Node;
use crate::protocol::{Conversation, Notification, Protocol, ServerMessage};

/// The bridge's mesh endpoint on a node of `shards` shards (after the
/// server API's).
pub fn bridge_endpoint(shards: usize) -> ShardId {
    (shards + 1) as ShardId
}

/// How long a Redis command may take before the link counts as lost.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Reconnection backoff: from the first to the last, doubling.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));
/// Sequenced events in flight to Redis at most (then the bridge waits for
/// answers before taking more off the mesh).
const MAX_IN_FLIGHT: usize = 4096;

/// Orders, keeps and publishes one sequenced event.
/// KEYS: meta (a hash of `epoch` and `offset`), log. ARGV: pub/sub channel,
/// archive, history depth, an epoch for a channel that has none, expiry
/// (ms), the publish command (`SPUBLISH` on a Redis Cluster: the channel
/// shares the keys' slot).
const SEQUENCE: &str = r#"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[4]
  redis.call('DEL', KEYS[1], KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch)
end
local offset = redis.call('HINCRBY', KEYS[1], 'offset', 1)
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], offset .. '-1', 'm', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
redis.call(ARGV[6], ARGV[1], offset .. ':' .. epoch .. ':' .. ARGV[2])
return {offset, epoch}
"#;

/// A channel's state: its offset, epoch and last events (newest first).
/// KEYS: meta, log. ARGV: how many events, an epoch for a channel that has
/// none, expiry (ms).
const LOAD: &str = r#"
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  epoch = ARGV[2]
  redis.call('DEL', KEYS[1], KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch)
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
local offset = tonumber(redis.call('HGET', KEYS[1], 'offset') or '0')
return {offset, epoch, redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', ARGV[1])}
"#;

/// Keeps or lifts a ban, then tells every node.
/// KEYS: the bans hash. ARGV: field, `ban`/`unban`/`kick`, the ban as JSON,
/// the payload to publish.
const MODERATE: &str = r#"
if ARGV[2] == 'ban' then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
elseif ARGV[2] == 'unban' then
  redis.call('HDEL', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', 'cc:moderation', ARGV[4])
return 1
"#;

/// Marks this node alive and finds the nodes that went silent.
/// KEYS: the live nodes (a sorted set). ARGV: this node's id, how long a
/// node may be silent (ms). Returns whether this node was new there, the
/// silent nodes it removed, and the live ones.
const HEARTBEAT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local new = redis.call('ZADD', KEYS[1], now, ARGV[1])
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
for _, n in ipairs(gone) do
  redis.call('ZREM', KEYS[1], n)
end
return {new, gone, redis.call('ZRANGE', KEYS[1], 0, -1)}
"#;

/// Keeps a change of a user's notifications and tells the nodes that
/// follow the user. KEYS: the user's notifications (a hash: field
/// `<created_at as 16 hex digits>.<id>`, value the notification as JSON).
/// ARGV: `add`/`set`/`del`/`clear`, the publish command, the user's
/// pub/sub channel, the payload, at most how many, expiry (ms), then
/// field and value pairs (`add`, `set`: `set` only rewrites fields still
/// there) or fields (`del`).
const NOTIFICATIONS: &str = r#"
local op = ARGV[1]
if op == 'clear' then
  redis.call('DEL', KEYS[1])
else
  local step = 2
  if op == 'del' then step = 1 end
  for i = 7, #ARGV, step do
    if op == 'del' then
      redis.call('HDEL', KEYS[1], ARGV[i])
    elseif op == 'add' or redis.call('HEXISTS', KEYS[1], ARGV[i]) == 1 then
      redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
    end
  end
  if op == 'add' then
    local max = tonumber(ARGV[5])
    local n = redis.call('HLEN', KEYS[1])
    if n > max then
      local fields = redis.call('HKEYS', KEYS[1])
      table.sort(fields)
      for i = 1, n - max do
        redis.call('HDEL', KEYS[1], fields[i])
      end
    end
    redis.call('PEXPIRE', KEYS[1], ARGV[6])
  end
end
redis.call(ARGV[2], ARGV[3], ARGV[4])
return 1
"#;

/// Keeps the last direct message of a user's conversation with a peer.
/// KEYS: the user's conversations (a hash: field the peer, value
/// `<unread>:<timestamp>:<message as JSON>`). ARGV: peer, timestamp, the
/// message, `1` if it is to the user (one more unread; `0` reads the
/// conversation), at most how many, expiry (ms).
const CONVERSATION: &str = r#"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
local unread = 0
if ARGV[4] == '1' then
  if cur then unread = tonumber(string.match(cur, '^(%d+):')) or 0 end
  unread = unread + 1
end
redis.call('HSET', KEYS[1], ARGV[1], unread .. ':' .. ARGV[2] .. ':' .. ARGV[3])
local max = tonumber(ARGV[5])
local n = redis.call('HLEN', KEYS[1])
if n > max then
  local all = redis.call('HGETALL', KEYS[1])
  local by_age = {}
  for i = 1, #all, 2 do
    table.insert(by_age, {all[i], tonumber(string.match(all[i + 1], '^%d+:(%d+):')) or 0})
  end
  table.sort(by_age, function(a, b) return a[2] < b[2] end)
  for i = 1, n - max do
    redis.call('HDEL', KEYS[1], by_age[i][1])
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[6])
return 1
"#;

const BANS: &str = "cc:bans";
const MODERATION: &str = "cc:moderation";
const NODES: &str = "cc:nodes";
const GONE: &str = "cc:gone";
/// A published presence payload starts with this (events with an offset).
const PRESENCE_PREFIX: &[u8] = b"p:";
/// A published change of notifications: `n:<node>:<JSON>`.
const NOTIFICATIONS_PREFIX: &[u8] = b"n:";
/// On a node's own channel: a call operation (`c:` JSON), or a frame for
/// one of its connections (`f:` shard, slot, generation, frame).
const CALL_PREFIX: &[u8] = b"c:";
const FRAME_PREFIX: &[u8] = b"f:";
/// On a channel's pub/sub channel: a query of the channel's state from a
/// node (`q:<node>:<token>:<JSON of an empty part>`); on the node's own
/// channel, a node's answer (`r:<token>:<JSON part>`).
const QUERY_PREFIX: &[u8] = b"q:";
const PART_PREFIX: &[u8] = b"r:";
/// How long a query of a channel's state waits for the other nodes.
const QUERY_TIMEOUT: Duration = Duration::from_secs(1);

/// Nodes taken for gone, for a while: long enough for their presence to be
/// cleaned up from Redis (by whichever node found them silent).
#[derive(Default)]
struct Gone {
    since: std::collections::HashMap<u64, tokio::time::Instant>,
    /// The same ids, shared with the reads in flight.
    set: Arc<HashSet<u64>>,
}

impl Gone {
    fn add(&mut self, nodes: &[u64]) {
        let now = tokio::time::Instant::now();
        for n in nodes {
            self.since.entry(*n).or_insert(now);
        }
        self.set = Arc::new(self.since.keys().copied().collect());
    }

    /// Keeps the nodes `keep` says, and none taken for gone more than ten
    /// node timeouts (at least ten minutes) ago.
    fn keep(&mut self, keep: impl Fn(u64) -> bool, node_timeout_ms: u64) {
        let ttl = Duration::from_millis((10 * node_timeout_ms).max(600_000));
        let before = self.since.len();
        self.since.retain(|n, at| keep(*n) && at.elapsed() < ttl);
        if self.since.len() != before {
            self.set = Arc::new(self.since.keys().copied().collect());
        }
    }

    fn set(&self) -> Arc<HashSet<u64>> {
        self.set.clone()
    }
}

/// A query of a channel's state waiting for the other nodes' parts.
struct Query {
    channel: Arc<str>,
    parts: Vec<ChannelPart>,
    then: crate::engine::cluster::QueryThen,
    /// Parts still expected (unknown until Redis says how many heard it).
    waiting: Option<usize>,
    until: tokio::time::Instant,
}

/// A call operation on its way to the node that holds the call.
#[derive(serde::Serialize, serde::Deserialize)]
struct CallWire {
    origin: u64,
    call: u64,
    user: String,
    /// The asking connection on `origin`: shard, slot, generation, binary.
    from: Option<(u16, u32, u32, bool)>,
    ack: Option<u64>,
    op: CallWireOp,
}

#[derive(serde::Serialize, serde::Deserialize)]
enum CallWireOp {
    Answer(Option<String>),
    Reject(Option<String>),
    End,
    /// The candidate as JSON text.
    Ice(String),
    PartyGone,
}

impl CallWire {
    fn new(origin: u64, op: &CallOp) -> Option<CallWire> {
        let wire_op = match &op.op {
            CallCmd::Answer { sdp } => CallWireOp::Answer(sdp.clone()),
            CallCmd::Reject { reason } => CallWireOp::Reject(reason.clone()),
            CallCmd::End => CallWireOp::End,
            CallCmd::Ice(c) => CallWireOp::Ice(c.0.clone()),
            CallCmd::PartyGone => CallWireOp::PartyGone,
            // Calls are made on the caller's node.
            CallCmd::Create { .. } => return None,
        };
        Some(CallWire {
            origin,
            call: op.call,
            user: op.user.to_string(),
            from: op
                .from
                .map(|(c, p)| (c.shard, c.conn.slot, c.conn.gen, p == Protocol::Binary)),
            ack: op.ack,
            op: wire_op,
        })
    }

    /// The operation, its asker stood in for by `stand_in`.
    fn into_op(self, stand_in: impl FnOnce(Remote) -> ConnRef) -> CallOp {
        let from = self.from.map(|(shard, slot, gen, binary)| {
            let protocol = if binary {
                Protocol::Binary
            } else {
                Protocol::Json
            };
            let conn = ConnRef {
                shard,
                conn: ConnId { slot, gen },
            };
            let r = Remote {
                node: self.origin,
                conn,
                protocol,
            };
            (stand_in(r), protocol)
        });
        CallOp {
            call: self.call,
            user: self.user.into(),
            from,
            ack: self.ack,
            op: match self.op {
                CallWireOp::Answer(sdp) => CallCmd::Answer { sdp },
                CallWireOp::Reject(reason) => CallCmd::Reject { reason },
                CallWireOp::End => CallCmd::End,
                CallWireOp::Ice(c) => CallCmd::Ice(crate::protocol::Json(c)),
                CallWireOp::PartyGone => CallCmd::PartyGone,
            },
        }
    }
}

/// A frame for a connection of another node.
fn frame_payload(conn: ConnRef, frame: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(FRAME_PREFIX.len() + 10 + frame.len());
    p.extend_from_slice(FRAME_PREFIX);
    p.extend_from_slice(&conn.shard.to_be_bytes());
    p.extend_from_slice(&conn.conn.slot.to_be_bytes());
    p.extend_from_slice(&conn.conn.gen.to_be_bytes());
    p.extend_from_slice(frame);
    p
}

fn parse_frame(p: &[u8]) -> Option<(ConnRef, &[u8])> {
    let p = p.strip_prefix(FRAME_PREFIX)?;
    if p.len() < 10 {
        return None;
    }
    let shard = u16::from_be_bytes(p[0..2].try_into().ok()?);
    let slot = u32::from_be_bytes(p[2..6].try_into().ok()?);
    let gen = u32::from_be_bytes(p[6..10].try_into().ok()?);
    let conn = ConnRef {
        shard,
        conn: ConnId { slot, gen },
    };
    Some((conn, &p[10..]))
}

/// The "epoch" part of a user event's payload names a connection to skip
/// (`<node>.<shard>.<slot>.<gen>`), or is empty.
fn except_spec(r: &Remote) -> String {
    format!(
        "{:016x}.{}.{}.{}",
        r.node, r.conn.shard, r.conn.conn.slot, r.conn.conn.gen
    )
}

fn parse_except(s: &str) -> Option<(u64, ConnRef)> {
    let mut parts = s.split('.');
    let node = u64::from_str_radix(parts.next()?, 16).ok()?;
    let shard = parts.next()?.parse().ok()?;
    let slot = parts.next()?.parse().ok()?;
    let gen = parts.next()?.parse().ok()?;
    Some((
        node,
        ConnRef {
            shard,
            conn: ConnId { slot, gen },
        },
    ))
}

fn node_channel(node: u64) -> String {
    format!("cc:to:{{{}}}", node_name(node))
}

/// What one node sends another about a channel event.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct Wire {
    origin: u64,
    except: Option<String>,
    msg: ServerMessage,
}

fn encode_wire(origin: u64, out: &Outgoing) -> Vec<u8> {
    let w = Wire {
        origin,
        except: out.except.as_deref().map(str::to_string),
        msg: out.msg.clone(),
    };
    rkyv::to_bytes::<rancor::Error>(&w)
        .expect("events always serialize")
        .to_vec()
}

fn decode_wire(bytes: &[u8]) -> Result<Wire, String> {
    rkyv::from_bytes::<Wire, rancor::Error>(bytes).map_err(|e| format!("bad archive: {e}"))
}

/// Splits a published payload into offset, epoch and archive.
fn split_payload(p: &[u8]) -> Option<(u64, &str, &[u8])> {
    let a = p.iter().position(|&b| b == b':')?;
    let b = a + 1 + p[a + 1..].iter().position(|&b| b == b':')?;
    let offset = std::str::from_utf8(&p[..a]).ok()?.parse().ok()?;
    let epoch = std::str::from_utf8(&p[a + 1..b]).ok()?;
    Some((offset, epoch, &p[b + 1..]))
}

fn pubsub_channel(channel: &str) -> String {
    format!("cc:{{{channel}}}")
}

fn keys(channel: &str) -> [String; 2] {
    [
        format!("cc:{{{channel}}}:meta"),
        format!("cc:{{{channel}}}:log"),
    ]
}

fn user_channel(user: &str) -> String {
    format!("cc:u:{{{user}}}")
}

fn presence_key(user: &str) -> String {
    format!("cc:p:{{{user}}}")
}

fn conversations_key(user: &str) -> String {
    format!("cc:c:{{{user}}}")
}

/// A user's conversations as Redis keeps them, most recent first.
fn read_conversations(all: Vec<(String, String)>, limit: usize) -> Vec<Conversation> {
    let mut out: Vec<(u64, Conversation)> = all
        .into_iter()
        .filter_map(|(peer, v)| {
            let mut parts = v.splitn(3, ':');
            let unread = parts.next()?.parse().ok()?;
            let at = parts.next()?.parse().ok()?;
            let last_message = serde_json::from_str(parts.next()?).ok()?;
            Some((
                at,
                Conversation {
                    user_id: peer,
                    last_message,
                    unread,
                },
            ))
        })
        .collect();
    out.sort_by_key(|c| std::cmp::Reverse(c.0));
    out.into_iter().take(limit).map(|(_, c)| c).collect()
}

fn notifications_key(user: &str) -> String {
    format!("cc:n:{{{user}}}")
}

/// A notification's field in the user's hash: by age, then id.
fn notification_field(n: &Notification) -> String {
    format!("{:016x}.{}", n.created_at, n.notification_id)
}

fn node_users_key(node: &str) -> String {
    format!("cc:node:{{{node}}}:users")
}

fn node_name(node: u64) -> String {
    format!("{node:016x}")
}

fn encode_presence(p: &NodePresence) -> Vec<u8> {
    rkyv::to_bytes::<rancor::Error>(p)
        .expect("presence always serializes")
        .to_vec()
}

fn decode_presence(bytes: &[u8]) -> Result<NodePresence, String> {
    rkyv::from_bytes::<NodePresence, rancor::Error>(bytes)
        .map_err(|e| format!("bad presence archive: {e}"))
}

/// The user a user channel name stands for.
fn user_of(name: &str) -> Option<&str> {
    name.strip_prefix("cc:u:{")?.strip_suffix('}')
}

/// The channel a pub/sub channel name stands for.
fn channel_of(name: &str) -> Option<&str> {
    name.strip_prefix("cc:{")?.strip_suffix('}')
}

/// A Redis URL without its password, for logs and `check-config`.
pub fn without_password(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:<hidden>{}", &url[..s + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

/// Starts the bridge's thread; `bell` is the receiving end of its mesh
/// doorbell. The thread ends when the node drains.
pub fn spawn(node: Arc<Node>, bell: StdUnixStream) -> io::Result<JoinHandle<io::Result<()>>> {
    std::thread::Builder::new()
        .name("corecast-bridge".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let bell = tokio::net::UnixStream::from_std(bell)?;
                Bridge::new(node).run(bell).await;
                Ok(())
            })
        })
}

/// Why the link to Redis ended.
enum End {
    /// The node drains.
    Stop,
    Lost(String),
}

impl From<RedisError> for End {
    fn from(e: RedisError) -> End {
        End::Lost(e.to_string())
    }
}

struct Link {
    conn: Conn,
    sink: Subs,
    stream: Pushes,
}

/// What a request to Redis came back with.
enum Answer {
    /// A sequenced or published event: its offset and epoch (0 when not
    /// sequenced).
    Event(Box<Outgoing>, Result<(u64, String), RedisError>),
    /// A subscription changed, or presence was kept.
    Done(Result<(), RedisError>),
    /// A user followed, with the other nodes' presence of it.
    Followed(Arc<str>, Result<Vec<NodePresence>, RedisError>),
    /// The other nodes' presence of a query's users.
    Loaded(
        Box<PresenceQuery>,
        Result<Vec<Vec<NodePresence>>, RedisError>,
    ),
    /// A user's notifications, read from Redis.
    Notifications(
        Arc<str>,
        Option<crate::engine::cluster::Asker>,
        Result<Vec<Notification>, RedisError>,
    ),
    /// A query of a channel's state published, with how many nodes heard
    /// it.
    Asked(u64, Result<i64, RedisError>),
    /// A change of notifications kept, for its asker.
    Kept(
        Option<crate::engine::cluster::Asker>,
        Result<(), RedisError>,
    ),
    /// A user's conversations, read from Redis.
    Conversations(
        Arc<str>,
        usize,
        crate::engine::cluster::Asker,
        Result<Vec<Conversation>, RedisError>,
    ),
    /// A call operation published for the node holding the call, with how
    /// many subscribers heard it.
    Forwarded(Box<CallOp>, Result<i64, RedisError>),
    /// Whether a new call's callee is online on another node.
    Reached(Box<CallOp>, Result<bool, RedisError>),
    /// A heartbeat: whether this node was new in the live set, the silent
    /// nodes it removed, the live ones.
    Beat(Result<(i64, Vec<String>, Vec<String>), RedisError>),
}

/// Requests to Redis whose answers are awaited in order.
type InFlight = FuturesOrdered<std::pin::Pin<Box<dyn std::future::Future<Output = Answer>>>>;

/// Who asked for a moderation action, and the ack id.
type Asker = (Option<(ConnRef, Protocol)>, Option<u64>);

struct Bridge {
    node: Arc<Node>,
    me: ShardId,
    shards: usize,
    id: u64,
    metrics: Arc<ClusterMetrics>,
    /// Redis as the logs show it (without a password).
    shown: String,
    /// `PUBLISH`, or `SPUBLISH` on a Redis Cluster.
    publish_cmd: &'static str,
    history_size: usize,
    ttl_ms: u64,
    sequence: Arc<Script>,
    load: Script,
    moderate: Script,
    heartbeat: Script,
    notifications: Arc<Script>,
    conversation: Arc<Script>,
    max_conversations: usize,
    max_notifications: usize,
    notification_ttl_ms: u64,
    /// How long a silent node lives on in the others' eyes (ms).
    node_timeout_ms: u64,
    /// The live nodes (this one included), as the last heartbeat found.
    live: HashSet<u64>,
    /// Nodes taken for gone (their presence, if Redis still has it for a
    /// moment, is not read). A node that started since the last heartbeat
    /// is in neither set, and is read.
    gone: Gone,
    /// Channels this node follows.
    followed: HashSet<Arc<str>>,
    /// This node's own pub/sub channel (`cc:to:{N}`).
    own_channel: String,
    /// Connections of other nodes the bridge stands in for.
    proxies: Proxies,
    /// Queries of channels' state waiting for other nodes, by token.
    queries: std::collections::HashMap<u64, Query>,
    /// Frames the shards sent to stand-ins, to pass on.
    frames: Vec<(ConnId, bytes::Bytes)>,
    /// Moderation actions of this node on their way through Redis: who
    /// asked, by token.
    pending: std::collections::HashMap<u64, Asker>,
    next_token: u64,
    /// Sequenced events the lost link did not take, for their owners once
    /// the shards know the cluster is down.
    requeue: Vec<Outgoing>,
}

impl Bridge {
    fn new(node: Arc<Node>) -> Bridge {
        let (id, metrics) = node.cluster.clone().expect("cluster mode");
        let shards = node.shards();
        let s = node.config.engine_settings();
        Bridge {
            me: bridge_endpoint(shards),
            shards,
            id,
            metrics,
            shown: node.config.redis_shown(),
            publish_cmd: "PUBLISH",
            history_size: s.history_size,
            ttl_ms: s.history_ttl_ms,
            sequence: Arc::new(Script::new(SEQUENCE)),
            load: Script::new(LOAD),
            moderate: Script::new(MODERATE),
            heartbeat: Script::new(HEARTBEAT),
            notifications: Arc::new(Script::new(NOTIFICATIONS)),
            conversation: Arc::new(Script::new(CONVERSATION)),
            max_conversations: s.max_conversations,
            max_notifications: s.max_notifications,
            notification_ttl_ms: s.notification_ttl_ms,
            node_timeout_ms: node.config.node_timeout_ms,
            live: HashSet::new(),
            gone: Gone::default(),
            followed: HashSet::new(),
            own_channel: node_channel(id),
            proxies: Proxies::new(bridge_endpoint(shards)),
            queries: Default::default(),
            frames: Vec::new(),
            pending: Default::default(),
            next_token: 1,
            requeue: Vec::new(),
            node,
        }
    }

    async fn run(mut self, mut bell: tokio::net::UnixStream) {
        let shown = self.shown.clone();
        let config = &self.node.config;
        let client = match Target::new(&config.redis, &config.redis_cluster) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(redis = %shown, error = %e, "cannot use the Redis URL; the node stays alone");
                return;
            }
        };
        self.publish_cmd = client.publish_command();
        let mut backoff = BACKOFF.0;
        let mut was_up = false;
        loop {
            match self.connect(&client).await {
                Ok(link) => {
                    tracing::info!(redis = %shown, node = format!("{:016x}", self.id), "cluster: connected to Redis");
                    if was_up {
                        self.metrics.reconnects.inc();
                    }
                    was_up = true;
                    backoff = BACKOFF.0;
                    let mut link = link;
                    let bans = match load_bans(&mut link.conn).await {
                        Ok(b) => b,
                        Err(e) => {
                            tracing::warn!(error = %e, "cluster: cannot load the bans");
                            if let End::Stop = self.wait_down(&mut bell, backoff).await {
                                return;
                            }
                            backoff = (backoff * 2).min(BACKOFF.1);
                            continue;
                        }
                    };
                    // The gone nodes are known before users are followed
                    // (their presence is not read).
                    let beat = self.beat(link.conn.clone()).await;
                    if let Err(e) = self.on_beat(beat, true, &link).await {
                        let End::Lost(e) = e else { return };
                        tracing::warn!(error = %e, "cluster: cannot join the live nodes");
                        if let End::Stop = self.wait_down(&mut bell, backoff).await {
                            return;
                        }
                        backoff = (backoff * 2).min(BACKOFF.1);
                        continue;
                    }
                    self.metrics.up.set(1);
                    self.tell_all(|| ClusterMsg::Bans(bans.clone())).await;
                    self.tell_all(|| ClusterMsg::Up).await;
                    let end = self.serve(link, &mut bell).await;
                    for (_, (from, ack)) in std::mem::take(&mut self.pending) {
                        if from.is_some() {
                            let m = Moderation {
                                kind: ModKind::Kick,
                                user: "".into(),
                                channel: None,
                                reason: None,
                                by: String::new(),
                                at: 0,
                                from,
                                ack,
                            };
                            let e = "the cluster's Redis went away: try again".to_string();
                            self.send(0, ClusterMsg::ModerationFailed(Box::new(m), e))
                                .await;
                        }
                    }
                    match end {
                        End::Stop => return,
                        End::Lost(e) => {
                            tracing::warn!(redis = %shown, error = %e, "cluster: lost Redis; channels are sequenced by this node until it is back")
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(redis = %shown, error = %e, retry_ms = backoff.as_millis() as u64, "cluster: cannot reach Redis");
                }
            }
            if let End::Stop = self.wait_down(&mut bell, backoff).await {
                return;
            }
            backoff = (backoff * 2).min(BACKOFF.1);
        }
    }

    async fn connect(&self, target: &Target) -> Result<Link, RedisError> {
        let (mut conn, mut sink, stream) =
            target.connect(CONNECT_TIMEOUT, RESPONSE_TIMEOUT).await?;
        // Loaded up front (on every master of a cluster): a script loaded
        // on first use would run some events after others sent later (each
        // would retry after NOSCRIPT).
        self.sequence.load_async(&mut conn).await?;
        self.load.load_async(&mut conn).await?;
        self.moderate.load_async(&mut conn).await?;
        self.heartbeat.load_async(&mut conn).await?;
        self.notifications.load_async(&mut conn).await?;
        self.conversation.load_async(&mut conn).await?;
        sink.subscribe_all(MODERATION).await?;
        sink.subscribe_all(GONE).await?;
        sink.follow(&self.own_channel).await?;
        Ok(Link { conn, sink, stream })
    }

    /// Sends a message to a shard, waiting while its queue is full.
    async fn send(&self, to: ShardId, msg: ClusterMsg) {
        self.send_mesh(to, MeshMsg::Cluster(Box::new(msg))).await
    }

    async fn send_mesh(&self, to: ShardId, mut msg: MeshMsg) {
        while let Err(back) = self.node.mesh.send(self.me, to, msg) {
            if self.node.is_draining() {
                return;
            }
            msg = back;
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    }

    async fn tell_all(&self, msg: impl Fn() -> ClusterMsg) {
        for s in 0..self.shards {
            self.send(s as ShardId, msg()).await;
        }
    }

    fn owner(&self, channel: &str) -> ShardId {
        owner_of(channel, self.shards as u16)
    }

    /// Takes what the shards sent off the mesh.
    /// Frames for stand-ins are kept in `frames`.
    fn take(&mut self) -> Vec<ClusterMsg> {
        let mut got = Vec::new();
        for from in 0..self.shards as ShardId {
            while let Some(m) = self.node.mesh.pop(from, self.me) {
                match m {
                    MeshMsg::Cluster(c) => got.push(*c),
                    MeshMsg::ToConn { conn, frame } => self.frames.push((conn, frame)),
                    MeshMsg::ToConns(t) => {
                        for conn in t.conns {
                            let frame = self
                                .proxies
                                .get(conn)
                                .and_then(|r| t.frames.get(r.protocol).cloned());
                            if let Some(f) = frame {
                                self.frames.push((conn, f));
                            }
                        }
                    }
                    other => tracing::debug!(?other, "the bridge ignores a mesh message"),
                }
            }
        }
        got
    }

    /// Publishes `payload` on pub/sub channel `name` (sharded on a Redis
    /// Cluster); the future answers with how many subscribers heard it.
    fn publish_bytes(
        &self,
        link: &Link,
        name: String,
        payload: Vec<u8>,
    ) -> impl std::future::Future<Output = Result<i64, RedisError>> + 'static {
        let mut conn = link.conn.clone();
        let publish = self.publish_cmd;
        async move {
            redis::cmd(publish)
                .arg(name)
                .arg(payload)
                .query_async::<i64>(&mut conn)
                .await
        }
    }

    /// Passes frames for stand-ins to their connections' nodes.
    fn pass_frames(&mut self, link: &Link, in_flight: &mut InFlight) {
        for (id, frame) in std::mem::take(&mut self.frames) {
            let Some(r) = self.proxies.get(id) else {
                continue;
            };
            let sent =
                self.publish_bytes(link, node_channel(r.node), frame_payload(r.conn, &frame));
            in_flight.push_back(Box::pin(
                async move { Answer::Done(sent.await.map(|_| ())) },
            ));
        }
    }

    /// Waits for the doorbell (or `limit`). Returns false when the node
    /// stops.
    async fn doorbell(&self, bell: &mut tokio::net::UnixStream) -> bool {
        let mut buf = [0u8; 64];
        loop {
            match bell.try_read(&mut buf) {
                Ok(0) => return false,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => return false,
            }
        }
        !self.node.is_draining()
    }

    /// While Redis is out of reach: sequenced events go back to their
    /// owners to be sequenced there; the rest waits for the cluster.
    async fn wait_down(&mut self, bell: &mut tokio::net::UnixStream, wait: Duration) -> End {
        let until = tokio::time::Instant::now() + wait;
        loop {
            for m in self.take() {
                self.refuse(m).await;
            }
            // Frames for other nodes' connections cannot reach them now.
            self.frames.clear();
            if self.node.is_draining() {
                return End::Stop;
            }
            let parked = self.node.mesh.park(self.me);
            if !parked {
                continue;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(until) => {
                    self.node.mesh.unpark(self.me);
                    return End::Lost(String::new());
                }
                r = bell.readable() => {
                    self.node.mesh.unpark(self.me);
                    if r.is_err() || !self.doorbell(bell).await {
                        return End::Stop;
                    }
                }
            }
        }
    }

    /// What a shard asked for that Redis cannot take now: a sequenced event
    /// goes back to its owner to be sequenced there, a moderation action
    /// is answered with an error; the rest is redone when Redis is back
    /// (the shards follow their channels and users again on `Up`) or does
    /// not outlive the moment (relayed events).
    async fn refuse(&mut self, m: ClusterMsg) {
        match m {
            ClusterMsg::Sequence(out) => {
                self.metrics.failed.inc();
                let owner = self.owner(&out.channel);
                self.send(owner, ClusterMsg::Unsequenced(out)).await;
            }
            ClusterMsg::Moderate(m) => {
                let why = "the cluster's Redis is unreachable: try again".to_string();
                self.send(0, ClusterMsg::ModerationFailed(m, why)).await;
            }
            // Answered with what this node knows.
            ClusterMsg::LoadPresence(q) => self.loaded(q, Vec::new()).await,
            ClusterMsg::CallReach(op, _) => {
                let owner = (op.call >> 48) as ShardId;
                self.send(owner, ClusterMsg::CallReach(op, Some(false)))
                    .await
            }
            ClusterMsg::CallTo { op, .. } => self.call_gone(op).await,
            ClusterMsg::LoadConversations { user, limit, asker } => {
                self.loaded_conversations(user, limit, None, asker).await
            }
            // Kept on this node.
            ClusterMsg::Notifications {
                asker: Some(asker), ..
            } => {
                let to = asker.0.shard;
                let msg = ClusterMsg::NotificationsKept { asker, error: None };
                self.send(to, msg).await
            }
            // Answered with this node's part.
            msg @ ClusterMsg::ChannelQuery { .. } => {
                if let ClusterMsg::ChannelQuery { channel, .. } = &msg {
                    let owner = self.owner(channel);
                    self.send(owner, msg).await;
                }
            }
            ClusterMsg::LoadNotifications {
                user,
                asker: Some(asker),
            } => {
                self.loaded_notifications(user, Vec::new(), Some(asker))
                    .await
            }
            _ => {}
        }
    }

    /// Answers a presence query's home with the other nodes' views (none
    /// when they could not be read).
    async fn loaded(&self, q: Box<PresenceQuery>, mut views: Vec<Vec<NodePresence>>) {
        views.resize_with(q.users.len(), Vec::new);
        let home = q
            .users
            .first()
            .map_or(0, |u| home_of(u, self.shards as u16));
        self.send(home, ClusterMsg::PresenceLoaded(q, views)).await;
    }

    async fn loaded_conversations(
        &self,
        user: Arc<str>,
        limit: usize,
        conversations: Option<Vec<Conversation>>,
        asker: crate::engine::cluster::Asker,
    ) {
        let home = home_of(&user, self.shards as u16);
        let msg = ClusterMsg::ConversationsLoaded {
            user,
            limit,
            conversations,
            asker,
        };
        self.send(home, msg).await;
    }

    /// Answers a query with the parts it has (its own first).
    async fn answer_query(&mut self, token: u64) {
        let Some(q) = self.queries.remove(&token) else {
            return;
        };
        let owner = self.owner(&q.channel);
        let msg = ClusterMsg::ChannelQuery {
            channel: q.channel,
            parts: q.parts,
            then: q.then,
        };
        self.send(owner, msg).await;
    }

    fn next_query_deadline(&self) -> tokio::time::Instant {
        self.queries
            .values()
            .map(|q| q.until)
            .min()
            .unwrap_or_else(|| tokio::time::Instant::now() + QUERY_TIMEOUT)
    }

    /// Answers the queries whose time is up.
    async fn answer_late_queries(&mut self) {
        let now = tokio::time::Instant::now();
        let late: Vec<u64> = self
            .queries
            .iter()
            .filter(|(_, q)| q.until <= now)
            .map(|(t, _)| *t)
            .collect();
        for token in late {
            self.answer_query(token).await;
        }
    }

    /// Tells the asker of a call operation that no node holds the call.
    async fn call_gone(&self, op: Box<CallOp>) {
        let to = op.from.map_or(0, |(c, _)| c.shard);
        self.send(to, ClusterMsg::CallGone(op)).await;
    }

    /// Gives a user's notifications read from Redis to its home.
    async fn loaded_notifications(
        &self,
        user: Arc<str>,
        notifications: Vec<Notification>,
        asker: Option<crate::engine::cluster::Asker>,
    ) {
        let home = home_of(&user, self.shards as u16);
        let msg = ClusterMsg::NotificationsLoaded {
            user,
            notifications,
            asker,
        };
        self.send(home, msg).await;
    }

    /// Runs the heartbeat script.
    fn beat(
        &self,
        mut conn: Conn,
    ) -> impl std::future::Future<Output = Result<(i64, Vec<String>, Vec<String>), RedisError>>
    {
        let script = self.heartbeat.clone();
        let (me, silent) = (node_name(self.id), self.node_timeout_ms * 3 / 4);
        async move {
            script
                .key(NODES)
                .arg(me)
                .arg(silent)
                .invoke_async(&mut conn)
                .await
        }
    }

    /// What a heartbeat found: nodes gone since the last one are dropped
    /// by the shards (their users' presence with them); the nodes this one
    /// found silent are cleaned up after and announced. A node that was
    /// not among the live ones although it had joined was taken for gone:
    /// it publishes its users' presence again.
    async fn on_beat(
        &mut self,
        r: Result<(i64, Vec<String>, Vec<String>), RedisError>,
        first: bool,
        link: &Link,
    ) -> Result<(), End> {
        let (new, removed, live) = r?;
        let parse = |v: &[String]| -> HashSet<u64> {
            v.iter()
                .filter_map(|n| u64::from_str_radix(n, 16).ok())
                .collect()
        };
        let live = parse(&live);
        if new == 1 && !first {
            tracing::warn!(
                "cluster: the other nodes took this one for gone; publishing its presence again"
            );
            self.tell_all(|| ClusterMsg::Republish).await;
        }
        let mut gone: HashSet<u64> = self.live.difference(&live).copied().collect();
        gone.extend(parse(&removed));
        gone.remove(&self.id);
        let gone: Vec<u64> = gone.into_iter().collect();
        self.gone.add(&gone);
        self.gone.keep(|n| !live.contains(&n), self.node_timeout_ms);
        self.live = live;
        for n in &removed {
            tracing::warn!(node = %n, "cluster: a node went silent; its users are offline now");
            let conn = link.conn.clone();
            let n = n.clone();
            tokio::spawn(async move {
                if let Err(e) = forget_node(conn, &n).await {
                    tracing::warn!(node = %n, error = %e, "cluster: cannot clean up after a gone node");
                }
            });
        }
        if !gone.is_empty() {
            self.tell_all(|| ClusterMsg::NodesGone(gone.clone())).await;
        }
        Ok(())
    }

    /// This node stops: the others take its users offline now, not after
    /// `node_timeout_ms`.
    async fn leave(&self, link: &Link) {
        let me = node_name(self.id);
        let mut conn = link.conn.clone();
        let left = async {
            redis::cmd("ZREM")
                .arg(NODES)
                .arg(&me)
                .query_async::<i64>(&mut conn)
                .await?;
            forget_node(conn.clone(), &me).await
        };
        match tokio::time::timeout(Duration::from_secs(2), left).await {
            Ok(Ok(())) => tracing::info!("cluster: left the live nodes"),
            Ok(Err(e)) => tracing::warn!(error = %e, "cluster: cannot leave the live nodes"),
            Err(_) => tracing::warn!("cluster: leaving the live nodes timed out"),
        }
    }

    async fn serve(&mut self, mut link: Link, bell: &mut tokio::net::UnixStream) -> End {
        let mut in_flight: InFlight = FuturesOrdered::new();
        let mut leftover = Vec::new();
        let end = self
            .serve_link(&mut link, bell, &mut in_flight, &mut leftover)
            .await;
        // The shards hear first that the cluster is down, so that they
        // sequence what comes back to them.
        self.metrics.up.set(0);
        self.followed.clear();
        self.metrics.channels.set(0);
        self.tell_all(|| ClusterMsg::Down).await;
        // Nothing accepted is dropped: what is in flight gets its answer
        // (on a dead link, an error, and its owner sequences it), and what
        // was not sent yet goes back.
        let settle = async {
            while let Some(answer) = in_flight.next().await {
                let _ = self.answered(answer, None).await;
            }
        };
        if tokio::time::timeout(RESPONSE_TIMEOUT, settle)
            .await
            .is_err()
        {
            tracing::error!("cluster: events still in flight to Redis were given up");
        }
        for out in std::mem::take(&mut self.requeue) {
            self.refuse(ClusterMsg::Sequence(Box::new(out))).await;
        }
        let tokens: Vec<u64> = self.queries.keys().copied().collect();
        for token in tokens {
            self.answer_query(token).await;
        }
        for m in leftover {
            self.refuse(m).await;
        }
        end
    }

    async fn serve_link(
        &mut self,
        link: &mut Link,
        bell: &mut tokio::net::UnixStream,
        in_flight: &mut InFlight,
        leftover: &mut Vec<ClusterMsg>,
    ) -> End {
        let every = Duration::from_millis(self.node_timeout_ms / 4);
        let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if in_flight.len() < MAX_IN_FLIGHT {
                let mut batch = self.take().into_iter();
                while let Some(m) = batch.next() {
                    if let Err(e) = self.handle(m, link, in_flight).await {
                        leftover.extend(batch);
                        return e;
                    }
                }
                self.pass_frames(link, in_flight);
            }
            if self.node.is_draining() {
                self.leave(link).await;
                return End::Stop;
            }
            let parked = in_flight.len() < MAX_IN_FLIGHT && self.node.mesh.park(self.me);
            tokio::select! {
                biased;
                Some(answer) = in_flight.next(), if !in_flight.is_empty() => {
                    self.node.mesh.unpark(self.me);
                    if let Err(e) = self.answered(answer, Some(link)).await {
                        return e;
                    }
                }
                m = link.stream.next() => {
                    self.node.mesh.unpark(self.me);
                    match m {
                        Some(m) => self.received(&m).await,
                        None => return End::Lost("the pub/sub connection closed".into()),
                    }
                }
                r = bell.readable(), if parked => {
                    self.node.mesh.unpark(self.me);
                    if r.is_err() || !self.doorbell(bell).await {
                        self.leave(link).await;
                        return End::Stop;
                    }
                }
                _ = tokio::time::sleep_until(self.next_query_deadline()), if !self.queries.is_empty() => {
                    self.node.mesh.unpark(self.me);
                    self.answer_late_queries().await;
                }
                _ = heartbeat.tick() => {
                    self.node.mesh.unpark(self.me);
                    let beat = self.beat(link.conn.clone());
                    in_flight.push_back(Box::pin(async move { Answer::Beat(beat.await) }));
                }
                _ = std::future::ready(()), if !parked && in_flight.len() < MAX_IN_FLIGHT => {}
            }
        }
    }

    async fn handle(
        &mut self,
        m: ClusterMsg,
        link: &mut Link,
        in_flight: &mut InFlight,
    ) -> Result<(), End> {
        match m {
            ClusterMsg::Attach { channel } => {
                tracing::debug!(%channel, "cluster: attach");
                if self.followed.insert(channel.clone()) {
                    link.sink.follow(&pubsub_channel(&channel)).await?;
                    self.metrics.channels.set(self.followed.len() as u64);
                }
                // Loaded after subscribing: whatever is published from here
                // on arrives by pub/sub, and what came before is in the load
                // (the owner skips what it already has).
                let [meta, log] = keys(&channel);
                let fresh = format!("{:016x}", crate::shard::random_u64());
                let v: Value = self
                    .load
                    .key(meta)
                    .key(log)
                    .arg(self.history_size)
                    .arg(fresh)
                    .arg(self.ttl_ms)
                    .invoke_async(&mut link.conn)
                    .await?;
                let (offset, epoch, entries) = parse_load(v).map_err(End::Lost)?;
                let owner = self.owner(&channel);
                let msg = ClusterMsg::Attached {
                    channel,
                    epoch: epoch.into(),
                    offset,
                    entries,
                };
                self.send(owner, msg).await;
            }
            ClusterMsg::Detach { channel } => {
                if self.followed.remove(&channel) {
                    link.sink.unfollow(&pubsub_channel(&channel)).await?;
                    self.metrics.channels.set(self.followed.len() as u64);
                }
            }
            ClusterMsg::Sequence(out) => {
                let wire = encode_wire(self.id, &out);
                let [meta, log] = keys(&out.channel);
                let script = self.sequence.clone();
                let mut conn = link.conn.clone();
                let args = (
                    pubsub_channel(&out.channel),
                    format!("{:016x}", crate::shard::random_u64()),
                    self.history_size,
                    self.ttl_ms,
                    self.publish_cmd,
                );
                in_flight.push_back(Box::pin(async move {
                    let r = script
                        .key(meta)
                        .key(log)
                        .arg(args.0)
                        .arg(wire)
                        .arg(args.2)
                        .arg(args.1)
                        .arg(args.3)
                        .arg(args.4)
                        .invoke_async::<(u64, String)>(&mut conn)
                        .await;
                    Answer::Event(out, r)
                }));
                self.metrics.sent.inc();
            }
            ClusterMsg::Relay(out) => {
                tracing::debug!(channel = %out.channel, event = out.msg.event.name(), "cluster: relay");
                let name = pubsub_channel(&out.channel);
                self.publish(name, out, link, in_flight);
            }
            // Many at once when users reconnect: in flight together, not
            // one round trip after the other.
            // Subscribed first, then read: a later change arrives by
            // pub/sub, and the home keeps the latest of each node's views.
            ClusterMsg::FollowUser { user } => {
                let mut sink = link.sink.clone();
                let mut conn = link.conn.clone();
                let (me, gone) = (self.id, self.gone.set());
                in_flight.push_back(Box::pin(async move {
                    let r = async {
                        sink.follow(&user_channel(&user)).await?;
                        read_presence(&mut conn, &user, me, &gone).await
                    }
                    .await;
                    Answer::Followed(user, r)
                }));
            }
            ClusterMsg::Presence(p) => {
                let mut conn = link.conn.clone();
                let (me, user) = (node_name(self.id), p.view.user_id.clone());
                let archive = encode_presence(&p);
                // Kept while the user has devices here, invisible ones too.
                let offline = p.view.status == crate::protocol::Status::Offline && !p.connected;
                let publish = self.publish_cmd;
                in_flight.push_back(Box::pin(async move {
                    let r = keep_presence(&mut conn, publish, &me, &user, archive, offline).await;
                    Answer::Done(r)
                }));
                self.metrics.sent.inc();
            }
            ClusterMsg::Notifications {
                user,
                change,
                keep,
                asker,
            } => {
                let (op, pairs): (&str, Vec<String>) = match &change {
                    NotificationChange::New(n) => ("add", field_and_json(std::slice::from_ref(n))),
                    NotificationChange::Read(_) => ("set", field_and_json(&keep)),
                    NotificationChange::Clear(_) => {
                        ("del", keep.iter().map(notification_field).collect())
                    }
                    NotificationChange::ClearAll => ("clear", Vec::new()),
                };
                let json = serde_json::to_string(&change).expect("changes serialize");
                let mut payload = NOTIFICATIONS_PREFIX.to_vec();
                payload.extend_from_slice(format!("{}:{json}", node_name(self.id)).as_bytes());
                let script = self.notifications.clone();
                let mut conn = link.conn.clone();
                let args = (
                    op,
                    self.publish_cmd,
                    self.max_notifications,
                    self.notification_ttl_ms,
                );
                in_flight.push_back(Box::pin(async move {
                    let mut call = script.key(notifications_key(&user));
                    call.arg(args.0)
                        .arg(args.1)
                        .arg(user_channel(&user))
                        .arg(payload)
                        .arg(args.2)
                        .arg(args.3);
                    for p in pairs {
                        call.arg(p);
                    }
                    let r = call.invoke_async::<i64>(&mut conn).await.map(|_| ());
                    Answer::Kept(asker, r)
                }));
                self.metrics.sent.inc();
            }
            ClusterMsg::LoadNotifications { user, asker } => {
                let mut conn = link.conn.clone();
                in_flight.push_back(Box::pin(async move {
                    let r = redis::cmd("HVALS")
                        .arg(notifications_key(&user))
                        .query_async::<Vec<String>>(&mut conn)
                        .await
                        .map(|all| {
                            all.iter()
                                .filter_map(|j| match serde_json::from_str(j) {
                                    Ok(n) => Some(n),
                                    Err(e) => {
                                        tracing::warn!(%user, error = %e, "cluster: a notification that cannot be read");
                                        None
                                    }
                                })
                                .collect()
                        });
                    Answer::Notifications(user, asker, r)
                }));
            }
            // The users' reads are pipelined on the connection.
            ClusterMsg::LoadPresence(q) => {
                let conn = link.conn.clone();
                let (me, gone) = (self.id, self.gone.set());
                in_flight.push_back(Box::pin(async move {
                    let mut reads: FuturesOrdered<_> = q
                        .users
                        .iter()
                        .map(|u| {
                            let (mut conn, gone) = (conn.clone(), &gone);
                            async move { read_presence(&mut conn, u, me, gone).await }
                        })
                        .collect();
                    let mut all = Vec::with_capacity(q.users.len());
                    let mut failed = None;
                    while let Some(v) = reads.next().await {
                        match v {
                            Ok(v) => all.push(v),
                            Err(e) => failed = Some(e),
                        }
                    }
                    drop(reads);
                    Answer::Loaded(q, failed.map_or(Ok(all), Err))
                }));
            }
            ClusterMsg::UnfollowUser { user } => {
                let mut sink = link.sink.clone();
                in_flight.push_back(Box::pin(async move {
                    Answer::Done(sink.unfollow(&user_channel(&user)).await)
                }));
            }
            ClusterMsg::ToUser {
                user, msg, except, ..
            } => {
                // Published like a relayed channel event; nothing falls back
                // to this node if Redis refuses it (the user's connections
                // here have it already).
                let name = user_channel(&user);
                let skip = except
                    .and_then(|c| self.proxies.get(c.conn))
                    .map(|r| except_spec(&r));
                let out = Box::new(Outgoing {
                    channel: user,
                    msg,
                    except: None,
                    reply: None,
                });
                self.publish_with(name, skip.as_deref().unwrap_or(""), out, link, in_flight);
            }
            ClusterMsg::Conversation {
                user,
                peer,
                msg,
                incoming,
            } => {
                let json = serde_json::to_string(&msg).expect("messages serialize");
                let script = self.conversation.clone();
                let mut conn = link.conn.clone();
                let (max, ttl) = (self.max_conversations, self.notification_ttl_ms);
                in_flight.push_back(Box::pin(async move {
                    let r = script
                        .key(conversations_key(&user))
                        .arg(&*peer)
                        .arg(msg.timestamp)
                        .arg(json)
                        .arg(if incoming { "1" } else { "0" })
                        .arg(max)
                        .arg(ttl)
                        .invoke_async::<i64>(&mut conn)
                        .await;
                    Answer::Done(r.map(|_| ()))
                }));
            }
            ClusterMsg::LoadConversations { user, limit, asker } => {
                let mut conn = link.conn.clone();
                in_flight.push_back(Box::pin(async move {
                    let r = redis::cmd("HGETALL")
                        .arg(conversations_key(&user))
                        .query_async::<Vec<(String, String)>>(&mut conn)
                        .await
                        .map(|all| read_conversations(all, limit));
                    Answer::Conversations(user, limit, asker, r)
                }));
            }
            ClusterMsg::ChannelQuery {
                channel,
                parts,
                then,
            } => {
                let token = self.next_token;
                self.next_token += 1;
                let Some(kind) = parts.first().map(|p| p.empty()) else {
                    return Ok(());
                };
                let mut payload = QUERY_PREFIX.to_vec();
                payload.extend_from_slice(format!("{}:{token}:", node_name(self.id)).as_bytes());
                payload.extend_from_slice(&serde_json::to_vec(&kind).expect("parts serialize"));
                let name = pubsub_channel(&channel);
                self.queries.insert(
                    token,
                    Query {
                        channel,
                        parts,
                        then,
                        waiting: None,
                        until: tokio::time::Instant::now() + QUERY_TIMEOUT,
                    },
                );
                let sent = self.publish_bytes(link, name, payload);
                in_flight.push_back(Box::pin(async move { Answer::Asked(token, sent.await) }));
            }
            ClusterMsg::ChannelPart {
                part,
                origin,
                token,
                ..
            } => {
                let mut payload = PART_PREFIX.to_vec();
                payload.extend_from_slice(format!("{token}:").as_bytes());
                payload.extend_from_slice(&serde_json::to_vec(&part).expect("parts serialize"));
                let sent = self.publish_bytes(link, node_channel(origin), payload);
                in_flight.push_back(Box::pin(
                    async move { Answer::Done(sent.await.map(|_| ())) },
                ));
            }
            ClusterMsg::CallTo { node, op } => {
                let Some(wire) = CallWire::new(self.id, &op) else {
                    return Ok(());
                };
                let mut payload = CALL_PREFIX.to_vec();
                payload.extend_from_slice(&serde_json::to_vec(&wire).expect("calls serialize"));
                let sent = self.publish_bytes(link, node_channel(node), payload);
                in_flight.push_back(Box::pin(async move { Answer::Forwarded(op, sent.await) }));
                self.metrics.sent.inc();
            }
            ClusterMsg::CallReach(op, _) => {
                let CallCmd::Create { callee, .. } = &op.op else {
                    return Ok(());
                };
                let (callee, me, gone) = (callee.clone(), self.id, self.gone.set());
                let mut conn = link.conn.clone();
                in_flight.push_back(Box::pin(async move {
                    let r = read_presence(&mut conn, &callee, me, &gone)
                        .await
                        .map(|views| {
                            views.iter().any(|p| {
                                p.connected || p.view.status != crate::protocol::Status::Offline
                            })
                        });
                    Answer::Reached(op, r)
                }));
            }
            ClusterMsg::Moderate(m) => {
                let token = self.next_token;
                self.next_token += 1;
                let op = match m.kind {
                    ModKind::Ban { .. } => "ban",
                    ModKind::Unban => "unban",
                    ModKind::Kick => "kick",
                };
                let json = crate::bans::to_json(&m);
                let payload = format!("{:016x}:{token}:{json}", self.id);
                let r = self
                    .moderate
                    .key(BANS)
                    .arg(ban_field(&m))
                    .arg(op)
                    .arg(&json)
                    .arg(payload)
                    .invoke_async::<i64>(&mut link.conn)
                    .await;
                match r {
                    Ok(_) => {
                        self.pending.insert(token, (m.from, m.ack));
                    }
                    Err(e) => {
                        let why = format!("the cluster's Redis did not take it: {e}");
                        self.send(0, ClusterMsg::ModerationFailed(m, why)).await;
                        after(&e)?;
                    }
                }
            }
            other => tracing::debug!(?other, "the bridge ignores a message meant for shards"),
        }
        Ok(())
    }

    /// Publishes an unsequenced event on pub/sub channel `name` (offset 0,
    /// no epoch); its answer comes in order with the sequenced ones.
    fn publish(&self, name: String, out: Box<Outgoing>, link: &Link, in_flight: &mut InFlight) {
        self.publish_with(name, "", out, link, in_flight)
    }

    /// The same, with `tag` in the epoch's place (a user event: the
    /// connection to skip).
    fn publish_with(
        &self,
        name: String,
        tag: &str,
        out: Box<Outgoing>,
        link: &Link,
        in_flight: &mut InFlight,
    ) {
        let mut payload = format!("0:{tag}:").into_bytes();
        payload.extend_from_slice(&encode_wire(self.id, &out));
        let sent = self.publish_bytes(link, name, payload);
        in_flight.push_back(Box::pin(async move {
            Answer::Event(out, sent.await.map(|_| (0, String::new())))
        }));
        self.metrics.sent.inc();
    }

    /// A message on this node's own channel: a call operation for a call
    /// held here, or a frame for a connection here.
    async fn for_this_node(&mut self, payload: &[u8]) {
        if let Some(rest) = payload.strip_prefix(PART_PREFIX) {
            let parsed = std::str::from_utf8(rest).ok().and_then(|r| {
                let (token, json) = r.split_once(':')?;
                Some((
                    token.parse::<u64>().ok()?,
                    serde_json::from_str::<ChannelPart>(json).ok()?,
                ))
            });
            let Some((token, part)) = parsed else {
                tracing::warn!("cluster: a channel's part that cannot be read");
                return;
            };
            let Some(q) = self.queries.get_mut(&token) else {
                return;
            };
            q.parts.push(part);
            if q.waiting.is_some_and(|w| q.parts.len() > w) {
                self.answer_query(token).await;
            }
            return;
        }
        if let Some((conn, frame)) = parse_frame(payload) {
            if (conn.shard as usize) < self.shards {
                let frame = bytes::Bytes::copy_from_slice(frame);
                let msg = MeshMsg::ToConn {
                    conn: conn.conn,
                    frame,
                };
                self.send_mesh(conn.shard, msg).await;
            }
            return;
        }
        let wire = payload
            .strip_prefix(CALL_PREFIX)
            .and_then(|j| serde_json::from_slice::<CallWire>(j).ok());
        let Some(wire) = wire else {
            tracing::warn!("cluster: a message for this node that cannot be read");
            return;
        };
        self.metrics.received.inc();
        let proxies = &mut self.proxies;
        let op = wire.into_op(|r| proxies.stand_in(r));
        let holder = (op.call >> 48) as ShardId;
        let to = if (holder as usize) < self.shards {
            holder
        } else {
            home_of(&op.user, self.shards as u16)
        };
        self.send_mesh(to, MeshMsg::CallOp(Box::new(op))).await;
    }

    /// A kick, ban or unban published by a node (this one included): the
    /// shard in charge on this node carries it out.
    async fn moderation(&mut self, payload: &[u8]) {
        let parsed = std::str::from_utf8(payload).ok().and_then(|p| {
            let (node, rest) = p.split_once(':')?;
            let (token, json) = rest.split_once(':')?;
            Some((
                u64::from_str_radix(node, 16).ok()?,
                token.parse::<u64>().ok()?,
                json,
            ))
        });
        let Some((node, token, json)) = parsed else {
            tracing::warn!("cluster: a moderation payload that is not ours");
            return;
        };
        let mut m = match crate::bans::from_json(json) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "cluster: a moderation action that cannot be read");
                return;
            }
        };
        if node == self.id {
            if let Some((from, ack)) = self.pending.remove(&token) {
                m.from = from;
                m.ack = ack;
            }
        }
        let to = in_charge(&m, self.shards as u16);
        self.send_mesh(to, MeshMsg::Moderate(Arc::new(m))).await;
    }

    async fn answered(&mut self, answer: Answer, link: Option<&Link>) -> Result<(), End> {
        match answer {
            Answer::Event(out, r) => self.sequenced(out, r).await,
            Answer::Done(Ok(())) => Ok(()),
            // The subscriptions are made again when the link is.
            Answer::Done(Err(e)) => Err(End::Lost(e.to_string())),
            Answer::Followed(user, Ok(views)) => {
                if !views.is_empty() {
                    let home = home_of(&user, self.shards as u16);
                    self.send(home, ClusterMsg::Presences { user, views }).await;
                }
                Ok(())
            }
            Answer::Followed(_, Err(e)) => Err(End::Lost(e.to_string())),
            Answer::Loaded(q, r) => {
                let (views, end) = match r {
                    Ok(v) => (v, Ok(())),
                    Err(e) => {
                        tracing::warn!(error = %e, "cluster: cannot read presence from Redis; answering with this node's");
                        (Vec::new(), after(&e))
                    }
                };
                self.loaded(q, views).await;
                end
            }
            Answer::Notifications(user, asker, r) => {
                let (notifications, end) = match r {
                    Ok(n) => (n, Ok(())),
                    Err(e) => {
                        tracing::warn!(%user, error = %e, "cluster: cannot read a user's notifications");
                        (Vec::new(), after(&e))
                    }
                };
                if !notifications.is_empty() || asker.is_some() {
                    self.loaded_notifications(user, notifications, asker).await;
                }
                end
            }
            Answer::Kept(asker, r) => {
                let (error, end) = match r {
                    Ok(()) => (None, Ok(())),
                    Err(e) => {
                        let why = format!(
                            "kept on this node only, the cluster's Redis did not take it: {e}"
                        );
                        (Some(why), after(&e))
                    }
                };
                if let Some(asker) = asker {
                    let to = asker.0.shard;
                    self.send(to, ClusterMsg::NotificationsKept { asker, error })
                        .await;
                }
                end
            }
            Answer::Conversations(user, limit, asker, r) => {
                let (conversations, end) = match r {
                    Ok(c) => (Some(c), Ok(())),
                    Err(e) => {
                        tracing::warn!(%user, error = %e, "cluster: cannot read a user's conversations");
                        (None, after(&e))
                    }
                };
                self.loaded_conversations(user, limit, conversations, asker)
                    .await;
                end
            }
            Answer::Asked(token, r) => {
                let heard = match r {
                    Ok(n) => n.max(0) as usize,
                    Err(e) => {
                        self.answer_query(token).await;
                        return after(&e);
                    }
                };
                if let Some(q) = self.queries.get_mut(&token) {
                    // This node hears its own query when it follows the
                    // channel; it does not answer it.
                    let me = usize::from(self.followed.contains(&q.channel));
                    q.waiting = Some(heard.saturating_sub(me));
                    if q.parts.len() > q.waiting.unwrap_or(0) {
                        self.answer_query(token).await;
                    }
                }
                Ok(())
            }
            Answer::Forwarded(op, r) => {
                let heard = match r {
                    Ok(n) => n > 0,
                    Err(e) => {
                        self.call_gone(op).await;
                        return after(&e);
                    }
                };
                if !heard {
                    self.call_gone(op).await;
                }
                Ok(())
            }
            Answer::Reached(op, r) => {
                let online = match r {
                    Ok(o) => o,
                    Err(e) => {
                        tracing::warn!(error = %e, "cluster: cannot read a callee's presence");
                        false
                    }
                };
                let owner = (op.call >> 48) as ShardId;
                self.send(owner, ClusterMsg::CallReach(op, Some(online)))
                    .await;
                Ok(())
            }
            Answer::Beat(r) => match link {
                Some(link) => self.on_beat(r, false, link).await,
                None => Ok(()),
            },
        }
    }

    /// Redis answered a sequenced (or relayed) event.
    async fn sequenced(
        &mut self,
        mut out: Box<Outgoing>,
        r: Result<(u64, String), RedisError>,
    ) -> Result<(), End> {
        match r {
            Ok((0, _)) => Ok(()),
            Ok((offset, epoch)) => {
                if out.reply.is_some() {
                    set_offset(&mut out.msg, &epoch, offset);
                    let owner = self.owner(&out.channel);
                    self.send(owner, ClusterMsg::Sequenced(out)).await;
                }
                Ok(())
            }
            Err(e) => {
                if link_lost(&e) {
                    // Not lost: its owner sequences it, once the shards
                    // know the cluster is down.
                    if sequenced_event(&out) {
                        self.requeue.push(*out);
                    }
                    return Err(End::Lost(e.to_string()));
                }
                tracing::error!(error = %e, "cluster: Redis refused an event");
                if sequenced_event(&out) {
                    self.metrics.failed.inc();
                    let owner = self.owner(&out.channel);
                    let why = format!("the cluster's Redis refused the event: {e}");
                    self.send(owner, ClusterMsg::Refused(out, why)).await;
                }
                Ok(())
            }
        }
    }

    /// An event published by a node (this one included).
    async fn received(&mut self, m: &Push) {
        if m.channel() == MODERATION {
            return self.moderation(m.payload()).await;
        }
        if m.channel() == self.own_channel {
            return self.for_this_node(m.payload()).await;
        }
        if m.channel() == GONE {
            let node = std::str::from_utf8(m.payload())
                .ok()
                .and_then(|n| u64::from_str_radix(n, 16).ok());
            match node {
                Some(n) if n == self.id => {
                    tracing::warn!("cluster: the other nodes took this one for gone; publishing its presence again");
                    self.tell_all(|| ClusterMsg::Republish).await;
                }
                Some(n) => {
                    self.gone.add(&[n]);
                    if self.live.remove(&n) {
                        self.tell_all(|| ClusterMsg::NodesGone(vec![n])).await;
                    }
                }
                None => tracing::warn!("cluster: a node id that is not ours"),
            }
            return;
        }
        if let Some(user) = user_of(m.channel()) {
            if let Some(rest) = m.payload().strip_prefix(NOTIFICATIONS_PREFIX) {
                let parsed = std::str::from_utf8(rest).ok().and_then(|r| {
                    let (node, json) = r.split_once(':')?;
                    let node = u64::from_str_radix(node, 16).ok()?;
                    Some((node, serde_json::from_str::<NotificationChange>(json).ok()?))
                });
                let Some((node, change)) = parsed else {
                    tracing::warn!(%user, "cluster: a change of notifications that cannot be read");
                    return;
                };
                if node == self.id {
                    return;
                }
                self.metrics.received.inc();
                let to = home_of(user, self.shards as u16);
                let msg = ClusterMsg::Notifications {
                    user: user.into(),
                    change,
                    keep: Vec::new(),
                    asker: None,
                };
                return self.send(to, msg).await;
            }
            if let Some(archive) = m.payload().strip_prefix(PRESENCE_PREFIX) {
                let p = match decode_presence(archive) {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::warn!(%user, error = %e, "cluster: a presence that cannot be read");
                        return;
                    }
                };
                if p.node == self.id {
                    return;
                }
                self.metrics.received.inc();
                // A node that publishes lives (its heartbeat may come later).
                self.live.insert(p.node);
                self.gone.keep(|n| n != p.node, self.node_timeout_ms);
                let to = home_of(user, self.shards as u16);
                let msg = ClusterMsg::Presences {
                    user: user.into(),
                    views: vec![p],
                };
                return self.send(to, msg).await;
            }
            let w = split_payload(m.payload())
                .and_then(|(_, tag, a)| Some((parse_except(tag), decode_wire(a).ok()?)));
            let Some((skip, w)) = w else {
                tracing::warn!(%user, "cluster: a user event that cannot be read");
                return;
            };
            if w.origin == self.id {
                return;
            }
            self.metrics.received.inc();
            let to = home_of(user, self.shards as u16);
            let msg = ClusterMsg::ToUser {
                user: user.into(),
                msg: w.msg,
                except: skip.filter(|(n, _)| *n == self.id).map(|(_, c)| c),
                origin: w.origin,
            };
            return self.send(to, msg).await;
        }
        let Some(channel) = channel_of(m.channel()) else {
            return;
        };
        let Some(channel) = self.followed.get(channel).cloned() else {
            return;
        };
        if let Some(rest) = m.payload().strip_prefix(QUERY_PREFIX) {
            let parsed = std::str::from_utf8(rest).ok().and_then(|r| {
                let (node, rest) = r.split_once(':')?;
                let (token, json) = rest.split_once(':')?;
                Some((
                    u64::from_str_radix(node, 16).ok()?,
                    token.parse::<u64>().ok()?,
                    serde_json::from_str::<ChannelPart>(json).ok()?,
                ))
            });
            let Some((origin, token, part)) = parsed else {
                tracing::warn!(%channel, "cluster: a query that cannot be read");
                return;
            };
            if origin != self.id {
                let owner = self.owner(&channel);
                let msg = ClusterMsg::ChannelPart {
                    channel,
                    part,
                    origin,
                    token,
                };
                self.send(owner, msg).await;
            }
            return;
        }
        let Some((offset, epoch, archive)) = split_payload(m.payload()) else {
            tracing::warn!(%channel, "cluster: a payload that is not ours");
            return;
        };
        let w = match decode_wire(archive) {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(%channel, error = %e, "cluster: an event that cannot be read");
                return;
            }
        };
        self.metrics.received.inc();
        tracing::debug!(%channel, offset, event = w.msg.event.name(), "cluster: received");
        let mut msg = w.msg;
        if offset > 0 {
            set_offset(&mut msg, epoch, offset);
        }
        let owner = self.owner(&channel);
        let inc = Incoming {
            channel,
            offset,
            epoch: epoch.into(),
            origin: w.origin,
            except: w.except.map(Into::into),
            msg,
        };
        self.send(owner, ClusterMsg::Event(Box::new(inc))).await;
    }
}

/// Field and JSON value of each notification, one after the other.
fn field_and_json(ns: &[Notification]) -> Vec<String> {
    ns.iter()
        .flat_map(|n| {
            [
                notification_field(n),
                serde_json::to_string(n).expect("notifications serialize"),
            ]
        })
        .collect()
}

/// Keeps (or, offline, removes) this node's view of a user in Redis and
/// publishes it to the nodes that follow the user.
async fn keep_presence(
    conn: &mut Conn,
    publish: &str,
    me: &str,
    user: &str,
    archive: Vec<u8>,
    offline: bool,
) -> Result<(), RedisError> {
    let key = presence_key(user);
    let mine = node_users_key(me);
    if offline {
        redis::cmd("HDEL")
            .arg(&key)
            .arg(me)
            .query_async::<i64>(conn)
            .await?;
        redis::cmd("SREM")
            .arg(&mine)
            .arg(user)
            .query_async::<i64>(conn)
            .await?;
    } else {
        redis::cmd("HSET")
            .arg(&key)
            .arg(me)
            .arg(&archive)
            .query_async::<i64>(conn)
            .await?;
        redis::cmd("SADD")
            .arg(&mine)
            .arg(user)
            .query_async::<i64>(conn)
            .await?;
    }
    let mut payload = PRESENCE_PREFIX.to_vec();
    payload.extend_from_slice(&archive);
    redis::cmd(publish)
        .arg(user_channel(user))
        .arg(payload)
        .query_async::<i64>(conn)
        .await?;
    Ok(())
}

/// The other nodes' views of a user, from Redis (but those of nodes taken
/// for gone, whose fields may not be cleaned up yet).
async fn read_presence(
    conn: &mut Conn,
    user: &str,
    me: u64,
    gone: &HashSet<u64>,
) -> Result<Vec<NodePresence>, RedisError> {
    let all: Vec<(String, Vec<u8>)> = redis::cmd("HGETALL")
        .arg(presence_key(user))
        .query_async(conn)
        .await?;
    let mut views = Vec::with_capacity(all.len());
    for (node, archive) in all {
        let Ok(n) = u64::from_str_radix(&node, 16) else {
            continue;
        };
        if n == me || gone.contains(&n) {
            continue;
        }
        match decode_presence(&archive) {
            Ok(p) => views.push(p),
            Err(e) => tracing::warn!(%user, error = %e, "cluster: a presence that cannot be read"),
        }
    }
    Ok(views)
}

/// Removes a gone node's presence from Redis and tells the other nodes.
async fn forget_node(mut conn: Conn, node: &str) -> Result<(), RedisError> {
    let set = node_users_key(node);
    let users: Vec<String> = redis::cmd("SMEMBERS")
        .arg(&set)
        .query_async(&mut conn)
        .await?;
    // Many at once (a node may have had many users), in order of no
    // importance.
    for chunk in users.chunks(256) {
        let mut dels: futures_util::stream::FuturesUnordered<_> = chunk
            .iter()
            .map(|user| {
                let mut conn = conn.clone();
                async move {
                    redis::cmd("HDEL")
                        .arg(presence_key(user))
                        .arg(node)
                        .query_async::<i64>(&mut conn)
                        .await
                }
            })
            .collect();
        while let Some(r) = dels.next().await {
            r?;
        }
    }
    redis::cmd("DEL")
        .arg(&set)
        .query_async::<i64>(&mut conn)
        .await?;
    redis::cmd("PUBLISH")
        .arg(GONE)
        .arg(node)
        .query_async::<i64>(&mut conn)
        .await?;
    Ok(())
}

/// Whether an error means the link to Redis is gone (rather than Redis
/// refusing one command).
fn link_lost(e: &RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_timeout()
}

/// How the link fares after an error: lost, or still up.
fn after(e: &RedisError) -> Result<(), End> {
    if link_lost(e) {
        Err(End::Lost(e.to_string()))
    } else {
        Ok(())
    }
}

/// Whether an event that Redis did not take must be sequenced by its owner
/// (a relayed one is not: its members here already have it).
fn sequenced_event(out: &Outgoing) -> bool {
    crate::engine::cluster::sequenced_offset(&out.msg).is_some()
}

/// The field of a ban in the bans hash.
fn ban_field(m: &Moderation) -> String {
    serde_json::json!([&*m.user, m.channel.as_deref()]).to_string()
}

/// The bans in force, from Redis (expired ones are dropped there).
async fn load_bans(conn: &mut Conn) -> Result<Vec<Moderation>, RedisError> {
    let all: std::collections::HashMap<String, String> =
        redis::cmd("HGETALL").arg(BANS).query_async(conn).await?;
    let (live, expired) = read_bans(all);
    if !expired.is_empty() {
        redis::cmd("HDEL")
            .arg(BANS)
            .arg(expired)
            .query_async::<i64>(conn)
            .await?;
    }
    Ok(live)
}

/// The bans in force, and the fields of expired ones.
fn read_bans(all: std::collections::HashMap<String, String>) -> (Vec<Moderation>, Vec<String>) {
    let now = crate::shard::now_ms();
    let (mut live, mut expired) = (Vec::new(), Vec::new());
    for (field, json) in all {
        match crate::bans::from_json(&json) {
            Ok(m) => match m.kind {
                ModKind::Ban { until: Some(t) } if t <= now => expired.push(field),
                _ => live.push(m),
            },
            Err(e) => tracing::warn!(%field, error = %e, "cluster: a ban that cannot be read"),
        }
    }
    (live, expired)
}

/// The cluster's bans, read before the shards start (so that a node does
/// not let a banned user in while its bridge connects).
pub fn initial_bans(one: &str, cluster: &[String]) -> Result<Vec<Moderation>, String> {
    let all: std::collections::HashMap<String, String> = if cluster.is_empty() {
        let client = redis::Client::open(one).map_err(|e| e.to_string())?;
        let mut conn = client
            .get_connection_with_timeout(CONNECT_TIMEOUT)
            .map_err(|e| e.to_string())?;
        conn.set_read_timeout(Some(RESPONSE_TIMEOUT))
            .map_err(|e| e.to_string())?;
        redis::cmd("HGETALL")
            .arg(BANS)
            .query(&mut conn)
            .map_err(|e| e.to_string())?
    } else {
        let client = redis::cluster::ClusterClientBuilder::new(cluster.to_vec())
            .connection_timeout(CONNECT_TIMEOUT)
            .response_timeout(RESPONSE_TIMEOUT)
            .build()
            .map_err(|e| e.to_string())?;
        let mut conn = client.get_connection().map_err(|e| e.to_string())?;
        redis::cmd("HGETALL")
            .arg(BANS)
            .query(&mut conn)
            .map_err(|e| e.to_string())?
    };
    Ok(read_bans(all).0)
}

/// Reads the answer of the `LOAD` script.
fn parse_load(v: Value) -> Result<(u64, String, Vec<ServerMessage>), String> {
    let bad = |what: &str| format!("unexpected answer from Redis loading a channel: {what}");
    let Value::Array(parts) = v else {
        return Err(bad("not an array"));
    };
    let [offset, epoch, entries] = <[Value; 3]>::try_from(parts).map_err(|_| bad("length"))?;
    let offset: u64 = redis::from_redis_value(offset).map_err(|e| bad(&e.to_string()))?;
    let epoch: String = redis::from_redis_value(epoch).map_err(|e| bad(&e.to_string()))?;
    let Value::Array(entries) = entries else {
        return Err(bad("entries"));
    };
    let mut out = Vec::with_capacity(entries.len());
    // Newest first: give them oldest first.
    for e in entries.into_iter().rev() {
        let Value::Array(e) = e else {
            return Err(bad("entry"));
        };
        let [id, fields] = <[Value; 2]>::try_from(e).map_err(|_| bad("entry length"))?;
        let id: String = redis::from_redis_value(id).map_err(|e| bad(&e.to_string()))?;
        let offset: u64 = id
            .split('-')
            .next()
            .and_then(|o| o.parse().ok())
            .ok_or_else(|| bad("entry id"))?;
        let fields: Vec<Vec<u8>> =
            redis::from_redis_value(fields).map_err(|e| bad(&e.to_string()))?;
        let Some(archive) = fields.get(1) else {
            return Err(bad("entry fields"));
        };
        match decode_wire(archive) {
            Ok(w) => {
                let mut msg = w.msg;
                set_offset(&mut msg, &epoch, offset);
                out.push(msg);
            }
            Err(e) => tracing::warn!(error = %e, "cluster: a stored event that cannot be read"),
        }
    }
    Ok((offset, epoch, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_and_names_round_trip() {
        assert_eq!(split_payload(b"12:ab:xyz"), Some((12, "ab", &b"xyz"[..])));
        assert_eq!(split_payload(b"0::x:y"), Some((0, "", &b"x:y"[..])));
        assert_eq!(split_payload(b"nope"), None);
        assert_eq!(channel_of(&pubsub_channel("room:1")), Some("room:1"));
        assert_eq!(channel_of("other"), None);
        assert_eq!(user_of(&user_channel("a:b")), Some("a:b"));
        assert_eq!(channel_of(&user_channel("a")), None);
        assert_eq!(
            without_password("redis://u:secret@h:6379/0"),
            "redis://u:<hidden>@h:6379/0"
        );
        assert_eq!(without_password("redis://h:6379"), "redis://h:6379");
        let conn = ConnRef {
            shard: 3,
            conn: ConnId {
                slot: 70_000,
                gen: 9,
            },
        };
        let r = Remote {
            node: 0xabc,
            conn,
            protocol: Protocol::Binary,
        };
        assert_eq!(parse_except(&except_spec(&r)), Some((0xabc, conn)));
        assert_eq!(parse_except(""), None);
        let p = frame_payload(conn, b"frame");
        assert_eq!(parse_frame(&p), Some((conn, &b"frame"[..])));
        assert_eq!(parse_frame(b"f:short"), None);
    }

    #[test]
    fn conversations_read_from_redis_come_latest_first_and_bad_ones_are_skipped() {
        let dm = |content: &str, at: u64| {
            serde_json::json!({"messageId": "m", "fromUserId": "a", "toUserId": "b",
                "content": content, "timestamp": at})
            .to_string()
        };
        let all = vec![
            ("old".to_string(), format!("0:10:{}", dm("x", 10))),
            ("new".to_string(), format!("3:30:{}", dm("y:z", 30))),
            ("bad".to_string(), "garbage".to_string()),
            ("mid".to_string(), format!("1:20:{}", dm("w", 20))),
        ];
        let got = read_conversations(all.clone(), 10);
        let peers: Vec<(&str, u32)> = got.iter().map(|c| (c.user_id.as_str(), c.unread)).collect();
        assert_eq!(peers, [("new", 3), ("mid", 1), ("old", 0)]);
        assert_eq!(got[0].last_message.content, "y:z");
        assert_eq!(read_conversations(all, 1).len(), 1);
    }
}
