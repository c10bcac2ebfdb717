//! The bridge's connections to Redis: one server, or a Redis Cluster. On a
//! cluster, channels and users are followed with sharded pub/sub
//! (`SSUBSCRIBE`/`SPUBLISH`), so a message travels only to the shard that
//! owns its channel's slot, and the nodes that follow it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{ConnectionLike, MultiplexedConnection, PubSubSink, PubSubStream};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{
    AsyncConnectionConfig, Client, Cmd, Pipeline, ProtocolVersion, PushInfo, PushKind, RedisError,
    RedisFuture, RedisResult, Value,
};

/// Messages a Redis Cluster link may hold before the bridge takes them;
/// beyond, the link counts as lost and is made again (channels are
/// reloaded, so nothing is missed for good).
const PUSH_CAPACITY: usize = 65_536;

/// Where the cluster's Redis is.
pub enum Target {
    One(Client),
    /// The seed nodes of a Redis Cluster.
    Cluster(Vec<String>),
}

impl Target {
    /// From the configuration: `redis` (one server) or `redis_cluster`.
    pub fn new(one: &str, cluster: &[String]) -> RedisResult<Target> {
        if cluster.is_empty() {
            Ok(Target::One(Client::open(one)?))
        } else {
            Ok(Target::Cluster(cluster.to_vec()))
        }
    }

    /// The command that publishes to a channel or a user: sharded on a
    /// Redis Cluster.
    pub fn publish_command(&self) -> &'static str {
        match self {
            Target::One(_) => "PUBLISH",
            Target::Cluster(_) => "SPUBLISH",
        }
    }

    pub async fn connect(
        &self,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> RedisResult<(Conn, Subs, Pushes)> {
        match self {
            Target::One(client) => {
                let config = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(connect_timeout))
                    .set_response_timeout(Some(response_timeout));
                let conn = client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?;
                let pubsub = tokio::time::timeout(connect_timeout, client.get_async_pubsub())
                    .await
                    .map_err(|_| timed_out("pub/sub connection timed out"))??;
                let (sink, stream) = pubsub.split();
                Ok((Conn::One(conn), Subs::One(sink), Pushes::One(stream)))
            }
            Target::Cluster(seeds) => {
                let (tx, rx) = tokio::sync::mpsc::channel(PUSH_CAPACITY);
                let overflow = Arc::new(AtomicBool::new(false));
                let full = overflow.clone();
                let client = ClusterClientBuilder::new(seeds.clone())
                    .use_protocol(ProtocolVersion::RESP3)
                    .connection_timeout(connect_timeout)
                    .response_timeout(response_timeout)
                    .push_sender(move |info: PushInfo| {
                        if tx.try_send(info).is_err() {
                            full.store(true, Ordering::Relaxed);
                        }
                        Ok::<(), redis::aio::SendError>(())
                    })
                    .build()?;
                let conn = tokio::time::timeout(connect_timeout, client.get_async_connection())
                    .await
                    .map_err(|_| timed_out("Redis Cluster connection timed out"))??;
                Ok((
                    Conn::Cluster(conn.clone()),
                    Subs::Cluster(conn),
                    Pushes::Cluster(rx, overflow),
                ))
            }
        }
    }
}

fn timed_out(what: &str) -> RedisError {
    RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        what.to_string(),
    ))
}

/// Commands (scripts are routed by their first key on a cluster).
#[derive(Clone)]
pub enum Conn {
    One(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::One(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::One(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::One(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Subscriptions.
#[derive(Clone)]
pub enum Subs {
    One(PubSubSink),
    Cluster(ClusterConnection),
}

impl Subs {
    /// A corecast channel's or user's pub/sub channel: sharded on a cluster.
    pub async fn follow(&mut self, name: &str) -> RedisResult<()> {
        match self {
            Subs::One(s) => s.subscribe(name).await,
            Subs::Cluster(c) => c.ssubscribe(name).await,
        }
    }

    pub async fn unfollow(&mut self, name: &str) -> RedisResult<()> {
        match self {
            Subs::One(s) => s.unsubscribe(name).await,
            Subs::Cluster(c) => c.sunsubscribe(name).await,
        }
    }

    /// A pub/sub channel every node hears (moderation, gone nodes).
    pub async fn subscribe_all(&mut self, name: &str) -> RedisResult<()> {
        match self {
            Subs::One(s) => s.subscribe(name).await,
            Subs::Cluster(c) => c.subscribe(name).await,
        }
    }

    /// Follows (or stops following, `on` false) many channels and users at
    /// once: on one Redis, a command per `SUBSCRIBE_BATCH` names; on a
    /// Redis Cluster, each name at its slot's master, all side by side.
    pub async fn follow_many(&mut self, names: &[String], on: bool) -> RedisResult<()> {
        match self {
            Subs::One(s) => {
                for chunk in names.chunks(SUBSCRIBE_BATCH) {
                    match on {
                        true => s.subscribe(chunk).await?,
                        false => s.unsubscribe(chunk).await?,
                    }
                }
                Ok(())
            }
            Subs::Cluster(c) => {
                let mut each: futures_util::stream::FuturesUnordered<_> = names
                    .iter()
                    .map(|name| {
                        let mut c = c.clone();
                        async move {
                            match on {
                                true => c.ssubscribe(name).await,
                                false => c.sunsubscribe(name).await,
                            }
                        }
                    })
                    .collect();
                while let Some(r) = each.next().await {
                    r?;
                }
                Ok(())
            }
        }
    }
}

/// Names per `SUBSCRIBE` command on one Redis.
const SUBSCRIBE_BATCH: usize = 1024;

/// A published message: as one Redis's pub/sub connection gave it (not
/// copied), or taken out of a Redis Cluster's push.
pub enum Push {
    One(redis::Msg),
    Cluster { channel: String, payload: Vec<u8> },
}

impl Push {
    pub fn channel(&self) -> &str {
        match self {
            Push::One(m) => m.get_channel_name(),
            Push::Cluster { channel, .. } => channel,
        }
    }

    pub fn payload(&self) -> &[u8] {
        match self {
            Push::One(m) => m.get_payload_bytes(),
            Push::Cluster { payload, .. } => payload,
        }
    }
}

/// What the subscriptions receive.
pub enum Pushes {
    One(PubSubStream),
    Cluster(tokio::sync::mpsc::Receiver<PushInfo>, Arc<AtomicBool>),
}

impl Pushes {
    /// The next message; `None` once the link is lost (or, on a cluster,
    /// a node's connection dropped or messages overflowed: the bridge
    /// makes the link again and reloads what it follows).
    pub async fn next(&mut self) -> Option<Push> {
        match self {
            Pushes::One(s) => s.next().await.map(Push::One),
            Pushes::Cluster(rx, overflow) => loop {
                if overflow.load(Ordering::Relaxed) {
                    tracing::warn!("cluster: Redis Cluster messages overflowed");
                    return None;
                }
                let info = rx.recv().await?;
                match info.kind {
                    PushKind::Message | PushKind::SMessage => {
                        let mut data = info.data.into_iter();
                        let (Some(channel), Some(payload)) = (data.next(), data.next()) else {
                            continue;
                        };
                        let (Ok(channel), Ok(payload)) = (
                            redis::from_redis_value::<String>(channel),
                            redis::from_redis_value::<Vec<u8>>(payload),
                        ) else {
                            continue;
                        };
                        return Some(Push::Cluster { channel, payload });
                    }
                    PushKind::Disconnection => return None,
                    _ => continue,
                }
            },
        }
    }
}
